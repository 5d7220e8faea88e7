"""Layer-Batch Normalization and its inference folding, and postsynaptic-potential normalization,
as torch.library custom ops (namespace ``maqd``) and their public Python faces. SPEC.md sections 3
and 4 are the contract."""

from typing import Optional

import torch

from .. import _backend, _checks
from .._library import empty_if_none, none_if_empty, run_below_autocast, strided_like
from . import reference

Tensor = torch.Tensor

_backend.declare(
    "layer_batch_norm_forward",
    reference.layer_batch_norm_forward,
    cuda="maqd_kernels.lbn.cuda:layer_batch_norm_forward",
    triton="maqd_kernels.lbn.triton:layer_batch_norm_forward",
)
_backend.declare(
    "layer_batch_norm_backward",
    reference.layer_batch_norm_backward,
    cuda="maqd_kernels.lbn.cuda:layer_batch_norm_backward",
    triton="maqd_kernels.lbn.triton:layer_batch_norm_backward",
)
_backend.declare(
    "psp_norm_forward",
    reference.psp_norm_forward,
    cuda="maqd_kernels.lbn.cuda:psp_norm_forward",
    triton="maqd_kernels.lbn.triton:psp_norm_forward",
)
_backend.declare(
    "psp_norm_backward",
    reference.psp_norm_backward,
    cuda="maqd_kernels.lbn.cuda:psp_norm_backward",
    triton="maqd_kernels.lbn.triton:psp_norm_backward",
)
_backend.declare("lbn_inference_affine", reference.lbn_inference_affine)
_backend.declare("lbn_inference_affine_backward", reference.lbn_inference_affine_backward)
_backend.declare("fold_affine", reference.fold_affine)
_backend.declare("fold_affine_backward", reference.fold_affine_backward)


# ----------------------------------------------------------------------------- layer_batch_norm


@torch.library.custom_op("maqd::layer_batch_norm", mutates_args=())
def _layer_batch_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.resolve("layer_batch_norm_forward", x, backend)
    y, mean, rstd, new_mean, new_var = impl(x, weight, bias, running_mean, running_var, training, momentum, eps, groups)
    return strided_like(y, x), mean, rstd, new_mean, new_var


@_layer_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, training, momentum, eps, groups, backend):
    cdt = reference.compute_dtype(x.dtype)
    stats = x.new_empty(groups, dtype=cdt)
    updated = training and running_mean is not None
    new_mean = torch.empty_like(running_mean) if updated else x.new_empty(0, dtype=cdt)
    new_var = torch.empty_like(running_var) if updated else x.new_empty(0, dtype=cdt)
    return torch.empty_like(x), stats, torch.empty_like(stats), new_mean, new_var


@torch.library.custom_op("maqd::layer_batch_norm_backward", mutates_args=())
def _layer_batch_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    training: bool,
    groups: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.resolve("layer_batch_norm_backward", x, backend)
    grad_x, grad_weight, grad_bias = impl(grad.contiguous(), x, weight, bias, mean, rstd, training, groups)
    return strided_like(grad_x, x), empty_if_none(grad_weight, x), empty_if_none(grad_bias, x)


def _normalization_backward_fake(grad, x, weight, bias, *args):
    """(grad_x, grad_weight, grad_bias) of either normalization; empty for an absent affine."""
    return (
        torch.empty_like(x),
        torch.empty_like(weight) if weight is not None else x.new_empty(0),
        torch.empty_like(bias) if bias is not None else x.new_empty(0),
    )


_layer_batch_norm_backward.register_fake(_normalization_backward_fake)


def _layer_batch_norm_setup(ctx, inputs, output):
    x, weight, bias, _, _, training, _, _, groups, backend = inputs
    _, mean, rstd, new_mean, new_var = output
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.args = (training, groups, backend)


def _layer_batch_norm_grad(ctx, grad, *unused_statistics_grads):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.maqd.layer_batch_norm_backward(
        grad, x, weight, bias, mean, rstd, *ctx.args
    )
    return (grad_x, none_if_empty(grad_weight), none_if_empty(grad_bias)) + (None,) * 7


_layer_batch_norm.register_autograd(_layer_batch_norm_grad, setup_context=_layer_batch_norm_setup)


def _check_groups(groups, channels: int) -> int:
    groups = _checks.integer("groups", groups, 1)
    if channels % groups:
        raise ValueError(f"groups must divide the channel count {channels}; got groups={groups}")
    return groups


