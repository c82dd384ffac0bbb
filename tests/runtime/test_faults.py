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

import oodpl.train.checkpoints as ck
from oodpl.cli.main import main
from oodpl.config import load_config
from oodpl.errors import UserError, atomic_directory, atomic_write_json, claim_run_dir
from oodpl.train.metatrain import TrainingDiverged, meta_train

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
    from oodpl.models.tiny import tiny_policy_model, tiny_tokenizer

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
    from oodpl.runtime.checks import check_reward_model_dir
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model

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

    import oodpl.cli.main as cli

    def boom(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "results.json"))

    monkeypatch.setitem(cli.HANDLERS, "theory", boom)
    assert main(["theory", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err and "results.json" in err


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite stop: the named checkpoint has finite metrics AND bounded weights; --resume restarts there


def test_non_finite_stop_skips_checkpoints_with_exploding_weights(tmp_path, monkeypatch):
    import oodpl.train.metatrain as mt

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


# ======================================================================================================================
# Issue 22: a hostile or unlucky user. Untrusted names stay inside --output, disk full is one line naming the path,
# damaged or wrong-kind models never show a traceback, unchecked inputs are one line, no silent wrong results.


def one_line(capsys, argv: list[str], *words: str, code: int = 2) -> str:
    """Run the CLI in-process (an unexpected exception fails the test: it would be a traceback) and check that it
    ended with `code` and exactly one line on stderr that contains `words`."""
    got = main(["--quiet", *argv])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert got == code and len(err) == 1 and "Traceback" not in err[0], (got, err)
    for w in words:
        assert w in err[0], err
    return err[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def saved_rm(tmp_path_factory) -> Path:
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model

    d = tmp_path_factory.mktemp("models") / "rm"
    load_reward_model(RewardConfig(name_or_path="tiny-random")).save(d)
    return d


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory) -> Path:
    from oodpl.config import PolicyConfig
    from oodpl.models.export import save_policy
    from oodpl.models.policy import load_policy

    d = tmp_path_factory.mktemp("models") / "policy"
    save_policy(load_policy(PolicyConfig(name_or_path="tiny-random", lora_r=2, lora_alpha=4, max_new_tokens=4)), d)
    return d


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


PROMPT_ROWS = [{"domain": "delta", "prompt": f"tell me {i}"} for i in range(4)]
TINY_POLICY = ["--set", "policy.name_or_path=tiny-random", "--set", "policy.max_new_tokens=4"]

# --- 1. names from data become paths: refused with one line naming file:line, nothing written anywhere

UNSAFE_DOMAINS = {"parent-parent": "../../escaped_dom", "dotdot": "..", "absolute": "/tmp/abs_dom", "nul": "a\x00b",
                  "slash": "x/y", "hidden": ".hidden", "long": "d" * 300, "newline": "a\u2028b"}


@pytest.mark.parametrize("case", sorted(UNSAFE_DOMAINS))
def test_unsafe_domain_names_are_refused_by_validate(tmp_path, capsys, case):
    rows = [{"domain": "ok", "prompt": "p", "chosen": "c1", "rejected": "r1"},
            {"domain": UNSAFE_DOMAINS[case], "prompt": "p", "chosen": "c2", "rejected": "r2"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    one_line(capsys, ["data", "validate", str(path)], f"{path}:2", "domain name")


def test_unicode_domain_names_are_fine(tmp_path, capsys):
    rows = [{"domain": d, "prompt": "p", "chosen": "c", "rejected": "r"} for d in ("café ☕", "東京-2", "naïve_ß")]
    assert main(["--quiet", "data", "validate", str(write_jsonl(tmp_path / "p.jsonl", rows))]) == 0
    assert "東京-2" in capsys.readouterr().out


def test_meta_test_prompts_with_an_escaping_domain_writes_nothing(tmp_path, capsys, saved_rm):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    prompts = write_jsonl(work / "prompts.jsonl", [{"domain": "../../escaped_dom", "prompt": "hi"}])
    sets = cli_args(tiny_sets(tmp_path))
    before = tree(tmp_path)
    one_line(capsys, ["meta-test", "-o", str(work / "out"), "--reward-model", str(saved_rm), "--prompts", str(prompts),
                      *sets], "domain name", "../../escaped_dom")
    assert tree(tmp_path) == before  # nothing inside --output (not even the directory), nothing outside it


def test_meta_train_pairs_with_an_escaping_domain_writes_nothing(tmp_path, capsys):
    rows = [dict(r, domain="../../escaped" if r["domain"] == "alpha" else r["domain"]) for r in PAIRS]
    write_jsonl(tmp_path / "pairs.jsonl", rows)  # tiny_sets keeps an existing pairs file
    sets = cli_args(tiny_sets(tmp_path, steps=1))
    before = tree(tmp_path)
    one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), *sets], "pairs.jsonl:1", "domain name")
    assert tree(tmp_path) == before


def test_a_hand_edited_split_with_an_unsafe_domain_is_refused(tmp_path, interrupted):
    from oodpl.data.split import DomainSplit

    run = copy_run(interrupted[0], tmp_path / "run")
    text = (run / "split.json").read_text().replace('"alpha"', '"../alpha"')
    (run / "split.json").write_text(text)
    with pytest.raises(UserError, match=r"split.json: domain name '\.\./alpha'"):
        DomainSplit.load(run / "split.json")


def test_inside_refuses_a_symbolic_link_out_and_unsafe_parts(tmp_path):
    from oodpl.paths import inside, safe_name

    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "policies").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside"):
        inside(tmp_path / "out", "policies", "d")
    assert inside(tmp_path / "out", "d", "beta_0.1") == tmp_path / "out" / "d" / "beta_0.1"
    for bad in UNSAFE_DOMAINS.values():
        with pytest.raises(UserError):
            safe_name(bad)
    with pytest.raises(UserError, match="tracking.run_name"):
        load_config(None, ["tracking.run_name=../up"])


