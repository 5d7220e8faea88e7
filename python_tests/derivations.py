"""Independent float64 re-derivations of SPEC.md, written from the spec and not from the package.

Surrogate gradients are built the straight-through way: forward value exact, gradient from a
smooth stand-in whose derivative is the surrogate, so torch.autograd of these functions gives the
gradient SPEC.md defines.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Tensor = torch.Tensor


def straight_through(value: Tensor, smooth: Tensor) -> Tensor:
    """`value` forward, d(smooth) backward."""
    return value.detach() + (smooth - smooth.detach())


def surrogate_antiderivative(x: Tensor, surrogate: str, alpha: float) -> Tensor:
    """A function whose derivative is SPEC.md's sigma'(x)."""
    if surrogate == "sigmoid":
        return torch.sigmoid(alpha * x)
    if surrogate == "s2nn":
        return torch.where(x < 0, torch.sigmoid(alpha * x), torch.log1p(x.clamp(min=0)) + 0.5)
    if surrogate == "rectangle":
        return alpha * torch.clamp(x + 0.5 / alpha, 0.0, 1.0 / alpha)
    raise ValueError(surrogate)


def bias_factors_f32(decay: float, start: int, steps: int) -> list[float]:
    """S_t for t = start .. start + steps - 1 by the float32 recurrence, in numpy float32."""
    lam, s, out = np.float32(decay), np.float32(0.0), []
    for t in range(start + steps):
        s = np.float32(lam * s) + np.float32(1.0)
        if t >= start:
            out.append(float(s))
    return out


def saf_neuron(
    u_hat: Tensor,
    *,
    decay: float,
    threshold: float,
    mode: str = "saf_e",
    surrogate: str = "sigmoid",
    alpha: float = 4.0,
    spike_bits: int = 1,
    state: Tensor | None = None,
    step: int = 0,
    bias_factors: list[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """SPEC.md section 1 in float64: (a_hat, spike count), differentiable as SAF-E / SAF-F."""
    u = u_hat.double()
    levels = 2**spike_bits - 1
    trace = torch.zeros_like(u[0]) if state is None else state.double().expand_as(u[0])
    factors = bias_factors if bias_factors is not None else bias_factors_f32(decay, step, u.shape[0])
    outs, count = [], 0.0
    for t in range(u.shape[0]):
        membrane = u[t] - threshold * decay * trace.detach()
        spike = torch.clamp(torch.floor(membrane / threshold), 0, levels)
        new_trace = decay * trace.detach() + spike.detach()
        if mode == "saf_e":
            smooth = sum(
                surrogate_antiderivative(membrane - k * threshold, surrogate, alpha) for k in range(1, levels + 1)
            )
            new_trace = straight_through(new_trace, smooth)
        else:
            inside = ((new_trace > 0) & (new_trace < levels * factors[t])).double()
            new_trace = straight_through(new_trace, u[t] * inside / threshold)
        count = count + straight_through(spike.sum(), (new_trace - new_trace.detach()).sum())
        outs.append(new_trace)
        trace = new_trace
    return torch.stack(outs), count


def lif(
    current: Tensor,
    *,
    decay: float,
    threshold: float,
    surrogate: str = "sigmoid",
    alpha: float = 4.0,
    online: bool = False,
) -> Tensor:
    """Soft-reset LIF spikes; BPTT gradient, or OTTT's online one (nothing through time)."""
    u = torch.zeros_like(current[0], dtype=torch.float64)
    s = torch.zeros_like(u)
    spikes = []
    for t in range(current.shape[0]):
        carried = decay * (u - threshold * s)
        u = (carried.detach() if online else carried) + current[t].double()
        s = straight_through((u >= threshold).double(), surrogate_antiderivative(u - threshold, surrogate, alpha))
        spikes.append(s)
    return torch.stack(spikes)


def trace_of(x: Tensor, decay: float, state: Tensor | None = None) -> Tensor:
    """a[t] = decay a[t-1] + x[t], with gradient da[t]/dx[t] = 1 only."""
    a = torch.zeros_like(x[0], dtype=torch.float64) if state is None else state.double()
    out = []
    for t in range(x.shape[0]):
        a = decay * a.detach() + x[t].double()
        out.append(a)
    return torch.stack(out)


