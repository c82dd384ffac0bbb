"""The toy problem of method.md: a tabular softmax policy over a few responses per prompt and a linear reward model,
where every quantity of the bilevel method has a closed form.

    pi_theta(y|x) = softmax(theta[x])_y,   theta in R^{X x Y},   theta_0 = ref_logits  (so pi_theta0 = pi_ref)
    r_phi(x, y)   = phi . f(x, y),         f fixed features in R^{X x Y x D}

`TabularPolicy` and `LinearRM` satisfy the interfaces that the bilevel core (bilevel.py, policy_opt.py) expects, so
the core runs on them unchanged; the builders below make `Samples`, `PreferenceBatch` and `DomainTask` objects.

The closed forms (all float64, none of them calls the core):
  - `exact_inner_gradient`: grad_theta L_in = -1/B sum_x pi(.|x) * (R_x - E_pi R_x),  R = r - beta (log pi - log ref)
  - `expected_rloo_gradient`: the expectation of the core's RLOO estimate over all Y^n sample tuples per prompt
    (enumerated, weighted by their probability); equals the line above (RLOO is unbiased: the KL-shaped reward is a
    stopped constant and E_pi grad log pi = 0)
  - `kl_optimal_logits`: pi* = pi_ref exp(r / beta) / Z, at which L_out equals the plain Bradley-Terry loss of r
  - `closed_form_value_grads` / `closed_form_meta_gradient`: the hypergradient derived by hand for tabular softmax
    (numpy), in the `truncated` (= `one-step` at K = 1) and exact `unrolled` forms, for a fixed set of samples
  - `exact_meta_objective`: F(phi) = E_samples[L_out(theta_K(phi))] + lambda_bt BT exactly, by enumerating every
    sample tuple of every inner step (the samples are drawn from pi_ref, as from the core's sample bank), vectorised
    and differentiable in phi: its autograd gradient is the true hypergradient grad F used by theory.py.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodpl.core.bilevel import DomainTask, PreferenceBatch
from oodpl.config import MetaConfig, RLOOConfig, resolved_hypergrad
from oodpl.core.policy_opt import policy_gradient
from oodpl.models.sampling import Samples

Pair = tuple[int, int, int]  # (x, y_chosen, y_rejected)


# ----------------------------------------------------------------------------------------------- policy and RM
@dataclass
class ToyBatch:
    """Rows of (prompt index, response index); the toy's stand-in for a tokenised SequenceBatch."""

    x: torch.Tensor  # [N] long
    y: torch.Tensor  # [N] long

    def __len__(self) -> int:
        return int(self.x.shape[0])


def toy_batch(x, y) -> ToyBatch:
    return ToyBatch(torch.as_tensor(x, dtype=torch.long).reshape(-1), torch.as_tensor(y, dtype=torch.long).reshape(-1))