# --- 2. disk full: one line naming the path, advice that fits the state, metrics never torn


def test_torch_save_unexpected_pos_on_a_full_disk_is_one_line(tmp_path, interrupted, reference, capsys, monkeypatch):
    """torch.save reports a full disk as "unexpected pos": recognised by the free space left after the failed write."""
    import oodpl.errors as errors

    run = copy_run(interrupted[0], tmp_path / "run")
    real_save = ck.torch.save

    def full_disk_save(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 64)  # what was written before the space ran out
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1280 vs 1174")

    with monkeypatch.context() as mp:
        mp.setattr(ck.torch, "save", full_disk_save)
        mp.setattr(errors, "free_bytes", lambda path: 4096)
        line = one_line(capsys, ["meta-train", "-o", str(run), *cli_args(interrupted[2]), "--resume"],
                        "no space left on device", ".step-000004.tmp", "--resume", "step-000003 is intact")
    assert "unexpected pos" not in line
    assert not (run / "checkpoints" / ".step-000004.tmp").exists()
    assert ck.torch.save is real_save
    assert main(["--quiet", "meta-train", "-o", str(run), *cli_args(interrupted[2]), "--resume"]) == 0
    assert_same_run(reference, run)


def test_other_runtime_errors_are_not_taken_for_a_full_disk(tmp_path, interrupted, monkeypatch):
    run = copy_run(interrupted[0], tmp_path / "run")
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unexpected pos 1 vs 2")))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: a bug, shown as one
        meta_train(interrupted[1], run, resume=True)


