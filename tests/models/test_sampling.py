"""models.sampling: the exact token-level KL(pi || pi_ref) along sampled prefixes (sequence_kl), and the log-probabilities
and KL of evaluation samples from one pass per model (logprobs_and_kl)."""

import pytest
import torch

from conftest import PROMPTS
from oodpl.config import PolicyConfig
from oodpl.models.policy import load_policy
from oodpl.models.sampling import collate, encode_prompts, policy_logprobs, sample_responses, sequence_kl


def _policy(layers):
    cfg = PolicyConfig(name_or_path="tiny-random", dtype="float64", max_new_tokens=5, max_prompt_tokens=16, lora_r=2,
                       lora_alpha=4, trainable_layers=layers)
    return load_policy(cfg, seed=0)


def _batch(policy, n):
    tok = policy.tokenizer
    p_ids = encode_prompts(tok, PROMPTS, 16)
    r_ids = sample_responses(policy.model, tok, p_ids, n, 5, generator_seed=3)
    rows_p = [p for p, rs in zip(p_ids, r_ids) for _ in rs]
    return collate(rows_p, [r for rs in r_ids for r in rs], tok.pad_token_id)


def _move(policy, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters().values():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _by_hand(policy, batch):
    """Full forward over every position, no logits_to_keep, no trunk: sum_t sum_v p (log p - log q) on response tokens."""
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(**kw).logits.double(), -1)
        with policy.reference() as ref:
            logq = torch.log_softmax(ref(**kw).logits.double(), -1)
    out = []
    for i in range(len(batch)):
        total = 0.0
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[i, t]:
                p, q = logp[i, t - 1], logq[i, t - 1]
                total += float((p.exp() * (p - q)).sum())
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("layers", [None, 1])
def test_sequence_kl_is_the_token_level_kl_by_hand(layers):
    policy = _policy(layers)
    batch = _batch(policy, 2)
    assert sequence_kl(policy, batch) == pytest.approx(torch.zeros(len(batch)), abs=1e-12)  # pi = pi_ref at init
    _move(policy)
    want = _by_hand(policy, batch)
    assert float(want.min()) > 1e-4  # the adapters moved pi: a non-trivial comparison
    assert sequence_kl(policy, batch) == pytest.approx(want, rel=1e-9)
    assert sequence_kl(policy, batch, chunk=3) == pytest.approx(want, rel=1e-9)  # chunks of rows: the same
    if layers:  # the cached frozen trunk gives the same numbers
        cached = policy.with_trunk(batch)
        assert cached.trunk is not None
        assert sequence_kl(policy, cached) == pytest.approx(want, rel=1e-9)


def test_sequence_kl_and_the_log_ratio_estimate_agree_on_average():
    """Both estimate KL(pi || pi_ref) on samples of pi: their means over many samples meet within a few sigma."""
    policy = _policy(None)
    _move(policy, scale=0.3)
    batch = _batch(policy, 40)
    exact = sequence_kl(policy, batch)
    with torch.no_grad():
        ratio = policy_logprobs(policy.model, batch)
        with policy.reference() as ref:
            ratio = ratio - policy_logprobs(ref, batch)
    sigma = float(ratio.std()) / len(ratio) ** 0.5
    assert abs(float(exact.mean()) - float(ratio.mean())) < 4 * sigma + 1e-9
    assert float(exact.std()) < float(ratio.std())  # the point of it: less variance


def test_logprobs_and_kl_give_what_the_separate_passes_give():
    """One forward of pi and one of pi_ref (draw_eval_samples): the same values as policy_logprobs twice and
    sequence_kl, bit for bit at the same chunking."""
    from oodpl.models.sampling import logprobs_and_kl

    policy = _policy(1)
    _move(policy)
    batch = policy.with_trunk(_batch(policy, 3))
    logp, ref_logp, kl = logprobs_and_kl(policy, batch, chunk=4)
    with torch.no_grad():
        assert torch.equal(logp, policy_logprobs(policy.model, batch, chunk=4))
        with policy.reference() as ref:
            assert torch.equal(ref_logp, policy_logprobs(ref, batch, chunk=4))
    assert torch.equal(kl, sequence_kl(policy, batch, chunk=4))
    assert float((logp - ref_logp).abs().max()) > 1e-4 and float(kl.min()) > 1e-4  # pi moved: not vacuous
