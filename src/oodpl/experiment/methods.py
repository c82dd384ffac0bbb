"""Every method of the benchmark, defined once (method.md, "Baselines"): what it produces, how it trains, what it is
warm-started from, which settings it fixes and whose tuned settings it takes. `oodpl benchmark`, `oodpl select` and
`oodpl train-rm --method` read these definitions and nothing else; adding a method is one `Method(...)` entry below
plus its trainer (a function of a `TrainJob`).

    output          what the method yields and how it is scored
      reference     pi_ref itself (its samples only)
      reward-model  a reward model: PL accuracy / RM-gold agreement, then the meta-test optimiser on held-out domains
      policy        an aligned policy (dpo): its implicit reward is scored, its samples evaluated directly
      gold          the gold judge as the reward of the meta-test (an upper bound for generation quality)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oodpl.config import Config
from oodpl.errors import UserError, atomic_write_json
from oodpl.train.job import Trainer, TrainJob, save_reward_fit

REFERENCE, REWARD_MODEL, POLICY, GOLD = "reference", "reward-model", "policy", "gold"




# ---------------------------------------------------------------------------------------------------------- trainers
def train_bt(job: TrainJob) -> None:
    """Ordinary Bradley-Terry RM on job.pairs (erm-rm, oracle-rm): OUTPUT/reward_model, OUTPUT/train.json."""
    from oodpl.train.rm_train import fit_reward_model

    rm, stats = fit_reward_model(job.cfg, job.pairs, seed=job.cfg.seed, place_on=job.accelerator,
                                 accelerator=job.accelerator if job.data_parallel else None,
                                 progress=job.progress and job.data_parallel, log=job.log)
    save_reward_fit(job, rm, stats)


def _deferred(module: str, name: str) -> Trainer:
    """The trainer `name` of `module`, imported when first called (the field's RMs import torch; listing the
    registry stays light)."""
    def trainer(job: TrainJob) -> None:
        import importlib

        getattr(importlib.import_module(module), name)(job)

    trainer.__name__ = name
    trainer.__doc__ = f"{module}.{name}"
    return trainer


train_metarm = _deferred("oodpl.train.field_rms", "train_metarm")  # metarm (Dou et al. 2025)
train_grm = _deferred("oodpl.train.field_rms", "train_grm")  # grm (Yang et al. 2024)
train_warm = _deferred("oodpl.train.field_rms", "train_warm")  # warm-rm (Rame et al. 2024)


def train_bt_refine(job: TrainJob) -> None:
    """erm-rm-extra: the warm start trained further by BT alone on meta-training's own draws (metatrain.refine_by_bt)."""
    from oodpl.train.metatrain import refine_by_bt

    refine_by_bt(job.cfg, job.split, job.init, job.output, progress=job.progress)


def train_bilevel(job: TrainJob) -> None:
    """meta-rm and its ablations: bilevel meta-training (metatrain.meta_train), warm-started from job.init under
    meta.init=bt. A rerun continues an interrupted run from its last checkpoint."""
    from oodpl.train.metatrain import meta_train

    init = job.init if job.cfg.meta.init == "bt" else None
    meta_train(job.cfg, job.output, resume=True, accelerator=job.accelerator, init_reward_model=init,
               split=job.split, policy=job.policy() if job.policy else None, banks=job.banks)


def train_dpo_policy(job: TrainJob) -> None:
    """dpo: DPO of the LoRA policy on job.pairs; OUTPUT/policy_trainable.pt (and a PEFT adapter under OUTPUT/policy
    when job.export_base is set), OUTPUT/train.json."""
    from oodpl.train.dpo import save_trainable, train_dpo
    from oodpl.runtime.runlog import seed_everything

    cfg = job.cfg
    seed_everything(cfg.seed)
    policy = job.policy()
    stats = train_dpo(policy, job.pairs, cfg.rloo.beta, cfg.benchmark.dpo_epochs, cfg.benchmark.dpo_lr,
                      cfg.train_rm.batch_size, seed=cfg.seed, progress=job.progress, log=job.log)
    save_trainable(policy, job.layout.policy_trainable)
    if job.export_base is not None:
        from oodpl.models.export import save_policy

        save_policy(policy, job.output / "policy", base_dir=job.export_base,
                    metadata={"method": "dpo", "seed": cfg.seed})  # the aligned policy as a PEFT adapter directory
    atomic_write_json(job.layout.train_record, {**stats, "beta": cfg.rloo.beta, "lr": cfg.benchmark.dpo_lr,
                                                "pairs": len(job.pairs)})


