"""Peak memory and time of fused ``token_logprobs`` (+ backward) against the naive log-softmax path.

    python benchmarks/bench_logprobs.py            # full sweep N x V, bf16, H = 896
    python benchmarks/bench_logprobs.py --quick    # tiny sweep, a few seconds

Methods, run side by side on identical inputs (fwd + bwd of ``sum_t w_t * logp_t`` with random w_t):

* ``naive``  : ``unipost.kernels.reference.token_logprobs_reference`` (linear -> fp32 log_softmax -> gather);
* ``fused``  : ``unipost.kernels.token_logprobs`` (tiled, never builds [N, V]);
* ``liger``  : liger-kernel's ``chunked_loss`` log-prob function (plain torch, seq x vocab chunks; the
  private ``_ChunkedSelectiveLogProbFunction`` that its fused PPO/GRPO losses call), when installed;
* ``cce``    : cut-cross-entropy ``linear_cross_entropy(..., reduction="none", impl="torch_compile")``
  returning ``-logp`` (the only CCE mode that runs on CPU; it materialises logits), when installed.

How memory is measured (honestly, and the same way for every method): each (method, N, V) runs in its own
fresh Python process. The process builds the inputs, runs a small warm-up, frees everything but the
inputs, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), then runs the measured
forward + backward passes and reads ``VmHWM``. "peak MiB" = VmHWM - RSS just before the measured run:
the physical memory the computation needed on top of its inputs, including the gradients it returns
(``grad MiB`` column, unavoidable for any method), the allocator's slack and library scratch buffers.
Time is the best of ``--repeats`` runs (wall clock, ``torch.set_num_threads`` = all cores).

Cases whose naive [N, V] tensors would not fit (estimated from the bytes per logit element measured on
small cases) are skipped for the methods that materialise logits, and marked "skipped (memory)".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("naive", "fused", "liger", "cce")
MATERIALISES_LOGITS = {"naive", "cce"}
# Bytes per [N, V] element the naive bf16 path peaks at in fwd+bwd (bf16 logits, fp32 copy, saved
# log-softmax, its gradient and the gradient of the logits); measured ~12 on this machine, 14 for margin.
NAIVE_BYTES_PER_LOGIT = {"bf16": 14, "fp32": 16}


# ----------------------------------------------------------------------------- worker (one process per case)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _method(name: str):
    """Return ``fn(hidden, weight, targets) -> logp [N]`` for one method (imports happen here)."""
    if name == "naive":
        from unipost.kernels.reference import token_logprobs_reference

        return token_logprobs_reference
    if name == "fused":
        from unipost.kernels.logprobs import token_logprobs

        return token_logprobs
    if name == "liger":
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction as fn

        return lambda h, w, t: fn.apply(h, w, t, None, 1.0, 4096)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl="torch_compile")
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def available_methods() -> list[str]:
    import importlib.util

    found = ["naive", "fused"]
    if importlib.util.find_spec("liger_kernel") is not None:
        found.append("liger")
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        found.append("cce")
    return found


def _inputs(n: int, v: int, h: int, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.02).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    w_N = torch.randn(n, generator=g)
    return hidden, weight, targets, w_N


def _step(fn, hidden, weight, targets, w_N) -> tuple[float, float]:
    """One forward + backward; returns (forward seconds, backward seconds)."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    t0 = time.perf_counter()
    logp = fn(h, w, targets)
    t1 = time.perf_counter()
    (logp.float() * w_N).sum().backward()
    t2 = time.perf_counter()
    del logp, h, w  # frees the gradients too
    return t1 - t0, t2 - t1


