"""Fault trials (issue 13): kills at any point of a run or of a checkpoint write, corrupt checkpoints, two processes on
one output directory, failed starts, a wrong kind of reward model, a full disk, non-finite training, file modes.

Each trial ends either bit-identical to an uninterrupted run (after --resume) or in one line on stderr with exit 2."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import oodpl.checkpoints as ck
from oodpl.cli import main
from oodpl.config import load_config
from oodpl.errors import UserError, atomic_directory, atomic_write_json, claim_run_dir
from oodpl.metatrain import TrainingDiverged, meta_train

PAIRS = [{"domain": d, "prompt": f"{d} says {i}", "chosen": f"lovely kind words {i}", "rejected": f"awful {i}"}
         for d in ("alpha", "beta", "gamma") for i in range(12)]
STEPS = 4


def tiny_sets(tmp: Path, steps: int = STEPS, every: int = 1) -> list[str]:
    pairs = tmp / "pairs.jsonl"
    if not pairs.exists():
        pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return ["policy.name_or_path=tiny-random", "reward.name_or_path=tiny-random", "data.task=file",
            f"data.path={pairs}", "data.held_out_domains=[gamma]", "data.support_size=4", "data.query_size=4",
            "rloo.batch_prompts=2", "rloo.num_samples=2", "policy.max_new_tokens=4", f"meta.outer_steps={steps}",
            f"meta.checkpoint_every={every}", "meta.query_batch=4", "meta.outer_lr=1e-2", "meta.inner_lr=5.0",
            "meta.init=scratch", "report_to=[none]"]


def cli_args(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def tiny_cfg(tmp: Path, **kw):
    cfg = load_config(None, tiny_sets(tmp, **kw))
    cfg.quiet = True
    return cfg


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "reward_model" / "model.safetensors"))


def assert_same_run(full: Path, resumed: Path) -> None:
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps (the target of every resume)."""
    tmp = tmp_path_factory.mktemp("ref")
    meta_train(tiny_cfg(tmp), tmp / "full")
    return tmp / "full"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, object, list[str]]:
    """The same run stopped after 3 steps: checkpoints step-000002 and step-000003 (the two newest) remain.
    (run directory, its config, its --set list)"""
    tmp = tmp_path_factory.mktemp("cut")
    cfg = tiny_cfg(tmp)
    meta_train(cfg, tmp / "run", stop_after=3)
    assert ck.checkpoint_dirs(tmp / "run" / "checkpoints")[0].name == "step-000003"
    return tmp / "run", cfg, tiny_sets(tmp)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".oodpl.lock"))
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# 1. A corrupt latest checkpoint falls back to the previous one, exactly


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated-safetensors": lambda c: _truncate(c / "step-000003" / "reward_model" / "model.safetensors"),
    "truncated-state": lambda c: _truncate(c / "step-000003" / "state.pt"),
    "latest-names-missing": lambda c: shutil.rmtree(c / "step-000003"),
    "flipped-byte": lambda c: _flip(c / "step-000003" / "policy_trainable.pt"),  # loads fine: only sha256 sees it
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_exactly(tmp_path, interrupted, reference, how, capsys):
    src, cfg, _ = interrupted
    run = copy_run(src, tmp_path / "run")
    CORRUPTIONS[how](run / "checkpoints")
    meta_train(cfg, run, resume=True)
    err = capsys.readouterr().err
    assert "step-000003" in err and "resuming from" in err and "step-000002" in err, err
    assert_same_run(reference, run)
    if how != "latest-names-missing":
        kept = run / "checkpoints" / "aside" / "step-000003"
        assert kept.is_dir() and (kept / "WHY.txt").exists()  # the corrupt one is kept aside, not deleted


def test_manifest_detects_a_changed_byte(tmp_path, interrupted):
    run = copy_run(interrupted[0], tmp_path / "run")
    ckpt = run / "checkpoints" / "step-000003"
    assert ck.verify_checkpoint(ckpt) is None
    _flip(ckpt / "policy_trainable.pt")
    assert "sha256" in ck.verify_checkpoint(ckpt)


