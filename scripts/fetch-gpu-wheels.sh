#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the small wheels scripts/gpu-check.sh installs on the GPU machine, which has
# no network: python3 3.12 there already holds torch 2.11 + CUDA, triton 3.6, transformers 5.17, peft and
# accelerate, but not the benchmark peers nor pydantic (unipost.data imports it, and tests/conftest.py
# imports unipost.data). Binary wheels for CPython 3.12 on x86-64 Linux, no dependencies (each one's
# needs that the machine lacks are named here too). ~5 MB in all; the device tool carries at most 64 MiB.
#
#   bash scripts/fetch-gpu-wheels.sh          # then: run(command="bash scripts/gpu-check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=.whl
# Versions: the ones this repo's CPU venv runs (pydantic_core is pinned exactly by pydantic).
WHEELS=(
  "liger-kernel==0.8.5"
  "cut-cross-entropy==25.1.1"
  "pydantic==2.14.4"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "typing-extensions==4.16.0"
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${WHEELS[@]}"
ls -la "$DEST"
du -sh "$DEST"
