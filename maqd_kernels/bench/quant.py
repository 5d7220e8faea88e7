"""MaQD low-bit matmul on a GPU: how close ``lowbit_linear`` and the quantized training layer come
to the machine's limits, and how much they gain over cuBLAS and the fake quantization they replace.

    python -m maqd_kernels.bench --ops quant [--quick]    # this family alone, in the harness
    python benchmarks/bench_quant.py [--quick] [--only linear,train,prep] [--bits 2,4] [--out DIR]

Sections:

(a) linear: ``lowbit_linear`` forward at M in {1, 16, 128, 1024, 8192} rows, N = K in {4096, 8192},
    weight bits 1, 2, 4, 8, on each kernel backend (cuda, triton) that can run here, in two forms:
    W{b}A8, the integer path: uint8 activation codes in, the full fused epilogue (per-channel
    scale, bias, the folded LBN affine out_scale / out_shift, requantization to uint8 codes with
    out_bits = 8); and W{b}A16, weight-only: bf16 activations (act_bits None), bias, bf16 out.
    Peers at the same M, N, K: cuBLAS bf16 ``torch.matmul`` (x (M, K) @ W (K, N)), ``torch._int_mm``
    (int8 (M, K) @ int8 (K, N), int32 out; cuBLASLt refuses M <= 16 and K or N not a multiple of
    8, so those are skipped with a note), and per form the eager fake-quant chain written with
    plain torch ops (round-clip of bf16 x, F.linear on the dequantized bf16 weight, the same
    epilogue) and torch.compile of that chain. The peers do not depend on the weight's bits.
(b) train: one training step (forward + backward, no optimizer) of QuantAct(8) -> QuantLinear(K, N,
    weight_bits=b) (the modules' backend chosen with MAQD_BACKEND) and of the fused
    ``quant_linear(..., act_bits=8)``, at M in {1024, 8192}, N = K = 4096, bf16, against bf16
    nn.Linear, the eager fake quantization (round-clip of the standardized weight and of the
    activations with plain torch ops, STE by the detach trick, F.linear, autograd) and
    torch.compile of it.
(c) prep: the kernels a layer runs before its matmul: ``pack_weight`` of a bf16 (N, K) weight
    (standardize + round-clip + pack) and ``quantize`` of bf16 activations to uint8 codes, against
    the eager reference and torch.compile.

Each time is turned into TFLOP/s (2 M N K per forward) and GB/s (the bytes the call must move:
packed weight N K b / 8, activations, outputs, epilogue vectors; ``linear_bytes``) and set against
the copy bandwidth and bf16 matmul rate measured at the start of the same run (the int8 rate of
``torch._int_mm`` is measured too; the tensor cores' nominal int8 peak is twice bf16's).

Every GPU time is do_bench's median with the L2 cache flushed before each repetition. The default
run takes a few minutes on an H200, most of it torch.compile; --quick measures fewer shapes.

``run`` writes quant.csv (one line per measurement), quant.md (tables under the run's commit, GPU
and versions, and the targets table) and quant.png into the run's results folder. A measurement
that fails (a kernel missing or broken, out of memory) is recorded in its row's `error` and the
run goes on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import maqd_kernels as mk

from .. import nn as mknn
from ..quant import reference
from . import common

Tensor = torch.Tensor

FAMILY, TITLE = "quant", "MaQD low-bit matmul benchmarks"

SECTIONS = ("linear", "train", "prep")
KERNELS = ("cuda", "triton")
BITS = (1, 2, 4, 8)
ACT_BITS = OUT_BITS = 8
ACT_SCALE = mk.default_scale(ACT_BITS, False)
OUT_ACT_SCALE = mk.default_scale(OUT_BITS, False)
STANDARDIZE_EPS = 1e-5
# The nominal int8 tensor-core rate over the bf16 one (mma.sync and wgmma alike, sm_80 and sm_90):
# the matmul floor of the integer path. The run also measures torch._int_mm's actual rate.
INT8_OVER_BF16 = 2.0
LINEAR_PEERS = ("cublas", "int_mm", "eager", "compile")
TRAIN_PEERS = ("nn.Linear", "eager", "compile")


@dataclass
class Plan:
    """What one run measures. `kernels` are the backends held against the targets: cuda and triton
    where they run; in a smoke run also the reference, so every code path runs on a bare CPU. The
    targets are read at the largest and smallest M and the largest N = K of the run (the smoke
    shapes in a smoke run, so CI exercises the targets' code with meaningless numbers)."""

    device: torch.device
    smoke: bool
    sections: list[str]
    kernels: list[str]
    compile_backend: str
    bits: list[int]
    linear_rows: list[int]
    linear_sizes: list[int]
    train_rows: list[int]
    train_size: int
    train_bits: list[int]
    quantize_rows: list[int]


def make_plan(
    device: torch.device,
    smoke: bool,
    quick: bool,
    sections: Sequence[str] = SECTIONS,
    bits: Sequence[int] | None = None,
) -> Plan:
    """The run's shapes: the smoke sizes, --quick's fewer shapes, or the default; `bits` are the
    weight widths measured (default all, 2 and 4 with --quick)."""
    kernels = common.kernel_backends(device)
    if smoke:
        bits = list(bits or BITS)
        return Plan(
            device=device,
            smoke=True,
            sections=list(sections),
            kernels=["reference"] + kernels,
            # Dynamo and AOTAutograd (the forward and backward graphs) without Inductor's code
            # generation: the compiled peers' code path in seconds, where Inductor takes minutes on a CPU.
            compile_backend="aot_eager",
            bits=bits,
            linear_rows=[1, 32],
            linear_sizes=[64],
            train_rows=[32],
            train_size=64,
            # One width: a training step through the Triton interpreter takes seconds.
            train_bits=[2] if 2 in bits else bits[:1],
            quantize_rows=[32],
        )
    bits = list(bits or ([2, 4] if quick else BITS))
    return Plan(
        device=device,
        smoke=False,
        sections=list(sections),
        kernels=kernels,
        compile_backend="inductor",
        bits=bits,
        linear_rows=[1, 16, 1024, 8192] if quick else [1, 16, 128, 1024, 8192],
        linear_sizes=[8192] if quick else [4096, 8192],
        train_rows=[8192] if quick else [1024, 8192],
        train_size=4096,
        train_bits=bits,
        quantize_rows=[8192] if quick else [1024, 8192],
    )


def timed_compile(plan: Plan, fn: Callable, first: Callable[[Callable], object]) -> tuple[Callable, float]:
    """torch.compile of `fn` with a fresh Dynamo cache (each shape and bit width is its own static
    graph, which would otherwise run into the recompile limit and fall back to eager), and the
    seconds `first(compiled)` took: the first call as the timed ones make it (with the backward,
    for training, whose graph AOTAutograd compiles at the first backward)."""
    torch.compiler.reset()
    compiled = torch.compile(fn, backend=plan.compile_backend, dynamic=False)
    start = time.perf_counter()
    first(compiled)
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    return compiled, time.perf_counter() - start


def free_memory(plan: Plan) -> None:
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


# ============================================================================= (a) lowbit_linear


LINEAR_BYTES_MODEL = """\
packed weight     N ceil(K / (32 / b)) 4  (= N K b / 8)  + alpha_w, N 4
W{b}A8            + x codes M K 1, out codes M N 1, bias + out_scale + out_shift 3 N 4
W{b}A16           + x M K 2, out M N 2, bias N 4
cuBLAS bf16       W N K 2 + x M K 2 + out M N 2
torch._int_mm     W N K 1 + x M K 1 + out (int32) M N 4
fake-quant A8     W N K 2 + x (bf16) M K 2 + out codes M N 1 + 3 N 2
fake-quant A16    W N K 2 + x M K 2 + out M N 2 + N 2"""


def packed_weight_bytes(n: int, k: int, bits: int) -> int:
    per_word = reference.codes_per_word(bits)
    return n * -(-k // per_word) * 4 + n * 4


def linear_bytes(impl: str, path: str | None, m: int, n: int, k: int, bits: int | None) -> int:
    """The fewest bytes one forward call of `impl` must move (LINEAR_BYTES_MODEL): the model behind
    its GB/s and fraction of the copy bandwidth."""
    if impl == "cublas":
        return 2 * (n * k + m * k + m * n)
    if impl == "int_mm":
        return n * k + m * k + 4 * m * n
    if impl in ("eager", "compile"):
        if path == "A8":
            return 2 * n * k + 2 * m * k + m * n + 3 * n * 2
        return 2 * n * k + 2 * m * k + 2 * m * n + n * 2
    weight = packed_weight_bytes(n, k, bits)
    if path == "A8":
        return weight + m * k + m * n + 3 * n * 4
    return weight + 2 * m * k + 2 * m * n + n * 4


def integer_matmul(impl: str, path: str | None) -> bool:
    """Whether `impl` multiplies on the int8 tensor cores (its matmul floor is at INT8_OVER_BF16
    times the bf16 rate): our W{b}A8 kernels and torch._int_mm. The fake-quant chains run bf16."""
    return impl == "int_mm" or (impl not in ("cublas", "eager", "compile") and path == "A8")


def fake_quant_a8(x: Tensor, w_dq: Tensor, bias: Tensor, out_scale: Tensor, out_shift: Tensor) -> Tensor:
    """The W{b}A8 layer as eager fake quantization: round-clip of bf16 x to the 8-bit grid, F.linear
    on the dequantized weight (alpha_w q, bf16), the folded LBN affine, requantization to codes."""
    x_q = torch.clamp(torch.round(x / ACT_SCALE), 0, 2**ACT_BITS - 1) * ACT_SCALE
    y = F.linear(x_q, w_dq, bias) * out_scale + out_shift
    return torch.clamp(torch.round(y / OUT_ACT_SCALE), 0, 2**OUT_BITS - 1).to(torch.uint8)


def fake_quant_a16(x: Tensor, w_dq: Tensor, bias: Tensor) -> Tensor:
    """The weight-only layer as eager code: F.linear on the dequantized weight."""
    return F.linear(x, w_dq, bias)


@dataclass
class LinearInputs:
    """One (M, K) set of activations, in every form the implementations take; non-zero random."""

    codes: Tensor  # uint8 (M, K), 1..255
    x_a8: Tensor  # bf16 (M, K) on [0, 255 ACT_SCALE]: what the fake-quant A8 chain round-clips
    x_a16: Tensor  # bf16 (M, K), N(0, 1)
    x_i8: Tensor  # int8 (M, K), -127..127


def linear_inputs(plan: Plan, m: int, k: int) -> LinearInputs:
    device = plan.device
    return LinearInputs(
        codes=torch.randint(1, 256, (m, k), dtype=torch.uint8, device=device),
        x_a8=(torch.rand(m, k, device=device) * (255 * ACT_SCALE)).to(torch.bfloat16),
        x_a16=torch.randn(m, k, device=device, dtype=torch.bfloat16),
        x_i8=torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device),
    )


@dataclass
class LinearWeights:
    """One N = K layer: a PackedWeight per bit width, the epilogue vectors (float32 for the
    kernels, bf16 for the fake-quant chains), and the peers' dense weights."""

    packed: dict[int, mk.PackedWeight]
    bias: Tensor
    out_scale: Tensor
    out_shift: Tensor
    bias16: Tensor
    out_scale16: Tensor
    out_shift16: Tensor
    w_dq: Tensor  # bf16 (N, K), the dequantized weight of the widest packed one
    w_i8: Tensor  # int8 (N, K); its .t() is the (K, N) column-major operand cuBLASLt's int8 GEMM wants


def linear_weights(plan: Plan, n: int, k: int) -> LinearWeights:
    device = plan.device
    w = torch.randn(n, k, device=device)
    # Packed by the reference, whose layout the kernels share: the forward measurements do not
    # depend on the pack kernels (section (c) measures those).
    packed = {bits: mk.pack_weight(w, bits, backend="reference") for bits in plan.bits}
    bias = torch.randn(n, device=device) * 0.1
    out_scale = torch.rand(n, device=device) + 0.5
    out_shift = torch.randn(n, device=device) * 0.1
    return LinearWeights(
        packed=packed,
        bias=bias,
        out_scale=out_scale,
        out_shift=out_shift,
        bias16=bias.to(torch.bfloat16),
        out_scale16=out_scale.to(torch.bfloat16),
        out_shift16=out_shift.to(torch.bfloat16),
        w_dq=packed[max(plan.bits)].dequantize().to(torch.bfloat16),
        w_i8=torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device),
    )


