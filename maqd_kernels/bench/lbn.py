"""Layer-Batch Normalization (LBN, MaQD) on a GPU: what training with ``layer_batch_norm`` costs
against torch's normalization layers, and what LBN costs at inference once it is folded into a
quantized layer's epilogue or a float layer's weights.

    python -m maqd_kernels.bench --ops lbn [--quick]      # this family alone, in the harness
    python benchmarks/bench_lbn.py [--quick] [--only train,infer] [--out DIR]

Sections:

(a) train: one training call of ``LayerBatchNorm`` (train mode: group statistics, running-statistic
    update) and the backward of a random upstream gradient (dL/dx and the gradients of weight and
    bias), on each kernel backend that can run here (the module's ``backend=``), bf16 and fp32, at
    conv activations (32, 64, 56, 56), (32, 256, 14, 14), (128, 512, 7, 7), a Linear / SNN
    activation (8192, 4096) and a time-first SNN tensor (T, B, C) = (8, 256, 1024)
    (``time_first=True``: statistics over T and B), each with groups = 1 (LBN) and groups = C
    (BatchNorm). Peers at the same shape and dtype, parameters in that dtype as in a model moved
    with ``.to(dtype)``: torch.nn.BatchNorm2d (cuDNN or torch's own kernel, whichever torch picks;
    BatchNorm1d on (N, C) and on the flattened time-first tensor), torch.nn.LayerNorm over (C, H, W)
    (or C), per sample, the closest torch op to groups = 1 (its affine is per element, C H W
    parameters), torch.nn.GroupNorm(groups, C) (per sample as well: GroupNorm(1, C) normalizes each
    sample over (C, H, W) and GroupNorm(C, C) each sample's channel over (H, W); skipped where a
    group would hold one value), the eager reference (``backend="reference"``) and torch.compile of
    the reference's math (``reference.layer_batch_norm_forward``, backward by autograd).
    GB/s counts the unavoidable traffic, 5 tensor passes (forward reads x and writes y; backward
    reads x and dy and writes dx), and is set against the copy bandwidth measured in the same run;
    our kernels make 8 passes (forward: a statistics read, a normalize read and a write; backward:
    two reads of x and dy, one write), so their `of copy (8 passes)` column says how well they run
    the passes they do make. Next to each LBN case, ``PSPNorm`` (postsynaptic-potential
    normalization, the same kernels without a mean) at the same shape, dtype and groups, on each
    kernel backend, against its eager reference and torch.compile of its math (rows `psp:<impl>`;
    `x LBN` is LayerBatchNorm's time on the same backend over PSPNorm's).
(b) infer: LBN at inference inside a quantized layer: ``lowbit_linear`` on uint8 activation codes
    with a packed 4-bit and 2-bit weight, M in {1, 128, 8192}, N = K in {4096, 8192}, per kernel
    backend: (i) `epilogue`: bias, the folded LBN (out_scale, out_shift) and requantization to uint8
    codes (out_bits = 8) fused; (ii) `plain`: the same call with bias only and float32 out; target:
    (i) at most 3% slower than (ii); (iii) `eager chain`: (ii) then the eval LBN as eager torch ops
    ((y - rm) rsqrt(rv + eps) gamma + beta) and quantization to uint8 codes as eager torch ops
    (round, clamp, cast); `op chain`: (ii) then the ``layer_batch_norm`` op in eval and the
    ``quantize`` op, each on the same backend; (iv) `compile chain`: torch.compile of (iii)
    (lowbit_linear is a custom op: Inductor fuses the LBN + quantize tail into one kernel but
    cannot fuse it into the matmul). The epilogue's codes are checked against the eager chain's
    (equal but at rounding ties). (v) the float fold: bf16 nn.Linear followed by the eval LBN (each
    backend, and as eager torch ops) against the Linear with LBN folded in (``fold_affine``); also
    the eval LBN alone (2 passes) and the one-time cost of ``fold_affine``.

Every GPU time is do_bench's median with the L2 cache flushed before each repetition; the copy
bandwidth and the bf16 matmul rate are measured at the start of the same run. The default run is
expected to take 4-7 minutes on an H200 (about 300 measurements; most of the time goes to
torch.compile, one training graph per shape, dtype and group count and one chain per layer shape
and backend, and to the Triton kernels' first compilation); --quick 1-2 minutes. The script's
--only runs the sections separately.

``run`` writes lbn.csv (one line per measurement), lbn.md (tables under the run's commit, GPU and
versions, and the targets table) and lbn.png into the run's results folder. A measurement that
fails (a kernel missing or broken, out of memory) is recorded in its row's `error` and the run
goes on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import maqd_kernels as mk

from .. import nn as mknn
from ..lbn import reference
from . import common
from .quant import (
    ACT_SCALE,
    INT8_OVER_BF16,
    OUT_ACT_SCALE,
    OUT_BITS,
    add_prep_speedups,
    free_memory,
    packed_weight_bytes,
    timed_compile,
)

Tensor = torch.Tensor

FAMILY, TITLE = "lbn", "Layer-Batch Normalization benchmarks"

SECTIONS = ("train", "infer")
KERNELS = ("cuda", "triton")
EPS, MOMENTUM = 1e-5, 0.1
TRAIN_PEERS = ("reference", "compile", "batchnorm", "layernorm", "groupnorm")
# PSPNorm's peers: the torch normalizations all subtract a mean, so only its own reference math.
PSP_PEERS = ("reference", "compile")
# Tensor passes over x-sized data in one training forward + backward: the fewest any implementation
# needs, and what our kernels make (forward: statistics read + normalize read + write; backward:
# (x, dy) read twice + dx written). The eval forward makes 2 (read, write).
MIN_PASSES, KERNEL_PASSES, EVAL_PASSES = 5, 8, 2
INFER_FORMS = ("epilogue", "plain", "eager chain", "op chain", "compile chain")
OUT_CODES = 2**OUT_BITS - 1


@dataclass(frozen=True)
class TrainShape:
    """One activation: `conv` (N, C, H, W), `linear` (N, C) or `time-first` (T, B, C)."""

    layout: str
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[2] if self.layout == "time-first" else self.shape[1]

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass
class Plan:
    """What one run measures. `kernels` are the backends whose rows get ratios and targets: cuda
    and triton where they run; in a smoke run also the reference, so every code path runs on a bare
    CPU (where the cuda backend cannot take CPU tensors and is left out)."""

    device: torch.device
    smoke: bool
    sections: list[str]
    kernels: list[str]
    compile_backend: str
    train_shapes: list[TrainShape]
    dtypes: list[torch.dtype]
    infer_rows: list[int]
    infer_sizes: list[int]
    bits: list[int]
    fold_rows: list[int]
    fold_sizes: list[int]


TRAIN_SHAPES = [
    TrainShape("conv", (32, 64, 56, 56)),
    TrainShape("conv", (32, 256, 14, 14)),
    TrainShape("conv", (128, 512, 7, 7)),
    TrainShape("linear", (8192, 4096)),
    TrainShape("time-first", (8, 256, 1024)),
]


def make_plan(device: torch.device, smoke: bool, quick: bool, sections: Sequence[str] = SECTIONS) -> Plan:
    """The run's shapes: the smoke sizes, --quick's fewer shapes, or the default."""
    kernels = common.kernel_backends(device)
    if smoke:
        return Plan(
            device=device,
            smoke=True,
            sections=list(sections),
            kernels=["reference"] + kernels,
            # Dynamo and AOTAutograd without Inductor's code generation: the compiled peers' code
            # path in seconds, where Inductor takes minutes on a CPU.
            compile_backend="aot_eager",
            train_shapes=[
                TrainShape("conv", (2, 8, 5, 6)),
                TrainShape("linear", (16, 32)),
                TrainShape("time-first", (2, 4, 16)),
            ],
            dtypes=[torch.bfloat16, torch.float32],
            infer_rows=[1, 32],
            infer_sizes=[64],
            bits=[2, 4],
            fold_rows=[1, 32],
            fold_sizes=[64],
        )
    return Plan(
        device=device,
        smoke=False,
        sections=list(sections),
        kernels=kernels,
        compile_backend="inductor",
        train_shapes=[TRAIN_SHAPES[0], TRAIN_SHAPES[3], TRAIN_SHAPES[4]] if quick else list(TRAIN_SHAPES),
        dtypes=[torch.bfloat16] if quick else [torch.bfloat16, torch.float32],
        infer_rows=[1, 128, 8192],
        infer_sizes=[8192] if quick else [4096, 8192],
        bits=[4] if quick else [2, 4],
        fold_rows=[1, 8192] if quick else [1, 128, 8192],
        fold_sizes=[8192] if quick else [4096, 8192],
    )


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


# ============================================================================= (a) training


def reference_train(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, groups: int, time_first: bool
) -> Tensor:
    """The reference's training forward as plain torch ops (the peer torch.compile gets; autograd
    differentiates it), with the running statistics updated in place as the module does."""
    flat = x.flatten(0, 1) if time_first else x
    y, _, _, new_mean, new_var = reference.layer_batch_norm_forward(
        flat, weight, bias, running_mean, running_var, True, MOMENTUM, EPS, groups
    )
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return y.view(x.shape)


def reference_psp_train(
    x: Tensor, weight: Tensor, bias: Tensor, running_moment: Tensor, groups: int, time_first: bool
) -> Tensor:
    """``reference_train`` for PSPNorm: the reference's training forward with its running moment."""
    flat = x.flatten(0, 1) if time_first else x
    y, _, new_moment = reference.psp_norm_forward(flat, weight, bias, running_moment, True, MOMENTUM, EPS, groups)
    with torch.no_grad():
        running_moment.copy_(new_moment)
    return y.view(x.shape)


