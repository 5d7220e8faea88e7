"""MaQD quantization (SPEC.md section 2): round-clip, standardization, the default scales,
packing, the low-bit linear layer and quantization-aware training, against float64."""

import io

import pytest
import torch
import torch.nn.functional as F

import maqd_kernels as mk
from maqd_kernels.quant import reference

import derivations

ALL_BITS = range(1, 9)


def _away_from_rounding_ties(v: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Where x / scale is not within `tol` of a rounding boundary (k + 1/2) or of 0 (binary)."""
    return ((v - v.floor() - 0.5).abs() > tol) & (v.abs() > tol)


# ----------------------------------------------------------------------------- round_clip / quantize


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_round_clip_and_quantize_match_float64(bits, signed, dtype):
    scale = mk.default_scale(bits, signed) * 1.3
    x = (torch.randn(257, dtype=torch.float64) * 1.5).to(dtype)
    value = mk.round_clip(x, bits, scale, signed=signed)
    codes = mk.quantize(x, bits, scale, signed=signed)
    expected = derivations.round_clip(x, bits, scale, signed=signed).detach()
    keep = _away_from_rounding_ties(x.double() / scale)
    assert value.dtype == dtype and codes.dtype == (torch.int8 if signed else torch.uint8)
    # the op rounds the scale to the compute dtype first: values agree to one rounding of the dtype
    torch.testing.assert_close(value.double()[keep], expected[keep], rtol=torch.finfo(dtype).eps, atol=0)
    assert torch.equal(codes.double()[keep], torch.round(expected[keep] / scale))
    q_min, q_max = reference.code_range(bits, signed)
    assert codes.min() >= q_min and codes.max() <= q_max
    if signed and bits == 1:
        assert set(codes.tolist()) == {-1, 1}


def test_round_clip_rounds_half_to_even_and_clips():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 40.0, -40.0])
    assert mk.quantize(x, 8, 1.0, signed=True).tolist() == [0, 2, 2, 0, -2, 40, -40]
    assert mk.quantize(x, 3, 1.0, signed=True).tolist() == [0, 2, 2, 0, -2, 3, -3]
    assert mk.quantize(x, 2, 1.0, signed=False).tolist() == [0, 2, 2, 0, 0, 3, 0]
    assert mk.quantize(x, 1, 1.0, signed=True).tolist() == [1, 1, 1, -1, -1, 1, -1]
    assert mk.quantize(torch.tensor([0.0, -0.0]), 1, 1.0, signed=True).tolist() == [1, 1]


@pytest.mark.parametrize("bits,signed", [(1, True), (2, True), (4, True), (8, True), (1, False), (3, False)])
@pytest.mark.parametrize("surrogate", ["ste", "sigmoid"])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_round_clip_gradients_match_float64_autograd(bits, signed, surrogate, tensor_scale):
    x = (torch.randn(6, 40, dtype=torch.float64) * 1.2).requires_grad_(True)
    base = mk.default_scale(bits, signed)
    scale = (torch.rand(6, 1, dtype=torch.float64) * 0.5 + base).requires_grad_(True) if tensor_scale else base
    out = mk.round_clip(x, bits, scale, signed=signed, surrogate=surrogate, alpha=3.0)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    s2 = scale.detach().clone().requires_grad_(True) if tensor_scale else scale
    (derivations.round_clip(x2, bits, s2, signed=signed, surrogate=surrogate, alpha=3.0) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    if tensor_scale:
        torch.testing.assert_close(scale.grad, s2.grad, rtol=1e-10, atol=1e-10)
    assert x.grad.abs().sum() > 0


def test_round_clip_takes_broadcast_scales():
    x = torch.randn(3, 5, 7)
    scale = torch.rand(5, 1) + 0.2
    expected = scale * torch.clamp(torch.round(x / scale), -7, 7)
    assert torch.equal(mk.round_clip(x, 4, scale, signed=True), expected)


# ----------------------------------------------------------------------------- default_scale


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_default_scale_is_the_gaussian_mse_minimiser(bits, signed):
    scale = mk.default_scale(bits, signed)
    mse = derivations.gaussian_round_clip_mse
    low, high = scale * 0.9, scale * 1.1
    for _ in range(200):  # golden-section search of the exact MSE, independent of the table
        a, b = high - 0.618034 * (high - low), low + 0.618034 * (high - low)
        low, high = (low, b) if mse(a, bits, signed) < mse(b, bits, signed) else (a, high)
    assert abs((low + high) / 2 - scale) < 1e-4
    assert mse(scale, bits, signed) < min(mse(scale - 1e-3, bits, signed), mse(scale + 1e-3, bits, signed))


@pytest.mark.parametrize("bits,signed", [(1, True), (2, True), (4, True), (2, False), (4, False)])
def test_default_scale_minimises_sampled_error_through_round_clip(bits, signed):
    x = torch.randn(400_000, dtype=torch.float64)
    target = x if signed else x.clamp(min=0)

    def sampled_mse(s):
        return (mk.round_clip(x, bits, s, signed=signed) - target).square().mean().item()

    best = mk.default_scale(bits, signed)
    assert sampled_mse(best) < min(sampled_mse(best * 0.95), sampled_mse(best * 1.05))


# ----------------------------------------------------------------------------- weight_standardize


def test_weight_standardize_matches_float64_and_gradchecks():
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(mk.weight_standardize(w), derivations.weight_standardize(w), rtol=1e-12, atol=1e-12)
    w32 = w.float()
    torch.testing.assert_close(
        mk.weight_standardize(w32).double(), derivations.weight_standardize(w32), rtol=1e-5, atol=1e-5
    )
    assert torch.autograd.gradcheck(
        lambda t: mk.weight_standardize(t, 1e-3), (w[:, :, :1].clone().requires_grad_(True),)
    )


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 17), (4, 33), (2, 64)])
def test_pack_then_unpack_returns_the_codes(bits, shape):
    w = torch.randn(shape) * 2
    packed = mk.pack_weight(w, bits)
    codes = mk.quantize(
        mk.weight_standardize(w) if shape[1] > 1 else torch.zeros(shape),
        bits,
        mk.default_scale(bits, True),
        signed=True,
    )
    assert torch.equal(packed.unpack(), codes)
    assert packed.packed.dtype == torch.int32
    assert packed.packed.shape == (shape[0], -(-shape[1] // reference.codes_per_word(bits)))
    raw = mk.pack_weight(w, bits, scale=0.4, standardize=False)
    assert torch.equal(raw.unpack(), mk.quantize(w, bits, 0.4, signed=True))
    torch.testing.assert_close(raw.dequantize(), 0.4 * raw.unpack().float())


def test_pack_weight_per_channel_scale():
    w = torch.randn(4, 9)
    scale = torch.tensor([0.2, 0.3, 0.5, 0.7])
    packed = mk.pack_weight(w, 4, scale=scale, standardize=False)
    assert torch.equal(packed.scale, scale)
    assert torch.equal(packed.unpack(), mk.quantize(w, 4, scale.unsqueeze(1), signed=True))


def test_packed_weight_survives_state_dict():
    packed = mk.pack_weight(torch.randn(6, 21), 3)
    holder = torch.nn.Module()
    holder.w = packed
    buffer = io.BytesIO()
    torch.save(holder.state_dict(), buffer)
    buffer.seek(0)
    restored = torch.nn.Module()
    restored.w = mk.PackedWeight.empty(6, 21, 3)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.w.unpack(), packed.unpack()) and torch.equal(restored.w.scale, packed.scale)
    with pytest.raises(ValueError, match="4-bit"):
        mk.PackedWeight.empty(6, 21, 4).load_state_dict(restored.w.state_dict())


# ----------------------------------------------------------------------------- lowbit_linear


def _codes_matmul(x_codes: torch.Tensor, packed: mk.PackedWeight) -> torch.Tensor:
    return x_codes.double() @ packed.unpack().double().T


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m,n,k", [(1, 3, 5), (4, 3, 33), (7, 8, 64), (2, 1, 1)])
def test_lowbit_linear_integer_path_is_exact(bits, m, n, k):
    packed = mk.pack_weight(torch.randn(n, k), bits, scale=torch.rand(n) * 0.5 + 0.1, standardize=False)
    x_codes = torch.randint(0, 256, (m, k), dtype=torch.int64).to(torch.uint8)
    act_scale = 0.05
    y = mk.lowbit_linear(x_codes, packed, act_scale=act_scale)
    acc = _codes_matmul(x_codes, packed)
    assert y.dtype == torch.float32
    assert torch.equal(y, acc.float() * (packed.scale * act_scale))
    # float activations quantized inside, the bias and the folded affine, then requantized
    x = torch.rand(m, k) * 3
    bias, out_scale, out_shift = torch.randn(n), torch.rand(n) + 0.5, torch.randn(n)
    y = mk.lowbit_linear(x, packed, bias, act_bits=4, act_scale=0.25, out_scale=out_scale, out_shift=out_shift)
    acc = _codes_matmul(mk.quantize(x, 4, 0.25, signed=False), packed)
    expected = (acc.float() * (packed.scale * 0.25) + bias) * out_scale + out_shift
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    codes = mk.lowbit_linear(
        x,
        packed,
        bias,
        act_bits=4,
        act_scale=0.25,
        out_scale=out_scale,
        out_shift=out_shift,
        out_bits=4,
        out_act_scale=0.3,
    )
    assert codes.dtype == torch.uint8
    keep = _away_from_rounding_ties(expected.double() / 0.3)
    assert torch.equal(codes[keep], mk.quantize(expected, 4, 0.3, signed=False)[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lowbit_linear_weight_only_path(dtype):
    packed = mk.pack_weight(torch.randn(5, 19), 4)
    x = torch.randn(3, 2, 19, dtype=torch.float64).to(dtype)
    y = mk.lowbit_linear(x, packed)
    expected = x.double() @ packed.dequantize().double().T
    assert y.dtype == dtype and y.shape == (3, 2, 5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_lowbit_linear_gradients():
    packed = mk.pack_weight(torch.randn(4, 11), 2)
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    bias, out_scale, out_shift = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda *t: mk.lowbit_linear(t[0], packed, t[1], out_scale=t[2], out_shift=t[3]), (x, bias, out_scale, out_shift)
    )
    # quantized activations pass the gradient where they are not clipped (STE)
    xq = (torch.rand(3, 11, dtype=torch.float64) * 4 - 0.5).requires_grad_(True)
    mk.lowbit_linear(xq, packed, act_bits=2, act_scale=1.0).sum().backward()
    inside = ((xq >= 0) & (xq <= 3)).double()
    torch.testing.assert_close(xq.grad, packed.dequantize().double().sum(0) * inside)


# ----------------------------------------------------------------------------- quant_linear / quant_conv2d


def _fake_quant_operands(x, weight, weight_bits, act_bits, surrogate):
    w_q = derivations.round_clip(
        derivations.weight_standardize(weight),
        weight_bits,
        mk.default_scale(weight_bits, True),
        signed=True,
        surrogate=surrogate,
    )
    x_q = (
        x.double()
        if act_bits is None
        else derivations.round_clip(x, act_bits, mk.default_scale(act_bits, False), signed=False, surrogate=surrogate)
    )
    return x_q, w_q


@pytest.mark.parametrize("weight_bits,act_bits", [(1, None), (2, 2), (4, 4), (8, 8), (3, 5)])
@pytest.mark.parametrize("surrogate", ["ste", "sigmoid"])
def test_quant_linear_equals_autograd_of_fake_quant(weight_bits, act_bits, surrogate):
    x = (torch.randn(2, 3, 13, dtype=torch.float64) + 0.5).requires_grad_(True)
    weight = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = mk.quant_linear(x, weight, bias, weight_bits=weight_bits, act_bits=act_bits, surrogate=surrogate)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    x_q, w_q = _fake_quant_operands(leaves[0], leaves[1], weight_bits, act_bits, surrogate)
    expected = F.linear(x_q, w_q, leaves[2])
    (expected * g).sum().backward()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-10)
    for got, leaf in zip((x.grad, weight.grad, bias.grad), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 0), (2, 2, 1)])
def test_quant_conv2d_equals_autograd_of_fake_quant(groups, stride, padding):
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = mk.quant_conv2d(x, weight, bias, stride, padding, 1, groups, weight_bits=3, act_bits=4, surrogate="sigmoid")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    x_q, w_q = _fake_quant_operands(leaves[0], leaves[1], 3, 4, "sigmoid")
    expected = F.conv2d(x_q, w_q, leaves[2], stride, padding, 1, groups)
    (expected * g).sum().backward()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-10)
    for got, leaf in zip((x.grad, weight.grad, bias.grad), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_linear_low_precision_follows_float32(dtype):
    x = torch.randn(4, 9).to(dtype)
    weight = torch.randn(3, 9).to(dtype)
    out = mk.quant_linear(x, weight, weight_bits=4, act_bits=4)
    expected = mk.quant_linear(x.float(), weight.float(), weight_bits=4, act_bits=4)
    assert out.dtype == dtype
    assert torch.equal(out, expected.to(dtype))