def int_mm_refusal(m: int, n: int, k: int) -> str | None:
    """Why torch._int_mm refuses a shape on CUDA (cuBLASLt's int8 GEMM), or None. Applied on every
    device, so a smoke run on the CPU (whose _int_mm has no such limits) exercises the skip too."""
    if m <= 16:
        return f"skipped: torch._int_mm needs M > 16 (M = {m})"
    if k % 8 or n % 8:
        return f"skipped: torch._int_mm needs K and N multiples of 8 (K = {k}, N = {n})"
    return None


def linear_call(plan: Plan, impl: str, path: str | None, bits: int | None, xs: LinearInputs, ws: LinearWeights):
    """(fn, compile seconds or None, note or None) for one implementation of the forward."""
    if impl == "cublas":
        w_kn = ws.w_dq.t()  # (K, N), column-major: the layout of nn.Linear's weight
        return (lambda: torch.matmul(xs.x_a16, w_kn)), None, None
    if impl == "int_mm":
        m, k = xs.x_i8.shape
        refusal = int_mm_refusal(m, ws.w_i8.shape[0], k)
        if refusal:
            return None, None, refusal
        w_kn = ws.w_i8.t()
        return (lambda: torch._int_mm(xs.x_i8, w_kn)), None, None
    if impl in ("eager", "compile"):
        if path == "A8":
            fn, args = fake_quant_a8, (xs.x_a8, ws.w_dq, ws.bias16, ws.out_scale16, ws.out_shift16)
        else:
            fn, args = fake_quant_a16, (xs.x_a16, ws.w_dq, ws.bias16)
        compile_s = None
        if impl == "compile":
            fn, compile_s = timed_compile(plan, fn, lambda compiled: compiled(*args))
        return functools.partial(fn, *args), compile_s, None
    w = ws.packed[bits]
    if path == "A8":
        fn = functools.partial(
            mk.lowbit_linear,
            xs.codes,
            w,
            ws.bias,
            act_scale=ACT_SCALE,
            out_scale=ws.out_scale,
            out_shift=ws.out_shift,
            out_bits=OUT_BITS,
            out_act_scale=OUT_ACT_SCALE,
            backend=impl,
        )
    else:
        fn = functools.partial(mk.lowbit_linear, xs.x_a16, w, ws.bias, backend=impl)
    return fn, None, None


