"""`oodpl diagnose meta-test`: how far the meta-test moves the policy, per learning rate and step count, measured on
meta-train domains only (issue 19: "a meta-test with leverage of its own").

The policy-level endpoints compare reward models by the policies the meta-test makes with them. A meta-test that
hardly moves pi_ref (evidence v2, sentiment: 3 Adam steps at lr 5e-3, about 0.01 nats) leaves every RM's policy at
pi_ref: win rates near 0.5 and gold at matched KL undefined say nothing about the RMs. So, before the policy-level
evidence runs, this study runs the meta-test itself (adapt.metatest.optimise_policy, unchanged) on meta-train
domains, with the domain's support prompts as its adaptation prompts and each domain's leave-one-domain-out erm-rm
(BT on the other meta-train domains' pairs: the RM has not seen the domain, as on a held-out one), for every learning
rate of a grid and every beta_test of the config, and records at every step the KL of the policy to pi_ref on its own
samples (models.sampling.sequence_kl), their RM reward and the gold judge's score of them (monitored only: nothing is
chosen by it).

The choice, made on KL alone: the smallest lr whose median KL over the study domains at the smallest beta_test
reaches `target_kl` nats within `budget_steps` steps (what the evidence run can afford), at the first step it does.
No held-out domain is touched. Results go to OUTPUT/reach.json and OUTPUT/reach.md; every (domain, lr, beta) is a unit
(OUTPUT/units/<domain>/lr-<lr>_beta-<beta>.json) that a rerun skips.

Step s of a run of `steps` steps is the policy after s updates: one more optimisation step is run so that its
samples, drawn before that last update, measure the policy after the s-th (a run of S steps is a prefix of a longer
one: same prompt draws, sampler seeds and optimiser state).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from oodpl.config import Config, with_overrides
from oodpl.data.split import load_or_build_split
from oodpl.errors import UserError, atomic_write_json, atomic_write_text
from oodpl.runtime.rundir import open_run

LR_FACTORS = (1.0, 4.0, 16.0)  # default grid: the config's meta_test.lr times these


def default_grid(cfg: Config) -> tuple[list[float], int]:
    """The learning rates (the config's lr x LR_FACTORS) and the step count (at least 4x the config's, 24 or more)."""
    return [cfg.meta_test.lr * f for f in LR_FACTORS], max(4 * cfg.meta_test.steps, 24)


def reach_unit(cfg: Config, policy, rm, judge, split, d: str, lr: float, beta: float, steps: int, out: Path) -> dict:
    """One (domain, lr, beta_test): `steps` + 1 meta-test steps from pi_ref on d's support prompts; per step the KL,
    RM reward and gold score of the policy's samples (step s = after s updates; step 0 = pi_ref)."""
    from oodpl.adapt.metatest import (adapt_reference_samples, judge_fn, optimise_policy, reference_reward_scale,
                                      reward_model_fn)
    from oodpl.evaluation.evaluate import references_for
    from oodpl.models.sampling import sequence_kl
    from oodpl.runtime.runlog import provenance

    names = sorted(split.meta_train)
    di = names.index(d)
    dom = split.meta_train[d]
    prompts = [p.prompt for p in dom.support_prompts]
    c = with_overrides(cfg, {"meta_test.lr": lr, "meta_test.steps": steps + 1}, where="diagnose meta-test")
    reward = reward_model_fn(rm)
    ref_samples = adapt_reference_samples(out / "reference" / f"{d}.json", policy, prompts, c, di)
    scale = reference_reward_scale(reward, ref_samples)
    gold = judge_fn(judge, references_for(split.task, dom.support_prompts))
    t0 = time.time()
    # the same optimiser seed for every lr and beta of a domain: the settings are compared on the same draws
    res = optimise_policy(policy, prompts, reward, c, beta, seed=cfg.seed * 1000 + di, reward_scale=scale,
                          gold_fn=gold, measure=lambda batch: {"token_kl": float(sequence_kl(policy, batch).mean())})
    hist = res["history"]
    done = provenance(0.0)
    return {"domain": d, "lr": lr, "beta": beta, "steps": steps, "adapt_prompts": len(prompts),
            "kl": [h["token_kl"] for h in hist], "kl_sample": [h["kl"] for h in hist],
            "reward": [h["reward"] for h in hist],
            "gold": [h["gold_reward"] for h in hist], "reward_scale": res["reward_scale"],
            "seconds": time.time() - t0, "finished": done["date"], "load": done["load"]}


