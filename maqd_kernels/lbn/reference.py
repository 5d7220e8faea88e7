"""Layer-Batch Normalization and its folding in eager PyTorch: the executable form of SPEC.md
section 3 (MaQD, Sawada et al., arXiv 2403.14999, for the idea; SPEC.md for the formulas), and
postsynaptic-potential normalization (PSP, Ikegawa et al., Sensors 2022; SPEC.md section 4).

x is (N, C, *); channels split into `groups` G, each group normalized with one mean and variance
over (N, C/G, *) (LBN), or with one raw second moment E[x^2] and no mean (PSP). groups=1 is LBN,
groups=C is BatchNorm. Arithmetic in float32 (float64 for
float64 inputs); running statistics keep their own dtype.
"""

from __future__ import annotations

import torch

from ..saf.reference import compute_dtype, round_to

Tensor = torch.Tensor


def _grouped(x: Tensor, groups: int) -> Tensor:
    """x (N, C, *) in the compute dtype, viewed as (N, G, C/G, spatial)."""
    n, c = x.shape[:2]
    return x.to(compute_dtype(x.dtype)).reshape(n, groups, c // groups, x.shape[2:].numel())


def _per_channel(v: Tensor | None, groups: int, channels: int, default: float, like: Tensor) -> Tensor:
    """A per-channel vector (C,) as (1, G, C/G, 1), or `default` everywhere when v is None."""
    if v is None:
        return torch.full((1, groups, channels // groups, 1), default, dtype=like.dtype, device=like.device)
    return v.to(like.dtype).reshape(1, groups, channels // groups, 1)


def group_size(x_shape: torch.Size, groups: int) -> int:
    """Elements per group: N * C/G * prod(spatial)."""
    n, c = x_shape[:2]
    return n * (c // groups) * (x_shape[2:].numel() if len(x_shape) > 2 else 1)


def layer_batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, new_running_mean, new_running_var).

    training: mean, biased variance of each group; running_mean <- (1 - m) running_mean + m mean,
    running_var <- (1 - m) running_var + m var n / (n - 1). eval: the running statistics.
    y = weight_c (x - mean_g) rstd_g + bias_c with rstd_g = 1 / sqrt(var_g + eps). mean and rstd (G,)
    are in the compute dtype; the new running statistics (G,) are empty when none were given or
    in eval."""
    c = x.shape[1]
    xg = _grouped(x, groups)
    cdt = xg.dtype
    new_mean, new_var = x.new_empty(0, dtype=cdt), x.new_empty(0, dtype=cdt)
    if training:
        mean = xg.mean(dim=(0, 2, 3))
        var = (xg - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
        n = group_size(x.shape, groups)
        if running_mean is not None and n == 0:  # an empty batch leaves them as they were, as in BatchNorm
            new_mean, new_var = running_mean.clone(), running_var.clone()
        elif running_mean is not None:
            new_mean = ((1 - momentum) * running_mean.to(cdt) + momentum * mean).to(running_mean.dtype)
            new_var = ((1 - momentum) * running_var.to(cdt) + momentum * var * (n / (n - 1))).to(running_var.dtype)
    else:
        mean, var = running_mean.to(cdt, copy=True), running_var.to(cdt)
    rstd = 1.0 / torch.sqrt(var + round_to(cdt, eps))
    y = (xg - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
    y = y * _per_channel(weight, groups, c, 1.0, y) + _per_channel(bias, groups, c, 0.0, y)
    return y.reshape(x.shape).to(x.dtype), mean, rstd, new_mean, new_var


def layer_batch_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dL/dx, dL/dweight, dL/dbias). In training the group statistics are differentiated too:
    dx = rstd (dx_hat - mean_g(dx_hat) - x_hat mean_g(dx_hat x_hat)), dx_hat = weight_c dy."""
    return _normalization_backward(grad, x, weight, bias, mean, rstd, training, groups)


def _normalization_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward of LBN (centered by `mean`) and of PSP (mean None: x_hat = x rstd, and with no
    mean subtracted there is no mean_g(dx_hat) term)."""
    c = x.shape[1]
    xg = _grouped(x, groups)
    g = grad.to(xg.dtype).reshape(xg.shape)
    deviation = xg if mean is None else xg - mean.view(1, -1, 1, 1)
    x_hat = deviation * rstd.view(1, -1, 1, 1)
    dx_hat = g * _per_channel(weight, groups, c, 1.0, g)
    if training:
        dims = (0, 2, 3)
        correlation = x_hat * (dx_hat * x_hat).mean(dim=dims, keepdim=True)
        if mean is None:
            dx = rstd.view(1, -1, 1, 1) * (dx_hat - correlation)
        else:
            dx = rstd.view(1, -1, 1, 1) * (dx_hat - dx_hat.mean(dim=dims, keepdim=True) - correlation)
    else:
        dx = dx_hat * rstd.view(1, -1, 1, 1)
    grad_weight = None if weight is None else (g * x_hat).sum(dim=(0, 3)).reshape(c).to(weight.dtype)
    grad_bias = None if bias is None else g.sum(dim=(0, 3)).reshape(c).to(bias.dtype)
    return dx.reshape(x.shape).to(x.dtype), grad_weight, grad_bias


def psp_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_moment: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, rstd, new_running_moment) of postsynaptic-potential normalization (SPEC.md section 4).

    training: moment_g = E[x^2] over the group's elements, the raw second moment: no mean is
    subtracted, and so no n / (n - 1) correction applies (that corrects a variance's bias, which a
    raw moment does not have); running_moment <- (1 - m) running_moment + m moment. eval:
    moment_g = running_moment_g. y = weight_c x rstd_g + bias_c with rstd_g = 1 / sqrt(moment_g + eps).
    rstd (G,) is in the compute dtype; the new running moment (G,) is empty when none was given or
    in eval."""
    c = x.shape[1]
    xg = _grouped(x, groups)
    cdt = xg.dtype
    new_moment = x.new_empty(0, dtype=cdt)
    if training:
        moment = xg.square().mean(dim=(0, 2, 3))
        if running_moment is not None and xg.numel() == 0:  # an empty batch leaves it as it was
            new_moment = running_moment.clone()
        elif running_moment is not None:
            new_moment = ((1 - momentum) * running_moment.to(cdt) + momentum * moment).to(running_moment.dtype)
    else:
        moment = running_moment.to(cdt)
    rstd = 1.0 / torch.sqrt(moment + round_to(cdt, eps))
    y = xg * rstd.view(1, -1, 1, 1)
    y = y * _per_channel(weight, groups, c, 1.0, y) + _per_channel(bias, groups, c, 0.0, y)
    return y.reshape(x.shape).to(x.dtype), rstd, new_moment


def psp_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dL/dx, dL/dweight, dL/dbias) of ``psp_norm_forward``. In training the moment is
    differentiated too: dx = rstd (dx_hat - x_hat mean_g(dx_hat x_hat)), dx_hat = weight_c dy,
    x_hat = x rstd (LBN's backward with mean 0 and without its mean_g(dx_hat) term)."""
    return _normalization_backward(grad, x, weight, bias, None, rstd, training, groups)


def _channel_statistics(
    weight: Tensor | None, running_mean: Tensor, running_var: Tensor, eps: float, groups: int, channels: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel (C,): (rm_g(c), 1 / sqrt(rv_g(c) + eps), weight_c or 1) in the compute dtype."""
    cdt = compute_dtype(running_var.dtype)
    per_group = channels // groups
    rm = running_mean.to(cdt).repeat_interleave(per_group)
    inv_std = 1.0 / torch.sqrt(running_var.to(cdt).repeat_interleave(per_group) + round_to(cdt, eps))
    gamma = torch.ones(channels, dtype=cdt, device=rm.device) if weight is None else weight.to(cdt)
    return rm, inv_std, gamma


def lbn_inference_affine(
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    groups: int,
    channels: int,
) -> tuple[Tensor, Tensor]:
    """The eval-mode LBN as a per-channel affine y = a_c x + b_c: a_c = weight_c / sqrt(rv_g(c) + eps),
    b_c = bias_c - a_c rm_g(c); float32 (float64 when the statistics are) vectors (C,)."""
    rm, inv_std, gamma = _channel_statistics(weight, running_mean, running_var, eps, groups, channels)
    a = gamma * inv_std
    beta = torch.zeros_like(a) if bias is None else bias.to(a.dtype)
    return a, beta - a * rm


def lbn_inference_affine_backward(
    grad_a: Tensor,
    grad_b: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    groups: int,
    channels: int,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """(dL/dweight, dL/dbias, dL/drunning_mean, dL/drunning_var) of ``lbn_inference_affine``."""
    rm, inv_std, gamma = _channel_statistics(weight, running_mean, running_var, eps, groups, channels)
    cdt, per_group = rm.dtype, channels // groups
    a = gamma * inv_std
    # b = beta - a rm, so a receives grad_a - grad_b rm.
    grad_a_total = grad_a.to(cdt) - grad_b.to(cdt) * rm
    grad_weight = None if weight is None else (grad_a_total * inv_std).to(weight.dtype)
    grad_bias = None if bias is None else grad_b.to(bias.dtype, copy=True)
    grad_rm = (-grad_b.to(cdt) * a).reshape(groups, per_group).sum(1).to(running_mean.dtype)
    grad_rv = (grad_a_total * gamma * -0.5 * inv_std**3).reshape(groups, per_group).sum(1).to(running_var.dtype)
    return grad_weight, grad_bias, grad_rm, grad_rv


def fold_affine(weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The affine y -> a y + b folded into the preceding Linear / Conv: W' = a (.) W (per output
    channel, dim 0), b' = a bias + b; computed in float32 (float64 for float64) and cast back to
    the weight's dtype, as torch.nn.utils.fusion does."""
    cdt = compute_dtype(weight.dtype)
    scale = a.to(cdt).reshape(-1, *[1] * (weight.dim() - 1))
    folded_weight = (weight.to(cdt) * scale).to(weight.dtype)
    folded_bias = b.to(cdt) if bias is None else a.to(cdt) * bias.to(cdt) + b.to(cdt)
    return folded_weight, folded_bias.to(weight.dtype, copy=True)


def fold_affine_backward(
    grad_weight: Tensor, grad_bias: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(dL/dweight, dL/dbias, dL/da, dL/db) of ``fold_affine``."""
    cdt = compute_dtype(weight.dtype)
    gw, gb = grad_weight.to(cdt), grad_bias.to(cdt)
    scale = a.to(cdt).reshape(-1, *[1] * (weight.dim() - 1))
    grad_a = (gw * weight.to(cdt)).reshape(weight.shape[0], -1).sum(1)
    if bias is not None:
        grad_a = grad_a + gb * bias.to(cdt)
    grad_bias_in = None if bias is None else (gb * a.to(cdt)).to(bias.dtype)
    return (gw * scale).to(weight.dtype), grad_bias_in, grad_a.to(a.dtype), gb.to(b.dtype, copy=True)