class TabularPolicy:
    """pi_theta(y|x) = softmax(theta["logits"][x])_y; pi_ref = softmax(ref_logits); theta_init = ref_logits."""

    def __init__(self, ref_logits: torch.Tensor):
        if ref_logits.ndim != 2:
            raise ValueError("ref_logits must be [X, Y]")
        self.ref_logits = ref_logits.detach().clone()

    @property
    def num_prompts(self) -> int:
        return self.ref_logits.shape[0]

    @property
    def num_responses(self) -> int:
        return self.ref_logits.shape[1]

    def theta_init(self) -> dict[str, torch.Tensor]:
        return {"logits": self.ref_logits.clone()}

    def log_probs_table(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        logits = self.ref_logits if params is None else params["logits"]
        return torch.log_softmax(logits, dim=-1)

    def logprobs(self, batch: ToyBatch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """log pi_theta(y|x) for every row of `batch` (pi_ref when params is None)."""
        return self.log_probs_table(params)[batch.x, batch.y]


class LinearRM(nn.Module):
    """r_phi(x, y) = phi . features[x, y]; phi is the only parameter (an nn.Parameter, so backward fills .grad)."""

    def __init__(self, features: torch.Tensor, phi: torch.Tensor | None = None):
        super().__init__()
        if features.ndim != 3:
            raise ValueError("features must be [X, Y, D]")
        self.register_buffer("features", features.detach().clone())
        init = torch.zeros(features.shape[-1], dtype=features.dtype) if phi is None else phi.detach().clone()
        self.phi = nn.Parameter(init.to(features.dtype))

    def encode(self, x, y) -> dict[str, torch.Tensor]:
        b = toy_batch(x, y)
        return {"features": self.features[b.x, b.y]}

    def forward_encoded(self, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
        return encoding["features"] @ self.phi

    def rewards_table(self) -> torch.Tensor:
        """r_phi(x, y) for every (x, y): [X, Y] (differentiable in phi)."""
        return self.features @ self.phi


# ------------------------------------------------------------------------------------------------- builders
def make_samples(policy: TabularPolicy, rm: LinearRM | None, prompts: list[int], responses,
                 behaviour_logits: torch.Tensor | None = None) -> Samples:
    """Samples for prompts [B] with given responses [B, n] (prompt-major). The samples are taken to come from
    softmax(behaviour_logits) (default: pi_ref, as from the core's sample bank)."""
    responses = torch.as_tensor(responses, dtype=torch.long)
    if responses.ndim != 2 or responses.shape[0] != len(prompts):
        raise ValueError("responses must be [B, n] for B prompts")
    n = responses.shape[1]
    xs = torch.as_tensor(prompts, dtype=torch.long).repeat_interleave(n)
    batch = toy_batch(xs, responses.reshape(-1))
    ref_logp = policy.logprobs(batch).detach()
    if behaviour_logits is None:
        beh = ref_logp.clone()
    else:
        beh = torch.log_softmax(behaviour_logits.detach(), -1)[batch.x, batch.y]
    enc = rm.encode(batch.x, batch.y) if rm is not None else None
    return Samples([str(int(p)) for p in prompts], [str(int(y)) for y in batch.y], batch, ref_logp, beh, n, enc)


def draw_responses(logits: torch.Tensor, prompts: list[int], n: int, generator: torch.Generator) -> torch.Tensor:
    """[B, n] responses y ~ softmax(logits[x]) for each prompt x."""
    probs = torch.softmax(logits[torch.as_tensor(prompts, dtype=torch.long)].detach(), -1)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def human_pairs(human_reward: torch.Tensor, prompts: list[int], generator: torch.Generator | None = None
                ) -> list[Pair]:
    """Every unordered pair of responses for each prompt, labelled by the ground-truth "human" reward: the higher
    reward wins (deterministic), or, with a generator, the winner is drawn from Bradley-Terry(human_reward)."""
    pairs: list[Pair] = []
    Y = human_reward.shape[1]
    for x in prompts:
        for a, b in itertools.combinations(range(Y), 2):
            ra, rb = float(human_reward[x, a]), float(human_reward[x, b])
            if generator is None:
                a_wins = ra > rb if ra != rb else a < b
            else:
                a_wins = bool(torch.rand((), generator=generator, dtype=torch.float64) < 1 / (1 + np.exp(rb - ra)))
            pairs.append((x, a, b) if a_wins else (x, b, a))
    return pairs


def make_preference_batch(policy: TabularPolicy, rm: LinearRM, pairs: list[Pair]) -> PreferenceBatch:
    x = [p[0] for p in pairs]
    yw = [p[1] for p in pairs]
    yl = [p[2] for p in pairs]
    batch = toy_batch(x + x, yw + yl)
    return PreferenceBatch(batch, policy.logprobs(batch).detach(), rm.encode(x, yw), rm.encode(x, yl))


def make_task(name: str, policy: TabularPolicy, rm: LinearRM, prompts: list[int], pairs: list[Pair], *,
              responses: list | None = None, inner_steps: int = 1, n: int = 2,
              generator: torch.Generator | None = None) -> DomainTask:
    """A toy DomainTask: `inner_steps` batches of samples on `prompts` (given explicitly as a list of [B, n]
    response tensors, or drawn from pi_ref with `generator`) and the human pairs as the query."""
    if responses is None:
        if generator is None:
            raise ValueError("give responses or a generator to draw them from pi_ref")
        responses = [draw_responses(policy.ref_logits, prompts, n, generator) for _ in range(inner_steps)]
    inner = [make_samples(policy, rm, prompts, r) for r in responses]
    return DomainTask(name, inner, make_preference_batch(policy, rm, pairs))


@dataclass
class ToyProblem:
    """A toy OOD-PL problem: domains of prompts, fixed RM features, a ground-truth human reward and its pairs."""

    policy: TabularPolicy
    features: torch.Tensor  # [X, Y, D]
    human_reward: torch.Tensor  # [X, Y]
    domains: list[list[int]]  # prompt indices per domain
    pairs: list[list[Pair]]  # human pairs per domain
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)  # exact_meta_objective's plans

    def rm(self, phi: torch.Tensor | None = None) -> LinearRM:
        return LinearRM(self.features, phi)

    def tasks(self, rm: LinearRM, inner_steps: int, n: int, generator: torch.Generator) -> list[DomainTask]:
        """One outer step's meta-batch (all domains), with fresh pi_ref samples for every inner step."""
        return [make_task(f"d{d}", self.policy, rm, prompts, self.pairs[d], inner_steps=inner_steps, n=n,
                          generator=generator) for d, prompts in enumerate(self.domains)]


def make_problem(seed: int = 0, num_domains: int = 2, prompts_per_domain: int = 3, num_responses: int = 4,
                 num_features: int = 3, ref_scale: float = 0.5, misspecification: float = 0.5) -> ToyProblem:
    """Random toy problem (float64). The human reward is a linear function of the RM features plus a
    `misspecification` term the RM cannot represent, so the RM has a finite best fit."""
    g = torch.Generator().manual_seed(seed)
    X = num_domains * prompts_per_domain
    dt = torch.float64
    ref_logits = ref_scale * torch.randn(X, num_responses, generator=g, dtype=dt)
    features = torch.randn(X, num_responses, num_features, generator=g, dtype=dt)
    phi_true = torch.randn(num_features, generator=g, dtype=dt)
    human = features @ phi_true + misspecification * torch.randn(X, num_responses, generator=g, dtype=dt)
    domains = [list(range(d * prompts_per_domain, (d + 1) * prompts_per_domain)) for d in range(num_domains)]
    pairs = [human_pairs(human, dom) for dom in domains]
    return ToyProblem(TabularPolicy(ref_logits), features, human, domains, pairs,
                      {"seed": seed, "phi_true": phi_true.tolist(), "misspecification": misspecification})


# ------------------------------------------------------------------------------------ closed forms: inner problem
def inner_objective(logits: torch.Tensor, ref_logits: torch.Tensor, rewards: torch.Tensor, beta: float,
                    prompts: list[int]) -> torch.Tensor:
    """L_in(theta) = -1/B sum_{x in prompts} [E_pi r(x, .) - beta KL(pi(.|x) || pi_ref(.|x))] (exact)."""
    idx = torch.as_tensor(prompts, dtype=torch.long)
    logp = torch.log_softmax(logits, -1)[idx]
    ref = torch.log_softmax(ref_logits, -1)[idx]
    p = logp.exp()
    return -((p * (rewards[idx] - beta * (logp - ref))).sum(-1)).mean()


def exact_inner_gradient(logits: torch.Tensor, ref_logits: torch.Tensor, rewards: torch.Tensor, beta: float,
                         prompts: list[int]) -> torch.Tensor:
    """grad_theta L_in, by hand: row x gets -1/B pi(.|x) (R(x,.) - E_pi R(x,.)), R = r - beta log(pi/pi_ref).
    (The derivative of the KL's log pi inside the expectation vanishes because E_pi grad log pi = 0.)"""
    logits = logits.detach()
    logp = torch.log_softmax(logits, -1)
    ref = torch.log_softmax(ref_logits, -1)
    p = logp.exp()
    R = rewards.detach() - beta * (logp - ref)
    row = -p * (R - (p * R).sum(-1, keepdim=True))
    out = torch.zeros_like(logits)
    for x in prompts:
        out[x] += row[x] / len(prompts)
    return out


def expected_rloo_gradient(policy: TabularPolicy, rewards: torch.Tensor, logits: torch.Tensor, prompts: list[int],
                           n: int, beta: float, behaviour_logits: torch.Tensor | None = None,
                           clip: float | None = None) -> torch.Tensor:
    """E[core policy_gradient] over every n-tuple of samples of every prompt, each weighted by its probability under
    softmax(behaviour_logits) (default: the policy itself, i.e. on-policy samples). The core estimate for B prompts is
    the mean of its one-prompt estimates, so the expectation is enumerated per prompt and averaged."""
    beh = logits if behaviour_logits is None else behaviour_logits
    beh_logp = torch.log_softmax(beh.detach(), -1)
    Y = policy.num_responses
    total = torch.zeros_like(logits)
    for x in prompts:
        for tup in itertools.product(range(Y), repeat=n):
            s = make_samples(policy, None, [x], [list(tup)], behaviour_logits=beh)
            theta = {"logits": logits.detach().clone().requires_grad_()}
            r = rewards[s.batch.x, s.batch.y].detach()
            g, _ = policy_gradient(lambda th, b=s.batch: policy.logprobs(b, th), theta, r, s.ref_logp,
                                   s.behaviour_logp, beta, n, clip)
            prob = float(beh_logp[x, list(tup)].sum().exp())
            total += prob * g["logits"] / len(prompts)
    return total


def kl_optimal_logits(ref_logits: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi*, pi* = pi_ref exp(r/beta) / Z: the minimiser of L_in over all policies (normalised logits)."""
    return torch.log_softmax(torch.log_softmax(ref_logits, -1) + rewards / beta, -1)


def pairs_bt_loss(rewards: torch.Tensor, pairs: list[Pair]) -> torch.Tensor:
    """Plain Bradley-Terry loss of a reward table on pairs."""
    x = torch.tensor([p[0] for p in pairs])
    w = torch.tensor([p[1] for p in pairs])
    lo = torch.tensor([p[2] for p in pairs])
    return -F.logsigmoid(rewards[x, w] - rewards[x, lo]).mean()


# ------------------------------------------------------------------------ closed forms: hand-derived hypergradient
def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64) if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    m = a.max(-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _loo(v: np.ndarray, n: int) -> np.ndarray:
    g = v.reshape(-1, n)
    return (g - (g.sum(-1, keepdims=True) - g) / (n - 1)).reshape(-1)


class _Step:
    """One RLOO step of the tabular policy on fixed samples, by hand (numpy)."""

    def __init__(self, theta: np.ndarray, xs, ys, ref_logp, beh_logp, rewards, n, beta, clip):
        self.theta, self.xs, self.ys, self.n, self.beta = theta, xs, ys, n, beta
        self.N = len(xs)
        logp_tab = _log_softmax(theta)
        self.pi = np.exp(logp_tab)
        self.logp = logp_tab[xs, ys]
        w_raw = np.exp(self.logp - beh_logp)
        self.clipped = np.zeros_like(w_raw, bool) if clip is None else w_raw > clip
        self.w = np.where(self.clipped, clip if clip is not None else 0.0, w_raw)
        R = rewards - beta * (self.logp - ref_logp)
        self.A = _loo(R, n)
        self.c = -self.w * self.A / self.N
        self.G = [self.grad_logp(j) for j in range(self.N)]
        self.g = sum(c * G for c, G in zip(self.c, self.G))

    def grad_logp(self, j) -> np.ndarray:
        """grad_theta log pi(y_j|x_j) = e_x (e_y - pi(.|x))^T."""
        G = np.zeros_like(self.theta)
        G[self.xs[j]] = -self.pi[self.xs[j]]
        G[self.xs[j], self.ys[j]] += 1.0
        return G

    def s(self, tangent: np.ndarray) -> np.ndarray:
        """s_j = w_j <grad log pi(y_j|x_j), tangent>."""
        return self.w * np.array([(G * tangent).sum() for G in self.G])

    def jt_vec(self, u: np.ndarray) -> np.ndarray:
        """J^T u with J = d g / d theta (the coefficients depend on theta through w_j and the KL term):
        g = sum_j c_j G_j,  grad c_j = -(A_j grad w_j + w_j grad A_j) / N,  grad w_j = w_j G_j (0 where clipped),
        grad A_j = -beta (G_j - mean_{i != j in the group} G_i),
        grad G_j = H_j = -e_x e_x^T (diag pi_x - pi_x pi_x^T)."""
        n = self.n
        Gu = np.array([(G * u).sum() for G in self.G])
        out = np.zeros_like(self.theta)
        for j in range(self.N):
            grp = range((j // n) * n, (j // n + 1) * n)
            grad_w = np.zeros_like(self.theta) if self.clipped[j] else self.w[j] * self.G[j]
            grad_A = -self.beta * (self.G[j] - sum(self.G[i] for i in grp if i != j) / (n - 1))
            grad_c = -(self.A[j] * grad_w + self.w[j] * grad_A) / self.N
            out += grad_c * Gu[j]
            x = self.xs[j]
            Hu = np.zeros_like(self.theta)
            p = self.pi[x]
            Hu[x] = -(p * u[x] - p * (p @ u[x]))
            out += self.c[j] * Hu
        return out


def _outer_loss_and_grad(theta: np.ndarray, ref_logits: np.ndarray, pairs_x, yw, yl, beta: float):
    """L_out(theta) and grad_theta L_out, by hand."""
    logp = _log_softmax(theta)
    ref = _log_softmax(ref_logits)
    z = beta * ((logp[pairs_x, yw] - ref[pairs_x, yw]) - (logp[pairs_x, yl] - ref[pairs_x, yl]))
    M = len(pairs_x)
    loss = float(np.mean(np.log1p(np.exp(-z))))
    v = np.zeros_like(theta)
    for x, a, b, zz in zip(pairs_x, yw, yl, z):
        coef = -_sigmoid(-zz) * beta / M  # d loss / d (logp_w - logp_l)
        v[x, a] += coef
        v[x, b] -= coef  # the -pi terms of the two log-prob gradients cancel
    return loss, v


def closed_form_value_grads(policy: TabularPolicy, task: DomainTask, rewards: list, inner_lr: float, beta: float,
                            clip: float | None, mode: str) -> tuple[list[np.ndarray], float]:
    """dL_out(theta_K)/dr_j for every inner sample, derived by hand (numpy, no autograd):
    dL/dr_m at step k = alpha/(B n) * [loo-centred w s]_m with s_j = <grad log pi_theta_k(y_j|x_j), u_{k+1}>;
    `truncated` (and `one-step`) take u_{k+1} = v = grad L_out(theta_K); `unrolled` back-propagates
    u_k = (I - alpha J_k)^T u_{k+1} from u_K = v."""
    if mode not in ("one-step", "truncated", "unrolled"):
        raise ValueError(mode)
    theta = _np(policy.ref_logits)
    steps = []
    for s, r in zip(task.inner, rewards):
        st = _Step(theta, _np(s.batch.x).astype(int), _np(s.batch.y).astype(int), _np(s.ref_logp),
                   _np(s.behaviour_logp), _np(r), s.n, beta, clip)
        steps.append(st)
        theta = theta - inner_lr * st.g
    q = task.query
    M = q.num_pairs
    qx = _np(q.batch.x).astype(int)
    qy = _np(q.batch.y).astype(int)
    loss, v = _outer_loss_and_grad(theta, _np(policy.ref_logits), qx[:M], qy[:M], qy[M:], beta)
    grads = [None] * len(steps)
    u = v
    for k in reversed(range(len(steps))):
        st = steps[k]
        tangent = u if mode == "unrolled" else v
        grads[k] = inner_lr / st.N * _loo(st.s(tangent), st.n)
        if mode == "unrolled":
            u = u - inner_lr * st.jt_vec(u)
    return grads, loss


def closed_form_meta_gradient(policy: TabularPolicy, features: torch.Tensor, phi: torch.Tensor,
                              tasks: list[DomainTask], inner_lr: float, beta: float, clip: float | None, mode: str,
                              lambda_bt: float = 0.0) -> tuple[np.ndarray, float]:
    """dF/dphi and F for a meta-batch with fixed samples, by hand:
    dF/dphi = mean_d [ sum_k sum_j dL/dr_j f(x_j, y_j) + lambda_bt * dBT/dphi ],
    dBT/dphi = -1/M sum_pairs sigmoid(-(r_w - r_l)) (f_w - f_l)."""
    f = _np(features)
    ph = _np(phi)
    r_tab = f @ ph
    grad = np.zeros_like(ph)
    total = 0.0
    for task in tasks:
        rewards = [r_tab[_np(s.batch.x).astype(int), _np(s.batch.y).astype(int)] for s in task.inner]
        dL_dr, loss = closed_form_value_grads(policy, task, rewards, inner_lr, beta, clip, mode)
        for s, g in zip(task.inner, dL_dr):
            grad += (g[:, None] * f[_np(s.batch.x).astype(int), _np(s.batch.y).astype(int)]).sum(0) / len(tasks)
        q = task.query
        M = q.num_pairs
        qx = _np(q.batch.x).astype(int)
        qy = _np(q.batch.y).astype(int)
        x, a, b = qx[:M], qy[:M], qy[M:]
        d = r_tab[x, a] - r_tab[x, b]
        bt = float(np.mean(np.log1p(np.exp(-d))))
        grad += lambda_bt * (-(_sigmoid(-d)[:, None] * (f[x, a] - f[x, b])).mean(0)) / len(tasks)
        total += (loss + lambda_bt * bt) / len(tasks)
    return grad, total


# ------------------------------------------------------------------ exact expected meta-objective (for theory.py)
def _exact_plan(problem: ToyProblem, n: int, K: int) -> dict:
    """Everything in exact_meta_objective that does not depend on phi, computed once per (problem, n, K)."""
    key = ("exact_plan", n, K)
    if key in problem.cache:
        return problem.cache[key]
    policy = problem.policy
    ref_tab = policy.log_probs_table()
    idx, log_mult = _all_tuples(policy.num_responses, n, K)  # [T, K, n], [T]
    D = len(problem.domains)
    # every (domain, prompt) row of every domain at once: rows [P], step scale 1/(B_d n), pair weights 1/(D M_d)
    rows, scale, pos = [], [], {}
    for d, prompts in enumerate(problem.domains):
        if len(set(prompts)) != len(prompts):
            raise ValueError("exact_meta_objective needs distinct prompts per domain")
        for x in prompts:
            pos[d, x] = len(rows)
            rows.append(x)
            scale.append(1.0 / (len(prompts) * n))
    pr, a, b, wt = [], [], [], []
    for d, pairs in enumerate(problem.pairs):
        for x, yw, yl in pairs:
            if (d, x) not in pos:
                raise ValueError(f"pair on prompt {x} outside domain {d}'s prompts")
            pr.append(pos[d, x])
            a.append(yw)
            b.append(yl)
            wt.append(1.0 / (D * len(pairs)))
    xs = torch.tensor(rows, dtype=torch.long)
    ref = ref_tab[xs]
    plan = {"idx": idx, "xs": xs, "ref": ref, "step_scale": torch.tensor(scale, dtype=ref.dtype).view(-1, 1, 1),
            "prob": (ref[:, idx].sum((-1, -2)) + log_mult.to(ref.dtype)).exp(),  # [P, T] under pi_ref
            "pr": torch.tensor(pr), "a": torch.tensor(a), "b": torch.tensor(b),
            "wt": torch.tensor(wt, dtype=ref.dtype)}
    problem.cache[key] = plan
    return plan


def exact_meta_objective(problem: ToyProblem, rm: LinearRM, inner_steps: int, n: int, inner_lr: float, beta: float,
                         clip: float | None = None, lambda_bt: float = 0.0) -> torch.Tensor:
    """F(phi) = mean_d E[L_out^d(theta_K)] + lambda_bt mean_d BT_d exactly, the expectation over every sample of
    every inner step (n per prompt per step, drawn from pi_ref as from the core's bank, importance-weighted and
    clipped at `clip` like the core). The policy is tabular and the core's RLOO step for a domain of B prompts
    updates row x by its own samples only (scaled by 1/(B n)), so theta_K[x] depends on prompt x's Y^(nK) sample
    tuples alone and E[L_out] is a sum of per-prompt enumerations. Differentiable in rm.phi (torch autograd)."""
    plan = _exact_plan(problem, n, inner_steps)
    policy = problem.policy
    idx, xs, prob = plan["idx"], plan["xs"], plan["prob"]
    P, T, Y = len(xs), idx.shape[0], policy.num_responses
    r_tab = rm.rewards_table()
    step_scale = plan["step_scale"].to(r_tab.dtype)
    ref = plan["ref"]  # [P, Y]
    r = r_tab[xs]  # [P, Y]
    # layout [P, Y, T] (tuples last): reductions over the few responses then run over contiguous memory
    theta = policy.ref_logits[xs].unsqueeze(-1).expand(P, Y, T)
    ref3 = ref.unsqueeze(-1).expand(P, Y, T)
    r3 = r.unsqueeze(-1).expand(P, Y, T)
    for k in range(inner_steps):
        y = idx[:, k, :].T.unsqueeze(0).expand(P, n, T)  # [P, n, T]
        m = theta.amax(1, keepdim=True).detach()
        logp_tab = theta - (theta - m).exp().sum(1, keepdim=True).log() - m
        logp = logp_tab.gather(1, y)
        ref_y = ref3.gather(1, y)
        w = torch.exp(logp - ref_y)  # behaviour = pi_ref
        if clip:
            w = w.clamp(max=clip)
        R = r3.gather(1, y) - beta * (logp - ref_y)
        A = R - (R.sum(1, keepdim=True) - R) / (n - 1)
        c = -w * A * step_scale  # [P, n, T]
        onehot_sum = torch.zeros_like(theta).scatter_add(1, y, c)  # sum_j c_j e_{y_j}
        g = onehot_sum - c.sum(1, keepdim=True) * logp_tab.exp()
        theta = theta - inner_lr * g
    m = theta.amax(1, keepdim=True).detach()
    logp_K = theta - (theta - m).exp().sum(1, keepdim=True).log() - m - ref3  # [P, Y, T]: log pi_K / pi_ref
    pr, a, b, wt = plan["pr"], plan["a"], plan["b"], plan["wt"]
    z = beta * (logp_K[pr, a] - logp_K[pr, b])  # [M, T]
    total = ((prob[pr] * -F.logsigmoid(z)).sum(-1) * wt).sum()
    if lambda_bt:
        D = len(problem.domains)
        total = total + lambda_bt * sum(pairs_bt_loss(r_tab, pairs) for pairs in problem.pairs) / D
    return total


@functools.lru_cache(maxsize=16)
def _all_tuples(Y: int, n: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence of K sample n-tuples over Y responses, up to the order inside each tuple (the RLOO step is
    invariant to it): ([T, K, n] sorted tuples, [T] log of how many ordered tuples each stands for)."""
    multisets = list(itertools.combinations_with_replacement(range(Y), n))
    log_mult = [math.lgamma(n + 1) - sum(math.lgamma(c + 1) for c in Counter(m).values()) for m in multisets]
    idx, lw = [], []
    for combo in itertools.product(range(len(multisets)), repeat=K):
        idx.append([multisets[i] for i in combo])
        lw.append(sum(log_mult[i] for i in combo))
    return torch.tensor(idx, dtype=torch.long), torch.tensor(lw, dtype=torch.float64)


def exact_hypergradient(problem: ToyProblem, phi: torch.Tensor, inner_steps: int, n: int, inner_lr: float,
                        beta: float, clip: float | None = None, lambda_bt: float = 0.0
                        ) -> tuple[torch.Tensor, float]:
    """(grad F(phi), F(phi)) of `exact_meta_objective`."""
    rm = problem.rm(phi)
    val = exact_meta_objective(problem, rm, inner_steps, n, inner_lr, beta, clip, lambda_bt)
    (g,) = torch.autograd.grad(val, [rm.phi])
    return g.detach(), float(val)


def core_configs(inner_steps: int, inner_lr: float, beta: float, n: int, clip: float | None,
                 hypergrad: str = "auto", lambda_bt: float = 0.0) -> tuple[MetaConfig, RLOOConfig]:
    meta = MetaConfig(inner_steps=inner_steps, inner_lr=inner_lr, hypergrad=hypergrad, lambda_bt=lambda_bt)
    # raw rewards: the closed forms here are for the unstandardised step (the standardised one is checked by finite
    # differences in tests/core/test_hypergradient.py)
    rloo = RLOOConfig(beta=beta, num_samples=n, importance_clip=clip, reward_norm="none")
    resolved_hypergrad(meta)
    return meta, rloo
