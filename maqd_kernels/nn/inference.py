"""Fused inference modules of MaQD (Sawada et al., arXiv 2403.14999; SPEC.md section 3), the
modules ``convert_for_inference`` builds: a QuantLinear or QuantConv2d with its LayerBatchNorm
folded into the low-bit matmul's epilogue and the next QuantAct's quantization fused after it, so
that uint8 activation codes pass from one kernel to the next.

Scales of the activation codes travel as extra state, so a converted model saves and loads
through ``state_dict``; bit widths and shapes are structure, fixed at construction.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..quant import op as quant_op

Tensor = torch.Tensor


class _ScalesAsState(nn.Module):
    """Keeps the float scales named in ``_scale_names`` in ``state_dict`` (as extra state): the
    kernels take them as Python floats, so reading a tensor back per call would sync the device."""

    _scale_names: tuple[str, ...] = ()

    def get_extra_state(self) -> dict:
        return {name: getattr(self, name) for name in self._scale_names}

    def set_extra_state(self, state: dict) -> None:
        for name in self._scale_names:
            setattr(self, name, state[name])


class Quantize(_ScalesAsState):
    """Float activations to the uint8 codes of an unsigned round-clip (QuantAct's codes): the head
    of a chain of fused layers. (*) float -> (*) uint8."""

    _scale_names = ("scale",)

    def __init__(self, bits: int, scale: float, backend: str | None = None):
        super().__init__()
        self.bits, self.scale, self.backend = bits, float(scale), backend

    def forward(self, x: Tensor) -> Tensor:
        return quant_op.quantize(x, self.bits, self.scale, signed=False, backend=self.backend)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.6g}"


class Dequantize(_ScalesAsState):
    """uint8 codes back to QuantAct's float values, scale * codes (computed in float32, then cast
    to `dtype`): where a chain of fused layers hands over to a float module."""

    _scale_names = ("scale",)

    def __init__(self, scale: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.scale, self.dtype = float(scale), dtype

    def forward(self, codes: Tensor) -> Tensor:
        return (codes.to(torch.float32) * self.scale).to(self.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, dtype={self.dtype}"


class LowBitLinear(_ScalesAsState):
    """Inference form of QuantLinear (-> LayerBatchNorm) (-> QuantAct): one ``lowbit_linear`` call.

    Input: uint8 codes of scale ``act_scale`` (the integer tensor-core path), or float activations,
    quantized first when ``act_bits`` is set and multiplied with the integer weight when not.
    The bias, the folded LBN affine (``out_scale``, ``out_shift``) and, with ``out_bits``, the next
    activation's quantization run in the matmul's epilogue. Output: uint8 codes of scale
    ``out_act_scale`` when ``out_bits`` is set, else floats in ``dtype`` (the original layer's).

    Shapes: (*, in_features) -> (*, out_features). Build one with ``from_layers`` or
    ``convert_for_inference``; the constructor makes an empty one to load a state dict into.
    """

    _scale_names = ("act_scale", "out_act_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int,
        act_bits: int | None = None,
        act_scale: float | None = None,
        folded_norm: bool = False,
        out_bits: int | None = None,
        out_act_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_bits, self.out_bits, self.dtype, self.backend = act_bits, out_bits, dtype, backend
        self.act_scale = None if act_bits is None else _scale(act_scale, act_bits)
        self.out_act_scale = None if out_bits is None else _scale(out_act_scale, out_bits)
        self.weight = quant_op.PackedWeight.empty(out_features, in_features, weight_bits)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("out_scale", torch.ones(out_features) if folded_norm else None)
        self.register_buffer("out_shift", torch.zeros(out_features) if folded_norm else None)

    @classmethod
    def from_layers(
        cls,
        layer: nn.Module,
        norm: nn.Module | None = None,
        *,
        act_in: tuple[int, float] | None = None,
        act_out: tuple[int, float] | None = None,
        backend: str | None = None,
    ) -> "LowBitLinear":
        """The fused form of an eval-mode ``layer`` (QuantLinear, or QuantConv2d for
        ``LowBitConv2d``), the LayerBatchNorm ``norm`` after it, codes of (bits, scale) ``act_in``
        coming in and ``act_out`` going out."""
        fused = cls(
            *cls._geometry(layer),
            layer.bias is not None,
            weight_bits=layer.weight_bits,
            act_bits=None if act_in is None else act_in[0],
            act_scale=None if act_in is None else act_in[1],
            folded_norm=norm is not None,
            out_bits=None if act_out is None else act_out[0],
            out_act_scale=None if act_out is None else act_out[1],
            dtype=layer.weight.dtype,
            backend=layer.backend if backend is None else backend,
        )
        with torch.no_grad():
            packed = layer.packed_weight()
            fused.to(packed.packed.device)
            fused.weight.load_state_dict(packed.state_dict())
            if fused.bias is not None:
                fused.bias.copy_(layer.bias.float())
            if norm is not None:
                a, b = norm.inference_affine()
                fused.out_scale.copy_(a.float())
                fused.out_shift.copy_(b.float())
        return fused

    @staticmethod
    def _geometry(layer: nn.Module) -> tuple:
        """The constructor's arguments before ``bias`` that describe `layer`'s shape."""
        return layer.in_features, layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = quant_op.lowbit_linear(
            x,
            self.weight,
            self.bias,
            act_bits=self.act_bits if x.is_floating_point() else None,
            act_scale=self.act_scale,
            out_scale=self.out_scale,
            out_shift=self.out_shift,
            out_bits=self.out_bits,
            out_act_scale=self.out_act_scale,
            backend=self.backend,
        )
        return y if self.out_bits is not None else y.to(self.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {_codes_repr(self)}, "
            f"folded_norm={self.out_scale is not None}"
        )


class LowBitConv2d(LowBitLinear):
    """Inference form of QuantConv2d (-> LayerBatchNorm) (-> QuantAct): im2col of the (uint8 or
    float) input, then ``LowBitLinear``'s single fused matmul. (N, C_in, H, W) -> (N, C_out, H_out,
    W_out), the output laid out channels-last (a permuted view of the matmul's rows)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        **fusion,
    ):
        kernel = _pair(kernel_size)
        super().__init__(in_channels * kernel[0] * kernel[1], out_channels, bias, **fusion)
        self.kernel_size, self.stride, self.padding = kernel, _pair(stride), _pair(padding)
        self.in_channels, self.out_channels = in_channels, out_channels

    @staticmethod
    def _geometry(layer: nn.Module) -> tuple:
        return layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, H, W) input; got shape {tuple(x.shape)}")
        if x.is_floating_point() and self.act_bits is not None:
            # im2col copies each input kernel_size^2 times: on one-byte codes, not on floats.
            x = quant_op.quantize(x, self.act_bits, self.act_scale, signed=False, backend=self.backend)
        n = x.shape[0]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        # Zero padding is code 0, which is the value 0 of an unsigned round-clip: padding the codes
        # equals padding the activations.
        patches = nn.functional.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)
        h_out, w_out = patches.shape[2:4]
        columns = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * h_out * w_out, self.in_features)
        y = super().forward(columns)
        return y.view(n, h_out, w_out, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, {_codes_repr(self)}, folded_norm={self.out_scale is not None}"
        )


def _scale(scale: float | None, bits: int) -> float:
    return quant_op.default_scale(bits, False) if scale is None else float(scale)


def _codes_repr(module: LowBitLinear) -> str:
    codes_in = f"{module.act_bits}-bit codes" if module.act_bits else "float"
    codes_out = f"{module.out_bits}-bit codes" if module.out_bits else str(module.dtype)
    return f"weight_bits={module.weight.bits}, in={codes_in}, out={codes_out}"
