"""Peak resident memory and wall time of whole runs: the quick benchmark preset end to end, and a meta-training run
on the default models.

    python perf/bench_memory.py [--skip-quick] [--skip-meta-train] [--meta-steps 2]

Each run is a child process (`python -m oodpl.cli ...`, i.e. the `oodpl` command) in a fresh temporary directory; its
RSS (summed over the process tree) is sampled every 0.2 s with psutil, and the child's own peak (ru_maxrss) is read at
exit. Targets for the quick preset: peak RSS <= 6 GB, wall time <= 15 min. The meta-training run uses the default
config (Config()) with data.max_domains 4 and a few outer steps only (peak memory is reached in the first step; wall
time per step is reported, the default 20-step run is extrapolated, not measured).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C


def run_tracked(cmd: list[str], timeout: float | None = None) -> dict:
    import psutil

    env = dict(os.environ, PYTHONPATH=str(C.ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = {"tree": 0}
    stop = threading.Event()

    def sample():
        try:
            p = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                total = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak["tree"] = max(peak["tree"], total)
            except psutil.Error:
                pass
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        timed_out = True
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    child_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over all children so far
    return {"command": " ".join(cmd), "returncode": proc.returncode, "timed_out": timed_out, "wall_s": wall,
            "peak_rss_tree_mb": peak["tree"] / 2**20,
            "peak_rss_child_maxrss_mb": child_max / 1024 if child_max > before else None,
            "output_tail": out[-3000:]}


def main():
    p = C.parser(__doc__.splitlines()[0], reps=1)
    p.add_argument("--skip-quick", action="store_true")
    p.add_argument("--skip-meta-train", action="store_true")
    p.add_argument("--meta-steps", type=int, default=2, help="outer steps of the default-model meta-train run")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (default 3600)")
    args = p.parse_args()
    res = {"benchmark": "memory"}
    quick = C.ROOT / "configs" / "quick.yaml"
    if not args.skip_quick:
        if quick.exists():
            with tempfile.TemporaryDirectory(prefix="bench_quick_") as tmp:
                cmd = [sys.executable, "-m", "oodpl.cli.main", "--quiet", "benchmark", "--config", str(quick),
                       "--output", str(Path(tmp) / "run")]
                print("running:", " ".join(cmd), flush=True)
                r = run_tracked(cmd, args.timeout)
            r["targets"] = {"peak_rss_gb": 6.0, "wall_min": 15.0}
            r["within_targets"] = (r["returncode"] == 0 and r["peak_rss_tree_mb"] / 1024 <= 6.0
                                   and r["wall_s"] / 60 <= 15.0)
            res["quick_preset"] = r
            print(f"quick preset: rc {r['returncode']}, wall {r['wall_s'] / 60:.1f} min, "
                  f"peak RSS {r['peak_rss_tree_mb'] / 1024:.2f} GB", flush=True)
        else:
            res["quick_preset"] = {"skipped": f"{quick} does not exist"}
            print(res["quick_preset"]["skipped"])
    if not args.skip_meta_train:
        with tempfile.TemporaryDirectory(prefix="bench_meta_") as tmp:
            cmd = [sys.executable, "-m", "oodpl.cli.main", "--quiet", "meta-train", "--output", str(Path(tmp) / "run"),
                   "--set", "data.max_domains=4", "--set", f"meta.outer_steps={args.meta_steps}",
                   "--set", "report_to=[]"]
            print("running:", " ".join(cmd), flush=True)
            r = run_tracked(cmd, args.timeout)
            summary = Path(tmp) / "run" / "summary.json"
            if summary.exists():
                import json

                t = json.loads(summary.read_text())["timings"]
                r["timings"] = t
                r["seconds_per_outer_step"] = t.get("step_total", 0.0) / args.meta_steps
                r["default_20_step_run_extrapolated_s"] = (
                    t.get("load_models", 0) + t.get("sample_bank", 0) + t.get("query_sets", 0)
                    + 20 * r["seconds_per_outer_step"])
        res["meta_train_default_models"] = r
        print(f"meta-train ({args.meta_steps} steps, default models): rc {r['returncode']}, wall {r['wall_s']:.0f}s, "
              f"peak RSS {r['peak_rss_tree_mb'] / 1024:.2f} GB", flush=True)
    C.write_json(args.json, res)


if __name__ == "__main__":
    main()
