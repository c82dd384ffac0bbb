"""The bilevel step of method.md, top to bottom: inner RLOO steps under r_phi, outer DPO-style loss of the adapted
policy on human pairs, and the hypergradient dF/dphi. This is the one part of oodpl that no library provides.

    F(phi) = mean_d L_out^d(theta_K^d(phi)) + lambda_bt * mean_d BT(r_phi; P_d)

`policy` is anything with `theta_init()` and `logprobs(batch, params)` (models.Policy, or the tabular toy policy of
toy.py); `rm` anything with `forward_encoded(encoding)`.

The hypergradient is computed in two stages so that the reward model's graph never sits inside the policy's:
  1. dL_out/dr_j for every inner-step sample j (the reward *values*), by the chosen mode:
       one-step / truncated:  dL/dr_j = alpha/(B n) * s~_j,  s_j = w_j <grad_theta log pi_theta_k(y_j|x), v>,
                              v = grad_theta L_out(theta_K), s~ = leave-one-out centred s
       unrolled:              exact reverse mode through all K inner steps (create_graph), rewards as leaves
  2. one weighted backward pass through the reward model: sum_j dL/dr_j * r_phi(x, y_j).

Two variants of the inner step (method.md), both carried by the DomainTask so that the default path reads as above:
  - demonstrations (meta.inner_candidates: samples+demos): step k's candidates are its samples, then the drawn support
    prompts' human continuations y_m (task.demos[k]); the step adds demo_weight * g_demo (policy_opt), linear in the
    rewards, so stage 1 gives them  dL/dr^_m = alpha * demo_weight / M * c_m,  c_m = s_m - mean s  (s_m the JVP
    <grad_theta log pi_theta_k(y_m|x_m), v>), pulled back through their standardisation over the set;
  - warm start (meta.inner_start: warm): theta_0 = task.theta_start (the domain's theta_d) with samples drawn from
    pi_theta_d; the hypergradient is taken through this outer step's K steps only (truncated at theta_d).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from oodpl.config import MetaConfig, RLOOConfig, resolved_hypergrad
from oodpl.models.policy import Policy
from oodpl.models.reward import RewardModel
from oodpl.core.objectives import bradley_terry_loss, dpo_loss, pair_accuracy, rloo_advantages
from oodpl.core.leverage import step_stats
from oodpl.runtime.runlog import phase
from oodpl.models.trunk import attach as attach_trunk
from oodpl.models.trunk import rows_of as trunk_rows_of
from oodpl.core.policy_opt import (demonstration_gradient, importance_weights, policy_gradient, pull_back_centred_standardisation,
                         pull_back_standardisation, sgd_step)
from oodpl.models.sampling import (Samples, SequenceBatch, collate, encode_prompts, encode_responses, policy_logprobs,
                       second_order)

log = logging.getLogger(__name__)


@dataclass
class PreferenceBatch:
    """Human pairs of one domain, tokenised for the policy (chosen rows, then rejected rows) and for the RM."""

    batch: SequenceBatch  # 2M rows
    ref_logp: torch.Tensor  # [2M] log pi_ref, computed once
    rm_chosen: dict[str, torch.Tensor]
    rm_rejected: dict[str, torch.Tensor]

    @property
    def num_pairs(self) -> int:
        return len(self.batch) // 2


@dataclass
class PreferenceSet:
    """A domain's human pairs tokenised once, with log pi_ref of every response computed once (never recomputed)."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    ref_chosen: torch.Tensor  # [M]
    ref_rejected: torch.Tensor  # [M]
    # frozen trunk (oodpl.models.trunk) per chosen / rejected row, computed once when the adapters sit on the top layers only
    trunk_chosen: list[torch.Tensor] | None = None
    trunk_rejected: list[torch.Tensor] | None = None
    trunk_layer: int | None = None

    @classmethod
    def build(cls, policy: Policy, prompts: list[str], chosen: list[str], rejected: list[str],
              chunk: int = 32) -> "PreferenceSet":
        cfg = policy.config
        p_ids = encode_prompts(policy.tokenizer, prompts, cfg.max_prompt_tokens, cfg.chat_template)
        c_ids, ref_c, trunk_c = human_responses(policy, prompts, p_ids, chosen, chunk)
        r_ids, ref_r, trunk_r = human_responses(policy, prompts, p_ids, rejected, chunk)
        return cls(list(prompts), list(chosen), list(rejected), p_ids, c_ids, r_ids, ref_c, ref_r,
                   trunk_c, trunk_r, policy.trunk_layer)

    def __len__(self) -> int:
        return len(self.prompts)

    def policy_batch(self, idx: list[int], pad_id: int) -> SequenceBatch:
        """Pairs `idx` for the policy: the chosen rows, then the rejected rows, with their frozen trunk attached."""
        p = [self.prompt_ids[i] for i in idx]
        batch = collate(p + p, [self.chosen_ids[i] for i in idx] + [self.rejected_ids[i] for i in idx], pad_id)
        if self.trunk_chosen is not None:
            attach_trunk(batch, [self.trunk_chosen[i] for i in idx] + [self.trunk_rejected[i] for i in idx],
                         self.trunk_layer)
        return batch

    def select(self, idx: list[int], pad_id: int, rm: RewardModel) -> PreferenceBatch:
        ref = torch.cat([self.ref_chosen[idx], self.ref_rejected[idx]])
        prompts = [self.prompts[i] for i in idx]
        return PreferenceBatch(self.policy_batch(idx, pad_id), ref, rm.encode(prompts, [self.chosen[i] for i in idx]),
                               rm.encode(prompts, [self.rejected[i] for i in idx]))


