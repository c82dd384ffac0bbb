"""TRL's LoRA reward models (`RewardTrainer(peft_config=LoraConfig(...))` output: an adapter directory) are accepted by
every --reward-model option and score exactly as `AutoPeftModelForSequenceClassification` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIX = Path(__file__).parents[1] / "fixtures"


def train_trl_lora_reward_model(tmp_path: Path, fixture: str = "ultrafeedback_binarized_sample.jsonl") -> Path:
    """A tiny GPT-2 reward model trained two steps by TRL's RewardTrainer with a LoRA peft_config; returns the
    adapter directory TRL saves (adapter_config.json, adapter weights with the score head, tokenizer)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from test_formats import _tiny_seqcls

    model, tok = _tiny_seqcls()
    base = tmp_path / "base_rm"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    rows = [json.loads(x) for x in (FIX / fixture).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("chosen", "rejected")} for r in rows])
    args = TRLRewardConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2,
                           learning_rate=5e-2, report_to=[], use_cpu=True, logging_strategy="no",
                           save_strategy="no", dataset_num_proc=None, disable_tqdm=True)
    trainer = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(base), args=args,
                            train_dataset=ds, processing_class=tok,
                            peft_config=LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["c_attn"]))
    trainer.train()
    out = tmp_path / "trl_lora_rm"
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    return out


def test_trl_lora_reward_model_scores_as_peft_and_is_accepted_by_the_cli(tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    from oodpl.runtime.checks import check_reward_model_dir
    from oodpl.config import RewardConfig
    from oodpl.data.records import read_pairs
    from oodpl.models.reward import load_reward_checkpoint

    rm_dir = train_trl_lora_reward_model(tmp_path)
    assert (rm_dir / "adapter_config.json").is_file() and not (rm_dir / "config.json").exists()
    check_reward_model_dir(rm_dir)  # accepted
    pairs = read_pairs(FIX / "ultrafeedback_binarized_sample.jsonl")
    rm = load_reward_checkpoint(rm_dir, RewardConfig(max_length=512))
    assert rm.input_format == "chat"  # no oodpl metadata; its tokenizer has a chat template, as TRL trained it
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    enc = rm.encode([p.prompt for p in pairs], [p.chosen for p in pairs])
    with torch.no_grad():
        want = peft_model(**enc).logits[:, 0]
        base_only = peft_model.get_base_model()
        with peft_model.disable_adapter():
            without = peft_model(**enc).logits[:, 0]
    torch.testing.assert_close(rm.score([p.prompt for p in pairs], [p.chosen for p in pairs]), want)
    assert not torch.allclose(want, without)  # the adapter matters
    assert base_only is not None


def test_cli_reward_model_options_accept_an_adapter_dir_and_refuse_a_causal_lm_adapter(tmp_path, capsys):
    from oodpl.cli.main import main

    rm_dir = train_trl_lora_reward_model(tmp_path)
    capsys.readouterr()  # TRL's training log
    common = ["--set", "policy.name_or_path=tiny-random", "--set", "reward.max_length=512", "--quiet"]
    assert main(["score", "--reward-model", str(rm_dir), "--prompt", "What is 2+2?", "--response", "4", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["reward"], float) and out["input_format"] == "chat"
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_checkpoint

    want = load_reward_checkpoint(rm_dir, RewardConfig(max_length=512)).score(["What is 2+2?"], ["4"])[0]
    assert out["reward"] == pytest.approx(float(want), abs=1e-6)
    conv = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}])
    assert main(["score", "--reward-model", str(rm_dir), "--prompt", conv, "--response", "4", *common]) == 0
    assert json.loads(capsys.readouterr().out)["reward"] != out["reward"]  # the system message is seen
    bad = tmp_path / "lm_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "peft_type": "LORA",
                                                         "base_model_name_or_path": "x"}))
    assert main(["score", "--reward-model", str(bad), "--prompt", "q", "--response", "r", *common]) == 2
    assert "CAUSAL_LM" in capsys.readouterr().err
