"""Triton helpers shared by the kernels of every family."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """float32 `x` rounded to nearest-even into the storage dtype `dtype`.

    bfloat16 is rounded by hand: the GPU's conversion is round-to-nearest-even, but the Triton
    interpreter (which CI runs) truncates, and both must agree with PyTorch bit for bit."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