def summarise(units: list[dict], checkpoints: list[int]) -> list[dict]:
    """Per (lr, beta): at each checkpoint step, the median KL over domains, the per-domain KLs, and the mean RM reward
    and gold score of that step's samples. A step's prompts are drawn by the optimiser's seed, the same for every lr
    and beta of a domain: values at one step compare across settings (same prompts, same sampler seeds), not across
    steps (other prompts)."""
    rows = []
    for lr in sorted({u["lr"] for u in units}):
        for beta in sorted({u["beta"] for u in units}):
            us = [u for u in units if u["lr"] == lr and u["beta"] == beta]
            at = {}
            for s in checkpoints:
                at[str(s)] = {"kl_median": float(np.median([u["kl"][s] for u in us])),
                              "kl": {u["domain"]: u["kl"][s] for u in us},
                              "reward": float(np.mean([u["reward"][s] for u in us])),
                              "gold": float(np.mean([u["gold"][s] for u in us]))}
            rows.append({"lr": lr, "beta": beta, "domains": len(us), "at": at,
                         "seconds": float(sum(u["seconds"] for u in us))})
    return rows


def choose(rows: list[dict], target_kl: float, budget: int | None = None) -> dict | None:
    """The smallest lr whose median KL at the smallest beta_test reaches target_kl within `budget` steps (all steps
    when None), at the first step it does; None when no lr does. The gentlest step that gets there: a large lr reaches
    the target in fewer steps but in a jump that leaves the samples' support (KL of tens of nats a few steps later)."""
    beta = min(r["beta"] for r in rows)
    candidates = [(r["lr"], int(s), a["kl_median"]) for r in rows if r["beta"] == beta
                  for s, a in r["at"].items() if a["kl_median"] >= target_kl and (budget is None or int(s) <= budget)]
    if not candidates:
        return None
    lr, steps, kl = min(candidates)
    return {"steps": steps, "lr": lr, "beta": beta, "kl_median": kl}


def checkpoints_for(steps: int) -> list[int]:
    marks = [1, 2, 3, 6, 12, 24, 48, 96]
    return sorted({s for s in marks if s <= steps} | {steps})


