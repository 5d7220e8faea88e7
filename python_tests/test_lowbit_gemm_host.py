"""lowbit_gemm's host twin (csrc/lowbit_gemm.cu) against the eager reference (SPEC.md section 2):
the integer path of lowbit_linear, x codes (uint8 or int8, rows padded to a multiple of 16 bytes)
times packed signed weight codes, exact int32-range accumulation, then the fused epilogue. The
twin decodes the weight through the same SWAR decode_four_codes as the tensor-core kernel, so
every bit width and output form must match the reference bit for bit."""

import pytest
import torch

from maqd_kernels.quant import reference
from maqd_kernels.saf.reference import round_to

_C = pytest.importorskip("maqd_kernels._C", reason="maqd_kernels._C not built")

OUT_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}
# (m, n, k, extra columns of lda beyond k rounded up to 16)
SHAPES = [(1, 3, 5, 0), (1, 1, 1, 0), (2, 3, 15, 16), (7, 5, 33, 0), (4, 9, 100, 32), (3, 130, 64, 0), (5, 4, 257, 16)]
# (output dtype, out_bits, bias, folded LBN)
EPILOGUES = [
    (torch.float32, None, False, False),
    (torch.float32, None, True, True),
    (torch.float16, None, True, False),
    (torch.bfloat16, None, False, True),
    (torch.uint8, 4, True, True),
    (torch.uint8, 8, False, False),
]
ACT_SCALE, OUT_ACT_SCALE = 0.173, 0.29


def _x_codes(m, k, x_signed, extremes=False):
    if x_signed:
        x = torch.randint(-128, 128, (m, k), dtype=torch.int16)
        edge = torch.tensor([-128, 127], dtype=torch.int16)
    else:
        x = torch.randint(0, 256, (m, k), dtype=torch.int16)
        edge = torch.tensor([255, 0], dtype=torch.int16)
    if extremes:
        x[:] = edge[0]
    elif x.numel():
        x.view(-1)[::7] = edge[0]  # the extreme codes, 255 and -128, always take part
        x.view(-1)[3::11] = edge[1]
    return x.to(torch.int8 if x_signed else torch.uint8)


def _weight_codes(n, k, bits, extremes=False):
    q_min, q_max = reference.code_range(bits, True)
    if extremes:
        return torch.full((n, k), q_max, dtype=torch.int8)
    if bits == 1:
        return (torch.randint(0, 2, (n, k)) * 2 - 1).to(torch.int8)
    return torch.randint(q_min, q_max + 1, (n, k)).to(torch.int8)