# ---------------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: what it is (README, report, `oodpl benchmark --help`)
    output: str  # REFERENCE, REWARD_MODEL, POLICY or GOLD (module docstring)
    trainer: Trainer | None = None
    warm_start: str | None = None  # the method whose reward model the trainer starts from (job.init)
    overrides: dict[str, Any] = field(default_factory=dict)  # settings the method fixes (ablations)
    tuned_as: str | None = None  # whose leave-one-domain-out choice it takes (`oodpl select`)
    tuned_fallback: str | None = None  # whose choice it takes when tuned_as was not tuned
    per_domain: bool = False  # trained once per held-out domain, on that domain's oracle pairs (target labels)
    target_labels: bool = False  # uses held-out labels: an upper bound, never a competitor
    base_choice: str | None = None  # whose tuned choice it takes before its own (the BT fit's train_rm.lr: erm-rm)
    # trains on unlabelled pi_ref samples of the prompts its RM will be used on (job.target_samples: the held-out
    # domains' adaptation prompts, never their labels); the report says so
    shifted_samples: bool = False
    decoder_rm: bool = False  # needs a decoder reward backbone (reward.name_or_path on a causal LM, e.g. the policy's)

    @property
    def optimised(self) -> bool:
        """Runs the meta-test optimiser (one samples file per beta_test)."""
        return self.output in (REWARD_MODEL, GOLD)

    @property
    def bilevel(self) -> bool:
        return self.trainer is train_bilevel

    @property
    def has_outer_steps(self) -> bool:
        """Trains by meta-training's outer loop (metrics.jsonl per outer step: the meta-training curves)."""
        return self.trainer in (train_bilevel, train_bt_refine)

    @property
    def standalone(self) -> bool:
        """Trains a reward model from labelled pairs (and pi_ref samples where shifted_samples), without a warm start
        or meta-training: `oodpl train-rm --method`."""
        return self.output == REWARD_MODEL and self.trainer is not None and self.warm_start is None \
            and not self.bilevel and not self.per_domain

    @property
    def tunable(self) -> bool:
        """Has its own grid in `oodpl select` (a method that is tuned as itself)."""
        return self.trainer is not None and self.tuned_as == self.name


def _ablation(name: str, summary: str, overrides: dict, warm_start: str | None = "erm-rm") -> Method:
    return Method(name, summary, REWARD_MODEL, train_bilevel, warm_start=warm_start, overrides=overrides,
                  tuned_as="meta-rm")


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("reference", "pi_ref itself (no preference learning)", REFERENCE),
    Method("erm-rm", "ordinary RLHF: a Bradley-Terry RM on the pooled meta-train pairs, then the meta-test",
           REWARD_MODEL, train_bt, tuned_as="erm-rm"),
    Method("erm-rm-extra", "the control that isolates the hypergradient: erm-rm trained further by BT alone with "
           "meta-training's outer steps, meta-batches, query minibatches and learning rate", REWARD_MODEL,
           train_bt_refine, warm_start="erm-rm", tuned_as="erm-rm-extra", tuned_fallback="meta-rm"),
    Method("dpo", "DPO of the LoRA policy on the pooled meta-train pairs; evaluated directly", POLICY,
           train_dpo_policy, tuned_as="dpo"),
    Method("oracle-rm", "a BT RM on the held-out domain's own oracle pairs (target labels: an upper bound), then the "
           "meta-test", REWARD_MODEL, train_bt, tuned_as="erm-rm", per_domain=True, target_labels=True),
    Method("gold-reward", "the meta-test optimising the gold judge itself (an upper bound for generation quality)",
           GOLD, target_labels=True),
    Method("meta-rm", "this method: phi_0 = the seed's erm-rm, refined by bilevel meta-training, then the meta-test",
           REWARD_MODEL, train_bilevel, warm_start="erm-rm", tuned_as="meta-rm"),
    _ablation("meta-rm-bt0", "ablation: lambda_bt = 0 (the pure bilevel objective)", {"meta.lambda_bt": 0.0}),
    _ablation("meta-rm-k3", "ablation: K = 3 inner steps (truncated hypergradient)",
              {"meta.inner_steps": 3, "meta.hypergrad": "truncated"}),
    _ablation("meta-rm-scratch", "ablation: a fresh scalar head instead of the erm-rm warm start",
              {"meta.init": "scratch"}, warm_start=None),
    _ablation("meta-rm-raw", "ablation: raw rewards (no reward standardisation)", {"rloo.reward_norm": "none"}),
    _ablation("meta-rm-warm", "variant: warm-started inner policy (each meta-train domain keeps its theta_d between "
              "outer steps, reset every meta.inner_reset; truncated hypergradient; method.md)",
              {"meta.inner_start": "warm"}),
    _ablation("meta-rm-demos", "variant: the support prompts' human continuations join the inner step as "
              "demonstrations (meta.inner_candidates samples+demos; method.md)",
              {"meta.inner_candidates": "samples+demos"}),
    # the field's reward models for out-of-distribution use (field_rms.py): trained on the same pooled pairs by the
    # same BT loop (train_rm.*, erm-rm's tuned learning rate), each tuned by its own setting (field.*)
    Method("metarm", "MetaRM (Dou et al., AAAI 2025): before each BT step, gradient ascent on the spread J of the "
           "RM's rewards over unlabelled pi_ref samples of the prompts it will be used on; BT at the ascended weights, "
           "second order", REWARD_MODEL, train_metarm, tuned_as="metarm", base_choice="erm-rm", shifted_samples=True),
    Method("grm", "GRM (Yang et al., NeurIPS 2024): a decoder RM that keeps its LM head; BT + a weight times the SFT "
           "loss of the chosen responses, regularising the shared hidden states", REWARD_MODEL, train_grm,
           tuned_as="grm", base_choice="erm-rm", decoder_rm=True),
    Method("warm-rm", "WARM (Rame et al., ICML 2024): M BT reward models from one initialisation with different data "
           "orders, weight-averaged", REWARD_MODEL, train_warm, tuned_as="warm-rm", base_choice="erm-rm"),
]}

