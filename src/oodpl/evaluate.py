"""Metrics of method.md ("Metrics") for one method on one held-out domain, from stored meta-test samples.

    pl_accuracy            fraction of the domain's held-out human pairs (eval_pairs) ordered correctly by the method's
                           reward model (r(y_w) > r(y_l), ties 1/2); for `dpo` by the DPO implicit reward
                           beta * (log pi - log pi_ref); None for methods without a reward (reference, gold-reward)
    gold_reward            mean gold-judge score of the policy's samples on the domain's eval prompts, with a 95%
                           Student-t interval over samples ({"mean", "low", "high", "n"})
    kl                     mean over samples of log pi(y|x) - log pi_ref(y|x) (k1 estimate of the sequence KL)
    win_rate_vs_reference  fraction of (prompt, sample index) slots where the judge scores this method's sample above
                           pi_ref's sample for the same prompt and index (ties 1/2)
    win_rate_vs_erm        the same against the erm-rm policy's samples (None when erm-rm is not run)
    rm_gold_agreement      how often the method's reward model orders two of the method's own samples of the same
                           prompt as the gold judge does (gold ties skipped); None without a reward model

Samples of all methods for a domain are drawn with the same generator seed, so "same prompt and sample index" pairs
samples that share their random numbers (common random numbers: fewer spurious wins).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import metrics
from .data.records import PairRecord, PromptRecord
from .metatest import PolicySamples
from .models import RewardModel
from .rm_train import score_pairs


def references_for(task: str, prompts: list[PromptRecord]) -> dict[str, str | None] | None:
    """prompt -> human reference answer (the embedding judge of the knowledge task needs it), else None."""
    refs = {p.prompt: p.reference for p in prompts}
    return refs if any(v is not None for v in refs.values()) else None


def gold_scores(judge, samples: PolicySamples, references: dict[str, str | None] | None) -> list[float]:
    """The gold judge's score of every sample (references, where the data has them, go to the judge)."""
    refs = [references.get(p) for p in samples.prompts] if references else None
    return [float(x) for x in judge.score(samples.prompts, samples.responses, refs)]


def rm_pl_accuracy(rm: RewardModel, pairs: list[PairRecord]) -> float | None:
    if not pairs:
        return None
    rc, rr = score_pairs(rm, pairs)
    return metrics.pair_accuracy(rc, rr)


def dpo_pl_accuracy(policy, pairs: list[PairRecord], beta: float) -> float | None:
    from .dpo import implicit_reward_scores

    if not pairs:
        return None
    rc, rr = implicit_reward_scores(policy, pairs, beta)
    return metrics.pair_accuracy(rc, rr)


@torch.no_grad()
def rm_sample_scores(rm: RewardModel, samples: PolicySamples, batch_size: int = 64) -> list[float]:
    out = []
    for i in range(0, len(samples.prompts), batch_size):
        out += rm.score(samples.prompts[i:i + batch_size], samples.responses[i:i + batch_size]).float().cpu().tolist()
    return out


def sample_metrics(samples: PolicySamples, gold: list[float], ref_gold: list[float] | None = None,
                   erm_gold: list[float] | None = None, rm_scores: list[float] | None = None) -> dict:
    """gold_reward (mean + 95% interval), kl, win rates and rm_gold_agreement of one samples set."""
    ci = metrics.mean_ci95(gold)
    out = {
        "gold_reward": ci["mean"],
        "gold_reward_ci": ci,
        "kl": metrics.sequence_kl_estimate(samples.logp, samples.ref_logp),
        "win_rate_vs_reference": None,
        "win_rate_vs_erm": None,
        "rm_gold_agreement": None,
    }
    if ref_gold is not None:
        if len(ref_gold) != len(gold):
            raise ValueError("reference samples and method samples differ in number; draw both with the same m")
        out["win_rate_vs_reference"] = metrics.win_rate(gold, ref_gold)
    if erm_gold is not None:
        if len(erm_gold) != len(gold):
            raise ValueError("erm-rm samples and method samples differ in number; draw both with the same m")
        out["win_rate_vs_erm"] = metrics.win_rate(gold, erm_gold)
    if rm_scores is not None:
        out["rm_gold_agreement"] = metrics.rm_gold_agreement(rm_scores, gold, samples.prompts)
    return out