def human_responses(policy: Policy, prompts: list[str], prompt_ids: list[list[int]], responses: list[str],
                    chunk: int = 32) -> tuple[list[list[int]], torch.Tensor, list[torch.Tensor] | None]:
    """Human-written responses tokenised for the policy (cut at policy.response_cap()), with log pi_ref computed once
    and, with adapters on the top layers only, their frozen trunk: (response ids, log pi_ref, trunk rows or None)."""
    cfg, tok = policy.config, policy.tokenizer
    ids = encode_responses(tok, prompts, responses, cfg.response_cap(), cfg.chat_template)
    # with a frozen trunk, log pi_ref runs from it too: the layers below the adapters run once per response
    batch = policy.with_trunk(collate(prompt_ids, ids, tok.pad_token_id), chunk)
    with torch.no_grad(), policy.reference() as ref:
        ref_logp = policy_logprobs(ref, batch, chunk=chunk)
    # log pi_ref stays on the policy's device, where it meets the policy's log-probabilities
    return ids, ref_logp, None if batch.trunk is None else trunk_rows_of(batch)


@dataclass
class DemonstrationSet:
    """A meta-train domain's demonstrations (meta.inner_candidates: samples+demos): the human continuations
    (`reference`) of its support prompts, tokenised like human pairs once, with log pi_ref. Row r holds support prompt
    `support_index[r]`; a support prompt without a reference, or whose reference is one of the domain's query
    responses (the outer data), has none."""

    prompts: list[str]
    references: list[str]
    support_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ref_logp: torch.Tensor  # [rows]
    trunk: list[torch.Tensor] | None = None
    trunk_layer: int | None = None

    @classmethod
    def build(cls, policy: Policy, prompts: list[str], references: list[str | None],
              query_responses: list[str] = (), chunk: int = 32) -> "DemonstrationSet":
        outer = {" ".join(t.split()) for t in query_responses}
        rows = [i for i, r in enumerate(references) if r and r.strip() and " ".join(r.split()) not in outer]
        p, y = [prompts[i] for i in rows], [references[i] for i in rows]
        cfg = policy.config
        p_ids = encode_prompts(policy.tokenizer, p, cfg.max_prompt_tokens, cfg.chat_template) if rows else []
        y_ids, ref_logp, trunk = human_responses(policy, p, p_ids, y, chunk) if rows else ([], torch.empty(0), None)
        return cls(p, y, rows, p_ids, y_ids, ref_logp, trunk, policy.trunk_layer)

    def __len__(self) -> int:
        return len(self.support_index)

    def select(self, support_idx: list[int], pad_id: int, rm: RewardModel | None = None) -> Samples | None:
        """The demonstrations of the drawn support prompts `support_idx` as n = 1 candidates (no behaviour policy:
        they are not samples), or None when none of them has one."""
        row_of = {i: r for r, i in enumerate(self.support_index)}
        rows = [row_of[i] for i in support_idx if i in row_of]
        if not rows:
            return None
        batch = collate([self.prompt_ids[r] for r in rows], [self.response_ids[r] for r in rows], pad_id)
        if self.trunk is not None:
            attach_trunk(batch, [self.trunk[r] for r in rows], self.trunk_layer)
        prompts, texts = [self.prompts[r] for r in rows], [self.references[r] for r in rows]
        demos = Samples(prompts, texts, batch, self.ref_logp[rows], None, 1)
        if rm is not None:
            demos.rm_encoding = rm.encode(prompts, texts)
        return demos


