"""Meta-training runs end to end on tiny models: outputs, exact resume after SIGKILL, two-process equivalence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oodpl.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [{"domain": d, "prompt": f"{d} says {i}", "chosen": f"lovely kind words {i}", "rejected": f"awful {i}"}
         for d in ("alpha", "beta", "gamma") for i in range(12)]


def tiny_args(tmp_path: Path, steps: int = 6, every: int = 2) -> list[str]:
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return ["--set", "policy.name_or_path=tiny-random", "--set", "reward.name_or_path=tiny-random",
            "--set", "data.task=file", "--set", f"data.path={pairs}", "--set", "data.held_out_domains=[gamma]",
            "--set", "data.support_size=4", "--set", "data.query_size=4", "--set", "rloo.batch_prompts=2",
            "--set", "rloo.num_samples=2", "--set", "policy.max_new_tokens=4", "--set", f"meta.outer_steps={steps}",
            "--set", f"meta.checkpoint_every={every}", "--set", "meta.query_batch=4", "--set", "meta.outer_lr=1e-2",
            "--set", "meta.inner_lr=5.0"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "reward_model" / "model.safetensors"))


def test_meta_train_writes_a_loadable_reward_model(tmp_path):
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model

    out = tmp_path / "run"
    assert main(["--quiet", "meta-train", "-o", str(out), *tiny_args(tmp_path, steps=3)]) == 0
    for name in ("reward_model/config.json", "config.yaml", "split.json", "metrics.jsonl", "summary.json"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "bank").iterdir()) == ["alpha.pt", "beta.pt", "manifest.json"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("outer_loss", "bt_loss", "query_accuracy", "hypergrad_norm", "time/jvp", "time/total"):
        assert key in rows[0]
    rm = load_reward_model(RewardConfig(name_or_path=str(out / "reward_model")))
    assert torch.isfinite(rm.score(["alpha says 1"], ["lovely"])).all()
    # the reward model moved
    init = load_reward_model(RewardConfig(name_or_path="tiny-random"))
    moved = max((a - b).abs().max().item() for a, b in zip(rm.model.state_dict().values(),
                                                              init.model.state_dict().values()))
    assert moved > 1e-4


def test_unfinished_run_needs_resume(tmp_path):
    from oodpl.config import load_config
    from oodpl.train.metatrain import meta_train
    from oodpl.errors import UserError

    args = tiny_args(tmp_path, steps=4, every=2)
    cfg = load_config(None, [a for a in args if a != "--set"])
    cfg.quiet = True
    meta_train(cfg, tmp_path / "run", stop_after=2)
    with pytest.raises(UserError, match="--resume"):
        meta_train(cfg, tmp_path / "run")


def kill_after_checkpoint(cmd: list[str], run_dir: Path, checkpoint: str, env: dict | None = None) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group once `checkpoint` (or a later one) exists."""
    proc = subprocess.Popen(cmd, env=env or os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= checkpoint:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), "the run finished before it was killed"


def assert_same_run(full: Path, resumed: Path, steps: int) -> None:
    """Bit-identical final weights and one metrics row per step, as if never interrupted."""
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, steps + 1))


