"""Tiny random models for tests and smoke runs (no weights, no hub): a byte-level tokenizer, a GPT-2 / Llama policy and a
reward model of a few thousand parameters.
"""

from __future__ import annotations

import logging

import torch
from torch import nn


log = logging.getLogger(__name__)


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
