"""Meta-training checkpoints: written atomically with a manifest, verified on load, with fallback.

    checkpoints/step-000004/   reward_model/ (HF checkpoint), policy_trainable.pt, state.pt (optimiser, RNG, step),
                               optimizer-rankNNNNN.pt (DeepSpeed shards), inner_thetas.pt (meta.inner_start=warm:
                               every domain's theta_d), manifest.json (size + sha256 of every file)
    checkpoints/latest         name of the newest complete checkpoint
    checkpoints/aside/         damaged or unusable checkpoints, moved out of the way (never deleted)

A checkpoint is built under `.step-N.tmp` and renamed into place only when complete (the manifest is its last file).
`load_checkpoint` takes the newest checkpoint that verifies against its manifest and loads; each one that does not
is moved to `aside/` with one line naming it, so `--resume` after a corrupted or half-written checkpoint continues
from the previous one. Leftovers of an interrupted write (`.step-N.tmp`, `.step-N.old`, `.latest.*.tmp`) are cleaned
before a load or save. After a non-finite stop, `last_good_checkpoint` keeps only checkpoints whose weights are finite
and bounded, so a resume does not start again from weights that were already blowing up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from oodpl.runtime.distributed import uses_deepspeed
from oodpl.errors import (UserError, atomic_write_text, describe_failure, follow_umask, is_disk_full, sha256_file,
                     write_failed)
from oodpl.runtime.rundir import RunLayout
from oodpl.runtime.runlog import rng_state, set_rng_state

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
WEIGHT_BOUND = 1e4  # |w| above this in a "last good" checkpoint means the run was already diverging


def notice(message: str) -> None:
    """One line on stderr (shown even with --quiet: it says which checkpoint a run continues from)."""
    print(f"oodpl: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Manifest


def write_manifest(directory: Path, step: int | None = None) -> None:
    """manifest.json: size and sha256 of every file under `directory` (and the step of a checkpoint)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    head = {"step": step} if step is not None else {}
    atomic_write_text(directory / MANIFEST, json.dumps({**head, "files": files}, indent=1) + "\n")


def _manifest_files(directory: Path) -> dict:
    """The manifest's {relative path: {size, sha256}}; FileNotFoundError without one, ValueError when unreadable."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"unreadable {MANIFEST}") from None
    if not isinstance(files, dict):
        raise ValueError(f"unreadable {MANIFEST}")
    return files


def _file_problem(directory: Path, rel: str, meta) -> str | None:
    p = directory / rel
    if not p.is_file():
        return f"{rel} missing"
    try:
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {meta['size']}"
        if sha256_file(p) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    except (TypeError, KeyError):
        return f"unreadable {MANIFEST}"
    return None


def verify_checkpoint(directory: Path) -> str | None:
    """None when every file of the manifest is present with its size and sha256; else what is wrong (one phrase).
    A checkpoint without a manifest is unverified, and so refused: its files cannot be told from damaged ones."""
    if not directory.is_dir():
        return "missing"
    try:
        files = _manifest_files(directory)
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete write, or removed: its files cannot be verified)"
    except ValueError as e:
        return str(e)
    for rel, meta in files.items():
        problem = _file_problem(directory, rel, meta)
        if problem:
            return problem
    return None


def drop_damaged_files(directory: Path, what: str) -> None:
    """Remove each file of `directory` that does not match its manifest (one notice line each), so that it is made
    again (main process). Files the manifest does not list are kept: a manifest is rewritten after every build."""
    try:
        files = _manifest_files(directory)
    except FileNotFoundError:
        return
    except ValueError as e:
        notice(f"{directory / MANIFEST}: {e}; rebuilding the {what}")
        files = {p.relative_to(directory).as_posix(): {} for p in directory.rglob("*") if p.is_file()}
        (directory / MANIFEST).unlink(missing_ok=True)
    for rel, meta in files.items():
        problem = _file_problem(directory, rel, meta) if meta else "unverifiable"
        if problem and (directory / rel).is_file():
            (directory / rel).unlink()
            notice(f"{what} file {directory / rel} is damaged ({problem}); making it again")


def resume_advice(run_dir: Path) -> str:
    """The end of a 'free some space and rerun' line for a meta-train run, as its checkpoints stand."""
    latest = RunLayout(Path(run_dir)).latest_checkpoint
    try:
        name = latest.read_text().strip() if latest.is_file() else ""
    except OSError:
        name = ""
    if name:
        return f" with --resume (the previous checkpoint {name} is intact)"
    return " (no checkpoint was written yet: the run starts again from step 0)"


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """step-N directories, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def set_aside(ckpt: Path, reason: str) -> Path:
    """Move a checkpoint out of the way (kept for inspection) to checkpoints/aside/step-N[.k]."""
    aside = ckpt.parent / "aside"
    aside.mkdir(exist_ok=True)
    dest, k = aside / ckpt.name, 1
    while dest.exists():
        dest, k = aside / f"{ckpt.name}.{k}", k + 1
    os.replace(ckpt, dest)
    (dest / "WHY.txt").write_text(reason + "\n")
    return dest