def linear_runs(plan: Plan) -> list[tuple[str, str | None, int | None]]:
    """Section (a)'s (impl, path, bits), measured at every (M, N = K): the peers, then the kernels
    at each bit width, per form (A8, A16)."""
    runs: list[tuple[str, str | None, int | None]] = [("cublas", None, None), ("int_mm", None, None)]
    for path in ("A8", "A16"):
        runs += [(impl, path, None) for impl in ("eager", "compile") if impl not in plan.kernels]
        runs += [(kernel, path, bits) for bits in plan.bits for kernel in plan.kernels]
    return runs


def bench_linear(plan: Plan, timer: common.Timer, ceilings: common.Ceilings, record: common.Recorder) -> list[dict]:
    rows = []
    with torch.no_grad():  # inference: no autograd bookkeeping for any implementation
        for size in plan.linear_sizes:
            ws = linear_weights(plan, size, size)
            for m in plan.linear_rows:
                rows += bench_linear_shape(plan, timer, ceilings, record, ws, linear_inputs(plan, m, size))
            del ws
            free_memory(plan)
    return rows


def bench_linear_shape(plan, timer, ceilings, record, ws: LinearWeights, xs: LinearInputs) -> list[dict]:
    """Every implementation at one (M, N, K), then each kernel row's speedups over the peers."""
    m, k = xs.codes.shape
    n = ws.w_dq.shape[0]
    rows = []
    for impl, path, bits in linear_runs(plan):
        flops = 2 * m * n * k
        nbytes = linear_bytes(impl, path, m, n, k, bits)
        rate = ceilings.matmul_tflops * (INT8_OVER_BF16 if integer_matmul(impl, path) else 1.0)
        memory_ms, matmul_ms = ceilings.memory_floor_ms(nbytes), flops / rate / 1e9
        row = {"section": "linear", "M": m, "N": n, "K": k, "impl": impl, "path": path, "bits": bits}
        row["case"] = case_label(impl, path, bits)
        row |= {"flops": flops, "bytes": nbytes, "memory_floor_ms": memory_ms, "matmul_floor_ms": matmul_ms}
        row["bound"] = "memory" if memory_ms > matmul_ms else "compute"

        def measure():
            fn, compile_s, note = linear_call(plan, impl, path, bits, xs, ws)
            if note:
                return {"note": note}
            ms = timer.ms(fn)
            gbps = nbytes / ms / 1e6
            tflops = flops / ms / 1e9
            result = {"ms": ms, "tflops": tflops, "gbps": gbps, "of_copy": gbps / ceilings.copy_gbps}
            result |= {"of_mm": tflops / ceilings.matmul_tflops, "of_floor": max(memory_ms, matmul_ms) / ms}
            return result | ({"compile_s": compile_s} if compile_s is not None else {})

        rows.append(record(row, measure))
    add_linear_speedups(rows, plan.kernels)
    return rows


