"""Readers, column mapping and input validation (all offline, seconds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from oodpl.data import records
from oodpl.cli.data import cmd_stats, cmd_validate
from oodpl.data.records import PairRecord, PromptRecord, read_pairs, read_prompts, write_jsonl
from oodpl.errors import UserError

FIX = Path(__file__).parents[1] / "fixtures"
RENAMED = {"domain": "topic", "prompt": "question", "chosen": "good", "rejected": "bad", "margin": "strength"}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pair(**kw) -> str:
    row = {"domain": "d", "prompt": "p", "chosen": "good", "rejected": "bad"}
    row.update(kw)
    return json.dumps(row)


def test_jsonl_reader():
    pairs = read_pairs(FIX / "pairs.jsonl")
    assert len(pairs) == 8
    assert {p.domain for p in pairs} == {"cooking", "travel", "gardening"}
    assert pairs[0].margin == 1.5 and pairs[0].weight is None
    assert pairs[1].weight == 0.5 and pairs[1].margin is None
    prompts = read_prompts(FIX / "prompts.jsonl")
    assert len(prompts) == 4
    assert prompts[0].reference.startswith("About five") and prompts[1].reference is None


def test_csv_with_column_mapping():
    pairs = read_pairs(FIX / "pairs_renamed.csv", RENAMED)
    key = lambda p: (p.domain, p.prompt, p.chosen, p.rejected, p.margin)  # noqa: E731
    assert [key(p) for p in pairs] == [key(p) for p in read_pairs(FIX / "pairs.jsonl")]


def test_parquet_and_json_array_and_tsv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "pairs.jsonl").read_text().splitlines()]
    table = pa.Table.from_pylist([{k: r.get(k) for k in ("domain", "prompt", "chosen", "rejected", "margin")}
                                  for r in rows])
    pq.write_table(table, tmp_path / "pairs.parquet")
    got = read_pairs(tmp_path / "pairs.parquet")
    assert [p.chosen for p in got] == [r["chosen"] for r in rows]
    assert got[0].margin == 1.5 and got[1].margin is None

    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    assert len(read_pairs(tmp_path / "pairs.json")) == 8

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("domain\tprompt\tchosen\trejected\nd\thello there\tgood\tbad\n")
    assert read_pairs(tsv)[0].prompt == "hello there"


def test_saved_datasets_dir(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIX / "prompts.jsonl").read_text().splitlines()]
    for r in rows:
        r.setdefault("reference", None)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    got = read_prompts(tmp_path / "ds")
    assert [x.prompt for x in got] == [r["prompt"] for r in rows]
    # a DatasetDict: the train split is used
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(read_prompts(tmp_path / "dd")) == 4
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(UserError, match=r"splits a, b; pass one split's directory"):
        read_prompts(tmp_path / "dd2")


def test_write_jsonl_roundtrip(tmp_path):
    recs = [PairRecord("d", "p", "a", "b", margin=2.0), PairRecord("d", "q", "x", "y")]
    write_jsonl(tmp_path / "out" / "pairs.jsonl", recs)
    assert read_pairs(tmp_path / "out" / "pairs.jsonl") == recs
    assert "margin" not in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()[1]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    write_jsonl(tmp_path / "prompts.jsonl", [PromptRecord("d", "p", "r")])
    assert read_prompts(tmp_path / "prompts.jsonl") == [PromptRecord("d", "p", "r")]


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: every message names the file and the line (or row)


def test_malformed_json_names_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [_pair(), "", _pair(prompt="q"), '{"domain": "d", "prompt": ', _pair()])
    with pytest.raises(UserError) as e:
        read_pairs(f)
    assert f"{f}:4:" in str(e.value) and "malformed JSON" in str(e.value)
    f2 = _write(tmp_path / "list.jsonl", [_pair(), "[1, 2]"])
    with pytest.raises(UserError, match=r"list\.jsonl:2: expected a JSON object"):
        read_pairs(f2)


def test_missing_column_lists_existing_and_suggests_mapping(tmp_path):
    f = _write(tmp_path / "p.jsonl", [json.dumps({"domain": "d", "prompt": "p", "good": "a", "rejected": "b"})])
    with pytest.raises(UserError) as e:
        read_pairs(f)
    msg = str(e.value)
    assert str(f) in msg and "'chosen'" in msg and "good" in msg and "data.columns" in msg
    # a mapping to a column that does not exist
    with pytest.raises(UserError, match=r"missing column 'answer' \(for chosen\).*domain, prompt, good"):
        read_pairs(f, {"chosen": "answer"})
    with pytest.raises(UserError, match=r"unknown field 'choosen'"):
        read_pairs(f, {"choosen": "good"})
    # the mapping fixes it
    assert read_pairs(f, {"chosen": "good"})[0].chosen == "a"
    # no domain column: the file is one domain, named after the file (tests/data/test_formats.py)
    assert read_prompts(_write(tmp_path / "x.jsonl", [json.dumps({"prompt": "p"})]))[0].domain == "x"


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_empty_text_names_line(tmp_path, field):
    f = _write(tmp_path / "e.jsonl", [_pair(), _pair(prompt="q2"), _pair(**{field: "   "})])
    with pytest.raises(UserError) as e:
        read_pairs(f)
    assert f"{f}:3:" in str(e.value) and f"empty {field}" in str(e.value)


def test_empty_text_in_csv_names_line(tmp_path):
    f = tmp_path / "e.csv"
    f.write_text('domain,prompt,chosen,rejected\nd,p,"multi\nline",b\nd,p2,,b\n')
    with pytest.raises(UserError) as e:
        read_pairs(f)
    assert f"{f}:4:" in str(e.value) and "empty chosen" in str(e.value)


def test_empty_text_in_parquet_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"domain": "d", "prompt": "p", "chosen": "a", "rejected": "b"},
                                         {"domain": "d", "prompt": None, "chosen": "a", "rejected": "b"}]),
                   tmp_path / "e.parquet")
    with pytest.raises(UserError, match=r"e\.parquet: row 1 \(0-based\): empty prompt"):
        read_pairs(tmp_path / "e.parquet")


def test_chosen_equals_rejected(tmp_path):
    f = _write(tmp_path / "same.jsonl", [_pair(), _pair(chosen="same", rejected="same ")])
    with pytest.raises(UserError) as e:
        read_pairs(f)
    assert f"{f}:2:" in str(e.value) and "same text" in str(e.value)


def test_bad_numbers_and_types(tmp_path):
    with pytest.raises(UserError, match=r"n\.jsonl:1: column 'margin' \(margin\) must be a number"):
        read_pairs(_write(tmp_path / "n.jsonl", [_pair(margin="big")]))
    with pytest.raises(UserError, match=r"w\.jsonl:1: weight must be >= 0"):
        read_pairs(_write(tmp_path / "w.jsonl", [_pair(weight=-1)]))
    with pytest.raises(UserError, match=r"t\.jsonl:1: column 'chosen' \(chosen\) must be a string"):
        read_pairs(_write(tmp_path / "t.jsonl", [_pair(chosen=["a"])]))


def test_nonexistent_empty_and_unknown_type(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        read_pairs("data/missing/pairs.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: no records"):
        read_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unknown file type .txt"):
        read_pairs(tmp_path / "x.txt")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not one saved with datasets.save_to_disk"):
        read_pairs(tmp_path / "plain")


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setattr(records, "hub_available", lambda timeout=3.0: False)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        read_pairs("someone/some-preferences")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "offline" in msg and "oodpl data fetch" in msg and "local file" in msg


def test_hub_available_respects_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    assert records.hub_available() is False
    assert time.monotonic() - t0 < 1


def test_hub_id_detection():
    assert records._is_hub_id("stanfordnlp/SHP")
    assert records._is_hub_id("stanfordnlp/SHP:test")
    assert not records._is_hub_id("data/pairs.jsonl")
    assert not records._is_hub_id("./a/b")
    assert not records._is_hub_id("a/b/c")


# ----------------------------------------------------------------------------------------------------------------------
# validate / stats on files


def test_cmd_validate(capsys, tmp_path):
    assert cmd_validate(str(FIX / "pairs.jsonl")) == 0
    out = capsys.readouterr().out
    assert "8 valid pairs in 3 domains" in out and "cooking" in out
    assert cmd_validate(str(FIX / "prompts.jsonl")) == 0
    assert "4 valid prompts" in capsys.readouterr().out
    assert cmd_validate(str(FIX / "pairs_renamed.csv"), RENAMED) == 0
    bad = _write(tmp_path / "bad.jsonl", [_pair(), "{oops"])
    with pytest.raises(UserError, match=r"bad\.jsonl:2:"):
        cmd_validate(str(bad))


def test_cmd_stats_file(capsys):
    text = cmd_stats(str(FIX / "pairs.jsonl"))
    assert "cooking" in text and "total" in text
    md = cmd_stats(str(FIX / "pairs.jsonl"), as_markdown=True, quiet=True)
    assert md.startswith("| domain | pairs | prompts |")
    assert "| cooking | 3 | 3 |" in md


# ----------------------------------------------------------------------------------------------------------------------
# Issue 13: strict decoding, line splitting, numbers, header-only CSV


def test_invalid_utf8_is_an_error_naming_line_and_byte_offset(tmp_path):
    p = tmp_path / "p.jsonl"
    good = json.dumps({"domain": "a", "prompt": "naïve café", "chosen": "x", "rejected": "y"}, ensure_ascii=False)
    raw = (good + "\n").encode() + b'{"domain": "a", "prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n'
    p.write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(UserError, match=rf"p\.jsonl:2: byte 0xe9 at byte offset {offset} is not valid utf-8.*"
                                        r"data\.encoding"):
        read_pairs(p)
    p.write_bytes((good + "\n").encode())  # the valid part is not silently re-read as latin-1
    assert read_pairs(p)[0].prompt == "naïve café"
    latin = tmp_path / "l.csv"
    latin.write_bytes("domain,prompt,chosen,rejected\na,café,x,y\n".encode("latin-1"))
    assert read_pairs(latin, encoding="latin-1")[0].prompt == "café"
    with pytest.raises(UserError, match="not a known text encoding"):
        read_pairs(latin, encoding="klingon")


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x0c", "\x1c"])
def test_jsonl_lines_split_on_newline_only(tmp_path, char):
    rec = PairRecord(domain="a", prompt=f"one{char}two", chosen="good", rejected="bad")
    write_jsonl(tmp_path / "p.jsonl", [rec, rec])
    assert read_pairs(tmp_path / "p.jsonl") == [rec, rec]


def test_csv_fields_keep_form_feeds_and_quoted_newlines(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('domain,prompt,chosen,rejected\r\na,"page\x0cbreak","two\nlines",no\u2028way\r\n', newline="")
    recs = read_pairs(p)
    assert [(r.prompt, r.chosen, r.rejected) for r in recs] == [("page\x0cbreak", "two\nlines", "no\u2028way")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["margin", "weight"])
def test_non_finite_margin_or_weight_is_an_error(tmp_path, field, value):
    p = tmp_path / "p.csv"
    p.write_text(f"domain,prompt,chosen,rejected,{field}\na,x,good,bad,1.0\na,x,good,bad,{value}\n")
    with pytest.raises(UserError, match=rf"p\.csv:3: column '{field}' \({field}\) must be a finite number"):
        read_pairs(p)


def test_header_only_csv_is_not_called_empty(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("domain,prompt,chosen,rejected\n")
    with pytest.raises(UserError, match="only a header .*no records; add rows"):
        read_pairs(p)


def test_data_validate_and_stats_take_an_encoding(tmp_path, capsys):
    """`oodpl data validate/stats --encoding`: a Latin-1 file is refused as UTF-8 (exit 2, file:line and byte offset)
    and read with --encoding latin-1."""
    from oodpl.cli.main import main

    latin = tmp_path / "l.csv"
    latin.write_bytes("domain,prompt,chosen,rejected\na,café,x,y\nb,ok,x,y\n".encode("latin-1"))
    outs = {}
    for action in ("validate", "stats"):
        assert main(["data", action, str(latin)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{latin}:2" in err[0] and "byte offset" in err[0], err
        assert main(["data", action, str(latin), "--encoding", "latin-1"]) == 0
        outs[action] = capsys.readouterr().out
    assert "2 valid pairs in 2 domains" in outs["validate"]
    assert outs["stats"].splitlines()[-2].split()[:3] == ["total", "2", "2"]
