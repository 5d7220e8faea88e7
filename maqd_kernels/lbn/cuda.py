"""Launchers of the hand-written Layer-Batch Normalization kernels in csrc/lbn.cu, and of
postsynaptic-potential normalization (the same kernels without a mean): checks, output and
workspace allocation, stream.

Each launcher has the signature of its twin in ``reference``. The ``*_host`` variants run the same
partitions and math (the __host__ __device__ code of csrc/lbn.cuh) on CPU tensors: CI, which has
no GPU, tests the CUDA kernels' logic through them.
"""

from __future__ import annotations

import math

import torch

from .._backend import FLOAT_DTYPE_CODES
from .._cuda_launch import _check, _extension, _launch, _ptr
from .._library import contiguous_or_none

Tensor = torch.Tensor

# The host twins size their grids for the H200's SM count, so they run the partition the benchmark
# GPU gets (launchers.h, layer_batch_norm_workspace).
HOST_SM_COUNT = 132


def _dtype_code(tensor: Tensor | None) -> int:
    return 0 if tensor is None else FLOAT_DTYPE_CODES[tensor.dtype]


def _sm_count(device: torch.device, on_host: bool) -> int:
    return HOST_SM_COUNT if on_host else torch.cuda.get_device_properties(device).multi_processor_count


def _as_three_dims(x: Tensor) -> tuple[int, int, int]:
    """x (N, C, *) as (N, C, S), S the product of the trailing dimensions (1 for 2-D x)."""
    return x.shape[0], x.shape[1], x.shape[2:].numel()


def _workspace(x: Tensor, groups: int, backward: bool, training: bool, sm_count: int) -> Tensor:
    n, c, s = _as_three_dims(x)
    floats = _extension().layer_batch_norm_workspace(
        n, c, s, groups, FLOAT_DTYPE_CODES[x.dtype], backward, training, sm_count
    )
    return torch.empty(floats, dtype=torch.float32, device=x.device)


def _forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
    on_host: bool,
    centered: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """LBN's forward (centered), or PSP's: mean and running_mean None, the running second moment in
    running_var and the new one in the last output."""
    _check("x", x, on_host)
    for name, tensor in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var" if centered else "running_moment", running_var),
    ):
        if tensor is not None:
            _check(name, tensor, on_host)
    xc = x.contiguous()
    weight, bias, running_mean, running_var = map(contiguous_or_none, (weight, bias, running_mean, running_var))
    n, c, s = _as_three_dims(xc)
    y = torch.empty_like(xc)
    rstd = torch.empty(groups, dtype=torch.float32, device=xc.device)
    mean = torch.empty_like(rstd) if centered else None
    updated = training and running_var is not None
    # Two empty tensors, never one: a custom op's outputs may not alias each other.
    new_mean = torch.empty_like(running_mean) if updated and centered else xc.new_empty(0, dtype=torch.float32)
    new_var = torch.empty_like(running_var) if updated else xc.new_empty(0, dtype=torch.float32)
    if training and xc.numel() == 0:  # the statistics of nothing, and running ones left as they were
        for statistic, running, new in ((mean, running_mean, new_mean), (rstd, running_var, new_var)):
            if statistic is not None:
                statistic.fill_(math.nan)
            if updated and running is not None:
                new.copy_(running)
        return y, mean, rstd, new_mean, new_var
    sm_count = _sm_count(xc.device, on_host)
    workspace = _workspace(xc, groups, False, training, sm_count)
    common = (xc.data_ptr(), _ptr(weight), _dtype_code(weight), _ptr(bias), _dtype_code(bias))
    sizes = (workspace.data_ptr(), n, c, s, groups, FLOAT_DTYPE_CODES[xc.dtype], training, momentum, eps, sm_count)
    new_var_ptr = _ptr(new_var if updated else None)
    if centered:
        running = (_ptr(running_mean), _ptr(running_var), _dtype_code(running_mean), y.data_ptr())
        statistics = (*running, mean.data_ptr(), rstd.data_ptr(), _ptr(new_mean if updated else None), new_var_ptr)
        _launch("layer_batch_norm_forward", on_host, xc.device, *common, *statistics, *sizes)
    else:
        statistics = (_ptr(running_var), _dtype_code(running_var), y.data_ptr(), rstd.data_ptr(), new_var_ptr)
        _launch("psp_norm_forward", on_host, xc.device, *common, *statistics, *sizes)
    return y, mean, rstd, new_mean, new_var


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
    """LBN forward on the GPU: (y, mean, rstd, new_running_mean, new_running_var).

    x (N, C, *) float32 / bfloat16 / float16; weight, bias (C,) and running statistics (G,) in any
    of those dtypes, or None. y has x's shape and dtype (contiguous); mean and rstd are float32
    (G,); the new running statistics have the running statistics' dtype, or are empty float32
    when not training or none were given. Statistics and their update are computed on the device."""
    return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, groups, on_host=False)


