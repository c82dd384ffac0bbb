"""Meta-test: freeze a reward function, start from pi_ref on a held-out domain, and run the SAME KL-regularised RLOO
policy optimisation as the inner loop of meta-training (policy_opt.policy_gradient), on-policy, for S steps.

The reward function is any callable (prompts, responses) -> scores: a reward-model checkpoint (ours, a baseline's, or
one trained elsewhere: any Hugging Face sequence-classification model) or the gold judge (`gold-reward` baseline).

method.md, "Meta-test": the policy is optimised on the domain's ADAPTATION prompts and scored on its EVALUATION prompts
(disjoint, data/split.py); rewards are standardised by ONE scale per (reward function, domain): the standard deviation
of the frozen reward on pi_ref samples of the adaptation prompts, computed once before optimisation (no label used).
Also here: `oodpl meta-test` (meta_test_command) and the two file units the benchmark shares with it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from oodpl.config import Config
from oodpl.errors import UserError, atomic_write_json
from oodpl.models.policy import Policy
from oodpl.models.reward import RewardModel
from oodpl.models.precision import place
from oodpl.paths import inside
from oodpl.core.policy_opt import policy_gradient
from oodpl.runtime.rundir import RunLayout, open_run
from oodpl.runtime.runlog import seed_everything
from oodpl.models.sampling import (SequenceBatch, collate, encode_prompts, logprobs_and_kl, policy_logprobs,
                                   sample_responses)
from oodpl.data.split import load_or_build_split

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


def reward_model_fn(rm: RewardModel, batch_size: int = 64) -> RewardFn:
    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.cat([rm.score(prompts[i:i + batch_size], responses[i:i + batch_size])
                          for i in range(0, len(prompts), batch_size)])

    return score


def judge_fn(judge, references: dict[str, str | None] | None = None) -> RewardFn:
    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        refs = [references.get(p) for p in prompts] if references else None
        return torch.tensor(judge.score(prompts, responses, refs), dtype=torch.float32)

    return score


@dataclass
class PolicySamples:
    """Evaluation samples of a policy on a domain's prompts: m responses per prompt, with log pi and log pi_ref."""

    prompts: list[str]  # repeated, one per response
    responses: list[str]
    logp: list[float]
    ref_logp: list[float]
    # per response, the exact token-level KL(pi || pi_ref) along its prefixes (models.sampling.sequence_kl); None in
    # sample files written before it existed, whose kl falls back to the k1 estimate from logp - ref_logp
    token_kl: list[float] | None = None

    def to_json(self) -> dict:
        from oodpl.data.conversation import to_json

        return {**self.__dict__, "prompts": [to_json(p) for p in self.prompts]}  # conversations as messages

    @classmethod
    def from_json(cls, d: dict) -> "PolicySamples":
        from oodpl.data.conversation import from_json

        return cls(**{**d, "prompts": [from_json(p) for p in d["prompts"]]})


@torch.no_grad()
def draw_eval_samples(policy: Policy, prompts: list[str], m: int, seed: int, batch_size: int = 16,
                      progress: bool = False, desc: str = "eval samples") -> PolicySamples:
    cfg, tok = policy.config, policy.tokenizer
    p_ids = encode_prompts(tok, prompts, cfg.max_prompt_tokens, cfg.chat_template)
    r_ids = sample_responses(policy.model, tok, p_ids, m, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                             batch_size=batch_size, generator_seed=seed, progress=progress, desc=desc)
    rows_p = [p for p, rs in zip(p_ids, r_ids) for _ in rs]
    rows_r = [r for rs in r_ids for r in rs]
    batch = policy.with_trunk(collate(rows_p, rows_r, tok.pad_token_id), batch_size)
    logp, ref_logp, token_kl = logprobs_and_kl(policy, batch, chunk=batch_size)
    return PolicySamples([p for p in prompts for _ in range(m)],
                         [tok.decode(r, skip_special_tokens=True) for r in rows_r], logp.tolist(), ref_logp.tolist(),
                         token_kl.tolist())


def eval_seed(seed: int, domain_index: int) -> int:
    """Generator seed of the evaluation samples: shared by every method (common random numbers)."""
    return 1_000_003 * seed + 7_919 * domain_index + 17


def adapt_reference_seed(domain_index: int) -> int:
    """Generator seed of the pi_ref samples on a domain's adaptation prompts (shared by every method and seed)."""
    return 500_009 + 7_919 * domain_index


