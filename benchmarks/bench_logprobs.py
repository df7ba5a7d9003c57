"""Token log-probs from an LM head, fwd + bwd, side by side: naive vs unipost vs cut-cross-entropy vs Liger.

    python benchmarks/bench_logprobs.py --dtype fp32 --n 4096 --v 32768           # one CPU case
    python benchmarks/bench_logprobs.py --dry-run --out /tmp/x                     # tiny, seconds (tests)
    python benchmarks/bench_logprobs.py --device cuda --dtype bf16 --n 16384 --hidden 4096 --v 152064 \\
        --impls naive,ours-triton,liger,cce --out DIR                              # the GPU check

What is timed: forward + backward of ``sum_t w_t * logp_t`` with random per-token weights ``w_t`` (the
upstream gradient every unipost objective gives the head), no bias, no ignored rows, temperature 1.

Implementations (``--impls``), each case in its OWN fresh Python process, one after the other:

* ``naive``       : ``unipost.kernels.reference.token_logprobs_reference`` (linear -> fp32 log_softmax ->
  gather; materialises [N, V] logits, its log-softmax and their gradients);
* ``ours``        : ``unipost.kernels.token_logprobs(..., backend="torch")`` as a user gets it (on CPU its
  tile bodies are compiled once per shape class above 16M logits);
* ``ours-eager``  : the same with ``compile=False`` (what the torch kernel did before compiled tiles);
* ``ours-3gemm``  : ``unipost.kernels.fused_loss.fused_weighted_nll`` with weights ``-w_t`` (the same
  ``sum_t w_t logp_t``): the fused loss that forms the gradients inside the forward sweep, three tile
  GEMMs, holding one row chunk's logits (``N / 24`` rows x V) between its log-sum-exp and its gradient;
* ``ours-3gemm-eager`` : the same with ``compile=False`` (eager ATen passes over each cache-resident tile);
* ``ours-triton`` : ``backend="triton"`` (CUDA; on CPU only under Triton's interpreter, tiny shapes);
* ``cce``         : cut-cross-entropy ``linear_cross_entropy(..., reduction="none")`` returning ``-logp``,
  ``impl="torch_compile"`` on CPU (its only CPU mode; it materialises the logits), its default ``"cce"``
  Triton kernels on CUDA;
* ``gemm3``       : the three full-size GEMMs alone (logits ``h W^T`` kept for the backward, then
  ``G W`` and ``G^T h`` with the kept logits standing in for their gradient ``G``), no softmax: the floor
  of any method that stores the logits (naive, CCE's torch_compile);
* ``gemm4``       : the four tile GEMMs alone, on ``ours``' tile plan (forward logits; backward recompute,
  ``G W``, ``G^T h``), no softmax: the floor of any exact method that never stores [N, V] and takes
  arbitrary upstream gradients. ``gemm3`` / ``gemm4`` produce no log-probs (their ``err`` is ``-``);
* ``gemm3-tiles`` : the three tile GEMMs alone on ``ours-3gemm``'s plan (chunk logits stored in its
  buffer, then ``G W`` and ``G^T h`` per tile, the stored logits standing in for ``G``): its floor;
* ``liger``       : liger-kernel; on CPU its plain-torch chunked log-prob function
  (``chunked_loss.fused_linear_ppo._ChunkedSelectiveLogProbFunction``, what its GRPO/PPO losses call), on
  CUDA its fused linear cross-entropy (``liger_fused_linear_cross_entropy(..., reduction="none")``).

Every process: builds the inputs; checks its numbers on a small problem against the fp64 reference
(``err_logp``, ``err_grad`` columns); runs two warm-up calls at the measured N (or ``--warm-n``; the first
has any compilation: ``first_s - second_s`` is reported as ``compile_s``, apart from the timed figures);
then ``--repeats`` timed fwd+bwd calls at the measured shape (median reported). Compiled graphs are
counted before and after the timed calls: equal counts mean no recompilation for the new N (one compile
per shape class). Memory on CPU: the kernel's peak-RSS counter is reset before the timed calls
(``/proc/self/clear_refs``) and ``peak MiB = VmHWM - RSS before``: what the computation needed on top of
its inputs, including the returned gradients (``grads MiB``, the same for every method); ``extra MiB =
peak - grads``. On CUDA: ``torch.cuda.max_memory_allocated`` beyond what was allocated before.

Every row records the 1-minute load average before/after, the CPU time other processes used meanwhile
(``others_cores``), torch's thread count and a ``busy`` flag (``unipost.machine.QuietMonitor``). Ratios
are only comparable within one quiet run. On these CPUs bf16 matrix products are slow: bf16 rows record
memory; their time is a GPU target and is marked so.

Cases whose [N, V] tensors would not fit (``naive``, ``cce``; estimated from bytes per logit measured on
smaller cases) are skipped with the estimate as the reason, never attempted: an out-of-memory kill on a
shared machine takes other people's processes with it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMPLS = (
    "naive", "ours", "ours-eager", "ours-3gemm", "ours-3gemm-eager", "ours-triton", "cce", "liger",
    "gemm3", "gemm4", "gemm3-tiles",
)  # fmt: skip
# The matrix work alone, no softmax: what the fastest possible method of each kind would cost here.
FLOORS = ("gemm3", "gemm4", "gemm3-tiles")
# Peak bytes per [N, V] logit in fwd+bwd for the methods that materialise logits (measured here: naive
# ~12 in fp32 and bf16, CCE's torch_compile ~4 in fp32 and ~2.3 in bf16), with a margin.
BYTES_PER_LOGIT = {
    "naive": {"fp32": 14, "bf16": 14},
    "cce": {"fp32": 6, "bf16": 4},
    "gemm3": {"fp32": 6, "bf16": 4},
}
DRY = {"n": [96], "v": [512], "hidden": 32, "warm_n": 64, "repeats": 1, "check": (48, 256, 32)}


# ----------------------------------------------------------------------------- worker (one process per case)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _impl(name: str, device: str):
    """``(fn(hidden, weight, targets) -> logp [N], variant label)``; imports happen here, per process."""
    if name == "naive":
        from unipost.kernels.reference import token_logprobs_reference

        return token_logprobs_reference, "reference"
    if name in ("ours", "ours-eager"):
        from unipost.kernels.logprobs import token_logprobs

        compile_ = None if name == "ours" else False
        return (lambda h, w, t: token_logprobs(h, w, t, backend="torch", compile=compile_)), "torch"
    if name in ("ours-3gemm", "ours-3gemm-eager"):
        from unipost.kernels.fused_loss import fused_weighted_nll

        compile_3 = None if name == "ours-3gemm" else False

        # sum_t w_t logp_t = sum_t (-w_t) (-logp_t): the fused loss with weights -w, gradients in the forward
        def fused(h, w, t, w_N):
            return fused_weighted_nll(h, w, t, -w_N, compile=compile_3)

        fused.takes_weights = True
        return fused, "fused loss"
    if name == "ours-triton":
        from unipost.kernels.logprobs import token_logprobs

        return (lambda h, w, t: token_logprobs(h, w, t, backend="triton")), "triton"
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        mode = "torch_compile" if device == "cpu" else "cce"
        return (lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl=mode)), mode
    if name == "liger":
        if device == "cpu":
            from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction as f

            return (lambda h, w, t: f.apply(h, w, t, None, 1.0, 4096)), "chunked_logprob"
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return (lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")), "flce"
    if name in FLOORS:
        fn = _floor_functions()[FLOORS.index(name)]
        return (lambda h, w, t: fn.apply(h, w)), "matrix work only"
    raise ValueError(f"unknown impl {name!r}; choose from {IMPLS}")


@functools.cache
def _floor_functions():
    """The GEMM-floor autograd functions (defined lazily: torch is imported per worker process)."""
    import torch

    from unipost.kernels.logprobs import _plan_tiles, raw_logits

    class Gemm3(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            z = h @ w.T  # [N, V], kept as a materialising method keeps its logits
            ctx.save_for_backward(h, w, z)
            return z[:, 0].float()

        @staticmethod
        def backward(ctx, grad):
            h, w, z = ctx.saved_tensors
            return z @ w, z.T @ h  # the stored logits stand in for dL/dz: same shapes, same GEMMs

    class Gemm4(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            n, v = h.shape[0], w.shape[0]
            rows, cols = _plan_tiles(n, v, None, None)
            buf = h.new_empty(min(rows, n) * min(cols, v))  # as ours' reused tile buffer
            for r0 in range(0, n, rows):
                for v0 in range(0, v, cols):
                    raw_logits(h[r0 : r0 + rows], w[v0 : v0 + cols], None, buf)  # dropped: ours keeps lse
            ctx.save_for_backward(h, w)
            ctx.tiles = rows, cols
            return h.new_zeros(n, dtype=torch.float32)

        @staticmethod
        def backward(ctx, grad):
            h, w = ctx.saved_tensors
            (rows, cols), n, v = ctx.tiles, h.shape[0], w.shape[0]
            gh, gw = torch.zeros_like(h), torch.zeros_like(w)
            rows_outer = n >= v
            buf = h.new_empty(min(rows, n) * min(cols, v))
            outer = range(0, n, rows) if rows_outer else range(0, v, cols)
            inner = range(0, v, cols) if rows_outer else range(0, n, rows)
            for o0 in outer:
                for i0 in inner:
                    r0, v0 = (o0, i0) if rows_outer else (i0, o0)
                    h_c, w_t = h[r0 : r0 + rows], w[v0 : v0 + cols]
                    g = raw_logits(h_c, w_t, None, buf)  # the recompute; stands in for dL/dz
                    gh[r0 : r0 + rows].addmm_(g, w_t)
                    gw[v0 : v0 + cols].addmm_(g.T, h_c)
            return gh, gw

    class Gemm3Tiles(torch.autograd.Function):
        """The three tile GEMMs of ``ours-3gemm`` on its plan (row chunk x vocabulary tile), no softmax."""

        @staticmethod
        def forward(ctx, h, w):
            from unipost.kernels.fused_loss import plan_fused_tiles

            n, v = h.shape[0], w.shape[0]
            rows, cols = plan_fused_tiles(n, v)
            buf = h.new_empty(rows * v)
            gh, gw = torch.zeros_like(h), torch.zeros_like(w)
            for r0 in range(0, n, rows):
                h_c, m = h[r0 : r0 + rows], min(rows, n - r0)
                tiles = []
                for v0 in range(0, v, cols):
                    v1 = min(v, v0 + cols)
                    z = buf[rows * v0 : rows * v0 + m * (v1 - v0)].view(m, v1 - v0)
                    torch.mm(h_c, w[v0:v1].T, out=z)  # stored, as ours-3gemm stores the chunk's logits
                    tiles.append((v0, v1, z))
                for v0, v1, z in tiles:  # the stored logits stand in for dL/dz
                    gh[r0 : r0 + m].addmm_(z, w[v0:v1])
                    gw[v0:v1].addmm_(z.T, h_c)
            ctx.grads = gh, gw
            return h.new_zeros(n, dtype=torch.float32)

        @staticmethod
        def backward(ctx, grad):
            return ctx.grads

    return Gemm3, Gemm4, Gemm3Tiles


def _inputs(n: int, v: int, h: int, dtype, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (1.0 / h**0.5)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    w_N = torch.randn(n, generator=g)
    return tuple(x.to(device) for x in (hidden, weight, targets, w_N))


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _loss(fn, h, w, targets, w_N):
    """``(sum_t w_t logp_t, logp)``: through the log-probs, or the fused loss for ``ours-3gemm``."""
    if getattr(fn, "takes_weights", False):
        return fn(h, w, targets, w_N)
    logp = fn(h, w, targets)
    return (logp.float() * w_N.to(logp.device)).sum(), logp


def _step(fn, hidden, weight, targets, w_N, device: str) -> tuple[float, float]:
    """One forward + backward of sum_t w_t logp_t; returns (forward s, backward s)."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    _sync(device)
    t0 = time.perf_counter()
    if getattr(fn, "takes_weights", False):
        loss, logp = fn(h, w, targets, w_N)
        _sync(device)
        t1 = time.perf_counter()
    else:
        logp = fn(h, w, targets)
        _sync(device)
        t1 = time.perf_counter()
        loss = (logp.float() * w_N).sum()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    del logp, loss, h, w  # frees the gradients too
    return t1 - t0, t2 - t1


