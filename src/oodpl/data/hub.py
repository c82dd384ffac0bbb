"""Preference data from the Hugging Face hub, for users whose machine can reach it.

- `load_shp`: Stanford Human Preferences (`stanfordnlp/SHP`), one domain per subreddit (`shp_<subreddit>`).
  Row schema: post_id, domain (e.g. `askculinary_train`), upvote_ratio, history, c_root_id_A, c_root_id_B,
  created_at_utc_A, created_at_utc_B, score_A, score_B, human_ref_A, human_ref_B, labels (1: A preferred), ...,
  score_ratio. Pair: prompt = history, chosen / rejected = the preferred / other comment, margin = ln(score_ratio).
- `load_amazon_reviews`: Amazon Reviews 2023 (`McAuley-Lab/Amazon-Reviews-2023`, configs `raw_review_<Category>`),
  one domain per category (`amazon_<category>`). Row schema: rating (1-5), title, text, images, asin, parent_asin,
  user_id, timestamp, helpful_vote, verified_purchase. Pairs are made within one product (parent_asin): reviews are
  shuffled (seeded), split into those with rating >= 4 and those with rating <= 2, and paired in order while the
  star gap is >= `min_star_gap`; each review is used once. prompt = "Write a customer review of the <category>
  product <product>." where <product> is the row's `product_title` (when the rows were joined with the product
  metadata) or its parent_asin; chosen / rejected = "<title>. <text>" of the higher / lower rated review; margin =
  the star gap.

Both take `data=` (a `datasets.Dataset`, a list of dicts, or for Amazon a dict category -> rows) so that they run
offline; without it they call `datasets.load_dataset` and fail fast with a UserError when the hub is unreachable.
Both return (pairs, prompts); prompts are the distinct prompts per domain.
"""

from __future__ import annotations

import random
import re
from typing import Any

from oodpl.errors import UserError
from oodpl.data.records import (ALTERNATIVES, PairRecord, PromptRecord, need_fields, prompts_from_pairs, require_hub,
                                shp_pairs, shp_subreddit)

SHP_ID = "stanfordnlp/SHP"
AMAZON_ID = "McAuley-Lab/Amazon-Reviews-2023"


def _rows(data: Any) -> list[dict]:
    if hasattr(data, "to_list"):
        return data.to_list()
    return [dict(r) for r in data]


def _load(repo: str, what: str, **kwargs: Any) -> list[dict]:
    require_hub(f"loading {what} ({repo})")
    import datasets

    try:
        return _rows(datasets.load_dataset(repo, **kwargs))
    except Exception as e:
        raise UserError(
            f"could not load {repo} {kwargs} from the hub ({str(e).splitlines()[0][:200]}); {ALTERNATIVES}"
        ) from None


def load_shp(split: str = "train", subreddits: list[str] | None = None, min_score_ratio: float | None = None,
             data: Any = None) -> tuple[list[PairRecord], list[PromptRecord]]:
    """Stanford Human Preferences as (pairs, prompts); one domain `shp_<subreddit>` per subreddit."""
    wanted = {shp_subreddit(s).removeprefix("shp_") for s in subreddits} if subreddits else None
    if data is None:
        if wanted:
            rows = []
            for sub in sorted(wanted):
                rows += _load(SHP_ID, "Stanford Human Preferences", data_dir=sub, split=split)
        else:
            rows = _load(SHP_ID, "Stanford Human Preferences", split=split)
    else:
        rows = _rows(data)
    pairs = shp_pairs(rows, wanted, min_score_ratio)
    return pairs, prompts_from_pairs(pairs)


def _category_slug(category: str) -> str:
    return re.sub(r"\W+", "_", category.strip().lower()).strip("_")


def _review_text(row: dict) -> str:
    title = str(row.get("title") or "").strip()
    text = " ".join(str(row.get("text") or "").replace("<br />", " ").split())
    if title and text:
        return f"{title.rstrip('.!?')}. {text}"
    return title or text


def load_amazon_reviews(categories: list[str] | None = None, data: Any = None, min_star_gap: float = 2.0,
                        max_reviews_per_category: int | None = 20000, seed: int = 0,
                        ) -> tuple[list[PairRecord], list[PromptRecord]]:
    """Amazon reviews as (pairs, prompts), one domain `amazon_<category>` per category (rule in the module doc).

    `data`: a dict category -> rows, or rows (a Dataset or list of dicts) with a `category` field.
    """
    by_cat: dict[str, list[dict]] = {}
    if data is None:
        if not categories:
            raise UserError(
                "load_amazon_reviews: name the categories to load (for example ['All_Beauty', 'Books']); "
                "the full dataset is too large to load at once"
            )
        for cat in categories:
            kwargs: dict[str, Any] = {"split": "full"}
            if max_reviews_per_category:
                kwargs["split"] = f"full[:{max_reviews_per_category}]"
            by_cat[cat] = _load(AMAZON_ID, "Amazon reviews", name=f"raw_review_{cat}", **kwargs)
    elif isinstance(data, dict):
        by_cat = {k: _rows(v) for k, v in data.items()}
    else:
        for i, row in enumerate(_rows(data)):
            need_fields(row, ("category",), f"Amazon reviews row {i}")
            by_cat.setdefault(str(row["category"]), []).append(row)
    if categories:
        wanted = {_category_slug(c) for c in categories}
        by_cat = {c: rows for c, rows in by_cat.items() if _category_slug(c) in wanted}
    pairs: list[PairRecord] = []
    for cat in sorted(by_cat):
        slug = _category_slug(cat)
        readable = cat.replace("_", " ")
        products: dict[str, list[dict]] = {}
        for i, row in enumerate(by_cat[cat][: max_reviews_per_category or None]):
            need_fields(row, ("rating", "text", "parent_asin"), f"Amazon reviews {cat} row {i}")
            if _review_text(row):
                products.setdefault(str(row["parent_asin"]), []).append(row)
        rng = random.Random(f"{seed}:{slug}")
        for asin in sorted(products):
            reviews = products[asin]
            rng.shuffle(reviews)
            high = [r for r in reviews if float(r["rating"]) >= 4]
            low = [r for r in reviews if float(r["rating"]) <= 2]
            product = str(reviews[0].get("product_title") or asin)
            prompt = f"Write a customer review of the {readable} product {product}."
            for hi, lo in zip(high, low):
                gap = float(hi["rating"]) - float(lo["rating"])
                chosen, rejected = _review_text(hi), _review_text(lo)
                if gap < min_star_gap or chosen == rejected:
                    continue
                pairs.append(PairRecord(domain=f"amazon_{slug}", prompt=prompt, chosen=chosen, rejected=rejected,
                                        margin=gap))
    if not pairs:
        raise UserError(
            "Amazon reviews: no pairs (a pair needs a >= 4-star and a <= 2-star review of the same product); "
            "load more reviews per category or other categories"
        )
    return pairs, prompts_from_pairs(pairs)
