"""Configuration: one dataclass per stage, grouped in `Config`, loaded from YAML with dotted `--set` overrides.

    cfg = load_config("configs/quick.yaml", overrides=["meta.inner_steps=3"])

Unknown keys and wrongly typed values are user errors that name the file, the line and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from oodpl.errors import UserError, decode_strict


@dataclass
class DataConfig:
    """Where preferences come from and how domains are split (see docs/data.md)."""

    task: str = "sentiment"  # built-in task ("sentiment", "knowledge") or "file" for `path`
    path: str | None = None  # pairs file / dataset dir / hub id when task == "file"
    prompts_path: str | None = None  # optional prompts file (with optional `reference`)
    columns: dict[str, str] = field(default_factory=dict)  # our column name -> the file's column name
    domain: str | None = None  # the domain of a file without a domain column (default: the file's name)
    hub_config: str | None = None  # hub datasets: load_dataset's config name (e.g. a subset)
    hub_data_dir: str | None = None  # hub datasets: load_dataset's data_dir (e.g. one SHP subreddit)
    hub_split: str = "train"  # hub datasets: the split (an id of the form owner/name:split wins)
    encoding: str = "utf-8"  # of text data files (JSONL, CSV), read strictly; e.g. latin-1 for legacy files
    meta_train_domains: list[str] | None = None  # None: every domain not held out
    held_out_domains: list[str] | None = None  # None: the task's default held-out list
    support_size: int = 16  # prompts per meta-train domain (inner problem)
    query_size: int = 32  # human pairs per meta-train domain (outer problem)
    adapt_prompts: int = 8  # prompts per held-out domain the meta-test optimises on (disjoint from eval_prompts)
    eval_prompts: int = 8  # prompts per held-out domain the policies are scored on (generation metrics)
    eval_pairs: int = 64  # human pairs per held-out domain (pl_accuracy)
    max_domains: int | None = None  # cap the number of meta-train domains (quick runs)
    seed: int = 0


@dataclass
class PolicyConfig:
    """The policy pi_theta and its frozen reference pi_ref."""

    name_or_path: str = "smollm2-135m-instruct"  # alias, hub id, local directory, GGUF file or "tiny-random"
    gguf_file: str | None = None
    trainable: str = "lora"  # "lora" (zero-initialised adapters) or "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # dropout on the LoRA branch (peft; active only where the policy is put in train mode)
    use_dora: bool = False  # weight-decomposed LoRA (peft's use_dora)
    # any further peft.LoraConfig arguments, passed through (e.g. {init_lora_weights: pissa, rank_pattern: {q_proj: 16}});
    # keys named above (r, lora_alpha, target_modules, lora_dropout, use_dora) are set by those settings
    peft_config: dict[str, Any] = field(default_factory=dict)
    # the names present in the model are used: q_proj/v_proj (Llama, Mistral, Qwen...), c_attn (GPT-2)
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "c_attn"])
    max_prompt_tokens: int = 32
    max_new_tokens: int = 16
    # human-written responses (pairs, references) are cut at this many tokens; null: 2 x max_new_tokens. Set it from
    # the data's lengths (`oodpl diagnose leverage` reports how many responses a cap cuts)
    max_response_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # prompts (and human responses) through the tokenizer's chat template as TRL renders them: auto = when the
    # tokenizer has one (SmolLM2-135M-Instruct does), true = required (an error without one), false = plain text
    chat_template: bool | str = "auto"
    dtype: str = "float32"
    # adapters on the top L decoder layers only (null / 0: every layer); the frozen layers below are computed once per
    # fixed sequence and cached (oodpl.models.trunk)
    trainable_layers: int | None = None
    # recompute each decoder layer in the backward pass of first-order passes (transformers' gradient checkpointing,
    # use_reentrant=False): less activation memory, one more forward; second-order passes (JVP, unrolled) never do
    gradient_checkpointing: bool = False

    def response_cap(self) -> int:
        """Tokens kept of a human-written response (method.md, Leverage: the cap is set from the data)."""
        return self.max_response_tokens or 2 * self.max_new_tokens


@dataclass
class RewardConfig:
    """The reward model r_phi: a scalar head on a sequence-classification backbone."""

    name_or_path: str = "all-minilm-l6-v2"  # alias, hub id, local directory or "tiny-random"
    max_length: int = 128
    # how (prompt, response) becomes the RM's input: "concat" = one sequence prompt + response + eos (TRL's
    # RewardTrainer on standard data), "pair" = tokenizer(prompt, response) (a text pair), "chat" = the tokenizer's
    # chat template over a user and an assistant message (TRL on conversational data); null = the format stored with
    # a saved RM (oodpl_reward.json), else concat
    input_format: str | None = None
    dtype: str = "float32"


@dataclass
class RLOOConfig:
    """KL-regularised RLOO policy optimisation: the inner loop of meta-training and the meta-test optimiser."""

    beta: float = 0.1  # KL strength ("reward factor")
    num_samples: int = 4  # n samples per prompt
    batch_prompts: int = 8  # B prompts per step
    importance_clip: float = 5.0  # clip of pi_theta/pi_bank importance weights (bank samples after step 0)
    # "std": rewards divided by their spread at both levels (inner step: the step's batch, differentiated through;
    # meta-test: the frozen RM's spread on pi_ref samples of the adaptation prompts); "none": raw rewards (ablation)
    reward_norm: str = "std"


@dataclass
class MetaConfig:
    """Bilevel meta-training of the general reward model."""

    init: str = "bt"  # phi_0: "bt" = the Bradley-Terry RM of the pooled meta-train pairs (erm-rm), "scratch" = fresh head
    outer_steps: int = 20
    outer_lr: float = 1e-4  # eta (Adam on phi)
    meta_batch_domains: int = 2  # domains per outer step
    inner_steps: int = 1  # K
    inner_lr: float = 1.0  # alpha (plain gradient step on theta)
    hypergrad: str = "auto"  # "one-step", "truncated", "unrolled"; auto = one-step for K=1 else truncated
    lambda_bt: float = 0.1  # Bradley-Terry anchor (0 = pure bilevel)
    query_batch: int = 16  # human pairs per domain per outer step
    bank_size: int | None = None  # prompts per domain in the sample bank (None: whole support set)
    # the inner step's candidates: "samples" or "samples+demos" (+ support prompts' human continuations, `reference`)
    inner_candidates: str = "samples"
    demo_weight: float = 1.0  # weight of the demonstrations' term in the inner gradient (samples+demos)
    # theta_0 of the inner steps: "init" (theta_init) or "warm" (the domain's last theta_K, fresh samples from it)
    inner_start: str = "init"
    inner_reset: int = 10  # inner_start=warm: theta_d = theta_init again every this many outer steps (1 = init)
    grad_clip: float = 1.0
    checkpoint_every: int = 10
    log_every: int = 1


@dataclass
class MetaTestConfig:
    """Policy optimisation on a held-out domain with a frozen reward model."""

    steps: int = 8  # S
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd"
    beta_test: list[float] = field(default_factory=lambda: [0.1])


@dataclass
class TrainRMConfig:
    """Ordinary Bradley-Terry reward-model training (the `erm-rm` and `oracle-rm` baselines, `oodpl train-rm`)."""

    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 16
    eval_fraction: float = 0.2  # held back per domain to report pair accuracy


@dataclass
class EvalConfig:
    judge: str = "auto"  # "vader", "embedding", "llm" or auto (by task)
    judge_encoder: str = "auto"  # embedding judge: auto (never the RM's backbone), all-mpnet-base-v2, all-minilm-l6-v2
    llm_url: str | None = None
    llm_model: str | None = None
    samples_per_prompt: int = 2
    agreement_samples: int = 4  # pi_ref samples per evaluation prompt in the shared rm_gold_agreement set


@dataclass
class BenchmarkConfig:
    methods: list[str] = field(
        default_factory=lambda: ["reference", "erm-rm", "dpo", "meta-rm", "oracle-rm", "gold-reward"]
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    select: bool = False  # first choose each tuned method's settings by leave-one-domain-out (select.grids)
    # the meta-test and the generation metrics (secondary endpoints) run for the first N seeds only (null: all; 0:
    # none); the primary endpoints (pl_accuracy, rm_gold_agreement) need no meta-test and are measured for every seed
    meta_test_seeds: int | None = None
    # the left-out (leverage) and fit diagnostics of the bilevel methods; off in a preset that only adds endpoints to
    # another one with the same split and RMs (configs/evidence_policy.yaml)
    diagnostics: bool = True
    # the fit diagnostic scores the first N meta-train domains in name order (null: all); its cost grows with the
    # meta-train domains, and 3 seeds x 3 domains already give the 9 cells a paired interval needs
    fit_domains: int | None = None
    dpo_epochs: int = 1
    dpo_lr: float = 5e-4


@dataclass
class SelectConfig:
    """Leave-one-domain-out selection of meta-training settings within the meta-train domains (`oodpl select`)."""

    # method -> {dotted key -> candidate values}: each tuned method (erm-rm, erm-rm-extra, meta-rm, dpo) gets its own
    # grid; give every method the same number of candidates (equal tuning budget)
    grids: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # shorthand for grids["meta-rm"] (meta.* keys)
    criterion: str = "outer_loss"  # "outer_loss" (lower is better) or "pair_accuracy" (higher is better)
    folds: int = 0  # meta-train domains left out in turn; 0 = every one
    eval_draws: int = 4  # inner batches averaged when scoring a left-out domain


@dataclass
class FieldConfig:
    """The field's out-of-distribution reward models (method.md, Baselines, "Methods of the field"); each trains by
    train_rm's Bradley-Terry loop (epochs, lr, batch_size) with its own addition (field_rms.py):
    metarm (Dou et al. 2025): phi' = phi + metarm_ascent_lr * grad J(phi) on unlabelled pi_ref samples, then
    BT(phi') - metarm_j_weight * J(phi') minimised through phi' (second order); grm (Yang et al. 2024): BT +
    grm_sft_weight * the SFT loss of the chosen responses through the kept LM head; warm-rm (Rame et al. 2024):
    warm_members BT fits from one initialisation (different data orders), weight-averaged."""

    # metarm: eta, the step of the gradient ascent on J (0: plain BT if j_weight is 0); on all-MiniLM-L6-v2 at
    # initialisation |grad J| ~ 0.2, so 1.0 makes the ascent ~1/5 of one Adam step's length at lr 2e-4 (tuned on
    # sentiment meta-train domains, configs/evidence_field_tuned.yaml chose 0.1 over 1.0)
    metarm_ascent_lr: float = 1.0
    metarm_j_weight: float = 0.0  # metarm: weight of -J(phi') in the minimised loss (0: the paper's loss, BT(phi'))
    metarm_batch_prompts: int = 4  # metarm: prompts per step whose pi_ref samples (all pairs of each) make J
    grm_sft_weight: float = 0.01  # grm: weight of the chosen responses' SFT loss (their scripts' 0.01; 0: plain BT)
    # grm: the regulariser's form. "sft" (method.md): BT + w * the token-mean causal-LM loss of the chosen responses.
    # "logsigmoid-sft" (GRM's released trainer, its defaults sft_only and reference_free): (1 - w) * BT
    # + w * -log sigmoid(grm_beta * sum of the chosen response's token log-probs)
    grm_regularizer: str = "sft"
    grm_beta: float = 0.1  # grm, logsigmoid-sft only: the beta inside the log-sigmoid (their scripts' 0.1)
    warm_members: int = 3  # warm-rm: M, the BT fits averaged (1: the erm-rm fit itself)


@dataclass
class TrackingConfig:
    """Where every stage's metrics go besides metrics.jsonl (report_to: tensorboard and/or wandb)."""

    project: str = "oodpl"  # wandb project
    run_name: str | None = None  # wandb run name / tensorboard sub-directory (default: the stage and output dir name)
    log_dir: str | None = None  # tensorboard root (default: <output>/tensorboard)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    meta_test: MetaTestConfig = field(default_factory=MetaTestConfig)
    train_rm: TrainRMConfig = field(default_factory=TrainRMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    quiet: bool = False
    # last: from here on `field` in this class body names this setting, not dataclasses.field
    field: FieldConfig = field(default_factory=FieldConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies a run's results: everything but presentation settings (quiet, report_to)."""
        d = self.to_dict()
        d.pop("quiet", None)
        d.pop("report_to", None)
        d.pop("tracking", None)
        return d


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _line_of(path: str, node: yaml.Node | None, dotted: list[str]) -> int | None:
    """1-based line of the key `dotted` in the composed YAML tree, if found."""
    for key in dotted:
        if not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            if k.value == key:
                line, node = k.start_mark.line + 1, v
                break
        else:
            return None
    return line  # noqa: F821 - set in loop


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], where) for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj: Any, data: dict, src: str, prefix: list[str], tree: yaml.Node | None,
           sources: dict[str, str] | None = None) -> None:
    """Set `data` (nested mapping) on the dataclass `obj`; record in `sources` where each dotted key came from."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = prefix + [str(key)]
        line = _line_of(src, tree, dotted) if tree is not None else None
        where = f"{src}:{line}: {'.'.join(dotted)}" if line else f"{src}: {'.'.join(dotted)}"
        if sources is not None:
            sources[".".join(dotted)] = f"{src}:{line}" if line else src
        if key not in names:
            raise UserError(f"{where}: unknown key; valid keys here are {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a mapping of {type(current).__name__} settings")
            _apply(current, value, src, dotted, tree, sources)
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _read_config_file(path: Path) -> bytes:
    """The bytes of a --config file; a missing path, a directory or a FIFO / device each get their own line."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config") from None
    except OSError as e:
        raise UserError(f"config file {path}: {(e.strerror or str(e)).lower()}; pass a readable YAML file") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"--config {path} is a directory; pass a YAML file (for example configs/quick.yaml)")
    if not stat.S_ISREG(mode):
        raise UserError(f"--config {path} is not a regular file (a FIFO, socket or device); pass a YAML file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"config file {path}: {(e.strerror or str(e)).lower()}; pass a readable YAML file") from None


def _refuse_duplicate_keys(path: Path, node: yaml.Node | None) -> None:
    """A key given twice in one mapping (two `meta:` sections, a setting twice) is an error naming both lines: YAML
    loaders keep the last one silently, dropping a whole section."""
    stack = [node]
    while stack:  # iterative: the depth of a hostile file must not exhaust the interpreter's stack here
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if k.value in first:
                        raise UserError(f"{path}:{line}: {k.value!r} is given twice in one mapping (first at line "
                                        f"{first[k.value]}); the second would silently replace the first: merge "
                                        "them or remove one")
                    first[k.value] = line
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides (values parsed as YAML)."""
    cfg = Config()
    sources: dict[str, str] = {}  # dotted key -> "file:line" or "--set", for the messages of validate_config
    if path is not None:
        path = Path(path)
        text = decode_strict(_read_config_file(path), path, fix="save the config as UTF-8")
        try:
            tree = yaml.compose(text)
            _refuse_duplicate_keys(path, tree)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{path}:{mark.line + 1}" if mark else str(path)
            raise UserError(f"{loc}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        except RecursionError:
            raise UserError(f"{path}: YAML nested too deeply to read (more levels than the reader's recursion "
                            "limit); a config is a mapping of sections of settings") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}:1: a config must be a mapping of sections (data:, policy:, meta:, ...)")
        _apply(cfg, data, str(path), [], tree, sources)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, for example --set meta.inner_steps=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        cfg = with_overrides(cfg, {key.strip(): value}, where="--set", validate=False,
                             sources=sources)  # checked once, below
    validate_config(cfg, sources)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any], where: str = "overrides", validate: bool = True,
                   sources: dict[str, str] | None = None) -> Config:
    """A copy of `cfg` with dotted-key values applied and checked like --set (UserError naming `where`)."""
    out = copy.deepcopy(cfg)
    sources = {} if sources is None else sources
    for key, value in overrides.items():
        nested: dict = {}
        cursor = nested
        parts = str(key).split(".")
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = value
        _apply(out, nested, where, [], None, sources)
    if validate:
        validate_config(out, sources)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Validation

# One line per setting with a range or a fixed set of values; adding a setting with a range is one line here, and
# tests/test_config.py fails for an int or float setting that has none. Forms: ">=1", ">0", "[0,1)", "(0,1]" (a
# range; a list setting applies it to each element), "a|b|c" (one of), "any" (any finite number). Every float
# setting must be finite whatever its rule; None passes where the type allows it.
_SEED = "[0,4294967295]"  # numpy's seeds are 32-bit
# list settings that need at least one value (an empty one would run nothing, or fail after the work)
NON_EMPTY = ("meta_test.beta_test", "benchmark.methods", "benchmark.seeds")
_DTYPES = "float32|fp32|float64|fp64|bfloat16|bf16|float16|fp16"  # the names models.DTYPES accepts
RULES: dict[str, str] = {
    "data.support_size": ">=1", "data.query_size": ">=1", "data.adapt_prompts": ">=1", "data.eval_prompts": ">=1",
    "data.eval_pairs": ">=1", "data.max_domains": ">=1", "data.seed": _SEED,
    "policy.trainable": "lora|full", "policy.lora_r": ">=1", "policy.lora_alpha": ">0",
    "policy.max_prompt_tokens": ">=1", "policy.max_new_tokens": ">=1", "policy.max_response_tokens": ">=1", "policy.temperature": ">0",
    "policy.top_k": ">=0", "policy.top_p": "(0,1]", "policy.dtype": _DTYPES,
    "policy.trainable_layers": ">=0", "policy.lora_dropout": "[0,1)",
    "reward.max_length": ">=2", "reward.dtype": _DTYPES,
    "rloo.beta": ">0", "rloo.num_samples": ">=2", "rloo.batch_prompts": ">=1", "rloo.importance_clip": ">=1",
    "rloo.reward_norm": "std|none",
    "meta.init": "bt|scratch", "meta.outer_steps": ">=1", "meta.outer_lr": ">0", "meta.meta_batch_domains": ">=1",
    "meta.inner_steps": ">=1", "meta.inner_lr": ">0", "meta.hypergrad": "auto|one-step|truncated|unrolled",
    "meta.lambda_bt": ">=0", "meta.query_batch": ">=1", "meta.bank_size": ">=1", "meta.grad_clip": ">=0",
    "meta.checkpoint_every": ">=1", "meta.log_every": ">=1", "meta.inner_candidates": "samples|samples+demos",
    "meta.demo_weight": ">=0", "meta.inner_start": "init|warm", "meta.inner_reset": ">=1",
    "meta_test.steps": ">=1", "meta_test.lr": ">0", "meta_test.optimizer": "adam|sgd", "meta_test.beta_test": ">0",
    "train_rm.epochs": ">=1", "train_rm.lr": ">0", "train_rm.batch_size": ">=1", "train_rm.eval_fraction": "[0,1)",
    "eval.judge": "auto|vader|embedding|llm", "eval.samples_per_prompt": ">=1", "eval.agreement_samples": ">=2",
    "benchmark.seeds": _SEED, "benchmark.meta_test_seeds": ">=0", "benchmark.fit_domains": ">=1", "benchmark.dpo_epochs": ">=1", "benchmark.dpo_lr": ">0",
    "select.criterion": "outer_loss|pair_accuracy", "select.folds": ">=0", "select.eval_draws": ">=1",
    "reward.input_format": "concat|pair|chat",
    "field.metarm_ascent_lr": ">=0", "field.metarm_j_weight": ">=0", "field.metarm_batch_prompts": ">=1",
    "field.grm_sft_weight": ">=0", "field.warm_members": ">=1", "field.grm_regularizer": "sft|logsigmoid-sft",
    "field.grm_beta": ">0",
    "seed": _SEED, "report_to": "tensorboard|wandb|none",
}

_RANGE = re.compile(r"^([\[(])\s*([^,]+),\s*([^\])]+)([\])])$")


def _rule_ok(rule: str, v: Any) -> tuple[bool, str]:
    """(value satisfies rule, what the rule asks in words)."""
    if rule == "any":
        return True, "a number"
    if "|" in rule or rule.isidentifier():
        choices = rule.split("|")
        return v in choices, f"one of {', '.join(choices)}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False, "a number"
    for op, test in ((">=", lambda a, b: a >= b), (">", lambda a, b: a > b)):
        if rule.startswith(op):
            bound = float(rule[len(op):])
            whole = "a whole number " if float(bound).is_integer() and isinstance(v, int) else ""
            return test(v, bound), f"{whole}{op} {rule[len(op):]}"
    m = _RANGE.match(rule)
    if m is None:  # pragma: no cover - a typo in RULES; tests/test_config.py parses every rule
        raise ValueError(f"bad validation rule {rule!r}")
    lo, hi = float(m.group(2)), float(m.group(3))
    ok = (v >= lo if m.group(1) == "[" else v > lo) and (v <= hi if m.group(4) == "]" else v < hi)
    return ok, f"in {rule}"


def _settings(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, type) of every leaf setting."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _settings(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, hints[f.name]


def validate_config(cfg: Config, sources: dict[str, str] | None = None) -> None:
    """Check every setting against RULES (and that floats are finite) and the rules that tie settings together.

    The UserError names where the bad value came from: `file:line` of its key, `--set`, or `config` (a default)."""
    sources = sources or {}

    def fail(key: str, value: Any, msg: str) -> None:
        raise UserError(f"{sources.get(key, 'config')}: {key}={value!r}: {msg}")

    for key, value, typ in _settings(cfg):
        if key in NON_EMPTY and value == []:
            fail(key, value, "needs at least one value")
        rule = RULES.get(key)
        items = value if isinstance(value, list) else [value]
        for v in items:
            if v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                fail(key, value, "must be a finite number" + ('' if rule is None else ', ' + _rule_ok(rule, v)[1]))
            if rule is not None:
                ok, want = _rule_ok(rule, v)
                if not ok:
                    fail(key, value, f"must be {want}" + (" (each value)" if isinstance(value, list) else ""))

    if cfg.policy.chat_template not in (True, False, "auto"):
        fail("policy.chat_template", cfg.policy.chat_template, "must be auto, true or false")
    if cfg.meta.hypergrad == "one-step" and cfg.meta.inner_steps != 1:
        fail("meta.hypergrad", cfg.meta.hypergrad,
             "one-step is exact only for meta.inner_steps=1; use truncated or unrolled")
    if cfg.field.grm_regularizer == "logsigmoid-sft" and cfg.field.grm_sft_weight > 1:
        fail("field.grm_sft_weight", cfg.field.grm_sft_weight,
             "must be in [0, 1] with field.grm_regularizer=logsigmoid-sft ((1 - w) * BT + w * the regulariser)")
    if cfg.tracking.run_name is not None:  # a tensorboard directory under tracking.log_dir
        from oodpl.paths import name_problem

        problem = name_problem(cfg.tracking.run_name)
        if problem:
            fail("tracking.run_name", cfg.tracking.run_name, f"{problem}; it names a directory, use a plain name")
    if not cfg.eval.judge_encoder.strip():
        fail("eval.judge_encoder", cfg.eval.judge_encoder, "must be auto, all-mpnet-base-v2, all-minilm-l6-v2 or a dir")


def resolved_hypergrad(cfg: MetaConfig) -> str:
    if cfg.hypergrad != "auto":
        return cfg.hypergrad
    return "one-step" if cfg.inner_steps == 1 else "truncated"


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