def reference_reward_scale(reward_fn: RewardFn, samples: PolicySamples) -> float:
    """s of the meta-test: the population std of the frozen reward on pi_ref samples of the adaptation prompts."""
    r = reward_fn(samples.prompts, samples.responses).double()
    return float(r.std(correction=0))


def meta_test_reward_scale(cfg: Config, scale: float | None) -> float | None:
    """The fixed divisor of the meta-test's rewards: `scale` under rloo.reward_norm=std (floored like the inner
    step's), None (raw rewards) under reward_norm=none."""
    from oodpl.core.policy_opt import SCALE_FLOOR

    if cfg.rloo.reward_norm == "none":
        return None
    if scale is None:
        raise ValueError("rloo.reward_norm=std needs the reward scale on pi_ref samples (reference_reward_scale)")
    return max(float(scale), SCALE_FLOOR)


def optimise_policy(policy: Policy, prompts: list[str], reward_fn: RewardFn, cfg: Config, beta: float, seed: int,
                    progress: bool = False, desc: str = "meta-test", log: Callable | None = None,
                    reward_scale: float | None = None, gold_fn: RewardFn | None = None,
                    measure: Callable[[SequenceBatch], dict] | None = None) -> dict:
    """S steps of on-policy KL-regularised RLOO from pi_ref on `prompts` (the adaptation prompts), rewards divided by
    `reward_scale` (see meta_test_reward_scale); leaves the optimised policy in `policy`. `gold_fn` (a gold judge,
    for monitoring only: nothing is optimised on it) adds the mean gold reward of each step's samples to its
    stats; `measure` (monitoring too) adds what it returns for each step's batch of samples, before the update."""
    divisor = meta_test_reward_scale(cfg, reward_scale)
    policy.reset_to_reference()
    theta = policy.trainable_parameters()
    params = list(theta.values())
    mt = cfg.meta_test
    opt = (torch.optim.Adam(params, lr=mt.lr) if mt.optimizer == "adam" else torch.optim.SGD(params, lr=mt.lr))
    tok, pcfg = policy.tokenizer, policy.config
    rng = np.random.default_rng([seed, 7])
    n, B = cfg.rloo.num_samples, min(cfg.rloo.batch_prompts, len(prompts))
    history, t0 = [], time.time()
    bar = tqdm(range(mt.steps), desc=desc, disable=not progress, unit="step", leave=False)
    for step in bar:
        chosen = [prompts[i] for i in rng.choice(len(prompts), size=B, replace=False)]
        p_ids = encode_prompts(tok, chosen, pcfg.max_prompt_tokens, pcfg.chat_template)
        policy.model.eval()
        r_ids = sample_responses(policy.model, tok, p_ids, n, pcfg.max_new_tokens, pcfg.temperature, pcfg.top_k,
                                 pcfg.top_p, batch_size=B * n, generator_seed=seed * 100003 + step)
        rows_p = [p for p, rs in zip(p_ids, r_ids) for _ in rs]
        rows_r = [r for rs in r_ids for r in rs]
        # adapters on the top layers only: the trunk below them is shared by pi_theta and pi_ref, computed once
        batch = policy.with_trunk(collate(rows_p, rows_r, tok.pad_token_id))
        with torch.no_grad(), policy.reference() as ref:
            ref_logp = policy_logprobs(ref, batch)
        texts = [tok.decode(r, skip_special_tokens=True) for r in rows_r]
        # rewards on the policy's device, in the log-probabilities' dtype (float32 or more, whatever the models' dtype)
        rewards = reward_fn([p for p in chosen for _ in range(n)], texts).to(ref_logp.device, ref_logp.dtype)
        grads, stats = policy_gradient(lambda th: policy_logprobs(policy.model, batch), theta, rewards, ref_logp,
                                       None, beta, n, reward_scale=divisor)
        if measure is not None:
            stats.update(measure(batch))
        for p, g in zip(params, grads.values()):
            p.grad = g
        opt.step()
        if gold_fn is not None:
            # the gold-reward method optimises the judge itself: its rewards are already the gold scores
            gold = rewards if gold_fn is reward_fn else gold_fn([p for p in chosen for _ in range(n)], texts)
            stats["gold_reward"] = float(gold.float().mean())
        history.append({"step": step + 1, **stats})
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
        if log is not None:
            log(step + 1, stats)
    return {"history": history, "seconds": time.time() - t0, "reward_scale": divisor}


