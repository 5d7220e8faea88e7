"""MaQD round-clip quantization as torch.library custom ops (namespace ``maqd``) and their public
Python faces, with ``PackedWeight``. SPEC.md section 2 is the contract."""

from typing import Optional

import torch
from torch import nn
from torch._prims_common import suggest_memory_format

from .. import _backend, _checks
from .._library import (
    autocast_dtype,
    cast,
    empty_if_none,
    memory_order,
    none_if_empty,
    run_below_autocast,
    strided_like,
)
from . import reference

Tensor = torch.Tensor

MAX_BITS = 8
SURROGATES = ("ste", "sigmoid")
CODE_DTYPES = (torch.uint8, torch.int8)

_backend.declare("weight_standardize_forward", reference.weight_standardize_forward)
_backend.declare("weight_standardize_backward", reference.weight_standardize_backward)
_backend.declare("unpack_weight", reference.unpack_codes)
_backend.declare("lowbit_linear_backward", reference.lowbit_linear_backward)
# Ops with cuda and triton kernels: quant/cuda.py and quant/triton.py define a launcher of each
# name, with its reference twin's signature.
for _name in (
    "round_clip_forward",
    "round_clip_backward",
    "quantize",
    "pack_weight",
    "dequantize_weight",
    "weight_quant_backward",
    "lowbit_linear",
    "quant_linear_forward",
    "quant_linear_backward",
    "quant_conv2d_forward",
    "quant_conv2d_backward",
):
    _backend.declare(
        _name,
        getattr(reference, _name),
        cuda=f"maqd_kernels.quant.cuda:{_name}",
        triton=f"maqd_kernels.quant.triton:{_name}",
    )


def default_scale(bits: int, signed: bool) -> float:
    """The round-clip scale minimising E[(f(x) - round_clip(x))^2] for x ~ N(0, 1), f(x) = x when
    signed (standardized weights) and max(x, 0) when unsigned (activations after LBN); to 1e-6.
    MaQD (Sawada et al., arXiv 2403.14999); SPEC.md section 2."""
    _checks.integer("bits", bits, 1, MAX_BITS)
    return reference.DEFAULT_SCALES[_checks.boolean("signed", signed)][bits]