def peer_label(impl: str, ts: TrainShape, groups: int, norm: str = "lbn") -> str:
    """What exactly runs for `impl` at this shape (the `op` column)."""
    c = ts.channels
    flat = " on (T B, C)" if ts.layout == "time-first" else ""
    if impl == "batchnorm":
        return ("nn.BatchNorm2d" if ts.layout == "conv" else "nn.BatchNorm1d") + flat
    if impl == "layernorm":
        return "nn.LayerNorm((C, H, W))" if ts.layout == "conv" else "nn.LayerNorm(C)"
    if impl == "groupnorm":
        return f"nn.GroupNorm({'C' if groups == c else groups}, C)" + flat
    if impl == "compile":
        return "torch.compile(reference math)"
    return f"{'PSPNorm' if norm == 'psp' else 'LayerBatchNorm'}(backend={impl!r})"


def train_forward(
    plan: Plan, impl: str, ts: TrainShape, groups: int, gamma: Tensor, beta: Tensor, leaf, grad, norm: str = "lbn"
):
    """(forward, parameters, compile seconds) of one implementation at this shape, its parameters
    (weight gamma, bias beta, running statistics) in the activations' dtype; or a str: why the
    implementation is skipped here. `norm` "psp" runs PSPNorm's implementations."""
    dtype, device, c = leaf.dtype, plan.device, ts.channels
    time_first = ts.layout == "time-first"
    if impl == "compile":
        weight = gamma.to(dtype).requires_grad_()
        bias = beta.to(dtype).requires_grad_()
        if norm == "psp":
            fn, statistics = reference_psp_train, (torch.ones(groups, device=device, dtype=dtype),)
        else:
            statistics = (
                torch.zeros(groups, device=device, dtype=dtype),
                torch.ones(groups, device=device, dtype=dtype),
            )
            fn = reference_train
        compiled, compile_s = timed_compile(
            plan, fn, lambda fn: fn(leaf, weight, bias, *statistics, groups, time_first).backward(grad)
        )

        def forward(x):
            return compiled(x, weight, bias, *statistics, groups, time_first)

        return forward, [weight, bias], compile_s
    flatten = False
    if impl in ("reference", *KERNELS):
        module_class = mknn.PSPNorm if norm == "psp" else mknn.LayerBatchNorm
        module = module_class(c, groups, EPS, MOMENTUM, time_first=time_first, backend=impl)
        affine = (gamma, beta)
    elif impl == "batchnorm":
        module = (nn.BatchNorm2d if ts.layout == "conv" else nn.BatchNorm1d)(c, EPS, MOMENTUM)
        affine, flatten = (gamma, beta), time_first
    elif impl == "layernorm":
        normalized = ts.shape[1:] if ts.layout == "conv" else (c,)
        module = nn.LayerNorm(normalized, EPS)
        # The per-channel affine spread over (H, W): the same outputs as the others.
        spread = (c,) + (1,) * (len(normalized) - 1)
        affine = (gamma.view(spread).expand(normalized), beta.view(spread).expand(normalized))
    elif impl == "groupnorm":
        if ts.layout != "conv" and groups == c:
            return "skipped: GroupNorm(C, C) on (N, C) normalizes single values"
        module = nn.GroupNorm(groups, c, EPS)
        affine, flatten = (gamma, beta), time_first
    else:
        raise AssertionError(impl)
    module = module.to(device, dtype).train()
    with torch.no_grad():
        module.weight.copy_(affine[0])
        module.bias.copy_(affine[1])
    if flatten:

        def forward(x):
            return module(x.flatten(0, 1)).view(x.shape)
    else:
        forward = module
    return forward, list(module.parameters()), None


