"""Spike accumulation forwarding in eager PyTorch: the executable form of SPEC.md section 1.

Saiin et al., "Spike Accumulation Forwarding for Effective Training of SNNs" (TMLR 2024,
arXiv 2310.02772); the OTTT baselines follow Xiao et al. (NeurIPS 2022, arXiv 2210.04195).

Arithmetic runs in float32 (float64 for float64 inputs), one rounding per operation, and every
constant is rounded to that precision first, so the kernels, which do the same, agree with this
file bit for bit except at exact threshold ties. Tensors are time-first, (T, ...).
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_to(dtype: torch.dtype, value: float) -> float:
    """`value` rounded to `dtype` (float32 or float64), as a Python float."""
    if dtype == torch.float64:
        return float(value)
    return struct.unpack("f", struct.pack("f", value))[0]


class _BiasFactorTable:
    """S_t = lambda S_{t-1} + 1, S_{-1} = 0, by the same rounded recurrence as the kernels.

    Streaming calls ask for S at ever larger t, so values are kept per (decay, dtype) and the
    recurrence stops at its fixed point, after which S_t is constant."""

    def __init__(self, decay: float, dtype: torch.dtype):
        self.dtype = dtype
        self.decay = round_to(dtype, decay)
        self.values: list[float] = []
        self.converged = False

    def __getitem__(self, t: int) -> float:
        if t < 0:
            return 0.0
        if self.decay == 1.0:
            # S_t = t + 1 counts up until the format can no longer add one.
            return float(min(t + 1, 2 ** (24 if self.dtype != torch.float64 else 53)))
        while not self.converged and len(self.values) <= t:
            previous = self.values[-1] if self.values else 0.0
            following = round_to(self.dtype, round_to(self.dtype, self.decay * previous) + 1.0)
            self.converged = following == previous
            if not self.converged:
                self.values.append(following)
        return self.values[min(t, len(self.values) - 1)]


_BIAS_FACTOR_TABLES: dict[tuple[float, torch.dtype], _BiasFactorTable] = {}


def bias_factor(decay: float, t: int, dtype: torch.dtype = torch.float32) -> float:
    """S_t of SPEC.md section 1 (S_{-1} = 0) in the precision of `dtype`."""
    dtype = compute_dtype(dtype)
    table = _BIAS_FACTOR_TABLES.get((decay, dtype))
    if table is None:
        table = _BIAS_FACTOR_TABLES[(decay, dtype)] = _BiasFactorTable(decay, dtype)
    return table[t]


def steady_step(decay: float, step: int, steps: int) -> int:
    """A step s <= `step` with S_{s+t} = S_{step+t} for t < steps (float32): `step` itself, or the
    first index of the fixed point once the recurrence has reached it, so that all later windows
    of the same length are the same window."""
    if steps:
        bias_factor(decay, step + steps - 1)
    table = _BIAS_FACTOR_TABLES.get((decay, torch.float32))
    if table is None or not table.converged:
        return step
    return min(step, len(table.values))


def bias_factors(decay: float, step: int, steps: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """S_step, ..., S_{step+steps-1} as a (steps,) tensor of the compute dtype of `dtype`."""
    cdt = compute_dtype(dtype)
    return torch.tensor([bias_factor(decay, step + t, cdt) for t in range(steps)], dtype=cdt, device=device)


# Numbers of the surrogates in the kernels (csrc/saf.cuh, triton.py).
SURROGATE_CODES = {"sigmoid": 0, "s2nn": 1, "rectangle": 2}


def surrogate_derivative(x: Tensor, surrogate: str, alpha: float) -> Tensor:
    """sigma'(x) of the spike function H (SPEC.md section 1)."""
    if surrogate == "sigmoid":
        g = torch.sigmoid(alpha * x)
        return alpha * g * (1.0 - g)
    if surrogate == "s2nn":
        g = torch.sigmoid(alpha * x)
        return torch.where(x < 0, alpha * g * (1.0 - g), 1.0 / (x.clamp(min=0.0) + 1.0))
    if surrogate == "rectangle":
        return alpha * (x.abs() < round_to(x.dtype, 0.5 / alpha)).to(x.dtype)
    raise ValueError(f"surrogate must be 'sigmoid', 's2nn' or 'rectangle'; got {surrogate!r}")


