#!/usr/bin/env bash
# The GPU check of issue 14, one command (<= 8 minutes on one H200, from a bare machine with no network):
#
#   bash scripts/gpu-check.sh [--out DIR] [--budget SECONDS] [--only triton,bench,flex]
#   bash scripts/gpu-check.sh --dry-run      # the same steps on CPU at tiny shapes (tests/test_gpu_check.py)
#
# Runs (scripts/gpu_check.py, each step timed, with its own timeout, continuing past a failure):
#   (a) the Triton token_logprobs kernel vs the fp64 reference on CUDA (fp32, bf16, entropy, temperature,
#       odd shapes, V=152k);  (c) bench_logprobs on CUDA at N=16k, H=4096, V=152k bf16 for naive /
#   ours-triton / Liger / CCE;  (b) tree- and varlen-packed fwd+bwd through FlexAttention vs separate
#   sequences, gradients equal. Writes gpu-check.{json,md,log} into --out (default $OUT, else
#   outputs/gpu-check). Exit status 1 when a step failed or timed out.
#
# On the device machine (python3 there holds torch + CUDA, triton, transformers, peft, accelerate; the wheels
# it lacks travel in the git-ignored .whl/, filled here by scripts/fetch-gpu-wheels.sh):
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=560)
# unipost itself is not installed: the repo root goes on PYTHONPATH (no network, no build step).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py --python "$PY" "$@"
