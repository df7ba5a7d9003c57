#!/usr/bin/env bash
# The README's main job: set up .venv (CPU torch) and run the main experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. .venv/bin/activate
unipost main "$@"