def _initial(state: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if state is None else state.to(like.dtype).expand_as(like)


def _saf_step(
    u_t: Tensor, trace: Tensor, lam: float, threshold: float, spike_bits: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One SAF step: (spike s[t], trace a_hat[t], leaked lambda a_hat[t-1])."""
    leaked = lam * trace
    if spike_bits == 1:
        spike = (u_t - threshold * (leaked + 1.0) >= 0).to(u_t.dtype)
    else:
        spike = torch.clamp(torch.floor((u_t - threshold * leaked) / threshold), 0, 2**spike_bits - 1)
    return spike, leaked + spike, leaked


def saf_f_upper_bounds(decay: float, step: int, steps: int, spike_bits: int, dtype: torch.dtype) -> Tensor:
    """(2^b - 1) S_t for t = step .. step + steps - 1, rounded to the compute dtype: SAF-F's upper
    bound on a_hat[t], reached exactly when the neuron fired its top level at every step."""
    cdt = compute_dtype(dtype)
    top_level = 2**spike_bits - 1
    return torch.tensor([round_to(cdt, top_level * bias_factor(decay, step + t, cdt)) for t in range(steps)], dtype=cdt)


WORD_BITS = 32


def mask_words(neurons: int) -> int:
    """Words per step of the packed SAF-F mask: ceil(neurons / 32)."""
    return -(-neurons // WORD_BITS)


def pack_bits(mask: Tensor) -> Tensor:
    """(T, *) bool -> (T, ceil(n / 32)) int32, n = mask.shape[1:].numel(): bit j of word w of row t is
    neuron 32 w + j at step t. The layout of SAF-F's saved gradient mask, shared by every backend."""
    flat = mask.reshape(mask.shape[0], mask.shape[1:].numel()).to(torch.int64)
    words = mask_words(flat.shape[1])
    flat = F.pad(flat, (0, words * WORD_BITS - flat.shape[1])).view(mask.shape[0], words, WORD_BITS)
    packed = (flat << torch.arange(WORD_BITS, device=mask.device)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_bits(words: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The inverse of ``pack_bits``: a bool tensor of `shape`."""
    bits = (words.to(torch.int64).unsqueeze(-1) >> torch.arange(WORD_BITS, device=words.device)) & 1
    neurons = torch.Size(shape[1:]).numel()
    return bits.reshape(shape[0], words.shape[1] * WORD_BITS)[:, :neurons].reshape(shape).bool()


def no_grad_mask(device: torch.device | str) -> Tensor:
    """What the forward returns in place of the SAF-F gradient mask when none was asked for."""
    return torch.empty(0, dtype=torch.int32, device=device)


def saf_neuron_forward(
    u_hat: Tensor,
    state: Tensor | None,
    decay: float,
    threshold: float,
    spike_bits: int,
    step: int = 0,
    grad_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """a_hat[t] = lambda a_hat[t-1] + s[t]; returns (a_hat in u_hat's dtype, spike count, mask).

    With grad_mask, mask is SAF-F's derivative support 1[0 < a_hat[t] < (2^b - 1) S_{step+t}]
    (float32 a_hat, before rounding to u_hat's dtype), bit-packed by ``pack_bits``: all that SAF-F's
    backward needs, one bit per neuron and step. Without it, an empty int32 tensor."""
    cdt = compute_dtype(u_hat.dtype)
    u = u_hat.to(cdt)
    lam, threshold = round_to(cdt, decay), round_to(cdt, threshold)
    out = torch.empty_like(u)
    inside = torch.empty(u.shape, dtype=torch.bool, device=u.device) if grad_mask else None
    upper = saf_f_upper_bounds(decay, step, u.shape[0], spike_bits, cdt).tolist() if grad_mask else None
    trace = _initial(state, u[0]) if u.shape[0] else None
    count = torch.zeros((), dtype=torch.float64, device=u.device)
    for t in range(u.shape[0]):
        spike, trace, _ = _saf_step(u[t], trace, lam, threshold, spike_bits)
        out[t] = trace
        count += spike.sum(dtype=torch.float64)
        if grad_mask:
            inside[t] = (trace > 0) & (trace < upper[t])
    mask = pack_bits(inside) if grad_mask else no_grad_mask(u.device)
    return out.to(u_hat.dtype), count.to(cdt), mask


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
    """dL/dU_hat in grad_trace's dtype; the spike count's gradient joins the trace's (each spike's
    upstream gradient).

    SAF-E (needs u_hat and state): a_hat[t-1] detached, da[t]/dU[t] = sum_k sigma'(m_t - kV), the
    trace recomputed from u_hat. SAF-F (needs only grad_mask from the forward):
    da[t]/dU[t] = 1[0 < a_hat[t] < (2^b - 1) S_t] / V."""
    cdt = compute_dtype(grad_trace.dtype)
    lam, v = round_to(cdt, decay), round_to(cdt, threshold)
    upstream = grad_trace.to(cdt) + grad_count.to(cdt)
    if mode == "saf_f":
        inside = unpack_bits(grad_mask, grad_trace.shape)
        return (upstream * (inside.to(cdt) / v)).to(grad_trace.dtype)
    u = u_hat.to(cdt)
    grad = torch.empty_like(u)
    trace = _initial(state, u[0]) if u.shape[0] else None
    for t in range(u.shape[0]):
        _, trace, leaked = _saf_step(u[t], trace, lam, v, spike_bits)
        derivative = sum(
            surrogate_derivative(u[t] - v * (leaked + float(k)), surrogate, alpha) for k in range(1, 2**spike_bits)
        )
        grad[t] = upstream[t] * derivative
    return grad.to(grad_trace.dtype)


def spike_trace_forward(x: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """a_hat[t] = lambda a_hat[t-1] + x[t]."""
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    lam = round_to(cdt, decay)
    out = torch.empty_like(xc)
    trace = _initial(state, xc[0]) if xc.shape[0] else None
    for t in range(xc.shape[0]):
        trace = lam * trace + xc[t]
        out[t] = trace
    return out.to(x.dtype)


def saf_readout_forward(u_hat: Tensor, state: Tensor | None, decay: float) -> Tensor:
    """o[t] = U_hat[t] - lambda U_hat[t-1] (= W s[t] + b), U_hat[-1] = state."""
    cdt = compute_dtype(u_hat.dtype)
    u = u_hat.to(cdt)
    if u.shape[0] == 0:
        return u_hat.clone()
    previous = torch.cat([_initial(state, u[0]).unsqueeze(0), u[:-1]])
    return (u - round_to(cdt, decay) * previous).to(u_hat.dtype)


def _linear_u_hat(a_in: Tensor, weight: Tensor, bias: Tensor | None, decay: float, step: int) -> Tensor:
    """U_hat[t] = W a_in[t] + b S_t in the compute dtype."""
    cdt = compute_dtype(a_in.dtype)
    u = F.linear(a_in.to(cdt), weight.to(cdt))
    if bias is not None:
        s = bias_factors(decay, step, a_in.shape[0], cdt, a_in.device).view(-1, *[1] * (u.dim() - 1))
        u = u + bias.to(cdt) * s
    return u


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
    """saf_neuron(a_in @ W^T + b S_t); returns (a_hat in a_in's dtype, spike count)."""
    trace, count, _ = saf_neuron_forward(
        _linear_u_hat(a_in, weight, bias, decay, step), state, decay, threshold, spike_bits
    )
    return trace.to(a_in.dtype), count


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
    """(dL/da_in, dL/dW, dL/db) through U_hat = W a_in + b S_t and the neuron's backward."""
    cdt = compute_dtype(a_in.dtype)
    u = _linear_u_hat(a_in, weight, bias, decay, step)
    mask = (
        saf_neuron_forward(u, state, decay, threshold, spike_bits, step, grad_mask=True)[2] if mode == "saf_f" else None
    )
    grad_u = saf_neuron_backward(
        grad_trace.to(cdt), grad_count, u, mask, state, decay, threshold, mode, surrogate, alpha, spike_bits
    )
    grad_a_in = (grad_u @ weight.to(cdt)).to(a_in.dtype)
    grad_weight = (grad_u.reshape(-1, weight.shape[0]).T @ a_in.to(cdt).reshape(-1, weight.shape[1])).to(weight.dtype)
    grad_bias = None
    if bias is not None:
        s = bias_factors(decay, step, a_in.shape[0], cdt, a_in.device).view(-1, *[1] * (u.dim() - 1))
        grad_bias = (grad_u * s).reshape(-1, weight.shape[0]).sum(0).to(bias.dtype)
    return grad_a_in, grad_weight, grad_bias


def lif_forward(current: Tensor, decay: float, threshold: float) -> tuple[Tensor, Tensor]:
    """The soft-reset LIF layer: u[t] = lambda (u[t-1] - V s[t-1]) + I[t], s[t] = H(u[t] - V).
    Returns (spikes in current's dtype, membranes u in the compute dtype)."""
    cdt = compute_dtype(current.dtype)
    i = current.to(cdt)
    lam, v = round_to(cdt, decay), round_to(cdt, threshold)
    spikes, membranes = torch.empty_like(i), torch.empty_like(i)
    u = torch.zeros_like(i[0]) if i.shape[0] else None
    s = torch.zeros_like(u) if u is not None else None
    for t in range(i.shape[0]):
        u = lam * (u - v * s) + i[t]
        s = (u - v >= 0).to(cdt)
        spikes[t], membranes[t] = s, u
    return spikes.to(current.dtype), membranes


def lif_bptt_backward(
    grad_spikes: Tensor, current: Tensor, decay: float, threshold: float, surrogate: str, alpha: float
) -> Tensor:
    """dL/dI through time (BPTT), the reset included: du[t+1]/du[t] = lambda, du[t+1]/ds[t] = -lambda V."""
    cdt = compute_dtype(current.dtype)
    _, membranes = lif_forward(current, decay, threshold)
    lam, v = round_to(cdt, decay), round_to(cdt, threshold)
    g = grad_spikes.to(cdt)
    grad = torch.empty_like(membranes)
    grad_u_next = torch.zeros_like(membranes[0]) if membranes.shape[0] else None
    for t in reversed(range(membranes.shape[0])):
        grad_s = g[t] - lam * v * grad_u_next
        grad_u_next = grad_s * surrogate_derivative(membranes[t] - v, surrogate, alpha) + lam * grad_u_next
        grad[t] = grad_u_next
    return grad.to(current.dtype)


def ottt_neuron_backward(
    grad_spikes: Tensor, current: Tensor, decay: float, threshold: float, surrogate: str, alpha: float
) -> Tensor:
    """OTTT's online gradient: only the instantaneous ds[t]/du[t] = sigma'(u[t] - V)."""
    cdt = compute_dtype(current.dtype)
    _, membranes = lif_forward(current, decay, threshold)
    derivative = surrogate_derivative(membranes - round_to(cdt, threshold), surrogate, alpha)
    return (grad_spikes.to(cdt) * derivative).to(current.dtype)


def ottt_linear_forward(s_in: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """W s_in[t] + b (the forward value of OTTT's layer)."""
    cdt = compute_dtype(s_in.dtype)
    return F.linear(s_in.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt)).to(s_in.dtype)


def ottt_linear_backward(
    grad_out: Tensor, s_in: Tensor, weight: Tensor, bias: Tensor | None, decay: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """OTTT's gradients: dL/ds_in[t] = g[t] W, dL/dW = sum_t g[t]^T a_hat_in[t] (the presynaptic
    trace), dL/db = sum_t g[t], as in OTTT's code."""
    cdt = compute_dtype(s_in.dtype)
    g = grad_out.to(cdt)
    trace = spike_trace_forward(s_in.to(cdt), None, decay)
    grad_s_in = (g @ weight.to(cdt)).to(s_in.dtype)
    grad_weight = (g.reshape(-1, weight.shape[0]).T @ trace.reshape(-1, weight.shape[1])).to(weight.dtype)
    grad_bias = None if bias is None else g.reshape(-1, weight.shape[0]).sum(0).to(bias.dtype)
    return grad_s_in, grad_weight, grad_bias
