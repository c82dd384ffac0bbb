"""results.py, the results.json v2 schema, on the results.json of a real tiny benchmark run (configs/tiny.yaml, one
seed): Results round-trips the file exactly (keys, order, bytes), the report and CSV rebuilt from it are the ones the
run wrote, another version is refused, and the keys later v2 writers added may be missing."""

from __future__ import annotations

import copy
import json

import pytest

from oodpl.cli.main import main
from oodpl.errors import UserError, _json_default
from oodpl.experiment.report import render_report, write_csv
from oodpl.experiment.results import SCHEMA_VERSION, Cell, Results

OPTIONAL = ("method_notes", "left_out", "fit")  # added to results.json during v2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny benchmark (one seed, the evidence methods, the left-out and fit diagnostics)."""
    out = tmp_path_factory.mktemp("results") / "bench"
    assert main(["--quiet", "benchmark", "--config", "configs/tiny.yaml", "--output", str(out),
                 "--set", "benchmark.seeds=[0]", "--set", "meta_test.steps=1"]) == 0
    return out


def stored(run) -> dict:
    return json.loads((run / "results.json").read_text())


def test_round_trip_is_exact(run):
    d = stored(run)
    r = Results.from_json(d)
    assert r.version == SCHEMA_VERSION and all(isinstance(c, Cell) for c in r.cells)
    assert len(r.cells) == len(r.seeds) * len(r.domains) * len(r.methods) > 0
    assert r.left_out and r.fit and r.method_notes  # the optional sections are there in a new file
    assert r.to_json() == d
    assert Results.from_json(r.to_json()).to_json() == r.to_json()
    assert list(r.to_json()) == list(d)  # the same keys in the same order, cells too
    assert all(list(c.to_json()) == list(e) for c, e in zip(r.cells, d["cells"]))
    text = json.dumps(r.to_json(), indent=2, default=_json_default) + "\n"  # as errors.atomic_write_json writes
    assert text == (run / "results.json").read_text()


def test_report_and_csv_rebuilt_from_the_file_are_the_runs(run, tmp_path):
    r = Results.from_json(stored(run))
    made = {p.name for p in (run / "plots").iterdir()}
    plots = [f"plots/{n}" for n in ("frontier.png", "by_domain.png", "meta_training.png") if n in made]  # make_plots'
    assert render_report(r, plots, run) == (run / "report.md").read_text()
    write_csv(tmp_path / "results.csv", r)
    assert (tmp_path / "results.csv").read_text() == (run / "results.csv").read_text()


@pytest.mark.parametrize("version", [1, 3, None])
def test_another_version_is_refused_in_one_line(run, version):
    d = stored(run)
    if version is None:
        del d["version"]
    else:
        d["version"] = version
    with pytest.raises(UserError) as err:
        Results.from_json(d)
    msg = str(err.value)
    assert "\n" not in msg and f"version {version!r}" in msg and f"version {SCHEMA_VERSION}" in msg


def test_missing_optional_keys_read_as_empty(run, tmp_path):
    d = stored(run)
    old = copy.deepcopy(d)
    for k in OPTIONAL:
        del old[k]
    for c in old["cells"]:
        del c["reward_spread_ref"]
    r = Results.from_json(old)
    assert (r.method_notes, r.left_out, r.fit) == ({}, [], [])
    assert all(c.reward_spread_ref is None for c in r.cells)
    md = render_report(old, [], tmp_path)  # the report's entry points take the dict as well
    assert "## Verdicts" in md and "## Methods" not in md and "### Outer loss on left-out" not in md


@pytest.mark.parametrize("where, key", [("file", "cells"), ("file", "betas"), ("cell", "units")])
def test_missing_required_key_is_named(run, where, key):
    d = stored(run)
    del (d if where == "file" else d["cells"][1])[key]
    with pytest.raises(UserError, match=f"{'cell 1' if where == 'cell' else 'the file'} has no '{key}'"):
        Results.from_json(d)