THIS_METHOD = "meta-rm"  # the paper's general reward model: every other method is also compared with it
ERM = "erm-rm"  # ordinary RLHF: the first baseline, the warm start, and the other side of win_rate_vs_erm
BASELINES = [ERM, "erm-rm-extra"]  # what every other method is compared with, paired, in the report


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def names(predicate: Callable[[Method], bool] = lambda m: True) -> list[str]:
    return [n for n, m in METHODS.items() if predicate(m)]


def with_warm_starts(methods: list[str]) -> list[str]:
    """`methods` (de-duplicated, order kept), preceded by the warm starts they need and do not list."""
    listed = list(dict.fromkeys(methods))
    missing = [w for w in dict.fromkeys(get(n).warm_start for n in listed) if w is not None and w not in listed]
    return missing + listed


def method_config(cfg: Config, seed: int, method: str | None = None, selected: dict | None = None) -> Config:
    """The config of one seed and method: the leave-one-domain-out choice of whose settings it takes, then the
    settings the method fixes (its ablation)."""
    from oodpl.config import with_overrides

    selected = selected or {}
    m = METHODS.get(method) if method else None
    choice: dict = dict(selected.get(m.base_choice, {})) if m is not None and m.base_choice else {}
    if m is not None and m.tuned_as is not None:
        if m.tuned_as in selected:
            choice = {**choice, **selected[m.tuned_as]}
        elif m.tuned_fallback is not None:
            # erm-rm-extra is meta-rm without the hypergradient: when only meta-rm was tuned it takes meta-rm's
            # choice (same keys), so the control is never left at a default the method was tuned away from
            choice = {**choice, **selected.get(m.tuned_fallback, {})}
    c = with_overrides(cfg, {**choice, **(m.overrides if m else {})}, where=f"select/{method}")
    c.seed = seed
    return c


def check_requirements(cfg: Config, methods: list[str]) -> None:
    """UserError before any training when a method cannot run with this config (a decoder RM it needs)."""
    needs_decoder = [n for n in methods if get(n).decoder_rm]
    if needs_decoder:
        from oodpl.models.reward import reward_backbone_is_decoder

        if not reward_backbone_is_decoder(cfg.reward):
            raise UserError(f"{', '.join(needs_decoder)} needs a decoder reward model, but reward.name_or_path="
                            f"{cfg.reward.name_or_path} is an encoder; set --set reward.name_or_path="
                            "smollm2-135m-instruct (the policy's architecture) for every reward model of the run")


def method_notes(cfg: Config, methods: list[str]) -> dict[str, dict]:
    """What the report says of each method beside its numbers: its reward backbone, warm start, whether it saw
    unlabelled target prompts or used target labels."""
    out = {}
    for n in methods:
        m = get(n)
        out[n] = {"summary": m.summary, "output": m.output,
                  "reward_backbone": cfg.reward.name_or_path if m.output == REWARD_MODEL else None,
                  "warm_start": m.warm_start, "target_prompts": m.shifted_samples, "target_labels": m.target_labels}
    return out


def describe() -> str:
    """The registry as a Markdown table (docs, `oodpl benchmark --list-methods`)."""
    rows = ["| method | output | trainer | warm start | tuned as | what it is |", "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        trainer = m.trainer.__name__ if m.trainer else "-"
        rows.append(f"| `{m.name}` | {m.output} | {trainer} | {m.warm_start or '-'} | {m.tuned_as or '-'} | "
                    f"{m.summary} |")
    return "\n".join(rows)
