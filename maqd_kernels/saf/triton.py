"""Triton kernels of spike accumulation forwarding and their launchers.

Each launcher has the signature of its twin in ``reference``. They run on CUDA tensors, and on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before Triton is imported). Every
kernel is launched with ``enable_fp_fusion=False``: the reference rounds each operation, and so
must we to agree with it at threshold ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter
from .._library import contiguous_or_none
from .._triton_helpers import to_storage
from . import reference, tables

Tensor = torch.Tensor

# Neurons per program of the time-recurrent kernels: 8 per thread at 4 warps, so that bf16 loads
# are 16 bytes wide on the GPU and the interpreter runs few, wide programs.
_BLOCK = 1024
_ELEMENTWISE_BLOCK = 1024


@triton.jit
def _neuron_step(u, trace, decay, threshold, SPIKE_BITS: tl.constexpr):
    """One SAF step on float32 U_hat[t] and a_hat[t-1]: (spike level s[t], lambda a_hat[t-1])."""
    leaked = decay * trace
    if SPIKE_BITS > 1:
        membrane = u - threshold * leaked
        top_level = (2**SPIKE_BITS - 1) * 1.0
        spike = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(membrane, threshold)), 0.0), top_level)
    else:
        spike = tl.where(u - threshold * (leaked + 1.0) >= 0.0, 1.0, 0.0)
    return spike, leaked


@triton.jit
def _surrogate(x, alpha, half_width, SURROGATE: tl.constexpr):
    """sigma'(x): sigmoid (0), s2nn (1) or rectangle (2), as in reference.surrogate_derivative."""
    if SURROGATE == 2:
        result = tl.where(tl.abs(x) < half_width, alpha, 0.0)
    else:
        g = tl.sigmoid(alpha * x)
        result = alpha * g * (1.0 - g)
        if SURROGATE == 1:
            result = tl.where(x < 0.0, result, tl.math.div_rn(1.0, tl.maximum(x, 0.0) + 1.0))
    return result


@triton.jit
def _saf_e_derivative(u, leaked, threshold, alpha, half_width, SPIKE_BITS: tl.constexpr, SURROGATE: tl.constexpr):
    """SAF-E's da[t]/dU[t] = sum_k sigma'(m_t - kV), k = 1 .. 2^b - 1, summed in the reference's order."""
    total = _surrogate(u - threshold * (leaked + 1.0), alpha, half_width, SURROGATE)
    for k in range(2, 2**SPIKE_BITS):
        total += _surrogate(u - threshold * (leaked + k * 1.0), alpha, half_width, SURROGATE)
    return total


@triton.jit
def _initial_trace(state_ptr, offsets, mask, HAS_STATE: tl.constexpr):
    """a_hat[t0-1] in float32 for the neurons at `offsets` (any shape): the state, or zeros."""
    if HAS_STATE:
        trace = tl.load(state_ptr + offsets, mask=mask, other=0.0)
    else:
        trace = tl.full(offsets.shape, 0.0, tl.float32)
    return trace


