"""Training throughput on CPU: the dense-mask attention path vs the split path vs unpacked documents.

One run, the same data and model, side by side: an epoch of behaviour cloning / SFT (fwd + bwd of
``sum_t w_t * -log pi(y_t | x)`` over every label token, gradients accumulated over micro-batches,
normalised by the epoch's label-token count) through the library's own path (``pack`` ->
``packed_logprobs`` -> ``weighted_nll``), with only the attention changing:

* dense:     ``attention="model"`` on an SDPA-loaded model: one additive [T, T] mask per micro-batch
             (the CPU path before ``unipost_packed_sdpa``), micro-batches of ``--max-tokens`` (8192,
             the trainer's default ``optim.micro_batch_tokens``).
* split:     ``attention="auto"``: per-document ``is_causal`` SDPA calls and per-branch calls
             (``unipost_packed_sdpa``), the same micro-batches.
* split@big: the split path with ``--big-tokens`` micro-batches (attention cost is now linear in the
             number of documents, so bigger micro-batches only amortise per-call overhead).
* unpacked:  one document per forward (a one-document pack: a single ``is_causal`` SDPA call, what
             a plain HF forward of that document runs), no packing at all.

Data (synthetic token ids; timing does not depend on their values): BC demos shaped like the
scripted expert's, a ~300-token prompt then turns of a ~60-token action (the label, on the spine)
and a ~150-token observation, up to ~``--doc-tokens`` tokens per document. ``--workload dagger``
adds a DAgger-tree workload (beta 0.5: student-executed turns carry the teacher's label as a branch);
its "unpacked" row is one (context, label) pair per forward (``per_transition``).

Every mode's accumulated gradients are compared with the dense path's (max |diff| and the largest
|gradient|). The epoch's tokens/s counts the packed tokens of the dataset (the same count for every
mode, so the rows compare wall time for the same work). Each mode runs ``--repeats`` times,
interleaved with the others so a change in machine load hits all of them alike; the median is
reported with the load average and torch thread count. These CPU machines are shared: compare ratios
within one run.

The whole training step (``--step``): the lab's student (the shipped 192 x 4 Qwen3 warm start,
``unipost/assets/tiny-lab/student``, what ``unipost.train.lab.tiny_config`` trains) on an iteration
shaped like the lab's DAgger iteration (16 trajectories of ~1k tokens, the embedded environment's real
system prompt tokens shared by all, a synthetic ~100-token issue each, turns of a ~60-token action and
a ~150-token observation, beta 0.5: student turns carry the teacher's label as a branch), micro-batches
of 4096 tokens (the lab's ``micro_batch_tokens``), AdamW. One step = packing (``first_fit`` +
``pack``/``pack_shared``), per micro-batch the backbone forward (embeddings, decoder layers with their
attention), the fused head's forward and backward, the backbone backward, then the optimiser step.
Each part is timed on its own (the head's backward is split from the backbone's by detaching the
hidden states), for one tree per trajectory and for the cross-trajectory tree (``--step-layouts``),
and for each LM-head path the Trainer chooses between (``--step-heads``): ``token_logprobs`` + the
weighted NLL (four GEMMs) and ``fused_weighted_nll`` (three GEMMs, gradient formed in the head's
forward). Rows record load, threads, others' CPU use and a busy mark (``unipost.machine``).

    python benchmarks/bench_train.py            # the recorded configuration (tiny + wide student)
    python benchmarks/bench_train.py --quick    # a smoke run (seconds)
    python benchmarks/bench_train.py --step     # the lab's whole training step, parts and shares
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from unipost.kernels import Label, PackSequence, pack, packed_logprobs, weighted_nll
from unipost.kernels.attention import attention_implementation, set_attention
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
SIZES = {"tiny": (64, 2), "wide": (256, 4)}  # hidden, layers (tiny = build_tiny_qwen3's default)


def demo(rng: random.Random, vocab: int, doc_tokens: int, beta: float | None) -> PackSequence:
    """One trajectory: prompt, then (action, observation) turns; labels are the actions.

    ``beta=None``: behaviour cloning (every action is the teacher's, its label lies on the spine).
    Otherwise each turn is teacher-executed with probability ``beta``; a student-executed turn's
    teacher label differs from what was executed, so it becomes a branch.
    """

    def tokens(mean: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(4, int(rng.gauss(mean, mean / 4))))]

    root = tokens(300)
    labels = []
    while len(root) < doc_tokens - 250:
        action = tokens(60)
        if beta is None or rng.random() < beta:
            labels.append(Label(len(root), tuple(action)))
        else:
            labels.append(Label(len(root), tuple(tokens(60))))
        root += action + tokens(150)
    return PackSequence(root, labels)


def epoch(model, groups: list[list[PackSequence]], normaliser: float, attention: str) -> tuple[float, float]:
    """fwd + bwd over every micro-batch, gradients accumulated; (wall, process CPU) seconds.

    Packing is inside the timed region: it is part of what a training step pays.
    """
    model.zero_grad(set_to_none=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for group in groups:
        batch = pack(group)
        logp = packed_logprobs(model, batch, attention=attention).logp_L
        loss, _ = weighted_nll(logp, batch.label_weight_L, normalization="constant", constant=normaliser)
        loss.backward()
    return time.perf_counter() - start, time.process_time() - cpu_start


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_size(name: str, args, workload: str) -> list[dict]:
    hidden, layers = SIZES[name]
    vocab = args.vocab
    rng = random.Random(args.seed)
    beta = None if workload == "bc" else 0.5
    docs = [demo(rng, vocab, args.doc_tokens, beta) for _ in range(args.docs)]
    model = build_tiny_qwen3(vocab, hidden_size=hidden, num_layers=layers, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    normaliser = float(sum(len(label.token_ids) for d in docs for label in d.labels))
    dataset_tokens = pack(docs).num_tokens
    unpacked_docs = [d for d in docs] if workload == "bc" else per_transition(docs)
    modes = {
        "dense": (split_sequences(docs, args.max_tokens), "model", "sdpa"),
        "split": (split_sequences(docs, args.max_tokens), "auto", None),
        f"split@{args.big_tokens}": (split_sequences(docs, args.big_tokens), "auto", None),
        "unpacked": ([[d] for d in unpacked_docs], "auto", None),
    }
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    cpu_seconds: dict[str, list[float]] = {m: [] for m in modes}
    mode_grads: dict[str, dict[str, torch.Tensor]] = {}
    implementation: dict[str, str] = {}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up (allocator, thread pool) and is dropped
        for mode, (groups, attention, load_as) in modes.items():
            if load_as is not None:
                set_attention(model, load_as)
            elapsed, cpu = epoch(model, groups, normaliser, attention)
            implementation[mode] = attention_implementation(model)
            print(
                f"{name} {workload} repeat {repeat} {mode}: {elapsed:.2f} s wall, {cpu:.2f} s CPU", flush=True
            )
            if repeat == 0:
                mode_grads[mode] = grads(model)
            else:
                seconds[mode].append(elapsed)
                cpu_seconds[mode].append(cpu)
    reference = mode_grads["dense"]
    largest = max(g.abs().max().item() for g in reference.values())
    rows = []
    dense_median = statistics.median(seconds["dense"])
    dense_cpu = statistics.median(cpu_seconds["dense"])
    for mode, (groups, _, _) in modes.items():
        median = statistics.median(seconds[mode])
        cpu = statistics.median(cpu_seconds[mode])
        diff = max((mode_grads[mode][n] - reference[n]).abs().max().item() for n in reference)
        rows.append(
            {
                "model": name,
                "hidden": hidden,
                "layers": layers,
                "params": params,
                "workload": workload,
                "mode": mode,
                "attention": implementation[mode],
                "micro_batches": len(groups),
                "forward_tokens": sum(pack(g).num_tokens for g in groups),
                "dataset_tokens": dataset_tokens,
                "label_tokens": int(normaliser),
                "seconds_median": round(median, 3),
                "seconds_all": [round(s, 3) for s in seconds[mode]],
                "tokens_per_s": round(dataset_tokens / median, 1),
                "speedup_vs_dense": round(dense_median / median, 2),
                "cpu_seconds_median": round(cpu, 3),
                "cpu_speedup_vs_dense": round(dense_cpu / cpu, 2),
                "max_grad_diff_vs_dense": diff,
                "max_abs_grad": largest,
            }
        )
    return rows


LAB_STUDENT = Path(__file__).resolve().parents[1] / "unipost" / "assets" / "tiny-lab" / "student"
STEP_PARTS = ("pack", "backbone fwd", "head fwd", "head bwd", "backbone bwd", "optimiser")


def lab_iteration(
    rng: random.Random, vocab: int, system: list[int], args, group: int = 1
) -> list[PackSequence]:
    """``args.step_trajectories`` trajectories sharing ``system``, ~``args.step_doc_tokens`` each.

    ``group == 1``: DAgger (beta 0.5: a student turn's teacher label is a branch), one task each.
    ``group > 1``: GRPO, groups of ``group`` samples of one task (system prompt and issue shared), the
    loss on the samples' own actions.
    """

    def tokens(mean: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(4, int(rng.gauss(mean, mean / 4))))]

    docs = []
    issue = []
    for i in range(args.step_trajectories):
        if i % group == 0:
            issue = tokens(100)
        root, labels = list(system) + issue, []
        while len(root) < args.step_doc_tokens - 150:
            executed = tokens(60)
            teacher = executed if group > 1 or rng.random() < 0.5 else tokens(60)
            labels.append(Label(len(root), tuple(teacher)))
            root += executed + tokens(150)
        docs.append(PackSequence(root, labels))
    return docs


STEP_HEADS = {"logprobs": "four GEMMs", "fused_loss": "three GEMMs"}


def timed_step(
    model, optimizer, docs, budget: int, share: bool, head: str = "logprobs"
) -> tuple[dict[str, float], list]:
    """One optimiser step over ``docs``; seconds per part (see ``STEP_PARTS``) and the packs.

    ``head``: ``"logprobs"`` (``token_logprobs`` then the weighted NLL: four GEMMs, the gradient formed
    in the backward) or ``"fused_loss"`` (``fused_weighted_nll``: three GEMMs, the gradient formed in
    the head's forward, its backward only scales it), the two paths the Trainer chooses between.
    """
    from unipost.kernels.fused_loss import fused_weighted_nll
    from unipost.kernels.logprobs import token_logprobs
    from unipost.kernels.model import head_params, hidden_states, split_causal_lm

    parts = dict.fromkeys(STEP_PARTS, 0.0)
    clock = time.perf_counter
    normaliser = float(sum(len(label.token_ids) for d in docs for label in d.labels))
    t = clock()
    packer = pack_shared if share else pack
    batches = [packer([docs[j] for j in b]) for b in first_fit([[d] for d in docs], budget, share)]
    parts["pack"] += clock() - t
    weight, bias = head_params(split_causal_lm(model)[1])
    for batch in batches:
        t = clock()
        hidden = hidden_states(model, batch)
        parts["backbone fwd"] += clock() - t
        t = clock()
        detached = hidden.detach().requires_grad_()
        hidden_L = detached.index_select(0, batch.label_src_L)
        if head == "fused_loss":
            w_L = batch.label_weight_L / normaliser
            loss, _ = fused_weighted_nll(hidden_L, weight, batch.label_target_L, w_L, bias=bias)
        else:
            logp = token_logprobs(hidden_L, weight, batch.label_target_L, bias=bias)
            loss, _ = weighted_nll(logp, batch.label_weight_L, normalization="constant", constant=normaliser)
        parts["head fwd"] += clock() - t
        t = clock()
        loss.backward()
        parts["head bwd"] += clock() - t
        t = clock()
        hidden.backward(detached.grad)
        parts["backbone bwd"] += clock() - t
    t = clock()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts["optimiser"] += clock() - t
    return parts, batches


def step_rows(args) -> list[dict]:
    """The lab student's whole training step, per-trajectory trees vs the cross-trajectory tree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipost.envs.embedded import SYSTEM_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(str(LAB_STUDENT))
    model = AutoModelForCausalLM.from_pretrained(
        str(LAB_STUDENT), attn_implementation="sdpa", dtype=torch.float32
    )
    model.train()
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}], tokenize=False, add_generation_prompt=False
    )
    system = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    workloads = {
        "dagger": lab_iteration(random.Random(args.seed), model.config.vocab_size, system, args),
        f"grpo (groups of {args.step_group})": lab_iteration(
            random.Random(args.seed + 1), model.config.vocab_size, system, args, group=args.step_group
        ),
    }
    rows = []
    for workload, docs in workloads.items():
        rows += step_workload_rows(model, workload, docs, len(system), args)
    return rows