def clean_leftovers(ckpt_root: Path) -> None:
    """Finish or undo what an interrupted save left behind (main process, under the run's lock).

    A kill between `step-N -> .step-N.old` and `.step-N.tmp -> step-N` leaves no step-N: the complete .tmp (it has
    its manifest) is promoted, else the .old is restored. Everything else hidden and temporary is removed."""
    if not ckpt_root.is_dir():
        return
    for old in ckpt_root.glob(".step-*.old"):
        target = ckpt_root / old.name[1:-len(".old")]
        tmp = ckpt_root / f".{target.name}.tmp"
        if not target.exists():
            os.replace(tmp if verify_checkpoint(tmp) is None else old, target)
    for p in list(ckpt_root.glob(".step-*.tmp")) + list(ckpt_root.glob(".step-*.old")) + \
            list(ckpt_root.glob(".latest.*.tmp")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------------------------------------------------
# Save and load


INNER_THETAS = "inner_thetas.pt"


def save_checkpoint(run_dir: Path, step: int, rm, policy, optimizer, accelerator,
                    inner_thetas: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """checkpoints/step-N/ built under a temporary name and renamed when complete; `latest` is replaced atomically
    after. Collective: under DeepSpeed every process adds its shard of the optimiser state; the main process writes
    the rest (reward model, policy trainable weights, optimiser or shard layout, RNG states, step, and with a warm
    start every domain's theta_d: `inner_thetas`, {domain: {name: tensor}}, every process holds them) and the
    manifest.
    A failed write (disk full, ...) removes the partial checkpoint and raises one line; the previous one is intact."""
    ckpt_root = RunLayout(run_dir).checkpoints
    target = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".{target.name}.tmp"
    main, sharded = accelerator.is_main_process, uses_deepspeed(accelerator)
    try:
        if main:
            clean_leftovers(ckpt_root)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if sharded:  # the ZeRO optimiser's state_dict() is this process's partition
            torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{accelerator.process_index:05d}.pt")
        accelerator.wait_for_everyone()
        if main:
            model = accelerator.unwrap_model(rm.model)
            model.save_pretrained(tmp / "reward_model")
            rm.tokenizer.save_pretrained(tmp / "reward_model")
            torch.save({k: v.detach().cpu() for k, v in policy.trainable_parameters().items()},
                       tmp / "policy_trainable.pt")
            torch.save({"optimizer": None if sharded else optimizer.state_dict(), "step": step, "rng": rng_state(),
                        "optimizer_shards": accelerator.num_processes if sharded else 0}, tmp / "state.pt")
            if inner_thetas is not None:
                torch.save({d: {k: v.detach().cpu() for k, v in theta.items()} for d, theta in inner_thetas.items()},
                           tmp / INNER_THETAS)
            follow_umask(tmp)
            write_manifest(tmp, step)
    except Exception as e:  # torch.save reports a full disk as RuntimeError ("unexpected pos"), safetensors as
        # SafetensorError: measured before the partial checkpoint is removed (which frees the space again)
        full = not isinstance(e, UserError) and is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full and (isinstance(e, UserError) or describe_failure(e) is None):
            raise
        named = e.filename if isinstance(e, OSError) and e.filename else tmp
        raise write_failed(named, e, resume_advice(run_dir), full=full) from None
    if main:
        old = target.with_name(f".{target.name}.old") if target.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(RunLayout(run_dir).latest_checkpoint, target.name + "\n")
        for stale in checkpoint_dirs(ckpt_root)[2:]:  # keep the two newest
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _load_one(ckpt: Path, rm, optimizer, accelerator) -> int:
    from safetensors.torch import load_file

    weights = ckpt / "reward_model" / "model.safetensors"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    shards = int(state.get("optimizer_shards", 0))
    if shards != (accelerator.num_processes if uses_deepspeed(accelerator) else 0):
        raise UserError(f"{ckpt} was written with {shards or 'no'} DeepSpeed optimiser shards; resume it with the "
                        "same launch (number of processes, DeepSpeed or not) it was started with")
    accelerator.unwrap_model(rm.model).load_state_dict(load_file(str(weights)), strict=False)
    if shards:  # ZeRO takes the list of every rank's partition and picks its own; it refreshes fp32 from the weights
        files = [ckpt / f"optimizer-rank{r:05d}.pt" for r in range(shards)]
        optimizer.load_state_dict([torch.load(f, weights_only=False) if r == accelerator.process_index else None
                                   for r, f in enumerate(files)])
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


def load_checkpoint(run_dir: Path, rm, optimizer, accelerator) -> int:
    """Restore the newest checkpoint that verifies and loads; returns its step (0: none, start from scratch).

    Damaged checkpoints (a manifest mismatch, a file that does not load, `latest` naming a missing directory) are
    moved to checkpoints/aside/ with one line naming each and the one resumed from."""
    ckpt_root = RunLayout(run_dir).checkpoints
    main = accelerator.is_main_process
    if main:
        clean_leftovers(ckpt_root)
    accelerator.wait_for_everyone()
    latest = RunLayout(run_dir).latest_checkpoint
    named = latest.read_text().strip() if latest.exists() else None
    candidates = checkpoint_dirs(ckpt_root)
    if not candidates and not named:
        return 0
    bad: list[tuple[Path, str]] = []
    if named and not (ckpt_root / named).is_dir():
        bad.append((ckpt_root / named, "missing"))
    step, used = 0, None
    for ckpt in candidates:
        problem = verify_checkpoint(ckpt)
        if problem is None:
            try:
                step, used = _load_one(ckpt, rm, optimizer, accelerator), ckpt
                break
            except UserError:
                raise
            except Exception as e:  # SafetensorError, unpickling errors, shape mismatches, ...
                problem = f"does not load ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
        bad.append((ckpt, problem))
    accelerator.wait_for_everyone()
    if main:
        for ckpt, problem in bad:
            if ckpt.is_dir():
                dest = set_aside(ckpt, problem)
                notice(f"checkpoint {ckpt.name} is damaged ({problem}); moved to {dest}")
            else:
                notice(f"checkpoint {ckpt.name} named by {latest} is {problem}")
        if used is not None:
            if used.name != named:
                atomic_write_text(latest, used.name + "\n")
            if bad:
                notice(f"resuming from {used} (step {step})")
        else:
            latest.unlink(missing_ok=True)
            notice(f"no intact checkpoint in {ckpt_root}; starting again from step 0")
    accelerator.wait_for_everyone()
    return step


def load_inner_thetas(run_dir: Path, template: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Every domain's theta_d from the checkpoint `load_checkpoint` resumed (the one `latest` names), on the device
    and in the dtype of `template` (theta_init)."""
    layout = RunLayout(run_dir)
    ckpt = layout.checkpoints / layout.latest_checkpoint.read_text().strip()
    if not (ckpt / INNER_THETAS).is_file():
        raise UserError(f"{ckpt} holds no {INNER_THETAS} (written by a run with meta.inner_start=init); resume it "
                        "with that setting or start a new --output")
    stored = torch.load(ckpt / INNER_THETAS, weights_only=True)
    return {d: {k: v.to(template[k]) for k, v in theta.items()} for d, theta in stored.items()}


# ----------------------------------------------------------------------------------------------------------------------
# After a non-finite stop


def weights_bounded(ckpt: Path, bound: float = WEIGHT_BOUND) -> str | None:
    """None when the reward model and policy weights of `ckpt` are finite with |w| <= bound; else what is wrong."""
    from safetensors.torch import load_file

    tensors = dict(load_file(str(ckpt / "reward_model" / "model.safetensors")))
    trainable = ckpt / "policy_trainable.pt"
    if trainable.exists():
        tensors.update({f"policy.{k}": v for k, v in torch.load(trainable, weights_only=True).items()})
    if (ckpt / INNER_THETAS).exists():
        tensors.update({f"theta_d.{d}.{k}": v for d, theta in torch.load(ckpt / INNER_THETAS, weights_only=True).items()
                        for k, v in theta.items()})
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if not torch.isfinite(t).all():
            return f"non-finite values in {name}"
        peak = float(t.abs().max())
        if peak > bound:
            return f"|{name}| reaches {peak:.3g} > {bound:g}"
    return None


def last_good_checkpoint(run_dir: Path, bound: float = WEIGHT_BOUND) -> str | None:
    """The newest checkpoint that verifies and whose weights are finite and bounded (`latest` then names it, so a
    --resume restarts there); newer ones are moved to checkpoints/aside/. None when there is none (main process)."""
    ckpt_root = RunLayout(run_dir).checkpoints
    for ckpt in checkpoint_dirs(ckpt_root):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            try:
                problem = weights_bounded(ckpt, bound)
            except Exception as e:
                problem = f"does not load ({type(e).__name__})"
        if problem is None:
            atomic_write_text(RunLayout(run_dir).latest_checkpoint, ckpt.name + "\n")
            return ckpt.name
        set_aside(ckpt, problem)
    (RunLayout(run_dir).latest_checkpoint).unlink(missing_ok=True)
    return None
