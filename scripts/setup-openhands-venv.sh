#!/usr/bin/env bash
# Builds .venv-openhands: a Python 3.12 venv with the real OpenHands agent SDK tools (openhands-sdk /
# openhands-tools 1.58.0). unipost itself runs in .venv (Python >= 3.10); OpenHandsEnv starts
# unipost/envs/openhands/worker.py with THIS venv's interpreter, so the two never share site-packages.
# Idempotent. Exit codes: 0 built (or already there), 3 impossible here (no Python >= 3.12 or no PyPI),
# anything else: a real failure. The terminal tool needs tmux; it is installed with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UNIPOST_OPENHANDS_VENV:-.venv-openhands}
VERSION=${UNIPOST_OPENHANDS_VERSION:-1.58.0}

find_python() {
  for cand in "${PYTHON312:-}" python3.12 python3.13 "$HOME/.pyenv/versions/3.12.1/bin/python3.12"; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$cand"
      return 0
    fi
  done
  return 1
}

if ! command -v tmux >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q tmux >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tmux >/dev/null 2>&1; } || true
  fi
  command -v tmux >/dev/null 2>&1 || { echo "setup-openhands-venv: tmux is missing (apt-get install tmux)" >&2; exit 3; }
fi

base_python_copy() {
  # As root, the sandbox runs the worker as an unprivileged uid, which cannot enter /root (where pyenv
  # keeps interpreters). Copy the base prefix (without its tests and site-packages) next to the venv;
  # unipost binds the copy read-only at the original path inside the sandbox.
  [ "$(id -u)" = 0 ] || return 0
  local base
  base=$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')
  local p=$base
  while [ "$p" != "/" ]; do
    if [ $(( $(stat -c '%a' "$p") % 2 )) -eq 0 ]; then
      if [ ! -d "$VENV/.base-python" ]; then
        mkdir -p "$VENV/.base-python.tmp"
        tar -C "$base" --exclude='./lib/python3.*/test' --exclude='./lib/python3.*/site-packages' -cf - . |
          tar -C "$VENV/.base-python.tmp" -xf -
        chmod -R a+rX "$VENV/.base-python.tmp"
        mv "$VENV/.base-python.tmp" "$VENV/.base-python"
      fi
      return 0
    fi
    p=$(dirname "$p")
  done
}

if [ -x "$VENV/bin/python" ] && LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/python" -c 'import openhands.sdk, openhands.tools' 2>/dev/null; then
  base_python_copy
  exit 0
fi
PY=$(find_python) || { echo "setup-openhands-venv: no Python >= 3.12 found (set PYTHON312=/path/to/python3.12)" >&2; exit 3; }
# pyenv shims resolve to the real interpreter; the venv must point at the real one.
PY=$("$PY" -c 'import sys; print(sys.executable)')
"$PY" -m venv "$VENV" || exit 3
"$VENV/bin/python" -m pip install -q --upgrade pip || exit 3
"$VENV/bin/python" -m pip install -q "openhands-sdk==$VERSION" "openhands-tools==$VERSION" || exit 3
base_python_copy
LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/python" -c 'import openhands.sdk, openhands.tools; print("openhands venv ready")'