@pytest.mark.parametrize("left_kib", [1, 48, 160])
def test_real_full_disk_at_several_sizes_is_one_line(tmp_path, interrupted, reference, capsys, left_kib):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "8m"):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        run = copy_run(interrupted[0], mnt / "run")
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * max(0, shutil.disk_usage(mnt).free - left_kib * 1024))
        one_line(capsys, ["meta-train", "-o", str(run), *cli_args(interrupted[2]), "--resume"],
                 "no space left", str(mnt))
        (mnt / "filler").unlink()
        assert main(["--quiet", "meta-train", "-o", str(run), *cli_args(interrupted[2]), "--resume"]) == 0
        assert_same_run(reference, run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _enospc_on_append(monkeypatch, half: bool = True):
    """os.write of a metrics line writes half of it, then the disk is full."""
    import errno

    import oodpl.runtime.runlog as runlog

    real = os.write

    def write(fd, data):
        if data.startswith(b'{"step"'):
            real(fd, data[: len(data) // 2]) if half else None
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(runlog.os, "write", write)


def test_disk_full_during_a_metrics_append_leaves_whole_lines_and_says_where(tmp_path, interrupted, reference,
                                                                             capsys, monkeypatch):
    run = copy_run(interrupted[0], tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    with monkeypatch.context() as mp:
        _enospc_on_append(mp)
        one_line(capsys, ["meta-train", "-o", str(run), *cli_args(interrupted[2]), "--resume"],
                 f"while writing {run / 'metrics.jsonl'}", "with --resume", "step-000003 is intact")
    assert (run / "metrics.jsonl").read_bytes() == before  # the half line was cut back
    assert main(["--quiet", "meta-train", "-o", str(run), *cli_args(interrupted[2]), "--resume"]) == 0
    assert_same_run(reference, run)


def test_disk_full_before_any_checkpoint_does_not_advise_resume(tmp_path, capsys, monkeypatch):
    _enospc_on_append(monkeypatch)
    line = one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), *cli_args(tiny_sets(tmp_path, steps=1))],
                    "metrics.jsonl", "no checkpoint was written yet")
    assert "--resume" not in line


def test_a_failed_write_names_its_file(tmp_path, monkeypatch):
    import errno

    import oodpl.errors as errors

    monkeypatch.setattr(errors.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError) as e:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert e.value.filename == str(tmp_path / "r.json")
    assert str(tmp_path / "r.json") in errors.describe_failure(e.value)
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_a_torn_last_metrics_line_is_skipped_and_repaired_on_resume(tmp_path, interrupted, reference):
    from oodpl.runtime.runlog import read_metrics

    run = copy_run(interrupted[0], tmp_path / "run")
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text.splitlines()[0][:25])  # a kill in the middle of an append
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    meta_train(interrupted[1], run, resume=True)
    assert_same_run(reference, run)


def test_rerun_after_a_kill_before_the_first_checkpoint_does_not_duplicate_metrics(tmp_path):
    cfg = tiny_cfg(tmp_path, every=10)
    meta_train(cfg, tmp_path / "run", stop_after=2)  # killed at step 2: no checkpoint yet
    assert not (tmp_path / "run" / "checkpoints").exists()
    meta_train(cfg, tmp_path / "run")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# --- 3. damaged and wrong-kind models: one line naming the file and what was expected


def _truncate_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGES = {"truncated": _truncate_half, "empty": lambda p: p.write_bytes(b""),
           "garbage": lambda p: p.write_bytes(os.urandom(3000))}


