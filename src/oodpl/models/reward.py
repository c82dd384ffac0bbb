"""The reward model r_phi: a stock `AutoModelForSequenceClassification(num_labels=1)` (encoder, or a decoder scored as TRL
scores one), how its inputs are built, and saved / loaded as a standard checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from oodpl.config import RewardConfig
from oodpl.runtime.checks import check_model_dir, check_reward_adapter_dir
from oodpl.errors import UserError, atomic_directory
from oodpl.models.precision import at_least_float32, autocast, check_positions, parse_dtype
from oodpl.models.sources import POLICY_ALIASES, RANDOM_MINILM, REWARD_ALIASES, TINY, TINY_LLAMA, reward_source
from oodpl.models.tiny import tiny_reward_model, tiny_tokenizer

log = logging.getLogger(__name__)


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
            from oodpl.models.chat import reward_chat_ids

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
        from oodpl.runtime.progress import step

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
        from oodpl.models.chat import has_template

        input_format = "chat" if has_template(tokenizer) else DEFAULT_INPUT_FORMAT
        log.info("reward model %s has no %s: scored with input_format %s (its tokenizer %s a chat template); set "
                 "reward.input_format to choose", cfg.name_or_path, REWARD_META, input_format,
                 "has" if input_format == "chat" else "has no")
    input_format = input_format or DEFAULT_INPUT_FORMAT
    if stored and cfg.input_format and cfg.input_format != stored:
        log.warning("reward.input_format %s overrides %s recorded in %s/%s", cfg.input_format, stored, source,
                    REWARD_META)
    if input_format == "chat":
        from oodpl.models.chat import ensure_reward_template

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