def case_label(impl: str, path: str | None, bits: int | None) -> str:
    if impl == "cublas":
        return "bf16"
    if impl == "int_mm":
        return "int8 x int8"
    if bits is None:
        return f"fake-quant {path}"
    return f"W{bits}{path}"


def add_linear_speedups(rows: list[dict], kernels: list[str]) -> None:
    """x_<peer> = the peer's time over the kernel row's, the peer's fake-quant chains taken in the
    kernel row's form (A8 or A16); cuBLAS and _int_mm stand against both forms."""
    timed = {(r["impl"], r["path"]): r["ms"] for r in rows if "ms" in r and r["impl"] in LINEAR_PEERS}
    for r in rows:
        if r["impl"] not in kernels or "ms" not in r:
            continue
        for peer in LINEAR_PEERS:
            base = timed.get((peer, None if peer in ("cublas", "int_mm") else r["path"]))
            if base is not None:
                r[f"x_{peer}"] = base / r["ms"]


# ============================================================================= (b) training step


def fake_quant_linear(x: Tensor, weight: Tensor, bias: Tensor, bits: int) -> Tensor:
    """QuantAct(8) -> QuantLinear as a user writes it without the kernels: round-clip of the
    activations and of the standardized weight with plain torch ops in the storage dtype, the
    straight-through estimator by the detach trick (the gradient passes inside the grid's range:
    the clamp's own gradient), F.linear, autograd for the rest."""
    x_c = x.clamp(0, (2**ACT_BITS - 1) * ACT_SCALE)
    x_q = x_c + (torch.round(x_c / ACT_SCALE) * ACT_SCALE - x_c).detach()
    mean = weight.mean(dim=1, keepdim=True)
    var = weight.var(dim=1, unbiased=False, keepdim=True)
    w_hat = (weight - mean) / torch.sqrt(var + STANDARDIZE_EPS)
    scale = mk.default_scale(bits, True)
    if bits == 1:
        w_q = w_hat + (((w_hat >= 0).to(w_hat.dtype) * 2 - 1) * scale - w_hat).detach()
    else:
        top = (2 ** (bits - 1) - 1) * scale
        w_c = w_hat.clamp(-top, top)
        w_q = w_c + (torch.round(w_c / scale) * scale - w_c).detach()
    return F.linear(x_q, w_q, bias)


class QuantBlock(nn.Module):
    """QuantAct(8) then QuantLinear: the training layer of a MaQD network, as the modules build it."""

    def __init__(self, k: int, n: int, bits: int):
        super().__init__()
        self.act = mknn.QuantAct(ACT_BITS)
        self.linear = mknn.QuantLinear(k, n, weight_bits=bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.act(x))


