"""The field's reward models for out-of-distribution use (method.md, Baselines, "Methods of the field"), each one a
trainer of the method registry (methods.py) built on THE Bradley-Terry fit (rm_train.fit_reward_model) and saved as a
standard `AutoModelForSequenceClassification` checkpoint:

    metarm   (Dou et al., AAAI 2025)   before each BT step, one gradient-ascent step on a difference loss J over
                                       unlabelled pi_ref samples of the prompts the RM will be used on; the BT loss
                                       is taken at the ascended weights and differentiated through them (second order)
    grm      (Yang et al., NeurIPS 2024)  a decoder RM that keeps its language-model head: BT + w * the SFT loss of
                                       the chosen responses through that head (regularises the shared hidden states)
    warm-rm  (Rame et al., ICML 2024)  M BT fine-tunings from one initialisation (different data orders), their
                                       weights averaged

Formulas (r = the RM's scalar reward, phi its weights, sigma the logistic function):

    J(phi)     = mean over within-prompt pairs i < j of the drawn prompts' samples of sigma(|r(x, y_i) - r(x, y_j)|)
    metarm     L(phi) = BT(phi') - j_weight * J(phi'),   phi' = phi + ascent_lr * grad J(phi)
    grm        L(phi) = BT(phi) + sft_weight * CE(lm_head(h_phi), chosen response tokens)   (token mean, as the
               causal-LM loss of transformers with the prompt's tokens masked; grm_regularizer "sft", method.md)
               L(phi) = (1 - w) * BT(phi) - w * log sigmoid(grm_beta * log pi_phi(y_chosen | x))   (the sum of the
               response's token log-probs; grm_regularizer "logsigmoid-sft": GRM's released trainer at its defaults)
    warm-rm    phi = (1/M) sum_m phi_m,   phi_m = BT fit from phi_0 with data order m (phi_0 shared)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from oodpl.errors import UserError
from oodpl.core.objectives import bradley_terry_loss
from oodpl.train.job import save_reward_fit
from oodpl.train.rm_train import BTStep, fit_reward_model

IGNORE = -100  # label of a token the SFT loss skips (transformers' ignore_index)


def _fit(job, step_loss=None, **kw):
    """THE BT fit with the job's devices, logging and seed; `step_loss(rm)` the method's minibatch loss."""
    return fit_reward_model(job.cfg, job.pairs, seed=kw.pop("seed", job.cfg.seed), place_on=job.accelerator,
                            accelerator=job.accelerator if job.data_parallel else None,
                            progress=job.progress and job.data_parallel, log=kw.pop("log", job.log),
                            step_loss=step_loss, **kw)


# ---------------------------------------------------------------------------------------------------------- metarm
def prompt_groups_from_banks(banks: dict) -> list[tuple[str, list[str]]]:
    """(prompt, its pi_ref responses) of every prompt of sampling.SampleBank's, in domain order."""
    return [(p, list(rs)) for name in sorted(banks) for p, rs in zip(banks[name].prompts, banks[name].responses)]


def prompt_groups_from_samples(samples) -> list[tuple[str, list[str]]]:
    """(prompt, responses) of a metatest.PolicySamples (one prompt per response, each prompt's responses adjacent)."""
    groups: list[tuple[str, list[str]]] = []
    for p, r in zip(samples.prompts, samples.responses):
        if groups and groups[-1][0] == p:
            groups[-1][1].append(r)
        else:
            groups.append((p, [r]))
    return groups


