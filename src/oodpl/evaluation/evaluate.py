"""Measurements of method.md ("Metrics") for one method on one held-out domain, with the per-unit values that the
statistics need (report.py / stats.py: prompt-clustered bootstraps within a cell, paired across methods).

    pl_accuracy            held-out human pairs ordered correctly by the method's reward (ties 1/2); `dpo`: its
                           implicit reward beta * (log pi - log pi_ref). Units: one per pair, clustered by prompt.
    rm_gold_agreement      on ONE shared set of pi_ref samples per held-out domain (shared_reference_samples): every
                           within-prompt pair of samples whose gold scores differ, 1 if the reward orders it as the
                           gold judge does (ties 1/2). Every RM scores the same pairs, so RMs are comparable.
    gold_reward, kl        mean gold score / k1 KL of the method's samples on the evaluation prompts (per beta_test)
    win_rate_vs_*          gold-judge comparisons, same prompt and sample index (common random numbers)
    own_sample_agreement   agreement on the method's own samples (secondary: each RM is judged on different pairs)

Also `oodpl evaluate` (evaluate_command). Nothing here imports the benchmark: it stands above this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from oodpl.evaluation import metrics
from oodpl.data.records import PairRecord, PromptRecord
from oodpl.adapt.metatest import PolicySamples, draw_eval_samples, eval_seed, load_policy_samples
from oodpl.models.reward import RewardModel
from oodpl.train.rm_train import score_pairs

log = logging.getLogger(__name__)


def references_for(task: str, prompts: list[PromptRecord]) -> dict[str, str | None] | None:
    """prompt -> human reference answer (the embedding judge of the knowledge task needs it), else None."""
    refs = {p.prompt: p.reference for p in prompts}
    return refs if any(v is not None for v in refs.values()) else None


def gold_scores(judge, samples: PolicySamples, references: dict[str, str | None] | None) -> list[float]:
    """The gold judge's score of every sample (references, where the data has them, go to the judge)."""
    refs = [references.get(p) for p in samples.prompts] if references else None
    return [float(x) for x in judge.score(samples.prompts, samples.responses, refs)]


def prompt_clusters(prompts: list[str]) -> list[int]:
    """Cluster ids for prompt-level bootstraps: the index of each prompt's first appearance."""
    index: dict[str, int] = {}
    return [index.setdefault(p, len(index)) for p in prompts]


# ---------------------------------------------------------------------------------------------------- pl_accuracy
def pl_units(chosen: torch.Tensor, rejected: torch.Tensor, pairs: list[PairRecord]) -> dict:
    """pl_accuracy of per-pair scores, with its units (one per pair, clustered by prompt)."""
    values = metrics.pair_correct(chosen, rejected)
    return {"value": sum(values) / len(values) if values else None, "n": len(values),
            "units": {"values": values, "clusters": prompt_clusters([p.prompt for p in pairs])}}


def rm_pl(rm: RewardModel, pairs: list[PairRecord]) -> dict | None:
    if not pairs:
        return None
    return pl_units(*score_pairs(rm, pairs), pairs)


def dpo_pl(policy, pairs: list[PairRecord], beta: float) -> dict | None:
    from oodpl.train.dpo import implicit_reward_scores

    if not pairs:
        return None
    return pl_units(*implicit_reward_scores(policy, pairs, beta), pairs)


def rm_pl_accuracy(rm: RewardModel, pairs: list[PairRecord]) -> float | None:
    out = rm_pl(rm, pairs)
    return None if out is None else out["value"]


