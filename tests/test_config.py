"""Config validation (issue 13, item 5): every numeric and choice setting is checked, and the error names where the
value came from (file:line of its key, or --set)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from oodpl.config import RULES, Config, _rule_ok, _settings, load_config, with_overrides
from oodpl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

BAD = ["meta.outer_lr=-1", "meta.outer_lr=.nan", "meta.outer_lr=.inf", "meta.inner_lr=0", "meta.checkpoint_every=0",
       "meta.log_every=0", "policy.temperature=0", "train_rm.batch_size=0", "meta.outer_steps=0",
       "meta.meta_batch_domains=0", "policy.top_p=1.5", "train_rm.eval_fraction=1", "rloo.num_samples=1",
       "meta_test.beta_test=[0.1,-1]", "meta_test.optimizer=adamw", "policy.dtype=float8", "report_to=[mlflow]",
       "data.support_size=0", "rloo.beta=-0.1", "meta.grad_clip=-1", "eval.judge=gpt"]


@pytest.mark.parametrize("item", BAD)
def test_each_bad_value_is_one_line_naming_key_and_source(item):
    key = item.split("=")[0]
    with pytest.raises(UserError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", [item])
    msg = str(e.value)
    assert msg.startswith(f"--set: {key}=") and "must be" in msg and "\n" not in msg


def test_error_names_the_file_and_line_of_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("meta:\n  inner_steps: 2\n  outer_lr: .nan\n")
    with pytest.raises(UserError, match=r"c\.yaml:3: meta\.outer_lr=nan: must be a finite number"):
        load_config(cfg)
    cfg.write_text("meta:\n  inner_steps: 2\npolicy:\n  temperature: 0\n")
    with pytest.raises(UserError, match=r"c\.yaml:4: policy\.temperature=0\.0: must be > 0"):
        load_config(cfg)


def test_cross_setting_rule_and_programmatic_overrides():
    with pytest.raises(UserError, match="one-step is exact only"):
        load_config(None, ["meta.hypergrad=one-step", "meta.inner_steps=2"])
    with pytest.raises(UserError, match=r"^select\.grid: meta\.outer_lr=0\.0"):
        with_overrides(Config(), {"meta.outer_lr": 0.0}, where="select.grid")


def test_every_numeric_setting_has_a_rule_and_every_rule_a_setting():
    """Adding a numeric setting means adding its one line to config.RULES."""
    keys = set()
    for key, value, typ in _settings(Config()):
        keys.add(key)
        leaf = {a for a in typing.get_args(typ) if a is not type(None)} or {typ}
        leaf = {typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in leaf}
        if leaf & {int, float}:
            assert key in RULES, f"{key} has no validation rule in config.RULES"
    assert set(RULES) <= keys, set(RULES) - keys
    for key, rule in RULES.items():
        _rule_ok(rule, 1)  # every rule parses


def test_defaults_and_shipped_configs_are_valid():
    load_config(None)
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