def train_cases(plan: Plan) -> list[tuple[TrainShape, torch.dtype, int]]:
    """Section (a)'s (shape, dtype, groups): groups = 1 and groups = C (once where C is 1)."""
    return [
        (ts, dtype, groups)
        for dtype in plan.dtypes
        for ts in plan.train_shapes
        for groups in dict.fromkeys((1, ts.channels))
    ]


def train_impls(plan: Plan, norm: str = "lbn") -> list[str]:
    """Section (a)'s implementations of LayerBatchNorm (or PSPNorm), measured at every case: the
    kernels, then the peers."""
    return plan.kernels + [p for p in (PSP_PEERS if norm == "psp" else TRAIN_PEERS) if p not in plan.kernels]


def bench_train(plan: Plan, timer: common.Timer, ceilings: common.Ceilings, record: common.Recorder) -> list[dict]:
    rows = []
    for ts, dtype, groups in train_cases(plan):
        lbn = bench_train_case(plan, timer, ceilings, record, ts, dtype, groups)
        psp = bench_train_case(plan, timer, ceilings, record, ts, dtype, groups, norm="psp")
        rows += lbn + add_lbn_ratios(psp, lbn)
        free_memory(plan)
    return rows


def add_lbn_ratios(psp: list[dict], lbn: list[dict]) -> list[dict]:
    """x_lbn on each PSPNorm row: LayerBatchNorm's time on the same backend over the row's."""
    lbn_ms = {f"psp:{r['impl']}": r["ms"] for r in lbn if "ms" in r}
    for r in psp:
        if "ms" in r and r["impl"] in lbn_ms:
            r["x_lbn"] = lbn_ms[r["impl"]] / r["ms"]
    return psp


