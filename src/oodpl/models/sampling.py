"""Token layout, policy log-probabilities, batched sampling, and the reference-sample bank.

Every sequence is laid out left-padded: [pad ... pad | prompt tokens | response tokens], with `response_mask` marking the
response. Position ids come from the attention mask, so a sequence scores the same whatever its padding.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from oodpl.models.precision import at_least_float32, autocast
from oodpl.models.trunk import attach as attach_trunk
from oodpl.models.trunk import from_trunk


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[t] | input_ids[<t]) for t >= 1; shape [N, T-1]. gather - logsumexp avoids a full log_softmax."""
    logits = logits[:, :-1]
    targets = input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum of response-token log-probabilities; response_mask marks response tokens of input_ids."""
    return (token_logprobs(logits, input_ids) * response_mask[:, 1:].to(logits.dtype)).sum(-1)


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    response_mask: torch.Tensor  # [N, T]
    # optional cached frozen trunk (oodpl.models.trunk): the hidden states entering decoder layer `trunk_layer`, left-padded
    trunk: torch.Tensor | None = None  # [N, T, H]
    trunk_layer: int | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_prompts(tokenizer, prompts: list[str], max_tokens: int, chat_template: bool = False) -> list[list[int]]:
    """Prompt token ids (strings or chat.Conversation; through the chat template when `chat_template`, as TRL renders
    them: oodpl.models.chat); long prompts keep their last `max_tokens` tokens, as TRL cuts prompts."""
    from oodpl.models.chat import prompt_ids

    out = []
    for p in prompts:
        ids = prompt_ids(tokenizer, p, chat_template)
        out.append(ids[-max_tokens:] if max_tokens else ids)
    return out


def encode_responses(tokenizer, prompts: list[str], responses: list[str], max_tokens: int,
                     chat_template: bool = False) -> list[list[int]]:
    """Token ids of human-written responses (oodpl.models.chat.response_ids), cut to `max_tokens`."""
    from oodpl.models.chat import response_ids

    return [response_ids(tokenizer, p, r, chat_template)[:max_tokens] for p, r in zip(prompts, responses)]


def collate(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> SequenceBatch:
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    T = max(len(s) for s in seqs)
    N = len(seqs)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    attention = torch.zeros((N, T), dtype=torch.long)
    response = torch.zeros((N, T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        L = len(p) + len(r)
        input_ids[i, T - L:] = torch.tensor(p + r, dtype=torch.long)
        attention[i, T - L:] = 1
        response[i, T - len(r):] = 1 if r else 0
    return SequenceBatch(input_ids, attention, response)


_second_order_depth = [0]


@contextmanager
def second_order():
    """Context for passes that are differentiated twice or in forward mode (torch.func.jvp): none of PyTorch's fused
    attention kernels (flash on CPU and CUDA, memory-efficient, cuDNN) has a forward-mode formula or a double
    backward, the math kernel has both (same values). Every other pass keeps the fused kernels (SDPA's default
    choice). Gradient checkpointing is off inside (it would recompute under forward-mode AD / create_graph)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _second_order_depth[0] += 1
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _second_order_depth[0] -= 1


_functional_params: list[tuple[nn.Module, dict]] = []  # (model, params) of the functional_call in progress


def checkpoint_contexts():
    """`context_fn` of torch.utils.checkpoint for the policy's decoder layers. The recomputation runs in the backward
    pass, after torch.func.functional_call has put the module's own tensors back: re-apply the same parameter dict
    there, or the recomputed activations (and the gradients) would be those of the module's parameters."""
    if not _functional_params:
        return nullcontext(), nullcontext()
    model, params = _functional_params[-1]
    from torch.nn.utils.stateless import _reparametrize_module

    return nullcontext(), _reparametrize_module(model, params, strict=False)