@triton.jit
def _saf_neuron_forward_kernel(
    u_ptr,
    trace_ptr,
    state_ptr,
    count_ptr,
    upper_ptr,
    mask_ptr,
    steps,
    neurons,
    words_per_step,
    decay,
    threshold,
    HAS_STATE: tl.constexpr,
    SPIKE_BITS: tl.constexpr,
    GRAD_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program owns BLOCK neurons and walks the time axis; the trace stays in registers.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < neurons
    trace = _initial_trace(state_ptr, offsets, mask, HAS_STATE)
    spikes = tl.zeros([BLOCK], dtype=tl.int32)
    word_offsets = tl.program_id(0).to(tl.int64) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    bit_values = (1 << tl.arange(0, 32)).to(tl.uint32)
    u_ptrs = u_ptr + offsets
    trace_ptrs = trace_ptr + offsets
    for t in range(steps):
        u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
        spike, leaked = _neuron_step(u, trace, decay, threshold, SPIKE_BITS)
        trace = leaked + spike
        tl.store(trace_ptrs, to_storage(trace, trace_ptr.dtype.element_ty), mask=mask)
        spikes += tl.where(mask, spike.to(tl.int32), 0)
        if GRAD_MASK:
            inside = (trace > 0.0) & (trace < tl.load(upper_ptr + t)) & mask
            bits = tl.where(tl.reshape(inside, [BLOCK // 32, 32]), bit_values[None, :], 0)
            words = tl.sum(bits, axis=1).to(tl.int32, bitcast=True)
            tl.store(mask_ptr + t * words_per_step + word_offsets, words, mask=word_offsets < words_per_step)
        u_ptrs += neurons
        trace_ptrs += neurons
    tl.atomic_add(count_ptr, tl.sum(spikes.to(tl.int64), axis=0))


@triton.jit
def _saf_e_backward_kernel(
    grad_ptr,
    grad_trace_ptr,
    grad_count_ptr,
    u_ptr,
    state_ptr,
    steps,
    neurons,
    decay,
    threshold,
    alpha,
    half_width,
    HAS_STATE: tl.constexpr,
    SPIKE_BITS: tl.constexpr,
    SURROGATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The forward recurrence is recomputed from U_hat in registers, so that nothing but U_hat had
    # to be kept for the backward.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < neurons
    trace = _initial_trace(state_ptr, offsets, mask, HAS_STATE)
    grad_count = tl.load(grad_count_ptr)
    for t in range(steps):
        position = t * neurons + offsets
        u = tl.load(u_ptr + position, mask=mask, other=0.0).to(tl.float32)
        spike, leaked = _neuron_step(u, trace, decay, threshold, SPIKE_BITS)
        trace = leaked + spike
        derivative = _saf_e_derivative(u, leaked, threshold, alpha, half_width, SPIKE_BITS, SURROGATE)
        upstream = tl.load(grad_trace_ptr + position, mask=mask, other=0.0).to(tl.float32) + grad_count
        tl.store(grad_ptr + position, to_storage(upstream * derivative, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _saf_f_backward_kernel(
    grad_ptr,
    grad_trace_ptr,
    grad_count_ptr,
    mask_ptr,
    total,
    neurons,
    words_per_step,
    inv_threshold,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    t = offsets // neurons
    neuron = offsets % neurons
    words = tl.load(mask_ptr + t * words_per_step + neuron // 32, mask=mask, other=0)
    inside = ((words >> (neuron % 32).to(tl.int32)) & 1) != 0
    upstream = tl.load(grad_trace_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + tl.load(grad_count_ptr)
    derivative = tl.where(inside, inv_threshold, 0.0)
    tl.store(grad_ptr + offsets, to_storage(upstream * derivative, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spike_trace_kernel(
    x_ptr, trace_ptr, state_ptr, steps, neurons, decay, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < neurons
    trace = _initial_trace(state_ptr, offsets, mask, HAS_STATE)
    for t in range(steps):
        position = t * neurons + offsets
        trace = decay * trace + tl.load(x_ptr + position, mask=mask, other=0.0).to(tl.float32)
        tl.store(trace_ptr + position, to_storage(trace, trace_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _saf_readout_kernel(u_ptr, out_ptr, state_ptr, total, neurons, decay, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    first = offsets < neurons
    previous = tl.load(u_ptr + offsets - neurons, mask=mask & ~first, other=0.0).to(tl.float32)
    if HAS_STATE:
        previous = tl.where(first, tl.load(state_ptr + offsets, mask=mask & first, other=0.0), previous)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, to_storage(u - decay * previous, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _saf_linear_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    factor_ptr,
    state_ptr,
    out_ptr,
    count_ptr,
    grad_trace_ptr,
    grad_count_ptr,
    upper_ptr,
    steps,
    rows,
    features,
    inputs,
    decay,
    threshold,
    alpha,
    half_width,
    inv_threshold,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    SPIKE_BITS: tl.constexpr,
    BACKWARD: tl.constexpr,
    SAF_F: tl.constexpr,
    SURROGATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """U_hat[t] = a_in[t] W^T + b S_t one (BLOCK_M, BLOCK_N) tile at a time, with the neuron in the
    epilogue and its trace held in registers across the time loop: U_hat never reaches memory.
    Forward writes a_hat and the spike count; BACKWARD recomputes U_hat the same way and writes
    dL/dU_hat (in the storage dtype) for the two gradient matmuls."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_range = tl.arange(0, BLOCK_K)
    row_ok, col_ok = row < rows, col < features
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile = row[:, None] * features + col[None, :]
    trace = _initial_trace(state_ptr, tile, tile_ok, HAS_STATE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    spikes = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if BACKWARD:
        grad_count = tl.load(grad_count_ptr)
    for t in range(steps):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        a_rows = a_ptr + (t * rows + row)[:, None] * inputs
        for k0 in range(0, inputs, BLOCK_K):
            k = k0 + k_range
            k_ok = k < inputs
            a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + col[None, :] * inputs + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        u = acc
        if HAS_BIAS:
            u = u + bias[None, :] * tl.load(factor_ptr + t)
        spike, leaked = _neuron_step(u, trace, decay, threshold, SPIKE_BITS)
        trace = leaked + spike
        position = t * rows * features + tile
        if BACKWARD:
            if SAF_F:
                inside = (trace > 0.0) & (trace < tl.load(upper_ptr + t))
                derivative = tl.where(inside, inv_threshold, 0.0)
            else:
                derivative = _saf_e_derivative(u, leaked, threshold, alpha, half_width, SPIKE_BITS, SURROGATE)
            upstream = tl.load(grad_trace_ptr + position, mask=tile_ok, other=0.0).to(tl.float32) + grad_count
            tl.store(out_ptr + position, to_storage(upstream * derivative, out_ptr.dtype.element_ty), mask=tile_ok)
        else:
            tl.store(out_ptr + position, to_storage(trace, out_ptr.dtype.element_ty), mask=tile_ok)
            spikes += tl.where(tile_ok, spike.to(tl.int32), 0)
    if not BACKWARD:
        tl.atomic_add(count_ptr, tl.sum(tl.sum(spikes.to(tl.int64), axis=1), axis=0))


def saf_neuron_forward(
    u_hat: Tensor,
    state: Tensor | None,
    decay: float,
    threshold: float,
    spike_bits: int,
    step: int = 0,
    grad_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """SAF neuron forward: (a_hat in u_hat's dtype, spike count as float32, SAF-F gradient mask)."""
    u = u_hat.contiguous()
    steps, neurons = u.shape[0], tables.neurons(u)
    trace = torch.empty_like(u)
    count = torch.zeros((), dtype=torch.int64, device=u.device)
    words = reference.mask_words(neurons)
    mask = torch.empty((steps, words), dtype=torch.int32, device=u.device) if grad_mask else None
    if neurons and steps:
        initial = tables.float32_state(state, u)
        upper = tables.saf_f_upper_bounds(decay, step, steps, spike_bits, u.device) if grad_mask else count
        _saf_neuron_forward_kernel[(triton.cdiv(neurons, _BLOCK),)](
            u,
            trace,
            initial if initial is not None else u,
            count,
            upper,
            mask if mask is not None else count,
            steps,
            neurons,
            words,
            decay,
            threshold,
            HAS_STATE=initial is not None,
            SPIKE_BITS=spike_bits,
            GRAD_MASK=grad_mask,
            BLOCK=_BLOCK,
            enable_fp_fusion=False,
        )
    return trace, count.to(torch.float32), mask if mask is not None else reference.no_grad_mask(u.device)


def saf_neuron_backward(
    grad_trace: Tensor,
    grad_count: Tensor,
    u_hat: Tensor | None,
    grad_mask: Tensor | None,
    state: Tensor | None,
    decay: float,
    threshold: float,
    mode: str,
    surrogate: str,
    alpha: float,
    spike_bits: int,
) -> Tensor:
    """dL/dU_hat in grad_trace's dtype: SAF-F from the bit mask alone (elementwise), SAF-E by
    recomputing the trace from u_hat."""
    g = grad_trace.contiguous()
    grad = torch.empty_like(g)
    steps, neurons = g.shape[0], tables.neurons(g)
    if not (steps and neurons):
        return grad
    upstream_count = grad_count.to(device=g.device, dtype=torch.float32).reshape(1)
    if mode == "saf_f":
        total = g.numel()
        _saf_f_backward_kernel[(triton.cdiv(total, _ELEMENTWISE_BLOCK),)](
            grad,
            g,
            upstream_count,
            grad_mask.contiguous(),
            total,
            neurons,
            reference.mask_words(neurons),
            reference.round_to(torch.float32, 1.0 / reference.round_to(torch.float32, threshold)),
            BLOCK=_ELEMENTWISE_BLOCK,
            enable_fp_fusion=False,
        )
        return grad
    u = u_hat.contiguous()
    initial = tables.float32_state(state, u)
    _saf_e_backward_kernel[(triton.cdiv(neurons, _BLOCK),)](
        grad,
        g,
        upstream_count,
        u,
        initial if initial is not None else u,
        steps,
        neurons,
        decay,
        threshold,
        alpha,
        reference.round_to(torch.float32, 0.5 / alpha),
        HAS_STATE=initial is not None,
        SPIKE_BITS=spike_bits,
        SURROGATE=reference.SURROGATE_CODES[surrogate],
        BLOCK=_BLOCK,
        enable_fp_fusion=False,
    )
    return grad


def spike_trace_forward(x: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """a_hat[t] = lambda a_hat[t-1] + x[t] in x's dtype."""
    xc = x.contiguous()
    trace = torch.empty_like(xc)
    steps, neurons = xc.shape[0], tables.neurons(xc)
    if steps and neurons:
        initial = tables.float32_state(state, xc)
        _spike_trace_kernel[(triton.cdiv(neurons, _BLOCK),)](
            xc,
            trace,
            initial if initial is not None else xc,
            steps,
            neurons,
            decay,
            HAS_STATE=initial is not None,
            BLOCK=_BLOCK,
            enable_fp_fusion=False,
        )
    return trace


def saf_readout_forward(u_hat: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """o[t] = U_hat[t] - lambda U_hat[t-1] in u_hat's dtype."""
    u = u_hat.contiguous()
    out = torch.empty_like(u)
    neurons = tables.neurons(u)
    if u.numel():
        initial = tables.float32_state(state, u)
        _saf_readout_kernel[(triton.cdiv(u.numel(), _ELEMENTWISE_BLOCK),)](
            u,
            out,
            initial if initial is not None else u,
            u.numel(),
            neurons,
            decay,
            HAS_STATE=initial is not None,
            BLOCK=_ELEMENTWISE_BLOCK,
            enable_fp_fusion=False,
        )
    return out


def _saf_linear_launch(
    a_in: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    state: Tensor | None,
    decay: float,
    threshold: float,
    spike_bits: int,
    step: int,
    backward: tuple[Tensor, Tensor, str, str, float] | None,
) -> tuple[Tensor, Tensor]:
    """Runs the fused kernel: the forward (a_hat, count), or with backward = (grad_trace,
    grad_count, mode, surrogate, alpha) the recomputation that yields (dL/dU_hat, count unused)."""
    steps, features, inputs = a_in.shape[0], weight.shape[0], weight.shape[1]
    rows = a_in.shape[1:-1].numel()
    a = a_in.reshape(steps, rows, inputs).contiguous()
    w = weight.contiguous()
    bias = contiguous_or_none(bias)
    out = a.new_empty((steps, rows, features))
    count = torch.zeros((), dtype=torch.int64, device=a.device)
    if steps and rows and features:
        initial = None
        if state is not None:
            initial = state.to(torch.float32).expand(*a_in.shape[1:-1], features).reshape(rows, features).contiguous()
        factors = tables.bias_factors(decay, step, steps, a.device)
        upper = tables.saf_f_upper_bounds(decay, step, steps, spike_bits, a.device)
        grad_trace, grad_count, mode, surrogate, alpha = backward or (None, None, "saf_e", "sigmoid", 1.0)
        if grad_trace is not None:
            grad_trace = grad_trace.reshape(steps, rows, features).contiguous()
            grad_count = grad_count.to(device=a.device, dtype=torch.float32).reshape(1)
        # The batch rows of one tile share each weight tile across every time step; 64 x 64
        # tiles keep the trace and the accumulator at 32 registers each per thread.
        block_m = 64 if rows > 32 else (32 if rows > 16 else 16)
        block_n = 64 if features > 32 else (32 if features > 16 else 16)
        block_k = 32 if inputs > 16 else 16
        grid = (triton.cdiv(rows, block_m), triton.cdiv(features, block_n))
        _saf_linear_kernel[grid](
            a,
            w,
            bias if bias is not None else w,
            factors,
            initial if initial is not None else factors,
            out,
            count,
            grad_trace if grad_trace is not None else out,
            grad_count if grad_count is not None else factors,
            upper,
            steps,
            rows,
            features,
            inputs,
            decay,
            threshold,
            alpha,
            reference.round_to(torch.float32, 0.5 / alpha),
            reference.round_to(torch.float32, 1.0 / reference.round_to(torch.float32, threshold)),
            HAS_BIAS=bias is not None,
            HAS_STATE=initial is not None,
            SPIKE_BITS=spike_bits,
            BACKWARD=backward is not None,
            SAF_F=mode == "saf_f",
            SURROGATE=reference.SURROGATE_CODES[surrogate],
            # float32 operands must not be rounded to tf32. The interpreter multiplies bf16 by its raw
            # bits, so there the operands go in as float32 (their products are exact either way).
            UPCAST=a.dtype == torch.float32 or triton_interpreter(),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            enable_fp_fusion=False,
        )
    return out.reshape(*a_in.shape[:-1], features), count


def saf_linear_forward(
    a_in: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    state: Tensor | None,
    decay: float,
    threshold: float,
    spike_bits: int,
    step: int,
) -> tuple[Tensor, Tensor]:
    """The fused SAF layer: (a_hat in a_in's dtype, spike count as float32)."""
    trace, count = _saf_linear_launch(a_in, weight, bias, state, decay, threshold, spike_bits, step, None)
    return trace, count.to(torch.float32)


def saf_linear_backward(
    grad_trace: Tensor,
    grad_count: Tensor,
    a_in: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    state: Tensor | None,
    decay: float,
    threshold: float,
    mode: str,
    surrogate: str,
    alpha: float,
    spike_bits: int,
    step: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dL/da_in, dL/dW, dL/db): the fused kernel recomputes U_hat and writes dL/dU_hat in a_in's
    dtype, then two matmuls (cuBLAS on the GPU) take it to the input and the weight."""
    grad_u, _ = _saf_linear_launch(
        a_in, weight, bias, state, decay, threshold, spike_bits, step, (grad_trace, grad_count, mode, surrogate, alpha)
    )
    flat_grad_u = grad_u.reshape(-1, weight.shape[0])
    grad_a_in = grad_u @ weight
    grad_weight = flat_grad_u.T @ a_in.reshape(-1, weight.shape[1])
    grad_bias = None
    if bias is not None:
        factors = tables.bias_factors(decay, step, a_in.shape[0], a_in.device)
        grad_bias = (grad_u.float() * factors.view(-1, *[1] * (grad_u.dim() - 1))).reshape(-1, weight.shape[0])
        grad_bias = grad_bias.sum(0).to(bias.dtype)
    return grad_a_in, grad_weight, grad_bias