# ----------------------------------------------------------------------------------------------------------------------
# Kills at any point of a checkpoint write (simulated in-process: nothing after the kill point runs), then exact resume


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` clean-up runs."""


def _kill_on(monkeypatch, obj, name: str, when) -> None:
    real = getattr(obj, name)

    def wrapper(*a, **k):
        if when(*a, **k):
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(obj, name, wrapper)


KILL_POINTS = {
    # mid-way through the files of the checkpoint (.step-N.tmp half written)
    "policy-weights": lambda mp: _kill_on(mp, ck.torch, "save", lambda obj, f, *a, **k: "policy" in str(f)),
    "before-manifest": lambda mp: _kill_on(mp, ck, "write_manifest", lambda *a, **k: True),
    # complete step-N renamed into place, `latest` not yet updated
    "before-latest": lambda mp: _kill_on(mp, ck, "atomic_write_text", lambda p, *a, **k: Path(p).name == "latest"),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_during_checkpoint_write_resumes_exactly(tmp_path, interrupted, reference, point):
    src, cfg, _ = interrupted
    run = copy_run(src, tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp:
        KILL_POINTS[point](mp)
        with pytest.raises(Killed):
            meta_train(cfg, run, resume=True)  # the checkpoint of the last step (4) is killed while written
    meta_train(cfg, run, resume=True)
    assert_same_run(reference, run)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_sigkill_at_a_random_moment_resumes_exactly(tmp_path, reference):
    """A real SIGKILL of the CLI at a random moment after training started (possibly inside a checkpoint write)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "oodpl.cli", "--quiet", "meta-train", "-o", str(run), *cli_args(tiny_sets(tmp_path))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (run / "metrics.jsonl").exists():
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.6))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if (run / "summary.json").exists():
        pytest.skip("the run finished before the kill (slow start)")
    assert main(["--quiet", "meta-train", "-o", str(run), *cli_args(tiny_sets(tmp_path)), "--resume"]) == 0
    assert_same_run(reference, run)


# ----------------------------------------------------------------------------------------------------------------------
# 2. One run per output directory


def test_second_process_on_the_same_output_exits_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print('ok', flush=True); "
         "time.sleep(60)", str(run / ".oodpl.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        code = main(["--quiet", "meta-train", "-o", str(run), *cli_args(tiny_sets(tmp_path))])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert f"pid {holder.pid}" in err and "in use" in err
        assert sorted(p.name for p in run.iterdir()) == [".oodpl.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_claim_is_exclusive_and_released(tmp_path):
    with claim_run_dir(tmp_path / "r", "meta-train", {"a": 1}):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with claim_run_dir(tmp_path / "r", "meta-train", {"a": 1}):
                pass
    with claim_run_dir(tmp_path / "r", "meta-train", {"a": 1}) as c:  # released at the end of the block
        c.commit()


# ----------------------------------------------------------------------------------------------------------------------
# 4. A failed start leaves the directory as it found it


def test_failed_start_leaves_the_directory_as_it_was_and_the_corrected_rerun_works(tmp_path, capsys):
    sets = tiny_sets(tmp_path, steps=1)
    out = tmp_path / "new" / "run"
    code = main(["--quiet", "meta-train", "-o", str(out), *cli_args(sets + ["data.held_out_domains=[nope]"])])
    assert code == 2 and "nope" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--quiet", "meta-train", "-o", str(empty), *cli_args(sets + ["data.held_out_domains=[nope]"])]) == 2
    assert list(empty.iterdir()) == []
    assert main(["--quiet", "meta-train", "-o", str(empty), *cli_args(sets)]) == 0  # not "a different run"


def test_failed_train_rm_start_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--quiet", "train-rm", "-o", str(out), "--pairs", str(tmp_path / "missing.jsonl"),
                 "--set", "reward.name_or_path=tiny-random"])
    assert code == 2 and not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# 3. Only a one-output sequence classifier is accepted as --reward-model


@pytest.fixture
def causal_lm_dir(tmp_path) -> Path:
    from oodpl.models import tiny_policy_model, tiny_tokenizer

    tok = tiny_tokenizer()
    d = tmp_path / "causal"
    tiny_policy_model(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("command", ["meta-test", "evaluate"])
def test_causal_lm_as_reward_model_is_refused(tmp_path, causal_lm_dir, capsys, command):
    out = tmp_path / "out"
    code = main(["--quiet", command, "-o", str(out), "--reward-model", str(causal_lm_dir),
                 *cli_args(tiny_sets(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "GPT2LMHeadModel" in err, err
    assert not out.exists()


def test_empty_reward_model_dir_message_is_whole(tmp_path, capsys):
    (tmp_path / "rm").mkdir()
    code = main(["--quiet", "meta-test", "-o", str(tmp_path / "out"), "--reward-model", str(tmp_path / "rm"),
                 *cli_args(tiny_sets(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no config.json" in err and "it is empty" in err and not err.endswith(":")
    assert not (tmp_path / "out").exists()


def test_reward_model_checks(tmp_path):
    from oodpl.checks import check_reward_model_dir
    from oodpl.config import RewardConfig
    from oodpl.models import load_reward_model

    rm = load_reward_model(RewardConfig(name_or_path="tiny-random"))
    rm.save(tmp_path / "ok")
    check_reward_model_dir(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["id2label"] = {"0": "NEG", "1": "POS"}
    cfg.pop("num_labels", None)
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="2 labels"):
        check_reward_model_dir(tmp_path / "ok")


# ----------------------------------------------------------------------------------------------------------------------
# 8. Disk full: one line naming the path, the previous checkpoint intact, exact resume after freeing space


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_is_one_line_and_resume_after_freeing_space_is_exact(tmp_path, interrupted, reference, capsys):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "8m"):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        run = copy_run(interrupted[0], mnt / "run")
        free = shutil.disk_usage(mnt).free
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # leave a few KiB: less than one checkpoint
            f.write(b"\0" * max(0, free - 16 * 1024))
        sets = interrupted[2]
        code = main(["--quiet", "meta-train", "-o", str(run), *cli_args(sets), "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "no space left" in err[0] and str(mnt) in err[0], err
        assert "Traceback" not in err[0]
        assert ck.verify_checkpoint(run / "checkpoints" / "step-000003") is None  # the previous one intact
        filler.unlink()
        assert main(["--quiet", "meta-train", "-o", str(run), *cli_args(sets), "--resume"]) == 0
        assert_same_run(reference, run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_oserror_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import oodpl.cli as cli

    def boom(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "results.json"))

    monkeypatch.setitem(cli.HANDLERS, "theory", boom)
    assert main(["theory", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err and "results.json" in err


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite stop: the named checkpoint has finite metrics AND bounded weights; --resume restarts there


def test_non_finite_stop_skips_checkpoints_with_exploding_weights(tmp_path, monkeypatch):
    import oodpl.metatrain as mt

    real = mt.meta_gradient
    calls = {"n": 0}

    def exploding(policy, rm, *a, **k):
        calls["n"] += 1
        out = real(policy, rm, *a, **k)
        if calls["n"] == 2:  # step 2 ends with huge (finite) weights, checkpointed as step-000002
            with torch.no_grad():
                dict(rm.model.named_parameters())["classifier.bias"].add_(1e30)
        if calls["n"] == 3:
            out["outer_loss"] = float("nan")
        return out

    monkeypatch.setattr(mt, "meta_gradient", exploding)
    cfg = tiny_cfg(tmp_path, steps=6)
    with pytest.raises(TrainingDiverged, match=r"step 3.*step-000001 \(--resume restarts there\).*meta.outer_lr"):
        meta_train(cfg, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000001"
    assert "reaches" in (ckpts / "aside" / "step-000002" / "WHY.txt").read_text()
    monkeypatch.setattr(mt, "meta_gradient", real)
    meta_train(cfg, tmp_path / "run", resume=True, stop_after=1)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # restarted after step 1


# ----------------------------------------------------------------------------------------------------------------------
# Leftovers and file modes


def test_leftovers_of_an_interrupted_write_are_cleaned(tmp_path, interrupted):
    run = copy_run(interrupted[0], tmp_path / "run")
    c = run / "checkpoints"
    (c / ".step-000004.tmp").mkdir()
    (c / ".latest.abc.tmp").write_text("x")
    # killed between `step-3 -> .step-3.old` and `.step-3.tmp -> step-3`, with the .tmp incomplete: .old comes back
    os.replace(c / "step-000003", c / ".step-000003.old")
    (c / ".step-000003.tmp").mkdir()
    ck.clean_leftovers(c)
    assert sorted(p.name for p in c.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert ck.verify_checkpoint(c / "step-000003") is None


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        with atomic_directory(tmp_path / "d") as d:
            (d / "f").write_text("x")
        assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
        os.umask(0o077)
        atomic_write_json(tmp_path / "s.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