def train_call(plan: Plan, impl: str, bits: int | None, leaf: Tensor, grad: Tensor, linear: nn.Linear):
    """(forward, its parameters, the backend to set in MAQD_BACKEND or None, compile seconds) of one
    implementation, with the layer's weights copied from `linear`."""
    weight = linear.weight.detach().clone().requires_grad_()
    bias = linear.bias.detach().clone().requires_grad_()
    if impl == "nn.Linear":
        layer = nn.Linear(linear.in_features, linear.out_features, device=plan.device, dtype=leaf.dtype)
        layer.load_state_dict(linear.state_dict())
        return layer, list(layer.parameters()), None, None
    if impl in ("eager", "compile"):
        forward = functools.partial(fake_quant_linear, weight=weight, bias=bias, bits=bits)
        compile_s = None
        if impl == "compile":
            compiled, compile_s = timed_compile(
                plan, fake_quant_linear, lambda c: c(leaf, weight=weight, bias=bias, bits=bits).backward(grad)
            )
            forward = functools.partial(compiled, weight=weight, bias=bias, bits=bits)
        return forward, [weight, bias], None, compile_s
    kernel, form = impl.split(":")
    if form == "modules":
        block = QuantBlock(linear.in_features, linear.out_features, bits).to(plan.device, leaf.dtype)
        block.linear.load_state_dict(linear.state_dict())
        return block, list(block.parameters()), kernel, None
    forward = functools.partial(
        mk.quant_linear, weight=weight, bias=bias, weight_bits=bits, act_bits=ACT_BITS, backend=kernel
    )
    return forward, [weight, bias], None, None


def train_label(impl: str) -> str:
    if ":" not in impl:
        return {"eager": "eager fake-quant", "compile": "compile fake-quant"}.get(impl, impl + " bf16")
    kernel, form = impl.split(":")
    return f"QuantAct+QuantLinear [{kernel}]" if form == "modules" else f"quant_linear act_bits=8 [{kernel}]"


def train_runs(plan: Plan) -> list[tuple[str, int | None]]:
    """Section (b)'s (impl, bits), measured at every M: nn.Linear, then per bit width the fake
    quantization (eager, compiled) and each kernel's modules and fused op."""
    runs: list[tuple[str, int | None]] = [("nn.Linear", None)]
    for bits in plan.train_bits:
        runs += [(peer, bits) for peer in ("eager", "compile")]
        runs += [(f"{kernel}:{form}", bits) for kernel in plan.kernels for form in ("modules", "fused")]
    return runs


def bench_train(plan: Plan, timer: common.Timer, ceilings: common.Ceilings, record: common.Recorder) -> list[dict]:
    n = k = plan.train_size
    rows = []
    for m in plan.train_rows:
        # An LBN output: N(0, 1), of which QuantAct keeps the positive half.
        x = torch.randn(m, k, device=plan.device, dtype=torch.bfloat16)
        grad = torch.randn(m, n, device=plan.device, dtype=torch.bfloat16)
        linear = nn.Linear(k, n, device=plan.device, dtype=torch.bfloat16)
        shape_rows = []
        for impl, bits in train_runs(plan):
            flops = 6 * m * n * k
            row = {"section": "train", "M": m, "N": n, "K": k, "impl": train_label(impl), "bits": bits}
            row |= {"kind": "kernel" if ":" in impl else "peer", "flops": flops}

            def measure():
                leaf = x.detach().requires_grad_()  # a layer inside a network: x takes a gradient too
                forward, params, backend, compile_s = train_call(plan, impl, bits, leaf, grad, linear)

                def step():
                    forward(leaf).backward(grad)

                if backend is None:
                    ms = timer.ms(step, [leaf, *params])
                else:
                    with common.environment("MAQD_BACKEND", backend):
                        ms = timer.ms(step, [leaf, *params])
                tflops = flops / ms / 1e9
                result = {"ms": ms, "tflops": tflops, "of_mm": tflops / ceilings.matmul_tflops}
                return result | ({"compile_s": compile_s} if compile_s is not None else {})

            shape_rows.append(record(row, measure))
            free_memory(plan)
        add_train_speedups(shape_rows)
        rows += shape_rows
    return rows


def add_train_speedups(rows: list[dict]) -> None:
    """x_<peer>: the peer's time over the kernel row's; nn.Linear at any bits, the fake quantization
    at the kernel row's bits."""
    linear = next((r["ms"] for r in rows if r["impl"] == "nn.Linear bf16" and "ms" in r), None)
    fake = {(r["impl"], r["bits"]): r["ms"] for r in rows if r["kind"] == "peer" and "ms" in r}
    for r in rows:
        if r["kind"] != "kernel" or "ms" not in r:
            continue
        if linear is not None:
            r["x_linear"] = linear / r["ms"]
        for key, label in (("x_eager", "eager fake-quant"), ("x_compile", "compile fake-quant")):
            if (label, r["bits"]) in fake:
                r[key] = fake[(label, r["bits"])] / r["ms"]


# ============================================================================= (c) pack and quantize


def eager_quantize(x: Tensor) -> Tensor:
    """``quantize(x, 8, ACT_SCALE, signed=False)`` in plain torch ops."""
    return torch.clamp(torch.round(x / ACT_SCALE), 0, 2**ACT_BITS - 1).to(torch.uint8)


