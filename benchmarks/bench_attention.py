"""attention: softmax(scale·q·kᵀ)·v on the SD UNet's and VAE's attention shapes.

Peers: ``eager`` is ``F.scaled_dot_product_attention`` with torch's own choice of kernel (what
diffusers calls), ``compile`` its ``torch.compile``; ``sdpa_<kernel>`` pins one SDPA kernel (flash,
efficient, cudnn), where that kernel takes the case. Work: 4·N·M·D FLOPs per head; bytes: q, k, v read
and the output written once.
"""
import pytest
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashstep import ops

import shapes

SDPA_KERNELS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}


def sdpa(q, k, v):
    """q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D)."""
    return F.scaled_dot_product_attention(q, k, v)


def pinned_sdpa(kernel, q, k, v):
    """``sdpa`` restricted to one SDPA kernel; skips the benchmark where that kernel cannot run the case."""
    try:
        with sdpa_kernel(SDPA_KERNELS[kernel]):
            return sdpa(q, k, v)
    except RuntimeError as error:
        pytest.skip(f"{kernel} does not take this case here: {str(error).strip().splitlines()[0]}")


@pytest.mark.op("attention", peers=tuple(SDPA_KERNELS))
@pytest.mark.parametrize("shape", shapes.ATTENTION, ids=shapes.name_of)
def test_attention(shape, backend, op_benchmark):
    q = op_benchmark.tensor(shape.batch, shape.heads, shape.queries, shape.head_dim)
    k = op_benchmark.tensor(shape.batch, shape.heads, shape.keys, shape.head_dim)
    v = op_benchmark.tensor(shape.batch, shape.heads, shape.keys, shape.head_dim)
    work = {"flops": shape.flops(), "bytes_moved": shape.bytes_moved(op_benchmark.dtype.itemsize)}
    ours = lambda name: ops.attention(q, k, v, backend=name)  # noqa: E731
    if backend not in SDPA_KERNELS:
        op_benchmark.run(shape, backend, ours=ours, eager=sdpa, args=(q, k, v), **work)
        return
    op_benchmark.run_call(shape, backend, lambda: pinned_sdpa(backend, q, k, v), lambda: ours("torch"), **work)