@pytest.mark.parametrize("command", ["meta-test", "evaluate", "train-rm"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_reward_model_file_is_one_line(tmp_path, capsys, saved_rm, command, damage):
    rm = copy_model(saved_rm, tmp_path / "rm")
    DAMAGES[damage](rm / "model.safetensors")
    out = tmp_path / "out"
    sets = cli_args(tiny_sets(tmp_path))
    argv = ([command, "-o", str(out), "--reward-model", str(rm), *sets] if command != "train-rm" else
            [command, "-o", str(out), *sets, "--set", f"reward.name_or_path={rm}"])
    one_line(capsys, argv, str(rm / "model.safetensors"), "safetensors")
    assert not out.exists()


def _remove(name: str):
    return lambda d: (d / name).unlink()


POLICY_DAMAGES = {
    "no-adapter-config": _remove("adapter_config.json"),
    "truncated-adapter": lambda d: _truncate_half(d / "adapter_model.safetensors"),
    "no-tokenizer": lambda d: [(d / n).unlink() for n in ("tokenizer.json",)],
    "empty-dir": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(d.iterdir())],
    "truncated-base": lambda d: _truncate_half(d / "base_model" / "model.safetensors"),
}


@pytest.mark.parametrize("damage", sorted(POLICY_DAMAGES))
def test_a_damaged_policy_directory_is_one_line(tmp_path, capsys, saved_policy, damage):
    pol = copy_model(saved_policy, tmp_path / "pol")
    cfg = json.loads((pol / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(pol / "base_model")  # the copy's own base
    (pol / "adapter_config.json").write_text(json.dumps(cfg))
    POLICY_DAMAGES[damage](pol)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    one_line(capsys, ["generate", "--policy", str(pol), "--prompts", str(prompts), "-o", str(tmp_path / "s.jsonl"),
                      *TINY_POLICY], str(pol))
    assert not (tmp_path / "s.jsonl").exists()


def test_generate_with_a_reward_model_as_policy_is_refused(tmp_path, capsys, saved_rm):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    one_line(capsys, ["generate", "--policy", str(saved_rm), "--prompts", str(prompts), "-o", str(tmp_path / "s.jsonl"),
                      *TINY_POLICY], "BertForSequenceClassification", "not a causal language model")
    assert not (tmp_path / "s.jsonl").exists()


def test_an_intact_policy_directory_generates(tmp_path, capsys, saved_policy):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    assert main(["--quiet", "generate", "--policy", str(saved_policy), "--prompts", str(prompts), "-o",
                 str(tmp_path / "s.jsonl"), *TINY_POLICY, "--max-new-tokens", "2"]) == 0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == len(PROMPT_ROWS)


def test_safetensors_check_accepts_a_real_file_and_names_the_problem(saved_rm, tmp_path):
    from oodpl.runtime.checks import check_safetensors

    check_safetensors(saved_rm / "model.safetensors")
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(saved_rm.joinpath("model.safetensors").read_bytes() + b"extra")
    with pytest.raises(UserError, match="header describes"):
        check_safetensors(bad)


# --- 4. unchecked inputs


def test_a_lone_surrogate_is_refused_by_validate_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"domain": "d", "prompt": "fine"}\n{"domain": "d", "prompt": "bad \\ud800"}\n')
    one_line(capsys, ["data", "validate", str(path)], f"{path}:2", "lone surrogate", "U+D800")
    one_line(capsys, ["generate", "--prompts", str(path), "-o", str(tmp_path / "s.jsonl"), *TINY_POLICY],
             f"{path}:2", "lone surrogate")


@pytest.mark.parametrize("how", ["generate-max-new-tokens", "policy.max_new_tokens", "reward.max_length"])
def test_lengths_beyond_the_model_positions_are_one_line(tmp_path, capsys, how):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    if how == "generate-max-new-tokens":
        one_line(capsys, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "s.jsonl"), *TINY_POLICY,
                          "--max-new-tokens", "100000"], "256 positions", "--max-new-tokens")
    elif how == "policy.max_new_tokens":
        one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"),
                          *cli_args(tiny_sets(tmp_path, steps=1) + ["policy.max_new_tokens=5000"])],
                 "256 positions", "policy.max_new_tokens")
    else:
        one_line(capsys, ["train-rm", "-o", str(tmp_path / "run"),
                          *cli_args(tiny_sets(tmp_path) + ["reward.max_length=100000"])],
                 "256 positions", "reward.max_length")
    assert not (tmp_path / "run").exists() and not (tmp_path / "s.jsonl").exists()


def test_seeds_are_bounded(tmp_path, capsys):
    with pytest.raises(UserError, match=r"seed=4294967296: must be in \[0,4294967295\]"):
        load_config(None, ["seed=4294967296"])
    with pytest.raises(UserError, match="benchmark.seeds"):
        load_config(None, ["benchmark.seeds=[0, -1]"])
    assert load_config(None, ["seed=4294967295"]).seed == 4294967295
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    one_line(capsys, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "s.jsonl"), *TINY_POLICY,
                      "--seed", "4294967296"], "--seed")


def test_deep_json_and_yaml_are_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"domain": "d", "prompt": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    one_line(capsys, ["data", "validate", str(deep)], f"{deep}:1", "nested too deeply")
    arr = tmp_path / "deep.json"
    arr.write_text("[" * 200_000 + "]" * 200_000)
    one_line(capsys, ["data", "validate", str(arr)], str(arr), "nested too deeply")
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("meta: " + "[" * 5000 + "]" * 5000 + "\n")
    one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), "--config", str(cfg)], str(cfg), "nested too deeply")
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"meta:\n  outer_steps: 2 # caf\xe9\n")
    one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), "--config", str(cfg)], f"{cfg}:2", "byte 0xe9",
             "UTF-8")


# --- 5. silent wrong results


