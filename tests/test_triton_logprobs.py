"""The Triton ``token_logprobs`` kernel against the plain-PyTorch reference, under Triton's CPU interpreter.

Why a worker process: ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is *decorated* (import time),
and the variable switches every Triton kernel of the process to the interpreter. Setting it in the pytest
process would do that to every other Triton user of the suite and could not be undone for kernels already
decorated. So this file, run as a script with ``TRITON_INTERPRET=1`` in its environment, computes the
Triton values and gradients of every case in :data:`CASES` once (one process, ~15 s); the tests here
compare them with the float64 reference on the same inputs. The pytest process never imports triton for
these comparisons.

Every case puts random per-token upstream gradients on ``logp`` (the per-token weights, i.e. advantages)
and, where the entropy is returned, on the entropy, and checks the hidden, weight and bias gradients.
Shapes are odd on purpose: with 16 x 32 x 16 blocks, N = 37 (or 20) rows, V = 101 (70) columns and
H = 40 (24) leave a partial last block on every axis and take 3-4 vocabulary tiles per row block.
The interpreter is ~1000x slower than torch, so shapes stay small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unipost._optional import available
from unipost.kernels.logprobs import select_logprobs_backend, token_logprobs
from unipost.kernels.reference import token_logprobs_reference
from unipost.kernels.triton import TritonBackendError, interpreter_requested

IGNORE = -100
# fp32: max |triton - fp64 truth| <= atol + rtol * |truth| (measured ~3e-6 on the weight gradient).
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# 16-bit inputs, values: the logits GEMM of exact bf16/fp16 inputs accumulates in fp32 and stays fp32,
# so logp / entropy are fp32-accurate (measured 4e-7): max err <= 1e-4 * max |truth| + 1e-5.
HALF_VALUE_REL = 1e-4
# 16-bit gradients: dL/dlogits is rounded to the input dtype for the two GEMMs and the gradients are
# returned in it (as the torch kernel does): max err <= 1.5e-2 * max |truth| (measured 0.9e-2 for bf16).
HALF_GRAD_REL = 1.5e-2

BLOCKS = {"block_rows": 16, "block_vocab": 32, "block_hidden": 16}
_BASE = {"n": 20, "h": 24, "v": 70, "dtype": "float32", "bias": True, "entropy": True, "temperature": 1.0}
# name -> case. "upstream": which outputs get a random per-token upstream gradient. "via": "direct" calls
# token_logprobs_triton with the small BLOCKS; "dispatch" goes through token_logprobs(backend="triton")
# with the default blocks (64 x 128 x 64, so N and V fit one partial block).
CASES: dict[str, dict] = {
    "fp32_entropy_temperature": {**_BASE, "n": 37, "h": 40, "v": 101, "temperature": 0.7},
    "fp32_no_bias_no_entropy": {**_BASE, "bias": False, "entropy": False, "upstream": ("logp",)},
    "fp32_entropy_returned_logp_grad_only": {**_BASE, "upstream": ("logp",)},
    "fp32_entropy_grad_only": {**_BASE, "upstream": ("entropy",), "temperature": 1.3},
    "fp32_strided_inputs": {**_BASE, "strided": True},
    "fp32_all_rows_ignored": {**_BASE, "n": 9, "mask_every": 1},
    "fp32_no_rows": {**_BASE, "n": 0},
    "fp32_dispatch_default_blocks": {**_BASE, "n": 70, "v": 150, "via": "dispatch", "temperature": 0.9},
    "bf16_entropy": {**_BASE, "dtype": "bfloat16", "temperature": 0.8},
    "fp16_logp": {**_BASE, "dtype": "float16", "entropy": False, "upstream": ("logp",)},
}


def case_inputs(case: dict):
    """Deterministic inputs of one case (the worker and the tests build the same tensors)."""
    g = torch.Generator().manual_seed(sum(map(ord, repr(sorted(case.items())))))
    n, h, v = case["n"], case["h"], case["v"]
    dtype = getattr(torch, case["dtype"])
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3  # logits std ~ 1.9, realistic
    bias = torch.randn(v, generator=g) if case["bias"] else None
    targets = torch.randint(0, v, (n,), generator=g)
    mask_every = case.get("mask_every", 5)
    if mask_every:
        targets[::mask_every] = IGNORE
    if n and mask_every != 1:
        targets[-1] = v - 1  # a target in the last, partial vocabulary block
    upstream = case.get("upstream", ("logp", "entropy"))
    w_logp = torch.randn(n, generator=g) if "logp" in upstream else None
    w_ent = torch.randn(n, generator=g) if "entropy" in upstream else None
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return hidden, weight, bias, targets, w_logp, w_ent


def _layout(x: torch.Tensor, strided: bool) -> torch.Tensor:
    """The same values, as a non-contiguous view when ``strided`` (column-major for a matrix)."""
    if not strided or x.dim() != 2:
        return x
    return x.T.contiguous().T


def run_case(fn, case: dict, *, float64: bool = False, device: str = "cpu", **kwargs):
    """Values and input gradients of sum_t w_logp_t * logp_t + w_ent_t * H_t for one case."""
    hidden, weight, bias, targets, w_logp, w_ent = case_inputs(case)
    tensors = [hidden, weight] + ([bias] if bias is not None else [])
    if float64:
        tensors = [x.double() for x in tensors]
    tensors, targets = [x.to(device) for x in tensors], targets.to(device)
    leaves = [_layout(x.detach().clone(), case.get("strided", False)).requires_grad_() for x in tensors]
    b = leaves[2] if bias is not None else None
    want_entropy = case["entropy"]
    out = fn(
        leaves[0], leaves[1], targets, bias=b, ignore_index=IGNORE, temperature=case["temperature"],
        return_entropy=want_entropy, **kwargs,
    )  # fmt: skip
    logp, ent = out if want_entropy else (out, None)
    loss = logp.new_zeros(())
    if w_logp is not None:
        loss = loss + (logp * w_logp.to(logp)).sum()
    if w_ent is not None:
        loss = loss + (ent * w_ent.to(ent)).sum()
    loss.backward()
    result = {"logp": logp.detach()}
    if ent is not None:
        result["entropy"] = ent.detach()
    for name, leaf in zip(("grad_hidden", "grad_weight", "grad_bias"), leaves, strict=False):
        result[name] = leaf.grad
    return result


def _triton_fn(case: dict):
    if case.get("via", "direct") == "dispatch":
        return lambda *a, **kw: token_logprobs(*a, backend="triton", **kw)
    from unipost.kernels.triton import token_logprobs_triton

    return lambda *a, **kw: token_logprobs_triton(*a, **BLOCKS, **kw)


def model_case(backend: str) -> dict[str, torch.Tensor]:
    """End to end: a tiny tied-embedding Qwen3 over a tree pack through ``packed_logprobs(backend=...)``.

    Returns the label log-probs, entropies and every parameter's gradient of a weighted objective.
    """
    from unipost.kernels.model import packed_logprobs
    from unipost.kernels.packing import Label, PackSequence, pack
    from unipost.models import build_tiny_qwen3

    vocab = 300
    model = build_tiny_qwen3(vocab, hidden_size=32, tie_word_embeddings=True, seed=3)
    g = torch.Generator().manual_seed(3)
    root = torch.randint(0, vocab, (40,), generator=g).tolist()
    branch = tuple(torch.randint(0, vocab, (4,), generator=g).tolist())
    batch = pack([PackSequence(root, [Label(12, tuple(root[12:30])), Label(20, branch)])])
    out = packed_logprobs(model, batch, return_entropy=True, temperature=0.9, backend=backend)
    w_L = torch.randn(out.logp_L.shape[0], generator=g)
    ((out.logp_L * w_L).sum() + 0.1 * out.entropy_L.sum()).backward()
    grads = {f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"logp": out.logp_L.detach(), "entropy": out.entropy_L.detach(), **grads}


def _worker(out_path: str) -> None:
    """Run every case through the Triton kernel (this process has TRITON_INTERPRET=1) and save results."""
    torch.set_num_threads(1)
    results = {name: run_case(_triton_fn(case), case) for name, case in CASES.items()}
    # Determinism: each output element is written by one program in a fixed order (no atomics).
    again = run_case(_triton_fn(CASES["fp32_dispatch_default_blocks"]), CASES["fp32_dispatch_default_blocks"])
    results["_rerun_fp32_dispatch_default_blocks"] = again
    results["_model_tree_pack"] = model_case("triton")
    torch.save(results, out_path)


# --------------------------------------------------------------------------- tests (pytest process)

needs_triton = pytest.mark.skipif(
    not available("triton"), reason="triton is not installed (pip install triton)"
)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True)


def _assert_fp32(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected, **FP32_TOL, msg=lambda m: f"{what}: {m}")


def _assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-5, f"{what}: max err {err:.3e} > {rel} * {scale:.3e}"


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(triton_results, name):
    case = CASES[name]
    _check_against_reference(
        name, case, triton_results[name], run_case(token_logprobs_reference, case, float64=True)
    )


def _check_against_reference(
    name: str, case: dict, got: dict, want: dict, fp32_rel: float | None = None
) -> None:
    """``got`` (Triton) against ``want`` (fp64 reference): shapes, dtypes and the tolerances above."""
    assert set(got) == set(want), f"outputs differ: {sorted(got)} vs {sorted(want)}"
    dtype = getattr(torch, case["dtype"])
    for key, expected in want.items():
        actual = got[key]
        assert actual.shape == expected.shape, (
            f"{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
        if key.startswith("grad_"):
            assert actual.dtype == dtype, f"{key} must come back in the input dtype, got {actual.dtype}"
        else:
            assert actual.dtype == torch.float32, f"{key} must be float32, got {actual.dtype}"
        if dtype == torch.float32 and fp32_rel is not None:
            _assert_relative(actual, expected, fp32_rel, f"{name} {key}")
        elif dtype == torch.float32:
            _assert_fp32(actual, expected, f"{name} {key}")
        else:
            rel = HALF_GRAD_REL if key.startswith("grad_") else HALF_VALUE_REL
            _assert_relative(actual, expected, rel, f"{name} {key}")


@needs_triton
def test_ignored_rows_are_exactly_zero(triton_results):
    got = triton_results["fp32_all_rows_ignored"]
    for key in ("logp", "entropy", "grad_hidden"):
        assert torch.count_nonzero(got[key]) == 0, f"{key} must be exactly 0 on ignore_index rows"
    assert torch.count_nonzero(got["grad_weight"]) == 0 and torch.count_nonzero(got["grad_bias"]) == 0
    _, _, _, targets, _, _ = case_inputs(CASES["fp32_entropy_temperature"])
    masked = targets == IGNORE
    assert masked.any()
    grad_h = triton_results["fp32_entropy_temperature"]["grad_hidden"]
    assert torch.count_nonzero(grad_h[masked]) == 0, "masked rows must get exactly zero gradient"


@needs_triton
def test_packed_logprobs_triton_equals_torch(triton_results):
    """Through the model path: tree pack, tied embeddings (head gradient adds to the embedding's), T != 1."""
    got, want = triton_results["_model_tree_pack"], model_case("torch")
    assert set(got) == set(want) and "grad model.embed_tokens.weight" in want
    for key in want:  # same fp32 kernel error as above, carried through two decoder layers
        close = {"atol": 1e-5, "rtol": 1e-4}
        torch.testing.assert_close(got[key], want[key], **close, msg=lambda m, k=key: f"{k}: {m}")


@needs_triton
def test_triton_backward_is_deterministic(triton_results):
    first = triton_results["fp32_dispatch_default_blocks"]
    second = triton_results["_rerun_fp32_dispatch_default_blocks"]
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical runs"


def test_auto_backend_selection(monkeypatch):
    import unipost._optional as optional

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_logprobs_backend(cpu, torch.float32) == "torch"
    assert select_logprobs_backend(cpu, torch.bfloat16, "triton") == "triton"
    assert select_logprobs_backend(cuda, torch.float32, "torch") == "torch"
    monkeypatch.setattr(optional, "available", lambda name: True)
    assert select_logprobs_backend(cuda, torch.bfloat16) == "triton"
    assert select_logprobs_backend(cuda, torch.float64) == "torch", "fp64 (gradcheck) stays on torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_logprobs_backend(cpu, torch.float32) == "torch", "auto never picks the slow interpreter"
    monkeypatch.setattr(optional, "available", lambda name: False)
    assert select_logprobs_backend(cuda, torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        select_logprobs_backend(cpu, torch.float32, "cuda")


def _small():
    return torch.randn(3, 16), torch.randn(20, 16), torch.tensor([0, 5, IGNORE])


@needs_triton
def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TritonBackendError, match=r"TRITON_INTERPRET=1 .*backend='torch'"):
        token_logprobs(*_small(), backend="triton")


def test_missing_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError, find_spec -> ValueError
    with pytest.raises(TritonBackendError, match=r"needs triton.*pip install 'unipost\[gpu\]'"):
        token_logprobs(*_small(), backend="triton")
    assert select_logprobs_backend(torch.device("cuda"), torch.float32) == "torch"


def test_triton_refuses_what_it_cannot_run():
    from unipost.kernels.triton import token_logprobs_triton

    hidden, weight, targets = _small()
    with pytest.raises(TritonBackendError, match=r"float64.*backend='torch'"):
        token_logprobs(hidden.double(), weight.double(), targets, backend="triton")
    with pytest.raises(TritonBackendError, match="block_vocab must be a power of two >= 16"):
        token_logprobs_triton(hidden, weight, targets, block_vocab=24)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        token_logprobs(hidden, weight[:, :8], targets, backend="triton")


@needs_triton
def test_interpreter_set_after_import_is_refused(monkeypatch):
    """Kernels decorated without the interpreter cannot run CPU tensors; setting the variable late says so."""
    if "unipost.kernels.triton._kernels" in sys.modules or os.environ.get("TRITON_INTERPRET"):
        pytest.skip("this process may already hold interpreted kernels (TRITON_INTERPRET set at start)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import unipost.kernels.triton._kernels  # noqa: F401  (decorated for the GPU: the variable is unset)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TritonBackendError, match="was set after"):
        token_logprobs(*_small(), backend="triton")


def test_cpu_path_never_imports_triton():
    code = (
        "import sys, torch\n"
        "from unipost.kernels.logprobs import token_logprobs\n"
        "h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)\n"
        "token_logprobs(h, w, torch.tensor([1, 2, 3, -100])).sum().backward()\n"
        "print('triton' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "the CPU torch path must not import triton"


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "arch"), [("bf16", 90), ("fp32", 90), ("bf16", 80)])
def test_kernels_compile_for_the_gpu(dtype, arch):
    """The real compiler (TTIR -> PTX -> ptxas, shipped with triton) accepts the kernels: no GPU needed.

    Catches what the interpreter cannot (non-constexpr globals, dot operand rules) and checks that both
    backward kernels keep their CTA barrier. ~10-60 s per target on 2 cores (cached afterwards).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "unipost.kernels.triton.aot", "--dtype", dtype, "--arch", str(arch)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    barriers = dict(line.split()[0:1] + line.split("barriers=")[1:] for line in out.stdout.splitlines()[1:])
    assert barriers == {"_forward": "0", "_grad_hidden": "1", "_grad_weight": "1"}, out.stdout


# --------------------------------------------------------------------------- on CUDA (scripts/gpu-check.sh)
# The same cases compiled for the GPU (no interpreter), plus shapes the interpreter cannot afford: default
# 64 x 128 x 64 blocks with partial tiles on every axis, and Qwen's 151,936-token vocabulary. The fp64
# reference runs on the same GPU. Skipped without CUDA; scripts/gpu-check.sh runs them on a lent GPU.

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not available("triton") or interpreter_requested(),
    reason="no CUDA (these run on a GPU: scripts/gpu-check.sh; or triton missing / TRITON_INTERPRET set)",
)
_LARGE = {**_BASE, "n": 1531, "h": 520, "v": 32003, "via": "dispatch", "large": True}
CUDA_CASES: dict[str, dict] = {
    **CASES,
    "fp32_large_odd_temperature": {**_LARGE, "temperature": 0.8},
    "bf16_large_odd": {**_LARGE, "dtype": "bfloat16", "bias": False},
    "bf16_qwen_vocab_entropy_grad": {**_LARGE, "n": 257, "h": 1024, "v": 151936, "dtype": "bfloat16",
                                     "upstream": ("logp", "entropy"), "temperature": 1.1},
}  # fmt: skip
# fp32 at H = 520, V = 32k: error relative to max |truth| (the absolute 1e-5 above is for small shapes).
LARGE_FP32_REL = 2e-5


@needs_cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_triton_matches_reference_cuda(name):
    case = CUDA_CASES[name]
    got = {k: v.cpu() for k, v in run_case(_triton_fn(case), case, device="cuda").items()}
    want = {
        k: v.cpu() for k, v in run_case(token_logprobs_reference, case, float64=True, device="cuda").items()
    }
    _check_against_reference(name, case, got, want, LARGE_FP32_REL if case.get("large") else None)


@needs_cuda
def test_triton_backward_is_deterministic_cuda():
    case = CUDA_CASES["bf16_large_odd"]
    first, second = (run_case(_triton_fn(case), case, device="cuda") for _ in range(2))
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical runs on CUDA"


if __name__ == "__main__":
    _worker(sys.argv[1])
