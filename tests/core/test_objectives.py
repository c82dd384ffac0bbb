"""Core objectives against values computed by hand or by a slow reference."""

import math

import pytest
import torch

from oodpl.core.objectives import bradley_terry_loss, dpo_loss, kl_k1, pair_accuracy, rloo_advantages
from oodpl.models.sampling import sequence_logprobs, token_logprobs


def test_sequence_logprobs_matches_slow_reference():
    torch.manual_seed(0)
    N, T, V = 3, 5, 7
    logits = torch.randn(N, T, V, dtype=torch.float64)
    ids = torch.randint(0, V, (N, T))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    expected = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        for t in range(1, T):
            if mask[i, t]:
                expected[i] += torch.log_softmax(logits[i, t - 1], -1)[ids[i, t]]
    assert torch.allclose(sequence_logprobs(logits, ids, mask), expected, atol=1e-12)
    assert token_logprobs(logits, ids).shape == (N, T - 1)


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(1)))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)


def test_pair_accuracy_ties_half():
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0, 1.0])) == 0.625
    # the one tie rule of oodpl (objectives.TIE_TOL): differences below 1e-9 are ties, as in metrics.pair_correct
    from oodpl.evaluation.metrics import pair_correct

    c, r = torch.tensor([1.0 + 1e-12, 1.0 + 1e-6], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert pair_accuracy(c, r) == sum(pair_correct(c, r)) / 2 == 0.75


def test_dpo_loss_by_hand():
    lc, lr = torch.tensor([-3.0]), torch.tensor([-5.0])
    rc, rr = torch.tensor([-4.0]), torch.tensor([-4.0])
    beta = 0.5
    margin = beta * ((-3 + 4) - (-5 + 4))  # = 1
    assert dpo_loss(lc, lr, rc, rr, beta).item() == pytest.approx(math.log(1 + math.exp(-margin)), rel=1e-6)


def test_dpo_loss_matches_trl_formula():
    """Our DPO loss equals TRL's sigmoid DPO formula (DPOTrainer itself: tests/train/test_dpo.py)."""
    torch.manual_seed(1)
    lc, lr, rc, rr = (torch.randn(6, dtype=torch.float64) for _ in range(4))
    beta = 0.1
    ours = dpo_loss(lc, lr, rc, rr, beta)
    # TRL's formula (DPOTrainer, loss_type="sigmoid", label_smoothing=0): -logsigmoid(beta * logits)
    logits = (lc - lr) - (rc - rr)
    theirs = -torch.nn.functional.logsigmoid(beta * logits).mean()
    assert torch.allclose(ours, theirs)


def test_kl_k1_by_hand():
    lp, lr = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_k1(lp, lr), torch.tensor([0.5, -1.0]))


def test_kl_k1_unbiased_on_categorical():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    lp, lq = p.log(), q.log()
    assert torch.allclose((p * kl_k1(lp, lq)).sum(), exact)


def test_rloo_advantages_by_hand():
    R = torch.tensor([[1.0, 2.0, 6.0]])
    # A_0 = 1 - (2+6)/2 = -3 ; A_1 = 2 - 3.5 = -1.5 ; A_2 = 6 - 1.5 = 4.5
    assert torch.allclose(rloo_advantages(R), torch.tensor([[-3.0, -1.5, 4.5]]))
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([[1.0]]))