# -------------------------------------------------------------------------------------------- rm_gold_agreement
def shared_reference_samples(path: Path, policy, prompts: list[str], m: int, seed: int, judge,
                             references: dict[str, str | None] | None) -> tuple[PolicySamples, list[float]]:
    """The held-out domain's ONE shared set of pi_ref samples (m per evaluation prompt) with their gold scores,
    drawn and judged once, stored at `path` and reused by every reward model and seed."""
    from oodpl.errors import atomic_write_json

    if not path.exists():
        policy.reset_to_reference()
        samples = draw_eval_samples(policy, prompts, m, seed)
        atomic_write_json(path, {"what": "shared pi_ref samples for rm_gold_agreement", "m": m, "seed": seed,
                                 "samples": samples.to_json(), "gold": gold_scores(judge, samples, references)})
    return load_shared_reference_samples(path)


def load_shared_reference_samples(path: Path) -> tuple[PolicySamples, list[float]]:
    record = json.loads(Path(path).read_text())
    return PolicySamples.from_json(record["samples"]), record["gold"]


@torch.no_grad()
def rm_sample_scores(rm: RewardModel, samples: PolicySamples, batch_size: int = 64) -> list[float]:
    out = []
    for i in range(0, len(samples.prompts), batch_size):
        out += rm.score(samples.prompts[i:i + batch_size], samples.responses[i:i + batch_size]).float().cpu().tolist()
    return out


def agreement(scores: list[float], gold: list[float], prompts: list[str]) -> dict:
    """rm_gold_agreement of `scores` against `gold`, with its units (within-prompt pairs, clustered by prompt)."""
    values, clusters = metrics.agreement_units(scores, gold, prompts)
    index = prompt_clusters(prompts)
    ids = dict(zip(prompts, index))
    return {"value": sum(values) / len(values) if values else None, "n": len(values),
            "units": {"values": values, "clusters": [ids[c] for c in clusters]}}


# -------------------------------------------------------------------------------------------- policy samples
def sample_metrics(samples: PolicySamples, gold: list[float] | None, ref_gold: list[float] | None = None,
                   erm_gold: list[float] | None = None, rm_scores: list[float] | None = None) -> dict:
    """gold_reward (mean + 95% interval over samples), kl (the mean of models.sampling.sequence_kl), win rates and
    own-sample agreement of one samples set; without gold scores (no usable judge) only kl."""
    ci = metrics.mean_ci95(gold) if gold is not None else {"mean": None}
    out = {
        "gold_reward": ci["mean"],
        "gold_reward_ci": ci if gold is not None else None,
        # the exact token-level KL along the samples' prefixes where the samples carry it (lower variance, never
        # negative); the k1 estimate mean(log pi - log pi_ref) for sample files written before it
        "kl": (sum(samples.token_kl) / len(samples.token_kl) if samples.token_kl else
               metrics.sequence_kl_estimate(samples.logp, samples.ref_logp)),
        "win_rate_vs_reference": None,
        "win_rate_vs_erm": None,
        "own_sample_agreement": None,
    }
    for key, other in (("win_rate_vs_reference", ref_gold), ("win_rate_vs_erm", erm_gold)):
        if other is not None:
            if len(other) != len(gold):
                raise ValueError(f"{key}: the two sample sets differ in number; draw both with the same m")
            out[key] = metrics.win_rate(gold, other)
    if rm_scores is not None and gold is not None:
        out["own_sample_agreement"] = metrics.rm_gold_agreement(rm_scores, gold, samples.prompts)
    return out


def load_samples(path: str | Path) -> tuple[PolicySamples, dict]:
    return load_policy_samples(path)