def make_preference_batch(policy: Policy, rm: RewardModel, prompts: list[str], chosen: list[str],
                          rejected: list[str]) -> PreferenceBatch:
    pset = PreferenceSet.build(policy, prompts, chosen, rejected)
    return pset.select(list(range(len(pset))), policy.tokenizer.pad_token_id, rm)


@dataclass
class DomainTask:
    """What one domain contributes to one outer step: K batches of inner samples and a batch of human pairs.

    The variants of the inner step (module doc): `demos[k]`, step k's demonstrations (None: samples only), and
    `theta_start`, the warm-started theta_d the K steps start from (None: theta_init) with `inner` drawn from it."""

    name: str
    inner: list[Samples]  # one per inner step
    query: PreferenceBatch
    demos: list[Samples | None] | None = None
    theta_start: dict[str, torch.Tensor] | None = None

    def demos_of(self, k: int) -> Samples | None:
        return None if self.demos is None else self.demos[k]

    def candidates(self, k: int, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step k's rewards (samples, then demonstrations) split into (samples', demonstrations' or None)."""
        if self.demos_of(k) is None:
            return rewards, None
        N = len(self.inner[k].ref_logp)
        return rewards[:N], rewards[N:]


def candidate_rewards(rm: RewardModel, task: DomainTask) -> list[torch.Tensor]:
    """r_phi of every inner step's candidates: its samples, then its demonstrations (samples+demos)."""
    out = []
    for k, samples in enumerate(task.inner):
        r = rm.forward_encoded(samples.rm_encoding)
        demos = task.demos_of(k)
        out.append(r if demos is None else torch.cat([r, rm.forward_encoded(demos.rm_encoding)]))
    return out


def start_theta(policy: Policy, task: DomainTask) -> dict[str, torch.Tensor]:
    """theta_0 of the task's inner steps: theta_init, or the warm-started theta_d."""
    return policy.theta_init() if task.theta_start is None else task.theta_start


def _logp_fn(policy: Policy, batch):
    return lambda theta: policy.logprobs(batch, params=theta)


def outer_loss(policy: Policy, theta: dict[str, torch.Tensor], query: PreferenceBatch, beta: float) -> torch.Tensor:
    """L_out(theta): DPO-style loss of the adapted policy on the domain's human pairs."""
    logp = policy.logprobs(query.batch, params=theta)
    M = query.num_pairs
    return dpo_loss(logp[:M], logp[M:], query.ref_logp[:M], query.ref_logp[M:], beta)


def inner_reward_scale(rloo: RLOOConfig):
    """Inner steps standardise by the spread of their own batch of rewards (method.md, "Reward standardisation")."""
    return "batch" if rloo.reward_norm == "std" else None


def inner_loop(policy: Policy, task: DomainTask, rewards: list[torch.Tensor], meta: MetaConfig, rloo: RLOOConfig,
               create_graph: bool = False) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """theta_0 = theta_init (or the task's warm theta_d), theta_{k+1} = theta_k - alpha g_d(theta_k, r), with
    g_d = g_rloo + demo_weight * g_demo where the task has demonstrations. Returns [theta_0..theta_K] and stats.

    With create_graph the iterates stay differentiable in the rewards (pass rewards that require grad)."""
    thetas = [{k: v.detach().requires_grad_() if create_graph else v.detach().clone().requires_grad_()
               for k, v in start_theta(policy, task).items()}]
    stats = []
    for k, samples in enumerate(task.inner):
        theta = thetas[-1]
        if not create_graph:
            theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
        r_samples, r_demos = task.candidates(k, rewards[k])
        with torch.enable_grad():  # g is a gradient even when the caller only evaluates F
            grads, st = policy_gradient(_logp_fn(policy, samples.batch), theta, r_samples, samples.ref_logp,
                                        samples.behaviour_logp, rloo.beta, samples.n, rloo.importance_clip,
                                        create_graph=create_graph, reward_scale=inner_reward_scale(rloo))
            if r_demos is not None:
                g_demo, demo_st = demonstration_gradient(_logp_fn(policy, task.demos[k].batch), theta, r_demos,
                                                         create_graph, inner_reward_scale(rloo))
                grads = {n: g + meta.demo_weight * g_demo[n] for n, g in grads.items()}
                st.update(demo_st)
        nxt = sgd_step(theta, grads, meta.inner_lr)
        thetas.append(nxt if create_graph else {n: t.detach() for n, t in nxt.items()})
        stats.append(st)
    return thetas, stats


@torch.no_grad()
def adapted_kl(policy: Policy, samples: Samples, theta: dict[str, torch.Tensor]) -> float:
    """KL(pi_theta || pi_ref) AFTER an inner step, estimated on the step's bank samples (drawn from pi_ref) as
    mean_j f(w_j), f(w) = w log w - w + 1, w = pi_theta / pi_ref: unbiased (E_ref[w] = 1) and never negative. When
    the step moves the policy off the bank's support (w -> 0) the estimate saturates near 1 nat: a sign that
    meta.inner_lr is too large, not a measurement of the true KL. Samples drawn from another policy b (a warm theta_d)
    use mean_j [v_j log w_j - v_j + pi_ref/b], v = pi_theta / b: the same estimator importance-weighted (unbiased;
    equal to the above for b = pi_ref, but no longer non-negative sample by sample)."""
    logp = policy.logprobs(samples.batch, params={k: v.detach() for k, v in theta.items()})
    ref = samples.ref_logp.to(logp.device)
    behaviour = ref if samples.behaviour_logp is None else samples.behaviour_logp.to(logp.device)
    log_w = (logp - ref).double()
    v = torch.exp((logp - behaviour).double())
    return float((v * log_w - v + torch.exp((ref - behaviour).double())).mean())


@torch.no_grad()
def reference_kl(policy: Policy, samples: Samples, theta: dict[str, torch.Tensor]) -> float:
    """KL(pi_ref || pi_theta) after a step, mean_j u_j (log pi_ref - log pi_theta)(y_j), u = pi_ref / b for samples of
    b (1 for bank samples). Beside adapted_kl: no weight pi_theta / pi_ref enters, so a step that makes a few samples
    far more likely (w >> 1, where adapted_kl's estimate explodes) still gives a usable number."""
    logp = policy.logprobs(samples.batch, params={k: v.detach() for k, v in theta.items()})
    ref = samples.ref_logp.to(logp.device)
    behaviour = ref if samples.behaviour_logp is None else samples.behaviour_logp.to(logp.device)
    return float((torch.exp((ref - behaviour).double()) * (ref - logp).double()).mean())


def step_length(theta_a: dict[str, torch.Tensor], theta_b: dict[str, torch.Tensor]) -> float:
    """||theta_b - theta_a|| over all trainable tensors (the length of the inner optimisation's path end to end)."""
    return float(torch.sqrt(sum(((theta_b[k].detach() - theta_a[k].detach()).double() ** 2).sum() for k in theta_a)))


_warned_fallback: list[bool] = []


def logprob_jvp(policy: Policy, batch: SequenceBatch, theta: dict[str, torch.Tensor],
                tangent: dict[str, torch.Tensor], method: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_theta(y_j|x), s_j = <grad_theta log pi_theta(y_j|x), tangent>) for every row.

    "forward": forward-mode AD (torch.func.jvp), about the cost of two forward passes. "double-backward": J^T u is
    built with a graph and differentiated with respect to u along `tangent` (works where an op lacks forward AD)."""
    keys = list(theta)
    if method == "forward":
        def logp_of(*tensors):
            return policy.logprobs(batch, params=dict(zip(keys, tensors)))

        try:
            with second_order():
                logp, s = torch.func.jvp(logp_of, tuple(theta[k].detach() for k in keys),
                                         tuple(tangent[k].to(theta[k].dtype) for k in keys))
            return logp.detach(), s.detach()
        except NotImplementedError as e:  # an op of this model has no forward-mode formula
            if not _warned_fallback:
                log.warning("forward-mode JVP unavailable (%s); using double backward", str(e).splitlines()[0])
                _warned_fallback.append(True)
    theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
    with second_order():
        logp = policy.logprobs(batch, params=theta)
        u = torch.zeros_like(logp, requires_grad=True)
        jt_u = torch.autograd.grad(logp, list(theta.values()), grad_outputs=u, create_graph=True)
        s = torch.autograd.grad(jt_u, u, grad_outputs=[tangent[k] for k in theta])[0]
    return logp.detach(), s


def reward_value_grads(policy: Policy, task: DomainTask, rewards: list[torch.Tensor], meta: MetaConfig,
                       rloo: RLOOConfig, timings: dict[str, float] | None = None,
                       adapted: dict[str, dict[str, torch.Tensor]] | None = None
                       ) -> tuple[list[torch.Tensor], float, list[dict]]:
    """dL_out/dr_j for the candidates of every inner step (stage 1 of the hypergradient: its samples, then its
    demonstrations), L_out(theta_K), and per-step stats (the last one also holds `kl_after` and `step_length`,
    measured at theta_K). `adapted` receives theta_K (detached) under the task's name: the warm start keeps it.

    From a warm theta_d the hypergradient is this outer step's: theta_d is a constant (truncated at theta_d)."""
    mode = resolved_hypergrad(meta)
    if mode == "unrolled":
        leaves = [r.detach().clone().requires_grad_() for r in rewards]
        with second_order(), phase(timings, "unrolled"):
            thetas, stats = inner_loop(policy, task, leaves, meta, rloo, create_graph=True)
            loss = outer_loss(policy, thetas[-1], task.query, rloo.beta)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(r) if g is None else g for r, g in zip(rewards, grads)]
        _after_step_stats(policy, task, thetas, stats, rloo.beta, adapted)
        # leverage of the first step (method.md, "Leverage"), with v at theta_K as the truncated form takes it
        theta_K = {k: v.detach().requires_grad_() for k, v in thetas[-1].items()}
        with torch.enable_grad():
            v = dict(zip(theta_K, torch.autograd.grad(outer_loss(policy, theta_K, task.query, rloo.beta),
                                                      list(theta_K.values()))))
        thetas0 = {k: t.detach() for k, t in thetas[0].items()}
        s_tilde, c_demo = step_jvps(policy, task, 0, thetas0, v, rloo)
        stats[0].update(step_leverage_stats(task, 0, s_tilde, c_demo, rewards[0], meta, rloo))
        return grads, float(loss.detach()), stats

    with phase(timings, "inner_policy_steps"):
        thetas, stats = inner_loop(policy, task, rewards, meta, rloo)
    with phase(timings, "outer_loss"):
        theta_K = {k: v.detach().requires_grad_() for k, v in thetas[-1].items()}
        loss = outer_loss(policy, theta_K, task.query, rloo.beta)
        v = dict(zip(theta_K, torch.autograd.grad(loss, list(theta_K.values()))))
    # one-step (K = 1, exact) and truncated (K > 1) both take v at theta_K and sum the per-step terms.
    grads = []
    for k, samples in enumerate(task.inner):
        with phase(timings, "jvp"):
            s_tilde, c_demo = step_jvps(policy, task, k, thetas[k], v, rloo)
        # leverage of this step (method.md, "Leverage"): H, the reward's alignment with -s~, its first-order drop
        stats[k].update(step_leverage_stats(task, k, s_tilde, c_demo, rewards[k], meta, rloo))
        r_samples, r_demos = task.candidates(k, rewards[k])
        g = meta.inner_lr / s_tilde.numel() * s_tilde  # dL/dr^_j: w.r.t. the (standardised) rewards the step used
        if inner_reward_scale(rloo) == "batch":
            g = pull_back_standardisation(g, r_samples.to(g.dtype))
        if c_demo is not None:  # theta_{k+1} = theta_k + alpha w / M sum_m r^_m grad log pi(y_m): dL/dr^_m below
            g_demo = meta.inner_lr * meta.demo_weight / c_demo.numel() * c_demo
            g = torch.cat([g, pull_back_centred_standardisation(g_demo, r_demos.to(g.dtype),
                                                                inner_reward_scale(rloo))])
        grads.append(g)
    with phase(timings, "inner_policy_steps"):
        _after_step_stats(policy, task, thetas, stats, rloo.beta, adapted)
    return grads, float(loss.detach()), stats


