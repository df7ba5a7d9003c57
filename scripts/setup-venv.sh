#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and unipost installed editable with its dev extras.
# Idempotent: a second run only re-checks. Installs bubblewrap (the sandbox) when apt-get is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; } || \
      echo "warning: could not install bubblewrap; sandboxed tests will be skipped" >&2
  else
    echo "warning: bubblewrap (bwrap) not found and apt-get unavailable; sandboxed tests will be skipped" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build first: with torch==2.13.0 present, the range in pyproject.toml is satisfied and pip
# pulls no CUDA packages. On a GPU machine install your CUDA torch instead, then `pip install -e .`.
python -m pip install -q "torch==${UNIPOST_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev]"