@contextmanager
def _checkpointing(model: nn.Module, params: dict | None = None):
    """Gradient checkpointing (policy.gradient_checkpointing) for a first-order pass that records a graph.

    transformers checkpoints a decoder layer only while that layer is in training mode; the policy stays in eval mode
    (no dropout), so the layers alone are flagged as training for the duration of the pass: their submodules (dropout,
    attention) stay in eval mode, and the values are exactly those of the eval-mode forward."""
    layers = []
    if getattr(model, "oodpl_checkpointing", False) and torch.is_grad_enabled() and not _second_order_depth[0]:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules()
                  if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training]
    for m in layers:
        m.training = True
    if layers and params is not None:
        _functional_params.append((model, params))
    try:
        yield
    finally:
        for m in layers:
            m.training = False
        if layers and params is not None:
            _functional_params.pop()


def _trunk_context(model: nn.Module, batch: SequenceBatch, sl: slice):
    """Run only the layers above a cached trunk when the batch carries one (oodpl.models.trunk), else a no-op context."""
    if batch.trunk is None:
        return nullcontext()
    return from_trunk(model, batch.trunk_layer, batch.trunk[sl])


def _response_logits(model: nn.Module, batch: SequenceBatch, sl: slice,
                     params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits (float32 or more) of rows `sl` at the last `keep` positions, the ones that predict response tokens,
    with those positions' input ids and response mask."""
    dev = next(model.parameters()).device
    # Only the logits that predict response tokens are needed: with left padding the responses sit at the end, so
    # the LM head (vocabulary-sized) runs on the last `keep` positions instead of all T (`logits_to_keep`).
    response_mask = batch.response_mask[sl]
    T = response_mask.shape[1]
    cols = response_mask.any(0).nonzero()
    keep = min(T, T - int(cols[0]) + 1) if len(cols) else 1
    # positions as an index tensor, not an int: an int slices the hidden states to a non-contiguous view, which
    # sends the LM-head matmul down a slow batched path on CPU; indexing copies them to a contiguous block
    to_keep = torch.arange(T - keep, T, device=dev) if keep < T else 0
    kwargs = dict(input_ids=batch.input_ids[sl].to(dev), attention_mask=batch.attention_mask[sl].to(dev),
                  position_ids=batch.position_ids[sl].to(dev), use_cache=False, logits_to_keep=to_keep)
    with _trunk_context(model, batch, sl), autocast(model, dev), _checkpointing(model, params):
        if params is None:
            logits = model(**kwargs).logits
        else:
            logits = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False).logits
    # a model that ignores logits_to_keep returns all T positions; the log-softmax runs in (at least) float32
    # whatever the model's dtype: bf16 logits lose ~0.2 nats per sequence otherwise
    return at_least_float32(logits[:, -keep:]), kwargs["input_ids"][:, -keep:], response_mask[:, -keep:].to(dev)


def _chunked(run, n: int, chunk: int | None) -> torch.Tensor:
    if chunk is None or chunk >= n:
        return run(slice(None))
    return torch.cat([run(slice(i, i + chunk)) for i in range(0, n, chunk)])


def policy_logprobs(model: nn.Module, batch: SequenceBatch, params: dict[str, torch.Tensor] | None = None,
                    chunk: int | None = None) -> torch.Tensor:
    """log pi(y|x) per row; with `params`, pi is evaluated at those tensors (torch.func.functional_call)."""
    return _chunked(lambda sl: sequence_logprobs(*_response_logits(model, batch, sl, params)), len(batch), chunk)


def _token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    per_position = (logp.exp() * (logp - logq)).sum(-1)  # position t predicts token t + 1
    return (per_position[:, :-1] * mask[:, 1:].to(per_position.dtype)).sum(-1)


@torch.no_grad()
def sequence_kl(policy, batch: SequenceBatch, chunk: int | None = 16) -> torch.Tensor:
    """Per row, the sum over its response tokens of KL(pi(.|prefix) || pi_ref(.|prefix)), the full next-token
    distributions along the row's own prefixes. For rows sampled from pi its mean estimates KL(pi || pi_ref) of whole
    sequences, like the mean of log pi - log pi_ref, but without that estimate's variance or negative values.
    `policy`: a models.policy.Policy (its model and its reference())."""
    return logprobs_and_kl(policy, batch, chunk)[2]


