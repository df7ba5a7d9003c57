#!/usr/bin/env bash
# The README's test command: set up .venv (CPU torch) and run the default suite (~3-4 min on an idle 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. .venv/bin/activate
# -n auto: one pytest-xdist worker per core (tests/conftest.py gives each its share of threads);
# --dist loadfile keeps a module on one worker, so module-scoped fixtures are built once;
# --no-loadscope-reorder keeps conftest.py's longest-first module order. -n 0: one process.
python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder "$@"
