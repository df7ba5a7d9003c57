#!/usr/bin/env bash
# The README's test command: set up .venv (CPU torch) and run the default suite (< 15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. .venv/bin/activate
python -m pytest -q "$@"