@torch.no_grad()
def logprobs_and_kl(policy, batch: SequenceBatch, chunk: int | None = 16
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi(y|x), log pi_ref(y|x) and sequence_kl per row from one forward pass of each model: the values
    policy_logprobs (of pi and of pi_ref) and sequence_kl give, in half their forward passes (2 instead of 4)."""

    def run(sl: slice) -> torch.Tensor:
        logits, ids, mask = _response_logits(policy.model, batch, sl)
        with policy.reference() as ref:
            ref_logits = _response_logits(ref, batch, sl)[0]
        return torch.stack([sequence_logprobs(logits, ids, mask), sequence_logprobs(ref_logits, ids, mask),
                            _token_kl(logits, ref_logits, mask)], 1)

    out = _chunked(run, len(batch), chunk)
    return out[:, 0], out[:, 1], out[:, 2]


@torch.no_grad()
def sample_responses(model: nn.Module, tokenizer, prompt_ids: list[list[int]], n: int, max_new_tokens: int,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 16,
                     generator_seed: int | None = None, progress: bool = False, desc: str = "sampling"
                     ) -> list[list[list[int]]]:
    """n sampled responses (token ids, cut after the first EOS) per prompt, KV-cached batched generation.

    With temperature 1, top_k 0 and top_p 1 the samples come from pi itself, which the importance weights assume.
    """
    dev = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    out: list[list[list[int]]] = []
    per_call = max(1, batch_size // n)
    bar = tqdm(total=len(prompt_ids), desc=desc, disable=not progress, unit="prompt")
    for i in range(0, len(prompt_ids), per_call):
        chunk = prompt_ids[i:i + per_call]
        batch = collate(chunk, [[] for _ in chunk], pad)
        with autocast(model, dev):
            gen = model.generate(
                input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), do_sample=True,
                num_return_sequences=n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, pad_token_id=pad, eos_token_id=eos,
            )
        new = gen[:, batch.input_ids.shape[1]:].tolist()
        for j in range(len(chunk)):
            responses = []
            for row in new[j * n:(j + 1) * n]:
                if eos is not None and eos in row:
                    row = row[: row.index(eos) + 1]
                responses.append(row)
            out.append(responses)
        bar.update(len(chunk))
    bar.close()
    return out


@dataclass
class Samples:
    """B prompts x n responses, flattened prompt-major (row i belongs to prompt i // n)."""

    prompts: list[str]  # length B
    responses: list[str]  # length B*n (decoded)
    batch: SequenceBatch  # policy tokens, B*n rows
    ref_logp: torch.Tensor  # [B*n] log pi_ref(y|x), cached
    behaviour_logp: torch.Tensor  # [B*n] log-prob under the policy that drew the samples
    n: int
    rm_encoding: dict[str, torch.Tensor] | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def repeated_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.n)]