def bench_train_case(
    plan, timer, ceilings, record, ts: TrainShape, dtype: torch.dtype, groups: int, norm: str = "lbn"
) -> list[dict]:
    """Every implementation of LayerBatchNorm (or PSPNorm, rows `psp:<impl>`) at one (shape, dtype,
    groups), then each kernel row's ratios to its peers."""
    device, c = plan.device, ts.channels
    # N(0.5, 2^2) activations and N(0, 1) upstream gradients: never zero, nowhere constant.
    x = (torch.randn(ts.shape, device=device) * 2 + 0.5).to(dtype)
    grad = torch.randn(ts.shape, device=device, dtype=dtype)
    gamma = torch.rand(c, device=device) + 0.5
    beta = torch.randn(c, device=device) * 0.1
    elements = x.numel()
    nbytes = MIN_PASSES * elements * dtype.itemsize
    shape = {"section": "train", "layout": ts.layout, "shape": ts.label, "dtype": dtype_label(dtype), "G": groups}
    shape |= {"bytes": nbytes, "memory_floor_ms": ceilings.memory_floor_ms(nbytes)}
    rows = []
    for impl in train_impls(plan, norm):
        row = shape | {"impl": impl, "op": peer_label(impl, ts, groups, norm)}

        def measure():
            leaf = x.detach().requires_grad_()
            built = train_forward(plan, impl, ts, groups, gamma, beta, leaf, grad, norm)
            if isinstance(built, str):
                return {"note": built}
            forward, params, compile_s = built

            def step():
                forward(leaf).backward(grad)

            ms = timer.ms(step, [leaf, *params])
            gbps = nbytes / ms / 1e6
            result = {"ms": ms, "gbps": gbps, "of_copy": gbps / ceilings.copy_gbps}
            if impl in KERNELS:
                result["of_copy_passes"] = KERNEL_PASSES * elements * dtype.itemsize / ms / 1e6 / ceilings.copy_gbps
            return result | ({"compile_s": compile_s} if compile_s is not None else {})

        rows.append(record(row, measure))
        free_memory(plan)
    add_prep_speedups(rows, plan.kernels)
    if norm == "psp":  # told apart from LayerBatchNorm's rows once the ratios are taken
        for r in rows:
            r["impl"] = f"psp:{r['impl']}"
    return rows


# ============================================================================= (b) inference


INFER_BYTES_MODEL = """\
packed weight            N ceil(K / (32 / b)) 4  (= N K b / 8)  + alpha_w N 4
x codes                  M K 1
(i) epilogue, chains     out codes M N 1 + bias, out_scale, out_shift 3 N 4
(ii) plain               out float32 M N 4 + bias N 4
floor = max(bytes / copy bandwidth, 2 M N K / (2 x the bf16 matmul rate: the int8 tensor cores))"""


def infer_bytes(form: str, m: int, n: int, k: int, bits: int) -> int:
    """The fewest bytes the layer must move (INFER_BYTES_MODEL); the chains do the epilogue's work,
    so they are held to its bytes."""
    common_bytes = packed_weight_bytes(n, k, bits) + m * k
    if form == "plain":
        return common_bytes + 4 * m * n + 4 * n
    return common_bytes + m * n + 3 * 4 * n


def eager_chain(codes, weight, bias, running_mean, running_var, gamma, beta, backend: str) -> Tensor:
    """The layer without the fused epilogue, as a user writes it: the plain lowbit_linear, the eval
    LBN and the next activation's quantization to uint8 codes as eager torch ops."""
    y = mk.lowbit_linear(codes, weight, bias, act_scale=ACT_SCALE, backend=backend)
    y = (y - running_mean) * torch.rsqrt(running_var + EPS) * gamma + beta
    return torch.clamp(torch.round(y / OUT_ACT_SCALE), 0, OUT_CODES).to(torch.uint8)


def op_chain(codes, weight, bias, running_mean, running_var, gamma, beta, backend: str) -> Tensor:
    """The same three steps as this package's separate ops, each on `backend`."""
    y = mk.lowbit_linear(codes, weight, bias, act_scale=ACT_SCALE, backend=backend)
    y = mk.layer_batch_norm(y, gamma, beta, running_mean, running_var, training=False, eps=EPS, backend=backend)
    return mk.quantize(y, OUT_BITS, OUT_ACT_SCALE, signed=False, backend=backend)


@dataclass
class InferLayer:
    """One N = K quantized layer followed by an LBN (groups = 1): a PackedWeight per bit width, the
    LBN's running statistics (of the layer's own outputs, so the codes spread over 0..255) and
    affine, and its folded form (out_scale, out_shift)."""

    packed: dict[int, mk.PackedWeight]
    bias: Tensor
    gamma: Tensor
    beta: Tensor
    stats: dict[int, tuple[Tensor, Tensor]]
    folded: dict[int, tuple[Tensor, Tensor]]


def infer_layer(plan: Plan, n: int) -> InferLayer:
    device = plan.device
    w = torch.randn(n, n, device=device)
    packed = {bits: mk.pack_weight(w, bits, backend="reference") for bits in plan.bits}
    bias = torch.randn(n, device=device) * 0.1
    gamma = torch.rand(n, device=device) + 0.5
    beta = torch.randn(n, device=device) * 0.1
    probe = torch.randint(1, 256, (64, n), dtype=torch.uint8, device=device)
    stats, folded = {}, {}
    for bits, weight in packed.items():
        y = mk.lowbit_linear(probe, weight, bias, act_scale=ACT_SCALE, backend="reference")
        stats[bits] = (y.mean().reshape(1), y.var().reshape(1))
        folded[bits] = mk.lbn_inference_affine(gamma, beta, *stats[bits], eps=EPS, groups=1, backend="reference")
    return InferLayer(packed, bias, gamma, beta, stats, folded)


