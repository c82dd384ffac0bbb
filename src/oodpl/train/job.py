"""What every trainer is handed (`TrainJob`: its inputs, never rebuilt from the config) and how a fitted reward
model is saved; the trainers themselves are the methods' (experiment.methods), in train/."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodpl.config import Config
from oodpl.errors import atomic_write_json
from oodpl.runtime.rundir import RunLayout


@dataclass
class TrainJob:
    """What a trainer is handed: every input, never rebuilt from the config.

    `pairs` are the labelled pairs the method may train on (the pooled meta-train pairs; a held-out domain's oracle
    pairs for oracle-rm), `split` the meta-train domains (support prompts, query pairs) the bilevel and control
    trainers draw from, `init` the warm-start reward model directory, `policy()` the seed's policy at its LoRA
    initialisation (loaded once per seed by the caller), `banks` pi_ref sample banks already built for `split`'s
    domains (None: the trainer builds them under `output`), `target_samples` unlabelled pi_ref samples of the other
    prompts the reward model will be used on, for methods that see them (Method.shifted_samples)."""

    cfg: Config
    output: Path
    pairs: list = field(default_factory=list)
    split: Any = None  # data.split.DomainSplit
    init: Path | None = None
    policy: Callable[[], Any] | None = None
    banks: dict | None = None
    accelerator: Any = None
    log: Callable[[int, dict], None] | None = None
    progress: bool = False
    what: str = ""  # how the run is named in train.json and the trackers
    export_base: Path | None = None  # policy methods: where the base model of the saved PEFT adapter goes
    data_parallel: bool = False  # reward-model fits run data-parallel on `accelerator` (`oodpl train-rm`)
    # (prompt, [pi_ref responses]) of the held-out domains' adaptation prompts (benchmark) or of the left-out
    # domain's support prompts (`oodpl select` folds): prompts the meta-test aligns on, never their labels
    target_samples: list | None = None

    @property
    def main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.output)

    @property
    def reward_model_dir(self) -> Path:
        return self.layout.reward_model


Trainer = Callable[[TrainJob], None]


def save_reward_fit(job: TrainJob, rm, stats: dict, **extra) -> None:
    """A fitted reward model's OUTPUT/reward_model (standard checkpoint) and OUTPUT/train.json (main process)."""
    if job.main_process:
        rm.save(job.reward_model_dir)
        atomic_write_json(job.layout.train_record, {"what": job.what, "pairs": len(job.pairs),
                                                    "lr": job.cfg.train_rm.lr, **stats, **extra})
