"""Hub loaders on small fixtures in the published schemas (offline)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from oodpl.data import hub, records
from oodpl.errors import UserError

FIX = Path(__file__).parents[1] / "fixtures"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIX / name).read_text().splitlines() if line.strip()]


def test_shp_pairs_follow_labels():
    pairs, prompts = hub.load_shp(data=_rows("shp_sample.jsonl"))
    assert len(pairs) == 7
    assert {p.domain for p in pairs} == {"shp_askculinary", "shp_askhistorians", "shp_explainlikeimfive"}
    by_prompt = {p.prompt: p for p in pairs}
    # labels == 1: A preferred; labels == 0: B preferred
    assert by_prompt["Why does my risotto turn out gluey?"].chosen.startswith("You are probably stirring")
    assert by_prompt["How do I get crispy roast potatoes?"].chosen.startswith("Parboil")
    assert by_prompt["How do I get crispy roast potatoes?"].rejected == "Eat them raw."
    assert math.isclose(by_prompt["Why does my risotto turn out gluey?"].margin, math.log(10.0))
    assert len(prompts) == 7 and all(x.reference is None for x in prompts)


def test_shp_filters():
    pairs, _ = hub.load_shp(data=_rows("shp_sample.jsonl"), subreddits=["askculinary", "shp_askhistorians"])
    assert {p.domain for p in pairs} == {"shp_askculinary", "shp_askhistorians"}
    pairs, _ = hub.load_shp(data=_rows("shp_sample.jsonl"), min_score_ratio=5.0)
    assert len(pairs) == 6  # only the 12/10 pair has a ratio below 5
    with pytest.raises(UserError, match="no pairs left"):
        hub.load_shp(data=_rows("shp_sample.jsonl"), subreddits=["nope"])


def test_shp_accepts_a_dataset():
    import datasets

    ds = datasets.Dataset.from_list(_rows("shp_sample.jsonl"))
    pairs, _ = hub.load_shp(data=ds)
    assert len(pairs) == 7


def test_shp_schema_error():
    rows = _rows("shp_sample.jsonl")
    del rows[2]["labels"]
    with pytest.raises(UserError, match=r"SHP row 2: missing field 'labels'"):
        hub.load_shp(data=rows)


def test_amazon_pairs_within_product():
    pairs, prompts = hub.load_amazon_reviews(data=_rows("amazon_reviews_sample.jsonl"))
    assert {p.domain for p in pairs} == {"amazon_all_beauty", "amazon_books"}
    for p in pairs:
        assert p.margin >= 2
        assert "product" in p.prompt
    # B002 has no review <= 2 stars: no pair for it
    assert not any("B002" in p.prompt for p in pairs)
    b001 = [p for p in pairs if "B001" in p.prompt]
    assert len(b001) == 2
    assert all(p.chosen.split(".")[0] in ("Love it", "Nice") for p in b001)
    assert len(prompts) == len({(p.domain, p.prompt) for p in pairs})
    again, _ = hub.load_amazon_reviews(data=_rows("amazon_reviews_sample.jsonl"))
    assert again == pairs


def test_amazon_dict_input_and_category_filter():
    rows = _rows("amazon_reviews_sample.jsonl")
    data = {"Books": [r for r in rows if r["category"] == "Books"],
            "All_Beauty": [r for r in rows if r["category"] == "All_Beauty"]}
    pairs, _ = hub.load_amazon_reviews(categories=["Books"], data=data)
    assert {p.domain for p in pairs} == {"amazon_books"}
    assert len(pairs) == 2


def test_hub_loaders_fail_fast_offline(monkeypatch):
    monkeypatch.setattr(records, "hub_available", lambda timeout=3.0: False)
    for call in (lambda: hub.load_shp(), lambda: hub.load_amazon_reviews(categories=["Books"])):
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:
            call()
        assert time.monotonic() - t0 < 5
        assert "offline" in str(e.value) and "oodpl data fetch" in str(e.value)
