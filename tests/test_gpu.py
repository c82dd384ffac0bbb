"""GPU checks (pytest -m gpu; skipped without CUDA) and the GPU stack's import environment, simulated on any machine.

The checks themselves live in scripts/gpu_smoke.py, which the smoke script also runs without pytest."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_smoke  # noqa: E402

# what the borrowed GPU machine does not have (scripts/gpu_smoke.sh): oodpl must import and read data without them
MISSING_ON_GPU = ["trl", "datasets", "matplotlib", "pandas", "tensorboard", "vaderSentiment", "gguf", "deepspeed",
                  "sentencepiece"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("check", gpu_smoke.CHECKS, ids=lambda c: c.__name__)
def test_gpu_check(check):
    check()


def test_smoke_path_imports_and_reads_data_without_trl_and_datasets(tmp_path):
    code = f"""
import sys
for m in {MISSING_ON_GPU!r}:
    sys.modules[m] = None
sys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT / 'scripts')!r}]
import oodpl.cli.main, oodpl.train.metatrain, oodpl.adapt.metatest, oodpl.core.bilevel, oodpl.models.trunk, oodpl.models.sampling
import gpu_smoke
from oodpl.data.split import build_split
from pathlib import Path
cfg = gpu_smoke.config(gpu_smoke.write_pairs(Path({str(tmp_path)!r}) / "p.jsonl"), "tiny-random", "tiny-random", "bf16")
split = build_split(cfg.data)
assert sorted(split.meta_train) == ["d0", "d1", "d2"], sorted(split.meta_train)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