def infer_call(plan: Plan, form: str, kernel: str, bits: int, codes: Tensor, layer: InferLayer):
    """(fn, compile seconds or None) of one form of the layer on `kernel`."""
    weight = layer.packed[bits]
    if form == "epilogue":
        out_scale, out_shift = layer.folded[bits]
        fn = functools.partial(
            mk.lowbit_linear,
            codes,
            weight,
            layer.bias,
            act_scale=ACT_SCALE,
            out_scale=out_scale,
            out_shift=out_shift,
            out_bits=OUT_BITS,
            out_act_scale=OUT_ACT_SCALE,
            backend=kernel,
        )
        return fn, None
    if form == "plain":
        return functools.partial(mk.lowbit_linear, codes, weight, layer.bias, act_scale=ACT_SCALE, backend=kernel), None
    args = (codes, weight, layer.bias, *layer.stats[bits], layer.gamma, layer.beta, kernel)
    if form == "eager chain":
        return functools.partial(eager_chain, *args), None
    if form == "op chain":
        return functools.partial(op_chain, *args), None
    compiled, compile_s = timed_compile(plan, eager_chain, lambda c: c(*args))
    return functools.partial(compiled, *args), compile_s


def bench_infer(plan: Plan, timer: common.Timer, ceilings: common.Ceilings, record: common.Recorder) -> list[dict]:
    rows = []
    with torch.no_grad():  # inference: no autograd bookkeeping for any implementation
        for n in plan.infer_sizes:
            layer = infer_layer(plan, n)
            for m in plan.infer_rows:
                codes = torch.randint(1, 256, (m, n), dtype=torch.uint8, device=plan.device)
                for bits in plan.bits:
                    for kernel in plan.kernels:
                        rows += bench_epilogue(plan, timer, ceilings, record, layer, codes, bits, kernel)
            del layer
            free_memory(plan)
        for n in plan.fold_sizes:
            for m in plan.fold_rows:
                rows += bench_fold(plan, timer, ceilings, record, m, n)
                free_memory(plan)
    return rows


def bench_epilogue(plan, timer, ceilings, record, layer: InferLayer, codes: Tensor, bits: int, kernel: str):
    """The five forms of one layer on one backend, then the epilogue row's ratios to the others."""
    m, k = codes.shape
    n = layer.bias.shape[0]
    flops = 2 * m * n * k
    matmul_ms = flops / (ceilings.matmul_tflops * INT8_OVER_BF16) / 1e9
    rows = []
    for form in INFER_FORMS:
        nbytes = infer_bytes(form, m, n, k, bits)
        floor_ms = max(ceilings.memory_floor_ms(nbytes), matmul_ms)
        row = {"section": "infer", "op": "lowbit_linear", "M": m, "N": n, "K": k, "bits": bits, "impl": kernel}
        row |= {"form": form, "bytes": nbytes, "flops": flops, "floor_ms": floor_ms}

        def measure():
            fn, compile_s = infer_call(plan, form, kernel, bits, codes, layer)
            ms = timer.ms(fn)
            gbps = nbytes / ms / 1e6
            result = {"ms": ms, "gbps": gbps, "of_copy": gbps / ceilings.copy_gbps, "of_floor": floor_ms / ms}
            if compile_s is not None:
                result["compile_s"] = compile_s
            if form == "epilogue":
                # The fused codes against the eager chain's on the same backend: equal but where
                # the two roundings of y land on either side of a code's boundary.
                want = infer_call(plan, "eager chain", kernel, bits, codes, layer)[0]()
                diff = int((fn().int() - want.int()).abs().max()) if want.numel() else 0
                result["code_diff"] = diff
                if diff > 1:
                    result["error"] = f"codes differ from the eager chain's by up to {diff}"
            return result

        rows.append(record(row, measure))
    timed = {r["form"]: r["ms"] for r in rows if "ms" in r}
    fused = rows[0]
    if "ms" in fused:
        if "plain" in timed:
            fused["vs_plain"] = fused["ms"] / timed["plain"]
        for form, key in (("eager chain", "x_eager"), ("op chain", "x_ops"), ("compile chain", "x_compile")):
            if form in timed:
                fused[key] = timed[form] / fused["ms"]
    return rows


def fold_runs(plan: Plan) -> list[tuple[str, str]]:
    """Section (b.v)'s (form, impl), measured at every (M, N = K)."""
    runs = [("Linear + LBN", kernel) for kernel in plan.kernels]
    runs += [("Linear + eager LBN", "torch"), ("folded Linear", "torch")]
    return runs + [("LBN eval", kernel) for kernel in plan.kernels] + [("fold_affine", "reference")]