# ----------------------------------------------------------------------------------------------------------------------
# File units shared by `oodpl meta-test` and the benchmark, and the command itself


def meta_test_to_file(path: Path, policy: Policy, adapt_prompts: list[str], eval_prompts: list[str],
                      reward_fn: RewardFn, cfg: Config, beta: float, opt_seed: int, sample_seed: int, info: dict,
                      reward_scale: float | None, progress: bool = False, desc: str = "meta-test",
                      log: Callable | None = None, gold_fn: RewardFn | None = None) -> dict:
    """optimise_policy on the adaptation prompts from pi_ref, then draw_eval_samples on the evaluation prompts; one
    JSON record written atomically."""
    t0 = time.time()
    out = optimise_policy(policy, adapt_prompts, reward_fn, cfg, beta, opt_seed, progress=progress, desc=desc,
                          log=log, reward_scale=reward_scale, gold_fn=gold_fn)
    samples = draw_eval_samples(policy, eval_prompts, cfg.eval.samples_per_prompt, sample_seed)
    record = {**info, "beta": beta, "m": cfg.eval.samples_per_prompt, "history": out["history"],
              "reward_scale": out["reward_scale"], "adapt_prompts": len(adapt_prompts),
              "samples": samples.to_json(), "seconds": time.time() - t0}
    atomic_write_json(path, record)
    return record


def policy_samples_to_file(path: Path, policy: Policy, prompts: list[str], cfg: Config, sample_seed: int,
                           info: dict, m: int | None = None) -> dict:
    """Samples of the policy as it is (pi_ref, or a DPO policy) on `prompts`, m per prompt; written atomically."""
    t0 = time.time()
    m = m or cfg.eval.samples_per_prompt
    samples = draw_eval_samples(policy, prompts, m, sample_seed)
    record = {**info, "beta": None, "m": m, "history": [], "samples": samples.to_json(), "seconds": time.time() - t0}
    atomic_write_json(path, record)
    return record


def load_policy_samples(path: str | Path) -> tuple[PolicySamples, dict]:
    """A samples file: {"samples": PolicySamples, "history", "beta", ...} -> (samples, the whole record)."""
    record = json.loads(Path(path).read_text())
    return PolicySamples.from_json(record["samples"]), record


def adapt_reference_samples(path: Path, policy: Policy, prompts: list[str], cfg: Config, domain_index: int
                            ) -> PolicySamples:
    """pi_ref samples (rloo.num_samples per prompt) on a domain's adaptation prompts, drawn once and stored: every
    reward function's meta-test scale is its spread on these."""
    if not path.exists():
        policy.reset_to_reference()
        policy_samples_to_file(path, policy, prompts, cfg, adapt_reference_seed(domain_index),
                               {"what": "pi_ref samples on the adaptation prompts"}, m=cfg.rloo.num_samples)
    return load_policy_samples(path)[0]


def save_aligned_policy(policy: Policy, out: Path, domain: str, beta: float, merge: bool = False,
                        info: dict | None = None) -> Path:
    """The policy as it is now (after optimise_policy) as a PEFT adapter directory
    `<out>/policies/<domain>/beta_<beta>` (export.save_policy; a base model that must be saved goes once to
    `<out>/policies/base_model`); `merge` also writes its merged/ full model."""
    from oodpl.models.export import save_policy

    target = inside(out, "policies", domain, f"beta_{beta:g}")
    return save_policy(policy, target, base_dir=RunLayout(out).base_model, merge=merge,
                       metadata={"domain": domain, "beta_test": beta, **(info or {})})


