#!/usr/bin/env bash
# GPU smoke test for a CUDA machine with no network and its own Python stack (torch + CUDA, transformers, peft,
# accelerate, tokenizers, safetensors; no trl, no datasets, oodpl not installed). Runs from the checkout's src/.
#
#   bash scripts/gpu_smoke.sh            # checks + tiny models + random default-architecture models (bf16 and fp32)
#   bash scripts/gpu_smoke.sh --quick    # checks + tiny models only
#
# 1. the GPU-marked tests (pytest -m gpu) when pytest is installed, else the same checks run directly;
# 2. scripts/gpu_smoke.py: 2-step meta-train, 2-step meta-test and timed meta steps (full depth vs frozen trunk),
#    printing step times and peak GPU memory. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OODPL_CACHE="${OODPL_CACHE:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
"$PY" - <<'PY'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible")
PY
extra=()
[[ "${1:-}" == "--quick" ]] && extra+=(--skip-default-arch)
status=0
if "$PY" -c "import pytest" 2>/dev/null; then
    echo "== pytest -m gpu"
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || status=1
    echo "== runs"
    "$PY" scripts/gpu_smoke.py "${extra[@]}" || status=1  # (repeats the checks: cheap)
else
    echo "== checks and runs (pytest not installed: checks run directly)"
    "$PY" scripts/gpu_smoke.py "${extra[@]}" || status=1
fi
if [[ $status -ne 0 ]]; then echo "gpu_smoke.sh: FAILED"; else echo "gpu_smoke.sh: all passed"; fi
exit $status