def prep_impls(plan: Plan, op: str) -> list[str]:
    """Section (c)'s implementations of `op` ("pack_weight" or "quantize"): the kernels, then the
    peers that are not among them."""
    peers = ("reference", "compile") if op == "pack_weight" else ("reference", "eager", "compile")
    return plan.kernels + [p for p in peers if p not in plan.kernels]


def bench_prep(plan: Plan, timer: common.Timer, ceilings: common.Ceilings, record: common.Recorder) -> list[dict]:
    rows = []
    with torch.no_grad():
        for size in plan.linear_sizes:
            w = torch.randn(size, size, device=plan.device, dtype=torch.bfloat16)
            for bits in plan.bits:
                nbytes = w.numel() * 2 + packed_weight_bytes(size, size, bits)
                shape = {"op": "pack_weight", "M": None, "N": size, "K": size, "bits": bits, "bytes": nbytes}
                shape_rows = []
                for impl in prep_impls(plan, "pack_weight"):

                    def measure():
                        compile_s = None
                        if impl == "compile":
                            args = (w, None, mk.default_scale(bits, True), bits, True, STANDARDIZE_EPS)
                            fn, compile_s = timed_compile(plan, reference.pack_weight, lambda c: c(*args))
                            call = functools.partial(fn, *args)
                        else:
                            call = functools.partial(mk.pack_weight, w, bits, backend=impl)
                        return prep_result(timer, ceilings, call, nbytes, compile_s)

                    shape_rows.append(record({"section": "prep", "impl": impl} | shape, measure))
                rows += add_prep_speedups(shape_rows, plan.kernels)
            free_memory(plan)
        for m in plan.quantize_rows:
            for size in plan.linear_sizes:
                x = (torch.rand(m, size, device=plan.device) * (255 * ACT_SCALE)).to(torch.bfloat16)
                nbytes = x.numel() * 3
                shape = {"op": "quantize", "M": m, "N": None, "K": size, "bits": ACT_BITS, "bytes": nbytes}
                shape_rows = []
                for impl in prep_impls(plan, "quantize"):

                    def measure():
                        compile_s = None
                        if impl == "eager":
                            call = functools.partial(eager_quantize, x)
                        elif impl == "compile":
                            fn, compile_s = timed_compile(plan, eager_quantize, lambda c: c(x))
                            call = functools.partial(fn, x)
                        else:
                            call = functools.partial(mk.quantize, x, ACT_BITS, ACT_SCALE, signed=False, backend=impl)
                        return prep_result(timer, ceilings, call, nbytes, compile_s)

                    shape_rows.append(record({"section": "prep", "impl": impl} | shape, measure))
                rows += add_prep_speedups(shape_rows, plan.kernels)
    return rows


def prep_result(timer, ceilings, call, nbytes: int, compile_s: float | None) -> dict:
    ms = timer.ms(call)
    gbps = nbytes / ms / 1e6
    result = {"ms": ms, "gbps": gbps, "of_copy": gbps / ceilings.copy_gbps}
    return result | ({"compile_s": compile_s} if compile_s is not None else {})


def add_prep_speedups(rows: list[dict], kernels: list[str]) -> list[dict]:
    """x_<peer> on each kernel row: the peer's time over the row's. The peers are every other
    implementation but cuda and triton, so the reference stands as a peer even in a smoke run,
    where it is also measured as a kernel."""
    timed = {r["impl"]: r["ms"] for r in rows if "ms" in r and r["impl"] not in KERNELS}
    for r in rows:
        if r["impl"] in kernels and "ms" in r:
            for peer, ms in timed.items():
                if peer != r["impl"]:
                    r[f"x_{peer}"] = ms / r["ms"]
    return rows


# ============================================================================= targets and report


def find(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items())), None)


def targets(plan: Plan, linear: list[dict], train: list[dict]) -> list[common.Target]:
    """The issue's goals, for each kernel backend. The linear ones are read at the largest N = K of
    the run (8192 on a GPU): at N = K = 4096 and M = 1 the packed weight moves in about a
    microsecond, below a launch's latency, so that shape says more about launches than kernels."""
    out = []
    size = max(plan.linear_sizes)
    big, small = max(plan.linear_rows), min(plan.linear_rows)
    for kernel in KERNELS:
        absent = "" if kernel in plan.kernels else f" ({kernel} cannot run here)"
        skipped = {"linear": "" if linear else " (section not run)", "train": "" if train else " (section not run)"}
        for bits in (2, 4):
            row = find(linear, impl=kernel, path="A8", bits=bits, M=big, N=size) or {}
            where = f"M={big} N=K={size}{absent}{skipped['linear']}" + (f": {row['error']}" if "error" in row else "")
            if linear and not row and not absent:
                where += f" (W{bits} not in this run)"
            name = f"W{bits}A8 [{kernel}] with the fused epilogue over bf16 cuBLAS, M={big}"
            out.append(common.Target(name, 1.6, row.get("x_cublas"), where=where))
            name = f"W{bits}A8 [{kernel}] with the fused epilogue over torch._int_mm, M={big}"
            out.append(common.Target(name, 1.0, row.get("x_int_mm"), where=where))
        for bits, goal in ((2, 5.0), (4, 3.0)):
            row = find(linear, impl=kernel, path="A16", bits=bits, M=small, N=size) or {}
            where = f"M={small} N=K={size}{absent}{skipped['linear']}" + (f": {row['error']}" if "error" in row else "")
            if linear and not row and not absent:
                where += f" (W{bits} not in this run)"
            name = f"W{bits}A16 weight-only [{kernel}] over bf16 cuBLAS, M={small}"
            out.append(common.Target(name, goal, row.get("x_cublas"), where=where))
            name = f"W{bits}A16 weight-only [{kernel}] fraction of copy bandwidth (packed bytes), M={small}"
            out.append(common.Target(name, 0.75, row.get("of_copy"), unit="", where=where))
        label = train_label(f"{kernel}:modules")
        done = [r for r in train if r["impl"] == label and "x_eager" in r]
        measured, where = None, "no measurement" + absent + skipped["train"]
        if done:
            low = min(done, key=lambda r: r["x_eager"])
            measured, where = low["x_eager"], f"W{low['bits']} M={low['M']} N=K={low['N']} (worst)"
        name = f"{label} train step over bf16 nn.Linear + eager fake quant"
        out.append(common.Target(name, 1.0, measured, where=where))
    return out