def _check_running_stats(running_mean, running_var, groups: int, device: torch.device) -> tuple:
    running_mean = _checks.optional_tensor("running_mean", running_mean, device=device)
    running_var = _checks.optional_tensor("running_var", running_var, device=device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var come together; got only one of them")
    if running_mean is not None:
        _checks.shape("running_mean", running_mean, (groups,), "one per group")
        _checks.shape("running_var", running_var, (groups,), "one per group")
    return running_mean, running_var


def _check_affine(weight, bias, channels: int, device: torch.device) -> None:
    for name, value in (("weight", weight), ("bias", bias)):
        if _checks.optional_tensor(name, value, device=device) is not None:
            _checks.shape(name, value, (channels,), "one per channel")


def layer_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    groups: int = 1,
    backend: str | None = None,
) -> Tensor:
    """Layer-Batch Normalization (MaQD, Sawada et al., arXiv 2403.14999; SPEC.md section 3).

    Channels split into `groups` G; each group has one mean and variance over (N, C/G, *):
    groups=1 is LBN (statistics over the whole layer and batch, stable at batch size 1),
    groups=C is exactly BatchNorm. In training, running_mean / running_var are updated in place
    (momentum m, unbiased variance); in eval they are the statistics.

    Args:
        x: (N, C, *) float; fold a time axis into N for SNN inputs.
        weight, bias: (C,) affine or None. running_mean, running_var: (G,) or None (training only).
        training: batch statistics (True) or running ones (False). 0 <= momentum <= 1; eps > 0.
    Returns: y, shape, dtype and memory format of x.
    """
    _checks.tensor("x", x, min_dim=2)
    channels = x.shape[1]
    groups = _check_groups(groups, channels)
    _check_affine(weight, bias, channels, x.device)
    running_mean, running_var = _check_running_stats(running_mean, running_var, groups, x.device)
    _checks.boolean("training", training)
    if training and reference.group_size(x.shape, groups) < 2 and x.numel() > 0:
        raise ValueError(
            f"x of shape {tuple(x.shape)} has one value per group: training needs at least 2 to take "
            f"a variance (use fewer groups or more data)"
        )
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    _backend.check_backward("layer_batch_norm_backward", x, _checks.backend(backend), x, weight, bias)
    y, _, _, new_mean, new_var = _layer_batch_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        _checks.fraction("momentum", momentum),
        _checks.positive("eps", eps),
        groups,
        _checks.backend(backend),
    )
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


# ----------------------------------------------------------------------------- psp_norm


@torch.library.custom_op("maqd::psp_norm", mutates_args=())
def _psp_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_moment: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.resolve("psp_norm_forward", x, backend)
    y, rstd, new_moment = impl(x, weight, bias, running_moment, training, momentum, eps, groups)
    return strided_like(y, x), rstd, new_moment


@_psp_norm.register_fake
def _(x, weight, bias, running_moment, training, momentum, eps, groups, backend):
    cdt = reference.compute_dtype(x.dtype)
    updated = training and running_moment is not None
    new_moment = torch.empty_like(running_moment) if updated else x.new_empty(0, dtype=cdt)
    return torch.empty_like(x), x.new_empty(groups, dtype=cdt), new_moment


@torch.library.custom_op("maqd::psp_norm_backward", mutates_args=())
def _psp_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    rstd: Tensor,
    training: bool,
    groups: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.resolve("psp_norm_backward", x, backend)
    grad_x, grad_weight, grad_bias = impl(grad.contiguous(), x, weight, bias, rstd, training, groups)
    return strided_like(grad_x, x), empty_if_none(grad_weight, x), empty_if_none(grad_bias, x)


_psp_norm_backward.register_fake(_normalization_backward_fake)


def _psp_norm_setup(ctx, inputs, output):
    x, weight, bias, _, training, _, _, groups, backend = inputs
    _, rstd, new_moment = output
    ctx.mark_non_differentiable(rstd, new_moment)
    ctx.save_for_backward(x, weight, bias, rstd)
    ctx.args = (training, groups, backend)


def _psp_norm_grad(ctx, grad, *unused_statistics_grads):
    x, weight, bias, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.maqd.psp_norm_backward(grad, x, weight, bias, rstd, *ctx.args)
    return (grad_x, none_if_empty(grad_weight), none_if_empty(grad_bias)) + (None,) * 6


_psp_norm.register_autograd(_psp_norm_grad, setup_context=_psp_norm_setup)