def test_a_checkpoint_without_manifest_is_not_used(tmp_path, interrupted, reference, capsys):
    run = copy_run(interrupted[0], tmp_path / "run")
    newest = run / "checkpoints" / "step-000003"
    (newest / "manifest.json").unlink()
    state = load_file(str(newest / "reward_model" / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()},
              str(newest / "reward_model" / "model.safetensors"))
    meta_train(interrupted[1], run, resume=True)
    err = capsys.readouterr().err
    assert "step-000003" in err and "manifest.json" in err and "resuming from" in err and "step-000002" in err, err
    assert_same_run(reference, run)


def test_a_truncated_sample_bank_is_rebuilt_on_resume(tmp_path, interrupted, reference, capsys):
    run = copy_run(interrupted[0], tmp_path / "run")
    assert (run / "bank" / "manifest.json").is_file()
    _truncate_half(run / "bank" / "alpha.pt")
    meta_train(interrupted[1], run, resume=True)
    assert "alpha.pt" in capsys.readouterr().err
    assert_same_run(reference, run)


def test_empty_lists_where_a_value_is_needed_are_config_errors(tmp_path, capsys, saved_rm):
    for key in ("meta_test.beta_test", "benchmark.methods", "benchmark.seeds"):
        with pytest.raises(UserError, match=f"{key}=\\[\\]: needs at least one value"):
            load_config(None, [f"{key}=[]"])
    for command in ("meta-test", "benchmark"):
        extra = ["--reward-model", str(saved_rm)] if command == "meta-test" else []
        one_line(capsys, [command, "-o", str(tmp_path / command), *extra,
                          *cli_args(tiny_sets(tmp_path) + ["meta_test.beta_test=[]"])], "meta_test.beta_test")
        assert not (tmp_path / command).exists()


def test_generate_refuses_to_overwrite_its_input_and_zero_tokens(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    before = prompts.read_bytes()
    one_line(capsys, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "." / "prompts.jsonl"),
                      *TINY_POLICY], "is the --prompts file")
    assert prompts.read_bytes() == before
    one_line(capsys, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "s.jsonl"), *TINY_POLICY,
                      "--max-new-tokens", "0"], "--max-new-tokens 0")
    assert not (tmp_path / "s.jsonl").exists()


def test_duplicate_yaml_keys_csv_headers_and_json_keys_are_errors_naming_both(tmp_path, capsys):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("meta:\n  outer_steps: 2\npolicy:\n  lora_r: 2\nmeta:\n  inner_steps: 2\n")
    one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), "--config", str(cfg)], f"{cfg}:5", "'meta'",
             "line 1")
    inner = tmp_path / "dup2.yaml"
    inner.write_text("meta:\n  outer_steps: 2\n  outer_steps: 3\n")
    with pytest.raises(UserError, match=r"dup2.yaml:3: 'outer_steps' is given twice.*line 2"):
        load_config(inner)
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("domain,prompt,chosen,prompt,rejected\nd,p,c,q,r\n")
    one_line(capsys, ["data", "validate", str(csv_path)], f"{csv_path}:1", "columns 2 and 4", "'prompt'")
    js = tmp_path / "p.jsonl"
    js.write_text('{"domain": "d", "prompt": "p", "chosen": "c", "rejected": "r", "chosen": "x"}\n')
    one_line(capsys, ["data", "validate", str(js)], f"{js}:1", "'chosen' appears twice")


# --- 6. file modes and messages that say what is wrong


def test_saved_weights_follow_the_umask(tmp_path, saved_policy, interrupted):
    from oodpl.config import RewardConfig
    from oodpl.errors import file_mode
    from oodpl.models.reward import load_reward_model

    old = os.umask(0o022)
    try:
        load_reward_model(RewardConfig(name_or_path="tiny-random")).save(tmp_path / "rm")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rm" / "model.safetensors").stat().st_mode) == 0o644
    made_by_fixtures = [saved_policy / "adapter_model.safetensors", saved_policy / "base_model" / "model.safetensors",
                        interrupted[0] / "checkpoints" / "step-000003" / "reward_model" / "model.safetensors"]
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in made_by_fixtures] == [oct(file_mode())] * 3


def test_a_directory_or_fifo_as_config_says_so(tmp_path, capsys):
    one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), "--config", str(tmp_path)], "is a directory")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), "--config", str(fifo)], "not a regular file")
    one_line(capsys, ["meta-train", "-o", str(tmp_path / "run"), "--config", str(tmp_path / "no.yaml")],
             "does not exist")