def _padded(x, lda):
    """x (m, k) in a zeroed (m, lda) buffer, as the launcher hands it to the kernel."""
    buf = torch.zeros((x.shape[0], lda), dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    return buf


def _vectors(n, bias, lbn):
    weight_scale = torch.rand(n) * 0.02 + 1e-3
    return (
        weight_scale,
        torch.randn(n) if bias else None,
        torch.randn(n) * 0.5 + 1.0 if lbn else None,
        torch.randn(n) * 0.3 if lbn else None,
    )


def _host(x, lda, packed, n, k, bits, combined, bias, out_scale, out_shift, out_bits, out_dtype):
    m = x.shape[0]
    xp = _padded(x, lda)
    out = torch.empty((m, n), dtype=out_dtype)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    _C.lowbit_gemm_host(
        xp.data_ptr(),
        x.dtype == torch.int8,
        lda,
        packed.data_ptr(),
        m,
        n,
        k,
        bits,
        combined.data_ptr(),
        ptr(bias),
        ptr(out_scale),
        ptr(out_shift),
        out_bits or 0,
        OUT_ACT_SCALE if out_bits else 0.0,
        out.data_ptr(),
        OUT_DTYPE_CODES[out_dtype],
    )
    return out


def _expected(x, codes, combined, bias, out_scale, out_shift, out_bits, out_dtype):
    acc = (x.to(torch.float64) @ codes.to(torch.float64).T).to(torch.float32)
    act_scale = OUT_ACT_SCALE if out_bits else None
    return reference.lowbit_epilogue(acc, combined, bias, out_scale, out_shift, out_bits, act_scale, out_dtype)


def _check(m, n, k, lda_extra, bits, x_signed, out_dtype, out_bits, bias, lbn, extremes=False):
    lda = (k + 15) // 16 * 16 + lda_extra
    x = _x_codes(m, k, x_signed, extremes)
    codes = _weight_codes(n, k, bits, extremes)
    packed = reference.pack_codes(codes, bits)
    assert packed.shape == (n, -(-k // reference.codes_per_word(bits)))
    weight_scale, bias_t, out_scale, out_shift = _vectors(n, bias, lbn)
    combined = weight_scale * round_to(torch.float32, ACT_SCALE)
    got = _host(x, lda, packed, n, k, bits, combined, bias_t, out_scale, out_shift, out_bits, out_dtype)
    want = _expected(x, codes, combined, bias_t, out_scale, out_shift, out_bits, out_dtype)
    assert got.dtype == want.dtype
    assert torch.equal(got, want), f"m={m} n={n} k={k} lda={lda}: {(got != want).sum()} mismatches"


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("x_signed", [False, True])
@pytest.mark.parametrize("out_dtype,out_bits,bias,lbn", EPILOGUES)
def test_lowbit_gemm_host_equals_reference(bits, x_signed, out_dtype, out_bits, bias, lbn):
    for m, n, k, lda_extra in SHAPES:
        _check(m, n, k, lda_extra, bits, x_signed, out_dtype, out_bits, bias, lbn)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("x_signed", [False, True])
def test_lowbit_gemm_host_large_sums_round_once(bits, x_signed):
    """All-extreme codes over a long K: |acc| far above 2^24, so its one rounding to float32 shows."""
    _check(2, 3, 4099, 16, bits, x_signed, torch.float32, None, False, False, extremes=True)
    _check(3, 2, 3001, 0, bits, x_signed, torch.float32, None, True, False)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("out_bits", [None, 3])
def test_lowbit_gemm_host_equals_lowbit_linear(bits, out_bits):
    """The twin with the launcher's combined scale is reference.lowbit_linear on code inputs."""
    m, n, k = 5, 7, 45
    lda = 64
    x = _x_codes(m, k, False)
    codes = _weight_codes(n, k, bits)
    packed = reference.pack_codes(codes, bits)
    weight_scale, bias, out_scale, out_shift = _vectors(n, True, True)
    want = reference.lowbit_linear(
        x, packed, weight_scale, bits, k, bias, None, ACT_SCALE, out_scale, out_shift, out_bits, OUT_ACT_SCALE
    )
    combined = weight_scale * round_to(torch.float32, ACT_SCALE)
    got = _host(x, lda, packed, n, k, bits, combined, bias, out_scale, out_shift, out_bits, want.dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("x_signed", [False, True])
def test_lowbit_gemm_host_empty_k_gives_epilogue_of_zero(x_signed):
    n = 4
    x = torch.empty((3, 0), dtype=torch.int8 if x_signed else torch.uint8)
    packed = torch.empty((n, 0), dtype=torch.int32)
    weight_scale, bias, out_scale, out_shift = _vectors(n, True, True)
    got = _host(x, 0, packed, n, 0, 4, weight_scale, bias, out_scale, out_shift, None, torch.float32)
    want = reference.lowbit_epilogue(
        torch.zeros((3, n)), weight_scale, bias, out_scale, out_shift, None, None, torch.float32
    )
    assert torch.equal(got, want)


def test_lowbit_gemm_host_empty_rows_and_columns_write_nothing():
    packed = reference.pack_codes(_weight_codes(3, 20, 2), 2)
    scale = torch.ones(3)
    _host(torch.empty((0, 20), dtype=torch.uint8), 32, packed, 3, 20, 2, scale, None, None, None, None, torch.float32)
    out = _host(_x_codes(2, 20, False), 32, packed[:0], 0, 20, 2, scale, None, None, None, None, torch.float32)
    assert out.shape == (2, 0)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"lda": 24}, "lda"),
        ({"lda": 16}, "lda"),
        ({"out_dtype": 4}, "out_dtype"),
        ({"out_dtype": 3}, "out_bits"),
        ({"out_bits": 4}, "out_bits"),
        ({"combined_scale": 0}, "null"),
    ],
)
def test_lowbit_gemm_host_rejects_bad_arguments(change, message):
    x = torch.zeros((2, 32), dtype=torch.uint8)
    packed = torch.zeros((3, 3), dtype=torch.int32)  # k = 20 at 3 bits: 8 codes a word
    scale = torch.ones(3)
    out = torch.empty((2, 3))
    args = dict(
        x=x.data_ptr(),
        x_signed=False,
        lda=32,
        packed=packed.data_ptr(),
        m=2,
        n=3,
        k=20,
        bits=3,
        combined_scale=scale.data_ptr(),
        bias=0,
        out_scale=0,
        out_shift=0,
        out_bits=0,
        out_act_scale=0.0,
        out=out.data_ptr(),
        out_dtype=0,
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        _C.lowbit_gemm_host(**args)