@contextmanager
def parameters_at(model: nn.Module, params: dict[str, torch.Tensor]):
    """`model` with `params` (name -> tensor) in place of its own tensors, for code that calls the module itself
    (model.generate); its own tensors are back afterwards, whatever happens inside."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(model, params, strict=False):
        yield model


def draw_samples(policy, theta: dict[str, torch.Tensor], prompts: list[str], prompt_ids: list[list[int]], n: int,
                 seed: int, rm=None) -> Samples:
    """n fresh samples per prompt from pi_theta (the warm-started inner policy of method.md), the generator seeded
    by `seed`: with log pi_ref, the behaviour log-probability log pi_theta (so the importance weights are 1 at theta)
    and, with adapters on the top layers only, the frozen trunk of the new sequences (computed once, here)."""
    cfg, tok = policy.config, policy.tokenizer
    with parameters_at(policy.model, theta) as model:
        response_ids = sample_responses(model, tok, prompt_ids, n, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                        cfg.top_p, batch_size=len(prompt_ids) * n, generator_seed=seed)
    rows_r = [r for rs in response_ids for r in rs]
    batch = policy.with_trunk(collate([p for p in prompt_ids for _ in range(n)], rows_r, tok.pad_token_id))
    with torch.no_grad():
        behaviour = policy.logprobs(batch, params=theta)
        with policy.reference() as ref:
            ref_logp = policy_logprobs(ref, batch)
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows_r]
    samples = Samples(list(prompts), texts, batch, ref_logp, behaviour, n)
    if rm is not None:
        samples.rm_encoding = rm.encode(samples.repeated_prompts(), texts)
    return samples


@dataclass
class SampleBank:
    """Reference-policy samples for one domain's support prompts: generated once, stored with the run, reused."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]  # [prompt][sample] token ids
    responses: list[list[str]]
    ref_logp: torch.Tensor  # [P, n]
    n: int
    meta: dict = field(default_factory=dict)
    # frozen trunk (oodpl.models.trunk) of every sample, prompt-major [P*n] rows; kept in memory, never saved with the bank
    trunk: list[torch.Tensor] | None = None
    trunk_layer: int | None = None

    def _rows(self) -> tuple[list[list[int]], list[list[int]]]:
        rows_p = [p for p, rs in zip(self.prompt_ids, self.response_ids) for _ in rs]
        return rows_p, [r for rs in self.response_ids for r in rs]

    def for_policy(self, policy, chunk: int = 32) -> "SampleBank":
        """Ready for `policy`: log pi_ref on the policy's device, and the frozen trunk of every sample computed once
        (when the policy adapts only its top layers)."""
        self.ref_logp = self.ref_logp.to(next(policy.model.parameters()).device)
        if policy.trunk_layer is None:  # a full-depth policy: no frozen trunk (never another depth's)
            self.trunk, self.trunk_layer = None, None
        elif self.trunk is None or self.trunk_layer != policy.trunk_layer:
            self.trunk = policy.trunk_rows(collate(*self._rows(), policy.tokenizer.pad_token_id), chunk)
            self.trunk_layer = policy.trunk_layer
        return self

    def select(self, prompt_indices: list[int], pad_id: int, rm=None) -> Samples:
        rows_p = [self.prompt_ids[i] for i in prompt_indices for _ in range(self.n)]
        rows_r = [r for i in prompt_indices for r in self.response_ids[i]]
        batch = collate(rows_p, rows_r, pad_id)
        if self.trunk is not None:
            attach_trunk(batch, [self.trunk[i * self.n + j] for i in prompt_indices for j in range(self.n)],
                         self.trunk_layer)
        ref = self.ref_logp[prompt_indices].reshape(-1)
        prompts = [self.prompts[i] for i in prompt_indices]
        responses = [t for i in prompt_indices for t in self.responses[i]]
        s = Samples(prompts, responses, batch, ref, ref.clone(), self.n)
        if rm is not None:
            s.rm_encoding = rm.encode(s.repeated_prompts(), responses)
        return s

    def save(self, path: Path) -> None:
        from oodpl.errors import atomic_write_bytes

        import io

        buf = io.BytesIO()
        state = {k: v for k, v in self.__dict__.items() if k not in ("trunk", "trunk_layer")}
        torch.save({**state, "ref_logp": self.ref_logp.cpu()}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "SampleBank":
        return cls(**torch.load(path, weights_only=False))


def build_bank(policy, prompts: list[str], n: int, seed: int, progress: bool = False, desc: str = "bank",
               batch_size: int = 16) -> SampleBank:
    """Sample n responses per prompt from pi_ref and score their reference log-probabilities once."""
    cfg = policy.config
    tok = policy.tokenizer
    prompt_ids = encode_prompts(tok, prompts, cfg.max_prompt_tokens, cfg.chat_template)
    with policy.reference() as ref:
        response_ids = sample_responses(ref, tok, prompt_ids, n, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                        cfg.top_p, batch_size=batch_size, generator_seed=seed, progress=progress,
                                        desc=desc)
    texts = [[tok.decode(r, skip_special_tokens=True) for r in rs] for rs in response_ids]
    bank = SampleBank(prompts, prompt_ids, response_ids, texts, torch.empty(0), n, {"seed": seed})
    bank.for_policy(policy, chunk=batch_size)  # the trunk (if any) also serves log pi_ref: the layers below run once
    batch = collate(*bank._rows(), tok.pad_token_id)
    attach_trunk(batch, bank.trunk, bank.trunk_layer)
    with torch.no_grad(), policy.reference() as ref:
        ref_logp = policy_logprobs(ref, batch, chunk=batch_size)
    bank.ref_logp = ref_logp.reshape(len(prompts), n)  # on the policy's device (saved on CPU)
    return bank