def meta_test_command(cfg: Config, reward_model: str, output: str | Path, domains: list[str] | None = None,
                      prompts: str | None = None, domain: str | None = None, columns: dict[str, str] | None = None,
                      merge: bool = False) -> dict:
    """`oodpl meta-test`: every held-out domain (or `domains`) x every beta_test with a frozen RM checkpoint; each
    aligned policy is saved as a PEFT adapter (`<output>/policies/<domain>/beta_<beta>`, `merge`: plus a merged model).

    `prompts`: a prompts file (any accepted shape) whose domains are the targets instead of the config's split: prompts
    only, no labels needed (`domain` names a file without a domain column). Under `accelerate launch` each process
    takes every world-th (domain, beta) unit; the main process writes the shared files."""
    from oodpl.data.split import held_out_from_prompts
    from oodpl.runtime.distributed import make_accelerator
    from oodpl.models.policy import PolicyAtInit, load_policy
    from oodpl.models.reward import load_reward_checkpoint
    from oodpl.runtime.runlog import MetricsLogger, progress_disabled

    out = Path(output)
    rm_path = Path(reward_model)
    if not rm_path.exists():
        raise UserError(f"--reward-model {rm_path} does not exist; pass a Hugging Face sequence-classification "
                        "checkpoint directory (e.g. RUN/reward_model)")
    accelerator = make_accelerator()
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    fingerprint = {"config": cfg.fingerprint(), "reward_model": str(rm_path.resolve()), "domains": domains}
    if prompts is not None:
        fingerprint.update({"prompts": str(Path(prompts).resolve()) if Path(prompts).exists() else prompts,
                            "domain": domain})
        from oodpl.data.records import read_prompts

        # read before the output directory is claimed: a bad file leaves nothing behind
        target = held_out_from_prompts(read_prompts(prompts, columns or cfg.data.columns, cfg.data.encoding,
                                                    domain or cfg.data.domain), cfg.data)
    with open_run(out, "meta-test", fingerprint, cfg, enabled=main) as run:
        split = target if prompts is not None else load_or_build_split(run.layout.split, cfg.data)
        names = sorted(split.held_out)
        chosen = domains or names
        for d in chosen:
            if d not in split.held_out:
                raise UserError(f"--domains: {d!r} is not a held-out domain of this split; choose from "
                                f"{', '.join(names)}")
            inside(out, d)  # a domain names directories here: one safe name (split.json may have been edited)
        seed_everything(cfg.seed)
        rm = load_reward_checkpoint(rm_path, cfg.reward)
        # every (domain, beta) starts from the same LoRA initialisation, whatever ran before it in this process
        # (reset_to_reference zeroes B only): an interrupted run resumes to the same policies
        at_init = PolicyAtInit(load_policy(cfg.policy, seed=cfg.seed))
        policy = at_init.get()
        run.record(split)  # by the main process alone
        run.commit()
        accelerator.wait_for_everyone()
        place(policy, accelerator)
        place(rm, accelerator)
        progress = not cfg.quiet and main
        logger = MetricsLogger(out, cfg.report_to, enabled=main, config=cfg.to_dict(), tracking=cfg.tracking,
                               stage="meta-test")
        reward = reward_model_fn(rm)
        units = [(d, b) for d in chosen for b in cfg.meta_test.beta_test]
        files: dict[str, dict[str, str]] = {}
        policies: dict[str, dict[str, str]] = {}
        for d, beta in units:
            files.setdefault(d, {})[f"{beta:g}"] = str(out / d / f"beta-{beta:g}.json")
            policies.setdefault(d, {})[f"{beta:g}"] = str(run.layout.policies / d / f"beta_{beta:g}")
        bar = tqdm(units[rank::world], desc="meta-test", disable=progress_disabled(progress), unit="run")
        scales: dict[str, float] = {}
        for d, beta in bar:
            path = out / d / f"beta-{beta:g}.json"
            if path.exists():
                continue
            di = names.index(d)
            ho = split.held_out[d]
            adapt = [p.prompt for p in ho.adapt_prompts]
            policy = at_init.get()
            if d not in scales:
                ref = adapt_reference_samples(out / d / f"adapt_reference-rank{rank}.json", policy, adapt, cfg, di)
                scales[d] = reference_reward_scale(reward, ref)
            meta_test_to_file(path, policy, adapt, [p.prompt for p in ho.eval_prompts], reward, cfg, beta,
                              cfg.seed * 1000 + di, eval_seed(cfg.seed, di),
                              {"method": "reward-model", "reward_model": str(rm_path), "domain": d, "seed": cfg.seed},
                              scales[d], progress=progress, desc=f"meta-test {d} beta={beta:g}",
                              log=logger.child(f"{d}/beta_{beta:g}").log)
            save_aligned_policy(policy, out, d, beta, merge=merge,
                                info={"reward_model": str(rm_path.resolve()), "method": "meta-test"})
        bar.close()
        logger.close()
        accelerator.wait_for_everyone()
        index = {"reward_model": str(rm_path), "files": files, "policies": policies}
        unlabeled = sorted(d for d in chosen if not split.held_out[d].eval_pairs)
        if unlabeled:
            index["notes"] = [f"{d}: prompts only (no pairs): label-based metrics (pl_accuracy, oracle-rm) are "
                              "skipped for it" for d in unlabeled]
        if main:
            atomic_write_json(out / "meta_test.json", index)
        return index
