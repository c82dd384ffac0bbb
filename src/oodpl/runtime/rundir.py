"""Run directories: where a run's files lie (`RunLayout`) and how a stage starts one (`open_run`).

Every stage that writes a run directory starts the same way: claim it (`errors.claim_run_dir`: refuse a different
run, take the lock, write the marker, roll a failed start back), take the split a resumed run stored (else build it
from cfg.data), record what the run was started with (config.yaml, split.json) and commit the claim once start-up
can no longer fail. `open_run` is that sequence and `RunLayout` names the paths more than one module reads or writes,
so that each file name is spelt in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oodpl.errors import RUN_MARKER, RunClaim, atomic_write_text, claim_run_dir

if TYPE_CHECKING:
    from oodpl.config import Config
    from oodpl.data.split import DomainSplit


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (any stage's: meta-train, train-rm, a benchmark's training units, ...)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # what every stage records at start-up
    @property
    def marker(self) -> Path:
        """oodpl_run.json: the run's kind and fingerprint (errors.claim_run_dir)."""
        return self.root / RUN_MARKER

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    # training runs (meta-train, train-rm, the benchmark's and select's training units)
    @property
    def metrics(self) -> Path:
        """metrics.jsonl: one line per logged step (runlog.MetricsLogger)."""
        return self.root / "metrics.jsonl"

    @property
    def reward_model(self) -> Path:
        """The trained reward model, a Hugging Face checkpoint directory."""
        return self.root / "reward_model"

    @property
    def train_record(self) -> Path:
        """train.json: what a trainer of methods.py trained on and how long it took."""
        return self.root / "train.json"

    @property
    def summary(self) -> Path:
        """summary.json: a finished meta-training run (or erm-rm-extra control)."""
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        """checkpoints/latest: the name of the newest complete checkpoint."""
        return self.checkpoints / "latest"

    @property
    def bank(self) -> Path:
        """pi_ref sample banks, one file per domain (metatrain.load_or_build_banks)."""
        return self.root / "bank"

    @property
    def policy_trainable(self) -> Path:
        """A trained policy's trainable tensors (dpo)."""
        return self.root / "policy_trainable.pt"

    # aligned policies (meta-test, benchmark)
    @property
    def policies(self) -> Path:
        return self.root / "policies"

    @property
    def base_model(self) -> Path:
        """The one base model the run's exported policies share when it must be saved (export.save_policy)."""
        return self.policies / "base_model"

    # results (benchmark, and its finished/ report of the seeds done so far; select)
    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def finished(self) -> "RunLayout":
        """finished/: `oodpl benchmark --report-finished`'s results of the seeds whose every unit has finished."""
        return RunLayout(self.root / "finished")

    @property
    def selection(self) -> Path:
        """selection.json of an `oodpl select` run."""
        return self.root / "selection.json"


class Run:
    """A run directory held by this process (see `open_run`): its layout, its claim, and the start-up writes.

    The writes happen only where the claim is enabled (the main process): the others read what it wrote."""

    def __init__(self, output: str | os.PathLike, kind: str, fingerprint: dict, cfg: "Config | None" = None,
                 enabled: bool = True, extendable: tuple[str, ...] = (), resume: bool = False):
        self.layout = RunLayout(Path(output))
        self.cfg = cfg
        self.claim: RunClaim = claim_run_dir(output, kind, fingerprint, enabled, extendable, resume)

    def __enter__(self) -> "Run":
        self.claim.__enter__()
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        return self.claim.__exit__(typ, exc, tb)

    @property
    def writes(self) -> bool:
        return self.claim.enabled

    def write_config(self) -> None:
        """config.yaml: the resolved config this run goes on with."""
        from oodpl.config import dump_config

        if self.writes:
            atomic_write_text(self.layout.config, dump_config(self.cfg))

    def save_split(self, split: "DomainSplit") -> None:
        if self.writes:
            split.save(self.layout.split)

    def record(self, split: "DomainSplit") -> None:
        """What the run was started with, beside the marker: config.yaml, then split.json."""
        self.write_config()
        self.save_split(split)

    def commit(self) -> None:
        """Start-up is over: a failure from here on keeps the run's files (errors.RunClaim.commit)."""
        self.claim.commit()


def open_run(output: str | os.PathLike, kind: str, fingerprint: dict, cfg: "Config | None" = None,
             enabled: bool = True, extendable: tuple[str, ...] = (), resume: bool = False) -> Run:
    """Hold `output` for one run of `kind`; use as a context manager around the whole run:

        with open_run(out, "select", cfg.fingerprint(), cfg) as run:
            split = load_or_build_split(run.layout.split, cfg.data)   # data.split
            ...checks that can fail...
            run.record(split)      # config.yaml, split.json
            run.commit()
            ...the long work, paths from run.layout...

    The claim (marker, lock, roll-back of a start that fails before commit; `enabled`, `extendable` and `resume`)
    is errors.claim_run_dir's."""
    return Run(output, kind, fingerprint, cfg, enabled, extendable, resume)
