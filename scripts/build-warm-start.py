#!/usr/bin/env python
"""Build the tiny lab's warm start (tokenizer, student, white-box teacher) and its manifest.

    python scripts/build-warm-start.py                       # the shipped one: unipost/assets/tiny-lab
    python scripts/build-warm-start.py --quick --out /tmp/ws # seconds-long, for the test suite

Every setting is a WarmStartSpec field (``--demos 1000 --hidden-size 192 ...``); the manifest records
them, this command, the training curve, validation numbers and each file's sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from unipost.train.warm_start import ASSETS, WarmStartSpec, build_warm_start

QUICK = {
    "demos": 6,
    "student_epochs": 1.0,
    "teacher_epochs": 2.0,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
    "tokenizer_vocab": 512,
    "tokenizer_demos": 6,
    "validation_tasks": 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ASSETS), help="output directory (replaced atomically)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long build for tests")
    for f in dataclasses.fields(WarmStartSpec):
        if f.name == "notes":
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = parser.parse_args()
    values = dict(QUICK) if args.quick else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("out", "quick") and v is not None})
    manifest = build_warm_start(args.out, WarmStartSpec(**values))
    print(
        json.dumps(
            {k: manifest[k] for k in ("parameters", "vocab", "train_minutes", "validation") if k in manifest},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
