"""What the cuda and triton backends of the MaQD ops share: the launchers' operand preparation,
and the training layers built from each backend's fused kernels (SPEC.md section 2).

``quant_linear``'s forward is ``pack_weight`` (standardize + round-clip + pack in one pass) then
``lowbit_linear`` (the activations quantized to uint8 codes and multiplied on int8 tensor cores,
or, with act_bits None, float activations times the codes decoded in registers). Its backward
decodes the weight once, runs the two gradient matmuls in the input's dtype on cuBLAS, and the
surrogates in the elementwise ``round_clip_backward`` and the fused per-row
``weight_quant_backward`` kernels. ``quant_conv2d`` uses the same kernels around cuDNN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import reference

Tensor = torch.Tensor

# Weight standardization's eps in the training layers, as in reference.quant_linear_forward.
STANDARDIZE_EPS = 1e-5
# Elementwise scale modes of the kernels (csrc/launchers.h): a float argument, one float32 in
# memory, or one float32 per element.
SCALE_VALUE, SCALE_SCALAR_TENSOR, SCALE_PER_ELEMENT = 0, 1, 2
# Surrogate codes of the round-clip kernels.
SURROGATE_CODES = {"ste": 0, "sigmoid": 1}


class ScaleOperand(NamedTuple):
    tensor: Tensor | None  # float32, one element or x's shape, contiguous
    mode: int
    value: float


def scale_operand(x: Tensor, scale_tensor: Tensor | None, scale: float) -> ScaleOperand:
    """The round-clip scale as the elementwise kernels take it."""
    if scale_tensor is None:
        return ScaleOperand(None, SCALE_VALUE, scale)
    if scale_tensor.numel() == 1:
        return ScaleOperand(scale_tensor.to(torch.float32).reshape(1).contiguous(), SCALE_SCALAR_TENSOR, 0.0)
    return ScaleOperand(scale_tensor.to(torch.float32).expand(x.shape).contiguous(), SCALE_PER_ELEMENT, 0.0)


def reduce_scale_gradient(terms: Tensor | None, scale_tensor: Tensor | None) -> Tensor | None:
    """LSQ's dL/dscale from the kernels' per-element float32 terms g * dscale."""
    if scale_tensor is None:
        return None
    return reference.sum_to_shape(terms, scale_tensor.shape).to(scale_tensor.dtype)


class EpilogueOperands(NamedTuple):
    """lowbit_linear's epilogue as the kernels take it: float32 contiguous (N,) vectors, None when
    absent; out_bits 0 for a float output of out_dtype."""

    combined_scale: Tensor
    bias: Tensor | None
    out_scale: Tensor | None
    out_shift: Tensor | None
    out_bits: int
    out_act_scale: float
    out_dtype: torch.dtype


def epilogue_operands(
    x: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    act_bits: int | None,
    act_scale: float | None,
    out_scale: Tensor | None,
    out_shift: Tensor | None,
    out_bits: int | None,
    out_act_scale: float | None,
) -> EpilogueOperands:
    """combined_scale = alpha_w * act_scale on the integer path (codes in, or act_bits set), else
    alpha_w, in float32 as reference.lowbit_linear computes it."""
    integer = not x.is_floating_point() or act_bits is not None
    combined = weight_scale * reference.round_to(torch.float32, act_scale) if integer else weight_scale

    def vector(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(torch.float32).contiguous()

    return EpilogueOperands(
        vector(combined),
        vector(bias),
        vector(out_scale),
        vector(out_shift),
        out_bits or 0,
        out_act_scale or 0.0,
        reference.lowbit_output_dtype(x.dtype, out_bits),
    )


class QuantKernels(NamedTuple):
    """One backend's launchers (each with its reference twin's signature)."""

    round_clip_forward: Callable
    round_clip_backward: Callable
    pack_weight: Callable
    dequantize_weight: Callable
    weight_quant_backward: Callable
    lowbit_linear: Callable


def quant_linear_forward(
    kernels: QuantKernels,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_bits: int,
    weight_scale: float,
    act_bits: int | None,
    act_scale: float | None,
) -> Tensor:
    # Standardized from float32, as in _quantized_weight.
    channel_scale, packed = kernels.pack_weight(weight.float(), None, weight_scale, weight_bits, True, STANDARDIZE_EPS)
    return kernels.lowbit_linear(
        x, packed, channel_scale, weight_bits, weight.shape[1], bias, act_bits, act_scale, None, None, None, None
    )


def _quantized_weight(kernels: QuantKernels, weight: Tensor, bits: int, scale: float, dtype: torch.dtype) -> Tensor:
    """round_clip(weight_standardize(weight)) in `dtype`, shape of weight: packed, then decoded.

    The training layers standardize in float32 (reference.quant_linear_forward) where
    ``pack_weight`` rounds w_hat to the weight's dtype first (``weight_standardize`` then
    ``quantize``), so a bfloat16 or float16 weight is packed from its float32 copy."""
    rows = weight.reshape(weight.shape[0], -1).float()
    channel_scale, packed = kernels.pack_weight(rows, None, scale, bits, True, STANDARDIZE_EPS)
    return kernels.dequantize_weight(packed, channel_scale, bits, rows.shape[1], dtype).reshape(weight.shape)


def _quantized_input(kernels: QuantKernels, x: Tensor, act_bits: int | None, act_scale: float | None) -> Tensor:
    return x if act_bits is None else kernels.round_clip_forward(x, None, act_scale, act_bits, False)


def _input_gradients(
    kernels: QuantKernels,
    grad_x_q: Tensor,
    grad_w_q: Tensor,
    x: Tensor,
    weight: Tensor,
    weight_bits: int,
    weight_scale: float,
    act_bits: int | None,
    act_scale: float | None,
    surrogate: str,
) -> tuple[Tensor, Tensor]:
    """Carries the gradients at the quantized operands back through the surrogates."""
    alpha = reference.SURROGATE_ALPHA
    grad_x = grad_x_q
    if act_bits is not None:
        grad_x = kernels.round_clip_backward(grad_x_q, x, None, act_scale, act_bits, False, surrogate, alpha)[0]
    grad_weight = kernels.weight_quant_backward(
        grad_w_q.to(weight.dtype), weight, weight_bits, weight_scale, surrogate, alpha, STANDARDIZE_EPS
    )
    return grad_x, grad_weight


def _bias_gradient(grad: Tensor, bias: Tensor | None, dims) -> Tensor | None:
    return None if bias is None else grad.sum(dim=dims, dtype=torch.float32).to(bias.dtype)


def quant_linear_backward(
    kernels: QuantKernels,
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_bits: int,
    weight_scale: float,
    act_bits: int | None,
    act_scale: float | None,
    surrogate: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    w_q = _quantized_weight(kernels, weight, weight_bits, weight_scale, x.dtype)
    x_q = _quantized_input(kernels, x, act_bits, act_scale)
    g = grad.reshape(-1, weight.shape[0])
    grad_x_q = (g @ w_q).reshape(x.shape)
    grad_w_q = g.T @ x_q.reshape(-1, weight.shape[1])
    grad_x, grad_weight = _input_gradients(
        kernels, grad_x_q, grad_w_q, x, weight, weight_bits, weight_scale, act_bits, act_scale, surrogate
    )
    return grad_x, grad_weight, _bias_gradient(g, bias, 0)


def quant_conv2d_forward(
    kernels: QuantKernels,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    weight_bits: int,
    weight_scale: float,
    act_bits: int | None,
    act_scale: float | None,
) -> Tensor:
    w_q = _quantized_weight(kernels, weight, weight_bits, weight_scale, x.dtype)
    x_q = _quantized_input(kernels, x, act_bits, act_scale)
    return F.conv2d(x_q, w_q, bias, stride, padding, dilation, groups)


def quant_conv2d_backward(
    kernels: QuantKernels,
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    weight_bits: int,
    weight_scale: float,
    act_bits: int | None,
    act_scale: float | None,
    surrogate: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    w_q = _quantized_weight(kernels, weight, weight_bits, weight_scale, x.dtype)
    x_q = _quantized_input(kernels, x, act_bits, act_scale)
    grad_x_q, grad_w_q, _ = torch.ops.aten.convolution_backward(
        grad, x_q, w_q, None, stride, padding, dilation, False, [0, 0], groups, [True, True, False]
    )
    grad_x, grad_weight = _input_gradients(
        kernels, grad_x_q, grad_w_q, x, weight, weight_bits, weight_scale, act_bits, act_scale, surrogate
    )
    return grad_x, grad_weight, _bias_gradient(grad, bias, (0, 2, 3))


def bind(kernels: QuantKernels) -> dict[str, Callable]:
    """The training ops of one backend, each with its reference twin's signature."""

    def bound(fn: Callable) -> Callable:
        def launcher(*args):
            return fn(kernels, *args)

        launcher.__name__ = fn.__name__
        return launcher

    return {
        fn.__name__: bound(fn)
        for fn in (quant_linear_forward, quant_linear_backward, quant_conv2d_forward, quant_conv2d_backward)
    }
