"""Quantization-aware modules of MaQD (Sawada et al., arXiv 2403.14999; SPEC.md section 2).

The MaQD block is QuantLinear -> LayerBatchNorm -> QuantAct (or the conv version): the layers
quantize their standardized weights, QuantAct quantizes the activations.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import op
from .saf import _init_like_torch

Tensor = torch.Tensor


class QuantLinear(nn.Module):
    """Linear layer on round-clipped standardized weights: F.linear(x, round_clip(weight_standardize(W))).
    Parameters are initialised as torch.nn.Linear's. See ``quant_linear``; its forward runs the
    fused pack + low-bit matmul kernels. ``backend`` as in the ops (default: chosen per call)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int,
        weight_scale: float | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight_bits = weight_bits
        self.weight_scale = op.default_scale(weight_bits, True) if weight_scale is None else weight_scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_like_torch(self.weight, self.bias, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return op.quant_linear(
            x,
            self.weight,
            self.bias,
            weight_bits=self.weight_bits,
            weight_scale=self.weight_scale,
            backend=self.backend,
        )

    def packed_weight(self) -> op.PackedWeight:
        """The quantized weight this layer computes with, packed for ``lowbit_linear`` (inference)."""
        return _pack(self.weight, self.weight_bits, self.weight_scale, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_bits={self.weight_bits}, weight_scale={self.weight_scale:.6g}"
        )


class QuantConv2d(nn.Module):
    """2-D convolution on round-clipped standardized weights. Parameters are initialised as
    torch.nn.Conv2d's. See ``quant_conv2d``; ``backend`` as in the ops."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        *,
        weight_bits: int,
        weight_scale: float | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.backend = backend
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.padding = stride, padding
        self.weight_bits = weight_bits
        self.weight_scale = op.default_scale(weight_bits, True) if weight_scale is None else weight_scale
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_like_torch(self.weight, self.bias, in_channels * kernel[0] * kernel[1])

    def forward(self, x: Tensor) -> Tensor:
        return op.quant_conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            weight_bits=self.weight_bits,
            weight_scale=self.weight_scale,
            backend=self.backend,
        )

    def packed_weight(self) -> op.PackedWeight:
        """The quantized weight as (out_channels, in_channels * kH * kW) packed rows, the im2col
        matmul's operand (standardized per output channel, as the forward does)."""
        return _pack(self.weight.flatten(1), self.weight_bits, self.weight_scale, self.backend)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, weight_bits={self.weight_bits}, weight_scale={self.weight_scale:.6g}"
        )


def _pack(weight: Tensor, bits: int, scale: float, backend: str | None) -> op.PackedWeight:
    # The training forward standardizes a float32 copy of the weight (the reference's definition),
    # so a bf16 layer packs the codes it trains with only from float32 too.
    with torch.no_grad():
        return op.pack_weight(weight.float(), bits, scale=scale, backend=backend)


class QuantAct(nn.Module):
    """The quantized activation: unsigned round-clip, scale * clamp(round(x / scale), 0, 2^bits - 1).

    Args:
        bits: 1..8. scale: default ``default_scale(bits, signed=False)`` (Gaussian-optimal after LBN).
        learn_scale: make the scale a parameter trained with LSQ's gradient (Esser et al., 2020).
        surrogate: "ste" or "sigmoid" (an unsigned round-clip is a single-step multi-bit spiking neuron).
        backend: as in the ops (default: chosen per call).
    """

    def __init__(
        self,
        bits: int,
        scale: float | None = None,
        learn_scale: bool = False,
        surrogate: str = "ste",
        backend: str | None = None,
    ):
        super().__init__()
        self.bits, self.surrogate, self.learn_scale, self.backend = bits, surrogate, learn_scale, backend
        initial = op.default_scale(bits, False) if scale is None else float(scale)
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(initial))
        else:
            self.scale = initial

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale.to(x.dtype) if self.learn_scale else self.scale
        return op.round_clip(x, self.bits, scale, signed=False, surrogate=self.surrogate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, learn_scale={self.learn_scale}, surrogate={self.surrogate!r}"
