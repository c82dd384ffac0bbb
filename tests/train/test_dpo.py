"""The `dpo` baseline: our DPO loss equals TRL's DPOTrainer loss on the same batch, and DPO steps lower it."""

from __future__ import annotations

import pytest
import torch

from oodpl.config import PolicyConfig
from oodpl.data.records import PairRecord
from oodpl.train.dpo import build_preference_set, evaluate_dpo_loss, implicit_reward_scores, train_dpo
from oodpl.models.policy import load_policy
from oodpl.core.objectives import dpo_loss
from oodpl.models.sampling import collate, policy_logprobs

ROWS = [("the film was", " truly wonderful and fun", " dull and a waste"),
        ("my order came", " early and well packed", " broken, never again"),
        ("service here is", " kind and quick", " rude and slow"),
        ("i think that", " it is great", " it is awful")]



def tiny_policy(seed=0):
    return load_policy(PolicyConfig(name_or_path="tiny-random", lora_r=2, lora_alpha=4, max_prompt_tokens=16,
                                    max_new_tokens=16), seed=seed)


def test_dpo_loss_equals_trl(tmp_path):
    """A real trl.DPOTrainer (trl 1.16, loss_type sigmoid, LoRA policy, reference = adapters disabled) computes the
    loss of a batch it collated itself; our dpo_loss on the same token ids must give the same number."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    policy = tiny_policy()
    beta = 0.3
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to="none", use_cpu=True,
                         per_device_train_batch_size=len(ROWS), precompute_ref_log_probs=False, loss_type=["sigmoid"])
    data = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in ROWS])
    trainer = trl.DPOTrainer(model=policy.model, ref_model=None, args=args, train_dataset=data,
                             processing_class=policy.tokenizer)
    # Move the policy away from the reference AFTER the trainer has stored its "ref" copy of the zero adapters, so
    # that both sides see pi_theta != pi_ref (at theta_0 both losses are log 2 trivially).
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(0.0, 0.5)
    examples = [trainer.train_dataset[i] for i in range(len(ROWS))]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        trl_value = float(trainer.compute_loss(trainer.model, dict(batch)))

    P = [e["prompt_ids"] for e in examples]
    C = [e["chosen_ids"] for e in examples]
    R = [e["rejected_ids"] for e in examples]
    ours_batch = collate(P + P, C + R, policy.tokenizer.pad_token_id)  # left-padded, our layout
    M = len(ROWS)
    with torch.no_grad():
        logp = policy_logprobs(policy.model, ours_batch)
        with policy.reference() as ref:
            ref_logp = policy_logprobs(ref, ours_batch)
    ours = float(dpo_loss(logp[:M], logp[M:], ref_logp[:M], ref_logp[M:], beta))
    assert abs(ours - 0.6931471805599453) > 1e-3, "degenerate check: policy equals reference"
    assert ours == pytest.approx(trl_value, abs=2e-6, rel=2e-6)


def pairs():
    return [PairRecord(domain="d", prompt=p, chosen=c.strip(), rejected=r.strip()) for p, c, r in ROWS]


def test_dpo_steps_lower_the_loss_and_separate_implicit_rewards():
    policy = tiny_policy()
    pset = build_preference_set(policy, pairs())
    before = evaluate_dpo_loss(policy, pset, beta=0.5)
    assert before == pytest.approx(0.6931471805599453, abs=1e-5)  # pi_theta0 = pi_ref
    stats = train_dpo(policy, pairs(), beta=0.5, epochs=15, lr=0.05, batch_size=2, seed=0)
    assert stats["initial_loss"] == pytest.approx(before)
    assert stats["final_loss"] < before - 0.05, stats["final_loss"]
    rc, rr = implicit_reward_scores(policy, pairs(), beta=0.5)
    assert float((rc > rr).double().mean()) >= 0.75