def _check(fn, n: int, v: int, h: int, dtype, device: str) -> tuple[float, float]:
    """Max |logp - fp64 truth| and max relative gradient error on a small problem (same impl)."""
    import torch

    from unipost.kernels.reference import token_logprobs_reference

    hidden, weight, targets, w_N = _inputs(n, v, h, dtype, device, seed=2)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = token_logprobs_reference(h64, w64, targets)
    (ref * w_N.double()).sum().backward()
    hh, ww = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss, logp = _loss(fn, hh, ww, targets, w_N)
    loss.backward()
    err = (logp.double() - ref.detach()).abs().max().item()
    gerr = max(
        ((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item()
        for a, b in ((hh, h64), (ww, w64))
    )
    del torch
    return err, gerr


def _graphs() -> dict:
    """Compiled graphs so far in this process (dynamo's count; unipost's own tile stats when loaded)."""
    out = {}
    try:
        from torch._dynamo.utils import counters

        out["dynamo_graphs"] = int(counters["stats"]["unique_graphs"])
        out["fxgraph_cache_hit"] = int(counters["inductor"]["fxgraph_cache_hit"])
        out["fxgraph_cache_miss"] = int(counters["inductor"]["fxgraph_cache_miss"])
    except Exception:
        pass
    if "unipost.kernels.logprob_tiles" in sys.modules:
        from unipost.kernels.logprob_tiles import compile_stats

        out["tile_graphs"] = compile_stats()["graphs"]
    return out


def worker(spec: dict) -> dict:
    import torch

    from unipost.machine import QuietMonitor

    torch.set_num_threads(spec["threads"] or os.cpu_count() or 1)
    device, n, v, h = spec["device"], spec["n"], spec["v"], spec["hidden"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    fn, variant = _impl(spec["impl"], device)
    row: dict = {"variant": variant}
    if spec["impl"] not in FLOORS:  # the floors compute no log-probs: nothing to check
        row["err_logp"], row["err_grad"] = _check(fn, *spec["check"], dtype, device)

    # Warm up at the measured N by default: the tile plan (so the compiled graphs' specialisations) follows
    # N x V, and a smaller warm-up N let one tile graph recompile inside the timed calls.
    warm = _inputs(spec["warm_n"] or n, v, h, dtype, device, seed=1)
    first, second = (sum(_step(fn, *warm, device)) for _ in range(2))
    row.update(first_s=round(first, 3), compile_s=round(max(0.0, first - second), 2))
    del warm
    graphs_before = _graphs()

    hidden, weight, targets, w_N = _inputs(n, v, h, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
    with QuietMonitor() as quiet:
        times = [_step(fn, hidden, weight, targets, w_N, device) for _ in range(spec["repeats"])]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    graphs_after = _graphs()
    grad_bytes = (n * h + v * h) * hidden.element_size()
    row.update(
        fwd_s=round(statistics.median(t[0] for t in times), 3),
        bwd_s=round(statistics.median(t[1] for t in times), 3),
        total_s=round(statistics.median(t[0] + t[1] for t in times), 3),
        min_total_s=round(min(t[0] + t[1] for t in times), 3),
        peak_mib=round((peak - base) / 2**20, 1),
        grad_mib=round(grad_bytes / 2**20, 1),
        repeats=len(times),
        recompiled=graphs_after.get("dynamo_graphs") != graphs_before.get("dynamo_graphs"),
        graphs=graphs_after.get("dynamo_graphs"),
        fxgraph_cache=f"{graphs_after.get('fxgraph_cache_hit', 0)} hit / "
        f"{graphs_after.get('fxgraph_cache_miss', 0)} miss",
    )
    row["extra_mib"] = round(row["peak_mib"] - row["grad_mib"], 1)
    row.update(quiet.record())
    quiet.warn_if_busy(f"{spec['impl']} N={n} V={v}")
    return row


# ----------------------------------------------------------------------------- driver


def _mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def run_case(spec: dict, timeout: int, script: str | Path | None = None) -> dict:
    """``script --worker SPEC`` (this file by default) in a fresh process: its last JSON line, or why not."""
    env = dict(os.environ)
    if "ours-triton" in spec.get("impls", [spec.get("impl")]) and spec["device"] == "cpu":
        env["TRITON_INTERPRET"] = "1"  # must be set before triton is imported: a fresh process
    cmd = [sys.executable, str(Path(script or __file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout}s"}
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = next((ln for ln in reversed(lines) if ln.strip() and not ln.startswith(" ")), "")
        killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
        return {"status": f"failed rc={proc.returncode}{killed}: {tail[:160]}"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "status": "ok"}
    return {"status": "failed: no result line"}


def _skip_reason(impl: str, n: int, v: int, dtype: str, device: str, args) -> str | None:
    if impl == "liger" or impl == "cce":
        mod = "liger_kernel" if impl == "liger" else "cut_cross_entropy"
        import importlib.util

        if importlib.util.find_spec(mod) is None:
            return f"unavailable: {mod} not installed (pip install -e '.[bench]')"
    if impl == "ours-triton":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "unavailable: triton not installed"
        if device == "cpu" and n * v > 1 << 20:
            return "skipped: Triton on CPU is its interpreter (tiny shapes only)"
    per = BYTES_PER_LOGIT.get(impl, {}).get(dtype)
    if per and device == "cpu":
        est = n * v * per / 2**30
        if est > args.mem_limit_gib:
            return f"skipped (memory: ~{est:.0f} GiB est. > {args.mem_limit_gib:.0f} GiB limit)"
    if args.max_logits.get(impl) and n * v > args.max_logits[impl]:
        return f"skipped (sweep time: N*V > {args.max_logits[impl]:.2g})"
    return None


def _ratios(rows: list[dict]) -> None:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["dtype"], r["N"], r["V"]), {})[r["impl"]] = r
    for r in rows:
        g = groups.get((r["dtype"], r["N"], r["V"]), {})
        for ref_name, col in (("naive", "naive"), ("cce", "cce"), ("gemm4", "gemm4")):
            ref = g.get(ref_name)
            ok = r["status"] == "ok" and ref is not None
            r[f"time_vs_{col}"] = round(r["total_s"] / ref["total_s"], 3) if ok else None
        ref = g.get("naive")
        ok = r["status"] == "ok" and ref is not None and ref["extra_mib"] > 0
        r["extra_vs_naive"] = round(r["extra_mib"] / ref["extra_mib"], 4) if ok else None


COLS = [
    "impl", "variant", "device", "dtype", "N", "V", "H", "status", "fwd_s", "bwd_s", "total_s", "min_total_s",
    "repeats", "time_vs_naive", "time_vs_cce", "time_vs_gemm4", "peak_mib", "grad_mib", "extra_mib",
    "extra_vs_naive",
    "first_s", "compile_s", "recompiled", "graphs", "fxgraph_cache", "err_logp", "err_grad",
    "load1_before", "load1_after", "others_cores", "threads", "busy", "time_note",
]  # fmt: skip


def _f(x, spec: str) -> str:
    return "-" if x is None or x == "" else format(x, spec)


def write_outputs(rows: list[dict], header: list[str], out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, json_path = (out_dir / f"{name}.{ext}" for ext in ("csv", "md", "json"))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    lines = [*header, ""]
    lines.append(
        "| dtype | N | V | impl | fwd+bwd s (median) | min s | vs naive | vs CCE | vs gemm4 | extra MiB "
        "| extra / naive | compile s | err logp | load before/after | others cores | threads | busy |"
    )
    lines.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        head = f"| {r['dtype']} | {r['N']} | {r['V']} | {r['impl']}"
        if r["status"] != "ok":
            lines.append(f"{head} | {r['status']} | | | | | | | | | | | | |")
            continue
        t = f"{r['total_s']:.2f}" + (" (GPU target)" if r.get("time_note") else "")
        lines.append(
            f"{head} | {t} | {r['min_total_s']:.2f} | {_f(r['time_vs_naive'], '.2f')} | "
            f"{_f(r['time_vs_cce'], '.2f')} | {_f(r['time_vs_gemm4'], '.2f')} | "
            f"{r['extra_mib']:.0f} | {_f(r['extra_vs_naive'], '.2%')} | {_f(r.get('compile_s'), '.1f')} | "
            f"{_f(r.get('err_logp'), '.1e')} | {r['load1_before']}/{r['load1_after']} | "
            f"{r['others_cores']} | {r['threads']} | {'BUSY' if r['busy'] else 'no'} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path, json_path]


def _csv_list(text: str, cast=str) -> list:
    return [cast(x) for x in str(text).replace(" ", ",").split(",") if x]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", default="naive,ours,cce,liger", help=f"comma list from {IMPLS}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or both (comma list)")
    p.add_argument("--n", default="4096", help="token rows, comma list (e.g. 4096,16384)")
    p.add_argument("--v", default="32768", help="vocabulary sizes, comma list (e.g. 32768,152064)")
    p.add_argument("--hidden", type=int, default=256, help="H (default 256: CPU-sized; 4096 on the GPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd calls per case (median)")
    p.add_argument("--warm-n", type=int, default=0, help="rows of the 2 warm-up calls (0 = the measured N)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all CPUs)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per (impl, case) process")
    p.add_argument(
        "--mem-limit-gib", type=float, default=None, help="skip naive/CCE above (default 85%% free)"
    )
    p.add_argument(
        "--max-logits", action="append", default=[], metavar="IMPL=N",
        help="skip IMPL above N*V logits (sweep time), e.g. liger=2e8; repeatable",
    )  # fmt: skip
    p.add_argument("--out", default=str(RESULTS), help="output directory")
    p.add_argument("--name", default="logprobs", help="output stem: <out>/<name>.{csv,md,json}")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 repeat: seconds (tests, CI)")
    args = p.parse_args(argv)
    args.impls = _csv_list(args.impls)
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        p.error(f"unknown impls {bad}; choose from {IMPLS}")
    args.dtype, args.n, args.v = _csv_list(args.dtype), _csv_list(args.n, int), _csv_list(args.v, int)
    if any(d not in ("fp32", "bf16") for d in args.dtype):
        p.error("--dtype takes fp32, bf16")
    args.max_logits = {k: float(x) for k, x in (s.split("=", 1) for s in args.max_logits)}
    args.check = (256, 2048, 64)
    if args.dry_run:
        args.n, args.v, args.hidden = DRY["n"], DRY["v"], DRY["hidden"]
        args.warm_n, args.repeats, args.check = DRY["warm_n"], DRY["repeats"], DRY["check"]
        if args.name == "logprobs":
            args.name = "logprobs-dry-run"
    if args.mem_limit_gib is None:
        args.mem_limit_gib = 0.85 * _mem_available_gib()
    return args


def main(argv: list[str] | None = None) -> int:
    from unipost.machine import header_line, machine_state

    args = parse_args(argv)
    threads = args.threads or os.cpu_count()
    state = machine_state()
    state["threads"] = threads
    started = time.time()
    torch_version = __import__("torch").__version__
    header = [
        f"token_logprobs fwd+bwd side by side, each (impl, case) in a fresh process; device={args.device}, "
        f"H={args.hidden}, torch {torch_version}, {args.repeats} timed repeats (median), warm-up at "
        f"N={args.warm_n or 'measured N'}; started "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"machine at start: {header_line(state)}",
    ]
    print(header[0] + "\n" + header[1], flush=True)
    rows = []
    for dtype in args.dtype:
        for n in args.n:
            for v in args.v:
                for impl in args.impls:  # interleaved per case, so drifting load hits all impls alike
                    base = {"impl": impl, "device": args.device, "dtype": dtype, "N": n, "V": v}
                    base["H"] = args.hidden
                    reason = _skip_reason(impl, n, v, dtype, args.device, args)
                    if reason:
                        row = {**base, "status": reason}
                    else:
                        spec = {**base, "n": n, "v": v, "hidden": args.hidden, "repeats": args.repeats}
                        spec.update(warm_n=args.warm_n, threads=threads, check=list(args.check))
                        row = {**base, **run_case(spec, args.timeout)}
                    if dtype == "bf16" and args.device == "cpu":
                        row["time_note"] = "bf16 time is a GPU target, not a CPU one (slow bf16 GEMMs here)"
                    rows.append(row)
                    shown = (
                        f"{row['total_s']:.2f} s, extra {row['extra_mib']:.0f} MiB"
                        if "total_s" in row
                        else ""
                    )
                    print(f"  {dtype} N={n} V={v} {impl}: {row['status']} {shown}", flush=True)
    _ratios(rows)
    end = machine_state()
    header.append(
        f"machine at end: load average {end['load1']}/{end['load5']}/{end['load15']}; sweep took "
        f"{time.time() - started:.0f} s. peak = VmHWM - RSS before the timed calls (CPU) or "
        "max_memory_allocated beyond the inputs (CUDA); extra = peak - returned gradients."
    )
    paths = write_outputs(rows, header, Path(args.out), args.name)
    print(Path(paths[1]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