def layer_batch_norm_forward_host(
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
    """The same partitions and math run on CPU tensors (for tests without a GPU)."""
    return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, groups, on_host=True)


def _backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    training: bool,
    groups: int,
    on_host: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """LBN's backward, or PSP's with mean None."""
    _check("x", x, on_host)
    _check("grad", grad, on_host)
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}, x {tuple(x.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias), ("mean", mean), ("rstd", rstd)):
        if tensor is not None:
            _check(name, tensor, on_host)
    # One storage dtype per kernel; float32 holds either exactly, and the math is float32 anyway.
    dtype = x.dtype if grad.dtype == x.dtype else torch.float32
    xc, g = x.contiguous().to(dtype), grad.contiguous().to(dtype)
    weight = contiguous_or_none(weight)
    mean, rstd = (None if t is None else t.to(torch.float32).contiguous() for t in (mean, rstd))
    n, c, s = _as_three_dims(xc)
    grad_x = torch.empty_like(xc)
    if xc.numel() == 0:
        zeros = [None if t is None else torch.zeros_like(t) for t in (weight, bias)]
        return grad_x.to(x.dtype), zeros[0], zeros[1]
    grad_weight = None if weight is None else torch.empty_like(weight)
    grad_bias = None if bias is None else torch.empty(c, dtype=bias.dtype, device=xc.device)
    sm_count = _sm_count(xc.device, on_host)
    workspace = _workspace(xc, groups, True, training, sm_count)
    statistics = (rstd.data_ptr(),) if mean is None else (mean.data_ptr(), rstd.data_ptr())
    _launch(
        "layer_batch_norm_backward" if mean is not None else "psp_norm_backward",
        on_host,
        xc.device,
        g.data_ptr(),
        xc.data_ptr(),
        _ptr(weight),
        _dtype_code(weight),
        *statistics,
        grad_x.data_ptr(),
        _ptr(grad_weight),
        _ptr(grad_bias),
        _dtype_code(bias),
        workspace.data_ptr(),
        n,
        c,
        s,
        groups,
        FLOAT_DTYPE_CODES[xc.dtype],
        training,
        sm_count,
    )
    return grad_x.to(x.dtype), grad_weight, grad_bias


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
    """LBN backward on the GPU: (grad_x, grad_weight, grad_bias).

    grad and x (N, C, *) float32 / bfloat16 / float16; mean and rstd the forward's (G,) float32.
    grad_x has x's shape and dtype; grad_weight / grad_bias (C,) have weight's / bias's dtype, or
    are None when those are. In training the group statistics are differentiated too."""
    return _backward(grad, x, weight, bias, mean, rstd, training, groups, on_host=False)


def layer_batch_norm_backward_host(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The same partitions and math run on CPU tensors (for tests without a GPU)."""
    return _backward(grad, x, weight, bias, mean, rstd, training, groups, on_host=True)


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
    """PSP forward on the GPU: (y, rstd, new_running_moment), the LBN kernels with mean 0 and the
    raw second moment E[x^2] in place of the variance (no n / (n - 1)).

    x (N, C, *) float32 / bfloat16 / float16; weight, bias (C,) and running_moment (G,) in any of
    those dtypes, or None. y has x's shape and dtype (contiguous); rstd is float32 (G,); the new
    running moment has running_moment's dtype, or is empty float32 when not training or none was
    given."""
    y, _, rstd, _, new_moment = _forward(
        x, weight, bias, None, running_moment, training, momentum, eps, groups, on_host=False, centered=False
    )
    return y, rstd, new_moment


def psp_norm_forward_host(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_moment: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The same partitions and math run on CPU tensors (for tests without a GPU)."""
    y, _, rstd, _, new_moment = _forward(
        x, weight, bias, None, running_moment, training, momentum, eps, groups, on_host=True, centered=False
    )
    return y, rstd, new_moment


def psp_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """PSP backward on the GPU: (grad_x, grad_weight, grad_bias); in training
    dx = rstd (w dy - x_hat mean_g(w dy x_hat)), x_hat = x rstd. Shapes and dtypes as
    ``layer_batch_norm_backward``'s; rstd the forward's (G,) float32."""
    return _backward(grad, x, weight, bias, None, rstd, training, groups, on_host=False)


def psp_norm_backward_host(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    rstd: Tensor,
    training: bool,
    groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The same partitions and math run on CPU tensors (for tests without a GPU)."""
    return _backward(grad, x, weight, bias, None, rstd, training, groups, on_host=True)