def round_clip(x: Tensor, bits: int, scale, *, signed: bool, surrogate: str = "ste", alpha: float = 4.0) -> Tensor:
    """scale * q in float64; x's gradient from SPEC.md's surrogate, scale's by autograd of LSQ's
    s * round_ste(clamp(x / s)) (Esser et al., 2020)."""
    x = x.double()
    s = scale.double() if isinstance(scale, Tensor) else torch.tensor(float(scale), dtype=torch.float64)
    sd = s.detach()
    binary = signed and bits == 1
    if binary:
        q_min, q_max = -1, 1
        q = torch.where(x >= 0, 1.0, -1.0).double()
    else:
        q_min, q_max = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        q = torch.clamp(torch.round(x / sd), q_min, q_max)
    if surrogate == "ste":
        smooth_x = x if binary else torch.clamp(x, q_min * sd, q_max * sd)
    elif binary:
        smooth_x = sd * 2.0 * torch.sigmoid(alpha * x / sd)
    else:
        smooth_x = sd * sum(torch.sigmoid(alpha * (x / sd - k - 0.5)) for k in range(q_min, q_max))
    if binary:
        lsq = s * q
    else:
        clipped = torch.clamp(x.detach() / s, q_min, q_max)
        lsq = s * (clipped + (torch.round(clipped) - clipped).detach())
    return sd * q + (smooth_x - smooth_x.detach()) + (lsq - lsq.detach())


def weight_standardize(w: Tensor, eps: float = 1e-5) -> Tensor:
    rows = w.double().reshape(w.shape[0], -1)
    mean = rows.mean(1, keepdim=True)
    var = ((rows - mean) ** 2).mean(1, keepdim=True)
    return ((rows - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def group_norm_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor, int]:
    """Per-group mean and biased variance of x (N, C, *) over (N, C/G, *), and the group size."""
    n, c = x.shape[:2]
    xs = x.double().reshape(n, groups, c // groups, -1)
    mean = xs.mean(dim=(0, 2, 3))
    var = ((xs - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    return mean, var, xs[:, 0].numel()


def layer_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float, groups: int
) -> Tensor:
    n, c = x.shape[:2]
    per = c // groups
    xs = x.double().reshape(n, c, -1)
    mu = mean.double().repeat_interleave(per).view(1, c, 1)
    sd = torch.sqrt(var.double().repeat_interleave(per) + eps).view(1, c, 1)
    y = (xs - mu) / sd
    if weight is not None:
        y = y * weight.double().view(1, c, 1)
    if bias is not None:
        y = y + bias.double().view(1, c, 1)
    return y.reshape(x.shape)


def gaussian_round_clip_mse(scale: float, bits: int, signed: bool) -> float:
    """E[(f(x) - round_clip(x))^2], x ~ N(0, 1), by exact Gaussian integrals over each rounding cell."""

    def cdf(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2))) if math.isfinite(z) else float(z > 0)

    def pdf(z):
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi) if math.isfinite(z) else 0.0

    def cell(a, b, level):  # integral over [a, b] of (x - level)^2 pdf(x)
        mass = cdf(b) - cdf(a)
        first = pdf(a) - pdf(b)
        second = mass - ((b * pdf(b) if math.isfinite(b) else 0.0) - (a * pdf(a) if math.isfinite(a) else 0.0))
        return second - 2 * level * first + level * level * mass

    if signed and bits == 1:
        return cell(-math.inf, 0.0, -scale) + cell(0.0, math.inf, scale)
    q_min, q_max = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    total = 0.0
    for j in range(q_min, q_max + 1):
        low = -math.inf if j == q_min else (j - 0.5) * scale
        high = math.inf if j == q_max else (j + 0.5) * scale
        if not signed and j == 0:
            low = 0.0  # x < 0: f(x) = 0 and q = 0
        total += cell(low, high, j * scale)
    return total