def load_samples(path: str | Path) -> tuple[PolicySamples, dict]:
    """A meta-test samples file: {"samples": PolicySamples, "history", "beta", ...} -> (samples, the whole record)."""
    record = json.loads(Path(path).read_text())
    return PolicySamples.from_json(record["samples"]), record


def evaluate_command(cfg, output: str | Path, reward_model: str | None = None, samples_dir: str | None = None) -> dict:
    """`oodpl evaluate`: metrics of a reward model (pl_accuracy on every held-out domain's eval pairs) and/or of an
    `oodpl meta-test` output directory (gold_reward, kl, win_rate_vs_reference against pi_ref samples drawn with the
    same seeds, rm_gold_agreement when --reward-model is given). win_rate_vs_erm needs an erm-rm run: it is null here
    (the benchmark computes it). Writes OUTPUT/evaluation.json."""
    from .benchmark import eval_seed, load_rm
    from .data.split import DomainSplit, build_split
    from .errors import UserError, atomic_write_json, prepare_run_dir
    from .judges import make_judge
    from .metatest import draw_eval_samples
    from .models import load_policy

    if not reward_model and not samples_dir:
        raise UserError("oodpl evaluate needs --reward-model and/or --samples (a meta-test output directory)")
    sdir = Path(samples_dir) if samples_dir else None
    if sdir is not None and not sdir.is_dir():
        raise UserError(f"--samples {sdir} is not a directory; pass the --output directory of `oodpl meta-test`")
    if reward_model and not Path(reward_model).exists():
        raise UserError(f"--reward-model {reward_model} does not exist; pass a checkpoint directory")
    out = Path(output)
    prepare_run_dir(out, "evaluate", {"config": cfg.fingerprint(), "reward_model": reward_model,
                                      "samples": samples_dir})
    split = (DomainSplit.load(sdir / "split.json") if sdir is not None and (sdir / "split.json").exists()
             else build_split(cfg.data))
    names = sorted(split.held_out)
    rm = load_rm(Path(reward_model), cfg) if reward_model else None
    result: dict = {"reward_model": reward_model, "samples": samples_dir, "domains": {}}
    for d in names:
        result["domains"][d] = {"pl_accuracy": rm_pl_accuracy(rm, split.held_out[d].eval_pairs) if rm else None}
    if sdir is not None:
        judge = make_judge(cfg.eval.judge, split.task, cfg.eval.llm_url, cfg.eval.llm_model)
        policy = None
        for d in names:
            files = sorted((sdir / d).glob("beta-*.json")) if (sdir / d).is_dir() else []
            if not files:
                continue
            refs = references_for(split.task, split.held_out[d].eval_prompts)
            per_beta = {}
            ref_gold = None
            for f in files:
                samples, record = load_samples(f)
                if ref_gold is None:
                    if policy is None:
                        policy = load_policy(cfg.policy, seed=record.get("seed", cfg.seed))
                    policy.reset_to_reference()
                    prompts = list(dict.fromkeys(samples.prompts))
                    ref = draw_eval_samples(policy, prompts, record["m"],
                                            eval_seed(record.get("seed", cfg.seed), names.index(d)))
                    ref_gold = gold_scores(judge, ref, refs)
                g = gold_scores(judge, samples, refs)
                m = sample_metrics(samples, g, ref_gold, None, rm_sample_scores(rm, samples) if rm else None)
                per_beta[f"{record['beta']:g}"] = m
            result["domains"][d]["meta_test"] = per_beta
    atomic_write_json(out / "evaluation.json", result)
    return result