LINEAR_COLUMNS = {"M": "M", "N": "N=K", "impl": "impl", "case": "case", "bound": "bound", "ms": "ms"}
LINEAR_COLUMNS |= {"tflops": "TFLOP/s", "gbps": "GB/s", "of_copy": "of copy BW", "of_mm": "of bf16 mm"}
LINEAR_COLUMNS |= {"of_floor": "of floor", "x_cublas": "x cuBLAS", "x_int_mm": "x _int_mm"}
LINEAR_COLUMNS |= {"x_eager": "x eager", "x_compile": "x compile", "compile_s": "compile s"}
LINEAR_COLUMNS |= {"note": "note", "error": "error"}
TRAIN_COLUMNS = {"M": "M", "N": "N=K", "bits": "bits", "impl": "impl", "ms": "ms", "tflops": "TFLOP/s"}
TRAIN_COLUMNS |= {"of_mm": "of bf16 mm", "x_linear": "x nn.Linear", "x_eager": "x eager fake-quant"}
TRAIN_COLUMNS |= {"x_compile": "x compile fake-quant", "compile_s": "compile s", "error": "error"}
PREP_COLUMNS = {"op": "op", "M": "M", "N": "N", "K": "K", "bits": "bits", "impl": "impl", "ms": "ms"}
PREP_COLUMNS |= {"gbps": "GB/s", "of_copy": "of copy BW", "x_reference": "x reference", "x_eager": "x eager"}
PREP_COLUMNS |= {"x_compile": "x compile", "compile_s": "compile s", "error": "error"}
ERROR_COLUMNS = {k: k for k in ("section", "op", "impl", "case", "bits", "M", "N", "K", "error")}


def report(plan, ceilings, linear, train, prep, goals, errors) -> list[tuple[str, str]]:
    """The Markdown sections, in the order a reader asks: did we meet the goals, then the detail."""
    sections = [
        common.targets_section(
            goals,
            plan.smoke,
            f"The linear targets are read at N = K = {max(plan.linear_sizes)}; the training one is "
            "the worst over the bit widths and M measured. `x` is the peer's time over the kernel's.",
            compiled=True,
        )
    ]
    int_rate = ceilings.matmul_tflops * INT8_OVER_BF16
    if linear:
        intro = (
            "Median ms (do_bench). GB/s counts the bytes each call must move:\n\n```\n"
            + LINEAR_BYTES_MODEL
            + "\n```\n\n`of copy BW` is that over the copy bandwidth measured in this run "
            f"({ceilings.copy_gbps:.0f} GB/s), `of bf16 mm` the TFLOP/s (2 M N K) over the bf16 matmul "
            f"rate ({common.fmt(ceilings.matmul_tflops)} TFLOP/s): an int8 kernel can pass 1.0 there, the "
            "tensor cores' int8 peak being twice bf16's. `bound` and `of floor` take the larger of the "
            f"memory floor and the matmul floor, at {common.fmt(int_rate)} TOP/s (2x bf16) for the int8 "
            "paths (our A8 kernels, _int_mm) and the bf16 rate for the rest. The peers do not depend on "
            "the weight's bits; `x` columns are the peer's time over the row's.\n\n"
        )
        a8 = [r for r in linear if r["path"] in ("A8", None)]
        a16 = [r for r in linear if r["path"] in ("A16", None) and r["impl"] != "int_mm"]
        a16_columns = {k: v for k, v in LINEAR_COLUMNS.items() if k != "x_int_mm"}
        sections.append(
            (
                "(a) lowbit_linear forward",
                intro
                + "### W{b}A8: uint8 codes in, fused epilogue, uint8 codes out\n\n"
                + common.markdown_table(a8, LINEAR_COLUMNS)
                + "\n\n### W{b}A16: weight-only, bf16 in and out\n\n"
                + common.markdown_table(a16, a16_columns),
            )
        )
    if train:
        sections.append(
            (
                "(b) Training step: QuantAct(8) -> QuantLinear",
                "Forward + backward (gradients for x, weight and bias; no optimizer step), bf16, median ms. "
                "TFLOP/s counts 6 M N K. The kernel rows run QuantAct + QuantLinear with MAQD_BACKEND set, "
                "or the fused `quant_linear(x, W, b, weight_bits=b, act_bits=8, backend=...)`; the eager "
                "fake quantization is `fake_quant_linear` (plain torch ops, STE by the detach trick).\n\n"
                + common.markdown_table(train, TRAIN_COLUMNS),
            )
        )
    if prep:
        sections.append(
            (
                "(c) pack_weight and quantize",
                "pack_weight of a bf16 weight reads N K 2 bytes and writes the packed words and alpha_w; "
                "quantize reads M K bf16 and writes M K uint8 codes. `compile` is torch.compile of the "
                "reference's pack_weight, and of the eager `eager_quantize`.\n\n"
                + common.markdown_table(prep, PREP_COLUMNS),
            )
        )
    if errors:
        sections.append(("Failed measurements", common.markdown_table(errors, ERROR_COLUMNS)))
    return sections


