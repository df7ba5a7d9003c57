"""What a wider lab student would cost on this CPU: a behaviour-cloning step and batched greedy decoding.

Why: the ablations (README here) point at the 1.9M-parameter student's copying as what keeps DAgger's
labels from helping, so the next lever is a wider student. Before spending a rebuild on it, this measures
how its two costs scale with width and depth, side by side in one process on the same inputs:

* a training micro-batch of the warm-start build (4 documents x 1,024 tokens, about the build's 4,096-token
  micro-batch): forward, backward and an AdamW step;
* decoding: greedy, a batch of 32 prompts of 900 tokens, exactly 128 new tokens each (the main job's
  per-turn budget), through ``model.generate`` with its KV cache.

Models are random-init Qwen3 (``build_tiny_qwen3``) with the lab's vocabulary size; speed does not depend on
the weights. Prints a table with each size's ratio to the shipped 192 x 4 and what those ratios imply for the
warm-start build (its recorded step count) and the main job (its measured idle wall time), and appends the
rows to ``student_size_cost.json`` beside this file.

    ABL_THREADS=1 python experiments/ablations/student_size_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SIZES = {  # name -> hidden, layers, heads, kv heads
    "192x4 (shipped)": (192, 4, 6, 2),
    "256x6": (256, 6, 8, 2),
    "384x6": (384, 6, 6, 2),
    "512x8": (512, 8, 8, 4),
}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, shape: tuple[int, int, int, int], args) -> dict:
    from unipost.models import build_tiny_qwen3

    hidden, layers, heads, kv = shape
    model = build_tiny_qwen3(
        args.vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, seed=0
    )
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    docs = torch.randint(0, args.vocab, (4, 1024), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every repeat is the same step

    def train_step() -> None:
        model.train()
        loss = model(input_ids=docs, labels=docs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=gen)

    def decode() -> None:
        model.eval()
        with torch.no_grad():
            model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    step_s = _time(train_step, args.repeats)
    decode_s = _time(decode, args.repeats)
    return {"size": name, "params": params, "train_microbatch_s": step_s, "decode_s": decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated names of SIZES")
    parser.add_argument("--vocab", type=int, default=1576, help="the shipped lab tokenizer's size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=900)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--build-steps", type=int, default=2052, help="the shipped build's optimiser steps")
    parser.add_argument("--microbatches-per-step", type=int, default=2, help="8 demos ~ 2 x 4,096 tokens")
    parser.add_argument("--main-job-min", type=float, default=7.1, help="measured idle main-job minutes")
    args = parser.parse_args()
    threads = int(os.environ.get("ABL_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    rows = [measure(name, SIZES[name], args) for name in args.sizes.split(",")]
    load_after = os.getloadavg()
    base = rows[0]
    print(f"torch threads {threads}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(
        f"{'size':>16} {'params':>8} {'train mb s':>10} {'x':>5} {'decode s':>9} {'x':>5} "
        f"{'build h (est)':>13} {'main job min (est)':>18}"
    )
    for r in rows:
        r["train_ratio"] = r["train_microbatch_s"] / base["train_microbatch_s"]
        r["decode_ratio"] = r["decode_s"] / base["decode_s"]
        r["build_hours_est"] = args.build_steps * args.microbatches_per_step * r["train_microbatch_s"] / 3600
        # Upper-end estimate: the whole main job scaled by the decoding ratio (rollouts dominate it; the
        # sandbox's share does not grow with the model, so the true figure is somewhat lower).
        r["main_job_min_est"] = args.main_job_min * r["decode_ratio"]
        r.update(threads=threads, load_before=load_before[0], load_after=load_after[0])
        print(
            f"{r['size']:>16} {r['params'] / 1e6:>7.2f}M {r['train_microbatch_s']:>10.2f} "
            f"{r['train_ratio']:>5.2f} {r['decode_s']:>9.2f} {r['decode_ratio']:>5.2f} "
            f"{r['build_hours_est']:>13.2f} {r['main_job_min_est']:>18.1f}"
        )
    out = Path(__file__).with_name("student_size_cost.json")
    with out.open("a") as f:
        f.write(json.dumps({"rows": rows, "args": vars(args)}) + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