def test_an_offline_hub_id_as_reward_model_says_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line(capsys, ["meta-test", "-o", str(tmp_path / "out"), "--reward-model", "someone/some-rm",
                             *cli_args(tiny_sets(tmp_path))], "offline", "someone/some-rm")
    assert "does not exist" not in line


def test_an_empty_reward_dir_for_train_rm_is_a_whole_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = one_line(capsys, ["train-rm", "-o", str(tmp_path / "out"),
                             *cli_args(tiny_sets(tmp_path) + [f"reward.name_or_path={tmp_path / 'empty'}"])],
                    "no config.json", "it is empty")
    assert not line.rstrip().endswith(":")


def test_theory_with_a_file_as_output_fails_before_computing(tmp_path, capsys, monkeypatch):
    import oodpl.toy.theory as theory

    monkeypatch.setattr(theory, "main", lambda *a, **k: pytest.fail("computed before checking --output"))
    (tmp_path / "f").write_text("x")
    one_line(capsys, ["theory", "-o", str(tmp_path / "f"), "--quick"], "is not a directory")


# --- fuzz: random bytes, random nesting and random unicode names end in success or one line with exit 2


def _random_name(rng: random.Random) -> str:
    pool = ["a", "Z", "9", "-", "_", ".", " ", "/", "\\", "..", "\x00", "\n", "\u2028", "é", "東", "☕", "\u202e",
            "\ud800", "\x7f", "'", '"', ":", "*"]
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 8)))


def _random_nesting(rng: random.Random, depth: int):
    if depth == 0:
        return rng.choice(["x", 1, 2.5, None, True, _random_name(rng)])
    return rng.choice([[_random_nesting(rng, depth - 1)], {"k": _random_nesting(rng, depth - 1)}])


def _fuzz_file(rng: random.Random, directory: Path, i: int) -> Path:
    kind = rng.choice(["bytes", "nesting", "names", "csv"])
    suffix = ".csv" if kind == "csv" else rng.choice([".jsonl", ".json"])
    path = directory / f"f{i}{suffix}"
    if kind == "bytes":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))))
    elif kind == "nesting":
        rows = [{"domain": "d", "prompt": _random_nesting(rng, rng.randint(0, 6)), "chosen": "c", "rejected": "r"}]
        path.write_text(json.dumps(rows[0]) + "\n")
    elif kind == "names":
        rows = [{"domain": _random_name(rng), "prompt": _random_name(rng) or "p", "chosen": "c", "rejected": "r"}
                for _ in range(3)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        header = rng.sample(["domain", "prompt", "chosen", "rejected", "prompt", "x"], rng.randint(1, 5))
        text = ",".join(header) + "\n" + ",".join(_random_name(rng) for _ in header)
        path.write_bytes(text.encode("utf-8", "surrogatepass"))  # a surrogate becomes bytes that are not UTF-8
    return path


def _ends_well(capsys, argv: list[str]) -> int:
    code = main(["--quiet", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(err) == 1 and err[0].startswith("oodpl: error: ") and "Traceback" not in err[0], err
    return code


def test_fuzz_untrusted_inputs_end_in_success_or_one_line(tmp_path, capsys):
    rng = random.Random(22)
    for i in range(30):
        _ends_well(capsys, ["data", "validate", str(_fuzz_file(rng, tmp_path, i))])
    for i in range(4):
        _ends_well(capsys, ["generate", "--prompts", str(_fuzz_file(rng, tmp_path, 100 + i)), "-o",
                            str(tmp_path / f"s{i}.jsonl"), *TINY_POLICY, "--max-new-tokens", "2"])
    escaped = []
    for i in range(2):  # a tiny meta-train whose domains have random unicode names
        names = [_random_name(rng) or f"n{k}" for k in range(3)]
        work = tmp_path / f"mt{i}"
        work.mkdir()
        write_jsonl(work / "pairs.jsonl", [dict(r, domain=names[("alpha", "beta", "gamma").index(r["domain"])])
                                           for r in PAIRS])
        sets = tiny_sets(work, steps=1) + [f"data.held_out_domains=[{json.dumps(names[2])}]"]
        _ends_well(capsys, ["meta-train", "-o", str(work / "run"), *cli_args(sets)])
        escaped += [p for p in work.iterdir() if p.name not in ("pairs.jsonl", "run")]
    assert escaped == []
