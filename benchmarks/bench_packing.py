"""Tree packing vs one sequence per transition vs padded batches; prefixes shared across trajectories.

A DAgger batch (paper §3.2): 30-turn trajectories, turn-level mixture with beta = 0.5, the teacher's
label recorded at every visited state. Teacher-executed turns put their label on the executed
sequence; student-executed turns hang the teacher's label as a branch off the end of their context.
Three ways to compute the same loss and gradient on a tiny Qwen3 model:

* tree:            one document per trajectory (spine + branches), tree attention mask
* per-transition:  every (context, label) pair its own sequence, varlen-packed into micro-batches
                   of at most ``--max-tokens`` tokens (no padding, no cross-attention)
* padded:          every pair its own row of a right-padded batch (the HF default), micro-batched

Second table, prefixes shared across trajectories (``pack_shared``): the documents of one micro-batch
as one prefix tree, vs one tree per trajectory (``pack``, what the trainer packed before), both through
the library's path on the same model, with the CPU split attention (``attention="auto"``) and the dense
additive mask (``attention="model"``), and the split path with every branch run as a masked call
(``split/masked``: no causal call over a short prefix), on three workloads:

* grpo8:       a GRPO group of 8: one prompt (~1.5k tokens: system prompt, tool schemas, issue) and 8
               sampled single-turn completions (~300 tokens each), the loss on each completion;
* grpo8-turns: the same group as 8 multi-turn trajectories (4 turns of a ~60-token action and a
               ~200-token observation after the prompt), the loss on every action;
* dagger8:     an iteration of 8 DAgger trajectories on 8 different tasks: a shared ~1k-token system
               prompt (+ tool schemas), a ~300-token issue each, 8 turns (beta 0.5: student turns carry
               the teacher's label as a branch).

fwd+bwd time is the median of ``--repeats`` interleaved runs (after a warm-up); gradients are compared
with the per-trajectory trees on the split path. Every row records the load average, the torch thread
count, others' CPU use and a busy mark (``unipost.machine.QuietMonitor``).

Prints the tables and writes benchmarks/results/packing.{json,md}.

    python benchmarks/bench_packing.py            # the recorded configuration
    python benchmarks/bench_packing.py --quick    # a smoke run
    python benchmarks/bench_packing.py --only shared   # the cross-trajectory table alone
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from unipost.kernels import Label, PackSequence, pack, packed_logprobs, weighted_nll
from unipost.kernels.attention import AttentionPiece
from unipost.kernels.packing import first_fit, pack_shared, per_transition, split_sequences
from unipost.machine import (
    HYGIENE_HEADERS,
    QuietMonitor,
    combine_records,
    header_line,
    hygiene_cells,
    hygiene_note,
    machine_state,
)
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
    with QuietMonitor() as quiet:
        start = time.perf_counter()
        tokens = fn(model, *args)
        seconds = time.perf_counter() - start
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return tokens, seconds, grads, quiet.record()


def max_grad_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def tokens_of(rng: random.Random, vocab: int, mean: int) -> list[int]:
    n = max(4, int(rng.gauss(mean, mean / 4)))
    return [rng.randrange(vocab) for _ in range(n)]


def grpo_group(
    rng: random.Random, vocab: int, size: dict, group: int = 8, turns: int = 0
) -> list[PackSequence]:
    """``group`` samples of one prompt; the loss on each sample's own tokens (labels on the spines).

    ``turns == 0``: one sampled completion per sample. Otherwise multi-turn trajectories: ``turns``
    (action, observation) pairs after the prompt, the loss on every action.
    """
    prompt = tokens_of(rng, vocab, size["prompt"])
    docs = []
    for _ in range(group):
        root, labels = list(prompt), []
        if turns == 0:
            completion = tokens_of(rng, vocab, size["completion"])
            labels.append(Label(len(root), tuple(completion)))
            root += completion
        for _turn in range(turns):
            action = tokens_of(rng, vocab, size["action"])
            labels.append(Label(len(root), tuple(action)))
            root += action + tokens_of(rng, vocab, size["observation"])
        docs.append(PackSequence(root, labels))
    return docs


def dagger_iteration(
    rng: random.Random, vocab: int, size: dict, trajectories: int, turns: int
) -> list[PackSequence]:
    """Trajectories on different tasks sharing the system prompt; beta 0.5 teacher/student turns."""
    system = tokens_of(rng, vocab, size["system"])
    docs = []
    for _ in range(trajectories):
        root, labels = system + tokens_of(rng, vocab, size["issue"]), []
        for _turn in range(turns):
            executed = tokens_of(rng, vocab, size["action"])
            teacher = executed if rng.random() < 0.5 else tokens_of(rng, vocab, size["action"])
            labels.append(Label(len(root), tuple(teacher)))  # a branch when the student executed
            root += executed + tokens_of(rng, vocab, size["observation"])
        docs.append(PackSequence(root, labels))
    return docs


@contextmanager
def masked_branches():
    """Every branch as a masked call (the split path without the causal call over a short prefix)."""
    original = AttentionPiece.causal_over_prefix
    AttentionPiece.causal_over_prefix = property(lambda self: False)
    try:
        yield
    finally:
        AttentionPiece.causal_over_prefix = original


def fwd_bwd(model, batch, normaliser, attention):
    logp = packed_logprobs(model, batch, attention=attention).logp_L
    loss, _ = weighted_nll(logp, batch.label_weight_L, normalization="constant", constant=normaliser)
    loss.backward()


def shared_rows(model, workloads: dict[str, list[PackSequence]], repeats: int, budget: int) -> list[dict]:
    """Per-trajectory trees vs the cross-trajectory tree, micro-batched as the trainer does.

    Each variant cuts the documents into micro-batches of at most ``budget`` packed tokens
    (``first_fit``, counting shared prefixes once for the cross-trajectory tree), then packs and runs
    fwd + bwd of each, gradients accumulated: what ``make_microbatches`` + the optimiser loop pay.
    """
    variants = [
        ("per-trajectory trees", False, "auto", False),
        ("cross-trajectory tree", True, "auto", False),
        ("cross-trajectory tree", True, "auto", True),
        ("cross-trajectory tree", True, "model", False),
    ]
    rows = []
    for workload, docs in workloads.items():
        normaliser = float(sum(len(label.token_ids) for d in docs for label in d.labels))
        times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
        records: dict[int, list[dict]] = {i: [] for i in range(len(variants))}
        grads: dict[int, dict] = {}
        packs: dict[int, list] = {}
        for repeat in range(repeats + 1):  # repeat 0 warms up and gives the gradients
            for i, (_, share, attention, masked) in enumerate(variants):
                model.zero_grad(set_to_none=True)
                packer = pack_shared if share else pack
                with QuietMonitor() as quiet:
                    start = time.perf_counter()
                    bins = first_fit([[d] for d in docs], budget, share)  # packing is part of a step
                    batches = [packer([docs[j] for j in b]) for b in bins]
                    with masked_branches() if masked else nullcontext():
                        for batch in batches:
                            fwd_bwd(model, batch, normaliser, attention)
                    elapsed = time.perf_counter() - start
                packs[i] = batches
                print(f"{workload} repeat {repeat} variant {i}: {elapsed:.2f} s", flush=True)
                if repeat == 0:
                    grads[i] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
                else:
                    times[i].append(elapsed)
                    records[i].append(quiet.record())
        base_tokens = sum(b.num_tokens for b in packs[0])
        base_time = statistics.median(times[0])
        largest = max(g.abs().max().item() for g in grads[0].values())
        for i, (layout, _, attention, masked) in enumerate(variants):
            seconds = statistics.median(times[i])
            tokens = sum(b.num_tokens for b in packs[i])
            name = {"auto": "split", "model": "dense mask"}[attention] + ("/masked" if masked else "")
            rows.append(
                {
                    "workload": workload,
                    "layout": layout,
                    "attention": name,
                    "documents": len(docs),
                    "label_tokens": int(normaliser),
                    "micro_batches": len(packs[i]),
                    "tokens": tokens,
                    "spans": sum(b.num_spans for b in packs[i]),
                    "seconds": round(seconds, 3),
                    "seconds_all": [round(t, 3) for t in times[i]],
                    "token_ratio": round(base_tokens / tokens, 2),
                    "speedup": round(base_time / seconds, 2),
                    "max_grad_diff": max_grad_diff(grads[i], grads[0]),
                    "max_abs_grad": largest,
                    **combine_records(records[i]),
                }
            )
    return rows


def single_trajectory_rows(model, docs, args) -> list[dict]:
    normaliser = float(sum(len(label.token_ids) for d in docs for label in d.labels))
    # warm-up (untimed): the first fwd+bwd of a process pays one-off costs (allocator, thread pool, the
    # head's first call per shape class) that would otherwise land on the first row
    timed(run_tree, model, docs, normaliser)
    results = {}
    for name, fn, extra in [
        ("tree", run_tree, ()),
        ("per-transition", run_per_transition, (args.max_tokens,)),
        ("padded", run_padded, (args.rows_per_batch,)),
    ]:
        tokens, seconds, grads, record = timed(fn, model, docs, normaliser, *extra)
        results[name] = {"tokens": tokens, "seconds": seconds, "grads": grads, "record": record}
        print(f"single trajectory {name}: {seconds:.2f} s", flush=True)
    tree = results["tree"]
    return [
        {
            "layout": name,
            "tokens": r["tokens"],
            "seconds": round(r["seconds"], 3),
            "token_ratio": round(r["tokens"] / tree["tokens"], 2),
            "time_ratio": round(r["seconds"] / tree["seconds"], 2),
            "max_grad_diff": max_grad_diff(r["grads"], tree["grads"]),
            **r["record"],
        }
        for name, r in results.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["single", "shared"], default=None)
    parser.add_argument("--trajectories", type=int, default=1)
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument(
        "--max-tokens", type=int, default=8192, help="micro-batch tokens (the trainer's default)"
    )
    parser.add_argument("--rows-per-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the shared table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    lengths = {"prompt": 300, "action": 50, "observation": 120}
    shared_size = {
        "prompt": 1500,
        "completion": 300,
        "action": 60,
        "observation": 200,
        "system": 1000,
        "issue": 300,
    }
    dagger_turns = 8
    vocab, hidden, layers = 32768, 128, 2
    if args.quick:
        args.turns, args.trajectories, lengths = 8, 1, {"prompt": 60, "action": 12, "observation": 30}
        shared_size = {k: v // 10 for k, v in shared_size.items()}
        dagger_turns, args.repeats, args.max_tokens = 4, 1, 1024
        vocab, hidden, layers = 4096, 64, 2
    state = machine_state()
    print(header_line(state), flush=True)
    model = build_tiny_qwen3(
        vocab, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2, seed=1
    )
    config = {
        "trajectories": args.trajectories,
        "turns": args.turns,
        "beta": args.beta,
        "lengths": lengths,
        "shared_lengths": shared_size,
        "dagger_turns": dagger_turns,
        "repeats": args.repeats,
        "model": {"vocab": vocab, "hidden": hidden, "layers": layers},
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "machine": state,
    }
    single, shared = [], []
    if args.only in (None, "single"):
        rng = random.Random(args.seed)
        docs = [
            synthetic_dagger_trajectory(rng, vocab, args.turns, args.beta, lengths)
            for _ in range(args.trajectories)
        ]
        config["label_tokens"] = int(sum(len(label.token_ids) for d in docs for label in d.labels))
        single = single_trajectory_rows(model, docs, args)
    if args.only in (None, "shared"):
        rng = random.Random(args.seed + 1)
        workloads = {
            "grpo8": grpo_group(rng, vocab, shared_size),
            "grpo8-turns": grpo_group(rng, vocab, shared_size, turns=4),
            "dagger8": dagger_iteration(rng, vocab, shared_size, 8, dagger_turns),
        }
        shared = shared_rows(model, workloads, args.repeats, args.max_tokens)

    console = Console()
    md = [header_line(state), ""]
    if single:
        table = Table(
            title=f"DAgger batch: {args.trajectories} x {args.turns}-turn trajectories, beta={args.beta}"
        )
        cols = ["layout", "tokens", "fwd+bwd s", "tokens vs tree", "time vs tree", "max |grad - tree grad|"]
        for col in [*cols, *HYGIENE_HEADERS]:
            table.add_column(col, justify="right")
        md += [
            "| layout | tokens | fwd+bwd s | tokens vs tree | time vs tree | max grad diff vs tree | "
            + " | ".join(HYGIENE_HEADERS)
            + " |",
            "|---|---|---|---|---|---|" + "---|" * len(HYGIENE_HEADERS),
        ]
        for r in single:
            cells = [
                r["layout"],
                str(r["tokens"]),
                f"{r['seconds']:.2f}",
                f"{r['token_ratio']:.2f}x",
                f"{r['time_ratio']:.2f}x",
                f"{r['max_grad_diff']:.1e}",
                *hygiene_cells(r),
            ]
            table.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
        console.print(table)
        md += ["", hygiene_note(single, state), ""]
    if shared:
        table = Table(
            title="Prefixes shared across trajectories: one tree per micro-batch vs one per trajectory"
        )
        cols = [
            "workload",
            "layout",
            "attention",
            "mbs",
            "tokens",
            "spans",
            "fwd+bwd s",
            "fewer tokens",
            "speed-up",
            "max |grad diff|",
        ]
        for col in [*cols, *HYGIENE_HEADERS]:
            table.add_column(col, justify="right")
        md += [
            "| workload | layout | attention | micro-batches | tokens | attention calls (spans) "
            "| fwd+bwd s (median) "
            "| tokens: per-trajectory / this | speed-up vs per-trajectory split "
            "| max abs grad diff vs per-trajectory split (max abs grad) | "
            + " | ".join(HYGIENE_HEADERS)
            + " |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|" + "---|" * len(HYGIENE_HEADERS),
        ]
        for r in shared:
            cells = [
                r["workload"],
                r["layout"],
                r["attention"],
                str(r["micro_batches"]),
                str(r["tokens"]),
                str(r["spans"]),
                f"{r['seconds']:.2f}",
                f"{r['token_ratio']:.2f}x",
                f"{r['speedup']:.2f}x",
                f"{r['max_grad_diff']:.1e}",
            ]
            table.add_row(*cells, *hygiene_cells(r))
            cells[-1] = f"{r['max_grad_diff']:.1e} ({r['max_abs_grad']:.1e})"
            md.append("| " + " | ".join(cells + hygiene_cells(r)) + " |")
        console.print(table)
        md += ["", hygiene_note(shared, state)]
    RESULTS.mkdir(exist_ok=True)
    stem = "packing" + ("-quick" if args.quick else "") + (f"-{args.only}" if args.only else "")
    payload = {"config": config, "rows": single, "shared_rows": shared}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
