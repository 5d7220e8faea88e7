"""Launchers of the hand-written MaQD kernels in csrc/quant.cu and csrc/lowbit_gemm.cu: operand
preparation (quant.fused), output allocation, stream.

Each launcher has the signature of its twin in ``reference``. The ``*_host`` variants run the
kernels' math (the __host__ __device__ functions of csrc/quant.cuh) on CPU tensors: CI, which has
no GPU, tests the CUDA math through them.
"""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPE_CODES
from .._cuda_launch import _check, _check_device, _launch, _ptr
from . import fused, reference

Tensor = torch.Tensor

# lowbit_gemv keeps one float32 accumulator per activation row in registers, for up to this many
# rows (csrc/quant.cu kGemvMaxRows); more rows go to cuBLAS on the decoded weight.
GEMV_MAX_ROWS = 16
# Output dtype code of uint8 codes in the low-bit matmuls (csrc/quant.cuh kOutUint8).
UINT8_OUT_CODE = 3
# The integer kernel reads activation rows in 16-byte steps (launchers.h, lowbit_gemm).
GEMM_ROW_ALIGN = 16
# Outputs of round_clip_forward (launchers.h).
OUTPUT_CODES, OUTPUT_VALUES = 0, 1


def _surrogate_code(surrogate: str) -> int:
    if surrogate not in fused.SURROGATE_CODES:
        raise ValueError(f"surrogate must be one of {', '.join(fused.SURROGATE_CODES)}; got {surrogate!r}")
    return fused.SURROGATE_CODES[surrogate]


def _common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """A kernel reads one storage dtype; float32 holds either exactly, and the math is float32 anyway."""
    return (a, b) if a.dtype == b.dtype else (a.float(), b.float())


def _round_clip_forward(
    x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool, output: int, on_host: bool
) -> Tensor:
    _check("x", x, on_host)
    xc = x.contiguous()
    operand = fused.scale_operand(xc, scale_tensor, scale)
    if output == OUTPUT_CODES:
        out = torch.empty(xc.shape, dtype=torch.int8 if signed else torch.uint8, device=xc.device)
    else:
        out = torch.empty_like(xc)
    if xc.numel():
        _launch(
            "round_clip_forward",
            on_host,
            xc.device,
            xc.data_ptr(),
            out.data_ptr(),
            _ptr(operand.tensor),
            operand.mode,
            operand.value,
            xc.numel(),
            FLOAT_DTYPE_CODES[xc.dtype],
            bits,
            signed,
            output,
        )
    return out


