"""Synaptic operations of spiking networks: the synaptic penalty and an energy estimate.

Suetake et al., "Spiking Synaptic Penalty: Appropriate Penalty Term for Energy-Efficient Spiking
Neural Networks" (arXiv 2302.01500); SPEC.md section 4. A spike costs one accumulate per outgoing
synapse, so a layer l that emits `spike_count_l` spikes into a layer with fan-out f_l (synapses
per neuron of l) costs f_l * spike_count_l synaptic operations. The SAF kernels count the spikes
inside the forward kernel (``SpikeRecord``); the penalty's gradient, lambda * f_l per spike, is
that count's gradient, which the SAF backward kernel adds to every spike's upstream gradient in the
same pass as the trace's.

Which layer reads a spiking layer's spikes: the first layer with synapses (a Linear or Conv2d
shape: ``nn.Linear``, ``nn.Conv2d``, ``QuantLinear``, ``SAFLinear``, ``LowBitConv2d``, ...) that
follows it in ``model.named_modules()`` order, which is the order of an ``nn.Sequential`` and of
most models' ``__init__``. Layers in between without synapses (Flatten, LBN, pooling, dropout)
pass the spikes on; a pooling layer's averaging is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .nn.saf import SpikeRecord

Tensor = torch.Tensor

# Energy of one 32-bit floating-point operation at 45 nm (Horowitz, ISSCC 2014), the figures SNN
# energy estimates use: an accumulate is an add; a multiply-accumulate a multiply (3.7 pJ) and an add.
ENERGY_PER_AC = 0.9e-12
ENERGY_PER_MAC = 4.6e-12


@dataclass(frozen=True)
class _Synapses:
    """The connections of a linear or 2-D convolution layer, per sample and time step."""

    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    conv: bool = False

    def count(self, feature_shape: tuple[int, ...]) -> int:
        """Synapses between an input of `feature_shape` ((K,) for linear, (C, H, W) for conv) and
        the output: for a convolution, each output value's kernel taps that fall inside the input."""
        if not self.conv:
            return math.prod(feature_shape) * self.out_features
        if len(feature_shape) < 2:
            raise ValueError(f"a convolution reads (C, H, W) features; got shape {feature_shape}")
        taps = [
            _taps_inside(size, k, s, p, d)
            for size, k, s, p, d in zip(feature_shape[-2:], self.kernel, self.stride, self.padding, self.dilation)
        ]
        return self.out_features * (self.in_features // self.groups) * taps[0] * taps[1]


def _taps_inside(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Sum over a convolution's output positions along one axis of its kernel taps inside the input."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return sum(
        sum(0 <= o * stride - padding + k * dilation < size for k in range(kernel)) for o in range(max(outputs, 0))
    )


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _synapses(module: nn.Module) -> _Synapses | None:
    """The connections of `module` if it has a linear or 2-D convolution shape, else None."""
    if all(hasattr(module, a) for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding")):
        if isinstance(module.padding, str):
            raise ValueError(f"{type(module).__name__}: padding={module.padding!r} is not supported; give it in pixels")
        return _Synapses(
            module.in_channels,
            module.out_channels,
            _pair(module.kernel_size),
            _pair(module.stride),
            _pair(module.padding),
            _pair(getattr(module, "dilation", 1)),
            getattr(module, "groups", 1),
            conv=True,
        )
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return _Synapses(module.in_features, module.out_features)
    return None


@dataclass(frozen=True)
class _SpikingLayer:
    name: str
    record: SpikeRecord
    reader: str | None  # the layer its spikes drive, None when nothing reads them
    synapses: _Synapses | None

    def fan_out(self) -> float:
        """Mean outgoing synapses per neuron, at the feature shape of the last call."""
        features = self.record.shape[2:]
        if self.synapses is None or math.prod(features) == 0:
            return 0.0
        return self.synapses.count(features) / math.prod(features)


def _spiking_layers(model: nn.Module) -> list[_SpikingLayer]:
    """Every module with a ``SpikeRecord`` that has run, and the layer with synapses after it."""
    modules = list(model.named_modules())
    layers = []
    for index, (name, module) in enumerate(modules):
        record = getattr(module, "spike_record", None)
        if not isinstance(record, SpikeRecord) or record.count is None:
            continue
        reader = next(((n, s) for n, m in modules[index + 1 :] if (s := _synapses(m)) is not None), (None, None))
        layers.append(_SpikingLayer(name, record, *reader))
    return layers


def synaptic_operations(model: nn.Module) -> dict[str, Tensor]:
    """Synaptic operations of each spiking layer's most recent call: f_l * spike_count_l, over
    every sample and step of that call (Suetake et al., arXiv 2302.01500).

    Returns: {layer name: 0-dim float32 tensor}, differentiable through the spike counts (empty when
    no spiking layer has run). Multi-bit spikes count their value: a spike of level k is k events.
    """
    return {layer.name: layer.record.count * layer.fan_out() for layer in _spiking_layers(model)}


def synaptic_penalty(model: nn.Module, weight: float, *, per_sample: bool = True) -> Tensor:
    """The spiking synaptic penalty weight * Omega, Omega = sum_l f_l * spike_count_l, for the
    spikes of `model`'s most recent forward (Suetake et al., arXiv 2302.01500; SPEC.md section 4).

    Add it to the loss before ``backward()``: its gradient, weight * f_l per spike, reaches each
    SAF layer's backward kernel as the spike count's gradient and is added there to every spike's
    upstream gradient, in the same pass as the trace's gradient (no extra kernel, no extra pass).

    Args:
        model: a module holding SAF layers (``SAFNeuron``, ``SAFLinear``, ``SAFConv2d``) or any
            module with a ``SpikeRecord`` named ``spike_record``, just called with autograd on.
        weight: lambda >= 0.
        per_sample: divide Omega by the batch size B of the forward (outputs (T, B, ...)), so that
            `weight` does not depend on the batch size; False gives the sum over the batch.
    Returns:
        0-dim float32 tensor (float64 for float64 models). Under ``saf_f_last_step`` the records
        hold the last step only, which is the step SAF-F's gradient flows through.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or math.isinf(weight):
        raise ValueError(f"weight must be a finite number >= 0; got {weight!r}")
    layers = _spiking_layers(model)
    if not layers:
        raise ValueError(
            "synaptic_penalty reads the spike counts of the model's last forward, and no spiking layer "
            "(SAFNeuron, SAFLinear, SAFConv2d) has run: call the model first"
        )
    batches = {layer.record.shape[1] if len(layer.record.shape) > 1 else 1 for layer in layers}
    if per_sample and len(batches) != 1:
        raise ValueError(f"the spiking layers' last calls had different batch sizes {sorted(batches)}")
    total = sum(layer.record.count * layer.fan_out() for layer in layers)
    return weight * (total / batches.pop() if per_sample else total)


@dataclass(frozen=True)
class LayerEnergy:
    """One layer with synapses: `operations` accumulates driven by the spikes of `inputs_from`
    (`kind` "AC": `spikes` times `fan_out`), or multiply-accumulates on a dense input (`kind`
    "MAC", `inputs_from` empty); `joules` their energy. Totals over every sample and step."""

    name: str
    kind: str
    inputs_from: tuple[str, ...]
    spikes: float
    fan_out: float
    operations: float
    joules: float


@dataclass(frozen=True)
class EnergyReport:
    """Synaptic operations and their energy per layer, over `samples` inputs (``energy_report``)."""

    layers: tuple[LayerEnergy, ...]
    samples: int
    energy_per_ac: float
    energy_per_mac: float

    @property
    def synaptic_operations(self) -> float:
        """Spike-driven accumulates, all layers."""
        return sum(layer.operations for layer in self.layers if layer.kind == "AC")

    @property
    def dense_operations(self) -> float:
        """Multiply-accumulates of layers fed a dense (not spiking) input."""
        return sum(layer.operations for layer in self.layers if layer.kind == "MAC")

    @property
    def joules(self) -> float:
        return sum(layer.joules for layer in self.layers)

    @property
    def joules_per_sample(self) -> float:
        return self.joules / max(self.samples, 1)

    COLUMNS = ("layer", "kind", "driven by", "spikes/sample", "fan-out", "ops/sample", "energy/sample (nJ)")

    def rows(self) -> list[list[str]]:
        """One row per layer and a total, per sample, as strings (``COLUMNS``)."""
        per = max(self.samples, 1)
        rows = [
            [
                layer.name,
                layer.kind,
                ", ".join(layer.inputs_from) or "dense input",
                f"{layer.spikes / per:.1f}" if layer.kind == "AC" else "-",
                f"{layer.fan_out:.2f}" if layer.kind == "AC" else "-",
                f"{layer.operations / per:.4g}",
                f"{1e9 * layer.joules / per:.4g}",
            ]
            for layer in self.layers
        ]
        total_ops = (self.synaptic_operations + self.dense_operations) / per
        return rows + [["total", "", "", "", "", f"{total_ops:.4g}", f"{1e9 * self.joules_per_sample:.4g}"]]

    def __str__(self) -> str:
        rows = self.rows()
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(self.COLUMNS)]
        lines = [self.COLUMNS, ["-" * w for w in widths], *rows]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def energy_report(
    model: nn.Module,
    inputs,
    *,
    energy_per_ac: float = ENERGY_PER_AC,
    energy_per_mac: float = ENERGY_PER_MAC,
) -> EnergyReport:
    """Runs `model` on `inputs` (in eval mode, without autograd; its training flag is restored)
    and estimates the energy of its synaptic operations, per layer and in total.

    A layer with synapses whose input is a spiking layer's output costs f_l * spike_count_l
    accumulates (SAF counts spikes in its kernels); one with a dense input (the first layer of a
    network that encodes an image as a constant current) costs one multiply-accumulate per synapse,
    sample and step. Biases, normalization and the neurons' own updates are not counted.

    The spike records then hold this run's counts (without autograd), replacing those of the last
    training forward: call ``synaptic_penalty`` before an energy report, not after.

    Args:
        model: any module; spiking layers are those with a ``SpikeRecord`` (SAF modules).
        inputs: a tensor, or a tuple of positional arguments, for ``model``.
        energy_per_ac, energy_per_mac: joules per accumulate (SPEC.md: 0.9 pJ) and per
            multiply-accumulate (4.6 pJ), 32-bit float at 45 nm (Horowitz, ISSCC 2014).
    Returns:
        An ``EnergyReport``: ``str(report)`` is a per-sample table; ``report.joules`` the total.
    """
    for name, value in (("energy_per_ac", energy_per_ac), ("energy_per_mac", energy_per_mac)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0 (joules); got {value!r}")
    arguments = inputs if isinstance(inputs, tuple) else (inputs,)
    dense_inputs: dict[str, tuple[int, ...]] = {}

    def remember_input(name):
        def hook(module, args):
            if args and isinstance(args[0], Tensor):
                dense_inputs[name] = tuple(args[0].shape)

        return hook

    for _, module in model.named_modules():
        record = getattr(module, "spike_record", None)
        if isinstance(record, SpikeRecord):
            record.count = record.shape = None  # layers this call does not reach are left out
    handles = [m.register_forward_pre_hook(remember_input(n)) for n, m in model.named_modules() if _synapses(m)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*arguments)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()

    spiking = _spiking_layers(model)
    samples = spiking[0].record.shape[1] if spiking else (arguments[0].shape[0] if arguments[0].dim() else 1)
    drivers: dict[str, list[_SpikingLayer]] = {}
    for layer in spiking:
        if layer.reader is not None:
            drivers.setdefault(layer.reader, []).append(layer)
    modules = dict(model.named_modules())
    rows = []
    for name, shape in dense_inputs.items():
        if name in drivers:
            spikes = sum(float(layer.record.count) for layer in drivers[name])
            operations = sum(float(layer.record.count) * layer.fan_out() for layer in drivers[name])
            fan_out = operations / spikes if spikes else drivers[name][0].fan_out()
            sources = tuple(layer.name for layer in drivers[name])
            rows.append(LayerEnergy(name, "AC", sources, spikes, fan_out, operations, operations * energy_per_ac))
        else:
            operations = float(_dense_operations(_synapses(modules[name]), shape))
            rows.append(LayerEnergy(name, "MAC", (), 0.0, 0.0, operations, operations * energy_per_mac))
    return EnergyReport(tuple(rows), samples, float(energy_per_ac), float(energy_per_mac))


def _dense_operations(synapses: _Synapses, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of a layer fed a dense input of `input_shape`: its synapses for one
    sample and step, times the number of samples and steps in the input."""
    features = input_shape[-3:] if synapses.conv else input_shape[-1:]
    if math.prod(features) == 0:
        return 0
    return synapses.count(features) * (math.prod(input_shape) // math.prod(features))