def bench_fold(plan, timer, ceilings, record, m: int, n: int) -> list[dict]:
    """(v): a bf16 nn.Linear (N = K) then the eval LBN (groups = 1), against the Linear with the
    LBN folded into its weights; the eval LBN alone; fold_affine itself (paid once)."""
    device, dtype, k = plan.device, torch.bfloat16, n
    x = torch.randn(m, k, device=device, dtype=dtype)
    linear = nn.Linear(k, n, device=device, dtype=dtype)
    y = linear(x)
    probe = linear(torch.randn(64, k, device=device, dtype=dtype)).float()
    gamma = torch.rand(n, device=device) + 0.5
    beta = torch.randn(n, device=device) * 0.1

    def lbn_module(backend: str) -> mknn.LayerBatchNorm:
        lbn = mknn.LayerBatchNorm(n, 1, EPS, MOMENTUM, backend=backend).to(device, dtype).eval()
        lbn.weight.copy_(gamma)
        lbn.bias.copy_(beta)
        lbn.running_mean.copy_(probe.mean().reshape(1))
        lbn.running_var.copy_(probe.var().reshape(1))
        return lbn

    reference_lbn = lbn_module("reference")
    a, b = reference_lbn.inference_affine()
    weight, bias = mk.fold_affine(linear.weight, linear.bias, a, b)
    folded = nn.Linear(k, n, device=device, dtype=dtype)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    rm, rv = reference_lbn.running_mean, reference_lbn.running_var
    g16, b16 = reference_lbn.weight, reference_lbn.bias

    def eager_lbn(t: Tensor) -> Tensor:
        return (t - rm) * torch.rsqrt(rv + EPS) * g16 + b16

    rows = []
    for form, impl in fold_runs(plan):
        row = {"section": "infer", "op": "fold", "M": m, "N": n, "K": k, "dtype": "bf16", "impl": impl, "form": form}
        nbytes = EVAL_PASSES * m * n * dtype.itemsize if form == "LBN eval" else None
        if nbytes is not None:
            row["bytes"] = nbytes

        def measure():
            if form == "Linear + LBN":
                lbn = lbn_module(impl)
                fn = lambda: lbn(linear(x))  # noqa: E731
            elif form == "Linear + eager LBN":
                fn = lambda: eager_lbn(linear(x))  # noqa: E731
            elif form == "folded Linear":
                fn = functools.partial(folded, x)
            elif form == "LBN eval":
                fn = functools.partial(lbn_module(impl), y)
            else:
                fn = functools.partial(mk.fold_affine, linear.weight, linear.bias, a, b)
            ms = timer.ms(fn)
            if nbytes is None:
                return {"ms": ms}
            gbps = nbytes / ms / 1e6
            return {"ms": ms, "gbps": gbps, "of_copy": gbps / ceilings.copy_gbps}

        rows.append(record(row, measure))
    base = next((r["ms"] for r in rows if r["form"] == "folded Linear" and "ms" in r), None)
    for r in rows:
        if base is not None and "ms" in r and r["form"] in ("Linear + LBN", "Linear + eager LBN"):
            r["vs_folded"] = r["ms"] / base
    return rows


# ============================================================================= targets and report


def targets(plan: Plan, infer: list[dict]) -> list[common.Target]:
    """The issue's goal, per kernel backend and M: the fused LBN + requantization epilogue at most
    3% slower than the same call without it, read at the worst bit width and N = K of the run."""
    out = []
    lowbit = [r for r in infer if r["op"] == "lowbit_linear" and r["form"] == "epilogue"]
    for kernel in KERNELS:
        absent = "" if kernel in plan.kernels else f" ({kernel} cannot run here)"
        for m in plan.infer_rows:
            name = f"lowbit_linear [{kernel}] with the LBN + requant epilogue over without, M={m}"
            shape_rows = [r for r in lowbit if r["impl"] == kernel and r["M"] == m]
            done = [r for r in shape_rows if "vs_plain" in r]
            measured, where = None, "no measurement" + absent + ("" if infer else " (section not run)")
            if done:
                worst = max(done, key=lambda r: r["vs_plain"])
                measured = worst["vs_plain"]
                where = f"W{worst['bits']} N=K={worst['N']} (worst of {len(done)})"
            failed = [r for r in shape_rows if "error" in r]
            if failed:
                where += f"; W{failed[0]['bits']} N=K={failed[0]['N']}: {failed[0]['error']}"
            out.append(common.Target(name, 1.03, measured, higher=False, where=where))
    return out


TRAIN_COLUMNS = {"layout": "layout", "shape": "shape", "G": "groups", "impl": "impl", "op": "op", "ms": "ms"}
TRAIN_COLUMNS |= {"gbps": "GB/s (5 passes)", "of_copy": "of copy BW", "of_copy_passes": "of copy BW (8 passes)"}
TRAIN_COLUMNS |= {f"x_{p}": f"x {p}" for p in TRAIN_PEERS}
TRAIN_COLUMNS |= {"compile_s": "compile s", "note": "note", "error": "error"}
PSP_COLUMNS = {key: TRAIN_COLUMNS[key] for key in ("layout", "shape", "G", "impl", "op", "ms", "gbps", "of_copy")}
PSP_COLUMNS |= {"of_copy_passes": TRAIN_COLUMNS["of_copy_passes"], "x_reference": "x reference"}
PSP_COLUMNS |= {"x_compile": "x compile", "x_lbn": "x LBN", "compile_s": "compile s", "error": "error"}
INFER_COLUMNS = {"M": "M", "N": "N=K", "bits": "bits", "impl": "impl", "form": "form", "ms": "ms"}
INFER_COLUMNS |= {"gbps": "GB/s", "of_copy": "of copy BW", "of_floor": "of floor", "vs_plain": "/ plain"}
INFER_COLUMNS |= {"x_eager": "x eager chain", "x_ops": "x op chain", "x_compile": "x compile chain"}
INFER_COLUMNS |= {"code_diff": "codes diff", "compile_s": "compile s", "error": "error"}
FOLD_COLUMNS = {"M": "M", "N": "N=K", "form": "form", "impl": "impl", "ms": "ms", "gbps": "GB/s"}
FOLD_COLUMNS |= {"of_copy": "of copy BW", "vs_folded": "/ folded", "error": "error"}
ERROR_COLUMNS = {k: k for k in ("section", "shape", "dtype", "G", "op", "M", "N", "bits", "impl", "form", "error")}


