"""`oodpl generate`: sample responses from an aligned policy (an adapter or model directory) or from the base policy.

    oodpl generate --policy run/policies/my_domain/beta_0.1 --prompts prompts.jsonl --output samples.jsonl

Prompts are read like every prompts file (any accepted shape; a file without a domain column is one domain).
Each output line is {"domain", "prompt", "response", "sample"}; the file is written once, atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from oodpl.errors import UserError, atomic_write_text

MAX_SEED = 2**32 - 1  # as the config's seeds (config.RULES)


def generate_command(cfg, policy: str | None, prompts_path: str, output: str, num_samples: int = 1,
                     columns: dict[str, str] | None = None, domain: str | None = None,
                     max_new_tokens: int | None = None, seed: int | None = None, quiet: bool = False) -> dict:
    """Sample `num_samples` responses per prompt; returns {"output", "prompts", "responses", "policy"}."""
    from oodpl.data.conversation import to_json as chat_json
    from oodpl.data.records import read_prompts
    from oodpl.models.precision import check_positions, parse_dtype
    from oodpl.models.policy import load_policy
    from oodpl.models.sampling import encode_prompts, sample_responses

    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be >= 1")
    if max_new_tokens is not None and max_new_tokens < 1:  # 0 would silently mean "the recorded setting"
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be >= 1 (omit it for the policy's recorded setting)")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: must be in [0, {MAX_SEED}]")
    out_path = Path(output)
    if out_path.is_dir():
        raise UserError(f"--output {output} is a directory; pass a file name such as samples.jsonl")
    if out_path.exists() and Path(prompts_path).exists() and out_path.resolve() == Path(prompts_path).resolve():
        raise UserError(f"--output {output} is the --prompts file: it would be overwritten; choose another --output")
    records = read_prompts(prompts_path, columns or cfg.data.columns, cfg.data.encoding, domain or cfg.data.domain)
    pcfg = cfg.policy
    if policy and Path(policy).expanduser().is_dir():
        from oodpl.runtime.checks import check_policy_dir
        from oodpl.models.export import load_saved_policy

        check_policy_dir(Path(policy).expanduser())
        model, tok, meta = load_saved_policy(policy, parse_dtype(pcfg.dtype))
        from oodpl.models.chat import resolve_policy_template

        chat = bool(meta["chat_template"]) if "chat_template" in meta else resolve_policy_template(
            pcfg.chat_template, tok, str(policy))
        max_prompt = int(meta.get("max_prompt_tokens", pcfg.max_prompt_tokens))
        new_tokens = max_new_tokens or int(meta.get("max_new_tokens", pcfg.max_new_tokens))
        label = str(policy)
    else:  # the base policy: policy.name_or_path, or --policy naming a model (alias, hub id, path)
        import dataclasses

        if policy:
            pcfg = dataclasses.replace(pcfg, name_or_path=policy)
        loaded = load_policy(pcfg, seed=cfg.seed)
        model, tok = loaded.model, loaded.tokenizer
        chat, max_prompt = loaded.config.chat_template, pcfg.max_prompt_tokens  # resolved by load_policy
        new_tokens = max_new_tokens or pcfg.max_new_tokens
        label = pcfg.name_or_path
    check_positions(model, max_prompt + new_tokens, f"the prompt budget + --max-new-tokens = {max_prompt} + "
                    f"{new_tokens}", "lower --max-new-tokens")
    if torch.cuda.is_available():
        model = model.to("cuda")
    prompt_ids = encode_prompts(tok, [r.prompt for r in records], max_prompt, chat)
    with torch.no_grad():
        samples = sample_responses(model, tok, prompt_ids, num_samples, new_tokens, pcfg.temperature, pcfg.top_k,
                                   pcfg.top_p, generator_seed=cfg.seed if seed is None else seed,
                                   progress=not quiet, desc="generate")
    lines = []
    for rec, responses in zip(records, samples):
        for k, ids in enumerate(responses):
            text = tok.decode(ids, skip_special_tokens=True)
            lines.append(json.dumps({"domain": rec.domain, "prompt": chat_json(rec.prompt), "response": text,
                                     "sample": k},
                                    ensure_ascii=False))
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    return {"output": str(out_path), "prompts": len(records), "responses": len(lines), "policy": label}