def run_killed_and_resumed(tmp_path: Path, args: list[str], checkpoint: str) -> tuple[Path, Path]:
    """An uninterrupted run, and the same run SIGKILLed once `checkpoint` exists and resumed: (full, killed)."""
    full = tmp_path / "full"
    assert main(["--quiet", "meta-train", "-o", str(full), *args]) == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint([sys.executable, "-m", "oodpl.cli", "--quiet", "meta-train", "-o", str(killed), *args],
                          killed, checkpoint, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert main(["--quiet", "meta-train", "-o", str(killed), *args, "--resume"]) == 0
    return full, killed


def test_resume_after_sigkill_is_exact(tmp_path):
    """Kill a run with SIGKILL after its first checkpoint; the resumed run ends with the uninterrupted run's weights."""
    full, killed = run_killed_and_resumed(tmp_path, tiny_args(tmp_path, steps=16, every=2), "step-000004")
    assert_same_run(full, killed, 16)


def test_accelerate_state_left_by_an_earlier_trainer_does_not_leak(tmp_path):
    """A TRL/transformers Trainer run earlier in the same process leaves accelerate's shared state in bf16 (TRL's
    default); an in-process meta-train must not inherit it: same hypergradients as a fresh process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    args = tiny_args(tmp_path, steps=2, every=10) + ["--set", "meta.init=scratch"]
    fresh = tmp_path / "fresh"
    res = subprocess.run([sys.executable, "-m", "oodpl.cli", "--quiet", "meta-train", "-o", str(fresh), *args],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    try:
        AcceleratorState._reset_state()  # as transformers' Trainer does before it builds its bf16 Accelerator
        assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
        inproc = tmp_path / "inproc"
        assert main(["--quiet", "meta-train", "-o", str(inproc), *args]) == 0
    finally:
        AcceleratorState._reset_state()
    g1 = [json.loads(l)["hypergrad_norm"] for l in (fresh / "metrics.jsonl").read_text().splitlines()]
    g2 = [json.loads(l)["hypergrad_norm"] for l in (inproc / "metrics.jsonl").read_text().splitlines()]
    assert g2 == pytest.approx(g1, rel=1e-6)


def test_two_processes_equal_one(tmp_path):
    """accelerate launch with 2 CPU processes (gloo): same hypergradient and same weights as 1 process."""
    pytest.importorskip("accelerate")
    # Adam divides by sqrt(v): float32 summation-order noise in tiny gradients is scaled up to ~lr; a small lr keeps
    # that far below the 1e-5 tolerance while the hypergradient norms are compared directly.
    # meta.init=scratch: the built-in BT warm start is itself trained data-parallel under a multi-process launch,
    # so N processes do not reproduce its one-process weights; this test is about the meta-training loop
    args = tiny_args(tmp_path, steps=2, every=10) + ["--set", "meta.init=scratch", "--set", "meta.meta_batch_domains=2",
                                                     "--set", "meta.grad_clip=0", "--set", "meta.outer_lr=1e-3"]
    one = tmp_path / "one"
    assert main(["--quiet", "meta-train", "-o", str(one), *args]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "oodpl.cli", "--quiet",
           "meta-train", "-o", str(two), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    g1 = [json.loads(l)["hypergrad_norm"] for l in (one / "metrics.jsonl").read_text().splitlines()]
    g2 = [json.loads(l)["hypergrad_norm"] for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert g1 == pytest.approx(g2, rel=1e-5)
    a, b = weights(one), weights(two)
    for k in a:
        if k == "classifier.bias":
            # r_phi + c changes no loss (RLOO weights sum to zero per prompt, BT uses differences): its gradient is
            # rounding noise, which Adam rescales to +-lr. tests/core/test_hypergradient.py checks that invariance.
            continue
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_non_finite_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    import oodpl.train.metatrain as mt
    from oodpl.config import load_config

    real = mt.meta_gradient
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] == 3:
            out["outer_loss"] = float("nan")
        return out

    monkeypatch.setattr(mt, "meta_gradient", poisoned)
    args = tiny_args(tmp_path, steps=6, every=2)
    cfg = load_config(None, [a for a in args if a != "--set"])
    cfg.quiet = True
    with pytest.raises(mt.TrainingDiverged, match="step 3.*step-000002"):
        mt.meta_train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "reward_model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "reward_model").exists()


def _cfg(tmp_path, *extra):
    from oodpl.config import load_config

    args = tiny_args(tmp_path, steps=3, every=10) + ["--set", "data.query_size=8", "--set", "meta.query_batch=3",
                                                     "--set", "meta.meta_batch_domains=1", *extra]
    cfg = load_config(None, [a for a in args if a != "--set"])
    cfg.quiet = True
    cfg.report_to = ["none"]
    return cfg


def _bt_rm(cfg, split, path, mark: bool = False):
    """The seed's erm-rm: BT on the pooled meta-train pairs, as the benchmark trains it. `mark`: nudge its head, so
    that it differs from the BT RM meta_train would train itself with the same seed."""
    from oodpl.models.reward import load_reward_model
    from oodpl.train.rm_train import train_reward_model

    rm = load_reward_model(cfg.reward, seed=cfg.seed)
    train_reward_model(rm, split.pooled_pairs(), cfg.train_rm, seed=cfg.seed, progress=False)
    if mark:
        with torch.no_grad():
            rm.model.classifier.weight.add_(0.5)
    rm.save(path)
    return load_file(str(path / "model.safetensors"))


def _spy(monkeypatch, module, name, record):
    real = getattr(module, name)

    def wrapped(*a, **k):
        out = real(*a, **k)
        record(out, *a, **k)
        return out

    monkeypatch.setattr(module, name, wrapped)


def test_erm_rm_extra_draws_meta_trainings_minibatches(tmp_path, monkeypatch):
    """The control differs from meta-training by the hypergradient alone: the same steps, domains, query minibatches
    (and inner batches, from bank_sizes) of the same seed; it moves the erm-rm and ends elsewhere than meta-rm."""
    import oodpl.train.metatrain as mt
    from oodpl.data.split import build_split

    cfg = _cfg(tmp_path)
    split = build_split(cfg.data)
    erm = _bt_rm(cfg, split, tmp_path / "erm")
    draws: dict[str, list] = {"meta": [], "extra": []}
    who = {"now": "meta"}
    _spy(monkeypatch, mt, "draw_tasks", lambda out, step, c, *a: draws[who["now"]].append((c.seed, step, out)))
    mt.meta_train(cfg, tmp_path / "meta", init_reward_model=tmp_path / "erm")
    who["now"] = "extra"
    mt.refine_by_bt(cfg, split, tmp_path / "erm", tmp_path / "extra")
    assert [s for _, s, _ in draws["meta"]] == [1, 2, 3]
    assert draws["extra"] == draws["meta"]
    queries = [q for _, _, out in draws["meta"] for _, _, q in out]
    assert len({tuple(q) for q in queries}) > 1 and all(len(q) == 3 for q in queries)  # really minibatches
    rows = [json.loads(l) for l in (tmp_path / "extra" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    extra, meta = weights(tmp_path / "extra"), weights(tmp_path / "meta")
    assert any(not torch.equal(erm[k], extra[k]) for k in erm)  # refined by BT
    assert any(not torch.allclose(meta[k], extra[k], atol=1e-6) for k in meta if k != "classifier.bias")
    # an interrupted-free rerun returns the finished summary without retraining
    stamp = (tmp_path / "extra" / "reward_model" / "model.safetensors").stat().st_mtime_ns
    mt.refine_by_bt(cfg, split, tmp_path / "erm", tmp_path / "extra")
    assert (tmp_path / "extra" / "reward_model" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("init", ["bt", "scratch"])
def test_meta_init_sets_the_starting_reward_model(tmp_path, monkeypatch, init):
    """meta.init=bt: phi_0 is the given erm-rm (step-0 weights equal it); scratch: a fresh head, not the erm-rm."""
    import oodpl.train.metatrain as mt
    from oodpl.data.split import build_split
    from oodpl.models.reward import load_reward_model

    cfg = _cfg(tmp_path, "--set", f"meta.init={init}", "--set", "meta.outer_steps=1")
    split = build_split(cfg.data)
    erm = _bt_rm(cfg, split, tmp_path / "erm", mark=True)
    start = {}
    _spy(monkeypatch, mt, "initial_reward_model",
         lambda rm, *a, **k: start.update({n: t.detach().clone() for n, t in rm.model.state_dict().items()}))
    mt.meta_train(cfg, tmp_path / "run", init_reward_model=tmp_path / "erm")
    assert start and start.keys() == erm.keys()
    fresh = load_reward_model(cfg.reward, seed=cfg.seed).model.state_dict()
    if init == "bt":
        assert all(torch.equal(start[k], erm[k]) for k in erm)
    else:
        assert any(not torch.equal(start[k], erm[k]) for k in erm)
        assert all(torch.equal(start[k], fresh[k]) for k in fresh)
    final = weights(tmp_path / "run")
    assert any(not torch.equal(final[k], start[k]) for k in final)  # and meta-training moved it


def test_resume_extends_a_finished_run_when_only_budgets_differ(tmp_path, capsys):
    """--resume --set meta.outer_steps=4 on a finished 2-step run continues it: bit-identical to a 4-step run. Any
    other difference is refused with a line naming the differing keys."""
    full, extended = tmp_path / "full", tmp_path / "extended"
    assert main(["--quiet", "meta-train", "-o", str(full), *tiny_args(tmp_path, steps=4, every=2)]) == 0
    assert main(["--quiet", "meta-train", "-o", str(extended), *tiny_args(tmp_path, steps=2, every=2)]) == 0
    capsys.readouterr()
    # without --resume: refused, saying which key differs and that --resume extends
    assert main(["--quiet", "meta-train", "-o", str(extended), *tiny_args(tmp_path, steps=4, every=2)]) == 2
    err = capsys.readouterr().err
    assert "meta.outer_steps: 2 there, 4 here" in err and "add --resume to extend" in err
    assert main(["--quiet", "meta-train", "--resume", "-o", str(extended), *tiny_args(tmp_path, steps=4)]) == 0
    assert_same_run(full, extended, 4)
    assert json.loads((extended / "summary.json").read_text())["outer_steps"] == 4
    # a setting that changes what the steps compute is refused, naming the key
    assert main(["--quiet", "meta-train", "--resume", "-o", str(extended), *tiny_args(tmp_path, steps=6),
                 "--set", "meta.outer_lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "meta.outer_lr: 0.01 there, 0.5 here" in err and "--resume" not in err.split("here")[-1]
