"""The public Python API (oodpl.api, exported from `oodpl`): meta-training, a reward model, alignment and generation
from an in-memory datasets.Dataset / list of dicts, on tiny models; the same outputs as the CLI."""

from __future__ import annotations

import json

import pytest


def rows():
    return [{"domain": d, "prompt": f"{d} says {i}", "chosen": f"lovely kind words {i}", "rejected": f"awful bad {i}"}
            for d in ("alpha", "beta", "gamma") for i in range(8)]


def tiny_overrides():
    return {"policy.name_or_path": "tiny-random", "reward.name_or_path": "tiny-random",
            "data.held_out_domains": ["gamma"], "data.support_size": 4, "data.query_size": 4,
            "data.adapt_prompts": 2, "data.eval_prompts": 2, "data.eval_pairs": 2, "rloo.batch_prompts": 2,
            "rloo.num_samples": 2, "policy.max_new_tokens": 3, "meta.outer_steps": 2, "meta.query_batch": 4,
            "meta.init": "scratch", "meta_test.steps": 1, "report_to": ["none"], "quiet": True}


def test_import_oodpl_is_light_and_exports_the_api():
    import subprocess
    import sys

    code = ("import sys, oodpl; print('torch' in sys.modules); "
            "print(sorted(n for n in ['meta_train', 'align', 'train_reward_model', 'generate', 'benchmark', "
            "'load_config', 'Config'] if hasattr(oodpl, n)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split("\n")
    assert out[0] == "False"
    assert out[1] == str(sorted(["Config", "align", "benchmark", "generate", "load_config", "meta_train",
                                 "train_reward_model"]))


def test_meta_train_align_and_generate_from_an_in_memory_dataset(tmp_path):
    import datasets

    from oodpl import align
    from oodpl import generate
    from oodpl import meta_train
    from oodpl import train_reward_model
    from oodpl.train.metatrain import meta_train as cli_meta_train

    ds = datasets.Dataset.from_list(rows())
    summary = meta_train(tmp_path / "meta", overrides=tiny_overrides(), pairs=ds)
    assert summary["domains"] == ["alpha", "beta"]  # gamma is held out
    split = json.loads((tmp_path / "meta" / "split.json").read_text())
    assert sorted(split["held_out"]) == ["gamma"]
    # the same run from the same rows as a list of dicts: identical reward model (content-addressed data snapshot)
    again = meta_train(tmp_path / "meta2", overrides=tiny_overrides(), pairs=rows())
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "meta" / "reward_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "meta2" / "reward_model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert again["domains"] == summary["domains"]
    assert cli_meta_train is not meta_train  # the API wraps the stage, it does not replace it

    prompts = [{"domain": "newdom", "prompt": f"new prompt {i}"} for i in range(3)]
    index = align(tmp_path / "align", overrides={**tiny_overrides(), "meta_test.beta_test": [0.1]},
                  reward_model=summary["reward_model"], prompts=prompts)
    assert (tmp_path / "align" / "policies" / "newdom" / "beta_0.1" / "adapter_config.json").exists(), index
    out = generate(tmp_path / "gen.jsonl", overrides=tiny_overrides(), prompts=prompts,
                   policy=tmp_path / "align" / "policies" / "newdom" / "beta_0.1")
    lines = (tmp_path / "gen.jsonl").read_text().splitlines()
    assert len(lines) == 3 and out["responses"] == 3

    rm = train_reward_model(tmp_path / "rm", overrides=tiny_overrides(), pairs=ds)
    assert rm["method"] == "erm-rm" and set(rm["accuracy"]["after"]) == {"alpha", "beta", "gamma"}


def test_api_refuses_what_is_not_data_or_config(tmp_path):
    from oodpl import UserError, meta_train

    with pytest.raises(UserError, match="expected a path, a datasets.Dataset"):
        meta_train(tmp_path / "m", overrides=tiny_overrides(), pairs=42)
    with pytest.raises(UserError, match="expected a oodpl Config"):
        meta_train(tmp_path / "m", config={"meta": {}})