# -------------------------------------------------------------------------------------------------- the command
def evaluate_command(cfg, output: str | Path, reward_model: str | None = None, samples_dir: str | None = None) -> dict:
    """`oodpl evaluate`: metrics of a reward model (pl_accuracy on every held-out domain's eval pairs) and/or of an
    `oodpl meta-test` output directory (gold_reward, kl, win_rate_vs_reference against pi_ref samples drawn with the
    same seeds, own-sample agreement when --reward-model is given). win_rate_vs_erm needs an erm-rm run: it is null
    here (the benchmark computes it). Writes OUTPUT/evaluation.json."""
    from oodpl.errors import UserError, atomic_write_json
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_checkpoint
    from oodpl.data.split import load_or_build_split
    from oodpl.runtime.rundir import RunLayout, open_run

    if not reward_model and not samples_dir:
        raise UserError("oodpl evaluate needs --reward-model and/or --samples (a meta-test output directory)")
    sdir = Path(samples_dir) if samples_dir else None
    if sdir is not None and not sdir.is_dir():
        raise UserError(f"--samples {sdir} is not a directory; pass the --output directory of `oodpl meta-test`")
    if reward_model and not Path(reward_model).exists():
        raise UserError(f"--reward-model {reward_model} does not exist; pass a checkpoint directory")
    out = Path(output)
    fingerprint = {"config": cfg.fingerprint(), "reward_model": reward_model, "samples": samples_dir}
    with open_run(out, "evaluate", fingerprint, cfg) as run:
        # the split of the meta-test run whose samples are scored (evaluate stores none of its own)
        split = load_or_build_split(RunLayout(sdir).split if sdir is not None else None, cfg.data)
        names = sorted(split.held_out)
        rm = load_reward_checkpoint(Path(reward_model), cfg.reward) if reward_model else None
        judge, no_judge = (_judge_or_reason(cfg, split.task) if sdir is not None else (None, None))
        run.commit()
        result: dict = {"reward_model": reward_model, "samples": samples_dir, "domains": {}, "skipped": []}
        for d in names:
            pairs = split.held_out[d].eval_pairs
            result["domains"][d] = {"pl_accuracy": rm_pl_accuracy(rm, pairs) if rm else None}
            if rm and not pairs:
                result["skipped"].append(f"{d}: pl_accuracy (the domain has prompts only, no labelled pairs)")
        policy = None
        for d in names if sdir is not None else []:
            files = sorted((sdir / d).glob("beta-*.json")) if (sdir / d).is_dir() else []
            if not files:
                continue
            refs = references_for(split.task, split.held_out[d].eval_prompts)
            usable, why = judge, no_judge
            if judge is not None and getattr(judge, "needs_references", False) and refs is None:
                usable, why = None, f"the {judge.name} judge needs reference answers, and these prompts have none"
            if usable is None:
                result["skipped"].append(f"{d}: gold_reward, win_rate_vs_reference, own_sample_agreement ({why}); "
                                         "kl is measured")
            per_beta = {}
            ref_gold = None
            for f in files:
                samples, record = load_samples(f)
                if ref_gold is None and usable is not None:
                    if policy is None:
                        policy = load_policy(cfg.policy, seed=record.get("seed", cfg.seed))
                    policy.reset_to_reference()
                    prompts = list(dict.fromkeys(samples.prompts))
                    ref = draw_eval_samples(policy, prompts, record["m"],
                                            eval_seed(record.get("seed", cfg.seed), names.index(d)))
                    ref_gold = gold_scores(usable, ref, refs)
                g = gold_scores(usable, samples, refs) if usable is not None else None
                m = sample_metrics(samples, g, ref_gold, None, rm_sample_scores(rm, samples) if rm else None)
                per_beta[f"{record['beta']:g}"] = m
            result["domains"][d]["meta_test"] = per_beta
        for line in result["skipped"]:
            log.info("skipped %s", line)
        atomic_write_json(out / "evaluation.json", result)
        return result


def _judge_or_reason(cfg, task: str):
    """(the gold judge, None), or (None, why there is none) when eval.judge is auto and the task has no automatic
    judge (a user's prompts-only domain): the metrics that need one are skipped, the others still measured."""
    from oodpl.errors import UserError
    from oodpl.evaluation.judges import judge_from_config

    try:
        return judge_from_config(cfg, task), None
    except UserError:
        if cfg.eval.judge != "auto":
            raise
        return None, (f"no automatic gold judge for task {task!r}; set eval.judge: vader or llm, which need no "
                      "reference answers")
