"""scripts/publish_evidence.py --diagnostics-from: a policy-level report takes its companion's fit and leverage
sections only when both reports scored the same reward models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("publish_evidence", ROOT / "scripts" / "publish_evidence.py")
publish = importlib.util.module_from_spec(spec)
spec.loader.exec_module(publish)


def report(erm_pl: str, diagnostics: str = "| seed | method |\n|---|---|\n") -> str:
    return (
        "# oodpl benchmark report\n\n## Summary per method\n\n"
        "| method | pl_accuracy (primary) | rm_gold_agreement (primary) | kl (descriptive) |\n|---|---|---|---|\n"
        "| reference | n/a | n/a | 0.000 |\n"
        f"| erm-rm | {erm_pl} | 0.598 [0.497, 0.699] (n=9) | 0.7 |\n\nlegend\n\n"
        f"## Diagnostics\n\n{diagnostics}\n## Selection\n\nnone\n")


COMPANION_DIAG = "own table\n\n### Leverage (headroom) on left-out meta-train domains\n\nH = 0.0265 nats\n"


def test_copies_the_companions_subsections_when_the_reward_models_match(tmp_path):
    companion = tmp_path / "evidence_x.md"
    companion.write_text(report("0.749 [0.683, 0.816] (n=9)", COMPANION_DIAG))
    out = publish.diagnostics_from(report("0.749 [0.683, 0.816] (n=9)"), companion)
    assert "### Leverage (headroom) on left-out meta-train domains\n\nH = 0.0265 nats" in out
    assert "own table" not in out  # the companion's own training logs stay there
    assert "(erm-rm:" in out  # the shared reward models it checked


def test_refuses_a_companion_with_other_reward_models(tmp_path):
    companion = tmp_path / "evidence_x.md"
    companion.write_text(report("0.639 [0.604, 0.673] (n=9)", COMPANION_DIAG))
    with pytest.raises(publish.PublishError, match="erm-rm's pl_accuracy"):
        publish.diagnostics_from(report("0.749 [0.683, 0.816] (n=9)"), companion)


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert publish.main(["--run", str(tmp_path), "--name", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_missing_companion_exits_2(tmp_path, capsys):
    (tmp_path / "report.md").write_text(report("0.749 [0.683, 0.816] (n=9)"))
    args = ["--run", str(tmp_path), "--name", "x", "--diagnostics-from", str(tmp_path / "nope.md")]
    assert publish.main(args) == 2
    assert "nope.md does not exist" in capsys.readouterr().err
