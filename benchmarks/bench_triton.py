"""Triton ``token_logprobs`` against the torch kernel (and the naive reference), forward + backward.

    python benchmarks/bench_triton.py             # CPU: Triton's interpreter, small shapes (~1 min)
    python benchmarks/bench_triton.py --quick     # one tiny shape
    python benchmarks/bench_triton.py --device cuda --dtype bf16    # on a GPU machine: real performance

On CPU the Triton kernels can only run in Triton's interpreter (numpy, one program at a time): those
timings are NOT performance and every row says so (``mode = interpreter``); they show the interpreter's
cost and confirm on every shape that the two kernels agree (``max |dlogp|`` and ``max |dgrad|`` columns,
relative to the torch kernel). The script re-executes itself with ``TRITON_INTERPRET=1`` when it needs
the interpreter, since that variable must be set before the kernels are imported.

On CUDA (``mode = cuda``) it measures what matters: median of ``--repeats`` timed fwd+bwd runs after a
warm-up (CUDA events), and the peak allocated memory beyond the inputs (``torch.cuda.max_memory_allocated``).
Writes ``benchmarks/results/triton_<mode>.{csv,md}``. Each shape's rows (all methods) are measured in one
``unipost.machine.QuietMonitor`` block: every row records that block's 1-minute load before/after, other
processes' mean CPU use and the torch thread count, and is marked BUSY (with a warning) when others used
more than a quarter of a core meanwhile; ratios are comparable within one shape of one quiet run.

Workload: ``sum_t w_t * logp_t + u_t * H_t`` with random per-token weights ``w_t`` on the log-probs and
``u_t`` on the entropy (so both upstream gradients are exercised), 10% of targets ignored, a bias-free
head as in Qwen / Llama.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from unipost.machine import (
    HYGIENE_HEADERS,
    QuietMonitor,
    header_line,
    hygiene_cells,
    hygiene_note,
    machine_state,
)

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("torch", "triton", "naive")
CPU_SHAPES = [(64, 64, 256), (128, 64, 512), (128, 128, 1024)]  # (N, H, V): interpreter-sized
CUDA_SHAPES = [(4096, 896, 32768), (8192, 896, 151936), (16384, 2048, 151936), (32768, 4096, 151936)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    w_logp, w_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return hidden, weight, targets.to(device), w_logp.to(device), w_ent.to(device)


def _method(name: str):
    from unipost.kernels.logprobs import token_logprobs
    from unipost.kernels.reference import token_logprobs_reference

    if name == "naive":
        return token_logprobs_reference
    return lambda *a, **kw: token_logprobs(*a, backend=name, **kw)


def _step(fn, hidden, weight, targets, w_logp, w_ent):
    """One fwd+bwd; returns (logp, grad_hidden, grad_weight)."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    logp, ent = fn(h, w, targets, return_entropy=True)
    ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
    return logp.detach(), h.grad, w.grad


def _time(fn, args, device: str, repeats: int) -> float:
    """Seconds of one fwd+bwd: median of CUDA-event timings on GPU; best wall clock on a shared CPU."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, *args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            _step(fn, *args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) if device == "cuda" else min(times)


def run(shapes, dtype_name: str, device: str, repeats: int, methods) -> list[dict]:
    """All methods on every shape; each shape's rows carry the machine's state over that shape."""
    rows = []
    for n, h, v in shapes:
        with QuietMonitor() as quiet:
            shape_rows = _run_shape((n, h, v), dtype_name, device, repeats, methods)
        quiet.warn_if_busy(f"shape N={n} H={h} V={v}")
        for r in shape_rows:
            r.update(quiet.record())
        rows += shape_rows
    return rows


def _run_shape(shape, dtype_name: str, device: str, repeats: int, methods) -> list[dict]:
    n, h, v = shape
    mode = "cuda" if device == "cuda" else "interpreter"
    args = _inputs(n, h, v, DTYPES[dtype_name], device)
    rows: list[dict] = []
    baseline = None
    for name in methods:
        fn = _method(name)
        row = {"mode": mode, "method": name, "dtype": dtype_name, "N": n, "H": h, "V": v}
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base_mem = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            out = _step(fn, *args)  # warm-up (compiles the Triton kernels on CUDA)
            if device == "cuda":
                torch.cuda.synchronize()
                row["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**20, 1)
            row["seconds"] = _time(fn, args, device, repeats)
        except torch.OutOfMemoryError:
            row["seconds"] = float("nan")
            row["note"] = "out of memory"
            rows.append(row)
            continue
        if baseline is None:
            baseline = out
        else:
            row["max_dlogp"] = (out[0].float() - baseline[0].float()).abs().max().item()
            pairs = zip(out[1:], baseline[1:], strict=True)
            grad_err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
            scale = max(b.float().abs().max().item() for b in baseline[1:])
            row["max_dgrad_rel"] = grad_err / max(scale, 1e-30)
        del out
        rows.append(row)
        print(_fmt_row(row), flush=True)
    for r in rows:
        r[f"x_vs_{methods[0]}"] = round(r["seconds"] / rows[0]["seconds"], 2)
    return rows


COLUMNS = [
    "mode",
    "method",
    "dtype",
    "N",
    "H",
    "V",
    "seconds",
    "peak_extra_MiB",
    "max_dlogp",
    "max_dgrad_rel",
]


def _one_per_shape(rows: list[dict]) -> list[dict]:
    return list({(r["N"], r["H"], r["V"]): r for r in rows}.values())


def _fmt_row(row: dict) -> str:
    return "  ".join(
        f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}" for k in row
    )


HYGIENE_KEYS = ("load1_before", "load1_after", "others_cores", "threads", "busy")


def write(rows: list[dict], name: str, header: str, state_at_start: dict) -> None:
    """CSV with every key; markdown with the hygiene columns rendered as in every benchmark's table."""
    RESULTS.mkdir(exist_ok=True)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS) - set(HYGIENE_KEYS))
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra + list(HYGIENE_KEYS))
        writer.writeheader()
        writer.writerows(rows)
    cols = COLUMNS + extra
    headers = cols + list(HYGIENE_HEADERS)
    lines = [
        header,
        "",
        f"At the start: {header_line(state_at_start)}. Each shape's rows share one measured block.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells + hygiene_cells(r)) + " |")
    lines += ["", hygiene_note(_one_per_shape(rows), state_at_start, what="shapes")]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA"
    )
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 on CPU, 20 on CUDA")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", default=None, help="results file stem (default triton_<mode>)")
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and "triton" in args.methods:
        print("CPU: re-running under TRITON_INTERPRET=1 (Triton's interpreter)", flush=True)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    repeats = args.repeats or (20 if device == "cuda" else 3)
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    # One thread on CPU: the interpreter is single-threaded anyway, and on a shared 2-core machine a second
    # intra-op thread made the small torch timings swing 100x (a descheduled worker stalls every op).
    torch.set_num_threads(1)
    state_at_start = machine_state()
    rows = run(shapes, dtype, device, repeats, args.methods)
    mode = "cuda" if device == "cuda" else "interpreter"
    if mode == "cuda":
        gpu = torch.cuda.get_device_name()
        header = f"# Triton vs torch token_logprobs on {gpu} (fwd+bwd, median of {repeats})"
    else:
        header = (
            "# Triton vs torch token_logprobs on CPU: **interpreter timings, NOT performance** "
            f"(TRITON_INTERPRET=1, fwd+bwd, best of {repeats}; the interpreter runs each program in numpy)"
        )
    write(rows, args.out or f"triton_{mode}{'-quick' if args.quick else ''}", header, state_at_start)


if __name__ == "__main__":
    main()