def report(plan, ceilings, train, infer, goals, errors) -> list[tuple[str, str]]:
    """The Markdown sections, in the order a reader asks: did we meet the goals, then the detail."""
    sections = [
        common.targets_section(
            goals,
            plan.smoke,
            "`measured` is the fused call's time over the plain call's (bias only, float32 out), "
            "the worst over the bit widths and N = K measured at that M.",
            compiled=True,
        )
    ]
    if train:
        intro = (
            "LayerBatchNorm training forward + backward (dL/dx, dL/dweight, dL/dbias), median ms. "
            f"`GB/s` counts {MIN_PASSES} passes over x-sized tensors (forward reads x, writes y; "
            "backward reads x and dy, writes dx), the traffic no implementation can avoid; `of copy "
            f"BW` is that over the copy bandwidth measured in this run ({ceilings.copy_gbps:.0f} GB/s). "
            f"Our kernels make {KERNEL_PASSES} passes (forward: statistics read, normalize read, write; "
            "backward: two reads of x and dy, one write): `of copy BW (8 passes)` counts those. Small "
            "tensors can exceed it, their second reads served by L2 within a call. `groups` = 1 is LBN, "
            "= C BatchNorm. Every parameter is in the activations' dtype. LayerNorm and GroupNorm "
            "normalize per sample (LayerNorm's affine is per element); BatchNorm computes exactly "
            "groups = C. `x` columns: the peer's time over the row's.\n\n"
        )
        lbn_rows = [r for r in train if not r["impl"].startswith("psp:")]
        psp_rows = [r for r in train if r["impl"].startswith("psp:")]
        parts = []
        for dtype in plan.dtypes:
            label = dtype_label(dtype)
            parts.append(
                f"### {label}\n\n" + common.markdown_table([r for r in lbn_rows if r["dtype"] == label], TRAIN_COLUMNS)
            )
        sections.append(("(a) LayerBatchNorm training step", intro + "\n\n".join(parts)))
        psp_intro = (
            "PSPNorm (postsynaptic-potential normalization: y = gamma x / sqrt(E[x^2] + eps) + beta, no "
            "mean) training forward + backward at the same cases, on the same kernels run without a mean: "
            "the same 5 unavoidable and 8 made passes. `x reference` and `x compile`: the eager reference's "
            "and torch.compile of its math's time over the row's; `x LBN`: LayerBatchNorm's time on the "
            "same backend over PSPNorm's (about 1: the passes are the same).\n\n"
        )
        parts = [
            f"### {dtype_label(dtype)}\n\n"
            + common.markdown_table([r for r in psp_rows if r["dtype"] == dtype_label(dtype)], PSP_COLUMNS)
            for dtype in plan.dtypes
        ]
        sections.append(("(a.ii) PSPNorm training step", psp_intro + "\n\n".join(parts)))
    lowbit = [r for r in infer if r["op"] == "lowbit_linear"]
    if lowbit:
        sections.append(
            (
                "(b) Inference: LBN in the lowbit_linear epilogue",
                "uint8 activation codes in, a packed weight, bias. `epilogue` fuses the folded LBN "
                "(out_scale, out_shift) and requantization to uint8 codes (out_bits = 8); `plain` is the "
                "same call without them (float32 out); `eager chain` is plain then the eval LBN and the "
                "quantization as eager torch ops; `op chain` plain then the `layer_batch_norm` (eval) and "
                "`quantize` ops; `compile chain` torch.compile of the eager chain. Bytes:\n\n```\n"
                + INFER_BYTES_MODEL
                + f"\n```\n\nInt8 rate for the floor: {common.fmt(ceilings.matmul_tflops * INT8_OVER_BF16)} "
                "TOP/s (2x the measured bf16 rate). `/ plain` is the epilogue's time over the plain "
                "call's (the target: <= 1.03); `x` columns the chain's time over the epilogue's; "
                "`codes diff` the largest difference between the epilogue's codes and the eager chain's.\n\n"
                + common.markdown_table(lowbit, INFER_COLUMNS),
            )
        )
    fold = [r for r in infer if r["op"] == "fold"]
    if fold:
        sections.append(
            (
                "(b.v) Inference: the float fold",
                "bf16 nn.Linear (N = K) then the eval LBN (groups = 1) on each backend or as eager torch "
                "ops, against the Linear with the LBN folded into its weight and bias (`fold_affine`). "
                "`LBN eval` is the eval LBN alone on the Linear's output (GB/s: 2 passes, read and "
                "write); `fold_affine` the one-time cost of folding. `/ folded` is the row's time over "
                "the folded Linear's.\n\n" + common.markdown_table(fold, FOLD_COLUMNS),
            )
        )
    if errors:
        sections.append(("Failed measurements", common.markdown_table(errors, ERROR_COLUMNS)))
    return sections


