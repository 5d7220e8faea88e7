"""Triton kernels of spike accumulation forwarding and their launchers.

Each launcher has the signature of its twin in ``reference``. They run on CUDA tensors, and on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before Triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_helpers import to_storage

Tensor = torch.Tensor

_BLOCK = 256


@triton.jit
def _saf_neuron_forward_kernel(
    u_ptr,
    trace_ptr,
    state_ptr,
    count_ptr,
    steps,
    neurons,
    decay,
    threshold,
    top_level,
    HAS_STATE: tl.constexpr,
    MULTI_BIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program owns BLOCK neurons and walks the time axis; the trace stays in registers.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < neurons
    if HAS_STATE:
        trace = tl.load(state_ptr + offsets, mask=mask, other=0.0)
    else:
        trace = tl.zeros([BLOCK], dtype=tl.float32)
    spikes = tl.zeros([BLOCK], dtype=tl.int64)
    u_ptrs = u_ptr + offsets
    trace_ptrs = trace_ptr + offsets
    for _ in range(steps):
        u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
        leaked = decay * trace
        if MULTI_BIT:
            membrane = u - threshold * leaked
            spike = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(membrane, threshold)), 0.0), top_level)
        else:
            spike = tl.where(u - threshold * (leaked + 1.0) >= 0.0, 1.0, 0.0)
        trace = leaked + spike
        tl.store(trace_ptrs, to_storage(trace, trace_ptr.dtype.element_ty), mask=mask)
        spikes += tl.where(mask, spike.to(tl.int64), 0)
        u_ptrs += neurons
        trace_ptrs += neurons
    tl.atomic_add(count_ptr, tl.sum(spikes, axis=0))


def saf_neuron_forward(
    u_hat: Tensor, state: Tensor | None, decay: float, threshold: float, spike_bits: int
) -> tuple[Tensor, Tensor]:
    """SAF neuron forward: (a_hat in u_hat's dtype, spike count as float32)."""
    u = u_hat.contiguous()
    steps = u.shape[0]
    neurons = u[0].numel() if steps else 0
    trace = torch.empty_like(u)
    count = torch.zeros((), dtype=torch.int64, device=u.device)
    if neurons == 0 or steps == 0:
        return trace, count.to(torch.float32)
    initial = None if state is None else state.to(torch.float32).expand(u.shape[1:]).contiguous()
    grid = (triton.cdiv(neurons, _BLOCK),)
    # No fused multiply-adds: the reference rounds each operation, and so must we to agree at ties.
    _saf_neuron_forward_kernel[grid](
        u,
        trace,
        initial if initial is not None else u,
        count,
        steps,
        neurons,
        decay,
        threshold,
        float(2**spike_bits - 1),
        HAS_STATE=initial is not None,
        MULTI_BIT=spike_bits > 1,
        BLOCK=_BLOCK,
        enable_fp_fusion=False,
    )
    return trace, count.to(torch.float32)
