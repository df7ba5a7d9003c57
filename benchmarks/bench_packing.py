"""Tree packing vs one sequence per transition vs padded batches on a synthetic DAgger batch.

A DAgger batch (paper §3.2): 30-turn trajectories, turn-level mixture with beta = 0.5, the teacher's
label recorded at every visited state. Teacher-executed turns put their label on the executed
sequence; student-executed turns hang the teacher's label as a branch off the end of their context.
Three ways to compute the same loss and gradient on a tiny Qwen3 model:

* tree:            one document per trajectory (spine + branches), tree attention mask
* per-transition:  every (context, label) pair its own sequence, varlen-packed into micro-batches
                   of at most ``--max-tokens`` tokens (no padding, no cross-attention)
* padded:          every pair its own row of a right-padded batch (the HF default), micro-batched

Prints a table (tokens processed, fwd+bwd seconds, ratios, max gradient difference vs tree) and
writes benchmarks/results/packing.{json,md}.

    python benchmarks/bench_packing.py            # the recorded configuration
    python benchmarks/bench_packing.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from unipost.kernels import Label, PackSequence, pack, packed_logprobs, weighted_nll
from unipost.kernels.packing import per_transition, split_sequences
from unipost.models import build_tiny_qwen3

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_dagger_trajectory(
    rng: random.Random, vocab: int, turns: int, beta: float, lengths: dict
) -> PackSequence:
    """Token-level DAgger trajectory: prompt, then per turn an action and an observation."""

    def tokens(mean: int) -> list[int]:
        n = max(4, int(rng.gauss(mean, mean / 4)))
        return [rng.randrange(vocab) for _ in range(n)]

    root = tokens(lengths["prompt"])
    labels = []
    for _ in range(turns):
        context_len = len(root)
        teacher_executes = rng.random() < beta
        executed = tokens(lengths["action"])
        if teacher_executes:
            labels.append(Label(context_len, tuple(executed)))  # label == executed action: on the spine
        else:
            labels.append(
                Label(context_len, tuple(tokens(lengths["action"])))
            )  # the teacher's label: a branch
        root += executed + tokens(lengths["observation"])
    return PackSequence(root, labels)


def run_tree(model, docs, normaliser):
    batch = pack(docs)
    loss, _ = weighted_nll(
        packed_logprobs(model, batch).logp_L, normalization="constant", constant=normaliser
    )
    loss.backward()
    return batch.num_tokens


def run_per_transition(model, docs, normaliser, max_tokens):
    total = 0
    for group in split_sequences(per_transition(docs), max_tokens):
        batch = pack(group)
        loss, _ = weighted_nll(
            packed_logprobs(model, batch).logp_L, normalization="constant", constant=normaliser
        )
        loss.backward()
        total += batch.num_tokens
    return total


def run_padded(model, docs, normaliser, rows_per_batch):
    """Plain HF-style batches: right padding + 2-D attention mask + full logits per row."""
    from unipost.kernels.hf import fused_causal_lm_loss

    pairs = per_transition(docs)
    total = 0
    for start in range(0, len(pairs), rows_per_batch):
        group = pairs[start : start + rows_per_batch]
        width = max(len(p.root) for p in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100)
        for i, p in enumerate(group):
            ids[i, : len(p.root)] = torch.tensor(p.root)
            mask[i, : len(p.root)] = 1
            c = p.labels[0].context_len
            labels[i, c : len(p.root)] = torch.tensor(p.root[c:])
        loss = fused_causal_lm_loss(model, ids, labels, mask, num_items_in_batch=normaliser)
        loss.backward()
        total += ids.numel()
    return total


def timed(fn, model, *args):
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    tokens = fn(model, *args)
    seconds = time.perf_counter() - start
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return tokens, seconds, grads


def max_grad_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trajectories", type=int, default=1)
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--rows-per-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    lengths = {"prompt": 300, "action": 50, "observation": 120}
    vocab, hidden, layers = 32768, 128, 2
    if args.quick:
        args.turns, args.trajectories, lengths = 8, 1, {"prompt": 60, "action": 12, "observation": 30}
        vocab, hidden, layers = 4096, 64, 2
    rng = random.Random(args.seed)
    docs = [
        synthetic_dagger_trajectory(rng, vocab, args.turns, args.beta, lengths)
        for _ in range(args.trajectories)
    ]
    model = build_tiny_qwen3(
        vocab, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2, seed=1
    )
    normaliser = float(sum(len(label.token_ids) for d in docs for label in d.labels))

    results = {}
    for name, fn, extra in [
        ("tree", run_tree, ()),
        ("per-transition", run_per_transition, (args.max_tokens,)),
        ("padded", run_padded, (args.rows_per_batch,)),
    ]:
        tokens, seconds, grads = timed(fn, model, docs, normaliser, *extra)
        results[name] = {"tokens": tokens, "seconds": seconds, "grads": grads}

    tree = results["tree"]
    table = Table(
        title=f"DAgger batch: {args.trajectories} x {args.turns}-turn trajectories, beta={args.beta}"
    )
    for col in ["layout", "tokens", "fwd+bwd s", "tokens vs tree", "time vs tree", "max |grad - tree grad|"]:
        table.add_column(col, justify="right")
    rows = []
    for name, r in results.items():
        row = {
            "layout": name,
            "tokens": r["tokens"],
            "seconds": round(r["seconds"], 3),
            "token_ratio": round(r["tokens"] / tree["tokens"], 2),
            "time_ratio": round(r["seconds"] / tree["seconds"], 2),
            "max_grad_diff": max_grad_diff(r["grads"], tree["grads"]),
        }
        rows.append(row)
        table.add_row(
            name,
            str(row["tokens"]),
            f"{row['seconds']:.2f}",
            f"{row['token_ratio']:.2f}x",
            f"{row['time_ratio']:.2f}x",
            f"{row['max_grad_diff']:.1e}",
        )
    Console().print(table)
    config = {
        "trajectories": args.trajectories,
        "turns": args.turns,
        "beta": args.beta,
        "lengths": lengths,
        "model": {"vocab": vocab, "hidden": hidden, "layers": layers},
        "label_tokens": int(normaliser),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"packing{suffix}.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    md = [
        "| layout | tokens | fwd+bwd s | tokens vs tree | time vs tree | max grad diff vs tree |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['layout']} | {r['tokens']} | {r['seconds']:.2f} | {r['token_ratio']:.2f}x | "
        f"{r['time_ratio']:.2f}x | {r['max_grad_diff']:.1e} |"
        for r in rows
    ]
    (RESULTS / f"packing{suffix}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