def panels(plan: Plan, train: list[dict], infer: list[dict]) -> list[common.Panel]:
    out = []
    for dtype in plan.dtypes:
        label = dtype_label(dtype)
        rows = [r for r in train if r["dtype"] == label and "of_copy" in r]
        # PSPNorm's kernels only: its peers would crowd the panel.
        rows = [r for r in rows if not r["impl"].startswith("psp:") or r["impl"].removeprefix("psp:") in KERNELS]
        cases = list(dict.fromkeys((r["shape"], r["G"]) for r in rows))
        panel = common.Panel(
            f"LayerBatchNorm (and PSPNorm kernels) training fwd+bwd, {label}: fraction of copy bandwidth (5 passes)",
            "of copy BW",
            [f"{s} G={g}" for s, g in cases],
        )
        for r in rows:
            panel.series.setdefault(r["impl"], [None] * len(cases))[cases.index((r["shape"], r["G"]))] = r["of_copy"]
        out.append(panel)
    fused = [r for r in infer if r["op"] == "lowbit_linear" and r["form"] == "epilogue"]
    cases = list(dict.fromkeys((r["M"], r["N"], r["bits"]) for r in fused))
    categories = [f"M={m} N=K={n} W{b}" for m, n, b in cases]
    panel = common.Panel("lowbit_linear: time with the LBN + requant epilogue over without", "ratio", categories)
    panel.line = 1.03
    chains = common.Panel("lowbit_linear epilogue: speedup over the unfused chains", "speedup (log)", categories)
    chains.line, chains.log = 1.0, True
    for r in fused:
        index = cases.index((r["M"], r["N"], r["bits"]))
        if "vs_plain" in r:
            panel.series.setdefault(r["impl"], [None] * len(cases))[index] = r["vs_plain"]
        for key, name in (("x_eager", "eager chain"), ("x_ops", "op chain"), ("x_compile", "compile chain")):
            if key in r:
                chains.series.setdefault(f"{r['impl']} vs {name}", [None] * len(cases))[index] = r[key]
    out += [panel, chains]
    fold = [r for r in infer if r["op"] == "fold" and "vs_folded" in r]
    cases = list(dict.fromkeys((r["M"], r["N"]) for r in fold))
    panel = common.Panel(
        "Linear + eval LBN: time over the folded Linear", "ratio", [f"M={m} N=K={n}" for m, n in cases], line=1.0
    )
    for r in fold:
        label = f"{r['form']} [{r['impl']}]" if r["impl"] != "torch" else r["form"]
        panel.series.setdefault(label, [None] * len(cases))[cases.index((r["M"], r["N"]))] = r["vs_folded"]
    out.append(panel)
    return out


# ============================================================================= the run


HEADLINES = (
    common.Headline("train", "of_copy", "of copy BW (5 passes)", common.group_by("impl", "dtype", impls=KERNELS)),
    common.Headline("train", "x_batchnorm", "x BatchNorm", common.group_by("impl", "dtype", impls=KERNELS)),
    common.Headline("infer", "vs_plain", "epilogue time / plain", common.group_by("impl", "form", impls=KERNELS)),
    common.Headline("infer", "vs_folded", "time / folded Linear", common.group_by("impl", "form", impls=KERNELS)),
)


def count_measurements(plan: Plan) -> int:
    """How many measurements ``run`` makes: the progress bar's total, known before it starts."""
    epilogue = len(plan.infer_sizes) * len(plan.infer_rows) * len(plan.bits) * len(plan.kernels) * len(INFER_FORMS)
    counts = {
        "train": len(train_cases(plan)) * (len(train_impls(plan)) + len(train_impls(plan, "psp"))),
        "infer": epilogue + len(plan.fold_sizes) * len(plan.fold_rows) * len(fold_runs(plan)),
    }
    return sum(counts[section] for section in plan.sections)


def run(plan: Plan, context: common.Context) -> common.FamilyResult:
    """Measures `plan` with the run's timer and ceilings and writes lbn.csv, lbn.md and lbn.png."""
    record = common.Recorder(FAMILY, plan.device, context.progress)
    timer, ceilings = context.timer, context.ceilings
    torch.manual_seed(0)
    train = bench_train(plan, timer, ceilings, record) if "train" in plan.sections else []
    infer = bench_infer(plan, timer, ceilings, record) if "infer" in plan.sections else []
    goals = targets(plan, infer)
    sections = report(plan, ceilings, train, infer, goals, record.errors)
    files = common.write_family_files(context, FAMILY, TITLE, record.rows, sections, panels(plan, train, infer))
    return common.FamilyResult(FAMILY, TITLE, record.rows, goals, common.headline_rows(record.rows, HEADLINES), files)
