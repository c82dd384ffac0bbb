"""Publish an evidence run: its report and plots into docs/results, its summary into the README.

    python scripts/publish_evidence.py --run runs/evidence_knowledge --name knowledge

Copies RUN/report.md to docs/results/evidence_NAME.md (plot links pointing at docs/results/plots/NAME/), the PNGs it
references, and rewrites the README block between `<!-- evidence:NAME -->` and `<!-- /evidence:NAME -->` with the
report's summary table and primary verdicts, copied word for word: no number is typed by hand.

A run with `benchmark.diagnostics: false` (a policy-level preset that shares its split and reward models with another
preset) gets its leverage and fit figures from the other preset's published report, `--diagnostics-from
docs/results/evidence_X.md`: they are copied in word for word once every reward model the two reports share has the
same primary-endpoint entries in both (the same RMs, checked, not assumed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class PublishError(Exception):
    """A report that cannot be published as asked: one line, exit status 2."""


def section(md: str, title: str) -> str:
    """The body of `## title` up to the next `## ` heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, flags=re.S | re.M)
    if not m:
        raise PublishError(f"the report has no '## {title}' section")
    return m.group(1).strip()


def summary_rows(md: str) -> dict[str, dict[str, str]]:
    """The report's summary table: method -> column header -> entry."""
    rows = [line for line in section(md, "Summary per method").splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in rows[2:])}


def diagnostics_from(md: str, companion: Path) -> str:
    """The companion report's diagnostics section, to insert into `md`, after checking that the reward models both
    reports score are the same ones: equal primary-endpoint entries for every shared method."""
    other = companion.read_text(encoding="utf-8")
    mine, theirs = summary_rows(md), summary_rows(other)
    primary = [c for c in next(iter(mine.values())) if c.endswith("(primary)")]
    shared = [m for m in mine if m in theirs and any(mine[m][c] != "n/a" for c in primary)]
    if not shared:
        raise PublishError(f"{companion} scores none of this report's reward models: not its companion")
    for m in shared:
        for c in primary:
            if mine[m][c] != theirs[m].get(c):
                raise PublishError(f"{companion}: {m}'s {c} is {theirs[m].get(c)}, here {mine[m][c]}: not the "
                                   "same reward models, so its diagnostics are not this run's")
    body = section(other, "Diagnostics")
    if "\n### " not in "\n" + body:
        raise PublishError(f"{companion} has no fit or leverage diagnostics to copy")
    body = body[("\n" + body).index("\n### "):]  # its subsections: fit, left-out outer loss, leverage
    return (f"**Fit and leverage, copied from [{companion.name}]({companion.name}).** This run did not measure them "
            f"(benchmark.diagnostics: false); {companion.name} trained the same reward models ({', '.join(shared)}: "
            "their primary-endpoint entries in the two reports are equal, checked by scripts/publish_evidence.py). "
            f"Its subsections follow word for word.\n\n{body}\n\n")


def readme_block(md: str, name: str, intro: str, endpoints: str = "primary") -> str:
    summary = section(md, "Summary per method").split("\n\n")
    summary = "\n\n".join(summary[:2])  # the table and its one-line legend; the metric glossary stays in the report
    verdicts = section(md, "Verdicts")
    primary, _, secondary = verdicts.split("**Primary endpoints**", 1)[-1].partition("**Secondary endpoints**")
    chosen = (primary if endpoints == "primary" else secondary).strip()
    lines = [f"<!-- evidence:{name} -->", intro, "", "```", summary, "", chosen, "```", f"<!-- /evidence:{name} -->"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return publish(argv)
    except PublishError as e:
        print(f"publish_evidence: {e}", file=sys.stderr)
        return 2


def publish(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished benchmark directory (with report.md)")
    ap.add_argument("--name", required=True,
                    help="sentiment, sentiment_policy or knowledge: docs/results/evidence_NAME.md")
    ap.add_argument("--intro", default="", help="the README line above the table (what was run)")
    ap.add_argument("--endpoints", choices=["primary", "secondary"], default="primary",
                    help="whose verdicts the README block copies (secondary: the policy-level endpoints)")
    ap.add_argument("--diagnostics-from", type=Path, default=None,
                    help="a published report (docs/results/evidence_X.md) of the same split and reward models whose "
                         "diagnostics section this report copies (a run with benchmark.diagnostics false)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    report = run / "report.md"
    if not report.exists():
        print(f"{report} does not exist: run the benchmark to its end first", file=sys.stderr)
        return 2
    md = report.read_text(encoding="utf-8")
    if args.diagnostics_from is not None:
        if not args.diagnostics_from.exists():
            raise PublishError(f"--diagnostics-from {args.diagnostics_from} does not exist: pass a published report")
        copied = diagnostics_from(md, args.diagnostics_from)
        at = md.find("\n## Selection")
        md = md + "\n\n" + copied if at < 0 else md[:at + 1] + copied + md[at + 1:]
    results = ROOT / "docs" / "results"
    plots = results / "plots" / args.name
    if plots.exists():
        shutil.rmtree(plots)
    plots.mkdir(parents=True)
    for png in sorted(set(re.findall(r"\(plots/([\w.-]+\.png)\)", md))):
        shutil.copyfile(run / "plots" / png, plots / png)
    published = md.replace("(plots/", f"(plots/{args.name}/")
    published += (f"\n\n_Published into docs/results by `python scripts/publish_evidence.py --run {args.run} "
                  f"--name {args.name}`. How to read it, what the diagnostics say and what was tried: "
                  "[README.md](README.md)._\n")
    tmp = results / f".evidence_{args.name}.md.tmp"
    tmp.write_text(published, encoding="utf-8")
    tmp.replace(results / f"evidence_{args.name}.md")

    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(rf"<!-- evidence:{args.name} -->.*?<!-- /evidence:{args.name} -->", flags=re.S)
    if not pattern.search(text):
        print(f"README.md has no <!-- evidence:{args.name} --> ... <!-- /evidence:{args.name} --> block",
              file=sys.stderr)
        return 2
    intro = args.intro or (f"[docs/results/evidence_{args.name}.md](docs/results/evidence_{args.name}.md), "
                           f"summary and {args.endpoints} verdicts:")
    text = pattern.sub(lambda _: readme_block(md, args.name, intro, args.endpoints), text)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(readme)
    print(f"published {report} -> {results / f'evidence_{args.name}.md'} ({len(list(plots.iterdir()))} plots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