def test_oodpl_report_renders_the_run_again_and_says_so(run, tmp_path, capsys):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(run, copy_dir)
    (copy_dir / "report.md").unlink()
    assert main(["--quiet", "report", str(copy_dir)]) == 0
    again, first = (copy_dir / "report.md").read_text().splitlines(), (run / "report.md").read_text().splitlines()
    assert "rendered again from results.json by `oodpl report" in again[2] and again[2].startswith(first[2][:-1])
    assert again[3:] == first[3:]  # the same numbers and text: nothing is recomputed
    assert (copy_dir / "results.csv").read_text() == (run / "results.csv").read_text()
    capsys.readouterr()
    assert main(["--quiet", "report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _part(res: dict, methods: list[str]) -> dict:
    """The results a run of only `methods` would have written (the same run's cells and diagnostics, cut)."""
    part = copy.deepcopy(res)
    part["methods"] = [m for m in res["methods"] if m in methods]
    part["config"]["benchmark"]["methods"] = list(part["methods"])
    part["cells"] = [c for c in res["cells"] if c["method"] in methods]
    part["baselines"] = [m for m in res["baselines"] if m in methods]
    part["method_notes"] = {m: v for m, v in res["method_notes"].items() if m in methods}
    for rec in part["left_out"] + part["fit"]:
        rec["methods"] = {m: v for m, v in rec["methods"].items() if m in methods}
        for draws in (rec.get("leverage") or {}).values():
            for draw in draws:
                for m in [k for k in draw if k in res["methods"] and k not in methods]:
                    del draw[m]
    return part


def test_two_parts_of_a_preset_merge_into_the_whole_and_a_mismatch_is_refused(run, tmp_path, capsys):
    from oodpl.experiment.results import merge_results

    res = stored(run)
    base, other = _part(res, ["reference", "erm-rm", "erm-rm-extra", "meta-rm"]), _part(res, ["erm-rm", "dpo"])
    merged = merge_results(Results.from_json(base), Results.from_json(other), "part-2").to_json()
    assert merged["methods"] == ["reference", "erm-rm", "erm-rm-extra", "meta-rm", "dpo"]
    key = lambda c: (c["seed"], c["domain"], c["method"])  # noqa: E731
    assert sorted(merged["cells"], key=key) == sorted(res["cells"], key=key)  # every cell, once, as the run wrote it
    assert merged["left_out"] == _part(res, merged["methods"])["left_out"]
    assert "dpo" in merged["provenance"]["merged"] and "erm-rm identical" in merged["provenance"]["merged"]

    bad = copy.deepcopy(other)  # a shared method that differs: the runs did not compute the same thing
    next(c for c in bad["cells"] if c["method"] == "erm-rm")["metrics"]["pl_accuracy"] += 0.01
    with pytest.raises(UserError, match="erm-rm's cell .* differs"):
        merge_results(Results.from_json(base), Results.from_json(bad))
    bad = copy.deepcopy(other)  # another setting than benchmark.methods
    bad["config"]["rloo"]["beta"] = 0.123
    with pytest.raises(UserError, match="configuration differs .* rloo"):
        merge_results(Results.from_json(base), Results.from_json(bad))
    with pytest.raises(UserError, match="shares no method"):
        merge_results(Results.from_json(base), Results.from_json(_part(res, ["dpo"])))

    # the CLI: DIR is only read, the merged run goes to --output
    for name, part in (("a", base), ("b", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part, default=_json_default))
    assert main(["--quiet", "report", str(tmp_path / "a"), "--with", str(tmp_path / "b"),
                 "--output", str(tmp_path / "ab")]) == 0
    assert json.loads((tmp_path / "ab" / "results.json").read_text())["methods"] == merged["methods"]
    assert "--with" in (tmp_path / "ab" / "report.md").read_text().splitlines()[2]
    assert not (tmp_path / "a" / "report.md").exists()
    capsys.readouterr()
    assert main(["--quiet", "report", str(tmp_path / "a"), "--with", str(tmp_path / "b")]) == 2
    assert "add --output" in capsys.readouterr().err