def _split_scale(scale, like: Tensor, name: str = "scale") -> tuple[Tensor | None, float]:
    """A float scale or a tensor broadcastable to `like`, as the custom ops take it."""
    if isinstance(scale, Tensor):
        _checks.tensor(name, scale, device=like.device)
        try:
            broadcast = torch.broadcast_shapes(scale.shape, like.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != like.shape:
            raise ValueError(
                f"{name} of shape {tuple(scale.shape)} must broadcast to the input's shape {tuple(like.shape)}"
            )
        return scale, 0.0
    return None, _checks.positive(name, scale)


# ----------------------------------------------------------------------------- weight_standardize


@torch.library.custom_op("maqd::weight_standardize", mutates_args=())
def _weight_standardize(w: Tensor, eps: float, backend: Optional[str]) -> Tensor:
    return strided_like(_backend.resolve("weight_standardize_forward", w, backend)(w, eps), w)


@_weight_standardize.register_fake
def _(w, eps, backend):
    return torch.empty_like(w)


@torch.library.custom_op("maqd::weight_standardize_backward", mutates_args=())
def _weight_standardize_backward(grad: Tensor, w: Tensor, eps: float, backend: Optional[str]) -> Tensor:
    return strided_like(_backend.resolve("weight_standardize_backward", w, backend)(grad.contiguous(), w, eps), w)


@_weight_standardize_backward.register_fake
def _(grad, w, eps, backend):
    return torch.empty_like(w)


def _weight_standardize_setup(ctx, inputs, output):
    w, eps, backend = inputs
    ctx.save_for_backward(w)
    ctx.args = (eps, backend)


def _weight_standardize_grad(ctx, grad):
    return torch.ops.maqd.weight_standardize_backward(grad, ctx.saved_tensors[0], *ctx.args), None, None


_weight_standardize.register_autograd(_weight_standardize_grad, setup_context=_weight_standardize_setup)


def weight_standardize(w: Tensor, eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    """Weight standardization, per output channel o (dim 0) over all other dims:
    w_hat = (w - mean_o) / sqrt(var_o + eps), biased variance. MaQD (Sawada et al.,
    arXiv 2403.14999); SPEC.md section 2.

    Args: w: (out, ...) float weight with at least 2 dims. Returns: w_hat, same shape, dtype and memory format.
    """
    _checks.tensor("w", w, min_dim=2)
    _backend.check_backward("weight_standardize_backward", w, _checks.backend(backend), w)
    return _weight_standardize(w, _checks.positive("eps", eps), backend)


# ----------------------------------------------------------------------------- round_clip


def _elementwise_order(x: Tensor, scale_tensor: Tensor | None) -> tuple[list[int], list[int]]:
    """``memory_order(x)`` for the round-clip kernels, or the identity when the scale is a tensor of
    several elements: the kernels read it broadcast to x's shape, so it would need permuting too."""
    if scale_tensor is not None and scale_tensor.numel() > 1:
        identity = list(range(x.dim()))
        return identity, identity
    return memory_order(x)


@torch.library.custom_op("maqd::round_clip", mutates_args=())
def _round_clip(
    x: Tensor,
    scale_tensor: Optional[Tensor],
    scale: float,
    bits: int,
    signed: bool,
    surrogate: str,
    alpha: float,
    backend: Optional[str],
) -> Tensor:
    order, inverse = _elementwise_order(x, scale_tensor)
    y = _backend.resolve("round_clip_forward", x, backend)(x.permute(order), scale_tensor, scale, bits, signed)
    return strided_like(y.permute(inverse), x)


@_round_clip.register_fake
def _(x, scale_tensor, *args):
    return torch.empty_like(x)


@torch.library.custom_op("maqd::round_clip_backward", mutates_args=())
def _round_clip_backward(
    grad: Tensor,
    x: Tensor,
    scale_tensor: Optional[Tensor],
    scale: float,
    bits: int,
    signed: bool,
    surrogate: str,
    alpha: float,
    backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    impl = _backend.resolve("round_clip_backward", x, backend)
    order, inverse = _elementwise_order(x, scale_tensor)
    grad_x, grad_scale = impl(
        grad.permute(order).contiguous(), x.permute(order), scale_tensor, scale, bits, signed, surrogate, alpha
    )
    return strided_like(grad_x.permute(inverse), x), empty_if_none(strided_like(grad_scale, scale_tensor), x)


@_round_clip_backward.register_fake
def _(grad, x, scale_tensor, *args):
    return torch.empty_like(x), (torch.empty_like(scale_tensor) if scale_tensor is not None else x.new_empty(0))


def _round_clip_setup(ctx, inputs, output):
    x, scale_tensor, *params = inputs
    ctx.save_for_backward(x, scale_tensor)
    ctx.params = params


def _round_clip_grad(ctx, grad):
    x, scale_tensor = ctx.saved_tensors
    grad_x, grad_scale = torch.ops.maqd.round_clip_backward(grad, x, scale_tensor, *ctx.params)
    return (grad_x, none_if_empty(grad_scale) if scale_tensor is not None else None) + (None,) * 6


_round_clip.register_autograd(_round_clip_grad, setup_context=_round_clip_setup)


def round_clip(
    x: Tensor,
    bits: int,
    scale: float | Tensor,
    *,
    signed: bool,
    surrogate: str = "ste",
    alpha: float = 4.0,
    backend: str | None = None,
) -> Tensor:
    """Fake quantization scale * clamp(round_half_even(x / scale), q_min, q_max). MaQD (Sawada et al.,
    arXiv 2403.14999); SPEC.md section 2.

    Grids: signed b >= 2 is symmetric, q in [-(2^(b-1) - 1), 2^(b-1) - 1] (2 bits: ternary);
    signed 1 bit is binary, q = +1 for x >= 0 else -1; unsigned is q in [0, 2^b - 1].

    Args:
        x: float tensor, any shape. bits: 1..8. scale: float > 0 or a float tensor broadcastable
            to x (per-channel scales; it then gets LSQ's gradient, Esser et al., 2020).
        surrogate: gradient in x: "ste" (pass inside the range) or "sigmoid" (smooth staircase,
            steepness alpha).
    Returns: scale * q in x's dtype, shape and memory format.
    """
    _checks.tensor("x", x)
    _checks.integer("bits", bits, 1, MAX_BITS)
    scale_tensor, scale_value = _split_scale(scale, x)
    _backend.check_backward("round_clip_backward", x, _checks.backend(backend), x, scale_tensor)
    return _round_clip(
        x,
        scale_tensor,
        scale_value,
        bits,
        _checks.boolean("signed", signed),
        _checks.choice("surrogate", surrogate, SURROGATES),
        _checks.positive("alpha", alpha),
        _checks.backend(backend),
    )


# ----------------------------------------------------------------------------- quantize


@torch.library.custom_op("maqd::quantize", mutates_args=())
def _quantize(
    x: Tensor, scale_tensor: Optional[Tensor], scale: float, bits: int, signed: bool, backend: Optional[str]
) -> Tensor:
    order, inverse = _elementwise_order(x, scale_tensor)
    codes = _backend.resolve("quantize", x, backend)(x.permute(order), scale_tensor, scale, bits, signed)
    return strided_like(codes.permute(inverse), x)


@_quantize.register_fake
def _(x, scale_tensor, scale, bits, signed, backend):
    return torch.empty_like(x, dtype=torch.int8 if signed else torch.uint8)


def quantize(x: Tensor, bits: int, scale: float | Tensor, *, signed: bool, backend: str | None = None) -> Tensor:
    """The integer codes of ``round_clip``: clamp(round_half_even(x / scale), q_min, q_max).

    Args: as ``round_clip``. Returns: int8 codes (signed) or uint8 codes (unsigned), shape and memory format of x.
    Not differentiable (integer output); train through ``round_clip``.
    """
    _checks.tensor("x", x)
    _checks.integer("bits", bits, 1, MAX_BITS)
    scale_tensor, scale_value = _split_scale(scale, x)
    return _quantize(x, scale_tensor, scale_value, bits, _checks.boolean("signed", signed), _checks.backend(backend))


# ----------------------------------------------------------------------------- packing


@torch.library.custom_op("maqd::pack_weight", mutates_args=())
def _pack_weight(
    w: Tensor,
    scale_tensor: Optional[Tensor],
    scale: float,
    bits: int,
    standardize: bool,
    eps: float,
    backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    return _backend.resolve("pack_weight", w, backend)(w, scale_tensor, scale, bits, standardize, eps)


@_pack_weight.register_fake
def _(w, scale_tensor, scale, bits, standardize, eps, backend):
    words = -(-w.shape[1] // reference.codes_per_word(bits))
    return w.new_empty((w.shape[0],), dtype=torch.float32), w.new_empty((w.shape[0], words), dtype=torch.int32)


def _pack_weight_setup(ctx, inputs, output):
    ctx.scale_shape = None if inputs[1] is None else inputs[1].shape
    ctx.scale_dtype = None if inputs[1] is None else inputs[1].dtype


def _pack_weight_grad(ctx, grad_channel_scale, grad_packed):
    # The codes are piecewise constant in w; a tensor scale passes straight to alpha_w.
    grad_scale = None
    if ctx.scale_shape is not None:
        grad_scale = reference.sum_to_shape(grad_channel_scale.unsqueeze(1), ctx.scale_shape).to(ctx.scale_dtype)
    return None, grad_scale, None, None, None, None, None


_pack_weight.register_autograd(_pack_weight_grad, setup_context=_pack_weight_setup)


@torch.library.custom_op("maqd::unpack_weight", mutates_args=())
def _unpack_weight(packed: Tensor, bits: int, in_features: int, backend: Optional[str]) -> Tensor:
    return _backend.resolve("unpack_weight", packed, backend)(packed, bits, in_features)


@_unpack_weight.register_fake
def _(packed, bits, in_features, backend):
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.int8)


class PackedWeight(nn.Module):
    """A weight (out_features, in_features) quantized to `bits`-bit signed codes and packed for the
    low-bit kernels: the quantized weight is ``scale[o] * codes[o, k]``.

    Buffers ``packed`` (int32 words; layout in ``reference.pack_codes``, the kernels' business)
    and ``scale`` (float32 alpha_w, (out_features,)); ``bits`` and ``in_features`` travel as extra
    state, so a PackedWeight (or a module holding one) survives ``state_dict`` save and load. Build
    one with ``pack_weight``, or ``PackedWeight.empty(...)`` to load a state dict into.
    """

    def __init__(self, packed: Tensor, scale: Tensor, bits: int, in_features: int):
        super().__init__()
        _checks.integer("bits", bits, 1, MAX_BITS)
        _checks.tensor("packed", packed, dtypes=(torch.int32,), min_dim=2)
        _checks.tensor("scale", scale, dtypes=(torch.float32,), device=packed.device)
        words = -(-in_features // reference.codes_per_word(bits))
        _checks.shape("packed", packed, (packed.shape[0], words), f"{in_features} {bits}-bit codes per row")
        _checks.shape("scale", scale, (packed.shape[0],), "one scale per output channel")
        self.bits = bits
        self.in_features = in_features
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bits: int, device=None) -> "PackedWeight":
        words = -(-in_features // reference.codes_per_word(bits))
        return cls(
            torch.zeros((out_features, words), dtype=torch.int32, device=device),
            torch.ones(out_features, dtype=torch.float32, device=device),
            bits,
            in_features,
        )

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def unpack(self, *, backend: str | None = None) -> Tensor:
        """The int8 codes (out_features, in_features), exactly as quantized."""
        return _unpack_weight(self.packed, self.bits, self.in_features, _checks.backend(backend))

    def dequantize(self) -> Tensor:
        """scale[o] * codes[o, k] as float32 (out_features, in_features)."""
        return self.scale.unsqueeze(1) * self.unpack().to(torch.float32)

    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "in_features": self.in_features}

    def set_extra_state(self, state: dict) -> None:
        if (state["bits"], state["in_features"]) != (self.bits, self.in_features):
            raise ValueError(
                f"state_dict holds a {state['bits']}-bit weight with {state['in_features']} inputs; this "
                f"PackedWeight is {self.bits}-bit with {self.in_features}: build it with those first"
            )

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, bits={self.bits}"


def pack_weight(
    w: Tensor,
    bits: int,
    *,
    scale: float | Tensor | None = None,
    standardize: bool = True,
    eps: float = 1e-5,
    backend: str | None = None,
) -> PackedWeight:
    """Standardizes (optionally), round-clips and packs a weight in one pass. MaQD (Sawada et al.,
    arXiv 2403.14999); SPEC.md section 2.

    Args:
        w: (out_features, in_features) float weight. bits: 1..8 (stored in 1, 2, 4 or 8 bits).
        scale: float, a per-channel tensor (out_features,) or (out_features, 1), or None for
            ``default_scale(bits, signed=True)``.
        standardize: apply ``weight_standardize`` first (as QuantLinear's forward does).
    Returns: a PackedWeight whose codes equal ``quantize(weight_standardize(w), bits, scale, signed=True)``.
    """
    _checks.tensor("w", w, min_dim=2)
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D (out_features, in_features) weight; got shape {tuple(w.shape)}")
    _checks.integer("bits", bits, 1, MAX_BITS)
    if isinstance(scale, Tensor):
        if scale.numel() not in (1, w.shape[0]) or scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != 1):
            raise ValueError(
                f"scale must be a float, a scalar tensor or per-channel ({w.shape[0]},) or "
                f"({w.shape[0]}, 1); got shape {tuple(scale.shape)}"
            )
        scale = scale.reshape(-1, 1)
    scale_tensor, scale_value = _split_scale(default_scale(bits, True) if scale is None else scale, w)
    channel_scale, packed = _pack_weight(
        w, scale_tensor, scale_value, bits, bool(standardize), _checks.positive("eps", eps), _checks.backend(backend)
    )
    return PackedWeight(packed, channel_scale, bits, w.shape[1])


# ----------------------------------------------------------------------------- lowbit_linear


@torch.library.custom_op("maqd::lowbit_linear", mutates_args=())
def _lowbit_linear(
    x: Tensor,
    packed: Tensor,
    weight_scale: Tensor,
    bits: int,
    in_features: int,
    bias: Optional[Tensor],
    act_bits: Optional[int],
    act_scale: Optional[float],
    out_scale: Optional[Tensor],
    out_shift: Optional[Tensor],
    out_bits: Optional[int],
    out_act_scale: Optional[float],
    backend: Optional[str],
) -> Tensor:
    # Integer codes carry no float dtype; the float32 channel scales choose the kernel for them.
    impl = _backend.resolve("lowbit_linear", x if x.is_floating_point() else weight_scale, backend)
    return impl(
        x,
        packed,
        weight_scale,
        bits,
        in_features,
        bias,
        act_bits,
        act_scale,
        out_scale,
        out_shift,
        out_bits,
        out_act_scale,
    )


@_lowbit_linear.register_fake
def _(
    x,
    packed,
    weight_scale,
    bits,
    in_features,
    bias,
    act_bits,
    act_scale,
    out_scale,
    out_shift,
    out_bits,
    out_act_scale,
    backend,
):
    return x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=reference.lowbit_output_dtype(x.dtype, out_bits))


@torch.library.custom_op("maqd::lowbit_linear_backward", mutates_args=())
def _lowbit_linear_backward(
    grad: Tensor,
    x: Tensor,
    packed: Tensor,
    weight_scale: Tensor,
    bits: int,
    in_features: int,
    bias: Optional[Tensor],
    act_bits: Optional[int],
    act_scale: Optional[float],
    out_scale: Optional[Tensor],
    out_shift: Optional[Tensor],
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.resolve("lowbit_linear_backward", x, backend)
    grad_x, *vector_grads = impl(
        grad.contiguous(), x, packed, weight_scale, bits, in_features, bias, act_bits, act_scale, out_scale, out_shift
    )
    return (empty_if_none(strided_like(grad_x, x), grad), *(empty_if_none(g, grad) for g in vector_grads))


@_lowbit_linear_backward.register_fake
def _(grad, x, packed, weight_scale, bits, in_features, bias, act_bits, act_scale, out_scale, out_shift, backend):
    x_grad_like = x if x.is_floating_point() else None
    return tuple(
        torch.empty_like(t) if t is not None else grad.new_empty(0) for t in (x_grad_like, bias, out_scale, out_shift)
    )


def _lowbit_linear_setup(ctx, inputs, output):
    x, packed, weight_scale, bits, in_features, bias, act_bits, act_scale, out_scale, out_shift, *_, backend = inputs
    ctx.save_for_backward(x, packed, weight_scale, bias, out_scale, out_shift)
    ctx.args = (bits, in_features, act_bits, act_scale, backend)


def _lowbit_linear_grad(ctx, grad):
    x, packed, weight_scale, bias, out_scale, out_shift = ctx.saved_tensors
    bits, in_features, act_bits, act_scale, backend = ctx.args
    grad_x, grad_bias, grad_out_scale, grad_out_shift = torch.ops.maqd.lowbit_linear_backward(
        grad, x, packed, weight_scale, bits, in_features, bias, act_bits, act_scale, out_scale, out_shift, backend
    )
    return (
        none_if_empty(grad_x),
        None,
        None,
        None,
        None,
        none_if_empty(grad_bias),
        None,
        None,
        none_if_empty(grad_out_scale),
        none_if_empty(grad_out_shift),
        None,
        None,
        None,
    )


_lowbit_linear.register_autograd(_lowbit_linear_grad, setup_context=_lowbit_linear_setup)


def _check_channel_vector(name: str, value, n: int, device: torch.device) -> Tensor | None:
    value = _checks.optional_tensor(name, value, device=device)
    if value is not None:
        _checks.shape(name, value, (n,), "out_features")
    return value


def lowbit_linear(
    x: Tensor,
    w: PackedWeight,
    bias: Tensor | None = None,
    *,
    act_bits: int | None = None,
    act_scale: float | None = None,
    out_scale: Tensor | None = None,
    out_shift: Tensor | None = None,
    out_bits: int | None = None,
    out_act_scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Low-bit linear layer for inference with a fused epilogue (SPEC.md section 2; MaQD):

        x_q = x if x is uint8/int8 codes, else quantize(x, act_bits, act_scale) when act_bits is set
        acc = x_q @ w_q^T                   (exact integer accumulation; float x times integer
                                             weights when neither codes nor act_bits)
        y   = acc * (alpha_w[o] * act_scale) + bias[o]
        y   = y * out_scale[o] + out_shift[o]                 (a folded LayerBatchNorm)
        out = quantize(y, out_bits, out_act_scale, unsigned)  when out_bits is set

    Args:
        x: (*, in_features) float activations, or uint8/int8 codes with act_scale.
        w: a PackedWeight. bias, out_scale, out_shift: (out_features,) float tensors.
        act_bits / out_bits: 1..8. act_scale / out_act_scale: default ``default_scale(bits, False)``.
    Returns:
        (*, out_features): uint8 codes when out_bits is set, else float (x's dtype; float32 for
        code inputs). Differentiable in float x, bias, out_scale and out_shift when out_bits is
        None; the packed weight is frozen.
    """
    if not isinstance(w, PackedWeight):
        raise TypeError(f"w must be a PackedWeight (see pack_weight), got {type(w).__name__}")
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES + CODE_DTYPES, min_dim=1, device=w.packed.device)
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x's last dimension must be w.in_features = {w.in_features}; got shape {tuple(x.shape)}")
    n = w.out_features
    bias = _check_channel_vector("bias", bias, n, x.device)
    out_scale = _check_channel_vector("out_scale", out_scale, n, x.device)
    out_shift = _check_channel_vector("out_shift", out_shift, n, x.device)
    if (out_scale is None) != (out_shift is None):
        raise ValueError("out_scale and out_shift come together (the folded LBN affine); got only one")
    if x.is_floating_point():
        if act_bits is not None:
            _checks.integer("act_bits", act_bits, 1, MAX_BITS)
            act_scale = (
                default_scale(act_bits, False) if act_scale is None else _checks.positive("act_scale", act_scale)
            )
    else:
        if act_scale is None:
            raise ValueError("act_scale is required when x holds integer codes: it is the activations' scale")
        act_scale = _checks.positive("act_scale", act_scale)
        act_bits = None
    if out_bits is not None:
        _checks.integer("out_bits", out_bits, 1, MAX_BITS)
        out_act_scale = (
            default_scale(out_bits, False)
            if out_act_scale is None
            else _checks.positive("out_act_scale", out_act_scale)
        )
    if x.is_floating_point() and out_bits is None:
        _backend.check_backward("lowbit_linear_backward", x, _checks.backend(backend), x, bias, out_scale, out_shift)
    return _lowbit_linear(
        x,
        w.packed,
        w.scale,
        w.bits,
        w.in_features,
        bias,
        act_bits,
        act_scale,
        out_scale,
        out_shift,
        out_bits,
        out_act_scale,
        _checks.backend(backend),
    )


# ----------------------------------------------------------------------------- quant_linear / quant_conv2d


@torch.library.custom_op("maqd::quant_linear", mutates_args=())
def _quant_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_bits: int,
    weight_scale: float,
    act_bits: Optional[int],
    act_scale: Optional[float],
    surrogate: str,
    backend: Optional[str],
) -> Tensor:
    impl = _backend.resolve("quant_linear_forward", x, backend)
    return impl(x, weight, bias, weight_bits, weight_scale, act_bits, act_scale)


@_quant_linear.register_fake
def _(x, weight, *args):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("maqd::quant_linear_backward", mutates_args=())
def _quant_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_bits: int,
    weight_scale: float,
    act_bits: Optional[int],
    act_scale: Optional[float],
    surrogate: str,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.resolve("quant_linear_backward", x, backend)
    grad_x, grad_weight, grad_bias = impl(
        grad.contiguous(), x, weight, bias, weight_bits, weight_scale, act_bits, act_scale, surrogate
    )
    return strided_like(grad_x, x), strided_like(grad_weight, weight), empty_if_none(grad_bias, weight)


@_quant_linear_backward.register_fake
def _(grad, x, weight, bias, *args):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        (torch.empty_like(bias) if bias is not None else weight.new_empty(0)),
    )


def _quant_layer_setup(ctx, inputs, output):
    x, weight, bias, *params = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.params = params


def _quant_linear_grad(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.maqd.quant_linear_backward(grad, x, weight, bias, *ctx.params)
    return (grad_x, grad_weight, none_if_empty(grad_bias)) + (None,) * 6


_quant_linear.register_autograd(_quant_linear_grad, setup_context=_quant_layer_setup)


def _quant_args(
    x: Tensor, weight: Tensor, bias, weight_bits, weight_scale, act_bits, act_scale, surrogate, autocast: bool
) -> tuple:
    # Under torch.autocast the weight may stay float32: the op standardizes and quantizes it from
    # float32 whatever its dtype, and only its decoded codes meet x.
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES if autocast else (x.dtype,), device=x.device)
    _checks.optional_tensor("bias", bias, dtypes=(x.dtype,), device=x.device)
    if bias is not None:
        _checks.shape("bias", bias, (weight.shape[0],), "out_features")
    _checks.integer("weight_bits", weight_bits, 1, MAX_BITS)
    weight_scale = (
        default_scale(weight_bits, True) if weight_scale is None else _checks.positive("weight_scale", weight_scale)
    )
    if act_bits is not None:
        _checks.integer("act_bits", act_bits, 1, MAX_BITS)
        act_scale = default_scale(act_bits, False) if act_scale is None else _checks.positive("act_scale", act_scale)
    return weight_bits, weight_scale, act_bits, act_scale, _checks.choice("surrogate", surrogate, SURROGATES)


def quant_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    weight_bits: int,
    weight_scale: float | None = None,
    act_bits: int | None = None,
    act_scale: float | None = None,
    surrogate: str = "ste",
    backend: str | None = None,
) -> Tensor:
    """Quantization-aware linear layer (MaQD, Sawada et al., arXiv 2403.14999; SPEC.md section 2):
    F.linear(round_clip(x, act_bits, act_scale, unsigned), round_clip(weight_standardize(weight),
    weight_bits, weight_scale, signed), bias), differentiated with the round-clip surrogates.

    Args:
        x: (*, in_features) float. weight: (out_features, in_features), x's dtype. bias: (out_features,).
            Inside ``torch.autocast``, x and bias are cast to its dtype (the matmul runs in it, as
            F.linear's) and the weight may keep its own: its codes come from its float32 values.
        weight_bits / act_bits: 1..8 (act_bits None leaves x unquantized).
        weight_scale / act_scale: default ``default_scale(bits, signed)``.
        surrogate: "ste" or "sigmoid" (steepness 4).
    Returns: (*, out_features) in x's dtype (the autocast dtype inside an autocast region).
    """
    _checks.tensor("x", x, min_dim=1)
    _checks.tensor("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out_features, {x.shape[-1]}) to match x; got {tuple(weight.shape)}")
    dtype = autocast_dtype(x)
    x, bias = cast(dtype, x, bias)
    args = _quant_args(x, weight, bias, weight_bits, weight_scale, act_bits, act_scale, surrogate, dtype is not None)
    _backend.check_backward("quant_linear_backward", x, _checks.backend(backend), x, weight, bias)
    return _quant_linear(x, weight, bias, *args, backend)


@torch.library.custom_op("maqd::quant_conv2d", mutates_args=())
def _quant_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    weight_bits: int,
    weight_scale: float,
    act_bits: Optional[int],
    act_scale: Optional[float],
    surrogate: str,
    backend: Optional[str],
) -> Tensor:
    impl = _backend.resolve("quant_conv2d_forward", x, backend)
    out = impl(x, weight, bias, stride, padding, dilation, groups, weight_bits, weight_scale, act_bits, act_scale)
    return strided_like(out, _conv2d_output(x, weight, stride, padding, dilation, device="meta"))


@_quant_conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, *args):
    return _conv2d_output(x, weight, stride, padding, dilation)


def _conv2d_output(x: Tensor, weight: Tensor, stride, padding, dilation, device=None) -> Tensor:
    """An uninitialized tensor of quant_conv2d's output shape and layout, on `device` (x's by default).

    The layout is F.conv2d's for x: channels-last when x's strides order its dims as channels-last
    (torch's suggest_memory_format, as F.conv2d reads them), else contiguous. The weight's layout
    plays no part (on CUDA F.conv2d also follows a channels-last weight): the kernels convolve a
    freshly quantized, contiguous copy of it."""
    size = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]
    return torch.empty(
        (x.shape[0], weight.shape[0], *size),
        dtype=x.dtype,
        device=x.device if device is None else device,
        memory_format=suggest_memory_format(x),
    )


@torch.library.custom_op("maqd::quant_conv2d_backward", mutates_args=())
def _quant_conv2d_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    weight_bits: int,
    weight_scale: float,
    act_bits: Optional[int],
    act_scale: Optional[float],
    surrogate: str,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.resolve("quant_conv2d_backward", x, backend)
    grad_x, grad_weight, grad_bias = impl(
        grad.contiguous(memory_format=suggest_memory_format(x)),  # the output's layout: no copy
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        weight_bits,
        weight_scale,
        act_bits,
        act_scale,
        surrogate,
    )
    return strided_like(grad_x, x), strided_like(grad_weight, weight), empty_if_none(grad_bias, weight)


@_quant_conv2d_backward.register_fake
def _(grad, x, weight, bias, *args):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        (torch.empty_like(bias) if bias is not None else weight.new_empty(0)),
    )


def _quant_conv2d_grad(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.maqd.quant_conv2d_backward(grad, x, weight, bias, *ctx.params)
    return (grad_x, grad_weight, none_if_empty(grad_bias)) + (None,) * 10


_quant_conv2d.register_autograd(_quant_conv2d_grad, setup_context=_quant_layer_setup)


def _pair(name: str, value) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}")
    return pair


def quant_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    weight_bits: int,
    weight_scale: float | None = None,
    act_bits: int | None = None,
    act_scale: float | None = None,
    surrogate: str = "ste",
    backend: str | None = None,
) -> Tensor:
    """Quantization-aware 2-D convolution: ``quant_linear``'s definition with F.conv2d (MaQD;
    SPEC.md section 2).

    Args:
        x: (N, C_in, H, W) float. weight: (C_out, C_in / groups, kH, kW). bias: (C_out,).
        stride, padding, dilation, groups: as F.conv2d (padding as ints). Others as ``quant_linear``
            (torch.autocast included).
    Returns: (N, C_out, H_out, W_out) in x's dtype (the autocast dtype inside an autocast region),
        laid out as F.conv2d lays it out: channels-last for a channels-last x, else contiguous.
    """
    _checks.tensor("x", x, min_dim=4)
    _checks.tensor("weight", weight, min_dim=4)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"x must be (N, C, H, W) and weight (C_out, C_in/groups, kH, kW); got shapes "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    groups = _checks.integer("groups", groups, 1)
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not fit x with {x.shape[1]} channels in "
            f"groups={groups} (weight must be (C_out, C_in / groups, kH, kW), C_out divisible by groups)"
        )
    dtype = autocast_dtype(x)
    x, bias = cast(dtype, x, bias)
    args = _quant_args(x, weight, bias, weight_bits, weight_scale, act_bits, act_scale, surrogate, dtype is not None)
    _backend.check_backward("quant_conv2d_backward", x, _checks.backend(backend), x, weight, bias)
    return _quant_conv2d(
        x,
        weight,
        bias,
        _pair("stride", stride),
        _pair("padding", padding),
        _pair("dilation", dilation),
        groups,
        *args,
        _checks.backend(backend),
    )


# torch.autocast stops at these ops' boundary (see run_below_autocast).
run_below_autocast(
    _weight_standardize,
    _weight_standardize_backward,
    _round_clip,
    _round_clip_backward,
    _quantize,
    _pack_weight,
    _unpack_weight,
    _lowbit_linear,
    _lowbit_linear_backward,
    _quant_linear,
    _quant_linear_backward,
    _quant_conv2d,
    _quant_conv2d_backward,
)
