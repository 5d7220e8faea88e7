"""Every MaQD kernel (CUDA and Triton) against the eager reference (SPEC.md section 2), at odd
shapes and every bit width: codes, decoded weights and the integer matmul exactly, packed codes
exactly except where the standardized weight sits on a rounding decision, float results and
gradients to the dtype's tolerance. On the CPU the Triton kernels run in the interpreter and the
CUDA math through its host entry points; on a GPU every kernel runs for real."""

import io

import pytest
import torch

import maqd_kernels as mk
from maqd_kernels import nn as mnn
from maqd_kernels.bench.compare import GRADIENT_RTOL, rounding_ties
from maqd_kernels.quant import reference

from helpers import KERNEL_DTYPES, kernel_or_skip, kernel_targets, op_backends

ALL_BITS = range(1, 9)
# (m, n, k): one row, three outputs, K shorter than a packed word, K ending inside a word,
# K not a multiple of 16 (the integer kernels' padding) and a multi-tile case.
SHAPES = [(1, 3, 5), (4, 3, 33), (7, 8, 64), (2, 1, 1), (17, 20, 100), (33, 130, 300)]


def _random(shape, dtype, device, scale=1.5, shift=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def _assert_close(got, want, dtype, name=""):
    """Within GRADIENT_RTOL[dtype] of the reference's largest magnitude (float32 rounding, sums in
    another order, one rounding to the storage dtype)."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    tol = GRADIENT_RTOL[dtype] * max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.cpu().double(), want.cpu().double(), rtol=0, atol=tol, msg=name)


# ----------------------------------------------------------------------------- round_clip / quantize


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_round_clip_kernels_equal_reference(backend, device, dtype, bits, signed):
    x = _random((3, 67), dtype, device, shift=0.0 if signed else 1.0)
    scales = [
        (None, mk.default_scale(bits, signed) * 1.3),
        (torch.tensor(0.37, device=device), 0.0),
        (torch.rand(3, 1, device=device) * 0.3 + 0.05, 0.0),
    ]
    for scale_tensor, scale in scales:
        args = (x, scale_tensor, scale, bits, signed)
        for op in ("quantize", "round_clip_forward"):
            got, want = kernel_or_skip(op, backend)(*args), getattr(reference, op)(*args)
            assert got.dtype == want.dtype and torch.equal(got.cpu(), want.cpu()), (op, scale_tensor)


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_round_clip_kernels_round_half_to_even_and_clip(backend, device):
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 40.0, -40.0, 0.0, -0.0], device=device)
    quantize = kernel_or_skip("quantize", backend)
    assert quantize(x, None, 1.0, 8, True).tolist() == [0, 2, 2, 0, -2, 40, -40, 0, 0]
    assert quantize(x, None, 1.0, 3, True).tolist() == [0, 2, 2, 0, -2, 3, -3, 0, 0]
    assert quantize(x, None, 1.0, 2, False).tolist() == [0, 2, 2, 0, 0, 3, 0, 0, 0]
    assert quantize(x, None, 1.0, 1, True).tolist() == [1, 1, 1, -1, -1, 1, -1, 1, 1]
    # Every x = (j + 1/2) / 2 is an exact tie of x / 0.5; tiny, huge and infinite values clip.
    ties = (torch.arange(-20, 21, dtype=torch.float64) + 0.5) / 2
    extremes = torch.tensor([1e-30, -1e-30, 300.0, -300.0, float("inf"), float("-inf")], dtype=torch.float64)
    for dtype in KERNEL_DTYPES:
        x = torch.cat([ties, extremes]).to(dtype).to(device)
        for bits in ALL_BITS:
            for signed in (True, False):
                for op in ("quantize", "round_clip_forward"):
                    got, want = (
                        kernel_or_skip(op, backend)(x, None, 0.5, bits, signed),
                        getattr(reference, op)(x, None, 0.5, bits, signed),
                    )
                    assert torch.equal(got.cpu(), want.cpu()), (op, dtype, bits, signed)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bits,signed", [(1, True), (2, True), (4, True), (8, True), (1, False), (3, False)])
@pytest.mark.parametrize("surrogate", ["ste", "sigmoid"])
def test_round_clip_backward_kernels_match_reference(backend, device, dtype, bits, signed, surrogate):
    x = _random((4, 45), dtype, device, shift=0.0 if signed else 0.8)
    grad = _random(x.shape, dtype, device, scale=1.0)
    for scale_tensor, scale in ((None, mk.default_scale(bits, signed)), (torch.rand(4, 1, device=device) + 0.2, 0.0)):
        args = (grad, x, scale_tensor, scale, bits, signed, surrogate, 3.0)
        (grad_x, grad_scale), (want_x, want_scale) = (
            kernel_or_skip("round_clip_backward", backend)(*args),
            (reference.round_clip_backward(*args)),
        )
        if surrogate == "ste":
            assert torch.equal(grad_x.cpu(), want_x.cpu())
        _assert_close(grad_x, want_x, dtype, "grad_x")
        if scale_tensor is None:
            assert grad_scale is None
        else:
            _assert_close(grad_scale, want_scale, dtype, "grad_scale")


# ----------------------------------------------------------------------------- pack / dequantize


def _pack_ties(w, scale_tensor, scale, bits, standardize):
    w_hat = reference.weight_standardize_forward(w.double().cpu(), 1e-5) if standardize else w.double().cpu()
    divisor = scale if scale_tensor is None else scale_tensor.double().cpu()
    return rounding_ties(w_hat / divisor, binary=bits == 1)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 17), (4, 33), (2, 64), (5, 300)])
def test_pack_weight_kernels_pack_the_reference_codes(backend, device, dtype, bits, shape):
    w = _random(shape, dtype, device)
    pack = kernel_or_skip("pack_weight", backend)
    for scale_tensor, scale, standardize in (
        (None, mk.default_scale(bits, True), True),
        (torch.rand(shape[0], 1, device=device) + 0.1, 0.0, True),
        (None, 0.4, False),
    ):
        args = (w, scale_tensor, scale, bits, standardize, 1e-5)
        (channel_scale, packed), (want_scale, want_packed) = pack(*args), reference.pack_weight(*args)
        assert torch.equal(channel_scale.cpu(), want_scale.cpu())
        assert packed.dtype == torch.int32 and packed.shape == want_packed.shape
        codes = reference.unpack_codes(packed.cpu(), bits, shape[1])
        want = reference.unpack_codes(want_packed.cpu(), bits, shape[1])
        keep = ~_pack_ties(w, scale_tensor, scale, bits, standardize)
        assert keep.float().mean() > 0.9
        assert torch.equal(codes[keep], want[keep])
        if keep.all():
            # Padding past K holds the zero code too, so the whole words agree.
            assert torch.equal(packed.cpu(), want_packed.cpu())


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_dequantize_weight_kernels_equal_reference(backend, device, dtype, bits):
    n, k = 6, 45
    codes = torch.randint(*reference.code_range(bits, True), (n, k), dtype=torch.int8)
    if bits == 1:
        codes = torch.where(codes >= 0, 1, -1).to(torch.int8)
    packed = reference.pack_codes(codes, bits).to(device)
    scale = (torch.rand(n) + 0.1).to(device)
    dequantize = kernel_or_skip("dequantize_weight", backend)
    for channel_scale in (scale, None):
        got = dequantize(packed, channel_scale, bits, k, dtype)
        assert torch.equal(got.cpu(), reference.dequantize_weight(packed, channel_scale, bits, k, dtype).cpu())
    assert torch.equal(dequantize(packed, None, bits, k, torch.float32).cpu(), codes.float())
    # Arbitrary words: every field value of every slot, including the padding past K.
    words = torch.randint(-(2**31), 2**31, (n, packed.shape[1]), dtype=torch.int64).to(torch.int32).to(device)
    assert torch.equal(
        dequantize(words, scale, bits, k, dtype).cpu(), reference.dequantize_weight(words, scale, bits, k, dtype).cpu()
    )


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 8])
@pytest.mark.parametrize("surrogate", ["ste", "sigmoid"])
def test_weight_quant_backward_kernels_match_reference(backend, device, dtype, bits, surrogate):
    for shape in ((5, 37), (4, 3, 3, 3)):
        w, grad = _random(shape, dtype, device), _random(shape, dtype, device, scale=1.0)
        args = (grad, w, bits, mk.default_scale(bits, True), surrogate, 4.0, 1e-5)
        got = kernel_or_skip("weight_quant_backward", backend)(*args)
        _assert_close(got, reference.weight_quant_backward(*args), dtype, str(shape))


# ----------------------------------------------------------------------------- lowbit_linear


def _packed(n, k, bits, device):
    w = torch.randn(n, k)
    scale, packed = reference.pack_weight(w, None, mk.default_scale(bits, True), bits, True, 1e-5)
    return (scale * torch.linspace(0.5, 1.5, n)).to(device), packed.to(device)


def _epilogue(n, device, dtype=torch.float32):
    """bias, out_scale, out_shift: a bias and a folded LBN affine."""
    return tuple(t.to(dtype).to(device) for t in (torch.randn(n), torch.rand(n) + 0.5, torch.randn(n) * 0.1))


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_lowbit_linear_integer_kernels_are_exact(backend, device, bits, m, n, k):
    """Codes in, codes or float32 out: the int32 accumulation is exact and the epilogue rounds like
    the reference, so every value is equal, including uint8 codes up to 255 and int8 codes."""
    kernel = kernel_or_skip("lowbit_linear", backend)
    scale, packed = _packed(n, k, bits, device)
    bias, out_scale, out_shift = _epilogue(n, device)
    for x in (
        torch.randint(0, 256, (m, k), dtype=torch.uint8),
        torch.randint(-128, 128, (m, k), dtype=torch.int8),
    ):
        x = x.to(device)
        for epilogue in ((None, None, None), (bias, out_scale, out_shift)):
            args = (x, packed, scale, bits, k, epilogue[0], None, 0.02, *epilogue[1:], None, None)
            got, want = kernel(*args), reference.lowbit_linear(*args)
            assert got.dtype == torch.float32 and torch.equal(got.cpu(), want.cpu()), (x.dtype, epilogue[0])
    # Exactness rests on the accumulators: they equal a float64 matmul of the codes.
    got = kernel(x, packed, torch.ones_like(scale), bits, k, None, None, 1.0, None, None, None, None)
    codes = reference.unpack_codes(packed.cpu(), bits, k).double()
    assert torch.equal(got.cpu().double(), (x.cpu().double() @ codes.T).float().double())


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bits,act_bits,out_bits", [(1, 8, 8), (2, 4, 2), (4, 8, 4), (8, 3, 1), (3, 5, 8)])
def test_lowbit_linear_kernels_quantize_activations_and_requantize(backend, device, dtype, bits, act_bits, out_bits):
    """Float activations quantized inside, the whole epilogue, uint8 codes out for the next layer."""
    n, k = 21, 75
    scale, packed = _packed(n, k, bits, device)
    bias, out_scale, out_shift = _epilogue(n, device, dtype)
    x = _random((2, 3, k), dtype, device, scale=0.3, shift=0.3)
    act_scale, out_act_scale = mk.default_scale(act_bits, False), 0.25
    args = (x, packed, scale, bits, k, bias, act_bits, act_scale, out_scale, out_shift)
    kernel = kernel_or_skip("lowbit_linear", backend)
    y = kernel(*args, None, None)
    assert y.dtype == dtype and y.shape == (2, 3, n)
    assert torch.equal(y.cpu(), reference.lowbit_linear(*args, None, None).cpu())
    # y is computed exactly as the reference computes it, so even its rounding ties agree.
    codes, want = kernel(*args, out_bits, out_act_scale), reference.lowbit_linear(*args, out_bits, out_act_scale)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, n)
    assert torch.equal(codes.cpu(), want.cpu())
    assert len(codes.unique()) > 1


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 5])
@pytest.mark.parametrize("m", [1, 3, 16, 20])
def test_lowbit_linear_weight_only_kernels_match_reference(backend, device, dtype, bits, m):
    """Float activations times codes decoded in registers; sums run in another order."""
    n, k = 19, 70
    scale, packed = _packed(n, k, bits, device)
    x = _random((m, k), dtype, device, scale=1.0)
    bias, out_scale, out_shift = _epilogue(n, device)
    kernel = kernel_or_skip("lowbit_linear", backend)
    for epilogue in ((None, None, None), (bias, out_scale, out_shift)):
        args = (x, packed, scale, bits, k, epilogue[0], None, None, *epilogue[1:], None, None)
        _assert_close(kernel(*args), reference.lowbit_linear(*args), dtype)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m", [2, 30])
def test_lowbit_linear_weight_only_kernels_requantize(backend, device, dtype, m):
    n, k = 19, 70
    scale, packed = _packed(n, k, 4, device)
    bias, out_scale, out_shift = _epilogue(n, device)
    x = _random((m, 1, k), dtype, device, scale=0.5, shift=0.3)
    args = (x, packed, scale, 4, k, bias, None, None, out_scale, out_shift, 4, 0.3)
    got, want = kernel_or_skip("lowbit_linear", backend)(*args), reference.lowbit_linear(*args)
    assert got.dtype == torch.uint8 and got.shape == (m, 1, n)
    y = reference.lowbit_linear(*args[:-2], None, None).cpu().double()
    # Float sums in another order land within 1e-4 of each other: only those may round apart.
    ties = rounding_ties(y / 0.3, binary=False, tol=1e-4)
    assert want.max() > 0 and ties.double().mean() < 0.1
    assert not ((got.cpu() != want.cpu()) & ~ties).any()


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_quant_kernels_take_empty_and_strided_inputs(backend, device):
    scale, packed = _packed(5, 40, 4, device)
    lowbit = kernel_or_skip("lowbit_linear", backend)
    empty = torch.empty(0, 40, device=device)
    assert lowbit(empty, packed, scale, 4, 40, None, None, None, None, None, None, None).shape == (0, 5)
    assert lowbit(empty.to(torch.uint8), packed, scale, 4, 40, None, None, 0.1, None, None, None, None).shape == (0, 5)
    x = _random((40, 6), torch.float32, device).T  # not contiguous
    for act_bits in (None, 8):
        args = (x, packed, scale, 4, 40, None, act_bits, 0.03, None, None, None, None)
        _assert_close(lowbit(*args), reference.lowbit_linear(*args), torch.float32)
    assert torch.equal(
        kernel_or_skip("quantize", backend)(x, None, 0.1, 4, False).cpu(),
        reference.quantize(x, None, 0.1, 4, False).cpu(),
    )
    for rows, cols in ((0, 9), (3, 0)):
        channel_scale, packed = kernel_or_skip("pack_weight", backend)(
            torch.empty(rows, cols, device=device), None, 0.5, 4, True, 1e-5
        )
        assert channel_scale.shape == (rows,) and packed.shape == (rows, -(-cols // 8))
        dequantized = kernel_or_skip("dequantize_weight", backend)(packed, None, 4, cols, torch.float16)
        assert dequantized.shape == (rows, cols)
        empty = torch.empty(rows, cols, device=device)
        assert kernel_or_skip("weight_quant_backward", backend)(empty, empty, 4, 0.3, "ste", 4.0, 1e-5).shape == (
            rows,
            cols,
        )
    w = _random((45, 7), torch.float32, device).T
    got, want = (
        kernel_or_skip("pack_weight", backend)(w, None, 0.5, 2, True, 1e-5),
        reference.pack_weight(w, None, 0.5, 2, True, 1e-5),
    )
    assert torch.equal(got[1].cpu(), want[1].cpu())


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("weight_bits,act_bits,surrogate", [(4, 8, "ste"), (2, None, "sigmoid"), (1, 3, "sigmoid")])
def test_quant_linear_kernels_match_reference(backend, device, dtype, weight_bits, act_bits, surrogate):
    x = _random((2, 3, 37), dtype, device, scale=0.5, shift=0.4)
    weight, bias = _random((19, 37), dtype, device, scale=0.2), _random((19,), dtype, device, scale=0.5)
    act_scale = None if act_bits is None else mk.default_scale(act_bits, False)
    layer = (weight_bits, mk.default_scale(weight_bits, True), act_bits, act_scale)
    forward = kernel_or_skip("quant_linear_forward", backend)
    _assert_close(forward(x, weight, bias, *layer), reference.quant_linear_forward(x, weight, bias, *layer), dtype)
    grad = _random((2, 3, 19), dtype, device, scale=1.0)
    got = kernel_or_skip("quant_linear_backward", backend)(grad, x, weight, bias, *layer, surrogate)
    want = reference.quant_linear_backward(grad, x, weight, bias, *layer, surrogate)
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        _assert_close(g, w, dtype, name)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("groups,stride,act_bits", [(1, 1, 4), (2, 2, None)])
def test_quant_conv2d_kernels_match_reference(backend, device, dtype, groups, stride, act_bits):
    x = _random((2, 4, 9, 7), dtype, device, scale=0.5, shift=0.4)
    weight, bias = _random((6, 4 // groups, 3, 3), dtype, device, scale=0.3), _random((6,), dtype, device)
    act_scale = None if act_bits is None else mk.default_scale(act_bits, False)
    args = (
        x,
        weight,
        bias,
        [stride, stride],
        [1, 1],
        [1, 1],
        groups,
        2,
        mk.default_scale(2, True),
        act_bits,
        act_scale,
    )
    out = kernel_or_skip("quant_conv2d_forward", backend)(*args)
    _assert_close(out, reference.quant_conv2d_forward(*args), dtype)
    grad = torch.randn_like(out)
    got = kernel_or_skip("quant_conv2d_backward", backend)(grad, *args, "sigmoid")
    for name, g, w in zip(("x", "weight", "bias"), got, reference.quant_conv2d_backward(grad, *args, "sigmoid")):
        _assert_close(g, w, dtype, name)


@pytest.mark.parametrize("backend,device", op_backends())
def test_quant_modules_train_on_every_backend(backend, device):
    """A QuantAct (learned scale) -> QuantLinear -> QuantAct -> QuantConv2d step on one backend
    gives the reference's outputs and gradients."""

    def step(backend):
        torch.manual_seed(1)
        act = mnn.QuantAct(8, learn_scale=True, backend=backend)
        fc = mnn.QuantLinear(30, 48, weight_bits=4, backend=backend)
        act2 = mnn.QuantAct(3, surrogate="sigmoid", backend=backend)
        conv = mnn.QuantConv2d(3, 5, 3, padding=1, weight_bits=2, backend=backend)
        model = torch.nn.ModuleList([act, fc, act2, conv]).to(device)
        x = (torch.rand(2, 30) * 2).to(device)
        out = conv(act2(fc(act(x))).reshape(2, 3, 4, 4))
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        return out.detach(), [p.grad for p in model.parameters()]

    out, grads = step(backend)
    want_out, want_grads = step("reference")
    _assert_close(out, want_out, torch.float32)
    for g, w in zip(grads, want_grads):
        _assert_close(g, w, torch.float32)


@pytest.mark.parametrize("backend,device", op_backends())
def test_lowbit_layers_chain_uint8_codes(backend, device):
    """Two layers pass uint8 codes from one kernel to the next, as the converted models do."""
    x = torch.rand(5, 40, device=device) * 2
    w1, w2 = (mk.pack_weight(torch.randn(n, k, device=device), 4) for n, k in ((32, 40), (7, 32)))
    results = []
    for b in (backend, "reference"):
        codes = mk.lowbit_linear(x, w1, act_bits=8, out_bits=4, out_act_scale=0.2, backend=b)
        assert codes.dtype == torch.uint8
        results.append(mk.lowbit_linear(codes, w2, act_scale=0.2, backend=b))
    assert torch.equal(results[0], results[1])


def test_packed_weight_from_a_quant_linear_survives_state_dict():
    fc = mnn.QuantLinear(21, 6, weight_bits=3)
    packed = fc.packed_weight()
    assert torch.equal(packed.unpack(), mk.quantize(mk.weight_standardize(fc.weight), 3, fc.weight_scale, signed=True))
    buffer = io.BytesIO()
    torch.save(packed.state_dict(), buffer)
    buffer.seek(0)
    restored = mk.PackedWeight.empty(6, 21, 3)
    restored.load_state_dict(torch.load(buffer))
    x = torch.rand(4, 21)
    assert torch.equal(mk.lowbit_linear(x, restored, fc.bias), mk.lowbit_linear(x, packed, fc.bias))
