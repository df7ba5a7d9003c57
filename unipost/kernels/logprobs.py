"""Fused token log-probabilities: LM head -> log-softmax -> gather, never materialising ``[N, V]`` logits.

Why: every objective in unipost (SFT, GRPO, OPD, DAgger, AggreVaTe) is
``sum_t sg(w_t) * -log pi(y_t | x)`` (+ a regulariser), so one log-likelihood path serves them all. With
N = 16k tokens and V = 152k the fp32 logits alone are 10 GB, and autograd keeps two more copies for the
backward pass. This kernel computes the same numbers in ``[C, Cv]`` tiles:

* forward: per row chunk, a log-sum-exp over vocabulary tiles, each tile's row max and exponential sum
  taken while it is in cache (with the entropy: merged online, as flash-attention does over keys; without
  it: into per-chunk tables merged by one ``logsumexp``, every tile after the first shifted by the first
  one's row max, see :func:`exp_tiles_into_tables`); it keeps only ``lse`` [N] (and the
  entropy [N]) for the backward pass;
* backward: recomputes each tile's logits, forms the gradient of the logits from the saved statistics
  and the upstream gradients, and feeds it straight into the two matmuls that produce the hidden and
  weight gradients.

Tiling both axes, not just the tokens, matters: a token-only chunk of C rows re-reads the whole [V, H]
head once per chunk (at V = 152k that is 545 MB of fp32 per chunk) and accumulates the weight gradient
with a rank-C update; square-ish tiles keep both costs small.

Unlike fused *losses* (Liger's fused linear cross-entropy computes the gradient inside the forward pass
for a fixed loss), this returns per-token log-probs and takes **arbitrary** upstream gradients: per-token
weights ``w_t`` on ``logp`` (the advantage, the DAgger/AggreVaTe weight) and a separate gradient on the
entropy. Both are applied in the backward pass; neither is dropped or assumed to be 1. The price is a
fourth GEMM (the backward recomputes every tile). Where the loss is a sum of per-token terms known as
soon as each row's log-prob is (every built-in recipe), :mod:`unipost.kernels.fused_loss` forms the
gradient inside the forward sweep instead (three GEMMs); the Trainer picks per recipe
(:func:`unipost.batch.select_head`).

Backends: this file is the plain-torch kernel and the dispatcher. ``backend="auto"`` (the default) runs the
Triton kernel (:mod:`unipost.kernels.triton`, same contract) when the tensors are on CUDA, triton imports and
the dtype is fp32/bf16/fp16, and this torch kernel otherwise; ``"torch"`` / ``"triton"`` force one.

Notation: N tokens, H hidden size, V vocabulary; ``z = logits / temperature``; ``p = softmax(z)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from unipost.kernels.logprob_tiles import fwd_tile_exp_shifted, tile_ops

__all__ = ["BACKENDS", "select_logprobs_backend", "token_logprobs"]

BACKENDS = ("auto", "torch", "triton")

# One fp32 [C, Cv] tile of logits is at most this many elements (8 MiB). The kernel keeps about two such
# tiles alive (the GEMM output and the gradient tile; eager mode adds one or two fp32 temporaries) plus,
# for bf16/fp16, an fp32 accumulator of min(N, V) x H: a few tens of MiB whatever N and V are.
_TILE_ELEMENTS = 2 * 1024 * 1024
# Smaller problems get smaller tiles, 1/128 of the N x V logits (but not under 256K elements, where the
# tile GEMMs lose efficiency): the naive path's extra memory is ~12 bytes per logit, so two tiles stay well
# under 2 % of it at any size, and the fused kernel's memory advantage holds for small micro-batches too.
_TILE_FRACTION = 128
_MIN_TILE_ELEMENTS = 256 * 1024
# Default rows per chunk: large enough that each tile matmul is an efficient GEMM (measured on CPU: tile
# shapes from 256 x 8192 to 2048 x 1024 cost the same within 6 %, N = 2048, V = 32k, fp32, H = 256).
_DEFAULT_ROWS = 1024


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
    compile: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``log_softmax((hidden @ weight.T + bias) / T)[target]``, never building ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states (any floating dtype; flatten batch and time first).
        weight: ``[V, H]`` LM head. May be the tied input-embedding weight: autograd adds this
            kernel's gradient to the embedding's as usual.
        targets: ``[N]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` head bias, same dtype as ``weight``.
        ignore_index: target value marking rows to skip: their ``logp`` and ``entropy`` are exactly 0
            and they receive exactly zero gradient.
        chunk_size: token rows per tile. ``None`` picks 1024 rows (fewer if N is smaller).
        temperature: logits are divided by it before the softmax (sampling temperature of the policy
            whose log-probs you need, e.g. for importance ratios against vLLM logprobs).
        return_entropy: also return the entropy of ``softmax(z)`` per row, differentiable.
        vocab_chunk_size: vocabulary columns per tile. ``None`` picks it so one fp32 tile holds at
            most 2M elements (8 MiB), fewer for small problems (1/128 of N x V, at least 256K); with
            ``chunk_size=1`` that is the whole vocabulary up to V = 2M.
        backend: ``"auto"`` (Triton on CUDA when available, else torch; see
            :func:`select_logprobs_backend`), ``"torch"`` or ``"triton"``. ``chunk_size`` and
            ``vocab_chunk_size`` tile the torch kernel only; the Triton kernel has its own compile-time
            blocks (``unipost.kernels.triton.DEFAULT_BLOCKS``). ``"triton"`` on CPU needs
            ``TRITON_INTERPRET=1`` (Triton's interpreter, for testing) and says so otherwise.
        compile: torch backend only. ``None`` (auto): on CPU, problems of at least 16M logits (N * V)
            run the tile bodies compiled by ``torch.compile`` (fused elementwise passes; compiled once
            per dtype/flags class, not per shape: see :mod:`unipost.kernels.logprob_tiles`), smaller
            ones and fp64 eager; ``UNIPOST_LOGPROBS_COMPILE=0``/``1`` overrides the auto choice.
            ``True`` / ``False`` force it. Same arithmetic either way; a failed compile falls back to
            eager with a warning.

    Per-token weights (advantages, DAgger / AggreVaTe weights) are not an argument: they are the
    upstream gradient of ``logp`` (``(w_N * logp_N).sum().backward()``), which both backends apply per
    row, as they do a separate upstream gradient on the entropy.

    Returns:
        ``logp`` [N], or ``(logp, entropy)`` when ``return_entropy``.

    Dtypes: the matmuls run in the input dtype (so bf16 inputs use bf16 GEMMs, which accumulate in fp32
    on CPU and CUDA) and each logits tile is upcast to fp32 before the softmax; ``logp`` and ``entropy``
    are fp32. fp64 inputs compute and return fp64 throughout (that is what ``gradcheck`` needs). In the
    backward pass, the logits gradient is formed in fp32 and cast to the input dtype for the two matmuls;
    the weight (and bias) gradient is accumulated across tiles in fp32 and cast to the weight dtype once
    at the end, so bf16 rounding does not compound over chunks. ``hidden`` and ``weight`` must have the
    same dtype and device.

    Memory: besides the inputs and the gradients, about two fp32 tiles (see ``vocab_chunk_size``)
    plus, for bf16/fp16, one fp32 gradient accumulator of ``min(N, V) x H`` elements.

    The logits are assumed finite (a ``-inf`` bias entry would turn the streaming entropy into NaN).
    """
    check_logprobs_inputs(
        hidden, weight, targets, bias, ignore_index, temperature, chunk_size, vocab_chunk_size
    )
    if select_logprobs_backend(hidden.device, hidden.dtype, backend) == "triton":
        from unipost.kernels.triton import token_logprobs_triton

        return token_logprobs_triton(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
            return_entropy=return_entropy,
        )  # fmt: skip
    n, v = hidden.shape[0], weight.shape[0]
    rows, cols = _plan_tiles(n, v, chunk_size, vocab_chunk_size)
    ops = tile_ops(hidden.device, hidden.dtype, n * v, compile)
    logp_N, entropy_N = _TokenLogprobs.apply(
        hidden, weight, bias, targets, int(ignore_index), rows, cols, 1.0 / float(temperature),
        return_entropy, ops,
    )  # fmt: skip
    return (logp_N, entropy_N) if return_entropy else logp_N


