"""Publish an evidence run: its report and plots into docs/results, its summary into the README.

    python scripts/publish_evidence.py --run runs/evidence_knowledge --name knowledge

Copies RUN/report.md to docs/results/evidence_NAME.md (plot links pointing at docs/results/plots/NAME/), the PNGs it
references, and rewrites the README block between `<!-- evidence:NAME -->` and `<!-- /evidence:NAME -->` with the
report's summary table and primary verdicts, copied word for word: no number is typed by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(md: str, title: str) -> str:
    """The body of `## title` up to the next `## ` heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, flags=re.S | re.M)
    if not m:
        raise SystemExit(f"the report has no '## {title}' section")
    return m.group(1).strip()


def readme_block(md: str, name: str, intro: str, endpoints: str = "primary") -> str:
    summary = section(md, "Summary per method").split("\n\n")
    summary = "\n\n".join(summary[:2])  # the table and its one-line legend; the metric glossary stays in the report
    verdicts = section(md, "Verdicts")
    primary, _, secondary = verdicts.split("**Primary endpoints**", 1)[-1].partition("**Secondary endpoints**")
    chosen = (primary if endpoints == "primary" else secondary).strip()
    lines = [f"<!-- evidence:{name} -->", intro, "", "```", summary, "", chosen, "```", f"<!-- /evidence:{name} -->"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished benchmark directory (with report.md)")
    ap.add_argument("--name", required=True,
                    help="sentiment, sentiment_policy or knowledge: docs/results/evidence_NAME.md")
    ap.add_argument("--intro", default="", help="the README line above the table (what was run)")
    ap.add_argument("--endpoints", choices=["primary", "secondary"], default="primary",
                    help="whose verdicts the README block copies (secondary: the policy-level endpoints)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    report = run / "report.md"
    if not report.exists():
        print(f"{report} does not exist: run the benchmark to its end first", file=sys.stderr)
        return 2
    md = report.read_text(encoding="utf-8")
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
