"""`oodpl train-rm`: a reward model trained on pooled pairs by one of the registry's stand-alone methods (erm-rm, the
Bradley-Terry fit, by default; metarm, grm, warm-rm), with per-domain pair accuracy on held-back pairs before and
after. A method that sees pi_ref samples (metarm) samples them on the split's support prompts (with --pairs: on up to
data.support_size distinct prompts per domain of the training pairs) with the config's policy."""

from __future__ import annotations

import json
from pathlib import Path

from oodpl.experiment import methods as registry
from oodpl.config import Config
from oodpl.data.records import read_pairs
from oodpl.data.split import build_split
from oodpl.errors import UserError, atomic_write_json
from oodpl.models.reward import load_reward_checkpoint, load_reward_model
from oodpl.models.precision import place
from oodpl.train.rm_train import accuracy_by_domain, split_eval
from oodpl.runtime.rundir import open_run
from oodpl.runtime.runlog import MetricsLogger, seed_everything


def standalone_methods() -> list[str]:
    return registry.names(lambda m: m.standalone)


def train_rm_command(cfg: Config, output: str | Path, pairs_path: str | None = None,
                     columns: dict[str, str] | None = None, method: str = registry.ERM) -> dict:
    """The output directory is locked for the run; a start that fails (bad pairs, model, ...) leaves it as it was."""
    from oodpl.runtime.distributed import make_accelerator

    if method not in standalone_methods():
        raise UserError(f"train-rm --method {method}: choose one of {', '.join(standalone_methods())} (meta-rm is "
                        "trained by `oodpl meta-train`, the others by `oodpl benchmark`)")
    m = registry.get(method)
    registry.check_requirements(cfg, [method])
    accelerator = make_accelerator()  # under `accelerate launch`: data-parallel BT steps, main process writes
    main = accelerator.is_main_process
    run_dir = Path(output)
    fingerprint = {"config": cfg.reward.__dict__ | cfg.train_rm.__dict__, "seed": cfg.seed,
                   "pairs": str(pairs_path) if pairs_path else cfg.data.__dict__}
    if method != registry.ERM:
        fingerprint["method"] = method
    # no commit: train-rm has no resume, so a run that fails at any point leaves the directory as it found it
    with open_run(run_dir, "train-rm", fingerprint, cfg, enabled=main):
        if main and (run_dir / "metrics.json").exists():
            raise UserError(f"{run_dir} already holds a finished train-rm run; choose another --output")
        accelerator.wait_for_everyone()
        seed_everything(cfg.seed)
        split = None
        if pairs_path:
            pairs = read_pairs(pairs_path, columns or cfg.data.columns, cfg.data.encoding)
        else:
            split = build_split(cfg.data)
            pairs = split.pooled_pairs()
        if len(pairs) < 2:
            raise UserError(f"train-rm needs at least 2 pairs, got {len(pairs)}")
        train, held = split_eval(pairs, cfg.train_rm.eval_fraction, cfg.seed)
        # the method's initial reward model (the same seeded initialisation its trainer starts from)
        before = accuracy_by_domain(load_reward_model(cfg.reward, seed=cfg.seed), held) if held else {}
        logger = MetricsLogger(run_dir, cfg.report_to, enabled=main, config=cfg.to_dict(), tracking=cfg.tracking,
                               stage="train-rm")
        job = registry.TrainJob(cfg, run_dir, pairs=train, accelerator=accelerator, log=logger.log,
                                progress=not cfg.quiet, what=method, data_parallel=True, split=split)
        if m.shifted_samples:  # pi_ref samples of the prompts: the split's support prompts, else the pairs' prompts
            from oodpl.train.field_rms import pair_prompt_banks
            from oodpl.models.policy import load_policy

            policy = place(load_policy(cfg.policy, seed=cfg.seed), accelerator)
            job.policy = lambda: policy
            if split is None:
                job.banks = pair_prompt_banks(policy, train, cfg)
        registry.get(method).trainer(job)
        logger.close()
        accelerator.wait_for_everyone()
        rm = place(load_reward_checkpoint(job.reward_model_dir, cfg.reward), accelerator)
        after = accuracy_by_domain(rm, held) if held else {}
        summary = {"method": method,
                   "accuracy": {"held_back_pairs_per_domain": {d: sum(p.domain == d for p in held) for d in after},
                                "before": before, "after": after,
                                "train": accuracy_by_domain(rm, train)},
                   "train": json.loads(job.layout.train_record.read_text()),
                   "reward_model": str(job.reward_model_dir)}
        if main:
            atomic_write_json(run_dir / "metrics.json", summary)
        accelerator.wait_for_everyone()
    return summary