def select_logprobs_backend(device: torch.device, dtype: torch.dtype, backend: str = "auto") -> str:
    """``"torch"`` or ``"triton"``: the kernel ``token_logprobs(..., backend=backend)`` runs for these inputs.

    ``"auto"`` picks Triton only where it is the fast path: CUDA tensors, triton importable, and a dtype
    the Triton kernel supports (fp64, e.g. for ``gradcheck``, stays on torch). It never picks Triton's CPU
    interpreter, which is ~1000x slower and only for testing. An explicit choice is returned as given;
    the Triton kernel itself refuses what it cannot run, naming the fix.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    from unipost._optional import available
    from unipost.kernels.triton.function import SUPPORTED_DTYPES

    on_cuda = torch.device(device).type == "cuda"
    return "triton" if on_cuda and dtype in SUPPORTED_DTYPES and available("triton") else "torch"


def check_logprobs_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    chunk_size: int | None,
    vocab_chunk_size: int | None,
) -> None:
    """Reject bad input up front with a message naming the problem (the tile loops would fail obscurely)."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 2-D [N, H] tensor (flatten batch and time first), got {shape}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D [V, H] tensor (the LM head), got {shape}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)} but weight is {tuple(weight.shape)}; "
            "weight must be [V, H] with the same H (did you pass weight.T?)"
        )
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype; cast one of them"
        )
    if not isinstance(targets, Tensor) or targets.dim() != 1:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a 1-D [N] integer tensor, got {shape}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer token ids (int64), got dtype {targets.dtype}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(
            f"hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, "
            f"{targets.device}"
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets has {targets.shape[0]} entries but hidden has {hidden.shape[0]} rows; "
            "they must match one target per hidden state"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
        raise ValueError(f"bias must match weight's dtype and device, got {bias.dtype} on {bias.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if targets.numel():
        v = weight.shape[0]
        bad = (targets != targets.new_tensor(ignore_index)) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            first = int(targets[bad][0])
            raise ValueError(
                f"targets must be in [0, {v}) or equal ignore_index={ignore_index}; found {first} "
                f"({int(bad.sum())} bad entries)"
            )


def _plan_tiles(n: int, v: int, chunk_size: int | None, vocab_chunk_size: int | None) -> tuple[int, int]:
    """Rows and vocabulary columns per tile: honour what was given, fill the rest from the tile budget."""
    budget = _TILE_ELEMENTS
    if chunk_size is None and vocab_chunk_size is None:
        budget = min(_TILE_ELEMENTS, max(_MIN_TILE_ELEMENTS, n * v // _TILE_FRACTION))
    if chunk_size is None:
        rows = _DEFAULT_ROWS if vocab_chunk_size is None else max(1, budget // vocab_chunk_size)
    else:
        rows = chunk_size
    rows = max(1, min(rows, n))
    cols = vocab_chunk_size if vocab_chunk_size is not None else max(1, budget // rows)
    return rows, max(1, min(cols, v))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax's dtype for GEMM inputs of ``dtype``: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def raw_logits(h_c: Tensor, w_t: Tensor, b_t: Tensor | None, buf: Tensor | None = None) -> Tensor:
    """``h_c @ w_t.T + b_t`` for one tile, in the input dtype (bf16 GEMMs accumulate in fp32 internally).

    Forward and backward both call this, so the recomputed tile is bit-identical to the one the saved
    log-sum-exp was taken over. ``buf`` (a flat tile-sized buffer, reused tile after tile) receives the
    product: a fresh multi-MiB tensor per tile costs the allocator a map, page faults and a trim each
    time, which the reused buffer does not.
    """
    if buf is None:
        return torch.addmm(b_t, h_c, w_t.T) if b_t is not None else h_c @ w_t.T  # (C, Cv)
    out = buf[: h_c.shape[0] * w_t.shape[0]].view(h_c.shape[0], w_t.shape[0])  # (C, Cv)
    return torch.addmm(b_t, h_c, w_t.T, out=out) if b_t is not None else torch.mm(h_c, w_t.T, out=out)


def _forward_online(hidden, weight, bias, targets, rows, cols, inv_temp, temp, ops, tile_buf, lse_N,
                    target_logit_N, entropy_N) -> None:  # fmt: skip
    """The forward sweep in general (any dtype, entropy or not): each tile's log-sum-exp (and entropy)
    merged into the row chunk's running ones as the tiles come (``logaddexp``), as flash-attention does."""
    n, v = hidden.shape[0], weight.shape[0]
    cdtype, want_entropy = lse_N.dtype, entropy_N is not None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h_c, tgt_c = hidden[r0:r1], targets[r0:r1]
        lse_c = ent_c = None
        for v0 in range(0, v, cols):
            v1 = min(v, v0 + cols)
            b_t = bias[v0:v1] if bias is not None else None
            raw = raw_logits(h_c, weight[v0:v1], b_t, tile_buf)  # (C, Cv) input dtype
            # The target's logit, read from the same (rounded) tile the log-sum-exp is taken
            # over, so logp <= 0 holds in every dtype.
            in_tile = (tgt_c >= v0) & (tgt_c < v1)
            local = (tgt_c - v0).clamp(0, v1 - v0 - 1).long()
            z_tgt = raw.gather(1, local[:, None]).squeeze(1).to(cdtype) * inv_temp
            target_logit_N[r0:r1] = torch.where(in_tile, z_tgt, target_logit_N[r0:r1])
            lse_t, ent_t = ops.fwd(raw, temp, want_entropy)
            del raw
            if lse_c is None:
                lse_c, ent_c = lse_t, ent_t
                continue
            lse_new = torch.logaddexp(lse_c, lse_t)
            if want_entropy:
                # H = sum_tiles a_t * (H_t + lse - lse_t), a_t = exp(lse_t - lse): merge two parts.
                a_old, a_t = torch.exp(lse_c - lse_new), torch.exp(lse_t - lse_new)
                ent_c = a_old * (ent_c + lse_new - lse_c) + a_t * (ent_t + lse_new - lse_t)
            lse_c = lse_new
        if lse_c is not None:
            lse_N[r0:r1] = lse_c
            if want_entropy:
                entropy_N[r0:r1] = ent_c


def target_positions(safe_c: Tensor, cols: int, v: int, tile_stride: int) -> tuple[Tensor, Tensor, list[int]]:
    """Where each row's target logit lies in a flat tile buffer: ``(order, positions, ends)``.

    Rows are sorted by the tile their target falls in (``order``); ``positions[lo:hi]`` with
    ``lo, hi = ends[k - 1], ends[k]`` are the flat offsets of tile ``k``'s rows' targets, for one
    ``index_select`` per tile right after its GEMM (one op instead of a mask, a gather and a merge per
    tile: ~10 us of dispatch each). Tile ``k`` (columns ``[k cols, min(v, (k + 1) cols))``, its rows
    contiguous with its own width as row stride) starts at ``tile_stride * k * cols`` in the buffer: 0 for one
    reused tile buffer, ``rows`` for a chunk buffer that keeps every tile. One host sync per call.
    """
    m = safe_c.shape[0]
    tile_c = torch.div(safe_c, cols, rounding_mode="floor")
    tile_v0 = tile_c * cols
    tile_width = torch.clamp(v - tile_v0, max=cols)
    pos_c = tile_stride * tile_v0 + torch.arange(m, device=safe_c.device) * tile_width + (safe_c - tile_v0)
    order = torch.argsort(tile_c, stable=True)
    ends = torch.bincount(tile_c, minlength=-(-v // cols)).cumsum(0).tolist()
    return order, pos_c[order], ends


# A chunk's tiles after the first are shifted by the first tile's row max, and a tile whose exponential
# sum exceeds this limit (2^100 ~ e^69) in some row is computed again with its own max: a tile may lie up
# to ~60 above the first before it is redone, and the exponentials that the three-GEMM sweep keeps for its
# gradient GEMMs (e W, e^T h) stay far from fp32's overflow (e^88). No margin is added to the shift:
# exponents near 0 keep the common case's terms as precise as a max per tile (a shift of max + 40 put them
# near -40, where fp32 resolves an exponent to ~4e-6: measured, logp errors 2.3e-6 instead of 1.2e-6).
_SHIFT_SUM_LIMIT = 2.0**100


def speculative_shift(max_first: Tensor, n_tiles: int) -> Tensor | None:
    """``-max`` of a chunk's first tile, the shift for its other tiles' exponentials, or None (every tile
    takes its own max) when there is one tile or a row's first-tile max is not finite (NaN, +inf). One
    host sync per chunk."""
    if n_tiles < 2 or not bool(torch.isfinite(max_first).all()):
        return None
    return -max_first


def overflowed_tiles(sum_kc: Tensor) -> list[int]:
    """The tiles (table rows) whose exponential sum exceeds the limit in some row: shifted too low."""
    return (sum_kc > _SHIFT_SUM_LIMIT).any(dim=1).nonzero().squeeze(1).tolist()


def exp_tiles_into_tables(
    n_tiles: int,
    gemm_tile: Callable[[int], Tensor],
    ops,
    temp,
    inv_temp: float,
    max_kc: Tensor,
    sum_kc: Tensor,
    speculate: bool = True,
) -> bool:
    """Each tile's exponentials written over its logits, its row shift and exponential sum into the
    chunk's tables (``max_kc`` / ``sum_kc`` [tiles, rows]), for the caller to merge with one logsumexp.

    ``gemm_tile(k)`` computes tile ``k``'s logits (reading what else it needs from them, e.g. the
    targets' logits) and returns them. The first tile takes its own row max (``ops.fwd_exp``); with
    ``speculate`` the others are shifted by it (:func:`fwd_tile_exp_shifted`: no max pass), and a tile
    whose sum passes the limit is computed again with its own max, so ``logsumexp(max + log(sum))`` is
    the log-sum-exp of the row as with a max per tile (what a shifted tile loses to underflow lies
    ~e^-87 below the first tile's largest term). Returns whether speculating paid here (at most a
    quarter of the shifted tiles redone): the caller passes it on to the next chunk, so logits that
    defeat the shift (a first tile far below the rest) cost one chunk's redone GEMMs per call, not every
    chunk's.
    """
    neg_shift = None
    for k in range(n_tiles):
        raw = gemm_tile(k)
        if k > 0 and neg_shift is not None:
            fwd_tile_exp_shifted(raw, inv_temp, neg_shift, sum_kc[k])
        else:
            ops.fwd_exp(raw, temp, max_kc[k], sum_kc[k])
            if k == 0 and speculate:
                neg_shift = speculative_shift(max_kc[0], n_tiles)
    if neg_shift is None:
        return speculate
    max_kc[1:].copy_((-neg_shift).expand(n_tiles - 1, -1))
    redo = overflowed_tiles(sum_kc[1:])
    for k in redo:
        ops.fwd_exp(gemm_tile(k + 1), temp, max_kc[k + 1], sum_kc[k + 1])
    return 4 * len(redo) <= n_tiles - 1


def _forward_tables(hidden, weight, bias, targets, valid_N, rows, cols, inv_temp, temp, ops, tile_buf, lse_N,
                    target_logit_N) -> None:  # fmt: skip
    """The forward sweep without entropy in fp32 / fp64: per tile the GEMM, one gather of the targets'
    logits and the exponential pass into per-chunk max / sum tables (:func:`exp_tiles_into_tables`);
    one ``logsumexp`` per chunk merges the tiles.

    Why not :func:`_forward_online`: its per-tile bookkeeping (target mask and gather, ``logaddexp``
    merge) is a dozen small ops per tile, and its body makes a max pass per tile. Measured side by side
    in benchmarks/README.md (take 7). Same values up to the merge's rounding.
    """
    n, v = hidden.shape[0], weight.shape[0]
    starts = [(v0, min(v, v0 + cols)) for v0 in range(0, v, cols)]
    max_kc = hidden.new_empty(len(starts), min(rows, n))
    sum_kc = torch.empty_like(max_kc)
    safe_N = torch.where(valid_N, targets, torch.zeros_like(targets)).long()
    speculate = True
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        h_c = hidden[r0:r1]
        order, pos_sorted, ends = target_positions(safe_N[r0:r1], cols, v, 0)
        tgt_sorted = hidden.new_empty(m)

        def gemm_tile(k: int, h_c=h_c, pos_sorted=pos_sorted, ends=ends, tgt_sorted=tgt_sorted) -> Tensor:
            v0, v1 = starts[k]
            raw = raw_logits(h_c, weight[v0:v1], bias[v0:v1] if bias is not None else None, tile_buf)
            lo, hi = ends[k - 1] if k else 0, ends[k]
            if hi > lo:  # the targets' logits, from the same rounded tile the log-sum-exp is taken over
                torch.index_select(tile_buf, 0, pos_sorted[lo:hi], out=tgt_sorted[lo:hi])
            return raw

        speculate = exp_tiles_into_tables(
            len(starts), gemm_tile, ops, temp, inv_temp, max_kc[:, :m], sum_kc[:, :m], speculate
        )
        target_logit_N[r0:r1].index_copy_(0, order, tgt_sorted).mul_(inv_temp)
        torch.logsumexp(max_kc[:, :m] + torch.log(sum_kc[:, :m]), dim=0, out=lse_N[r0:r1])


class _TokenLogprobs(torch.autograd.Function):
    """Tiled forward (log-sum-exp per row chunk) and backward (recomputed tiles); see the module docstring.

    The elementwise work on each tile is done by ``ops`` (:mod:`unipost.kernels.logprob_tiles`: eager, or
    the same bodies compiled once per shape class); the GEMMs and the loops are here.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, rows, cols, inv_temp, want_entropy, ops):
        n, v = hidden.shape[0], weight.shape[0]
        cdtype = compute_dtype(hidden.dtype)
        valid_N = targets != ignore_index
        lse_N = hidden.new_empty(n, dtype=cdtype)
        target_logit_N = hidden.new_zeros(n, dtype=cdtype)
        entropy_N = hidden.new_zeros(n, dtype=cdtype) if want_entropy else None
        temp = ops.inv_temp(inv_temp, hidden)

        tile_buf = hidden.new_empty(min(rows, n) * min(cols, v))  # every tile's GEMM output, in turn
        with torch.no_grad():
            if not want_entropy and hidden.dtype == cdtype:
                _forward_tables(hidden, weight, bias, targets, valid_N, rows, cols, inv_temp, temp, ops,
                                tile_buf, lse_N, target_logit_N)  # fmt: skip
            else:
                _forward_online(hidden, weight, bias, targets, rows, cols, inv_temp, temp, ops, tile_buf,
                                lse_N, target_logit_N, entropy_N)  # fmt: skip

        logp_N = torch.where(valid_N, target_logit_N - lse_N, torch.zeros_like(lse_N))
        if want_entropy:
            entropy_out_N = torch.where(valid_N, entropy_N, torch.zeros_like(entropy_N))
        else:
            entropy_out_N = hidden.new_zeros(0, dtype=cdtype)
            ctx.mark_non_differentiable(entropy_out_N)
        ctx.save_for_backward(hidden, weight, bias, targets, lse_N, entropy_N)
        ctx.meta = (ignore_index, rows, cols, inv_temp, want_entropy, ops)
        ctx.set_materialize_grads(False)
        return logp_N, entropy_out_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden, weight, bias, targets, lse_N, entropy_N = ctx.saved_tensors
        ignore_index, rows, cols, inv_temp, want_entropy, ops = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        use_entropy = want_entropy and grad_entropy_N is not None
        nones = (None,) * 10
        if (grad_logp_N is None and not use_entropy) or not (need_h or need_w or need_b):
            return nones

        n, v = hidden.shape[0], weight.shape[0]
        dtype, cdtype = hidden.dtype, compute_dtype(hidden.dtype)
        valid_N = targets != ignore_index
        safe_N = torch.where(valid_N, targets, torch.zeros_like(targets)).long()
        zero_N = torch.zeros_like(lse_N)
        # Per-row coefficients of dL/dz, with 1/T folded in (dz/dlogits = 1/T) and masked rows zeroed:
        #   dL/dz_j = gl * (onehot_j - p_j) - ge * p_j * (z_j - E_p[z])
        #           = p_j * (c - ge * log p_j) + gl * onehot_j,   c = -ge * H - gl
        # since E_p[z] - lse = -H. The tiles compute the p_j part; the one-hot part (one column per row)
        # is added to the gradients directly, in the accumulation dtype, below.
        gl_N = zero_N
        if grad_logp_N is not None:
            gl_N = torch.where(valid_N, grad_logp_N.to(cdtype) * inv_temp, zero_N)
        ge_N = None
        if use_entropy:
            ge_N = torch.where(valid_N, grad_entropy_N.to(cdtype) * inv_temp, zero_N)
            c_N = -ge_N * entropy_N - gl_N
        else:
            c_N = -gl_N
        temp = ops.inv_temp(inv_temp, hidden)

        # Outputs in the input dtype accumulate in place. For bf16/fp16 the side that accumulates across
        # the outer loop gets an fp32 buffer, the other side an fp32 tile-local one. The outer loop runs
        # over the longer axis so that the full buffer is the smaller of [N, H] and [V, H].
        direct = dtype == cdtype
        rows_outer = n >= v
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        acc_h = acc_w = None
        if need_h and not direct and not rows_outer:
            acc_h = torch.zeros(hidden.shape, dtype=cdtype, device=hidden.device)
        if need_w and not direct and rows_outer:
            acc_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device)
        full_h = grad_h if direct else acc_h  # where grad_h accumulates across the outer loop (or None)
        full_w = grad_w if direct else acc_w
        grad_b = torch.zeros(v, dtype=cdtype, device=weight.device) if need_b else None
        if need_b:
            grad_b.index_add_(0, safe_N, gl_N)

        def onehot_h(buf: Tensor, r0: int, r1: int) -> None:
            """buf [r1 - r0, H] += gl_r * W[y_r]: the one-hot part of the hidden gradient."""
            buf.addcmul_(gl_N[r0:r1, None].to(buf.dtype), weight[safe_N[r0:r1]].to(buf.dtype))

        def onehot_w(buf: Tensor, v0: int, v1: int, r0: int, r1: int) -> None:
            """buf [v1 - v0, H] rows y += gl * h for rows r0:r1 whose target is in [v0, v1)."""
            y = safe_N[r0:r1]
            sel = ((y >= v0) & (y < v1) & valid_N[r0:r1]).nonzero().squeeze(1)
            if sel.numel():
                contrib = hidden[r0:r1][sel].to(buf.dtype) * gl_N[r0:r1][sel, None].to(buf.dtype)
                buf.index_add_(0, y[sel] - v0, contrib)

        # One-hot parts landing in the full-size buffers: once, by row chunks.
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            if full_h is not None:
                onehot_h(full_h[r0:r1], r0, r1)
            if full_w is not None:
                onehot_w(full_w, 0, v, r0, r1)

        tile_buf = hidden.new_empty(min(rows, n) * min(cols, v))  # recomputed tile, then its gradient
        row_starts, col_starts = range(0, n, rows), range(0, v, cols)
        outer, inner = (row_starts, col_starts) if rows_outer else (col_starts, row_starts)
        for o0 in outer:
            # Tile-local fp32 accumulator for the outer side's gradient (low precision only).
            local = None
            if not direct and (need_h if rows_outer else need_w):
                o1 = min(n if rows_outer else v, o0 + (rows if rows_outer else cols))
                local = torch.zeros(o1 - o0, hidden.shape[1], dtype=cdtype, device=hidden.device)
                if rows_outer:
                    onehot_h(local, o0, o1)
                else:
                    onehot_w(local, o0, o1, 0, n)
            for i0 in inner:
                r0, v0 = (o0, i0) if rows_outer else (i0, o0)
                r1, v1 = min(n, r0 + rows), min(v, v0 + cols)
                h_c, w_t = hidden[r0:r1], weight[v0:v1]
                b_t = bias[v0:v1] if bias is not None else None
                ge_c = ge_N[r0:r1] if ge_N is not None else None
                raw = raw_logits(h_c, w_t, b_t, tile_buf)
                colsum = ops.bwd_into(raw, lse_N[r0:r1], c_N[r0:r1], ge_c, temp, need_b)
                g = raw  # the recomputed logits, now dL/dz: no second tile
                if need_b:
                    grad_b[v0:v1] += colsum
                if need_h:
                    if direct:
                        grad_h[r0:r1].addmm_(g, w_t)
                    else:  # the low-precision product, accumulated in fp32
                        (local if rows_outer else acc_h[r0:r1]).add_(g @ w_t)
                if need_w:
                    if direct:
                        grad_w[v0:v1].addmm_(g.T, h_c)
                    else:
                        (acc_w[v0:v1] if rows_outer else local).add_(g.T @ h_c)
                del g
            if local is not None:
                if rows_outer:
                    grad_h[o0 : o0 + local.shape[0]] = local
                else:
                    grad_w[o0 : o0 + local.shape[0]] = local
        if not direct:
            if acc_h is not None:
                grad_h.copy_(acc_h)
            if acc_w is not None:
                grad_w.copy_(acc_w)
        grad_bias = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_bias, None, None, None, None, None, None, None