def centred_jvps(policy: Policy, samples: Samples, theta: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
                  rloo: RLOOConfig) -> torch.Tensor:
    """s~: s_j = w_j <grad_theta log pi_theta(y_j|x), v>, leave-one-out centred within each prompt's samples."""
    logp, s = logprob_jvp(policy, samples.batch, theta, v)
    s = importance_weights(logp, samples.behaviour_logp, rloo.importance_clip) * s
    return rloo_advantages(s.reshape(-1, samples.n)).reshape(-1)


def step_jvps(policy: Policy, task: DomainTask, k: int, theta: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
              rloo: RLOOConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s~ of step k's samples, c of its demonstrations or None): c_m = s_m - mean s, s_m = <grad_theta log
    pi_theta(y_m|x_m), v> (no importance weight: a demonstration is not a sample; centred over the set, the
    demonstrations' own baseline)."""
    s_tilde = centred_jvps(policy, task.inner[k], theta, v, rloo)
    demos = task.demos_of(k)
    if demos is None:
        return s_tilde, None
    s_demo = logprob_jvp(policy, demos.batch, theta, v)[1]
    return s_tilde, s_demo - s_demo.mean()


def step_leverage_stats(task: DomainTask, k: int, s_tilde: torch.Tensor, c_demo: torch.Tensor | None,
                        rewards: torch.Tensor, meta: MetaConfig, rloo: RLOOConfig) -> dict[str, float]:
    """leverage.step_stats of step k for its candidates' rewards (samples, then demonstrations)."""
    r_samples, r_demos = task.candidates(k, rewards)
    demos = None if c_demo is None else (c_demo, r_demos, meta.demo_weight)
    return step_stats(s_tilde, r_samples, meta.inner_lr, task.inner[k].n, rloo.reward_norm, demos)


def _after_step_stats(policy: Policy, task: DomainTask, thetas: list[dict], stats: list[dict], beta: float,
                      adapted: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    if adapted is not None:  # theta_K, for the warm start
        adapted[task.name] = {k: t.detach() for k, t in thetas[-1].items()}
    stats[-1]["kl_after"] = adapted_kl(policy, task.inner[-1], thetas[-1])
    stats[-1]["step_length"] = step_length(thetas[0], thetas[-1])
    # the outer loss before the inner step (at theta_0): beside L_out(theta_K) it shows whether the step under r_phi
    # moves the policy towards the domain's human preferences at all (a diagnostic; one forward on the query pairs)
    with torch.no_grad():
        stats[-1]["outer_loss_before"] = float(outer_loss(policy, thetas[0], task.query, beta))
    # how far a warm theta_d already is from pi_ref (0 from theta_init, which is pi_ref)
    stats[-1]["kl_start"] = 0.0 if task.theta_start is None else adapted_kl(policy, task.inner[0], thetas[0])


def _flat_grads(output: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, params, allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))) if tensors else 0.0


def meta_gradient(policy: Policy, rm: RewardModel, tasks: list[DomainTask], meta: MetaConfig, rloo: RLOOConfig,
                  scale: float | None = None, timings: dict[str, float] | None = None,
                  backward: Callable[[torch.Tensor], None] | None = None,
                  parts: dict[str, list[torch.Tensor]] | None = None,
                  adapted: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
    """Accumulate dF/dphi into the reward model's .grad for a meta-batch of domains; return stats.

        dF/dphi = sum_d [ hypergradient_d + lambda_bt * grad BT_d ] / scale

    `scale` divides each domain's contribution (default: the number of domains here; the distributed trainer passes
    the global meta-batch size so that summing over processes gives the mean). The two terms are computed apart so
    that their sizes can be compared (stats `hypergrad_term_norm`, `bt_term_norm` = ||lambda_bt grad BT|| and their
    ratio `grad_ratio`); pass a dict as `parts` to receive the two terms themselves under "hyper" and "bt" (= lambda_bt
    grad BT; the trainer all-reduces them to log the norms and ratio of the global sums). `backward`: None writes into
    .grad directly; a callable receives the summed surrogate of the meta-batch in one call (DeepSpeed ZeRO reduces
    gradients once per backward and its backward also takes the optimiser step); the two terms are then not
    measured apart (ZeRO hooks every gradient of its parameters) and their norms are None. `adapted` receives every
    task's theta_K by name (the warm start stores them back)."""
    scale = float(scale or len(tasks))
    params = [p for p in getattr(rm, "model", rm).parameters() if p.requires_grad]  # RewardModel or a bare module
    hyper = [torch.zeros_like(p) for p in params]
    bt_grad = [torch.zeros_like(p) for p in params]
    keys = ("outer_loss", "outer_loss_before", "bt_loss", "query_accuracy", "inner_reward", "inner_reward_std",
            "inner_kl", "inner_kl_start", "inner_step_length", "inner_iw_std", "headroom", "alignment",
            "first_order_drop")
    out = dict.fromkeys(keys, 0.0)
    pending: list[torch.Tensor] = []
    for task in tasks:
        with phase(timings, "rm_forward"):
            rewards = candidate_rewards(rm, task)  # RM graph kept apart from the policy's
        dL_dr, loss, stats = reward_value_grads(policy, task, [r.detach() for r in rewards], meta, rloo, timings,
                                                adapted)
        with phase(timings, "rm_backward"):
            surrogate = sum((g.to(r.device, r.dtype) * r).sum() for g, r in zip(dL_dr, rewards)) / scale
            r_c = rm.forward_encoded(task.query.rm_chosen)
            r_r = rm.forward_encoded(task.query.rm_rejected)
            bt = bradley_terry_loss(r_c, r_r)
            if backward is not None:
                # DeepSpeed: ZeRO hooks every gradient of its parameters, so no separate torch.autograd.grad here;
                # the two terms are not measured apart (their norms are reported as None)
                pending.append(surrogate + meta.lambda_bt * bt / scale)
            else:
                for acc, g in zip(hyper, _flat_grads(surrogate, params)):
                    acc.add_(g)
                if meta.lambda_bt > 0:
                    for acc, g in zip(bt_grad, _flat_grads(bt / scale, params)):
                        acc.add_(g)
        out["outer_loss"] += loss / len(tasks)
        out["outer_loss_before"] += stats[-1]["outer_loss_before"] / len(tasks)
        out["bt_loss"] += float(bt.detach()) / len(tasks)
        out["query_accuracy"] += pair_accuracy(r_c.detach(), r_r.detach()) / len(tasks)
        out["inner_reward"] += stats[0]["reward"] / len(tasks)
        out["inner_reward_std"] += stats[0]["reward_std"] / len(tasks)
        out["inner_kl"] += stats[-1]["kl_after"] / len(tasks)
        out["inner_kl_start"] += stats[-1]["kl_start"] / len(tasks)
        out["inner_step_length"] += stats[-1]["step_length"] / len(tasks)
        # the spread of pi_theta_k / pi_behaviour at the last inner step (0 at K = 1: its samples are on-policy)
        out["inner_iw_std"] += stats[-1]["iw_std"] / len(tasks)
        for key in ("headroom", "alignment", "first_order_drop"):  # of the first inner step
            out[key] += stats[0][key] / len(tasks)
    if backward is None:
        for p, h, b in zip(params, hyper, bt_grad):
            g = h + meta.lambda_bt * b
            p.grad = g if p.grad is None else p.grad + g
    elif pending:
        with phase(timings, "rm_backward"):
            backward(torch.stack(pending).sum())
    if backward is None:
        out.update(gradient_term_norms(hyper, [meta.lambda_bt * b for b in bt_grad]))
        if parts is not None:
            parts["hyper"] = hyper
            parts["bt"] = [meta.lambda_bt * b for b in bt_grad]
    else:
        out.update({"hypergrad_term_norm": None, "bt_term_norm": None, "grad_ratio": None})
    return out


def gradient_term_norms(hyper: list[torch.Tensor], bt_term: list[torch.Tensor]) -> dict[str, float]:
    """||hypergradient||, ||lambda_bt grad BT|| and their ratio (method.md: the two terms must be of comparable size;
    the ratio is None when the BT term is zero, e.g. lambda_bt = 0)."""
    h, b = _norm(hyper), _norm(bt_term)
    return {"hypergrad_term_norm": h, "bt_term_norm": b, "grad_ratio": h / b if b > 0 else None}


@torch.no_grad()
def _rewards(rm: RewardModel, task: DomainTask) -> list[torch.Tensor]:
    return candidate_rewards(rm, task)


def inner_step_effect(policy: Policy, rm: RewardModel, task: DomainTask, meta: MetaConfig,
                      rloo: RLOOConfig) -> dict[str, float]:
    """What the inner loop under r_phi does for one domain (no gradient; method.md, "Statistics and evidence"):
    L_out at theta_0 (pi_ref) and at theta_K, the step's length ||theta_K - theta_0|| and the KL after it. A reward
    model that generalises its meta-objective lowers L_out on domains it was not trained on."""
    thetas, stats = inner_loop(policy, task, _rewards(rm, task), meta, rloo)
    _after_step_stats(policy, task, thetas, stats, rloo.beta)
    with torch.no_grad():
        after = float(outer_loss(policy, thetas[-1], task.query, rloo.beta))
    return {"outer_loss_before": stats[-1]["outer_loss_before"], "outer_loss_after": after,
            "step_length": stats[-1]["step_length"], "kl_after": stats[-1]["kl_after"]}


def meta_objective(policy: Policy, rm: RewardModel, tasks: list[DomainTask], meta: MetaConfig,
                   rloo: RLOOConfig) -> float:
    """F(phi) itself (no gradient): for finite-difference checks and for "does a step lower the loss"."""
    total = 0.0
    for task in tasks:
        thetas, _ = inner_loop(policy, task, _rewards(rm, task), meta, rloo)
        with torch.no_grad():
            loss = float(outer_loss(policy, thetas[-1], task.query, rloo.beta))
            bt = float(bradley_terry_loss(rm.forward_encoded(task.query.rm_chosen),
                                          rm.forward_encoded(task.query.rm_rejected)))
        total += loss + meta.lambda_bt * bt
    return total / len(tasks)


def step_leverage(policy: Policy, task: DomainTask, rewards: dict[str, torch.Tensor], meta: MetaConfig,
                  rloo: RLOOConfig, oracle: bool = True) -> dict:
    """Leverage of the task's first inner step at its theta_0 (theta_init, or the task's warm theta_d; method.md,
    "Leverage"; formulas in leverage.py), for every named reward of its candidates (the samples, then the
    demonstrations where the task has them; e.g. {"erm-rm": r, "gold": g}) and the oracle reward (-s~, then -c):

        {"headroom", "floor", "outer_loss_before", "num_samples", "num_demos",
         "<name>": {"alignment", "first_order_drop", "real_drop", "kl_after", "step_length"}}

    real_drop = L_out(theta_0) - L_out(theta_1) of the real step (inner_loop, K = 1; positive = lower loss). With
    demonstrations H is that of the whole step (leverage.step_stats), and "headroom_samples" / "headroom_demos" and
    each reward's "alignment_samples" / "alignment_demos" are given beside it."""
    import copy

    from oodpl.core.leverage import oracle_reward

    samples, demos = task.inner[0], task.demos_of(0)
    theta = {k: v.detach().requires_grad_() for k, v in start_theta(policy, task).items()}
    with torch.enable_grad():
        loss = outer_loss(policy, theta, task.query, rloo.beta)
        v = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
    theta = {k: t.detach() for k, t in theta.items()}
    s_tilde, c_demo = step_jvps(policy, task, 0, theta, v, rloo)
    before = float(loss.detach())
    one = copy.copy(meta)
    one.inner_steps = 1
    first = DomainTask(task.name, task.inner[:1], task.query, task.demos[:1] if task.demos else None,
                       task.theta_start)
    candidates = [s_tilde] if c_demo is None else [s_tilde, c_demo]
    oracle_r = torch.cat([oracle_reward(c) for c in candidates])
    figures = step_leverage_stats(first, 0, s_tilde, c_demo, oracle_r.to(samples.ref_logp), one, rloo)
    out: dict = {"headroom": figures["headroom"], "floor": figures["alignment_floor"],
                 "outer_loss_before": before, "num_samples": s_tilde.numel(),
                 "num_demos": 0 if demos is None else len(demos.ref_logp)}
    out.update({k: figures[k] for k in ("headroom_samples", "headroom_demos") if k in figures})
    named = ({"oracle": oracle_r} if oracle else {}) | dict(rewards)
    for name, r in named.items():
        r = r.detach().to(samples.ref_logp).reshape(-1)
        thetas, _ = inner_loop(policy, first, [r], one, rloo)
        with torch.no_grad():
            after = float(outer_loss(policy, thetas[-1], task.query, rloo.beta))
        figures = step_leverage_stats(first, 0, s_tilde, c_demo, r, one, rloo)
        out[name] = {"alignment": figures["alignment"], "first_order_drop": figures["first_order_drop"],
                     **{k: figures[k] for k in ("alignment_samples", "alignment_demos") if k in figures},
                     "real_drop": before - after, "kl_after": adapted_kl(policy, samples, thetas[-1]),
                     "kl_ref_after": reference_kl(policy, samples, thetas[-1]),
                     "step_length": step_length(thetas[0], thetas[-1])}
    return out
