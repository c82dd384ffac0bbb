"""rundir.open_run: the start-up every stage shares (claim, split, config.yaml + split.json, commit)."""

from __future__ import annotations

import json

import pytest

import oodpl.data.split
from oodpl.config import load_config
from oodpl.errors import UserError
from oodpl.runtime.rundir import RunLayout, open_run
from oodpl.data.split import load_or_build_split

PAIRS = [{"domain": d, "prompt": f"{d} says {i}", "chosen": f"kind words {i}", "rejected": f"awful {i}"}
         for d in ("alpha", "beta", "gamma") for i in range(8)]


@pytest.fixture
def cfg(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return load_config(None, ["data.task=file", f"data.path={pairs}", "data.held_out_domains=[gamma]",
                              "data.support_size=2", "data.query_size=2"])


def test_layout_names_the_shared_paths(tmp_path):
    lay = RunLayout(tmp_path)
    assert [p.name for p in (lay.marker, lay.config, lay.split, lay.metrics, lay.reward_model)] == \
        ["oodpl_run.json", "config.yaml", "split.json", "metrics.jsonl", "reward_model"]
    assert lay.latest_checkpoint == tmp_path / "checkpoints" / "latest"
    assert lay.base_model == tmp_path / "policies" / "base_model"
    assert lay.finished.report == tmp_path / "finished" / "report.md"


def test_open_run_records_the_start_and_a_rerun_reads_the_stored_split(tmp_path, cfg, monkeypatch):
    out = tmp_path / "run"
    with open_run(out, "select", cfg.fingerprint(), cfg) as run:
        split = load_or_build_split(run.layout.split, run.cfg.data)
        run.record(split)
        run.commit()
    assert sorted(p.name for p in out.iterdir()) == [".oodpl.lock", "config.yaml", "oodpl_run.json", "split.json"]
    assert json.loads(run.layout.marker.read_text())["kind"] == "select"
    stored = run.layout.split.read_text()

    def no_build(data):
        raise AssertionError("the stored split is read, not rebuilt")

    monkeypatch.setattr(oodpl.data.split, "build_split", no_build)
    with open_run(out, "select", cfg.fingerprint(), cfg) as run:
        assert sorted(load_or_build_split(run.layout.split, run.cfg.data).held_out) == ["gamma"]
        run.record(load_or_build_split(run.layout.split, run.cfg.data))
        run.commit()
    assert run.layout.split.read_text() == stored


def test_a_start_that_fails_before_commit_leaves_nothing(tmp_path, cfg):
    out = tmp_path / "new" / "run"
    with pytest.raises(UserError, match="bad"):
        with open_run(out, "select", cfg.fingerprint(), cfg) as run:
            run.record(load_or_build_split(run.layout.split, run.cfg.data))
            raise UserError("bad")
    assert not (tmp_path / "new").exists()


def test_only_the_process_holding_the_claim_writes(tmp_path, cfg):
    out = tmp_path / "run"
    out.mkdir()
    with open_run(out, "meta-test", cfg.fingerprint(), cfg, enabled=False) as run:
        run.record(load_or_build_split(run.layout.split, run.cfg.data))
        run.commit()
    assert list(out.iterdir()) == []
