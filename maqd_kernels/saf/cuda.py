"""Launchers of the hand-written SAF kernels in csrc/saf.cu: checks, output allocation, stream.

Each launcher has the signature of its twin in ``reference``. The ``*_host`` variants run the
kernels' per-neuron math (the __host__ __device__ functions of csrc/saf.cuh) on CPU tensors: CI,
which has no GPU, tests the CUDA math through them.
"""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPE_CODES
from .._cuda_launch import _check, _launch, _ptr
from . import reference, tables

Tensor = torch.Tensor

# Surrogate codes shared with csrc/saf.cuh (Surrogate).


def _saf_neuron_forward(
    u_hat: Tensor,
    state: Tensor | None,
    decay: float,
    threshold: float,
    spike_bits: int,
    step: int,
    grad_mask: bool,
    on_host: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check("u_hat", u_hat, on_host)
    u = u_hat.contiguous()
    steps, neurons = u.shape[0], tables.neurons(u)
    trace = torch.empty_like(u)
    count = torch.zeros((), dtype=torch.int64, device=u.device)
    initial = tables.float32_state(state, u)
    mask = upper = None
    if grad_mask:
        # The host twin sets bits in a zeroed mask; the kernel writes every word itself.
        allocate = torch.zeros if on_host else torch.empty
        mask = allocate((steps, reference.mask_words(neurons)), dtype=torch.int32, device=u.device)
        upper = tables.saf_f_upper_bounds(decay, step, steps, spike_bits, u.device)
    _launch(
        "saf_neuron_forward",
        on_host,
        u.device,
        u.data_ptr(),
        trace.data_ptr(),
        _ptr(initial),
        _ptr(upper),
        _ptr(mask),
        count.data_ptr(),
        steps,
        neurons,
        FLOAT_DTYPE_CODES[u.dtype],
        decay,
        threshold,
        spike_bits,
    )
    return trace, count.to(torch.float32), mask if mask is not None else reference.no_grad_mask(u.device)


def saf_neuron_forward(
    u_hat: Tensor,
    state: Tensor | None,
    decay: float,
    threshold: float,
    spike_bits: int,
    step: int = 0,
    grad_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """SAF neuron forward on the GPU: (a_hat in u_hat's dtype, spike count as float32, SAF-F
    gradient mask as ``reference.pack_bits`` lays it out, or ``reference.no_grad_mask``)."""
    return _saf_neuron_forward(u_hat, state, decay, threshold, spike_bits, step, grad_mask, on_host=False)


def saf_neuron_forward_host(
    u_hat: Tensor,
    state: Tensor | None,
    decay: float,
    threshold: float,
    spike_bits: int,
    step: int = 0,
    grad_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The same per-neuron CUDA math run on CPU tensors (for tests without a GPU)."""
    return _saf_neuron_forward(u_hat, state, decay, threshold, spike_bits, step, grad_mask, on_host=True)


def _saf_neuron_backward(
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
    on_host: bool,
) -> Tensor:
    _check("grad_trace", grad_trace, on_host)
    g = grad_trace.contiguous()
    steps, neurons = g.shape[0], tables.neurons(g)
    # Read by the kernel on the device, so a gradient still being computed costs no host sync.
    count_grad = grad_count.to(device=g.device, dtype=torch.float32)
    if mode == "saf_f":
        if (
            grad_mask is None
            or grad_mask.dtype != torch.int32
            or grad_mask.shape != (steps, reference.mask_words(neurons))
        ):
            raise ValueError(
                f"saf_f needs the forward's int32 gradient mask of shape {(steps, reference.mask_words(neurons))}, got "
                f"{None if grad_mask is None else (grad_mask.dtype, tuple(grad_mask.shape))}"
            )
        mask = grad_mask.to(g.device).contiguous()
        grad = torch.empty_like(g)
        _launch(
            "saf_f_backward",
            on_host,
            g.device,
            g.data_ptr(),
            count_grad.data_ptr(),
            mask.data_ptr(),
            grad.data_ptr(),
            steps,
            neurons,
            FLOAT_DTYPE_CODES[g.dtype],
            threshold,
        )
        return grad
    if mode != "saf_e":
        raise ValueError(f"mode must be 'saf_e' or 'saf_f'; got {mode!r}")
    if surrogate not in reference.SURROGATE_CODES:
        raise ValueError(f"surrogate must be 'sigmoid', 's2nn' or 'rectangle'; got {surrogate!r}")
    _check("u_hat", u_hat, on_host)
    if u_hat.shape != grad_trace.shape:
        raise ValueError(f"u_hat has shape {tuple(u_hat.shape)}, grad_trace {tuple(grad_trace.shape)}")
    u = u_hat.contiguous()
    if u.dtype != g.dtype:
        # A kernel reads one storage dtype; float32 holds either exactly and the math is float32 anyway.
        u, g = u.float(), g.float()
    grad = torch.empty_like(g)
    initial = tables.float32_state(state, u)
    _launch(
        "saf_e_backward",
        on_host,
        g.device,
        g.data_ptr(),
        count_grad.data_ptr(),
        u.data_ptr(),
        _ptr(initial),
        grad.data_ptr(),
        steps,
        neurons,
        FLOAT_DTYPE_CODES[g.dtype],
        decay,
        threshold,
        spike_bits,
        reference.SURROGATE_CODES[surrogate],
        alpha,
        reference.round_to(torch.float32, 0.5 / alpha),
    )
    return grad.to(grad_trace.dtype)


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
    """dL/dU_hat on the GPU, in grad_trace's dtype: SAF-F from the forward's gradient mask alone
    (u_hat and state unused), SAF-E by recomputing the trace from u_hat and state (grad_mask unused)."""
    return _saf_neuron_backward(
        grad_trace, grad_count, u_hat, grad_mask, state, decay, threshold, mode, surrogate, alpha, spike_bits, False
    )


def saf_neuron_backward_host(
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
    """The same per-neuron CUDA math run on CPU tensors (for tests without a GPU)."""
    return _saf_neuron_backward(
        grad_trace, grad_count, u_hat, grad_mask, state, decay, threshold, mode, surrogate, alpha, spike_bits, True
    )


def _recurrence(entry: str, x: Tensor, state: Tensor | None, decay: float, on_host: bool) -> Tensor:
    """Runs spike_trace_forward or saf_readout_forward, which share their arguments."""
    _check("u_hat" if entry == "saf_readout_forward" else "x", x, on_host)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    initial = tables.float32_state(state, xc)
    _launch(
        entry,
        on_host,
        xc.device,
        xc.data_ptr(),
        out.data_ptr(),
        _ptr(initial),
        xc.shape[0],
        tables.neurons(xc),
        FLOAT_DTYPE_CODES[xc.dtype],
        decay,
    )
    return out


def spike_trace_forward(x: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """a_hat[t] = lambda a_hat[t-1] + x[t] on the GPU, in x's dtype."""
    return _recurrence("spike_trace_forward", x, state, decay, on_host=False)


def spike_trace_forward_host(x: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """The same per-neuron CUDA math run on CPU tensors (for tests without a GPU)."""
    return _recurrence("spike_trace_forward", x, state, decay, on_host=True)


def saf_readout_forward(u_hat: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """o[t] = U_hat[t] - lambda U_hat[t-1] on the GPU, in u_hat's dtype."""
    return _recurrence("saf_readout_forward", u_hat, state, decay, on_host=False)


def saf_readout_forward_host(u_hat: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """The same per-element CUDA math run on CPU tensors (for tests without a GPU)."""
    return _recurrence("saf_readout_forward", u_hat, state, decay, on_host=True)
