"""Deterministic, disjoint domain splits and the domain checks (synthetic data, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oodpl.config import DataConfig
from oodpl.data import DomainSplit, build_split, domain_stats
from oodpl.data.records import PairRecord, PromptRecord, write_jsonl
from oodpl.data.records import prompts_from_pairs
from oodpl.data.split import split_records
from oodpl.errors import UserError

FIX = Path(__file__).parents[1] / "fixtures"


def synthetic(domains=("a", "b", "c", "d", "e", "f"), n_prompts=40, pairs_per_prompt=2, pool_only=10):
    pairs, prompts = [], []
    for d in domains:
        for i in range(n_prompts):
            x = f"{d} prompt {i}"
            prompts.append(PromptRecord(d, x, reference=f"{d} reference {i}"))
            for j in range(pairs_per_prompt):
                pairs.append(PairRecord(d, x, f"{d} good {i}.{j}", f"{d} bad {i}.{j}", margin=1.0))
        for i in range(pool_only):
            prompts.append(PromptRecord(d, f"{d} pool prompt {i}"))
    return pairs, prompts


def cfg(**kw) -> DataConfig:
    base = dict(task="synthetic", support_size=8, query_size=12, eval_prompts=4, eval_pairs=10, seed=0,
                held_out_domains=["c", "f"])
    base.update(kw)
    return DataConfig(**base)


def _texts(pairs):
    return {t for p in pairs for t in (p.chosen, p.rejected)}


def test_split_sizes_and_roles():
    pairs, prompts = synthetic()
    s = split_records("synthetic", pairs, prompts, cfg())
    assert sorted(s.meta_train) == ["a", "b", "d", "e"] and sorted(s.held_out) == ["c", "f"]
    for d in s.meta_train.values():
        assert len(d.support_prompts) == 8 and len(d.query_pairs) == 12
        assert all(p.domain == d.name for p in d.query_pairs)
    for d in s.held_out.values():
        assert len(d.eval_prompts) == 4 and len(d.eval_pairs) == 10 and len(d.oracle_pairs) > 10
        assert any(x.reference for x in d.eval_prompts)
    assert len(s.pooled_pairs()) == 4 * 12


def test_split_is_deterministic_and_seed_dependent():
    pairs, prompts = synthetic()
    a = split_records("synthetic", pairs, prompts, cfg(seed=3)).to_json()
    b = split_records("synthetic", list(reversed(pairs)), list(reversed(prompts)), cfg(seed=3)).to_json()
    c = split_records("synthetic", pairs, prompts, cfg(seed=4)).to_json()
    assert json.dumps(a, sort_keys=True) == json.dumps(split_records("synthetic", pairs, prompts,
                                                                     cfg(seed=3)).to_json(), sort_keys=True)
    assert {n: sorted(x["prompt"] for x in d["support_prompts"]) for n, d in a["meta_train"].items()} == \
        {n: sorted(x["prompt"] for x in d["support_prompts"]) for n, d in b["meta_train"].items()}
    assert a != c


def test_no_text_shared_between_roles():
    pairs, prompts = synthetic()
    s = split_records("synthetic", pairs, prompts, cfg(seed=7))
    for d in s.meta_train.values():
        support = {x.prompt for x in d.support_prompts}
        query = {p.prompt for p in d.query_pairs}
        assert not support & query
    for d in s.held_out.values():
        ev = {x.prompt for x in d.eval_prompts}
        evp = {p.prompt for p in d.eval_pairs}
        orc = {p.prompt for p in d.oracle_pairs}
        assert not ev & evp and not ev & orc and not evp & orc
        assert not _texts(d.eval_pairs) & _texts(d.oracle_pairs)


def test_shared_response_text_is_removed_from_oracle():
    pairs, prompts = synthetic(domains=("a", "b"), n_prompts=30)
    # every oracle candidate reuses an eval answer as its chosen text: those must be dropped
    shared = [PairRecord("b", f"b extra {i}", "b good 0.0", f"b other {i}") for i in range(30)]
    s = split_records("synthetic", pairs + shared, prompts, cfg(held_out_domains=["b"], eval_pairs=200))
    d = s.held_out["b"]
    eval_good = {p.chosen for p in d.eval_pairs} | {x.reference for x in d.eval_prompts if x.reference}
    assert not {p.chosen for p in d.oracle_pairs} & eval_good


def test_max_domains_and_explicit_meta_train():
    pairs, prompts = synthetic()
    s = split_records("synthetic", pairs, prompts, cfg(max_domains=2))
    assert len(s.meta_train) == 2 and set(s.meta_train) <= {"a", "b", "d", "e"}
    s = split_records("synthetic", pairs, prompts, cfg(meta_train_domains=["e", "a"]))
    assert sorted(s.meta_train) == ["a", "e"]


def test_same_domain_in_both_lists():
    pairs, prompts = synthetic()
    with pytest.raises(UserError, match="domain c is both meta-train and held-out"):
        split_records("synthetic", pairs, prompts, cfg(meta_train_domains=["a", "c"]))


def test_unknown_domain_lists_known():
    pairs, prompts = synthetic()
    with pytest.raises(UserError, match=r"unknown domain 'zz'; known domains are a, b, c, d, e, f"):
        split_records("synthetic", pairs, prompts, cfg(held_out_domains=["zz"]))
    with pytest.raises(UserError, match=r"data.meta_train_domains: unknown domain 'q'"):
        split_records("synthetic", pairs, prompts, cfg(meta_train_domains=["q"]))


def test_domain_without_pairs_or_prompts():
    pairs, prompts = synthetic()
    no_pairs = [p for p in pairs if p.domain != "b"]
    with pytest.raises(UserError, match=r"domain b has 0 pairs and 50 prompts"):
        split_records("synthetic", no_pairs, prompts, cfg())
    no_prompts = [x for x in prompts if x.domain != "c"]
    with pytest.raises(UserError, match=r"domain c has 80 pairs and 0 prompts"):
        split_records("synthetic", pairs, no_prompts, cfg())


def test_too_small_domain_names_counts():
    pairs, prompts = synthetic()
    tiny_pairs = [PairRecord("g", "g only", "good", "bad")]
    tiny_prompts = [PromptRecord("g", "g pool")]
    with pytest.raises(UserError) as e:
        split_records("synthetic", pairs + tiny_pairs, prompts + tiny_prompts, cfg())
    msg = str(e.value)
    assert "meta-train domain g" in msg and "query has 1 pair (needs >= 2)" in msg and "1 pairs and 1 prompts" in msg
    assert "support" not in msg.split(":")[2].split(";")[0]  # only the short role is named as short
    with pytest.raises(UserError, match=r"held-out domain g .*eval_pairs has 1 pair \(needs >= 2\)"):
        split_records("synthetic", pairs + tiny_pairs, prompts + tiny_prompts, cfg(held_out_domains=["g"]))


def test_oracle_pairs_are_required_only_by_oracle_rm_and_the_error_says_why():
    from oodpl.data.split import require_oracle_pairs

    pairs, prompts = synthetic()
    # domain g: every pair's chosen answer is the same text, so every oracle pair duplicates an eval pair's answer
    g_pairs = [PairRecord("g", f"g question {i}", "the one good answer", f"bad {i}") for i in range(6)]
    g_prompts = [PromptRecord("g", f"g question {i}") for i in range(6)]
    s = split_records("synthetic", pairs + g_pairs, prompts + g_prompts,
                      cfg(held_out_domains=["g"], adapt_prompts=1, eval_prompts=1, eval_pairs=2))
    ho = s.held_out["g"]
    assert len(ho.eval_pairs) == 2 and ho.oracle_pairs == [] and ho.oracle_dropped >= 2  # meta-train can go on
    with pytest.raises(UserError, match=r"held-out domain g has 0 oracle pairs .*all oracle pairs duplicate eval "
                                        r"pairs: \d+ of its \d+ oracle pairs were dropped"):
        require_oracle_pairs(s)
    require_oracle_pairs(split_records("synthetic", pairs, prompts, cfg()))  # enough: no error


def test_small_domains_get_fewer():
    pairs, prompts = synthetic(n_prompts=6, pool_only=0)
    s = split_records("synthetic", pairs, prompts, cfg(support_size=100, query_size=100, eval_prompts=100,
                                                       eval_pairs=100))
    for d in s.meta_train.values():
        assert len(d.support_prompts) + len({p.prompt for p in d.query_pairs}) == 6
    for d in s.held_out.values():
        assert len(d.eval_prompts) >= 1 and len(d.eval_pairs) >= 2 and len(d.oracle_pairs) >= 2


def test_to_json_roundtrip(tmp_path):
    pairs, prompts = synthetic()
    s = split_records("synthetic", pairs, prompts, cfg())
    assert DomainSplit.from_json(s.to_json()) == s
    assert DomainSplit.from_json(json.dumps(s.to_json())) == s
    s.save(tmp_path / "split.json")
    assert DomainSplit.load(tmp_path / "split.json") == s
    with pytest.raises(UserError, match="not in the DomainSplit format"):
        DomainSplit.from_json({"task": "x"})


def test_build_split_from_files(tmp_path):
    pairs, prompts = synthetic()
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    c = cfg(task="file", path=str(tmp_path / "pairs.jsonl"), prompts_path=str(tmp_path / "prompts.jsonl"))
    s = build_split(c)
    assert s.task == "file" and sorted(s.held_out) == ["c", "f"]
    # without a prompts file the prompts are the distinct pair prompts; default held-out: every third domain
    s2 = build_split(cfg(task="file", path=str(tmp_path / "pairs.jsonl"), held_out_domains=None))
    assert sorted(s2.held_out) == ["c", "f"]
    with pytest.raises(UserError, match="data.path is not set"):
        build_split(DataConfig(task="file"))
    with pytest.raises(UserError, match="data.task 'nope' is unknown"):
        build_split(DataConfig(task="nope"))


def test_fixture_file_default_split_fails_clearly_when_too_small():
    # 3 domains with 2-3 pairs each: too few pairs for the roles
    with pytest.raises(UserError, match=r"domain (gardening|travel) has too little data"):
        build_split(DataConfig(task="file", path=str(FIX / "pairs.jsonl")))


def test_single_domain_file_is_refused(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", [PairRecord("only", f"p{i}", "a", "b") for i in range(5)])
    with pytest.raises(UserError, match="needs at least two"):
        build_split(DataConfig(task="file", path=str(tmp_path / "one.jsonl")))


def test_domain_stats():
    pairs, prompts = synthetic(domains=("a",), n_prompts=3, pairs_per_prompt=1, pool_only=1)
    st = domain_stats(pairs, prompts)
    assert st["a"]["pairs"] == 3 and st["a"]["prompts"] == 4 and st["a"]["pair_prompts"] == 3
    assert st["a"]["chosen_words_max"] == 3 and st["a"]["margin_mean"] == 1.0
    assert len(prompts_from_pairs(pairs + pairs)) == 3


def test_left_out_split_deals_unused_domains_like_meta_train(monkeypatch):
    """The left-out diagnostic's domains: neither meta-train nor held out, at most `limit`, dealt exactly as they
    would be as meta-train domains; a domain too small for the query size is skipped, none left gives an empty split."""
    import oodpl.data.split as sp

    pairs, prompts = synthetic(domains=("a", "b", "c", "d", "e", "f", "g"))
    small_p, small_x = synthetic(domains=("h",), n_prompts=1, pool_only=0)  # one prompt: support or query empty
    monkeypatch.setattr(sp, "load_records", lambda c: (pairs + small_p, prompts + small_x))
    c = cfg(meta_train_domains=["d", "g"])
    split = split_records("synthetic", pairs + small_p, prompts + small_x, c)
    unused = {"a", "b", "d", "e", "g"} - set(split.meta_train)
    left = sp.left_out_split(c, split, limit=2)
    assert len(left.meta_train) == 2 and set(left.meta_train) <= unused and not left.held_out
    full = split_records("synthetic", pairs, prompts, cfg(meta_train_domains=sorted(unused)))
    for name, dom in left.meta_train.items():
        assert dom.query_pairs == full.meta_train[name].query_pairs
        assert dom.support_prompts == full.meta_train[name].support_prompts
    assert set(sp.left_out_split(c, split, limit=10).meta_train) == unused  # h (too small) skipped
    everything = split_records("synthetic", pairs, prompts, cfg())
    monkeypatch.setattr(sp, "load_records", lambda c: (pairs, prompts))
    assert not sp.left_out_split(cfg(), everything).meta_train
