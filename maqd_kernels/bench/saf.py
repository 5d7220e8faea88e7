"""Spike accumulation forwarding (SAF, Saiin et al., TMLR 2024) on a GPU: how close the kernels come
to the machine's limits, and how much they gain over the eager code and OTTT that SAF replaces.

    python -m maqd_kernels.bench --ops saf [--quick]      # this family alone, in the harness
    python benchmarks/bench_saf.py [--quick] [--full] [--out DIR] [--only neuron,linear,vgg]

Sections:

(a) neuron: the SAF neuron alone, forward (saf_e) and forward+backward (saf_e and saf_f; sigmoid
    surrogate), T in {4, 8, 16, 32}, N in {4M, 16M, 64M} neurons per step, bf16 and fp32. The
    neuron is a streaming pass over T N values, bound by memory, so each time is turned into GB/s
    by the bytes model of ``neuron_bytes`` and reported as a fraction of the copy bandwidth
    measured in the same run. Peers at the same shape: the eager reference, torch.compile of the
    reference's math, and OTTT's eager neuron (at the smallest N only, unless --full: they are
    slow, and once N fills the GPU their time grows in proportion to it, as the kernels' does).
(b) linear: the fused ``saf_linear`` (Triton) against F.linear + bias S_t + the separate neuron,
    bf16, T = 8. Fusing saves writing U_hat and reading it back; that only matters where a shape is
    bound by memory, so each shape is classified by comparing its matmul floor (FLOPs over the
    measured bf16 matmul rate) with its memory floor (bytes over the copy bandwidth).
(c) vgg: the paper's comparison, one training iteration (forward, backward, SGD step) of a
    VGG-style CIFAR-sized network (batch 128, 3x32x32, T = 6): SAF-E online and multi-step against
    OTTT_O, SAF-F against OTTT_A, time and peak memory (the paper reports 28-30% less memory and
    30-63% less time for SAF with eager code).

Every GPU time is do_bench's median with the L2 cache flushed before each repetition, so even the
smallest shapes read from HBM. The copy bandwidth and the bf16 matmul rate are measured at the
start of the same run. The default run is expected to take several minutes on an H200, most of it
torch.compile compiling one graph per T, dtype and mode; --quick cuts it to a few, and the
script's --only runs sections separately.

``run`` writes saf.csv (one line per measurement), saf.md (tables under the run's commit, GPU and
versions, and the targets table) and saf.png into the run's results folder. A measurement that
fails is recorded in its row's `error` and the run goes on.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import maqd_kernels as mk

from .. import nn as mknn
from ..saf import reference
from . import common

Tensor = torch.Tensor

FAMILY, TITLE = "saf", "SAF benchmarks"
DECAY, THRESHOLD, ALPHA = 0.5, 1.0, 4.0  # the package's defaults (alpha = 4 is OTTT's)
M = 1 << 20
# The neuron's forward+backward holds four tensors of T N values (input, output, two gradients):
# at 8 GiB each they and the peers' temporaries still fit an H200's 141 GB with room to spare.
MAX_TENSOR_BYTES = 8 * common.GIB
SECTIONS = ("neuron", "linear", "vgg")
KERNELS = ("cuda", "triton")
FUSED = ("triton", "reference")  # the backends with a saf_linear
NEURON_PEERS = ("reference", "compile", "ottt")
NEURON_CASES = (("fwd", "saf_e"), ("fwd+bwd", "saf_e"), ("fwd+bwd", "saf_f"))
LINEAR_CASES = ("fwd", "fwd+bwd")
CLASSES = 10


@dataclass
class VGGConfig:
    batch: int
    image: int
    steps: int
    channels: tuple  # conv widths, "P" for a 2x2 average pool
    warmup: int
    iters: int


@dataclass
class Plan:
    """What one run measures. `kernels` are the backends held against the targets: cuda and
    triton where they can run on the device; in a smoke run also the reference, so every code
    path runs on a bare CPU. The target shapes are the ones the targets name on a GPU, and the
    smoke shapes in a smoke run (so CI exercises the targets' code too, with meaningless numbers)."""

    device: torch.device
    smoke: bool
    sections: list[str]
    full: bool
    kernels: list[str]
    compile_backend: str
    steps: list[int]
    neurons: list[int]
    dtypes: list[torch.dtype]
    linear_steps: int
    linear_rows: list[int]
    linear_shapes: list[tuple[int, int]]
    vgg: VGGConfig
    bandwidth_target_min_neurons: int
    speedup_target_steps: int


def make_plan(
    device: torch.device, smoke: bool, quick: bool, sections: Sequence[str] = SECTIONS, full: bool = False
) -> Plan:
    """The run's shapes: the smoke sizes (every peer at every N), --quick's fewer shapes, or the
    default; `full` runs the slow peers at every N, not only the smallest."""
    kernels = common.kernel_backends(device)
    if smoke:
        return Plan(
            device=device,
            smoke=True,
            sections=list(sections),
            full=True,
            kernels=["reference"] + kernels,
            # Dynamo's tracing without Inductor's code generation: the peer's code path, in seconds.
            compile_backend="eager",
            steps=[2],
            neurons=[4096],
            dtypes=[torch.bfloat16, torch.float32],
            linear_steps=2,
            linear_rows=[8],
            linear_shapes=[(32, 32)],
            vgg=VGGConfig(batch=2, image=8, steps=2, channels=(4, 8, "P", 8, 8, "P", 16, "P"), warmup=0, iters=1),
            bandwidth_target_min_neurons=4096,
            speedup_target_steps=2,
        )
    return Plan(
        device=device,
        smoke=False,
        sections=list(sections),
        full=full,
        kernels=kernels,
        compile_backend="inductor",
        steps=[4, 16] if quick else [4, 8, 16, 32],
        neurons=[4 * M, 16 * M] if quick else [4 * M, 16 * M, 64 * M],
        dtypes=[torch.bfloat16] if quick else [torch.bfloat16, torch.float32],
        linear_steps=8,
        linear_rows=[256, 4096],
        linear_shapes=[(256, 256), (1024, 1024), (4096, 4096)],
        vgg=VGGConfig(
            batch=128,
            image=32,
            steps=6,
            channels=(64, 128, "P", 256, 256, "P", 512, "P"),
            warmup=3,
            iters=5 if quick else 10,
        ),
        bandwidth_target_min_neurons=4 * M,
        speedup_target_steps=16,
    )


def count_label(n: int) -> str:
    return f"{n // M}M" if n >= M and n % M == 0 else str(n)


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


# ============================================================================= (a) the neuron


NEURON_BYTES_MODEL = """\
forward               reads U_hat, writes a_hat                       T N (in + out)
saf_f forward, also   writes the gradient mask, a bit per neuron      T ceil(N / 32) 4   (~ T N / 8)
saf_e backward        reads U_hat and dL/da_hat, writes dL/dU_hat     T N (in + out + in)
saf_f backward        reads the mask and dL/da_hat, writes dL/dU_hat  mask + T N (out + in)
OTTT's neuron moves the tensors of saf_e (its input current in place of U_hat)."""


def neuron_bytes(case: str, mode: str, steps: int, neurons: int, in_bytes: int, out_bytes: int) -> int:
    """The fewest bytes one call must move (NEURON_BYTES_MODEL): the model behind the neuron's GB/s
    and its fraction of the copy bandwidth (achieved GB/s = these bytes / time). `mode` "ottt"
    counts as saf_e."""
    values = steps * neurons
    forward = values * (in_bytes + out_bytes)
    if case == "fwd":
        return forward
    if mode == "saf_f":
        mask = steps * -(-neurons // 32) * 4
        return forward + mask + mask + values * (out_bytes + in_bytes)
    return forward + values * (in_bytes + out_bytes + in_bytes)


def saf_math(u_hat: Tensor, mode: str) -> Tensor:
    """The SAF neuron (one-bit spikes, sigmoid surrogate) as plain differentiable PyTorch, the peer
    that torch.compile gets for forward+backward: the float32 recurrence of
    ``reference.saf_neuron_forward`` (without the spike count), with SPEC.md's gradients put in by
    the detach trick: v + (g - g.detach()) has v's value and g's gradient.

    saf_e: da_hat[t]/dU_hat[t] = sigma'(x_t), x_t = U_hat[t] - V (lambda a_hat[t-1] + 1).
    saf_f: da_hat[t]/dU_hat[t] = 1[0 < a_hat[t] < S_t] / V.
    Both detach a_hat[t-1], so the backward has no recurrence, as in the kernels.
    """
    u = u_hat.float()
    trace = torch.zeros_like(u[0])
    bias_factor = 0.0
    traces = []
    for t in range(u.shape[0]):
        leaked = DECAY * trace.detach()
        x = u[t] - THRESHOLD * (leaked + 1.0)
        spike = (x >= 0).float()
        if mode == "saf_e":
            soft = torch.sigmoid(ALPHA * x)
        else:
            bias_factor = DECAY * bias_factor + 1.0
            value = leaked + spike
            soft = u[t] * ((value > 0) & (value < bias_factor)).float() / THRESHOLD
        trace = leaked + spike + (soft - soft.detach())
        traces.append(trace)
    return torch.stack(traces).to(u_hat.dtype)


def neuron_call(plan: Plan, impl: str, case: str, mode: str, u: Tensor, grad: Tensor):
    """(fn, tensors whose .grad fn writes, seconds spent compiling) for one implementation."""
    if impl == "compile":
        # A fresh cache per shape: each T unrolls into its own graph, and sharing one cache
        # would run into Dynamo's recompile limit.
        torch.compiler.reset()
        if case == "fwd":
            compiled = torch.compile(reference.saf_neuron_forward, backend=plan.compile_backend, dynamic=False)

            def forward(x):
                return compiled(x, None, DECAY, THRESHOLD, 1)[0]
        else:
            forward = functools.partial(torch.compile(saf_math, backend=plan.compile_backend, dynamic=False), mode=mode)
    elif impl == "ottt":
        forward = functools.partial(mk.ottt_neuron, decay=DECAY, threshold=THRESHOLD, alpha=ALPHA)
    else:
        forward = functools.partial(
            mk.saf_neuron, decay=DECAY, threshold=THRESHOLD, alpha=ALPHA, mode=mode, backend=impl
        )

    if case == "fwd":
        leaves = []

        def fn():
            return forward(u)
    else:
        leaves = [u.detach().requires_grad_()]

        def fn():
            forward(leaves[0]).backward(grad)

    compile_s = None
    if impl == "compile":
        start = time.perf_counter()
        fn()
        if plan.device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        for leaf in leaves:
            leaf.grad = None
    return fn, leaves, compile_s


@dataclass
class NeuronShape:
    """One shape of section (a) and the (case, mode, impl) measured at it, in run order."""

    dtype: torch.dtype
    steps: int
    neurons: int
    runs: list[tuple[str, str, str]]


def neuron_shapes(plan: Plan) -> list[NeuronShape]:
    """Section (a)'s plan. A shape whose tensors would pass MAX_TENSOR_BYTES is left out, so that a
    longer T or a larger N added to the plan cannot run the GPU out of memory."""
    shapes = []
    for dtype in plan.dtypes:
        for steps in plan.steps:
            for neurons in plan.neurons:
                if steps * neurons * dtype.itemsize > MAX_TENSOR_BYTES:
                    continue
                with_peers = plan.full or neurons == min(plan.neurons)
                impls = plan.kernels + ([p for p in NEURON_PEERS if p not in plan.kernels] if with_peers else [])
                # OTTT has one gradient: its forward+backward is measured once, beside saf_e's.
                runs = [(c, m, i) for c, m in NEURON_CASES for i in impls if not (i == "ottt" and m == "saf_f")]
                shapes.append(NeuronShape(dtype, steps, neurons, runs))
    return shapes


def bench_neuron(plan: Plan, timer: common.Timer, ceilings: common.Ceilings, record: common.Recorder) -> list[dict]:
    rows = []
    for shape in neuron_shapes(plan):
        rows += bench_neuron_shape(plan, timer, ceilings, record, shape)
    return rows


def bench_neuron_shape(plan, timer, ceilings, record, shape: NeuronShape) -> list[dict]:
    """Every run at one shape (its tensors are freed on return)."""
    dtype, steps, neurons = shape.dtype, shape.steps, shape.neurons
    # U_hat ~ N(1, 1.5^2) against V (lambda a + 1) with V = 1: about half the neurons fire at each
    # step, so neither branch of the kernels goes unexercised.
    u = torch.randn(steps, neurons, dtype=dtype, device=plan.device).mul_(1.5).add_(1.0)
    grad = torch.randn(steps, neurons, dtype=dtype, device=plan.device)
    rows = []
    for case, mode, impl in shape.runs:
        row_mode = "ottt" if impl == "ottt" else mode
        row = {"section": "neuron", "case": case, "mode": row_mode, "impl": impl}
        row |= {"dtype": dtype_label(dtype), "T": steps, "N": neurons}

        def measure():
            fn, leaves, compile_s = neuron_call(plan, impl, case, mode, u, grad)
            ms = timer.ms(fn, leaves)
            nbytes = neuron_bytes(case, row_mode, steps, neurons, dtype.itemsize, dtype.itemsize)
            gbps = nbytes / ms / 1e6
            result = {"ms": ms, "bytes": nbytes, "gbps": gbps, "of_copy": gbps / ceilings.copy_gbps}
            return result | ({"compile_s": compile_s} if compile_s is not None else {})

        rows.append(record(row, measure))
    return rows


def neuron_speedups(rows: list[dict]) -> list[dict]:
    """cuda / triton against each peer measured at the same case, dtype and shape (OTTT's
    forward+backward stands against both SAF modes: it is the one OTTT has)."""
    timed = {}
    for r in rows:
        if "ms" in r:
            mode = None if r["impl"] == "ottt" else r["mode"]
            timed[(r["impl"], r["case"], mode, r["dtype"], r["T"], r["N"])] = r["ms"]
    out = []
    for r in rows:
        if r["impl"] not in KERNELS or "ms" not in r:
            continue
        speedup = {"case": r["case"], "mode": r["mode"], "dtype": r["dtype"], "T": r["T"], "N": r["N"]}
        speedup |= {"kernel": r["impl"], "ms": r["ms"]}
        for peer in NEURON_PEERS:
            key = (peer, r["case"], None if peer == "ottt" else r["mode"], r["dtype"], r["T"], r["N"])
            if key in timed:
                speedup[f"vs_{peer}"] = timed[key] / r["ms"]
        if any(key.startswith("vs_") for key in speedup):
            out.append(speedup)
    return out


# ============================================================================= (b) fused linear


def linear_work(case: str, steps: int, rows: int, k: int, n: int, elem: int = 2) -> tuple[int, int]:
    """(FLOPs, bytes) that one call of the op must do at the least, its floor:

        forward   2 T B K N flops; reads a_in (T B K), W (N K), b (N); writes a_hat (T B N)
        backward  4 T B K N flops (dL/da_in, dL/dW); reads dL/da_hat, a_in, W; writes dL/da_in,
                  dL/dW, dL/db

    The fused kernel's backward also recomputes U_hat (2 T B K N more flops) rather than keeping it:
    that is its way of saving memory, not work the op needs, so it is not in the floor."""
    forward_flops = 2 * steps * rows * k * n
    forward_bytes = elem * (steps * rows * k + n * k + n + steps * rows * n)
    if case == "fwd":
        return forward_flops, forward_bytes
    backward_bytes = elem * (steps * rows * n + 2 * steps * rows * k + 2 * n * k + n)
    return 3 * forward_flops, forward_bytes + backward_bytes


def separate_linear(a_in: Tensor, weight: Tensor, bias: Tensor, *, decay: float, backend: str, **neuron) -> Tensor:
    """The unfused layer as a user writes it (and SAFConv2d does): U_hat = a_in W^T + b S_t written
    to memory, then the neuron reads it back."""
    factors = mk.saf_bias_factors(a_in, decay=decay).to(a_in.dtype).view(-1, 1, 1)
    u_hat = F.linear(a_in, weight) + bias * factors
    return mk.saf_neuron(u_hat, decay=decay, backend=backend, **neuron)


def linear_layers(plan: Plan) -> dict[str, Callable]:
    """Section (b)'s implementations, measured at every shape and case: the fused layer on each
    backend that has one, and the separate layer on each."""
    layers = {f"saf_linear[{b}]": functools.partial(mk.saf_linear, backend=b) for b in plan.kernels if b in FUSED}
    return layers | {f"linear+neuron[{b}]": functools.partial(separate_linear, backend=b) for b in plan.kernels}


def bench_linear(plan: Plan, timer: common.Timer, ceilings: common.Ceilings, record: common.Recorder) -> list[dict]:
    layers = linear_layers(plan)
    rows = []
    for batch in plan.linear_rows:
        for k, n in plan.linear_shapes:
            rows += bench_linear_shape(plan, timer, ceilings, record, layers, batch, k, n)
    return rows


def bench_linear_shape(plan, timer, ceilings, record, layers, batch, k, n) -> list[dict]:
    """Both cases of every layer at one shape, and the fused layers' speedups over the separate."""
    dtype, steps = torch.bfloat16, plan.linear_steps
    # a_in is a trace of spikes, between 0 and 1 / (1 - decay) = 2; W is scaled so that U_hat is
    # of the threshold's order and some neurons fire.
    a_in = torch.rand(steps, batch, k, dtype=dtype, device=plan.device).mul_(2.0)
    weight = torch.randn(n, k, dtype=dtype, device=plan.device).mul_(1.5 / math.sqrt(k))
    bias = torch.randn(n, dtype=dtype, device=plan.device).mul_(0.5)
    grad = torch.randn(steps, batch, n, dtype=dtype, device=plan.device)
    rows = []
    for case in LINEAR_CASES:
        flops, nbytes = linear_work(case, steps, batch, k, n)
        memory_ms, matmul_ms = ceilings.memory_floor_ms(nbytes), ceilings.matmul_floor_ms(flops)
        shape = {"dtype": "bf16", "T": steps, "B": batch, "K": k, "N": n, "flops": flops, "bytes": nbytes}
        shape |= {"memory_floor_ms": memory_ms, "matmul_floor_ms": matmul_ms}
        shape["bound"] = "memory" if memory_ms > matmul_ms else "compute"
        timed = {}
        for label, layer in layers.items():

            def measure():
                if case == "fwd":
                    leaves = []

                    def fn():
                        return layer(a_in, weight, bias, decay=DECAY, threshold=THRESHOLD, alpha=ALPHA)
                else:
                    leaves = [t.detach().requires_grad_() for t in (a_in, weight, bias)]

                    def fn():
                        layer(*leaves, decay=DECAY, threshold=THRESHOLD, alpha=ALPHA).backward(grad)

                ms = timer.ms(fn, leaves)
                floor = max(memory_ms, matmul_ms)
                return {"ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6, "of_floor": floor / ms}

            row = record({"section": "linear", "case": case, "impl": label} | shape, measure)
            rows.append(row)
            if "ms" in row:
                timed[label] = row
        for label, row in timed.items():
            if label.startswith("saf_linear"):
                for other, base in timed.items():
                    if other.startswith("linear+neuron"):
                        row[f"x_vs_{other}"] = base["ms"] / row["ms"]
                versus = [v for key, v in row.items() if key.startswith("x_vs_")]
                if versus:
                    # The fastest separate layer's time over the fused one's: what fusing gains
                    # over the best a user can do without it.
                    row["x_best_separate"] = min(versus)
    return rows


# ============================================================================= (c) VGG training


class TimeFirst(nn.Module):
    """A per-step module (pooling) applied to time-first (T, B, ...) tensors."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def saf_vgg(cfg: VGGConfig, mode: str, readout: bool) -> nn.Sequential:
    """The SAF network: SpikeTrace on the static image, SAFConv2d layers, average pooling of the
    traces (pooling is linear, so it commutes with the trace), then a linear layer whose U_hat is
    either read out per step (SAFReadout, o[t] = W s[t] + b, for SAF-E's per-step loss) or used
    as it is (SAF-F: U_hat[T-1] is the decay-weighted sum of every step's W s[t] + b, SAF-F's
    counterpart of OTTT_A's averaged output).

    The linear layer's bias enters U_hat as b rather than b S_t, which only reparametrizes it
    (o[t] carries b (1 - decay) after the first step) and costs the same."""
    layers: list[nn.Module] = [mknn.SpikeTrace(DECAY)]
    channels, size = 3, cfg.image
    for item in cfg.channels:
        if item == "P":
            layers.append(TimeFirst(nn.AvgPool2d(2)))
            size //= 2
        else:
            layers.append(
                mknn.SAFConv2d(channels, item, 3, padding=1, decay=DECAY, threshold=THRESHOLD, mode=mode, alpha=ALPHA)
            )
            channels = item
    layers += [nn.Flatten(2), nn.Linear(channels * size * size, CLASSES)]
    if readout:
        layers.append(mknn.SAFReadout(DECAY))
    return nn.Sequential(*layers)


class SigmoidSpike(torch.autograd.Function):
    """H(x) forward, the sigmoid surrogate alpha g (1 - g), g = sigmoid(alpha x), backward: the
    spike function of mk.ottt_neuron."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        g = torch.sigmoid(ALPHA * x)
        return grad * ALPHA * g * (1.0 - g)


class OTTTLayer(nn.Module):
    """One OTTT layer run one step at a time (Xiao et al., NeurIPS 2022), as OTTT's code does it:
    the forward value comes from the spikes, op(s_in[t]), the gradient from the presynaptic trace
    a[t] = lambda a[t-1] + s_in[t] (history detached). That is two convolutions per step where SAF
    needs one. A spiking layer adds the soft-reset LIF neuron u[t] = lambda (u[t-1] - V s[t-1]) +
    I[t] with the history detached, so each step's graph is freed by its own backward."""

    def __init__(self, synapse: nn.Module, spiking: bool):
        super().__init__()
        self.synapse, self.spiking = synapse, spiking
        self.reset()

    def reset(self) -> None:
        self.trace = self.membrane = self.spikes = None

    def forward(self, s_in: Tensor) -> Tensor:
        trace = s_in if self.trace is None else DECAY * self.trace + s_in
        self.trace = trace.detach()
        weighted = self.synapse(trace)
        with torch.no_grad():
            value = self.synapse(s_in)
        current = weighted + (value - weighted.detach())
        if not self.spiking:
            return current
        membrane = current if self.membrane is None else DECAY * (self.membrane - THRESHOLD * self.spikes) + current
        spikes = SigmoidSpike.apply(membrane - THRESHOLD)
        self.membrane, self.spikes = membrane.detach(), spikes.detach()
        return spikes


def ottt_vgg(cfg: VGGConfig) -> nn.Sequential:
    """The OTTT network of the same shape as ``saf_vgg``, one step at a time: (B, 3, H, W) in,
    logits W s[t] + b out."""
    layers: list[nn.Module] = []
    channels, size = 3, cfg.image
    for item in cfg.channels:
        if item == "P":
            layers.append(nn.AvgPool2d(2))
            size //= 2
        else:
            layers.append(OTTTLayer(nn.Conv2d(channels, item, 3, padding=1), spiking=True))
            channels = item
    layers += [nn.Flatten(1), OTTTLayer(nn.Linear(channels * size * size, CLASSES), spiking=False)]
    return nn.Sequential(*layers)


def saf_stream_step(network: nn.Sequential, x: Tensor, states: list, step: int) -> Tensor:
    """Step `step` (x is (1, B, ...)) through a SAF network, each layer's streaming state carried
    in `states`, detached: SAF-E's gradient has no path back in time, so each step's graph is freed
    by that step's backward."""
    for index, module in enumerate(network):
        if isinstance(module, mknn.SAFNeuron):
            out = module(x, state=states[index], step=step)
            states[index] = out[-1].detach()
        elif isinstance(module, mknn.SpikeTrace):
            out = module(x, state=states[index])
            states[index] = out[-1].detach()
        elif isinstance(module, mknn.SAFReadout):
            out = module(x, state=states[index])
            states[index] = x[-1].detach()
        else:
            out = module(x)
        x = out
    return x


def training_iterations(cfg: VGGConfig, image: Tensor, labels: Tensor) -> dict[str, tuple[Callable, Callable]]:
    """Per method, (build, train): build() makes its network, train(network) runs the forward and
    backward passes of one training iteration on (image, labels), leaving the gradients in place.

    Every method takes one SGD step per iteration with the gradients of all T steps accumulated.
    OTTT_O proper steps the optimizer after every time step; accumulating instead keeps the timed
    work (T forward and backward passes) and drops T - 1 elementwise weight updates, well under
    1% of an iteration here, and keeps the update schedule the same as SAF-E's."""
    steps = cfg.steps
    static = image.unsqueeze(0)

    def saf_e_online(net):
        states = [None] * len(net)
        for t in range(steps):
            out = saf_stream_step(net, static, states, t)
            (F.cross_entropy(out[0], labels) / steps).backward()

    def saf_e_multistep(net):
        out = net(static.expand(steps, *image.shape))
        (sum(F.cross_entropy(out[t], labels) for t in range(steps)) / steps).backward()

    def saf_f(net):
        F.cross_entropy(mknn.saf_f_last_step(net, static.expand(steps, *image.shape))[0], labels).backward()

    def ottt(net, averaged: bool):
        for layer in net:
            if isinstance(layer, OTTTLayer):
                layer.reset()
        total = None
        for t in range(steps):
            out = net(image)
            if averaged:
                # OTTT_A: the loss is on the output averaged over the steps so far; the earlier
                # steps enter detached, since OTTT's online gradient has no path back in time.
                total = out if total is None else total.detach() + out
                loss = F.cross_entropy(total / (t + 1), labels) / steps
            else:
                loss = F.cross_entropy(out, labels) / steps
            loss.backward()

    return {
        "SAF-E online": (functools.partial(saf_vgg, cfg, "saf_e", True), saf_e_online),
        "SAF-E multi-step": (functools.partial(saf_vgg, cfg, "saf_e", True), saf_e_multistep),
        "SAF-F": (functools.partial(saf_vgg, cfg, "saf_f", False), saf_f),
        "OTTT_O": (functools.partial(ottt_vgg, cfg), functools.partial(ottt, averaged=False)),
        "OTTT_A": (functools.partial(ottt_vgg, cfg), functools.partial(ottt, averaged=True)),
    }


VGG_BASELINES = {"SAF-E online": "OTTT_O", "SAF-E multi-step": "OTTT_O", "SAF-F": "OTTT_A"}


def vgg_runs(plan: Plan) -> list[tuple[str, str]]:
    """Section (c)'s plan, (method, backend): MAQD_BACKEND picks the backend of every maqd op in a
    SAF network at once; OTTT is plain PyTorch."""
    runs = [(name, backend) for backend in plan.kernels for name in VGG_BASELINES]
    return runs + [(name, "eager") for name in ("OTTT_O", "OTTT_A")]


def bench_vgg(plan: Plan, timer: common.Timer, record: common.Recorder) -> list[dict]:
    cfg = plan.vgg
    torch.manual_seed(0)
    image = torch.randn(cfg.batch, 3, cfg.image, cfg.image, device=plan.device)
    labels = torch.randint(0, CLASSES, (cfg.batch,), device=plan.device)
    methods = training_iterations(cfg, image, labels)
    shape = {"T": cfg.steps, "batch": cfg.batch, "image": cfg.image, "channels": " ".join(map(str, cfg.channels))}
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # the best convolution algorithms for every method alike
    rows = []
    try:
        for name, backend in vgg_runs(plan):
            build, train = methods[name]

            def measure():
                torch.manual_seed(0)
                net = build().to(plan.device)
                optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

                def iteration():
                    optimizer.zero_grad(set_to_none=True)
                    train(net)
                    optimizer.step()

                chosen = contextlib.nullcontext() if backend == "eager" else common.environment("MAQD_BACKEND", backend)
                with chosen:
                    stats = timer.iterations(iteration, cfg.warmup, cfg.iters)
                result = {"ms": stats.ms}
                if stats.peak_bytes is not None:
                    result |= {
                        "peak_mib": stats.peak_bytes / common.MIB,
                        "resident_mib": stats.resident_bytes / common.MIB,
                    }
                return result

            rows.append(record({"section": "vgg", "method": name, "backend": backend} | shape, measure))
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    baselines = {r["method"]: r for r in rows if r["backend"] == "eager" and "ms" in r}
    for row in rows:
        base = baselines.get(VGG_BASELINES.get(row["method"], ""))
        if base is None or "ms" not in row:
            continue
        row["baseline"] = base["method"]
        row["speedup"] = base["ms"] / row["ms"]
        if "peak_mib" in row:
            row["memory_ratio"] = row["peak_mib"] / base["peak_mib"]
    return rows


# ============================================================================= targets and report


def worst(rows: list[dict], key: str, where: Callable[[dict], str]) -> tuple[float | None, str]:
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return None, "no measurement"
    low = min(rows, key=lambda r: r[key])
    return low[key], where(low)


def neuron_where(r: dict) -> str:
    return f"{r['case']} {r['mode']} {r['dtype']} T={r['T']} N={count_label(r['N'])}"


def targets(plan: Plan, neuron: list[dict], speedups: list[dict], linear: list[dict], vgg: list[dict]):
    out = []
    for kernel in KERNELS:
        measured, where = worst(
            [
                r
                for r in neuron
                if r["impl"] == kernel and r["case"] == "fwd+bwd" and r["N"] >= plan.bandwidth_target_min_neurons
            ],
            "of_copy",
            neuron_where,
        )
        floor_n = count_label(plan.bandwidth_target_min_neurons)
        name = f"neuron fwd+bwd [{kernel}], fraction of copy bandwidth, N >= {floor_n}"
        out.append(common.Target(name, 0.8, measured, unit="", where=where))
        measured, where = worst(
            [s for s in speedups if s["kernel"] == kernel and s["T"] == plan.speedup_target_steps],
            "vs_reference",
            neuron_where,
        )
        name = f"neuron [{kernel}] speedup over the eager reference, T = {plan.speedup_target_steps}"
        out.append(common.Target(name, 10.0, measured, where=where))

    fused = [r for r in linear if r["bound"] == "memory" and r["impl"] == "saf_linear[triton]"]
    measured, where = worst(fused, "x_best_separate", lambda r: f"{r['case']} B={r['B']} K={r['K']} N={r['N']}")
    out.append(
        common.Target(
            "saf_linear [triton] over linear + the faster separate neuron, memory-bound shapes",
            1.3,
            measured,
            where=where,
        )
    )

    for method in ("SAF-E online", "SAF-E multi-step"):
        done = [r for r in vgg if r["method"] == method and "speedup" in r]
        speedup = memory = None
        where = "no measurement"
        if done:
            # The backend the SAF ops run fastest on: the one a user would pick.
            best = max(done, key=lambda r: r["speedup"])
            speedup, memory = best["speedup"], best.get("memory_ratio")
            where = f"{best['backend']}, T={best['T']} batch={best['batch']}"
        out.append(common.Target(f"VGG {method} speedup over OTTT_O", 2.0, speedup, where=where))
        out.append(
            common.Target(f"VGG {method} peak memory over OTTT_O's", 0.5, memory, unit="", higher=False, where=where)
        )
    return out


NEURON_COLUMNS = {"case": "case", "mode": "mode", "impl": "impl", "dtype": "dtype", "T": "T", "N": "N"}
NEURON_COLUMNS |= {"ms": "ms", "gbps": "GB/s", "of_copy": "of copy BW", "compile_s": "compile s", "error": "error"}
SPEEDUP_COLUMNS = {"case": "case", "mode": "mode", "dtype": "dtype", "T": "T", "N": "N", "kernel": "kernel"}
SPEEDUP_COLUMNS |= {"ms": "ms", "vs_reference": "x eager ref", "vs_compile": "x compile", "vs_ottt": "x OTTT"}
VGG_COLUMNS = {"method": "method", "backend": "backend", "ms": "ms / iteration", "peak_mib": "peak MiB"}
VGG_COLUMNS |= {"resident_mib": "resident MiB", "baseline": "vs", "speedup": "speedup", "memory_ratio": "memory ratio"}
VGG_COLUMNS |= {"error": "error"}
ERROR_COLUMNS = {k: k for k in ("section", "case", "mode", "impl", "method", "backend", "dtype", "T", "N", "B", "K")}
ERROR_COLUMNS |= {"error": "error"}


def linear_columns(rows: list[dict]) -> dict[str, str]:
    columns = {"case": "case", "B": "B", "K": "K", "N": "N", "bound": "bound", "impl": "impl", "ms": "ms"}
    columns |= {"tflops": "TFLOP/s", "gbps": "GB/s", "of_floor": "of floor"}
    for key in dict.fromkeys(k for r in rows for k in r if k.startswith("x_vs_")):
        columns[key] = "x " + key.removeprefix("x_vs_")
    return columns | {"x_best_separate": "x fastest separate", "error": "error"}


def with_count_labels(rows: list[dict]) -> list[dict]:
    return [r | {"N": count_label(r["N"])} for r in rows]


def report(plan, ceilings, neuron, speedups, linear, vgg, goals, errors) -> list[tuple[str, str]]:
    """The Markdown sections, in the order a reader asks: did we meet the goals, then the detail."""
    sections = [
        common.targets_section(
            goals,
            plan.smoke,
            "`measured` is the worst case over the shapes a neuron or linear target covers (named under "
            "`at`), and for a VGG target the SAF backend with the best speedup. For the VGG rows: the paper "
            "(Saiin et al., TMLR 2024) reports 28-30% less memory and 30-63% less time for SAF than OTTT "
            "with eager code.",
            compiled=False,
        )
    ]
    if neuron:
        sections.append(
            (
                "(a) SAF neuron",
                "Median ms (do_bench). GB/s counts the bytes each call must move (`neuron_bytes`):\n\n```\n"
                + NEURON_BYTES_MODEL
                + "\n```\n\nso `of copy BW` is the fraction of the copy bandwidth measured in this run "
                f"({ceilings.copy_gbps:.0f} GB/s). Peers (eager reference, torch.compile, OTTT) run "
                + ("at every N" if plan.full else "at the smallest N only")
                + ".\n\n"
                + common.markdown_table(with_count_labels(neuron), NEURON_COLUMNS)
                + "\n\nSpeedups of the kernels over each peer at the same shape:\n\n"
                + common.markdown_table(with_count_labels(speedups), SPEEDUP_COLUMNS),
            )
        )
    if linear:
        sections.append(
            (
                "(b) Fused saf_linear against linear + separate neuron",
                "bf16. `bound` compares the shape's matmul floor (FLOPs / "
                f"{ceilings.matmul_tflops:.0f} TFLOP/s) with its memory floor (bytes / {ceilings.copy_gbps:.0f} "
                "GB/s), from `linear_work`; `of floor` is the larger floor over the time; `x linear+neuron[b]` "
                "is that unfused layer's time over the fused one's.\n\n"
                + common.markdown_table(linear, linear_columns(linear)),
            )
        )
    if vgg:
        cfg = plan.vgg
        sections.append(
            (
                "(c) VGG training iteration: SAF against OTTT",
                f"Batch {cfg.batch}, 3x{cfg.image}x{cfg.image}, T = {cfg.steps}, conv widths "
                f"{' '.join(map(str, cfg.channels))} then linear {CLASSES}, float32 (cuDNN's default TF32 "
                "convolutions, autotuned for every method alike); forward, backward and SGD step, median of "
                f"{cfg.iters} iterations after {cfg.warmup} warm-up; peak = torch.cuda.max_memory_allocated "
                "over them (resident = allocated when they began). `speedup` is the OTTT time over the "
                "row's, `memory ratio` the row's peak over OTTT's. SAF rows name the maqd backend (MAQD_BACKEND) "
                "their ops ran on.\n\n" + common.markdown_table(vgg, VGG_COLUMNS),
            )
        )
    if errors:
        sections.append(("Failed measurements", common.markdown_table(errors, ERROR_COLUMNS)))
    return sections


def panels(plan: Plan, ceilings: common.Ceilings, neuron, speedups, linear, vgg) -> list[common.Panel]:
    out = []
    for dtype in plan.dtypes:
        label = dtype_label(dtype)
        mine = [r for r in neuron if r["dtype"] == label and r["impl"] in KERNELS and "of_copy" in r]
        shapes = list(dict.fromkeys((r["T"], r["N"]) for r in mine))
        panel = common.Panel(
            f"SAF neuron, {label}: fraction of copy bandwidth ({ceilings.copy_gbps:.0f} GB/s)",
            "of copy bandwidth",
            [f"T={t} N={count_label(n)}" for t, n in shapes],
            line=0.8,
        )
        for impl, case, mode in dict.fromkeys((r["impl"], r["case"], r["mode"]) for r in mine):
            values = {
                (r["T"], r["N"]): r["of_copy"] for r in mine if (r["impl"], r["case"], r["mode"]) == (impl, case, mode)
            }
            panel.series[f"{impl} {case} {mode}"] = [values.get(s) for s in shapes]
        out.append(panel)
    shapes = list(dict.fromkeys((s["dtype"], s["T"], s["N"]) for s in speedups))
    panel = common.Panel(
        "SAF neuron fwd+bwd saf_e: speedup over peers",
        "speedup (log)",
        [f"{d} T={t} N={count_label(n)}" for d, t, n in shapes],
        line=10.0,
        log=True,
    )
    for s in speedups:
        if s["case"] == "fwd+bwd" and s["mode"] == "saf_e":
            for peer in NEURON_PEERS:
                if f"vs_{peer}" in s:
                    series = panel.series.setdefault(f"{s['kernel']} vs {peer}", [None] * len(shapes))
                    series[shapes.index((s["dtype"], s["T"], s["N"]))] = s[f"vs_{peer}"]
    out.append(panel)
    fused = [r for r in linear if any(k.startswith("x_vs_") for k in r)]
    shapes = list(dict.fromkeys((r["case"], r["B"], r["K"], r["N"], r["bound"]) for r in fused))
    panel = common.Panel(
        "saf_linear fused: speedup over linear + separate neuron",
        "speedup",
        [f"{c} B={b} {k}x{n} ({bound[:3]})" for c, b, k, n, bound in shapes],
        line=1.3,
    )
    for r in fused:
        for key, value in r.items():
            if key.startswith("x_vs_"):
                label = f"{r['impl']} vs {key.removeprefix('x_vs_')}"
                series = panel.series.setdefault(label, [None] * len(shapes))
                series[shapes.index((r["case"], r["B"], r["K"], r["N"], r["bound"]))] = value
    out.append(panel)
    compared = [r for r in vgg if "speedup" in r]
    panel = common.Panel(
        "VGG training iteration against OTTT (time speedup, peak-memory ratio)",
        "ratio",
        [f"{r['method']} [{r['backend']}] vs {r['baseline']}" for r in compared],
        series={
            "speedup": [r["speedup"] for r in compared],
            "memory ratio": [r.get("memory_ratio") for r in compared],
        },
        line=1.0,
    )
    out.append(panel)
    return out


# ============================================================================= the run


def _saf_network(row: dict) -> str | None:
    """A VGG row's label when it is a SAF network (OTTT, the baseline, is the "eager" backend)."""
    return None if row["backend"] == "eager" else f"{row['method']} [{row['backend']}]"


HEADLINES = (
    common.Headline("neuron", "of_copy", "of copy BW", common.group_by("impl", "case", "mode", impls=KERNELS)),
    common.Headline("linear", "x_best_separate", "x fastest linear+neuron", common.group_by("impl", "case")),
    common.Headline("vgg", "speedup", "x OTTT", _saf_network),
    common.Headline("vgg", "memory_ratio", "peak memory / OTTT's", _saf_network),
)


def count_measurements(plan: Plan) -> int:
    """How many measurements ``run`` makes: the progress bar's total, known before it starts."""
    counts = {
        "neuron": sum(len(shape.runs) for shape in neuron_shapes(plan)),
        "linear": len(plan.linear_rows) * len(plan.linear_shapes) * len(LINEAR_CASES) * len(linear_layers(plan)),
        "vgg": len(vgg_runs(plan)),
    }
    return sum(counts[section] for section in plan.sections)


def run(plan: Plan, context: common.Context) -> common.FamilyResult:
    """Measures `plan` with the run's timer and ceilings and writes saf.csv, saf.md and saf.png."""
    record = common.Recorder(FAMILY, plan.device, context.progress)
    timer, ceilings = context.timer, context.ceilings
    torch.manual_seed(0)
    neuron = bench_neuron(plan, timer, ceilings, record) if "neuron" in plan.sections else []
    linear = bench_linear(plan, timer, ceilings, record) if "linear" in plan.sections else []
    vgg = bench_vgg(plan, timer, record) if "vgg" in plan.sections else []
    speedups = neuron_speedups(neuron)
    goals = targets(plan, neuron, speedups, linear, vgg)
    sections = report(plan, ceilings, neuron, speedups, linear, vgg, goals, record.errors)
    files = common.write_family_files(
        context, FAMILY, TITLE, record.rows, sections, panels(plan, ceilings, neuron, speedups, linear, vgg)
    )
    return common.FamilyResult(FAMILY, TITLE, record.rows, goals, common.headline_rows(record.rows, HEADLINES), files)
