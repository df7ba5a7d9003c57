"""Triton implementation of ``token_logprobs`` (forward + backward, entropy, fp32 accumulation).

Selected by :func:`unipost.kernels.logprobs.token_logprobs` with ``backend="auto"`` when the tensors are
on CUDA and triton imports, or explicitly with ``backend="triton"``. On CPU it runs only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before Python starts), which is how the tests verify it against
the plain-PyTorch reference. Importing this package does not import triton; launching a kernel does.
"""

from unipost.kernels.triton.function import (
    DEFAULT_BLOCKS,
    TritonBackendError,
    interpreter_requested,
    token_logprobs_triton,
    triton_runnable,
)

__all__ = [
    "DEFAULT_BLOCKS",
    "TritonBackendError",
    "interpreter_requested",
    "token_logprobs_triton",
    "triton_runnable",
]