def render(study: dict) -> str:
    rows, marks = study["rows"], study["checkpoints"]
    lines = [
        "# Reach of the meta-test (meta-train domains only)", "",
        f"Generated by `{study['command']}`, whose invocation started on {study['date']} ({study['machine']}; "
        f"load average then "
        f"{study['load']}); {study['seconds'] / 60:.1f} min of computation over its units"
        + (f", the last finished on {study['units_finished']}, at loads (1 min) {study['units_load']}"
           if study.get("units_finished") else " (units of an earlier version record no date or load)") + ".", "",
        f"Task `{study['task']}`, study domains {', '.join(study['domains'])} (meta-train domains; no held-out domain "
        "was used). Each cell: the meta-test as the benchmark runs it (on-policy KL-regularised RLOO from pi_ref, "
        f"{study['optimizer']}, rewards of the domain's leave-one-domain-out erm-rm standardised by their spread on "
        f"pi_ref samples) on the domain's {study['adapt_prompts']} support prompts, "
        f"{study['batch_prompts']} prompts x {study['num_samples']} samples per step. Entries: the median over the "
        f"{len(study['domains'])} domains of KL(pi || pi_ref) estimated on the policy's own samples after s steps; "
        "(sum over response tokens of the exact next-token KL along each sample's prefix: models.sampling.sequence_kl; "
        "the benchmark's kl column too; it is never negative and has far less variance than the mean of "
        "log pi - log pi_ref, which is recorded beside it in reach.json); "
        "in brackets the mean RM reward (raw) and gold score of those samples over the domains (monitored, never used "
        "to choose). A step's prompts are the same for every lr and beta_test (the optimiser's seed draws them): "
        "compare settings down a column; along a row the prompts change.", "",
        "| lr | beta_test | " + " | ".join(f"s = {s}" for s in marks) + " | seconds |",
        "|---|---|" + "---|" * len(marks) + "---|",
    ]
    for r in rows:
        cells = [f"{r['at'][str(s)]['kl_median']:.3f} (rm {r['at'][str(s)]['reward']:.2f}, gold "
                 f"{r['at'][str(s)]['gold']:.3f})" for s in marks]
        lines.append(f"| {r['lr']:g} | {r['beta']:g} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    lines.append("")
    chosen, target = study["chosen"], study["target_kl"]
    if chosen is None:
        lines.append(f"No lr of the grid reaches a median KL of {target:g} nats at beta_test {min(study['betas']):g}"
                     f" within {study['budget_steps']} steps: widen the grid (`--lrs`, `--steps`, `--budget-steps`).")
    else:
        lines.append(f"Smallest lr whose median KL at beta_test {chosen['beta']:g} reaches {target:g} nats within "
                     f"{study['budget_steps']} steps, at the first step it does: **meta_test.lr {chosen['lr']:g}, "
                     f"meta_test.steps {chosen['steps']}** (median KL {chosen['kl_median']:.3f}).")
    lines += ["", "The configuration's own meta-test, for comparison: "
              f"steps {study['config_steps']}, lr {study['config_lr']:g}.", "",
              "How to read it: gold at matched KL compares RMs only where their policies' KL ranges overlap, and win "
              "rates only where the policies differ from pi_ref; a meta-test whose KL stays near 0 at every beta_test "
              "cannot separate reward models, whatever they are.", ""]
    return "\n".join(lines)


def run_meta_test_reach(cfg: Config, output: str | Path, domains: list[str] | None = None,
                        lrs: list[float] | None = None, steps: int | None = None, target_kl: float = 1.0,
                        budget: int | None = None) -> dict:
    """The study for `cfg` (see the module docstring); returns the study dict also written to OUTPUT/reach.json."""
    from oodpl.evaluation.judges import judge_from_config
    from oodpl.experiment.leverage_study import leave_one_out_rm, study_domains
    from oodpl.models.policy import PolicyAtInit, load_policy
    from oodpl.models.precision import place
    from oodpl.runtime.distributed import make_accelerator
    from oodpl.runtime.runlog import provenance

    grid_lrs, grid_steps = default_grid(cfg)
    lrs, steps = sorted(lrs or grid_lrs), grid_steps if steps is None else steps
    budget = steps if budget is None else budget
    if steps < 1 or any(lr <= 0 for lr in lrs) or target_kl <= 0 or not 1 <= budget <= steps:
        raise UserError(f"diagnose meta-test: give --steps >= 1, positive --lrs, a positive --target-kl and "
                        f"1 <= --budget-steps <= --steps (got steps {steps}, lrs {lrs}, target {target_kl}, "
                        f"budget {budget})")
    accelerator = make_accelerator()  # one process: the device and precision the user's accelerate config sets
    if accelerator.num_processes > 1:
        raise UserError("oodpl diagnose meta-test runs in one process (its units are small); start it with "
                        "`oodpl diagnose meta-test`, not under `accelerate launch` with several processes")
    out = Path(output)
    t0 = time.time()
    prov = provenance(0.0)
    # the budget only changes the choice, not what is computed: it stays out of the fingerprint
    fingerprint = {"config": cfg.fingerprint(), "domains": domains, "lrs": lrs, "steps": steps}
    with open_run(out, "meta-test-reach", fingerprint, cfg) as run:
        split = load_or_build_split(run.layout.split, cfg.data)
        run.record(split)
        chosen_domains = study_domains(split, domains, "diagnose meta-test")
        run.commit()
        judge = judge_from_config(cfg, split.task)
        # every unit starts from the same LoRA initialisation, whatever ran before it (reset_to_reference zeroes B only)
        at_init = PolicyAtInit(place(load_policy(cfg.policy, seed=cfg.seed), accelerator))
        units = []
        for d in chosen_domains:
            rm = place(leave_one_out_rm(cfg, split, d, out), accelerator)
            for lr in lrs:
                for beta in cfg.meta_test.beta_test:
                    path = out / "units" / d / f"lr-{lr:g}_beta-{beta:g}.json"
                    if not path.exists():
                        if not cfg.quiet:
                            print(f"meta-test reach: {d}, lr {lr:g}, beta_test {beta:g}", flush=True)
                        atomic_write_json(path, reach_unit(cfg, at_init.get(), rm, judge, split, d, lr, beta, steps,
                                                          out))
                    units.append(json.loads(path.read_text()))
        marks = checkpoints_for(steps)
        rows = summarise(units, [0] + marks)
        study = {"task": split.task, "domains": chosen_domains, "lrs": lrs, "betas": list(cfg.meta_test.beta_test),
                 "steps": steps, "checkpoints": marks, "target_kl": target_kl, "rows": rows,
                 "budget_steps": budget, "chosen": choose(summarise(units, list(range(1, steps + 1))), target_kl,
                                                          budget),
                 "optimizer": cfg.meta_test.optimizer, "config_steps": cfg.meta_test.steps,
                 "config_lr": cfg.meta_test.lr, "batch_prompts": cfg.rloo.batch_prompts,
                 "num_samples": cfg.rloo.num_samples,
                 "adapt_prompts": min(u["adapt_prompts"] for u in units),
                 "command": prov["command"], "date": prov["date"], "machine": prov["machine"], "load": prov["load"],
                 "seconds": float(sum(u["seconds"] for u in units)), "seconds_this_invocation": time.time() - t0}
        dated = [u for u in units if u.get("finished")]
        if dated:
            loads = [float(u["load"].split()[0]) for u in dated if u.get("load")]
            study["units_finished"] = max(u["finished"] for u in dated)
            study["units_load"] = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "n/a"
        atomic_write_json(out / "reach.json", study)
        atomic_write_text(out / "reach.md", render(study))
    return study