def panels(plan: Plan, linear: list[dict], train: list[dict]) -> list[common.Panel]:
    out = []
    shapes = list(dict.fromkeys((r["M"], r["N"]) for r in linear))
    categories = [f"M={m} N=K={n}" for m, n in shapes]
    for path, peer, title, line in (
        ("A8", "cublas", "lowbit_linear W{b}A8 (fused epilogue): speedup over bf16 cuBLAS", 1.6),
        ("A8", "int_mm", "lowbit_linear W{b}A8 (fused epilogue): speedup over torch._int_mm", 1.0),
        ("A16", "cublas", "lowbit_linear W{b}A16 (weight-only): speedup over bf16 cuBLAS", 3.0),
    ):
        panel = common.Panel(title, "speedup (log)", categories, line=line, log=True)
        for r in linear:
            if r["path"] == path and f"x_{peer}" in r:
                series = panel.series.setdefault(f"{r['impl']} W{r['bits']}", [None] * len(shapes))
                series[shapes.index((r["M"], r["N"]))] = r[f"x_{peer}"]
        out.append(panel)
    panel = common.Panel("lowbit_linear: fraction of copy bandwidth", "of copy BW", categories, line=0.75)
    for r in linear:
        if r["impl"] in plan.kernels and "of_copy" in r:
            series = panel.series.setdefault(f"{r['impl']} W{r['bits']}{r['path']}", [None] * len(shapes))
            series[shapes.index((r["M"], r["N"]))] = r["of_copy"]
    out.append(panel)
    kernel_rows = [r for r in train if r["kind"] == "kernel" and "x_eager" in r]
    shapes = list(dict.fromkeys((r["M"], r["bits"]) for r in kernel_rows))
    panel = common.Panel(
        "Training step: speedup over bf16 nn.Linear + eager fake quant",
        "speedup",
        [f"M={m} W{b}" for m, b in shapes],
        line=1.0,
    )
    for r in kernel_rows:
        series = panel.series.setdefault(r["impl"], [None] * len(shapes))
        series[shapes.index((r["M"], r["bits"]))] = r["x_eager"]
    out.append(panel)
    return out


# ============================================================================= the run


HEADLINES = (
    common.Headline("linear", "x_cublas", "x bf16 cuBLAS", common.group_by("impl", "path", impls=KERNELS)),
    common.Headline("linear", "of_copy", "of copy BW", common.group_by("impl", "path", impls=KERNELS)),
    # Only the kernel rows have x_eager: the training step's rows name their backend in `impl`.
    common.Headline("train", "x_eager", "x eager fake-quant", common.group_by("impl")),
    common.Headline("prep", "x_reference", "x reference", common.group_by("impl", "op", impls=KERNELS)),
)


def count_measurements(plan: Plan) -> int:
    """How many measurements ``run`` makes: the progress bar's total, known before it starts."""
    sizes = len(plan.linear_sizes)
    counts = {
        "linear": sizes * len(plan.linear_rows) * len(linear_runs(plan)),
        "train": len(plan.train_rows) * len(train_runs(plan)),
        "prep": sizes * len(plan.bits) * len(prep_impls(plan, "pack_weight"))
        + len(plan.quantize_rows) * sizes * len(prep_impls(plan, "quantize")),
    }
    return sum(counts[section] for section in plan.sections)


def run(plan: Plan, context: common.Context) -> common.FamilyResult:
    """Measures `plan` with the run's timer and ceilings and writes quant.csv, quant.md and quant.png."""
    record = common.Recorder(FAMILY, plan.device, context.progress)
    timer, ceilings = context.timer, context.ceilings
    torch.manual_seed(0)
    benches = {"linear": bench_linear, "train": bench_train, "prep": bench_prep}
    results = {s: benches[s](plan, timer, ceilings, record) if s in plan.sections else [] for s in SECTIONS}
    linear, train, prep = (results[s] for s in SECTIONS)
    goals = targets(plan, linear, train)
    sections = report(plan, ceilings, linear, train, prep, goals, record.errors)
    files = common.write_family_files(context, FAMILY, TITLE, record.rows, sections, panels(plan, linear, train))
    return common.FamilyResult(FAMILY, TITLE, record.rows, goals, common.headline_rows(record.rows, HEADLINES), files)
