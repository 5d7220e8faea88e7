"""Triton kernels of MaQD round-clip quantization and their launchers (SPEC.md section 2).

Each launcher has the signature of its twin in ``reference``. They run on CUDA tensors, and on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before Triton is imported). Every
kernel is launched with ``enable_fp_fusion=False``: the reference rounds each operation, and so
must we to land on the same side of every rounding decision.

Packed weights hold W-bit offset-binary fields (``reference.pack_codes``); the kernels decode a
tile of words in registers with one broadcast shift per field, so each word is loaded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter
from .._triton_helpers import to_storage
from . import fused, reference

Tensor = torch.Tensor

# 8 elements per thread at 4 warps: 16-byte bf16 loads on the GPU, few wide programs in the interpreter.
_ELEMENTWISE_BLOCK = 1024
# Elements of one row that a per-row program (pack_weight, weight_quant_backward) holds at a time.
_ROW_BLOCK = 1024
# Programs along M that share one band of weight columns, so that consecutive programs reuse the
# decoded weight's packed words from L2.
_GROUP_M = 8


def _f32(value: float) -> float:
    return reference.round_to(torch.float32, value)


@triton.jit
def _round_clip(v, Q_MIN: tl.constexpr, Q_MAX: tl.constexpr):
    """clamp(round_half_even(v), Q_MIN, Q_MAX) in float32.

    Rounded by hand because libdevice's rint is not available to the interpreter. Clamping to one
    step past the grid first keeps |v| small, so floor(|v|) fits int32 and |v| - floor(|v|) is exact
    (Sterbenz); infinities clamp to the grid's ends."""
    v = tl.minimum(tl.maximum(v, Q_MIN - 1.0), Q_MAX + 1.0)
    magnitude = tl.abs(v)
    whole = tl.floor(magnitude)
    fraction = magnitude - whole
    odd = (whole.to(tl.int32) & 1) == 1
    whole = tl.where((fraction > 0.5) | ((fraction == 0.5) & odd), whole + 1.0, whole)
    rounded = tl.where(v < 0.0, -whole, whole)
    return tl.minimum(tl.maximum(rounded, Q_MIN * 1.0), Q_MAX * 1.0)


@triton.jit
def _codes(x, s, Q_MIN: tl.constexpr, Q_MAX: tl.constexpr, BINARY: tl.constexpr):
    """The round-clip code of float32 x at scale s, as float32 (binary: the sign, +1 at zero)."""
    if BINARY:
        q = tl.where(x >= 0.0, 1.0, -1.0)
    else:
        q = _round_clip(tl.math.div_rn(x, s), Q_MIN, Q_MAX)
    return q


@triton.jit
def _surrogate_derivative(
    v, alpha, Q_MIN: tl.constexpr, Q_MAX: tl.constexpr, BINARY: tl.constexpr, SURROGATE: tl.constexpr
):
    """d round_clip / d v at v = x / scale, in the order of reference.round_clip_backward's sum."""
    if SURROGATE == 0:
        if BINARY:
            dx = tl.full(v.shape, 1.0, tl.float32)
        else:
            dx = tl.where((v >= Q_MIN) & (v <= Q_MAX), 1.0, 0.0)
    elif BINARY:
        g = tl.sigmoid(alpha * v)
        dx = 2.0 * alpha * g * (1.0 - g)
    else:
        dx = tl.full(v.shape, 0.0, tl.float32)
        for k in range(Q_MIN, Q_MAX):
            g = tl.sigmoid(alpha * (v - (k + 0.5)))
            dx = dx + alpha * g * (1.0 - g)
    return dx


