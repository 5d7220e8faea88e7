"""Validation cases of the MaQD kernels (see ``validation``): small random inputs per op and dtype,
and how each result is held against the reference's.

Round-clip codes, decoded weights and the integer path of ``lowbit_linear`` must equal the
reference bit for bit; packed codes may differ only where the standardized weight sits within
1e-5 of a rounding decision; float matmuls and gradients agree to ``GRADIENT_RTOL``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..quant import reference
from .compare import close_to_reference, count_close, random_tensor, rounding_ties, sum_counts

Tensor = torch.Tensor
Cases = Iterator[tuple[tuple, Callable]]


def _count_exact(got: Tensor, want: Tensor, excused: Tensor | None = None) -> tuple[int, int, int]:
    """(compared, mismatches, excused) of two same-shaped tensors, skipping `excused` elements."""
    got, want = got.cpu(), want.cpu()
    keep = torch.ones_like(want, dtype=torch.bool) if excused is None else ~excused.cpu().reshape(want.shape)
    differ = (got != want) & ~(got.isnan() & want.isnan()) & keep
    return int(keep.sum()), int(differ.sum()), int((~keep).sum())


def _round_clip_inputs(device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(x, scale_tensor, scale, bits, signed): a float scale, a learned scalar scale, per-row scales."""
    yield random_tensor((257,), device, dtype), None, 0.31, 4, False
    yield random_tensor((3, 40), device, dtype), torch.tensor(0.6, device=device), 0.0, 1, True
    yield random_tensor((5, 33), device, dtype), torch.rand(5, 1, device=device) * 0.1 + 0.02, 0.0, 8, True
    yield random_tensor((2, 65), device, dtype, shift=1.0), None, 0.193249, 2, False


def _round_clip_forward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for args in _round_clip_inputs(device, dtype):
        yield args, _count_exact


def _round_clip_backward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for surrogate, (x, *rest) in zip(("ste", "sigmoid", "ste", "sigmoid"), _round_clip_inputs(device, dtype)):
        grad = random_tensor(x.shape, device, dtype, scale=1.0)

        def compare(got, want, dtype=dtype):
            return sum_counts(count_close(g, w, dtype) for g, w in zip(got, want))

        yield (grad, x, *rest, surrogate, 4.0), compare


def _weights(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[Tensor, int]]:
    """Odd shapes: rows shorter than one packed word, and rows ending inside a word."""
    for shape, bits in (((7, 37), 1), ((3, 5), 2), ((19, 70), 3), ((4, 33), 4), ((9, 129), 8)):
        yield random_tensor(shape, device, dtype), bits


def _pack_weight_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for index, (w, bits) in enumerate(_weights(device, dtype)):
        standardize = index != 1
        per_channel = index % 2 == 0
        scale_tensor = torch.rand(w.shape[0], 1, device=device) * 0.5 + 0.2 if per_channel else None
        scale = 0.0 if per_channel else reference.DEFAULT_SCALES[True][bits]
        w_hat = reference.weight_standardize_forward(w.double().cpu(), 1e-5) if standardize else w.double().cpu()
        divisor = scale_tensor.double().cpu() if per_channel else scale
        excused = rounding_ties(w_hat / divisor, binary=bits == 1)

        def compare(got, want, bits=bits, k=w.shape[1], excused=excused):
            codes = [reference.unpack_codes(packed.cpu(), bits, k) for _, packed in (got, want)]
            return sum_counts((_count_exact(got[0], want[0]), _count_exact(*codes, excused)))

        yield (w, scale_tensor, scale, bits, standardize, 1e-5), compare


def _dequantize_weight_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for index, (w, bits) in enumerate(_weights(device, dtype)):
        channel_scale, packed = reference.pack_weight(w, None, reference.DEFAULT_SCALES[True][bits], bits, True, 1e-5)
        channel_scale = channel_scale * torch.linspace(0.5, 2.0, w.shape[0], device=device)
        yield (packed, None if index == 2 else channel_scale, bits, w.shape[1], dtype), _count_exact


def _weight_quant_backward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for surrogate, (w, bits) in zip(("ste", "sigmoid", "sigmoid", "ste", "sigmoid"), _weights(device, dtype)):
        grad = random_tensor(w.shape, device, dtype, scale=1.0)

        def compare(got, want, dtype=dtype):
            return count_close(got, want, dtype)

        yield (grad, w, bits, reference.DEFAULT_SCALES[True][bits], surrogate, 4.0, 1e-5), compare