def within_prompt_pairs(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (i, j), i < j, of every pair of samples of the same prompt; rows are prompt-major."""
    first, second, start = [], [], 0
    for n in sizes:
        i, j = torch.triu_indices(n, n, offset=1)
        first.append(i + start)
        second.append(j + start)
        start += n
    return torch.cat(first), torch.cat(second)


def difference_loss(rewards: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """MetaRM's J: the mean of sigma(|r_i - r_j|) over within-prompt pairs (high when the RM tells samples apart)."""
    i, j = pairs
    return torch.sigmoid((rewards[i] - rewards[j]).abs()).mean()


def metarm_objective(model, params: dict[str, torch.Tensor], enc_chosen: dict, enc_rejected: dict, enc_shifted: dict,
                     pairs: tuple[torch.Tensor, torch.Tensor], ascent_lr: float, j_weight: float
                     ) -> tuple[torch.Tensor, dict]:
    """L(phi) = BT(phi') - j_weight * J(phi') with phi' = phi + ascent_lr * grad J(phi), as a differentiable function of
    `params` (the RM's trainable tensors by name; the rest of `model` is held fixed). The inner gradient is taken with
    create_graph, so backpropagating L goes through phi' (second order, as MAML). Returns L and its parts."""
    from oodpl.models.sampling import second_order

    with second_order():  # attention kernels with a double backward
        return _metarm_objective(model, params, enc_chosen, enc_rejected, enc_shifted, pairs, ascent_lr, j_weight)


def _metarm_objective(model, params, enc_chosen, enc_rejected, enc_shifted, pairs, ascent_lr, j_weight):
    dev = next(iter(params.values())).device

    def rewards(p: dict, enc: dict) -> torch.Tensor:
        return functional_call(model, p, args=(), kwargs={k: v.to(dev) for k, v in enc.items()}).logits.squeeze(-1)

    j = difference_loss(rewards(params, enc_shifted), pairs)
    grads = torch.autograd.grad(j, list(params.values()), create_graph=True, allow_unused=True)
    ascended = {k: v if g is None else v + ascent_lr * g for (k, v), g in zip(params.items(), grads)}
    bt = bradley_terry_loss(rewards(ascended, enc_chosen), rewards(ascended, enc_rejected))
    loss = bt
    parts = {"bt_loss": float(bt.detach()), "j": float(j.detach())}
    if j_weight:
        j_after = difference_loss(rewards(ascended, enc_shifted), pairs)
        loss = loss - j_weight * j_after
        parts["j_ascended"] = float(j_after.detach())
    return loss, parts


def _trimmed(enc: dict, rows: list[int]) -> dict:
    """Rows of a right-padded encoding, cut to their longest row."""
    width = int(enc["attention_mask"][rows].sum(1).max())
    return {k: v[rows, :width] for k, v in enc.items()}


class MetaRMStep:
    """One MetaRM step on a minibatch of pairs: `field.metarm_batch_prompts` prompts drawn (without replacement, a
    function of the seed and the step) from the shifted samples, whose RM inputs are tokenised once."""

    def __init__(self, rm, groups: list[tuple[str, list[str]]], field, seed: int):
        groups = [(p, rs) for p, rs in groups if len(rs) >= 2]  # J needs two samples of one prompt
        if not groups:
            raise UserError("metarm needs pi_ref samples (at least 2 per prompt) of the prompts it will be used on; "
                            "none were given (rloo.num_samples >= 2, a split with support prompts)")
        self.bt = BTStep(rm)
        self.sizes = [len(rs) for _, rs in groups]
        self.offsets = np.cumsum([0] + self.sizes)
        self.encoded = rm.encode([p for p, rs in groups for _ in rs], [r for _, rs in groups for r in rs])
        self.field, self.seed, self.calls = field, seed, 0

    def draw(self) -> list[int]:
        rng = np.random.default_rng([self.seed, 31, self.calls])
        self.calls += 1
        k = min(self.field.metarm_batch_prompts, len(self.sizes))
        return sorted(rng.choice(len(self.sizes), size=k, replace=False).tolist())

    def __call__(self, model, chunk, device) -> tuple[torch.Tensor, dict]:
        chosen = self.draw()
        rows = [r for g in chosen for r in range(self.offsets[g], self.offsets[g + 1])]
        pairs = within_prompt_pairs([self.sizes[g] for g in chosen])
        enc_c, enc_r = self.bt.encodings(chunk)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return metarm_objective(model, params, enc_c, enc_r, _trimmed(self.encoded, rows), pairs,
                                self.field.metarm_ascent_lr, self.field.metarm_j_weight)


def shifted_groups(job) -> list[tuple[str, list[str]]]:
    """The unlabelled pi_ref samples MetaRM may see: the meta-train domains' support prompts (job.banks, or banks
    built now under OUTPUT/bank from job.split with the seed's policy), plus job.target_samples (the held-out domains'
    adaptation prompts in the benchmark, the left-out domain's support prompts in a select fold). Never labels."""
    banks = job.banks
    if banks is None:
        if job.split is None or job.policy is None:
            raise UserError("metarm needs the meta-train split and the policy to sample pi_ref responses")
        from oodpl.runtime.distributed import make_accelerator
        from oodpl.train.metatrain import load_or_build_banks

        banks = load_or_build_banks(job.policy(), job.split, job.cfg, job.layout.bank,
                                    job.accelerator or make_accelerator(), job.progress)
    return prompt_groups_from_banks(banks) + list(job.target_samples or [])


def pair_prompt_banks(policy, pairs, cfg) -> dict:
    """pi_ref samples (rloo.num_samples each) of up to data.support_size distinct prompts per domain of `pairs`: the
    prompts a pairs file says the RM will be used on, when there is no split with support prompts."""
    from oodpl.models.sampling import build_bank

    by_domain: dict[str, list[str]] = {}
    for p in pairs:
        prompts = by_domain.setdefault(p.domain, [])
        if p.prompt not in prompts and len(prompts) < cfg.data.support_size:
            prompts.append(p.prompt)
    return {d: build_bank(policy, prompts, cfg.rloo.num_samples, seed=cfg.seed * 1000 + i, desc=f"bank {d}")
            for i, (d, prompts) in enumerate(sorted(by_domain.items()))}


def train_metarm(job) -> None:
    """metarm: the BT fit with MetaRM's step (MetaRMStep) on shifted_groups(job)."""
    if job.accelerator is not None and job.accelerator.num_processes > 1:
        raise UserError("metarm trains in one process (its second-order step is not data-parallel); run it "
                        "without `accelerate launch`")
    groups = shifted_groups(job)
    f = job.cfg.field
    rm, stats = _fit(job, step_loss=lambda rm: MetaRMStep(rm, groups, f, job.cfg.seed))
    save_reward_fit(job, rm, stats, ascent_lr=f.metarm_ascent_lr, j_weight=f.metarm_j_weight,
          shifted_prompts=len(groups), shifted_samples=sum(len(rs) for _, rs in groups),
          target_prompts=len(job.target_samples or []))


# ------------------------------------------------------------------------------------------------------------- grm
def sft_labels(enc: dict, prompt_lengths: list[int]) -> torch.Tensor:
    """Causal-LM labels of the response tokens: the input ids, IGNORE on the prompt's tokens and on padding."""
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = IGNORE
    for i, n in enumerate(prompt_lengths):
        labels[i, :n] = IGNORE
    return labels


def _labelled_logits(hidden: torch.Tensor, labels: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(logits, target token, row) of every labelled next-token position, the LM head applied only there (the
    vocabulary projection of every prompt position would be wasted); None when no position has a label."""
    h, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    keep = y != IGNORE
    if not bool(keep.any()):  # every response cut off by reward.max_length: no SFT signal in this minibatch
        return None
    return lm_head(h[keep]).float(), y[keep], keep.nonzero()[:, 0]


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (transformers' causal-LM loss)."""
    got = _labelled_logits(hidden, labels, lm_head)
    if got is None:
        return hidden.sum() * 0.0
    logits, y, _ = got
    return F.cross_entropy(logits, y)


def response_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
    """Per row, the sum of the labelled tokens' log-probabilities: log pi(response | prompt) through the LM head
    (0 for a row without labels, as GRM's get_batch_logps gives it)."""
    zeros = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    got = _labelled_logits(hidden, labels, lm_head)
    if got is None:  # still a function of hidden, as causal_lm_loss's zero is
        return zeros + hidden.sum() * 0.0
    logits, y, rows = got
    return zeros.index_add(0, rows, logits.log_softmax(-1).gather(1, y[:, None])[:, 0])


def decoder_lm_head(rm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The language-model head of a decoder RM's backbone: tied to its input embeddings (SmolLM2, Gemma, the tiny
    Llama: trained with it, through the shared matrix) or, when untied, the causal LM's own head read from the
    backbone's checkpoint (frozen: GRM regularises the shared hidden states; the head is not saved)."""
    from oodpl.models.reward import is_decoder_reward_model

    model = rm.model
    if not is_decoder_reward_model(model):
        raise UserError(f"grm needs a decoder reward model (a causal-LM backbone with a score head), not "
                        f"{type(model).__name__}; set reward.name_or_path to a decoder such as the policy's "
                        "(smollm2-135m-instruct)")
    emb = model.get_input_embeddings()
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return lambda h: F.linear(h.to(emb.weight.dtype), emb.weight)
    from transformers import AutoModelForCausalLM

    try:
        head = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=emb.weight.dtype).get_output_embeddings()
    except (OSError, ValueError) as e:
        raise UserError(f"grm: cannot read the language-model head of {model.name_or_path!r} "
                        f"({str(e).splitlines()[0]}); use a decoder checkpoint with its LM head") from None
    head.requires_grad_(False)
    head.to(emb.weight.device)
    return lambda h: head(h.to(head.weight.dtype))


@contextmanager
def captured_hidden(model):
    """The last hidden states of the RM's backbone (the score head's input) during the forwards inside the block."""
    module = getattr(model, "module", model)  # a DDP-wrapped model
    out: list[torch.Tensor] = []

    def hook(_mod, _inp, output):
        out.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = module.base_model.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


class GRMStep(BTStep):
    """BT and GRM's regulariser of the chosen responses through the backbone's LM head, both from one forward pass of
    the chosen rows (the reward is the score head's, read where TRL reads it). regularizer "sft": BT + w * the
    token-mean SFT loss; "logsigmoid-sft": (1 - w) * BT + w * -log sigmoid(beta * log pi(chosen | prompt))."""

    def __init__(self, rm, weight: float, regularizer: str = "sft", beta: float = 0.1):
        super().__init__(rm)
        self.weight, self.regularizer, self.beta = weight, regularizer, beta
        self.lm_head = decoder_lm_head(rm)

    def __call__(self, model, chunk, device) -> tuple[torch.Tensor, dict]:
        enc_c, enc_r = self.encodings(chunk)
        with captured_hidden(model) as hidden:
            r_c = self.rewards(model, enc_c, device)
        r_r = self.rewards(model, enc_r, device)
        bt = bradley_terry_loss(r_c, r_r)
        labels = sft_labels(enc_c, self.rm.prompt_lengths([p.prompt for p in chunk]))
        if self.regularizer == "logsigmoid-sft":
            reg = -F.logsigmoid(self.beta * response_logps(hidden[0], labels, self.lm_head)).mean()
            loss = (1.0 - self.weight) * bt + self.weight * reg
        else:
            reg = causal_lm_loss(hidden[0], labels, self.lm_head)
            loss = bt + self.weight * reg
        return loss, {"bt_loss": float(bt.detach()), "sft_loss": float(reg.detach())}


def train_grm(job) -> None:
    """grm: the BT fit of a decoder RM with GRM's step (GRMStep)."""
    f = job.cfg.field
    rm, stats = _fit(job, step_loss=lambda rm: GRMStep(rm, f.grm_sft_weight, f.grm_regularizer, f.grm_beta))
    save_reward_fit(job, rm, stats, sft_weight=f.grm_sft_weight, regularizer=f.grm_regularizer,
                    **({"beta": f.grm_beta} if f.grm_regularizer == "logsigmoid-sft" else {}),
                    backbone=job.cfg.reward.name_or_path)


# ------------------------------------------------------------------------------------------------------------ warm
def member_seed(seed: int, m: int) -> int:
    """Member m's data-order seed; member 0 is the run's own BT fit (so M = 1 is erm-rm exactly)."""
    return seed if m == 0 else seed + 100_003 * m


class WeightAverage:
    """Running element-wise mean of state dicts (float64 sums; integer buffers are kept from the first)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if not v.is_floating_point():
                self.sums.setdefault(k, v.detach().clone())
            elif k in self.sums:
                self.sums[k] += v.detach().double()
            else:
                self.sums[k] = v.detach().double().clone()
        self.count += 1

    def mean(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (s / self.count).to(like[k].dtype) if like[k].is_floating_point() else s
                for k, s in self.sums.items()}


def train_warm(job) -> None:
    """warm-rm: field.warm_members BT fits from the run's initialisation (init seed cfg.seed) with data orders
    member_seed(cfg.seed, m), weight-averaged into one reward model."""
    cfg = job.cfg
    average, members, offset = WeightAverage(), [], 0
    rm = None
    for m in range(cfg.field.warm_members):
        log = job.log and (lambda step, d, o=offset, m=m: job.log(o + step, {**d, "member": m}))
        rm, stats = _fit(job, seed=member_seed(cfg.seed, m), init_seed=cfg.seed, log=log)
        average.add(rm.model.state_dict())
        members.append({"member": m, "order_seed": member_seed(cfg.seed, m), **stats})
        offset += stats["steps"]
    rm.model.load_state_dict(average.mean(rm.model.state_dict()))
    save_reward_fit(job, rm, {"steps": offset, "seconds": sum(s["seconds"] for s in members),
                    "train_loss": float(np.mean([s["train_loss"] for s in members]))},
          members=members, warm_members=cfg.field.warm_members)
