"""The CLI: subcommands, and bad input -> exit status 2, one readable line, nothing half-written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from oodpl.cli.main import main

TINY = ["--set", "policy.name_or_path=tiny-random", "--set", "reward.name_or_path=tiny-random"]


def run(capsys, *argv):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("oodpl: error: ")
    assert "Traceback" not in err
    return lines[0]


def write_pairs(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"domain": d, "prompt": f"{d} prompt {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
        for d in ("alpha", "beta") for i in range(6)]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("data", "train-rm", "meta-train", "meta-test", "evaluate", "benchmark", "select", "theory"):
        assert cmd in out


def test_malformed_json_line_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n{not json\n")
    line = one_line_error(*run(capsys, "data", "validate", str(p))[::2])
    assert "pairs.jsonl:2" in line


def test_missing_column(tmp_path, capsys):
    p = write_pairs(tmp_path / "pairs.jsonl", [{"domain": "a", "prompt": "x", "chosen": "y", "loser": "z"}])
    line = one_line_error(*run(capsys, "data", "validate", str(p), "--kind", "pairs")[::2])
    assert "rejected" in line


def test_empty_string(tmp_path, capsys):
    p = write_pairs(tmp_path / "pairs.jsonl", [{"domain": "a", "prompt": "x", "chosen": "", "rejected": "z"}])
    line = one_line_error(*run(capsys, "data", "validate", str(p), "--kind", "pairs")[::2])
    assert "pairs.jsonl:1" in line


def test_bad_config_key_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("meta:\n  inner_steps: 2\n  innr_lr: 0.1\n")
    line = one_line_error(*run(capsys, "meta-train", "-c", str(cfg), "-o", str(tmp_path / "out"))[::2])
    assert "c.yaml:3" in line and "innr_lr" in line
    assert not (tmp_path / "out").exists()


def test_bad_override(capsys, tmp_path):
    line = one_line_error(*run(capsys, "meta-train", "-o", str(tmp_path / "o"), "--set", "meta.inner_steps=many")[::2])
    assert "meta.inner_steps" in line


def test_domain_in_both_roles(tmp_path, capsys):
    p = write_pairs(tmp_path / "pairs.jsonl", GOOD)
    line = one_line_error(*run(capsys, "meta-train", "-o", str(tmp_path / "out"), *TINY, "--set", "data.task=file",
                               "--set", f"data.path={p}", "--set", "data.meta_train_domains=[alpha,beta]",
                               "--set", "data.held_out_domains=[beta]")[::2])
    assert "beta" in line


def test_unknown_domain(tmp_path, capsys):
    p = write_pairs(tmp_path / "pairs.jsonl", GOOD)
    line = one_line_error(*run(capsys, "meta-train", "-o", str(tmp_path / "out"), *TINY, "--set", "data.task=file",
                               "--set", f"data.path={p}", "--set", "data.held_out_domains=[gamma]")[::2])
    assert "gamma" in line


def test_model_path_that_does_not_exist(tmp_path, capsys):
    p = write_pairs(tmp_path / "pairs.jsonl", GOOD)
    line = one_line_error(*run(capsys, "train-rm", "-o", str(tmp_path / "out"), "--pairs", str(p),
                               "--set", "reward.name_or_path=./no/such/model")[::2])
    assert "does not exist" in line
    assert not (tmp_path / "out" / "reward_model").exists()


def test_hub_id_offline_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = write_pairs(tmp_path / "pairs.jsonl", GOOD)
    start = time.time()
    line = one_line_error(*run(capsys, "train-rm", "-o", str(tmp_path / "out"), "--pairs", str(p),
                               "--set", "reward.name_or_path=someorg/some-reward-model")[::2])
    assert time.time() - start < 10
    assert "offline" in line


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = write_pairs(tmp_path / "pairs.jsonl", GOOD)
    line = one_line_error(*run(capsys, "train-rm", "-o", str(blocker / "sub"), "--pairs", str(p), *TINY)[::2])
    assert "output" in line


def test_output_dir_with_other_content_or_other_run(tmp_path, capsys):
    p = write_pairs(tmp_path / "pairs.jsonl", GOOD)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_line_error(*run(capsys, "train-rm", "-o", str(other), "--pairs", str(p), *TINY)[::2])
    assert (other / "notes.txt").read_text() == "mine"
    out = tmp_path / "run"
    code, _, _ = run(capsys, "train-rm", "-o", str(out), "--pairs", str(p), *TINY)
    assert code == 0
    line = one_line_error(*run(capsys, "train-rm", "-o", str(out), "--pairs", str(p), *TINY,
                               "--set", "train_rm.lr=0.1")[::2])
    assert "different" in line


def test_train_rm_writes_checkpoint_and_per_domain_accuracy(tmp_path, capsys):
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model

    p = write_pairs(tmp_path / "pairs.jsonl", GOOD)
    out = tmp_path / "rm"
    code, stdout, _ = run(capsys, "train-rm", "-o", str(out), "--pairs", str(p), *TINY, "--set", "train_rm.epochs=2")
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]["after"]) == {"alpha", "beta"}
    rm = load_reward_model(RewardConfig(name_or_path=str(out / "reward_model")))
    assert rm.score(["alpha prompt 0"], ["good answer 0"]).shape == (1,)


def test_debug_shows_traceback(tmp_path):
    from oodpl.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "data", "validate", str(tmp_path / "missing.jsonl")])


def test_every_lazy_import_of_the_cli_resolves():
    """The subcommands import their modules inside the handler (fast --help); every such name must exist there (a
    function that moved, e.g. meta_test_command from benchmark to metatest, would otherwise fail only when run)."""
    import ast
    import importlib

    import oodpl.cli.main

    tree = ast.parse(Path(oodpl.cli.main.__file__).read_text())
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("oodpl"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule (from oodpl.cli import data)
                    importlib.import_module(f"{node.module}.{alias.name}")
                checked += 1
    assert checked >= 10


def test_config_show_effective_values_and_full_meanings(capsys):
    from oodpl.config import PolicyConfig  # noqa: F401  (the meanings come from its comments)

    root = Path(__file__).parents[1]
    assert main(["config", "show", "policy", "--config", str(root / "configs" / "quick.yaml")]) == 0
    out = capsys.readouterr().out
    assert "policy.trainable_layers" in out and "4 (default null)" in out
    assert "..." not in out.replace("Qwen...", "")  # meanings in full (the Qwen... is the comment's own)
    text = " ".join(out.split())
    assert "are set by those settings" in text  # the end of policy.peft_config's long meaning
    assert main(["config", "show", "meta", "--set", "meta.outer_steps=7"]) == 0
    assert "7 (default 20)" in capsys.readouterr().out


def test_progress_lines_for_model_loading_and_quiet(tmp_path, capsys):
    """Loading a model says so on stderr (with its time); --quiet says nothing but errors."""
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model

    rm = load_reward_model(RewardConfig(name_or_path="tiny-random"))
    rm.save(tmp_path / "rm")
    args = ["score", "--reward-model", str(tmp_path / "rm"), "--prompt", "the film was", "--response", " great"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "oodpl: loading the reward model" in err and "done in" in err
    assert main(["--quiet", *args]) == 0
    assert capsys.readouterr().err == ""


def test_quiet_silences_every_library_bar_even_with_debug(tmp_path):
    """A fresh process (tqdm reads its settings on import): --quiet --debug while transformers saves and loads
    shards: no progress bar on stderr."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from oodpl.cli.main import _quiet_libraries\n"
        "_quiet_libraries(debug=True, quiet=True)\n"
        "import torch\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,\n"
        "    num_attention_heads=2, intermediate_size=8))\n"
        "m.save_pretrained(sys.argv[1])\n"
        "BertForSequenceClassification.from_pretrained(sys.argv[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k and not k.startswith("TQDM_")}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "it/s]" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
    loud = subprocess.run([sys.executable, "-c", script.replace("quiet=True", "quiet=False"), str(tmp_path / "n")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert "%|" in loud.stderr  # the check can fail: without --quiet (and with --debug) the bars are there