def round_clip_forward(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """scale * round-clip codes of x on the GPU, in x's dtype and shape."""
    return _round_clip_forward(x, scale_tensor, scale, bits, signed, OUTPUT_VALUES, on_host=False)


def round_clip_forward_host(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """The same per-element CUDA math run on CPU tensors (for tests without a GPU)."""
    return _round_clip_forward(x, scale_tensor, scale, bits, signed, OUTPUT_VALUES, on_host=True)


def quantize(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """The round-clip codes of x on the GPU: int8 (signed) or uint8, shape of x."""
    return _round_clip_forward(x, scale_tensor, scale, bits, signed, OUTPUT_CODES, on_host=False)


def quantize_host(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """The same per-element CUDA math run on CPU tensors (for tests without a GPU)."""
    return _round_clip_forward(x, scale_tensor, scale, bits, signed, OUTPUT_CODES, on_host=True)


def _round_clip_backward(
    grad: Tensor,
    x: Tensor,
    scale_tensor: Tensor | None,
    scale: float,
    bits: int,
    signed: bool,
    surrogate: str,
    alpha: float,
    on_host: bool,
) -> tuple[Tensor, Tensor | None]:
    _check("x", x, on_host)
    _check("grad", grad, on_host)
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}, x {tuple(x.shape)}")
    code = _surrogate_code(surrogate)
    g, xc = _common_dtype(grad.contiguous(), x.contiguous())
    operand = fused.scale_operand(xc, scale_tensor, scale)
    grad_x = torch.empty_like(xc)
    terms = None if scale_tensor is None else torch.empty(xc.shape, dtype=torch.float32, device=xc.device)
    if xc.numel():
        _launch(
            "round_clip_backward",
            on_host,
            xc.device,
            g.data_ptr(),
            xc.data_ptr(),
            _ptr(operand.tensor),
            operand.mode,
            operand.value,
            grad_x.data_ptr(),
            _ptr(terms),
            xc.numel(),
            FLOAT_DTYPE_CODES[xc.dtype],
            bits,
            signed,
            code,
            alpha,
        )
    return grad_x.to(x.dtype), fused.reduce_scale_gradient(terms, scale_tensor)


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
    """(dL/dx in x's dtype, LSQ's dL/dscale for a tensor scale, else None) on the GPU."""
    return _round_clip_backward(grad, x, scale_tensor, scale, bits, signed, surrogate, alpha, on_host=False)


def round_clip_backward_host(
    grad: Tensor,
    x: Tensor,
    scale_tensor: Tensor | None,
    scale: float,
    bits: int,
    signed: bool,
    surrogate: str,
    alpha: float,
) -> tuple[Tensor, Tensor | None]:
    """The same per-element CUDA math run on CPU tensors (for tests without a GPU)."""
    return _round_clip_backward(grad, x, scale_tensor, scale, bits, signed, surrogate, alpha, on_host=True)


def _pack_weight(
    w: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, standardize: bool, eps: float, on_host: bool
) -> tuple[Tensor, Tensor]:
    _check("w", w, on_host)
    rows = w.reshape(w.shape[0], w.shape[1:].numel()).contiguous()
    n, k = rows.shape
    channel_scale = reference.pack_channel_scale(rows, scale_tensor, scale)
    packed = torch.empty((n, -(-k // reference.codes_per_word(bits))), dtype=torch.int32, device=rows.device)
    if packed.numel():
        _launch(
            "pack_weight",
            on_host,
            rows.device,
            rows.data_ptr(),
            channel_scale.data_ptr(),
            packed.data_ptr(),
            n,
            k,
            FLOAT_DTYPE_CODES[rows.dtype],
            bits,
            standardize,
            eps,
        )
    return channel_scale, packed


def pack_weight(
    w: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, standardize: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """Standardize, round-clip and pack a weight (N, K) on the GPU, one block per row:
    (float32 channel scales (N,), int32 words laid out as ``reference.pack_codes``)."""
    return _pack_weight(w, scale_tensor, scale, bits, standardize, eps, on_host=False)


def pack_weight_host(
    w: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, standardize: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """The same per-row CUDA math run on CPU tensors (for tests without a GPU)."""
    return _pack_weight(w, scale_tensor, scale, bits, standardize, eps, on_host=True)


def _dequantize_weight(
    packed: Tensor, weight_scale: Tensor | None, bits: int, in_features: int, dtype: torch.dtype, on_host: bool
) -> Tensor:
    if dtype not in FLOAT_DTYPE_CODES:
        raise TypeError(f"dtype: the cuda kernels write float32, bfloat16 or float16, got {dtype}")
    _check_device("packed", packed, on_host)
    words = packed.contiguous()
    scale = None if weight_scale is None else weight_scale.to(device=words.device, dtype=torch.float32).contiguous()
    out = torch.empty((words.shape[0], in_features), dtype=dtype, device=words.device)
    if out.numel():
        _launch(
            "dequantize_weight",
            on_host,
            words.device,
            words.data_ptr(),
            _ptr(scale),
            out.data_ptr(),
            words.shape[0],
            in_features,
            FLOAT_DTYPE_CODES[dtype],
            bits,
        )
    return out


def dequantize_weight(
    packed: Tensor, weight_scale: Tensor | None, bits: int, in_features: int, dtype: torch.dtype
) -> Tensor:
    """alpha_w[o] * q[o, k] (or the bare codes q with no scale) decoded on the GPU, in `dtype`."""
    return _dequantize_weight(packed, weight_scale, bits, in_features, dtype, on_host=False)


def dequantize_weight_host(
    packed: Tensor, weight_scale: Tensor | None, bits: int, in_features: int, dtype: torch.dtype
) -> Tensor:
    """The same per-element CUDA math run on CPU tensors (for tests without a GPU)."""
    return _dequantize_weight(packed, weight_scale, bits, in_features, dtype, on_host=True)


def _weight_quant_backward(
    grad_w_q: Tensor,
    weight: Tensor,
    bits: int,
    scale: float,
    surrogate: str,
    alpha: float,
    eps: float,
    on_host: bool,
) -> Tensor:
    _check("weight", weight, on_host)
    _check("grad_w_q", grad_w_q, on_host)
    if grad_w_q.shape != weight.shape:
        raise ValueError(f"grad_w_q has shape {tuple(grad_w_q.shape)}, weight {tuple(weight.shape)}")
    code = _surrogate_code(surrogate)
    n, k = weight.shape[0], weight.shape[1:].numel()
    g, w = _common_dtype(grad_w_q.reshape(n, k).contiguous(), weight.reshape(n, k).contiguous())
    grad = torch.empty_like(w)
    if grad.numel():
        _launch(
            "weight_quant_backward",
            on_host,
            w.device,
            g.data_ptr(),
            w.data_ptr(),
            grad.data_ptr(),
            n,
            k,
            FLOAT_DTYPE_CODES[w.dtype],
            bits,
            scale,
            code,
            alpha,
            eps,
        )
    return grad.reshape(weight.shape).to(weight.dtype)


def weight_quant_backward(
    grad_w_q: Tensor, weight: Tensor, bits: int, scale: float, surrogate: str, alpha: float, eps: float
) -> Tensor:
    """dL/dweight from dL/dw_q through the round-clip surrogate and the standardization backward,
    fused per output channel on the GPU, in weight's dtype."""
    return _weight_quant_backward(grad_w_q, weight, bits, scale, surrogate, alpha, eps, on_host=False)


def weight_quant_backward_host(
    grad_w_q: Tensor, weight: Tensor, bits: int, scale: float, surrogate: str, alpha: float, eps: float
) -> Tensor:
    """The same per-row CUDA math run on CPU tensors (for tests without a GPU)."""
    return _weight_quant_backward(grad_w_q, weight, bits, scale, surrogate, alpha, eps, on_host=True)


def _float32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b accumulated and returned in float32, as the reference's acc. Half-precision operands
    stay on the tensor cores on the GPU (their products are exact in float32)."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8 has no out_dtype: one rounding of acc to a's dtype
            return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def _lowbit_linear(
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
    on_host: bool,
) -> Tensor:
    _check_device("packed", packed, on_host)
    _check_device("x", x, on_host)
    words = packed.contiguous()
    n, k = words.shape[0], in_features
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    ep = fused.epilogue_operands(
        x, weight_scale, bias, act_bits, act_scale, out_scale, out_shift, out_bits, out_act_scale
    )
    out_code = UINT8_OUT_CODE if ep.out_dtype == torch.uint8 else FLOAT_DTYPE_CODES[ep.out_dtype]
    epilogue = (
        _ptr(ep.combined_scale),
        _ptr(ep.bias),
        _ptr(ep.out_scale),
        _ptr(ep.out_shift),
        ep.out_bits,
        ep.out_act_scale,
    )
    if not x.is_floating_point() or act_bits is not None:
        codes = rows
        if x.is_floating_point():
            codes = _round_clip_forward(rows, None, act_scale, act_bits, False, OUTPUT_CODES, on_host)
        lda = -(-k // GEMM_ROW_ALIGN) * GEMM_ROW_ALIGN
        if lda != k:
            padded = codes.new_zeros((m, lda))
            padded[:, :k] = codes
            codes = padded
        out = torch.empty((m, n), dtype=ep.out_dtype, device=rows.device)
        if out.numel():
            _launch(
                "lowbit_gemm",
                on_host,
                rows.device,
                codes.data_ptr(),
                codes.dtype == torch.int8,
                lda,
                words.data_ptr(),
                m,
                n,
                k,
                bits,
                *epilogue,
                out.data_ptr(),
                out_code,
            )
    elif m <= GEMV_MAX_ROWS:
        _check("x", x, on_host)
        out = torch.empty((m, n), dtype=ep.out_dtype, device=rows.device)
        if out.numel():
            _launch(
                "lowbit_gemv",
                on_host,
                rows.device,
                rows.data_ptr(),
                FLOAT_DTYPE_CODES[rows.dtype],
                words.data_ptr(),
                m,
                n,
                k,
                bits,
                *epilogue,
                out.data_ptr(),
                out_code,
            )
    else:
        _check("x", x, on_host)
        codes = _dequantize_weight(words, None, bits, k, rows.dtype, on_host)
        acc = _float32_matmul(rows, codes.T)
        out = reference.lowbit_epilogue(
            acc, ep.combined_scale, bias, out_scale, out_shift, out_bits, out_act_scale, ep.out_dtype
        )
    return out.reshape(*x.shape[:-1], n)


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
    """The low-bit linear layer with its fused epilogue on the GPU: int8 tensor cores for code
    inputs (or float x quantized with act_bits), the register-decoding GEMV for float x with at
    most GEMV_MAX_ROWS rows, cuBLAS on the decoded codes for more."""
    return _lowbit_linear(
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
        on_host=False,
    )


def lowbit_linear_host(
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
    """The same kernels' math run on CPU tensors (for tests without a GPU)."""
    return _lowbit_linear(
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
        on_host=True,
    )


_DEVICE = fused.bind(
    fused.QuantKernels(
        round_clip_forward, round_clip_backward, pack_weight, dequantize_weight, weight_quant_backward, lowbit_linear
    )
)
_HOST = fused.bind(
    fused.QuantKernels(
        round_clip_forward_host,
        round_clip_backward_host,
        pack_weight_host,
        dequantize_weight_host,
        weight_quant_backward_host,
        lowbit_linear_host,
    )
)
quant_linear_forward = _DEVICE["quant_linear_forward"]
quant_linear_forward_host = _HOST["quant_linear_forward"]
quant_linear_backward = _DEVICE["quant_linear_backward"]
quant_linear_backward_host = _HOST["quant_linear_backward"]
quant_conv2d_forward = _DEVICE["quant_conv2d_forward"]
quant_conv2d_forward_host = _HOST["quant_conv2d_forward"]
quant_conv2d_backward = _DEVICE["quant_conv2d_backward"]
quant_conv2d_backward_host = _HOST["quant_conv2d_backward"]