def _packed(n: int, k: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(channel scales, packed codes) of a random standardized weight."""
    w = torch.randn(n, k, device=device)
    channel_scale, packed = reference.pack_weight(w, None, reference.DEFAULT_SCALES[True][bits], bits, True, 1e-5)
    return channel_scale * torch.linspace(0.5, 1.5, n, device=device), packed


def _epilogue(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A bias and a folded LBN affine (out_scale, out_shift), float32 (n,)."""
    return torch.randn(n, device=device), torch.rand(n, device=device) + 0.5, torch.randn(n, device=device) * 0.1


def _lowbit_linear_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    # The integer path: uint8 codes in (up to 255), float32 out; exact.
    m, n, k = 5, 19, 37
    scale, packed = _packed(n, k, 4, device)
    x_codes = torch.randint(0, 256, (m, k), device=device, dtype=torch.uint8)
    bias, out_scale, out_shift = _epilogue(n, device)
    yield (x_codes, packed, scale, 4, k, bias, None, 0.02, out_scale, out_shift, None, None), _count_exact
    # Float activations quantized to 8-bit codes, the whole epilogue, requantized to uint8.
    scale, packed = _packed(n, k, 2, device)
    x = random_tensor((3, 2, k), device, dtype, scale=0.1, shift=0.5)
    args = (x, packed, scale, 2, k, bias.to(dtype), 8, 0.016528, out_scale, out_shift, 4, 0.3)
    y = reference.lowbit_linear(*args[:-2], None, None).cpu().double()
    yield args, lambda got, want, excused=rounding_ties(y / 0.3, binary=False): _count_exact(got, want, excused)
    # Weight-only: float activations times decoded codes, at one row and past the small-M path.
    for rows, bits in ((1, 1), (3, 8), (20, 3)):
        scale, packed = _packed(n, k, bits, device)
        x = random_tensor((rows, k), device, dtype, scale=1.0)

        def compare(got, want, dtype=dtype):
            return count_close(got, want, dtype)

        yield (x, packed, scale, bits, k, None, None, None, None, None, None, None), compare


def _quant_layer_inputs(device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(x, weight, bias, weight_bits, weight_scale, act_bits, act_scale) of a training layer."""
    weight = random_tensor((19, 37), device, dtype, scale=0.2)
    bias = random_tensor((19,), device, dtype, scale=0.5)
    for weight_bits, act_bits in ((4, 8), (2, None), (1, 3)):
        x = random_tensor((2, 3, 37), device, dtype, scale=0.5, shift=0.4)
        act_scale = None if act_bits is None else reference.DEFAULT_SCALES[False][act_bits]
        yield x, weight, bias, weight_bits, reference.DEFAULT_SCALES[True][weight_bits], act_bits, act_scale


def _quant_linear_forward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for args in _quant_layer_inputs(device, dtype):
        yield args, close_to_reference(dtype)


def _quant_linear_backward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for surrogate, (x, weight, *rest) in zip(("ste", "sigmoid", "ste"), _quant_layer_inputs(device, dtype)):
        grad = random_tensor((*x.shape[:-1], weight.shape[0]), device, dtype, scale=1.0)
        yield (grad, x, weight, *rest, surrogate), close_to_reference(dtype)


def _conv_inputs(device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(x, weight, bias, stride, padding, dilation, groups, weight_bits, weight_scale, act_bits, act_scale)."""
    x = random_tensor((2, 4, 9, 7), device, dtype, scale=0.5, shift=0.4)
    for weight_bits, act_bits, groups, stride in ((4, 4, 1, 1), (2, None, 2, 2)):
        weight = random_tensor((6, 4 // groups, 3, 3), device, dtype, scale=0.3)
        bias = random_tensor((6,), device, dtype, scale=0.5)
        act_scale = None if act_bits is None else reference.DEFAULT_SCALES[False][act_bits]
        conv = ([stride, stride], [1, 1], [1, 1], groups)
        yield (x, weight, bias, *conv, weight_bits, reference.DEFAULT_SCALES[True][weight_bits], act_bits, act_scale)


def _quant_conv2d_forward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for args in _conv_inputs(device, dtype):
        yield args, close_to_reference(dtype)


def _quant_conv2d_backward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for surrogate, args in zip(("sigmoid", "ste"), _conv_inputs(device, dtype)):
        grad = torch.randn_like(reference.quant_conv2d_forward(*args))
        yield (grad, *args, surrogate), close_to_reference(dtype)


CASES: dict[str, Callable[[torch.device, torch.dtype], Cases]] = {
    "round_clip_forward": _round_clip_forward_cases,
    "quantize": _round_clip_forward_cases,
    "round_clip_backward": _round_clip_backward_cases,
    "pack_weight": _pack_weight_cases,
    "dequantize_weight": _dequantize_weight_cases,
    "weight_quant_backward": _weight_quant_backward_cases,
    "lowbit_linear": _lowbit_linear_cases,
    "quant_linear_forward": _quant_linear_forward_cases,
    "quant_linear_backward": _quant_linear_backward_cases,
    "quant_conv2d_forward": _quant_conv2d_forward_cases,
    "quant_conv2d_backward": _quant_conv2d_backward_cases,
}
