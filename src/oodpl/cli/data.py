"""`oodpl data validate | stats | fetch` as plain functions (the CLI wires them)."""

from __future__ import annotations

import sys
from pathlib import Path

from oodpl.errors import UserError
from oodpl.data import builtin
from oodpl.data.records import PairRecord, PromptRecord, looks_like_pairs, read_pairs, read_prompts
from oodpl.data.records import prompts_from_pairs
from oodpl.data.split import domain_stats

STAT_COLUMNS = [
    ("pairs", "pairs"),
    ("prompts", "prompts"),
    ("pair_prompts", "pair prompts"),
    ("prompt_words_mean", "prompt words (mean)"),
    ("prompt_words_max", "prompt words (max)"),
    ("chosen_words_mean", "chosen words (mean)"),
    ("chosen_words_max", "chosen words (max)"),
    ("rejected_words_mean", "rejected words (mean)"),
    ("rejected_words_max", "rejected words (max)"),
    ("margin_mean", "margin (mean)"),
]


def cmd_validate(path: str, columns: dict[str, str] | None = None, kind: str = "auto", encoding: str = "utf-8",
                 domain: str | None = None) -> int:
    """Check a pairs or prompts file (kind: auto, pairs, prompts); print counts per domain; return 0. `domain` names
    the one domain of a file without a domain column (as --domain of meta-test / generate).

    Raises UserError (naming file and line) on the first problem.
    """
    from oodpl.data.conversation import Conversation

    if kind not in ("auto", "pairs", "prompts"):
        raise UserError(f"kind must be auto, pairs or prompts, got {kind!r}")
    if kind == "auto":
        kind = "pairs" if looks_like_pairs(path, columns, encoding) else "prompts"
    counts: dict[str, int] = {}
    if kind == "pairs":
        records: list = read_pairs(path, columns, encoding, domain)
    else:
        records = read_prompts(path, columns, encoding, domain)
    for r in records:
        counts[r.domain] = counts.get(r.domain, 0) + 1
    print(f"{path}: {len(records)} valid {kind} in {len(counts)} domains")
    width = max(len(d) for d in counts)
    for d in sorted(counts):
        print(f"  {d:<{width}}  {counts[d]}")
    conversations = [r.prompt for r in records if isinstance(r.prompt, Conversation)]
    if conversations:
        turns = max(len(c.messages) for c in conversations)
        print(f"  conversational: {len(conversations)} prompts are conversations (up to {turns} messages); they are "
              "rendered with the models' chat templates (policy.chat_template, reward.input_format: chat)")
    if kind == "pairs" and len(counts) < 2:
        print("  note: meta-learning needs at least two domains (one meta-train, one held-out)")
    return 0


def load_for_stats(path_or_task: str, columns: dict[str, str] | None = None, encoding: str = "utf-8"
                   ) -> tuple[list[PairRecord], list[PromptRecord]]:
    """A built-in task name (`sentiment`, `knowledge`, `all`) or a pairs/prompts file."""
    if path_or_task in builtin.TASKS and not Path(path_or_task).exists():
        return builtin.load_task(path_or_task)
    if path_or_task == "all" and not Path(path_or_task).exists():
        pairs: list[PairRecord] = []
        prompts: list[PromptRecord] = []
        for t in builtin.TASKS:
            p, x = builtin.load_task(t)
            pairs += p
            prompts += x
        return pairs, prompts
    if looks_like_pairs(path_or_task, columns, encoding):
        pairs = read_pairs(path_or_task, columns, encoding)
        return pairs, prompts_from_pairs(pairs)
    return [], read_prompts(path_or_task, columns, encoding)


def format_stats(stats: dict[str, dict], as_markdown: bool = False) -> str:
    header = ["domain"] + [label for _, label in STAT_COLUMNS]
    rows = [[d] + ["-" if s[k] is None else str(s[k]) for k, _ in STAT_COLUMNS] for d, s in stats.items()]
    total = ["total", str(sum(s["pairs"] for s in stats.values())), str(sum(s["prompts"] for s in stats.values()))]
    total += [""] * (len(header) - len(total))
    rows.append(total)
    if as_markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    short = ["domain", "pairs", "prompts", "pair_prompts", "prompt_w", "prompt_max", "chosen_w", "chosen_max",
             "rejected_w", "rejected_max", "margin"]
    widths = [max(len(short[i]), *(len(r[i]) for r in rows)) for i in range(len(short))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    return "\n".join([fmt(short)] + [fmt(r) for r in rows]) + "\n(lengths in words; _w = mean)"


def cmd_stats(path_or_task: str, as_markdown: bool = False, columns: dict[str, str] | None = None,
              quiet: bool = False, encoding: str = "utf-8") -> str:
    """Pairs and prompts per domain with mean/max lengths in words; prints the table and returns it."""
    pairs, prompts = load_for_stats(path_or_task, columns, encoding)
    text = format_stats(domain_stats(pairs, prompts), as_markdown)
    if not quiet:
        print(text)
    return text


def cmd_fetch(force: bool = False, quiet: bool = False) -> int:
    """Download and build the built-in tasks into the user cache; print where they are; return 0."""
    root = builtin.fetch(force=force, quiet=quiet)
    m = builtin.manifest()
    for task, info in m["tasks"].items():
        print(f"{task}: {info['pairs']} pairs, {info['prompts']} prompts, {len(info['domains'])} domains "
              f"({root / task})", file=sys.stdout)
    return 0
