"""`oodpl train-rm`: Bradley-Terry reward model on pooled pairs, with per-domain pair accuracy on held-back pairs."""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .data.records import read_pairs
from .data.split import build_split
from .errors import UserError, atomic_write_json, claim_run_dir
from .models import load_reward_model
from .rm_train import accuracy_by_domain, split_eval, train_reward_model
from .runlog import MetricsLogger, seed_everything


def train_rm_command(cfg: Config, output: str | Path, pairs_path: str | None = None,
                     columns: dict[str, str] | None = None) -> dict:
    """The output directory is locked for the run; a start that fails (bad pairs, model, ...) leaves it as it was."""
    from .distributed import make_accelerator

    accelerator = make_accelerator()  # under `accelerate launch`: data-parallel BT steps, main process writes
    main = accelerator.is_main_process
    run_dir = Path(output)
    fingerprint = {"config": cfg.reward.__dict__ | cfg.train_rm.__dict__, "seed": cfg.seed,
                   "pairs": str(pairs_path) if pairs_path else cfg.data.__dict__}
    # no commit: train-rm has no resume, so a run that fails at any point leaves the directory as it found it
    with claim_run_dir(run_dir, "train-rm", fingerprint, enabled=main):
        if main and (run_dir / "metrics.json").exists():
            raise UserError(f"{run_dir} already holds a finished train-rm run; choose another --output")
        accelerator.wait_for_everyone()
        seed_everything(cfg.seed)
        if pairs_path:
            pairs = read_pairs(pairs_path, columns or cfg.data.columns, cfg.data.encoding)
        else:
            pairs = build_split(cfg.data).pooled_pairs()
        if len(pairs) < 2:
            raise UserError(f"train-rm needs at least 2 pairs, got {len(pairs)}")
        train, held = split_eval(pairs, cfg.train_rm.eval_fraction, cfg.seed)
        rm = load_reward_model(cfg.reward, seed=cfg.seed)
        before = accuracy_by_domain(rm, held) if held else {}
        logger = MetricsLogger(run_dir, cfg.report_to, enabled=main, config=cfg.to_dict(), tracking=cfg.tracking,
                               stage="train-rm")
        stats = train_reward_model(rm, train, cfg.train_rm, seed=cfg.seed, accelerator=accelerator,
                                   progress=not cfg.quiet, log=logger.log)
        logger.close()
        after = accuracy_by_domain(rm, held) if held else {}
        summary = {"accuracy": {"held_back_pairs_per_domain": {d: sum(p.domain == d for p in held) for d in after},
                                "before": before, "after": after,
                                "train": accuracy_by_domain(rm, train)},
                   "train": stats, "reward_model": str(run_dir / "reward_model")}
        if main:
            rm.save(run_dir / "reward_model")
            atomic_write_json(run_dir / "metrics.json", summary)
        accelerator.wait_for_everyone()
    return summary
