"""The per-tile bodies of the torch ``token_logprobs`` kernel, eager or compiled once per shape class.

Why a separate module: the tile loops in :mod:`unipost.kernels.logprobs` spend their time in two kinds of
work per ``[C, Cv]`` tile of logits: the GEMMs (extern BLAS calls either way) and a handful of elementwise
passes around them (upcast, temperature, shift, exp, row sums; in the backward the softmax gradient and
the cast back to the GEMM dtype). Eager PyTorch runs each of those as its own pass over the tile, with a
temporary per pass; ``torch.compile`` (inductor's C++ backend on CPU) fuses them into one or two loops
that read the GEMM output once and write at most one tile. That is the whole difference between the
eager and compiled modes: the same functions, the same arithmetic, the same GEMMs.

Compilation is once per *shape class*, not per micro-batch: the tile functions are compiled with
``dynamic=True``, so the tile's row and column counts (which change with N and V, and at the edges) are
symbols, and the temperature is a 0-d tensor input rather than a constant. What still selects a separate
graph: the dtype (fp32 / bf16 / fp16), whether the entropy is wanted, whether a bias gradient is wanted,
and which body (the three-GEMM loss's ``fwd_exp`` / ``bwd_into`` are graphs of their own).
That is at most a handful of compiles per process, each cached on disk by inductor (a second process
with a warm cache loads them in seconds). :func:`compile_stats` counts them.

When compiled mode is unavailable (no C++ compiler, an unsupported platform, a compile error) the first
failure is reported once as a warning and the eager bodies are used from then on: compiled mode is a
speed-up, never a requirement.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TileOps", "compile_stats", "compiled_available", "fwd_tile_exp_shifted", "tile_ops"]

# Auto mode compiles only problems at least this large (N * V logits): below it a compile (seconds, or
# tens of seconds on a cold cache) costs more than it can save, and small shapes (tests, tiny models)
# keep the plain eager path. Override with UNIPOST_LOGPROBS_COMPILE=0 / 1.
AUTO_COMPILE_MIN_LOGITS = 1 << 24


# ----------------------------------------------------------------------------- tile bodies (plain torch)


def fwd_tile(raw: Tensor, inv_temp: Tensor | float, want_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """One tile's log-sum-exp (and entropy of its softmax) from the GEMM output ``raw`` [C, Cv].

    ``z = raw * inv_temp`` in the compute dtype; returns ``lse_t`` [C] and, if wanted, the entropy of
    ``softmax(z)`` restricted to this tile, ``log s - <e, z - m> / s`` with ``e = exp(z - m)``, centred on
    the tile max so it is well conditioned. The caller merges tiles online.
    """
    cdtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    z = raw.to(cdtype) * inv_temp
    m = z.amax(dim=1)
    y = z - m[:, None]
    e = torch.exp(y)
    s = e.sum(dim=1)
    log_s = torch.log(s)
    ent = log_s - (e * y).sum(dim=1) / s if want_entropy else None
    return m + log_s, ent


def bwd_tile(
    raw: Tensor,
    lse: Tensor,
    coef: Tensor,
    ge: Tensor | None,
    inv_temp: Tensor | float,
    want_colsum: bool,
) -> tuple[Tensor, Tensor | None]:
    """The softmax part of ``dL/dz`` for one tile, in the GEMM dtype, from the recomputed ``raw``.

    ``g = p * (coef - ge * log p)`` with ``log p = z - lse`` (``ge`` None: ``g = p * coef``); the caller
    adds the one-hot part ``gl`` at each row's target outside the tile. Returns ``g`` cast to
    ``raw.dtype`` (what the two gradient GEMMs consume) and, if wanted, its column sums in the compute
    dtype (the bias gradient), taken before that cast.
    """
    cdtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    logp = raw.to(cdtype) * inv_temp - lse[:, None]
    p = torch.exp(logp)
    g = p * (coef[:, None] - ge[:, None] * logp) if ge is not None else p * coef[:, None]
    colsum = g.sum(dim=0) if want_colsum else None
    return g.to(raw.dtype), colsum


def bwd_tile_into(raw, lse, coef, ge, inv_temp, want_colsum):
    """:func:`bwd_tile` written over ``raw`` (its own input): no tile-sized temporary; returns the colsum.

    For the three-GEMM loss, whose stored logits are dead once turned into their gradient. Compiled, the
    input mutation becomes the kernel's store into ``raw``'s own memory.
    """
    g, colsum = bwd_tile(raw, lse, coef, ge, inv_temp, want_colsum)
    raw.copy_(g)
    return colsum


def fwd_tile_exp(raw: Tensor, inv_temp: Tensor | float) -> tuple[Tensor, Tensor]:
    """One tile's row max ``m`` and exponential sum ``s`` [C]; its exponentials written over ``raw``.

    For the three-GEMM loss when its gradient is a per-row multiple of the softmax (no entropy term):
    ``raw`` becomes ``exp(z - m)`` with ``z = raw * inv_temp`` and ``m`` the tile's row max, so that
    ``dL/dz = exp(z - lse) * coef = raw * (exp(m - lse) * coef)``: a per-row scale the caller folds
    into the gradient GEMMs' small operands instead of making a second pass over the tile. The caller
    reads the target logits before this call (they are gone after it). This is the body compiled mode
    compiles; its inputs are the tile and the temperature only, so dynamo guards on nothing else.
    """
    cdtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    z = raw.to(cdtype) * inv_temp
    m = z.amax(dim=1)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)  # a row of -inf logits: sum 0, not NaN
    e = torch.exp(z - m[:, None])
    raw.copy_(e)
    return m, e.sum(dim=1)


class _IntoTables:
    """``fwd_exp`` of compiled mode: the compiled :func:`fwd_tile_exp`, its ``m`` and ``s`` copied into
    ``max_out`` / ``sum_out`` [C] (rows of the caller's per-chunk tables, merged by one ``logsumexp``).

    The copies stay outside the graph: the tables' rows are views whose base sizes dynamo would otherwise
    guard on (measured: twice the graphs of a table-free signature, up to the recompile limit).
    """

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled

    def __call__(self, raw: Tensor, inv_temp: Tensor, max_out: Tensor, sum_out: Tensor) -> None:
        m, s = self.compiled(raw, inv_temp)
        max_out.copy_(m)
        sum_out.copy_(s)


def _fwd_tile_exp_into_eager(raw: Tensor, inv_temp: float, max_out: Tensor, sum_out: Tensor) -> None:
    """:func:`fwd_tile_exp` as four ATen passes over the (cache-resident) tile, no temporary.

    Auto mode runs this body even when the others are compiled (see :func:`_auto_from`): the
    three-GEMM loss's tiles are 2 MiB, so each pass runs from L2 and fusing them saves little, while
    ATen's ``exp`` is faster than inductor's. Each op costs ~10 us of dispatch per tile, so the
    target logits are not read here but by the caller, one gather per tile with targets in it.
    """
    torch.amax(raw, dim=1, out=max_out)  # T > 0 keeps the argmax: max(z) = max(raw) / T
    max_out.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=0.0)  # a row of -inf: exp 0, not NaN
    if inv_temp != 1.0:
        raw.mul_(inv_temp)
        max_out.mul_(inv_temp)
    torch.exp(raw.sub_(max_out[:, None]), out=raw)
    torch.sum(raw, dim=1, out=sum_out)


def fwd_tile_exp_shifted(raw: Tensor, inv_temp: float, neg_shift: Tensor, sum_out: Tensor) -> None:
    """``exp(z - shift)`` over ``raw`` and its row sums into ``sum_out``, for a shift the caller gives.

    :func:`fwd_tile_exp` less its max pass: the caller shifts every tile of a row chunk but its first by
    that first tile's row max (``logprobs.speculative_shift``) and redoes, with the tile's own max, any
    tile where a sum passed a limit (a logit ~60 above the first tile's max), so the values
    are those of :func:`fwd_tile_exp` up to rounding. Three ATen passes (temperature and shift in one),
    all modes: measured per 1M-element fp32 tile, the max pass was ~0.12 of the four-pass body's ~0.45 ms.
    """
    if inv_temp != 1.0:
        torch.add(neg_shift[:, None], raw, alpha=inv_temp, out=raw)
    else:
        raw.add_(neg_shift[:, None])
    torch.sum(raw.exp_(), dim=1, out=sum_out)


def _bwd_tile_into_eager(raw, lse, coef, ge, inv_temp, want_colsum):
    """:func:`bwd_tile_into` with the eager in-place passes (fp32 / fp64 never leave ``raw``)."""
    g, colsum = _bwd_tile_eager(raw, lse, coef, ge, inv_temp, want_colsum)
    if g.data_ptr() != raw.data_ptr():
        raw.copy_(g)
    return colsum


def _fwd_tile_eager(raw: Tensor, inv_temp: float, want_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`fwd_tile` with in-place passes (eager runs each op as a pass: fewer temporaries)."""
    cdtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    m = raw.amax(dim=1).to(cdtype) * inv_temp  # T > 0 keeps the argmax: max(z) = max(raw) / T
    if raw.dtype == cdtype:
        y = raw.mul_(inv_temp) if inv_temp != 1.0 else raw
        y = y.sub_(m[:, None])
    else:  # upcast, temperature and shift in one pass
        y = torch.add(-m[:, None], raw, alpha=inv_temp)
    if want_entropy:
        e = torch.exp(y)
        s = e.sum(dim=1)
        log_s = torch.log(s)
        return m + log_s, log_s - torch.linalg.vecdot(e, y, dim=1) / s
    s = y.exp_().sum(dim=1)
    return m + torch.log(s), None


def _bwd_tile_eager(raw, lse, coef, ge, inv_temp, want_colsum):
    """:func:`bwd_tile` with in-place passes."""
    cdtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    if raw.dtype == cdtype:
        g = raw.mul_(inv_temp) if inv_temp != 1.0 else raw
        g = g.sub_(lse[:, None])
    else:
        g = torch.add(-lse[:, None], raw, alpha=inv_temp)
    if ge is not None:
        p = torch.exp(g)
        g = p.mul_(g.mul_(-ge[:, None]).add_(coef[:, None]))
    else:
        g = g.exp_().mul_(coef[:, None])
    colsum = g.sum(dim=0) if want_colsum else None
    return (g if g.dtype == raw.dtype else g.to(raw.dtype)), colsum


# ----------------------------------------------------------------------------- modes


class TileOps:
    """The tile functions of one mode; ``inv_temp(x)`` makes the temperature argument they take.

    ``fwd`` may overwrite its input tile (the eager body does, to save temporaries: the four-GEMM kernel
    drops the tile anyway); the four-GEMM kernel uses it with an entropy or in bf16 / fp16. ``fwd_keep``
    never does, for the three-GEMM loss (:mod:`unipost.kernels.fused_loss`) with an entropy term, which
    keeps the tile for its gradient and then turns it into that gradient in place with ``bwd_into`` (the
    four-GEMM backward uses ``bwd_into`` on its recomputed tile too). Without an entropy term, in fp32 /
    fp64, both forward sweeps use ``fwd_exp`` (:func:`fwd_tile_exp`, writing ``m`` and ``s`` into the
    caller's tables, the tile's exponentials kept) on a chunk's first tile and
    :func:`fwd_tile_exp_shifted` (no max pass, the same in every mode) on the others.
    """

    def __init__(
        self,
        name: str,
        fwd: Callable,
        bwd: Callable,
        tensor_temp: bool,
        fwd_keep: Callable,
        bwd_into: Callable,
        fwd_exp: Callable,
    ) -> None:
        self.name, self.fwd, self.bwd, self._tensor_temp = name, fwd, bwd, tensor_temp
        self.fwd_keep, self.bwd_into, self.fwd_exp = fwd_keep, bwd_into, fwd_exp

    def inv_temp(self, value: float, like: Tensor) -> Tensor | float:
        if not self._tensor_temp:
            return value
        cdtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.tensor(value, dtype=cdtype, device=like.device)


EAGER = TileOps(
    "eager",
    _fwd_tile_eager,
    _bwd_tile_eager,
    tensor_temp=False,
    fwd_keep=fwd_tile,
    bwd_into=_bwd_tile_into_eager,
    fwd_exp=_fwd_tile_exp_into_eager,
)

_lock = threading.Lock()
_compiled: TileOps | None = None  # every body compiled (compile=True)
_compiled_auto: tuple[TileOps, TileOps] | None = None  # (the _compiled it was made from, auto's ops)
_broken: str | None = None  # why compiled mode failed, once it has
_stats = {"compiled_calls_first": 0, "compile_seconds": 0.0}


def _make_compiled() -> TileOps:
    fwd = _Compiled(fwd_tile)  # compiled bodies never write their inputs: one object serves both
    return TileOps(
        "compiled",
        fwd,
        _Compiled(bwd_tile),
        tensor_temp=True,
        fwd_keep=fwd,
        bwd_into=_Compiled(bwd_tile_into),
        fwd_exp=_IntoTables(_Compiled(fwd_tile_exp)),
    )


def _auto_from(compiled: TileOps) -> TileOps:
    """What auto mode runs: the compiled bodies, except ``fwd_exp`` and ``bwd_into``'s common case,
    which are faster eager.

    Measured side by side in one process (Intel Xeon AVX-512, fp32): the three-GEMM loss with the eager
    ``fwd_exp`` took 0.875x the compiled one at 4k x 32k and 0.832x at 16k x 32k, faster in 24 of 24
    rounds (``bench_logprobs_paired.py --impls ours-3gemm-eager,ours-3gemm``); the eager ``bwd_into``
    without an entropy term (subtract, exp, scale: three in-place passes) took ~0.7x the compiled one per
    1M-element tile, and the four-GEMM head's backward with it ~0.95x. The tiles are 2-8 MiB and stay
    in L2, so a fused loop saves little memory traffic, and ATen's ``exp`` outruns inductor's.
    ``compile=True`` still runs every body compiled.
    """
    return TileOps(
        "compiled",
        compiled.fwd,
        compiled.bwd,
        tensor_temp=True,
        fwd_keep=compiled.fwd_keep,
        bwd_into=_BwdIntoAuto(compiled.bwd_into),
        fwd_exp=_fwd_exp_eager_tensor_temp,
    )


class _BwdIntoAuto:
    """Auto mode's ``bwd_into``: eager for an fp32 tile without an entropy term (``g = exp(z - lse) *
    coef``: three in-place ATen passes, measured faster), the compiled body otherwise (the entropy term's
    longer formula, or a bf16 / fp16 tile that the eager body would upcast into a temporary)."""

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled

    def __call__(self, raw, lse, coef, ge, inv_temp, want_colsum):
        if ge is None and raw.dtype == torch.float32:
            return _bwd_tile_into_eager(raw, lse, coef, None, float(inv_temp), want_colsum)
        return self.compiled(raw, lse, coef, ge, inv_temp, want_colsum)


def _fwd_exp_eager_tensor_temp(raw: Tensor, inv_temp: Tensor, max_out: Tensor, sum_out: Tensor) -> None:
    """The eager ``fwd_exp`` under the compiled modes' calling convention (temperature as a 0-d tensor)."""
    _fwd_tile_exp_into_eager(raw, float(inv_temp), max_out, sum_out)


class _Compiled:
    """``fn`` compiled once per signature (dtypes and flags; sizes are dynamic), eager after a failure.

    One ``torch.compile`` object per signature keeps each class's recompile budget to itself (sizes 0
    and 1 still specialise, once each), and times the first call of each: the one-off cost, reported
    apart from steady-state time by :func:`compile_stats`.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.by_key: dict[tuple, Callable] = {}

    def __call__(self, *args):
        global _broken
        if _broken is not None:
            return self.fn(*args)
        key = tuple((a.dtype, a.dim() == 0) if isinstance(a, Tensor) else a for a in args)
        compiled = self.by_key.get(key)
        first = compiled is None
        if first:
            compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        t0 = time.perf_counter()
        try:
            out = compiled(*args)
        except Exception as exc:  # no compiler, unsupported platform: keep working, say so once
            _broken = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            warnings.warn(
                f"unipost token_logprobs: compiling the tile bodies failed ({_broken}); using the eager "
                "tiles (same results, slower). Set UNIPOST_LOGPROBS_COMPILE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*args)
        if first:
            self.by_key[key] = compiled
            _stats["compiled_calls_first"] += 1
            _stats["compile_seconds"] += time.perf_counter() - t0
        return out


def compiled_available() -> bool:
    """False once a compile has failed in this process (then every call uses the eager tiles)."""
    return _broken is None


def compile_stats() -> dict:
    """Compiled graphs built (first calls per dtype/flags signature) and the seconds they took here.

    The seconds include dynamo tracing and inductor's C++ build (or its on-disk cache hit) and the
    first run of each graph: the one-off cost, reported apart from steady-state time.
    """
    frames = None
    try:
        from torch._dynamo.utils import counters

        frames = int(counters["stats"]["unique_graphs"])
    except Exception:  # private counters: informative only
        pass
    return {
        "graphs": _stats["compiled_calls_first"],
        "compile_s": round(_stats["compile_seconds"], 2),
        "dynamo_unique_graphs": frames,
        "broken": _broken,
    }


def tile_ops(device: torch.device, dtype: torch.dtype, logits: int, compile: bool | None) -> TileOps:
    """Eager or compiled tile bodies for one call.

    ``compile=None`` (auto): compiled on CPU for fp32/bf16/fp16 problems of at least
    ``AUTO_COMPILE_MIN_LOGITS`` logits (N * V), unless ``UNIPOST_LOGPROBS_COMPILE=0``
    (``=1`` compiles whatever the size). fp64 (gradcheck) and non-CPU devices stay eager in auto mode;
    ``compile=True`` forces compiled mode anywhere torch.compile runs, every body compiled; auto mode
    (also under ``UNIPOST_LOGPROBS_COMPILE=1``) keeps ``fwd_exp`` and fp32 ``bwd_into`` without an
    entropy term eager, where that measured faster (:func:`_auto_from`).
    """
    global _compiled, _compiled_auto
    forced = compile is True
    if compile is None:
        env = os.environ.get("UNIPOST_LOGPROBS_COMPILE", "").strip()
        want = env == "1" if env in ("0", "1") else logits >= AUTO_COMPILE_MIN_LOGITS
        compile = want and torch.device(device).type == "cpu" and dtype != torch.float64
    if not compile or _broken is not None:
        return EAGER
    with _lock:
        if _compiled is None:
            _compiled = _make_compiled()
        if _compiled_auto is None or _compiled_auto[0] is not _compiled:  # made from the current one
            _compiled_auto = (_compiled, _auto_from(_compiled))
    return _compiled if forced else _compiled_auto[1]