def step_workload_rows(
    model, workload: str, docs: list[PackSequence], system_tokens: int, args
) -> list[dict]:
    params = sum(p.numel() for p in model.parameters())
    # lr 0: the step runs (AdamW's update arithmetic) but the weights stay, so every repeat is alike
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    layouts = {"per-trajectory": ("per-trajectory trees", False), "cross": ("cross-trajectory tree", True)}
    modes = {
        f"{layouts[layout][0]}, {STEP_HEADS[head]}": (layouts[layout][1], head)
        for layout in args.step_layouts.split(",")
        for head in args.step_heads.split(",")
    }
    seconds: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    records: dict[str, list[dict]] = {m: [] for m in modes}
    packs: dict[str, list] = {}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up and is dropped
        for mode, (share, head) in modes.items():
            with QuietMonitor() as quiet:
                parts, packs[mode] = timed_step(model, optimizer, docs, args.step_budget, share, head)
            total = sum(parts.values())
            print(
                f"step {workload} {mode} repeat {repeat}: {total:.2f} s "
                + str({k: round(v, 3) for k, v in parts.items()}),
                flush=True,
            )
            if repeat:
                seconds[mode].append(parts)
                records[mode].append(quiet.record())
    rows = []
    base = None
    for mode in modes:
        totals = [sum(p.values()) for p in seconds[mode]]
        median_index = totals.index(statistics.median_low(totals))
        parts = seconds[mode][median_index]  # the parts of the median step
        total = totals[median_index]
        base = base or total
        rows.append(
            {
                "workload": workload,
                "mode": mode,
                "params": params,
                "system_tokens": system_tokens,
                "trajectories": len(docs),
                "label_tokens": int(sum(len(label.token_ids) for d in docs for label in d.labels)),
                "micro_batches": len(packs[mode]),
                "tokens": sum(b.num_tokens for b in packs[mode]),
                "step_seconds": round(total, 3),
                "step_seconds_all": [round(t, 3) for t in totals],
                "speedup": round(base / total, 2),
                **{f"{part} s": round(parts[part], 3) for part in STEP_PARTS},
                "head_share": round((parts["head fwd"] + parts["head bwd"]) / total, 3),
                "head_path": modes[mode][1],
                "layout_shared": modes[mode][0],
                **combine_records(records[mode]),
            }
        )
    _head_savings(rows)
    return rows