@triton.jit
def _unpack(words, W: tl.constexpr, PER_WORD: tl.constexpr, BINARY: tl.constexpr):
    """int32 codes [R, WORDS * PER_WORD] of uint32 words [R, WORDS]: code k of a row sits in word
    k // PER_WORD at bit offset W * (k % PER_WORD), offset-binary (reference.pack_codes)."""
    shifts = (tl.arange(0, PER_WORD) * W).to(tl.uint32)
    fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << W) - 1)
    fields = tl.reshape(fields, [words.shape[0], words.shape[1] * PER_WORD]).to(tl.int32)
    if BINARY:
        codes = fields * 2 - 1
    else:
        codes = fields - (1 << (W - 1))
    return codes


@triton.jit
def _scale_values(scale_ptr, offsets, mask, scale, SCALE_MODE: tl.constexpr):
    """The round-clip scale of each element (fused.scale_operand's modes)."""
    if SCALE_MODE == 0:
        s = tl.full(offsets.shape, scale, tl.float32)
    elif SCALE_MODE == 1:
        s = tl.full(offsets.shape, 0.0, tl.float32) + tl.load(scale_ptr)
    else:
        s = tl.load(scale_ptr + offsets, mask=mask, other=1.0)
    return s


@triton.jit
def _round_clip_forward_kernel(
    x_ptr,
    scale_ptr,
    out_ptr,
    numel,
    scale,
    SCALE_MODE: tl.constexpr,
    Q_MIN: tl.constexpr,
    Q_MAX: tl.constexpr,
    BINARY: tl.constexpr,
    CODES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = _scale_values(scale_ptr, offsets, mask, scale, SCALE_MODE)
    q = _codes(x, s, Q_MIN, Q_MAX, BINARY)
    if CODES:
        result = q.to(tl.int32).to(out_ptr.dtype.element_ty)
    else:
        result = to_storage(s * q, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, result, mask=mask)


@triton.jit
def _round_clip_backward_kernel(
    grad_ptr,
    x_ptr,
    scale_ptr,
    grad_x_ptr,
    terms_ptr,
    numel,
    scale,
    alpha,
    SCALE_MODE: tl.constexpr,
    Q_MIN: tl.constexpr,
    Q_MAX: tl.constexpr,
    BINARY: tl.constexpr,
    SURROGATE: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = _scale_values(scale_ptr, offsets, mask, scale, SCALE_MODE)
    v = tl.math.div_rn(x, s)
    dx = _surrogate_derivative(v, alpha, Q_MIN, Q_MAX, BINARY, SURROGATE)
    tl.store(grad_x_ptr + offsets, to_storage(g * dx, grad_x_ptr.dtype.element_ty), mask=mask)
    if SCALE_GRAD:
        # LSQ: q - v inside the grid, the clipped code outside (binary: the code).
        q = _codes(x, s, Q_MIN, Q_MAX, BINARY)
        if BINARY:
            dscale = q
        else:
            dscale = tl.where((v >= Q_MIN) & (v <= Q_MAX), q - v, q)
        tl.store(terms_ptr + offsets, g * dscale, mask=mask)


@triton.jit
def _row_moments(row_ptr, cols, count, eps, BLOCK: tl.constexpr):
    """(mean, sqrt(var + eps)) of one row in float32: biased variance, two passes."""
    k_range = tl.arange(0, BLOCK)
    total = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, cols, BLOCK):
        k = k0 + k_range
        total += tl.load(row_ptr + k, mask=k < cols, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(tl.sum(total, axis=0), count)
    total = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, cols, BLOCK):
        k = k0 + k_range
        ok = k < cols
        centred = tl.where(ok, tl.load(row_ptr + k, mask=ok, other=0.0).to(tl.float32) - mean, 0.0)
        total += centred * centred
    var = tl.math.div_rn(tl.sum(total, axis=0), count)
    return mean, tl.math.sqrt_rn(var + eps)


@triton.jit
def _pack_weight_kernel(
    w_ptr,
    scale_ptr,
    packed_ptr,
    cols,
    words,
    count,
    eps,
    STANDARDIZE: tl.constexpr,
    W: tl.constexpr,
    PER_WORD: tl.constexpr,
    BINARY: tl.constexpr,
    Q_MAX: tl.constexpr,
    WORDS_BLOCK: tl.constexpr,
):
    # One program per row: the row's moments, then its codes, packed WORDS_BLOCK words at a time.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = w_ptr + row * cols
    if STANDARDIZE:
        mean, std = _row_moments(row_ptr, cols, count, eps, WORDS_BLOCK * PER_WORD)
    s = tl.load(scale_ptr + row)
    word_range = tl.arange(0, WORDS_BLOCK)
    slots = tl.arange(0, PER_WORD)
    shifts = (slots * W).to(tl.uint32)
    # The zero code's field fills the slots past the row's end (binary has none: field 0).
    padding = 0 if BINARY else 1 << (W - 1)
    for w0 in range(0, words, WORDS_BLOCK):
        word = w0 + word_range
        k = word[:, None] * PER_WORD + slots[None, :]
        ok = k < cols
        x = tl.load(row_ptr + k, mask=ok, other=0.0).to(tl.float32)
        if STANDARDIZE:
            # reference.pack_weight quantizes the standardized weight stored in the weight's dtype.
            x = to_storage(tl.math.div_rn(x - mean, std), w_ptr.dtype.element_ty).to(tl.float32)
        q = _codes(x, s, -Q_MAX, Q_MAX, BINARY).to(tl.int32)
        if BINARY:
            field = (q + 1) // 2
        else:
            field = q + padding
        field = tl.where(ok, field, padding).to(tl.uint32)
        # The fields do not overlap, so their sum is their bitwise or.
        packed = tl.sum(field << shifts[None, :], axis=1)
        tl.store(packed_ptr + row * words + word, packed.to(tl.int32, bitcast=True), mask=word < words)


@triton.jit
def _dequantize_weight_kernel(
    packed_ptr,
    scale_ptr,
    out_ptr,
    rows,
    cols,
    words,
    HAS_SCALE: tl.constexpr,
    W: tl.constexpr,
    PER_WORD: tl.constexpr,
    BINARY: tl.constexpr,
    ROWS_BLOCK: tl.constexpr,
    WORDS_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS_BLOCK + tl.arange(0, ROWS_BLOCK)
    word = tl.program_id(1).to(tl.int64) * WORDS_BLOCK + tl.arange(0, WORDS_BLOCK)
    row_ok = row < rows
    packed = tl.load(
        packed_ptr + row[:, None] * words + word[None, :], mask=row_ok[:, None] & (word < words)[None, :], other=0
    )
    value = _unpack(packed.to(tl.uint32, bitcast=True), W, PER_WORD, BINARY).to(tl.float32)
    if HAS_SCALE:
        value = tl.load(scale_ptr + row, mask=row_ok, other=0.0)[:, None] * value
    k = tl.program_id(1).to(tl.int64) * (WORDS_BLOCK * PER_WORD) + tl.arange(0, WORDS_BLOCK * PER_WORD)
    tl.store(
        out_ptr + row[:, None] * cols + k[None, :],
        to_storage(value, out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (k < cols)[None, :],
    )


@triton.jit
def _weight_quant_backward_kernel(
    grad_ptr,
    w_ptr,
    out_ptr,
    cols,
    count,
    scale,
    alpha,
    eps,
    Q_MAX: tl.constexpr,
    BINARY: tl.constexpr,
    SURROGATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row. The surrogate is recomputed in the last pass rather than kept, so that
    # nothing but the output reaches memory.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = w_ptr + row * cols
    grad_row = grad_ptr + row * cols
    mean, std = _row_moments(row_ptr, cols, count, eps, BLOCK)
    inv_std = tl.math.div_rn(1.0, std)
    k_range = tl.arange(0, BLOCK)
    sum_g = tl.full([BLOCK], 0.0, tl.float32)
    sum_gw = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, cols, BLOCK):
        k = k0 + k_range
        ok = k < cols
        w_hat = tl.math.div_rn(tl.load(row_ptr + k, mask=ok, other=0.0).to(tl.float32) - mean, std)
        dx = _surrogate_derivative(tl.math.div_rn(w_hat, scale), alpha, -Q_MAX, Q_MAX, BINARY, SURROGATE)
        g = tl.load(grad_row + k, mask=ok, other=0.0).to(tl.float32) * dx
        sum_g += g
        sum_gw += g * w_hat
    mean_g = tl.math.div_rn(tl.sum(sum_g, axis=0), count)
    mean_gw = tl.math.div_rn(tl.sum(sum_gw, axis=0), count)
    for k0 in range(0, cols, BLOCK):
        k = k0 + k_range
        ok = k < cols
        w_hat = tl.math.div_rn(tl.load(row_ptr + k, mask=ok, other=0.0).to(tl.float32) - mean, std)
        dx = _surrogate_derivative(tl.math.div_rn(w_hat, scale), alpha, -Q_MAX, Q_MAX, BINARY, SURROGATE)
        g = tl.load(grad_row + k, mask=ok, other=0.0).to(tl.float32) * dx
        dw = inv_std * ((g - mean_g) - w_hat * mean_gw)
        tl.store(out_ptr + row * cols + k, to_storage(dw, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _float_dot(x, codes, acc, UPCAST: tl.constexpr):
    """acc + x @ codes^T for float x [M, K] and int32 codes [N, K], in x's dtype on tensor cores
    (codes are exact in bf16 and fp16). The interpreter multiplies bf16 and fp16 by their raw
    bits, so UPCAST takes both in as float32 there (the products are exact either way)."""
    if UPCAST:
        result = tl.dot(x.to(tl.float32), tl.trans(codes.to(tl.float32)), acc, input_precision="ieee")
    else:
        result = tl.dot(x, tl.trans(codes.to(x.dtype)), acc)
    return result


@triton.jit
def _lowbit_linear_kernel(
    x_ptr,
    packed_ptr,
    combined_ptr,
    bias_ptr,
    out_scale_ptr,
    out_shift_ptr,
    out_ptr,
    M,
    N,
    K,
    words,
    out_act_scale,
    W: tl.constexpr,
    PER_WORD: tl.constexpr,
    BINARY: tl.constexpr,
    INTEGER: tl.constexpr,
    X_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    OUT_BITS: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = epilogue(x @ codes^T) one (BLOCK_M, BLOCK_N) tile at a time; the packed weight is
    decoded in registers. INTEGER: int8 x int8 tensor-core products into int32, exact; uint8 codes
    (X_OFFSET) go in as x - 128, and 128 * sum_k q[o, k] is added back at the end. Otherwise float
    x times the codes (exact in bf16 and fp16) on tensor cores, accumulated in float32."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    row = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = row < M, col < N
    WORDS_BLOCK: tl.constexpr = BLOCK_K // PER_WORD
    k_range = tl.arange(0, BLOCK_K)
    word_range = tl.arange(0, WORDS_BLOCK)
    x_ptrs = x_ptr + row[:, None] * K + k_range[None, :]
    # The weight tile is decoded K-contiguous, [BLOCK_N, BLOCK_K], and enters the dot transposed:
    # the operand order 8-bit wgmma takes from shared memory.
    p_ptrs = packed_ptr + col[:, None] * words + word_range[None, :]
    if INTEGER:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        column_sums = tl.zeros([BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + k_range
        word = k0 // PER_WORD + word_range
        x_mask = row_ok[:, None] & (k < K)[None, :]
        packed = tl.load(p_ptrs, mask=col_ok[:, None] & (word < words)[None, :], other=0)
        codes = _unpack(packed.to(tl.uint32, bitcast=True), W, PER_WORD, BINARY)
        if X_OFFSET:
            # Masked k adds nothing: x - 128 is 0 there, and so is the weight in the column sums.
            x = (tl.load(x_ptrs, mask=x_mask, other=128).to(tl.int32) - 128).to(tl.int8)
            codes = tl.where((k < K)[None, :], codes, 0)
            column_sums += tl.sum(codes, axis=1)
            acc = tl.dot(x, tl.trans(codes.to(tl.int8)), acc)
        elif INTEGER:
            acc = tl.dot(tl.load(x_ptrs, mask=x_mask, other=0), tl.trans(codes.to(tl.int8)), acc)
        else:
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            if SPLIT_F32:
                # float32 x is the exact sum of three bfloat16 parts (8 significant bits each), and
                # each part times a code is exact: three bf16 tensor-core products, summed in
                # float32, stand in for float32 FMAs.
                high = x.to(tl.bfloat16)
                rest = x - high.to(tl.float32)
                middle = rest.to(tl.bfloat16)
                low = (rest - middle.to(tl.float32)).to(tl.bfloat16)
                acc = _float_dot(high, codes, acc, UPCAST)
                acc = _float_dot(middle, codes, acc, UPCAST)
                acc = _float_dot(low, codes, acc, UPCAST)
            else:
                acc = _float_dot(x, codes, acc, UPCAST)
        x_ptrs += BLOCK_K
        p_ptrs += WORDS_BLOCK
    if X_OFFSET:
        acc += 128 * column_sums[None, :]
    y = acc.to(tl.float32) * tl.load(combined_ptr + col, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + col, mask=col_ok, other=0.0)[None, :]
    if HAS_AFFINE:
        y = y * tl.load(out_scale_ptr + col, mask=col_ok, other=0.0)[None, :]
        y = y + tl.load(out_shift_ptr + col, mask=col_ok, other=0.0)[None, :]
    if OUT_BITS > 0:
        result = _round_clip(tl.math.div_rn(y, out_act_scale), 0, (1 << OUT_BITS) - 1).to(tl.int32).to(tl.uint8)
    else:
        result = to_storage(y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * N + col[None, :], result, mask=row_ok[:, None] & col_ok[None, :])


def _grid_1d(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, _ELEMENTWISE_BLOCK),)


def _round_clip_launch(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool, out: Tensor):
    """Writes the codes (integer `out`) or scale * q (float `out`) of contiguous x into out."""
    if not x.numel():
        return out
    operand = fused.scale_operand(x, scale_tensor, scale)
    q_min, q_max = reference.code_range(bits, signed)
    _round_clip_forward_kernel[_grid_1d(x.numel())](
        x,
        operand.tensor if operand.tensor is not None else x,
        out,
        x.numel(),
        _f32(operand.value),
        SCALE_MODE=operand.mode,
        Q_MIN=q_min,
        Q_MAX=q_max,
        BINARY=signed and bits == 1,
        CODES=not out.is_floating_point(),
        BLOCK=_ELEMENTWISE_BLOCK,
        enable_fp_fusion=False,
    )
    return out


def round_clip_forward(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """scale * clamp(round_half_even(x / scale), q_min, q_max) in x's dtype, shape of x."""
    xc = x.contiguous()
    return _round_clip_launch(xc, scale_tensor, scale, bits, signed, torch.empty_like(xc))


def quantize(x: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, signed: bool) -> Tensor:
    """The round-clip codes of x as int8 (signed) or uint8 (unsigned), shape of x."""
    xc = x.contiguous()
    out = torch.empty(xc.shape, dtype=torch.int8 if signed else torch.uint8, device=xc.device)
    return _round_clip_launch(xc, scale_tensor, scale, bits, signed, out)


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
    """(dL/dx in x's dtype, LSQ's dL/dscale summed to the scale's shape, or None for a float
    scale); the surrogates of reference.round_clip_backward."""
    xc = x.contiguous()
    g = grad.contiguous()
    grad_x = torch.empty_like(xc)
    terms = None if scale_tensor is None else torch.empty(xc.shape, dtype=torch.float32, device=xc.device)
    if xc.numel():
        operand = fused.scale_operand(xc, scale_tensor, scale)
        q_min, q_max = reference.code_range(bits, signed)
        _round_clip_backward_kernel[_grid_1d(xc.numel())](
            g,
            xc,
            operand.tensor if operand.tensor is not None else xc,
            grad_x,
            terms if terms is not None else grad_x,
            xc.numel(),
            _f32(operand.value),
            _f32(alpha),
            SCALE_MODE=operand.mode,
            Q_MIN=q_min,
            Q_MAX=q_max,
            BINARY=signed and bits == 1,
            SURROGATE=fused.SURROGATE_CODES[surrogate],
            SCALE_GRAD=terms is not None,
            BLOCK=_ELEMENTWISE_BLOCK,
            enable_fp_fusion=False,
        )
    return grad_x, fused.reduce_scale_gradient(terms, scale_tensor)


def _rows(w: Tensor) -> Tensor:
    """The contiguous (N, K) view of a weight (out, ...)."""
    return w.reshape(w.shape[0], w.shape[1:].numel()).contiguous()


def pack_weight(
    w: Tensor, scale_tensor: Tensor | None, scale: float, bits: int, standardize: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """(alpha_w float32 (N,), packed int32 codes (N, ceil(K / (32 / w)))): standardize (optionally),
    round-clip and pack each row in one program (reference.pack_codes' layout)."""
    channel_scale = reference.pack_channel_scale(w, scale_tensor, scale)
    rows = _rows(w)
    n, k = rows.shape
    width = reference.storage_bits(bits)
    per_word = 32 // width
    words = triton.cdiv(k, per_word)
    packed = torch.empty((n, words), dtype=torch.int32, device=w.device)
    if n and words:
        _pack_weight_kernel[(n,)](
            rows,
            channel_scale,
            packed,
            k,
            words,
            float(k),
            _f32(eps),
            STANDARDIZE=standardize,
            W=width,
            PER_WORD=per_word,
            BINARY=bits == 1,
            Q_MAX=reference.code_range(bits, True)[1],
            WORDS_BLOCK=max(1, min(_ROW_BLOCK // per_word, triton.next_power_of_2(words))),
            enable_fp_fusion=False,
        )
    return channel_scale, packed


def dequantize_weight(
    packed: Tensor, weight_scale: Tensor | None, bits: int, in_features: int, dtype: torch.dtype
) -> Tensor:
    """alpha_w[o] * q[o, k] (a float32 product) in `dtype`, (N, in_features); the bare codes
    without a scale."""
    p = packed.contiguous()
    n, words = p.shape
    out = torch.empty((n, in_features), dtype=dtype, device=p.device)
    if out.numel():
        width = reference.storage_bits(bits)
        per_word = 32 // width
        # 8 rows of up to 128 codes per program.
        words_block = max(1, min(128 // per_word, triton.next_power_of_2(words)))
        rows_block = 8
        scale = None if weight_scale is None else weight_scale.to(torch.float32).reshape(n).contiguous()
        _dequantize_weight_kernel[(triton.cdiv(n, rows_block), triton.cdiv(words, words_block))](
            p,
            scale if scale is not None else p,
            out,
            n,
            in_features,
            words,
            HAS_SCALE=scale is not None,
            W=width,
            PER_WORD=per_word,
            BINARY=bits == 1,
            ROWS_BLOCK=rows_block,
            WORDS_BLOCK=words_block,
            enable_fp_fusion=False,
        )
    return out


def weight_quant_backward(
    grad_w_q: Tensor, weight: Tensor, bits: int, scale: float, surrogate: str, alpha: float, eps: float
) -> Tensor:
    """dL/dweight in weight's dtype from dL/dw_q, w_q = round_clip(weight_standardize(weight)):
    one program per output channel recomputes w_hat, applies the surrogate and the
    standardization's backward."""
    w = _rows(weight)
    g = grad_w_q.reshape(w.shape).contiguous()
    out = torch.empty_like(w)
    n, k = w.shape
    if n and k:
        _weight_quant_backward_kernel[(n,)](
            g,
            w,
            out,
            k,
            float(k),
            _f32(scale),
            _f32(alpha),
            _f32(eps),
            Q_MAX=reference.code_range(bits, True)[1],
            BINARY=bits == 1,
            SURROGATE=fused.SURROGATE_CODES[surrogate],
            BLOCK=min(_ROW_BLOCK, triton.next_power_of_2(k)),
            enable_fp_fusion=False,
        )
    return out.reshape(weight.shape)


def _gemm_config(m: int, integer: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the number of rows M.

    Small M (decoding) is bound by reading the packed weight: narrow column tiles spread it over
    more SMs. Larger M runs 64- or 128-row wgmma tiles that amortize each decoded weight tile;
    int8 takes a K tile of 128 bytes per row, like bf16's 64. 8 warps keep the int8 tiles, with
    the uint8 column sums, free of register spills on sm_90. The interpreter gets few, wide
    programs."""
    if triton_interpreter():
        return min(64, max(16, triton.next_power_of_2(m))), 32, 64, 4, 1
    block_k = 128 if integer else 64
    if m <= 16:
        return 16, 32, 2 * block_k, 4, 4
    if m <= 64:
        return 64, 128, block_k, 8, 3
    return 128, 128, block_k, 8, 3


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
    """y = (x @ q^T) * combined[o] + bias[o]; y = y * out_scale[o] + out_shift[o]; uint8 codes of y
    (out_bits) or y, shape (*x.shape[:-1], N). Codes x (or float x quantized here with act_bits)
    multiply exactly on int8 tensor cores; float x without act_bits multiplies the codes in x's
    dtype with float32 accumulation."""
    ep = fused.epilogue_operands(
        x, weight_scale, bias, act_bits, act_scale, out_scale, out_shift, out_bits, out_act_scale
    )
    n, k = packed.shape[0], in_features
    rows = x.reshape(x.shape[:-1].numel(), k).contiguous()
    integer = not x.is_floating_point() or act_bits is not None
    if x.is_floating_point() and act_bits is not None:
        rows = quantize(rows, None, act_scale, act_bits, False)
    m = rows.shape[0]
    out = torch.empty((m, n), dtype=ep.out_dtype, device=x.device)
    if m and n:
        p = packed.contiguous()
        width = reference.storage_bits(bits)
        block_m, block_n, block_k, warps, stages = _gemm_config(m, integer)
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        _lowbit_linear_kernel[grid](
            rows,
            p,
            ep.combined_scale,
            ep.bias if ep.bias is not None else ep.combined_scale,
            ep.out_scale if ep.out_scale is not None else ep.combined_scale,
            ep.out_shift if ep.out_shift is not None else ep.combined_scale,
            out,
            m,
            n,
            k,
            p.shape[1],
            _f32(ep.out_act_scale),
            W=width,
            PER_WORD=32 // width,
            BINARY=bits == 1,
            INTEGER=integer,
            X_OFFSET=rows.dtype == torch.uint8,
            HAS_BIAS=ep.bias is not None,
            HAS_AFFINE=ep.out_scale is not None,
            OUT_BITS=ep.out_bits,
            UPCAST=triton_interpreter(),
            # float32 must not be rounded to tf32.
            SPLIT_F32=rows.dtype == torch.float32,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=_GROUP_M,
            num_warps=warps,
            num_stages=stages,
            enable_fp_fusion=False,
        )
    return out.reshape(*x.shape[:-1], n)


_TRAINING = fused.bind(
    fused.QuantKernels(
        round_clip_forward, round_clip_backward, pack_weight, dequantize_weight, weight_quant_backward, lowbit_linear
    )
)
quant_linear_forward = _TRAINING["quant_linear_forward"]
quant_linear_backward = _TRAINING["quant_linear_backward"]
quant_conv2d_forward = _TRAINING["quant_conv2d_forward"]
quant_conv2d_backward = _TRAINING["quant_conv2d_backward"]