def psp_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_moment: Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    groups: int = 1,
    backend: str | None = None,
) -> Tensor:
    """Postsynaptic-potential normalization (Ikegawa et al., Sensors 2022; SPEC.md section 4):
    y = weight_c x / sqrt(E[x^2]_g(c) + eps) + bias_c, with no mean subtracted.

    Channels split into `groups` G as in ``layer_batch_norm``; each group has one raw second moment
    E[x^2] over (N, C/G, *). In training it is the batch's, and running_moment is updated in place,
    as layer_batch_norm updates its statistics: running_moment <- (1 - m) running_moment + m E[x^2],
    with no n / (n - 1) correction, which corrects a variance for its subtracted mean, and a raw
    moment has none. In eval running_moment is the moment; the normalization is then the
    per-channel affine a_c = weight_c / sqrt(running_moment_g(c) + eps), b_c = bias_c
    (``lbn_inference_affine`` with a zero running mean), which folds like LBN's. Gradients reach x
    (in training through the batch moment: dx = r (w dy - x_hat mean_g(w dy x_hat)), x_hat = x r,
    r = (E[x^2] + eps)^-1/2), weight and bias.

    Args:
        x: (N, C, *) float; fold a time axis into N for SNN inputs.
        weight, bias: (C,) or None (no affine). running_moment: (G,) or None (training only).
        training: batch moment (True) or running one (False). 0 <= momentum <= 1; eps > 0.
    Returns: y, shape, dtype and memory format of x.
    """
    _checks.tensor("x", x, min_dim=2)
    channels = x.shape[1]
    groups = _check_groups(groups, channels)
    _check_affine(weight, bias, channels, x.device)
    if _checks.optional_tensor("running_moment", running_moment, device=x.device) is not None:
        _checks.shape("running_moment", running_moment, (groups,), "one per group")
    _checks.boolean("training", training)
    if not training and running_moment is None:
        raise ValueError("running_moment is required when training=False")
    _backend.check_backward("psp_norm_backward", x, _checks.backend(backend), x, weight, bias)
    y, _, new_moment = _psp_norm(
        x,
        weight,
        bias,
        running_moment,
        training,
        _checks.fraction("momentum", momentum),
        _checks.positive("eps", eps),
        groups,
        _checks.backend(backend),
    )
    if training and running_moment is not None:
        with torch.no_grad():
            running_moment.copy_(new_moment)
    return y


# ----------------------------------------------------------------------------- inference affine and fold


