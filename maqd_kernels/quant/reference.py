"""MaQD round-clip quantization in eager PyTorch: the executable form of SPEC.md section 2.

Sawada, Saiin, Suetake, "Magic for the Age of Quantized DNNs" (arXiv 2403.14999) for the idea;
SPEC.md for the exact formulas (weight standardization, symmetric round-clip with a fixed
Gaussian-optimal scale, LSQ's scale gradient after Esser et al., 2020).

Arithmetic runs in float32 (float64 for float64 inputs), one rounding per operation. Integer
matmuls accumulate exactly (in float64, whose 53 bits hold any sum of 8-bit by 8-bit products
the kernels can produce) and round once to float32, as the kernels' int32 accumulators do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..saf.reference import compute_dtype, round_to

Tensor = torch.Tensor

# quant_linear and quant_conv2d use the "sigmoid" surrogate with OTTT's steepness, like round_clip's default.
SURROGATE_ALPHA = 4.0

# Scale minimising E[(f(x) - round_clip(x))^2] for x ~ N(0, 1), f(x) = x when signed and
# max(x, 0) when unsigned, by bit width; python_tests/test_quant.py checks each is the minimiser.
# A signed b-bit grid has the same optimum as an unsigned (b-1)-bit one: both put 2^(b-1) - 1
# steps on each half-line.
DEFAULT_SCALES = {
    True: {1: 0.797885, 2: 1.224006, 3: 0.650770, 4: 0.353411, 5: 0.193249, 6: 0.105488, 7: 0.057261, 8: 0.030870},
    False: {1: 1.224006, 2: 0.650770, 3: 0.353411, 4: 0.193249, 5: 0.105488, 6: 0.057261, 7: 0.030870, 8: 0.016528},
}


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """(q_min, q_max) of a round-clip grid; signed 1-bit is the binary grid {-1, +1}."""
    if signed:
        if bits == 1:
            return -1, 1
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def _scale(x: Tensor, scale_tensor: Tensor | None, scale: float) -> Tensor | float:
    cdt = compute_dtype(x.dtype)
    return round_to(cdt, scale) if scale_tensor is None else scale_tensor.to(cdt)


def round_clip_codes(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """q = clamp(round_half_even(x / scale), q_min, q_max) in the compute dtype (binary: sign)."""
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    if signed and bits == 1:
        return torch.where(xc >= 0, 1.0, -1.0).to(cdt)
    q_min, q_max = code_range(bits, signed)
    return torch.clamp(torch.round(xc / _scale(x, scale_tensor, scale)), q_min, q_max)


def round_clip_forward(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """scale * q, in x's dtype (broadcast to the shape of x and scale)."""
    q = round_clip_codes(x, scale_tensor, scale, bits, signed)
    return (_scale(x, scale_tensor, scale) * q).to(x.dtype)


def sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sums a broadcast gradient back to the shape of the tensor that was broadcast."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def round_clip_backward(
    grad: Tensor,
    x: Tensor,
    scale_tensor: Tensor | None,
    scale: float,
    bits: int,
    signed: bool,
    surrogate: str,
    alpha: float,
) -> tuple[Tensor, Tensor | None]:
    """(dL/dx, dL/dscale); the second only for a tensor scale, summed to its shape.

    dx: "ste" passes the gradient where q_min <= x/scale <= q_max (everywhere for binary);
    "sigmoid" uses sum_k alpha g_k (1 - g_k), g_k = sigmoid(alpha (x/scale - k - 1/2)) over the
    rounding thresholds k = q_min .. q_max - 1 (binary: 2 alpha g (1 - g), g = sigmoid(alpha x/scale),
    its one threshold, of height 2, at 0). dscale: LSQ, q - x/scale inside the range, q_min or
    q_max outside (binary: q)."""
    cdt = compute_dtype(x.dtype)
    s = _scale(x, scale_tensor, scale)
    v = x.to(cdt) / s
    q = round_clip_codes(x, scale_tensor, scale, bits, signed)
    g = grad.to(cdt)
    q_min, q_max = code_range(bits, signed)
    binary = signed and bits == 1
    inside = torch.ones_like(v, dtype=torch.bool) if binary else (v >= q_min) & (v <= q_max)
    if surrogate == "ste":
        dx = inside.to(cdt)
    elif binary:
        sig = torch.sigmoid(alpha * v)
        dx = 2.0 * alpha * sig * (1.0 - sig)
    else:
        dx = torch.zeros_like(v)
        for k in range(q_min, q_max):
            sig = torch.sigmoid(alpha * (v - (k + 0.5)))
            dx = dx + alpha * sig * (1.0 - sig)
    grad_x = (g * dx).to(x.dtype)
    if scale_tensor is None:
        return grad_x, None
    dscale = q if binary else torch.where(inside, q - v, q)
    grad_scale = sum_to_shape(g * dscale, scale_tensor.shape).to(scale_tensor.dtype)
    return grad_x, grad_scale