def _head_savings(rows: list[dict]) -> None:
    """Per three-GEMM row: the head time it saves against the four-GEMM row of its layout, as a share of
    that row's step. The head parts are timed on their own, so this is readable where the step totals'
    difference (a few per cent of a step between repeats) is not."""
    four = {r["layout_shared"]: r for r in rows if r["head_path"] == "logprobs"}
    for r in rows:
        ref = four.get(r["layout_shared"])
        head = r["head fwd s"] + r["head bwd s"]
        r["head_s"] = round(head, 4)
        if r["head_path"] == "fused_loss" and ref is not None:
            ref_head = ref["head fwd s"] + ref["head bwd s"]
            r["head_saved_s"] = round(ref_head - head, 4)
            r["head_saved_share_of_step"] = round((ref_head - head) / ref["step_seconds"], 4)
            r["head_ratio"] = round(head / ref_head, 3) if ref_head else None


def _saved_cell(r: dict) -> str:
    if "head_saved_s" not in r:
        return "-"
    share = 100 * r["head_saved_share_of_step"]
    return f"{r['head_saved_s']:.3f} s, {share:.2f}%, {r['head_ratio']:.2f}x"


def write_step(rows: list[dict], state: dict, args) -> None:
    table = Table(title="The lab's whole training step (192x4 student): parts and shares")
    cols = ["workload", "mode", "mbs", "tokens", "step s", "x", *STEP_PARTS, "head share", "head saved"]
    for col in [*cols, *HYGIENE_HEADERS]:
        table.add_column(col, justify="right")
    md = [
        header_line(state),
        "",
        "| workload | mode | micro-batches | tokens | step s (median) | speed-up | "
        + " | ".join(f"{p} s" for p in STEP_PARTS)
        + " | head share of the step | head saved vs four GEMMs (s, share of that step, head ratio) | "
        + " | ".join(HYGIENE_HEADERS)
        + " |",
        "|---|---|---:|---:|---:|---:|"
        + "---:|" * len(STEP_PARTS)
        + "---:|---:|"
        + "---|" * len(HYGIENE_HEADERS),
    ]
    for r in rows:
        cells = [
            r["workload"],
            r["mode"],
            str(r["micro_batches"]),
            str(r["tokens"]),
            f"{r['step_seconds']:.2f}",
            f"{r['speedup']:.2f}x",
            *(f"{r[f'{p} s']:.3f}" for p in STEP_PARTS),
            f"{100 * r['head_share']:.1f}%",
            _saved_cell(r),
        ]
        table.add_row(*cells, *hygiene_cells(r))
        md.append("| " + " | ".join(cells + hygiene_cells(r)) + " |")
    Console().print(table)
    md += ["", hygiene_note(rows, state)]
    RESULTS.mkdir(exist_ok=True)
    stem = "train-step" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    payload = {"meta": {"machine": state, "config": vars(args)}, "rows": rows}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="tiny,wide", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--workloads", default="bc", help="bc (varlen packs) and/or dagger (trees)")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--doc-tokens", type=int, default=1900)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=8192,
        help="micro-batch tokens (dense and split; the trainer's default)",
    )
    parser.add_argument("--big-tokens", type=int, default=32768, help="micro-batch tokens of split@big")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", action="store_true", help="the lab student's whole training step")
    parser.add_argument("--step-trajectories", type=int, default=16, help="the lab's episodes per iteration")
    parser.add_argument("--step-doc-tokens", type=int, default=1050, help="tokens per trajectory (lab demos)")
    parser.add_argument("--step-group", type=int, default=4, help="GRPO group size (bench_methods')")
    parser.add_argument("--step-budget", type=int, default=4096, help="micro-batch tokens (the lab's)")
    parser.add_argument(
        "--step-layouts", default="per-trajectory,cross", help="per-trajectory and/or cross (tree layouts)"
    )
    parser.add_argument(
        "--step-heads",
        default="logprobs,fused_loss",
        help="LM-head paths: logprobs (4 GEMMs), fused_loss (3)",
    )
    args = parser.parse_args()
    if args.step:
        if args.quick:
            args.step_trajectories, args.repeats = 4, 1
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        state = machine_state()
        print(header_line(state), flush=True)
        write_step(step_rows(args), state, args)
        return
    if args.quick:
        args.docs, args.doc_tokens, args.repeats, args.sizes = 4, 700, 1, "tiny"
        args.max_tokens, args.big_tokens = 1500, 4096
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for workload in args.workloads.split(","):
        for size in args.sizes.split(","):
            rows += run_size(size, args, workload)
    load_after = os.getloadavg()

    table = Table(title=f"BC/SFT fwd+bwd epoch on CPU, {torch.get_num_threads()} torch threads")
    for col in ["model", "work", "mode", "mbs", "s", "tok/s", "x dense", "cpu x", "grad diff"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['hidden']}x{r['layers']}",
            r["workload"],
            r["mode"],
            str(r["micro_batches"]),
            f"{r['seconds_median']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['speedup_vs_dense']:.2f}",
            f"{r['cpu_speedup_vs_dense']:.2f}",
            f"{r['max_grad_diff_vs_dense']:.0e}",
        )
    Console().print(table)
    meta = {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config": {k: v for k, v in vars(args).items()},
    }
    print(f"load average before {meta['load_average_before']} after {meta['load_average_after']}")
    RESULTS.mkdir(exist_ok=True)
    stem = ("train-quick" if args.quick else "train") + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"torch threads {meta['torch_threads']}, load average before {meta['load_average_before']} "
        f"after {meta['load_average_after']}",
        "",
        "| model | workload | mode | attention | micro-batches | fwd tokens | s (median) | tokens/s "
        "| vs dense | CPU s (median) | CPU-time vs dense | max abs grad diff vs dense (max abs grad) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {r['hidden']}x{r['layers']} | {r['workload']} | {r['mode']} | {r['attention']} "
            f"| {r['micro_batches']} | {r['forward_tokens']} | {r['seconds_median']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {r['speedup_vs_dense']:.2f}x "
            f"| {r['cpu_seconds_median']:.2f} | {r['cpu_speedup_vs_dense']:.2f}x "
            f"| {r['max_grad_diff_vs_dense']:.1e} ({r['max_abs_grad']:.1e}) |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