@torch.library.custom_op("maqd::lbn_inference_affine", mutates_args=())
def _lbn_inference_affine(
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    groups: int,
    channels: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    impl = _backend.resolve("lbn_inference_affine", running_var, backend)
    return impl(weight, bias, running_mean, running_var, eps, groups, channels)


@_lbn_inference_affine.register_fake
def _(weight, bias, running_mean, running_var, eps, groups, channels, backend):
    a = running_var.new_empty(channels, dtype=reference.compute_dtype(running_var.dtype))
    return a, torch.empty_like(a)


@torch.library.custom_op("maqd::lbn_inference_affine_backward", mutates_args=())
def _lbn_inference_affine_backward(
    grad_a: Tensor,
    grad_b: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    groups: int,
    channels: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.resolve("lbn_inference_affine_backward", running_var, backend)
    grads = impl(grad_a, grad_b, weight, bias, running_mean, running_var, eps, groups, channels)
    return tuple(empty_if_none(g, running_var) for g in grads)


@_lbn_inference_affine_backward.register_fake
def _(grad_a, grad_b, weight, bias, running_mean, running_var, *args):
    return tuple(
        torch.empty_like(t) if t is not None else running_var.new_empty(0)
        for t in (weight, bias, running_mean, running_var)
    )


def _lbn_inference_affine_setup(ctx, inputs, output):
    weight, bias, running_mean, running_var, *args = inputs
    ctx.save_for_backward(weight, bias, running_mean, running_var)
    ctx.args = args


def _lbn_inference_affine_grad(ctx, grad_a, grad_b):
    grads = torch.ops.maqd.lbn_inference_affine_backward(grad_a, grad_b, *ctx.saved_tensors, *ctx.args)
    grad_weight, grad_bias, grad_mean, grad_var = grads
    return none_if_empty(grad_weight), none_if_empty(grad_bias), grad_mean, grad_var, None, None, None, None


_lbn_inference_affine.register_autograd(_lbn_inference_affine_grad, setup_context=_lbn_inference_affine_setup)


def lbn_inference_affine(
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    eps: float = 1e-5,
    groups: int = 1,
    channels: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Eval-mode LBN as a per-channel affine y = a_c x + b_c, the form it folds into (SPEC.md
    section 3): a_c = weight_c / sqrt(rv_g(c) + eps), b_c = bias_c - a_c rm_g(c).

    Args:
        weight, bias: (C,) or None. running_mean, running_var: (G,). channels: C, needed only when
            weight and bias are both None.
    Returns: (a, b), each (C,) float32 (float64 for float64 statistics).
    """
    _checks.tensor("running_var", running_var, min_dim=1)
    _checks.tensor("running_mean", running_mean, min_dim=1, device=running_var.device)
    known = next((t.shape[0] for t in (weight, bias) if isinstance(t, Tensor)), None)
    if channels is None:
        if known is None:
            raise ValueError("channels is required when weight and bias are both None")
        channels = known
    channels = _checks.integer("channels", channels, 1)
    groups = _check_groups(groups, channels)
    _check_running_stats(running_mean, running_var, groups, running_var.device)
    _check_affine(weight, bias, channels, running_var.device)
    _backend.check_backward(
        "lbn_inference_affine_backward", running_var, _checks.backend(backend), weight, bias, running_mean, running_var
    )
    return _lbn_inference_affine(
        weight,
        bias,
        running_mean,
        running_var,
        _checks.positive("eps", eps),
        groups,
        channels,
        _checks.backend(backend),
    )


@torch.library.custom_op("maqd::fold_affine", mutates_args=())
def _fold_affine(
    weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, backend: Optional[str]
) -> tuple[Tensor, Tensor]:
    folded_weight, folded_bias = _backend.resolve("fold_affine", weight, backend)(weight, bias, a, b)
    return strided_like(folded_weight, weight), folded_bias


@_fold_affine.register_fake
def _(weight, bias, a, b, backend):
    return torch.empty_like(weight), weight.new_empty(weight.shape[0])


@torch.library.custom_op("maqd::fold_affine_backward", mutates_args=())
def _fold_affine_backward(
    grad_weight: Tensor,
    grad_bias: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    a: Tensor,
    b: Tensor,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.resolve("fold_affine_backward", weight, backend)
    grad_w, grad_bias_in, grad_a, grad_b = impl(grad_weight, grad_bias, weight, bias, a, b)
    return strided_like(grad_w, weight), empty_if_none(grad_bias_in, weight), grad_a, grad_b


@_fold_affine_backward.register_fake
def _(grad_weight, grad_bias, weight, bias, a, b, backend):
    return (
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else weight.new_empty(0),
        torch.empty_like(a),
        torch.empty_like(b),
    )


def _fold_affine_setup(ctx, inputs, output):
    weight, bias, a, b, backend = inputs
    ctx.save_for_backward(weight, bias, a, b)
    ctx.backend = backend


def _fold_affine_grad(ctx, grad_weight, grad_bias):
    grad_w, grad_bias_in, grad_a, grad_b = torch.ops.maqd.fold_affine_backward(
        grad_weight, grad_bias, *ctx.saved_tensors, ctx.backend
    )
    return grad_w, none_if_empty(grad_bias_in), grad_a, grad_b, None


_fold_affine.register_autograd(_fold_affine_grad, setup_context=_fold_affine_setup)


def fold_affine(
    weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Folds a per-output-channel affine y -> a y + b (an eval-mode LBN, see
    ``lbn_inference_affine``) into the preceding Linear or Conv (SPEC.md section 3):
    W' = a (.) W, b' = a bias + b, in float32 and cast back, as torch.nn.utils.fusion does.

    Args: weight: (C_out, ...) float. bias: (C_out,) or None. a, b: (C_out,).
    Returns: (W', b') in weight's dtype; W' in weight's memory format.
    """
    _checks.tensor("weight", weight, min_dim=1)
    channels = weight.shape[0]
    for name, value in (("bias", bias), ("a", a), ("b", b)):
        if name == "bias" and value is None:
            continue
        _checks.tensor(name, value, device=weight.device)
        _checks.shape(name, value, (channels,), "one per output channel")
    _backend.check_backward("fold_affine_backward", weight, _checks.backend(backend), weight, bias, a, b)
    return _fold_affine(weight, bias, a, b, backend)


# torch.autocast stops at these ops' boundary (see run_below_autocast).
run_below_autocast(
    _layer_batch_norm,
    _layer_batch_norm_backward,
    _psp_norm,
    _psp_norm_backward,
    _lbn_inference_affine,
    _lbn_inference_affine_backward,
    _fold_affine,
    _fold_affine_backward,
)