def quantize(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """The round-clip codes q as int8 (signed) or uint8 (unsigned)."""
    return round_clip_codes(x, scale_tensor, scale, bits, signed).to(torch.int8 if signed else torch.uint8)


def _standardize_rows(w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(w_hat, 1/sqrt(var + eps)) of the (N, K) view of w in the compute dtype."""
    cdt = compute_dtype(w.dtype)
    rows = w.to(cdt).reshape(w.shape[0], -1)
    mean = rows.mean(dim=1, keepdim=True)
    var = rows.var(dim=1, unbiased=False, keepdim=True)
    std = torch.sqrt(var + round_to(cdt, eps))
    return (rows - mean) / std, 1.0 / std


def weight_standardize_forward(w: Tensor, eps: float) -> Tensor:
    """w_hat = (w - mean_o) / sqrt(var_o + eps) per output channel o (dim 0), biased variance."""
    return _standardize_rows(w, eps)[0].reshape(w.shape).to(w.dtype)


def weight_standardize_backward(grad: Tensor, w: Tensor, eps: float) -> Tensor:
    """dL/dw = (g - mean(g) - w_hat mean(g w_hat)) / sqrt(var + eps), per output channel."""
    w_hat, inv_std = _standardize_rows(w, eps)
    g = grad.to(w_hat.dtype).reshape(w_hat.shape)
    dw = inv_std * (g - g.mean(dim=1, keepdim=True) - w_hat * (g * w_hat).mean(dim=1, keepdim=True))
    return dw.reshape(w.shape).to(w.dtype)


def storage_bits(bits: int) -> int:
    """Bits each packed code occupies: 1, 2, 4 or 8 (3 is stored as 4, 5 to 7 as 8)."""
    return next(width for width in (1, 2, 4, 8) if width >= bits)


def codes_per_word(bits: int) -> int:
    return 32 // storage_bits(bits)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Packs signed codes (N, K) into int32 words (N, ceil(K / (32 / w))), w = storage_bits(bits).

    Code k of a row sits in word k // (32/w) at bit offset w * (k % (32/w)), stored offset-binary:
    q + 2^(w-1) (binary: (q + 1) / 2). Padding past K holds the zero code where one exists
    (the binary grid has none, so kernels mask k >= K themselves)."""
    width = storage_bits(bits)
    per_word = 32 // width
    n, k = codes.shape
    stored = (codes.to(torch.int64) + 1) // 2 if bits == 1 else codes.to(torch.int64) + 2 ** (width - 1)
    pad = -k % per_word
    if pad:
        stored = F.pad(stored, (0, pad), value=0 if bits == 1 else 2 ** (width - 1))
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * width
    words = (stored.reshape(n, -1, per_word) << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """The inverse of ``pack_codes``: int8 codes (N, in_features)."""
    width = storage_bits(bits)
    per_word = 32 // width
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * width
    stored = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & (2**width - 1)
    stored = stored.reshape(packed.shape[0], -1)[:, :in_features]
    codes = stored * 2 - 1 if bits == 1 else stored - 2 ** (width - 1)
    return codes.to(torch.int8)


def dequantize_weight(
    packed: Tensor, weight_scale: Tensor | None, bits: int, in_features: int, dtype: torch.dtype
) -> Tensor:
    """alpha_w[o] * q[o, k] computed in float32 and cast to `dtype`, (N, in_features); with no
    scale, the bare codes q in `dtype`."""
    codes = unpack_codes(packed, bits, in_features).to(torch.float32)
    return (codes if weight_scale is None else weight_scale.to(torch.float32).unsqueeze(1) * codes).to(dtype)


def pack_channel_scale(w: Tensor, scale_tensor: Tensor | None, scale: float) -> Tensor:
    """alpha_w as float32 (N,): the float scale, or a (1, 1) / (N, 1) scale tensor, per output channel."""
    n = w.shape[0]
    if scale_tensor is None:
        return torch.full((n,), round_to(torch.float32, scale), dtype=torch.float32, device=w.device)
    return scale_tensor.to(torch.float32).expand(n, 1).reshape(n).clone()


def pack_weight(
    w: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, standardize: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """Standardize (optionally), round-clip and pack a weight (N, K): (per-channel float32 scale
    alpha_w (N,), packed int32 codes), so that the quantized weight is alpha_w[o] * q[o, k]."""
    w_hat = weight_standardize_forward(w, eps) if standardize else w
    codes = quantize(w_hat, scale_tensor, scale, bits, signed=True)
    return pack_channel_scale(w, scale_tensor, scale), pack_codes(codes, bits)


def lowbit_output_dtype(x_dtype: torch.dtype, out_bits: int | None) -> torch.dtype:
    """uint8 codes when out_bits is set; else x's float dtype, or float32 for code inputs."""
    if out_bits is not None:
        return torch.uint8
    return x_dtype if x_dtype.is_floating_point else torch.float32


def lowbit_epilogue(
    acc: Tensor,
    combined_scale: Tensor,
    bias: Tensor | None,
    out_scale: Tensor | None,
    out_shift: Tensor | None,
    out_bits: int | None,
    out_act_scale: float | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """The fused epilogue of lowbit_linear on accumulators acc (M, N), each step one rounding:
    y = acc * combined_scale[o] + bias[o]; y = y * out_scale[o] + out_shift[o]; then the unsigned
    out_bits codes of y, or y in out_dtype. combined_scale is alpha_w[o] * act_scale (integer
    path) or alpha_w[o] (weight-only), in acc's dtype."""
    y = acc * combined_scale
    if bias is not None:
        y = y + bias.to(y.dtype)
    if out_scale is not None:
        y = y * out_scale.to(y.dtype) + out_shift.to(y.dtype)
    if out_bits is not None:
        return quantize(y, None, out_act_scale, out_bits, signed=False)
    return y.to(out_dtype)


def lowbit_linear(
    x: Tensor,
    packed: Tensor,
    weight_scale: Tensor,
    bits: int,
    in_features: int,
    bias: Tensor | None,
    act_bits: int | None,
    act_scale: float | None,
    out_scale: Tensor | None,
    out_shift: Tensor | None,
    out_bits: int | None,
    out_act_scale: float | None,
) -> Tensor:
    """y = acc * (alpha_w[o] * act_scale) + bias[o]; y = y * out_scale[o] + out_shift[o];
    out = quantize(y, out_bits, out_act_scale, unsigned) when out_bits is set (SPEC.md section 2).

    x is uint8/int8 codes (with act_scale), or float quantized here when act_bits is set (acc is
    then the exact integer product), or float times the integer weight (weight-only)."""
    codes = unpack_codes(packed, bits, in_features)
    rows = x.reshape(-1, in_features)
    if not x.is_floating_point() or act_bits is not None:
        x_codes = rows if not x.is_floating_point() else quantize(rows, None, act_scale, act_bits, signed=False)
        acc = (x_codes.to(torch.float64) @ codes.to(torch.float64).T).to(torch.float32)
        combined_scale = weight_scale * round_to(torch.float32, act_scale)
    else:
        cdt = compute_dtype(x.dtype)
        acc = rows.to(cdt) @ codes.to(cdt).T
        combined_scale = weight_scale.to(cdt)
    out_dtype = lowbit_output_dtype(x.dtype, out_bits)
    y = lowbit_epilogue(acc, combined_scale, bias, out_scale, out_shift, out_bits, out_act_scale, out_dtype)
    return y.reshape(*x.shape[:-1], packed.shape[0])


def lowbit_linear_backward(
    grad: Tensor,
    x: Tensor,
    packed: Tensor,
    weight_scale: Tensor,
    bits: int,
    in_features: int,
    bias: Tensor | None,
    act_bits: int | None,
    act_scale: float | None,
    out_scale: Tensor | None,
    out_shift: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dL/dx, dL/dbias, dL/dout_scale, dL/dout_shift) of ``lowbit_linear`` with no output
    quantization; the packed weight is frozen, integer codes x take no gradient, and float x's
    quantization (act_bits) passes the gradient where 0 <= x/act_scale <= 2^act_bits - 1 (STE)."""
    cdt = compute_dtype(x.dtype)
    n = packed.shape[0]
    g = grad.to(cdt).reshape(-1, n)
    grad_out_scale = grad_out_shift = None
    if out_scale is not None:
        y = lowbit_linear(x, packed, weight_scale, bits, in_features, bias, act_bits, act_scale, None, None, None, None)
        grad_out_scale = (g * y.to(cdt).reshape(-1, n)).sum(0).to(out_scale.dtype)
        grad_out_shift = g.sum(0).to(out_shift.dtype)
        g = g * out_scale.to(cdt)
    grad_bias = None if bias is None else g.sum(0).to(bias.dtype)
    if not x.is_floating_point():  # integer codes take no gradient
        return None, grad_bias, grad_out_scale, grad_out_shift
    codes = unpack_codes(packed, bits, in_features).to(cdt)
    grad_x = (g * weight_scale.to(cdt)) @ codes
    if act_bits is not None:
        v = x.to(cdt).reshape(-1, in_features) / round_to(cdt, act_scale)
        grad_x = grad_x * ((v >= 0) & (v <= 2**act_bits - 1)).to(cdt)
    return grad_x.reshape(x.shape).to(x.dtype), grad_bias, grad_out_scale, grad_out_shift


def _quantized_operands(
    x: Tensor, weight: Tensor, weight_bits: int, weight_scale: float, act_bits: int | None, act_scale: float | None
) -> tuple[Tensor, Tensor]:
    """(x_q, w_q) in the compute dtype."""
    cdt = compute_dtype(x.dtype)
    w_hat = weight_standardize_forward(weight.to(cdt), 1e-5)
    w_q = round_clip_forward(w_hat, None, weight_scale, weight_bits, signed=True)
    x_q = x.to(cdt) if act_bits is None else round_clip_forward(x.to(cdt), None, act_scale, act_bits, signed=False)
    return x_q, w_q


def quant_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_bits: int,
    weight_scale: float,
    act_bits: int | None,
    act_scale: float | None,
) -> Tensor:
    """F.linear(round_clip(x), round_clip(weight_standardize(weight)), bias)."""
    x_q, w_q = _quantized_operands(x, weight, weight_bits, weight_scale, act_bits, act_scale)
    return F.linear(x_q, w_q, None if bias is None else bias.to(x_q.dtype)).to(x.dtype)


def weight_quant_backward(
    grad_w_q: Tensor, weight: Tensor, bits: int, scale: float, surrogate: str, alpha: float, eps: float
) -> Tensor:
    """dL/dweight from dL/dw_q, w_q = round_clip(weight_standardize(weight), bits, scale, signed):
    the round-clip surrogate, then the standardization backward, per output channel (dim 0)."""
    cdt = compute_dtype(weight.dtype)
    w_hat = weight_standardize_forward(weight.to(cdt), eps)
    grad_w_hat = round_clip_backward(grad_w_q.to(cdt), w_hat, None, scale, bits, True, surrogate, alpha)[0]
    return weight_standardize_backward(grad_w_hat, weight.to(cdt), eps).to(weight.dtype)


def _quant_input_grads(
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
    """Carries gradients at the quantized operands back through round-clip and standardization."""
    grad_x = (
        grad_x_q
        if act_bits is None
        else round_clip_backward(
            grad_x_q, x.to(grad_x_q.dtype), None, act_scale, act_bits, False, surrogate, SURROGATE_ALPHA
        )[0]
    )
    grad_weight = weight_quant_backward(grad_w_q, weight, weight_bits, weight_scale, surrogate, SURROGATE_ALPHA, 1e-5)
    return grad_x.to(x.dtype), grad_weight


def quant_linear_backward(
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
    """(dL/dx, dL/dweight, dL/dbias): autograd of ``quant_linear_forward`` with the surrogates."""
    x_q, w_q = _quantized_operands(x, weight, weight_bits, weight_scale, act_bits, act_scale)
    g = grad.to(x_q.dtype)
    grad_x_q = g @ w_q
    grad_w_q = g.reshape(-1, weight.shape[0]).T @ x_q.reshape(-1, weight.shape[1])
    grad_x, grad_weight = _quant_input_grads(
        grad_x_q, grad_w_q, x, weight, weight_bits, weight_scale, act_bits, act_scale, surrogate
    )
    grad_bias = None if bias is None else g.reshape(-1, weight.shape[0]).sum(0).to(bias.dtype)
    return grad_x, grad_weight, grad_bias


def quant_conv2d_forward(
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
    """F.conv2d(round_clip(x), round_clip(weight_standardize(weight)), bias, ...)."""
    x_q, w_q = _quantized_operands(x, weight, weight_bits, weight_scale, act_bits, act_scale)
    out = F.conv2d(x_q, w_q, None if bias is None else bias.to(x_q.dtype), stride, padding, dilation, groups)
    return out.to(x.dtype)


def quant_conv2d_backward(
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
    """(dL/dx, dL/dweight, dL/dbias): autograd of ``quant_conv2d_forward`` with the surrogates."""
    x_q, w_q = _quantized_operands(x, weight, weight_bits, weight_scale, act_bits, act_scale)
    g = grad.to(x_q.dtype)
    grad_x_q, grad_w_q, _ = torch.ops.aten.convolution_backward(
        g, x_q, w_q, None, stride, padding, dilation, False, [0, 0], groups, [True, True, False]
    )
    grad_x, grad_weight = _quant_input_grads(
        grad_x_q, grad_w_q, x, weight, weight_bits, weight_scale, act_bits, act_scale, surrogate
    )
    grad_bias = None if bias is None else g.sum(dim=(0, 2, 3)).to(bias.dtype)
    return grad_x, grad_weight, grad_bias
