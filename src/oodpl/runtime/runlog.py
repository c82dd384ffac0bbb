"""Run bookkeeping shared by every long stage: JSON-lines metrics, tensorboard / wandb, phase timers, RNG state."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from oodpl.errors import UserError, atomic_write_text, with_filename
from oodpl.runtime.rundir import RunLayout


def append_line(path: Path, line: str) -> None:
    """Append one line whole or not at all: one write() on an O_APPEND descriptor, and a failed or short write
    (disk full) is cut back to the previous end, so the file never ends in half a line."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise with_filename(e, path)
    finally:
        os.close(fd)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file; a torn last line (a kill or a full disk in the middle of an append by an
    older version, a hand edit) is skipped, any other unreadable line is an error naming it."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if all(not rest.strip() for rest in lines[i:]):  # the last line: torn
                break
            raise UserError(f"{path}:{i}: not a JSON object; the metrics log is damaged: remove the line") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


@contextlib.contextmanager
def phase(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the wall time of the block to timings[name] (no-op without a dict)."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLogger:
    """metrics.jsonl (always) plus tensorboard and wandb as `report_to` asks. Only the main process writes.

    On resume, lines past the checkpoint's step are dropped, so the log reads as one uninterrupted run."""

    def __init__(self, directory: Path, report_to: list[str], enabled: bool = True, resume_step: int | None = None,
                 run_name: str = "oodpl", config: dict | None = None, tracking=None, stage: str | None = None,
                 prefix: str = ""):
        """`tracking` (config.TrackingConfig) sets the wandb project, the run name and the tensorboard root;
        `stage` names the run when tracking.run_name is unset (`<stage>-<directory name>`); `prefix` is put before
        every tensorboard / wandb metric name (e.g. "meta-test/<domain>/beta_0.1/") and recorded as "stage" in each
        metrics.jsonl line."""
        self.enabled = enabled
        self.path = RunLayout(Path(directory)).metrics
        self.tb = self.wandb = None
        self.prefix = prefix
        project = getattr(tracking, "project", None) or "oodpl"
        if getattr(tracking, "run_name", None):
            run_name = tracking.run_name
        elif stage:
            run_name = f"{stage}-{Path(directory).resolve().name}"
        log_dir = getattr(tracking, "log_dir", None)
        tb_dir = Path(log_dir) / run_name if log_dir else Path(directory) / "tensorboard"
        self.run_name, self.tb_dir = run_name, tb_dir
        if not enabled:
            return
        unknown = set(report_to) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise UserError(f"report_to: unknown tracker(s) {sorted(unknown)}; use tensorboard, wandb or none")
        if resume_step is not None and self.path.exists():  # a torn last line goes too (read_metrics skips it)
            keep = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in keep))
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir), purge_step=resume_step)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise UserError("report_to includes wandb but wandb is not installed; `pip install wandb`") from None
            self.wandb = wandb.init(project=project, name=run_name, config=config, resume="allow")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **({"stage": self.prefix.rstrip("/")} if self.prefix else {}), **values}
        append_line(self.path, json.dumps(row))
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None:
                if self.tb is not None:
                    self.tb.add_scalar(self.prefix + k, v, step)
        if self.wandb is not None:
            self.wandb.log({self.prefix + k: v for k, v in values.items()}, step=step)

    def child(self, prefix: str) -> "MetricsLogger":
        """A logger writing to the same file and trackers under `prefix` (one per domain x beta_test, per RM...)."""
        other = object.__new__(MetricsLogger)
        other.__dict__.update(self.__dict__)
        other.prefix = self.prefix + prefix.rstrip("/") + "/"
        return other

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_disabled(progress: bool) -> bool | None:
    """tqdm's `disable`: True when progress is off; None (= off unless stderr is a terminal) otherwise, so that bars
    do not flood log files of batch jobs."""
    return True if not progress else None


def provenance(wall: float) -> dict:
    """What made this report: the command line, date, machine, this run's wall time and the load average."""
    import os

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"command": "oodpl " + " ".join(sys.argv[1:]) if sys.argv else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}",
            "wall_seconds": round(wall, 1), "load": load}