def worker(method: str, n: int, v: int, h: int, dtype_name: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    fn = _method(method)
    # Warm-up on two small shapes (lazy init, oneDNN kernel creation; for torch.compile the second
    # distinct shape makes the graph dynamic, so the measured shape does not recompile).
    for wn, wv in ((64, 256), (96, 384)):
        _step(fn, *_inputs(wn, wv, h, dtype, seed=1))
    hidden, weight, targets, w_N = _inputs(n, v, h, dtype)
    base_kib = _rss_kib("VmRSS")
    _reset_peak_rss()
    times = [_step(fn, hidden, weight, targets, w_N) for _ in range(repeats)]
    peak_kib = _rss_kib("VmHWM") - base_kib
    fwd, bwd = min(times, key=lambda fb: fb[0] + fb[1])
    grad_bytes = (n * h + v * h) * hidden.element_size()
    return {
        "method": method,
        "N": n,
        "V": v,
        "H": h,
        "dtype": dtype_name,
        "fwd_s": round(fwd, 3),
        "bwd_s": round(bwd, 3),
        "total_s": round(fwd + bwd, 3),
        "peak_mib": round(peak_kib / 1024, 1),
        "grad_mib": round(grad_bytes / 2**20, 1),
        "repeats": repeats,
    }


# ----------------------------------------------------------------------------- driver


def correctness_check(methods: list[str]) -> list[str]:
    """Every method on one small shape vs the fp64 reference: the numbers below compare like with like."""
    import torch

    from unipost.kernels.reference import token_logprobs_reference

    hidden, weight, targets, w_N = _inputs(256, 1000, 64, torch.bfloat16)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (token_logprobs_reference(h64, w64, targets) * w_N.double()).sum().backward()
    lines = []
    for m in methods:
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp = _method(m)(h, w, targets)
        (logp.float() * w_N).sum().backward()
        err = (logp.double() - token_logprobs_reference(h64, w64, targets).detach()).abs().max().item()
        gerr = (h.grad.double() - h64.grad).abs().max().item() / h64.grad.abs().max().item()
        werr = (w.grad.double() - w64.grad).abs().max().item() / w64.grad.abs().max().item()
        lines.append(f"{m:6s} max|dlogp| {err:.1e}, grad_hidden rel {gerr:.1e}, grad_weight rel {werr:.1e}")
    return lines


def _run_case(method, n, v, h, dtype, repeats, timeout) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(v), str(h), dtype, str(repeats)]
    base = {"method": method, "N": n, "V": v, "H": h, "dtype": dtype}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": f"timeout > {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"rc {proc.returncode}"]
        return {**base, "status": f"failed: {tail[0][:120]}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}


def _ratios(rows: list[dict]) -> None:
    naive = {(r["N"], r["V"]): r for r in rows if r["method"] == "naive" and r["status"] == "ok"}
    for r in naive.values():
        r["extra_mib"] = round(float(r["peak_mib"]) - float(r["grad_mib"]), 1)
    for r in rows:
        ref = naive.get((r["N"], r["V"]))
        ok = r["status"] == "ok" and ref is not None
        if r["status"] == "ok":
            # Memory beyond inputs AND the returned gradients (which every method must produce).
            r["extra_mib"] = round(float(r["peak_mib"]) - float(r["grad_mib"]), 1)
        r["mem_ratio"] = round(float(r["peak_mib"]) / float(ref["peak_mib"]), 3) if ok else None
        r["extra_ratio"] = round(r["extra_mib"] / ref["extra_mib"], 3) if ok else None
        r["time_ratio"] = round(float(r["total_s"]) / float(ref["total_s"]), 2) if ok else None


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def write_outputs(rows: list[dict], header: str, stem: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    cols = ["method", "N", "V", "H", "dtype", "status", "fwd_s", "bwd_s", "total_s", "peak_mib", "grad_mib"]
    cols += ["extra_mib", "mem_ratio", "extra_ratio", "time_ratio", "repeats"]
    csv_path, md_path = RESULTS / f"{stem}.csv", RESULTS / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        header,
        "",
        "| N | V | method | fwd+bwd s | peak MiB | grads MiB | extra MiB | peak / naive | extra / naive "
        "| time / naive |",
    ]
    lines.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['N']} | {r['V']} | {r['method']} | {r['status']} | | | | | | |")
            continue
        lines.append(
            f"| {r['N']} | {r['V']} | {r['method']} | {float(r['total_s']):.2f} | "
            f"{float(r['peak_mib']):.0f} | "
            f"{float(r['grad_mib']):.0f} | {r['extra_mib']:.0f} | {_fmt(r['mem_ratio'], '.3f')} | "
            f"{_fmt(r['extra_ratio'], '.3f')} | {_fmt(r['time_ratio'], '.2f')} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("N", "V", "method", "fwd s", "bwd s", "peak MiB", "grads MiB", "mem/naive", "time/naive"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        if r["status"] != "ok":
            table.add_row(str(r["N"]), str(r["V"]), r["method"], r["status"], *[""] * 5)
            continue
        table.add_row(
            str(r["N"]), str(r["V"]), r["method"], f"{r['fwd_s']:.2f}", f"{r['bwd_s']:.2f}",
            f"{r['peak_mib']:.0f}", f"{r['grad_mib']:.0f}",
            _fmt(r["mem_ratio"], ".3f"), _fmt(r["time_ratio"], ".2f"),
        )  # fmt: skip
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sweep (seconds), for CI and smoke tests")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--hidden", type=int, default=896, help="H (896 = Qwen2.5-0.5B)")
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--v", type=int, nargs="+", default=[32768, 49152, 151936])
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS}")
    parser.add_argument("--mem-limit-gib", type=float, default=14.0, help="skip naive/CCE above this")
    parser.add_argument("--peer-max-nv", type=float, default=1.3e9, help="skip liger above this N*V (time)")
    parser.add_argument("--cce-max-nv", type=float, default=3.2e8, help="skip cce above this N*V (compiles)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 for small cases, 1 for large")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per (method, case) process")
    parser.add_argument("--out", default="logprobs", help="results/<out>.csv and .md")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.v, args.hidden = [256, 1024], [4096, 8192], 128
        args.out = args.out if args.out != "logprobs" else "logprobs_quick"

    default = [m for m in available_methods() if not (args.quick and m == "cce")]  # cce: compile minutes
    methods = [m for m in (args.methods or default) if m in available_methods()]
    print("correctness on (N=256, V=1000, H=64) bf16 vs the fp64 reference:")
    for line in correctness_check(methods):
        print("  " + line)

    load_before = os.getloadavg()
    rows, started = [], time.time()
    for n in args.n:
        for v in args.v:
            est_gib = n * v * NAIVE_BYTES_PER_LOGIT[args.dtype] / 2**30
            repeats = args.repeats or (3 if n * v <= 64 * 2**20 else 1)
            for m in methods:  # interleaved per case, so background load hits all methods alike
                skip = None
                if m in MATERIALISES_LOGITS and est_gib > args.mem_limit_gib:
                    skip = f"skipped (memory: ~{est_gib:.0f} GiB est.)"
                elif m in ("liger", "cce") and n * v > (args.cce_max_nv if m == "cce" else args.peer_max_nv):
                    skip = "skipped (sweep time)"
                if skip:
                    rows.append({"method": m, "N": n, "V": v, "H": args.hidden, "dtype": args.dtype})
                    rows[-1]["status"] = skip
                    print(f"  N={n} V={v} {m}: {skip}")
                    continue
                row = _run_case(m, n, v, args.hidden, args.dtype, repeats, args.timeout)
                rows.append(row)
                print(f"  N={n} V={v} {m}: {row.get('total_s', row['status'])} s, {row.get('peak_mib')} MiB")
    _ratios(rows)
    load_after = os.getloadavg()
    header = (
        f"token_logprobs benchmark: dtype={args.dtype}, H={args.hidden}, {os.cpu_count()} CPU threads, "
        f"torch {__import__('torch').__version__}; load average before/after "
        f"{load_before[0]:.1f}/{load_after[0]:.1f}; sweep took {time.time() - started:.0f} s.\n"
        "peak MiB = VmHWM - RSS before the measured fwd+bwd, per fresh process (includes the returned "
        "gradients, listed separately). Time = best of repeats."
    )
    print_table(rows, f"token_logprobs fwd+bwd, {args.dtype}, H={args.hidden}")
    csv_path, md_path = write_outputs(rows, header, args.out)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, method, n, v, h, dtype, repeats = sys.argv
        print(json.dumps(worker(method, int(n), int(v), int(h), dtype, int(repeats))))
    else:
        main()
