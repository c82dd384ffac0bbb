"""Run bookkeeping shared by every long stage: JSON-lines metrics, tensorboard / wandb, phase timers, RNG state."""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UserError


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
                 run_name: str = "oodpl", config: dict | None = None):
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        unknown = set(report_to) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise UserError(f"report_to: unknown tracker(s) {sorted(unknown)}; use tensorboard, wandb or none")
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise UserError("report_to includes wandb but wandb is not installed; `pip install wandb`") from None
            self.wandb = wandb.init(project="oodpl", name=run_name, config=config, resume="allow")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None:
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
