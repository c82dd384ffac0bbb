"""`accelerate launch` with 2 CPU processes for train-rm and meta-test (meta-train: tests/test_metatrain.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oodpl.cli import main
from test_metatrain import PAIRS, tiny_args

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "oodpl.cli", "--quiet"]


def launch(*argv):
    res = subprocess.run([*LAUNCH, *argv], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]


def test_train_rm_two_processes_equal_one(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    args = ["--pairs", str(pairs), "--set", "reward.name_or_path=tiny-random", "--set", "train_rm.batch_size=8",
            "--set", "train_rm.lr=1e-3", "--set", "report_to=[none]"]
    assert main(["--quiet", "train-rm", "-o", str(tmp_path / "one"), *args]) == 0
    launch("train-rm", "-o", str(tmp_path / "two"), *args)
    a = load_file(str(tmp_path / "one" / "reward_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "reward_model" / "model.safetensors"))
    for k in a:
        if k != "classifier.bias":  # BT is invariant to a reward shift: its gradient is rounding noise (see test_metatrain)
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert set(json.loads((tmp_path / "two" / "metrics.json").read_text())["accuracy"]["after"]) == {"alpha", "beta",
                                                                                                  "gamma"}


def test_meta_test_two_processes_split_the_units(tmp_path):
    from oodpl.config import RewardConfig
    from oodpl.models import load_reward_model

    rm_dir = tmp_path / "rm"
    load_reward_model(RewardConfig(name_or_path="tiny-random")).save(rm_dir)
    args = tiny_args(tmp_path) + ["--set", "meta_test.steps=1", "--set", "meta_test.beta_test=[0.1,0.5]",
                                  "--set", "data.held_out_domains=[beta,gamma]", "--set", "data.meta_train_domains=[alpha]"]
    launch("meta-test", "-o", str(tmp_path / "mt"), "--reward-model", str(rm_dir), *args)
    index = json.loads((tmp_path / "mt" / "meta_test.json").read_text())
    files = [f for d in index["files"].values() for f in d.values()]
    assert len(files) == 4 and all(os.path.exists(f) for f in files)
