"""Bit budgets, layer sensitivity and per-layer bit allocation for models built from the library's
layers (SPEC.md section 4).

- ``bit_budget``: per quantized layer, T x B_w x B_s, the bit budget of Yao et al., "Towards
  Efficient and Accurate Spiking Neural Networks via Adaptive Bit Allocation": time steps times
  weight bits times the bits of the spikes or activations the layer reads.
- ``weight_kurtosis`` and ``layer_sensitivity``: the two layer-sensitivity features of Zhang et al.,
  "Towards Superior Quantization Accuracy: A Layer-sensitive Approach" (arXiv 2503.06518), the
  kurtosis of a layer's weight distribution (KurtBoost) and the error its quantization puts on the
  layer's output (SensiBoost).
- ``allocate_bits`` and ``apply_bits``: start every layer at a base width and give the memory
  budget's extra bits to the layers with the highest score, as SensiBoost and KurtBoost do.

The quantized layers are ``maqd_kernels.nn.QuantLinear`` and ``QuantConv2d``; their weight memory
is counted at the nominal width, weight elements x B_w (``pack_weight`` stores 3-bit codes in
4-bit fields; biases and the per-channel scale stay float and are not counted).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .nn import QuantAct, QuantConv2d, QuantLinear, SAFNeuron, SAFReadout, SpikeTrace
from .quant import default_scale, quant_conv2d, quant_linear, weight_standardize
from .quant.op import MAX_BITS

Tensor = torch.Tensor

FLOAT_BITS = 32  # B_s of a layer that reads float values
QUANTIZED_LAYERS = (QuantLinear, QuantConv2d)
SCORES = ("sensitivity", "kurtosis")
# Leaf modules that hand on the precision of what they read: they only reshape or select values,
# are the identity on non-negative codes (ReLU) or at inference (dropout), or turn b-bit spikes
# into their trace, which SAF layers read as b-bit spikes per step (Saiin et al., TMLR 2024).
_PRECISION_PRESERVING = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.ReLU,
    SpikeTrace,
)
_SPIKING = (SpikeTrace, SAFNeuron, SAFReadout)


@dataclass(frozen=True)
class LayerBitBudget:
    """One quantized layer's bits (Yao et al., adaptive bit allocation).

    `name`: the module's qualified name in the model; `weight_bits`: B_w; `input_bits`: B_s, the
    bits of the spikes or activations it reads (32 for float input); `steps`: T; `weights`: weight
    elements; `parameters`: weights plus bias elements."""

    name: str
    weight_bits: int
    input_bits: int
    steps: int
    weights: int
    parameters: int

    @property
    def bit_budget(self) -> int:
        """T x B_w x B_s."""
        return self.steps * self.weight_bits * self.input_bits

    @property
    def weight_memory_bits(self) -> int:
        """weights x B_w."""
        return self.weights * self.weight_bits


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules without children, in registration order."""
    return ((name, module) for name, module in model.named_modules() if next(module.children(), None) is None)


def _quantized_layers(model: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, QUANTIZED_LAYERS)]
    if not layers:
        raise ValueError("model has no quantized layer (maqd_kernels.nn.QuantLinear or QuantConv2d)")
    return layers


def bit_budget(model: nn.Module, steps: int = 1) -> list[LayerBitBudget]:
    """Per quantized layer (``QuantLinear``, ``QuantConv2d``), in module order: B_w, B_s, T and the
    bit budget T x B_w x B_s of Yao et al., "Towards Efficient and Accurate Spiking Neural Networks
    via Adaptive Bit Allocation", with the layer's parameter count and weight memory.

    B_s is read from module order: the leaf modules are walked in registration order (the data flow
    of an ``nn.Sequential``), and a layer reads the output of the last quantizer before it, a
    ``QuantAct`` (its ``bits``) or a SAF neuron (``SAFNeuron``, ``SAFLinear``, ``SAFConv2d``: its
    ``spike_bits``), provided only precision-preserving modules stand between them (``Identity``,
    ``Flatten``, ``Unflatten``, dropout, max pooling, ``ReLU``, ``SpikeTrace``). Any other module
    in between (LayerBatchNorm, a float layer, another quantized layer, ``SAFReadout``) makes the
    input float: B_s = 32. A model whose forward does not follow registration order needs its
    modules registered in the order they run.

    Args:
        model: any nn.Module containing quantized layers.
        steps: T, the time steps of a spiking model (one with a SpikeTrace, SAF neuron or SAF
            readout); a model without any runs once per input, T = 1, whatever `steps` is.
    Returns: one ``LayerBitBudget`` per quantized layer.
    """
    _checks.integer("steps", steps, 1)
    layers = _quantized_layers(model)
    time_steps = steps if any(isinstance(m, _SPIKING) for m in model.modules()) else 1
    input_bits, current = {}, FLOAT_BITS
    for _, module in _leaves(model):
        if isinstance(module, QUANTIZED_LAYERS):
            input_bits[id(module)], current = current, FLOAT_BITS
        elif isinstance(module, QuantAct):
            current = module.bits
        elif isinstance(module, SAFNeuron):
            current = module.spike_bits
        elif not isinstance(module, _PRECISION_PRESERVING):
            current = FLOAT_BITS
    return [
        LayerBitBudget(
            name=name,
            weight_bits=layer.weight_bits,
            input_bits=input_bits[id(layer)],
            steps=time_steps,
            weights=layer.weight.numel(),
            parameters=layer.weight.numel() + (0 if layer.bias is None else layer.bias.numel()),
        )
        for name, layer in layers
    ]


def weight_kurtosis(model: nn.Module) -> dict[str, float]:
    """Per quantized layer, the Pearson (non-excess) kurtosis m4 / m2^2 of its standardized
    weights, where m_k are central moments over all the layer's elements: 3 for Gaussian weights,
    more for heavy tails. KurtBoost's layer feature (Zhang et al., arXiv 2503.06518); the weights
    are standardized per output channel first (``weight_standardize``), as MaQD does before
    quantizing, so a layer is scored on the shape of what is quantized, not on channel scales.

    Returns: {qualified layer name: kurtosis} in module order; nan for a layer whose standardized
    weights are all equal (one input per output channel).
    """
    kurtosis = {}
    for name, layer in _quantized_layers(model):
        with torch.no_grad():
            standardized = weight_standardize(layer.weight.float(), backend=layer.backend).double()
        centered = standardized - standardized.mean()
        second = centered.square().mean().item()
        kurtosis[name] = centered.pow(4).mean().item() / second**2 if second > 0 else math.nan
    return kurtosis


def _scale_at(layer: QuantLinear | QuantConv2d, bits: int) -> float:
    """The layer's weight scale at `bits`: its current scale times default_scale(bits) /
    default_scale(current bits), so a default scale stays the default (the Gaussian-optimal scale
    of each width) and a custom one keeps its ratio to it."""
    return default_scale(bits, True) * (layer.weight_scale / default_scale(layer.weight_bits, True))


def _as_arguments(calibration_inputs) -> tuple:
    if isinstance(calibration_inputs, Tensor):
        return (calibration_inputs,)
    if isinstance(calibration_inputs, (tuple, list)):
        return tuple(calibration_inputs)
    raise TypeError(
        f"calibration_inputs must be a torch.Tensor or a tuple of the model's arguments, "
        f"got {type(calibration_inputs).__name__}"
    )


def _layer_inputs(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], calibration_inputs) -> dict:
    """{layer name: [its input on each call]} from one eval-mode, no-grad run of the model; the
    model's training flags are restored afterwards (LBN's running statistics are not touched)."""
    arguments = _as_arguments(calibration_inputs)
    captured = {name: [] for name, _ in layers}

    def capture(name):
        return lambda module, inputs: captured[name].append(inputs[0].detach())

    hooks = [layer.register_forward_pre_hook(capture(name)) for name, layer in layers]
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*arguments)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in training.items():
            module.training = mode
    silent = [name for name, inputs in captured.items() if not inputs]
    if silent:
        raise ValueError(f"quantized layer(s) {', '.join(silent)} did not run on calibration_inputs")
    return captured


def _float_and_quantized(layer: QuantLinear | QuantConv2d, x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The layer's output on x (float32) with its standardized float weights and with the
    round-clipped ones at `bits`, the latter by the op its forward runs."""
    x, weight = x.float(), layer.weight.float()
    bias = None if layer.bias is None else layer.bias.float()
    standardized = weight_standardize(weight, backend=layer.backend)
    quantization = {"weight_bits": bits, "weight_scale": _scale_at(layer, bits), "backend": layer.backend}
    if isinstance(layer, QuantLinear):
        return F.linear(x, standardized, bias), quant_linear(x, weight, bias, **quantization)
    return (
        F.conv2d(x, standardized, bias, layer.stride, layer.padding),
        quant_conv2d(x, weight, bias, layer.stride, layer.padding, **quantization),
    )


def layer_sensitivity(model: nn.Module, calibration_inputs, bits: int | None = None) -> dict[str, float]:
    """Per quantized layer, the relative output error of quantizing its weights at `bits`: the
    mean square of (y_q - y) over the mean square of y, where y is the layer's output with its
    float weights (standardized, the values MaQD quantizes) and y_q with round-clipped ones
    (``quant_linear`` / ``quant_conv2d``, what the layer's forward computes, at ``bits`` with the
    layer's scale carried to that width as ``apply_bits`` does). Both come from the same inputs,
    those the layer receives when the model runs on `calibration_inputs` (in eval mode, no grad;
    every other layer keeps its own bits), all in float32. SensiBoost's activation sensitivity
    (Zhang et al., arXiv 2503.06518).

    Args:
        model: a model containing quantized layers.
        calibration_inputs: a tensor, or a tuple of the model's positional arguments.
        bits: 1..8, or None for each layer's own weight_bits.
    Returns: {qualified layer name: normalised MSE} in module order (a layer that runs several
        times sums its errors and its squares over the calls).
    """
    if bits is not None:
        _checks.integer("bits", bits, 1, MAX_BITS)
    layers = _quantized_layers(model)
    inputs = _layer_inputs(model, layers, calibration_inputs)
    sensitivity = {}
    with torch.no_grad():
        for name, layer in layers:
            error = power = 0.0
            for x in inputs[name]:
                exact, quantized = _float_and_quantized(layer, x, layer.weight_bits if bits is None else bits)
                error += (quantized - exact).double().square().sum().item()
                power += exact.double().square().sum().item()
            sensitivity[name] = error / power if power > 0 else math.nan
    return sensitivity


def _check_choices(choices) -> tuple[int, ...]:
    if not isinstance(choices, (tuple, list)) or not choices:
        raise TypeError(f"choices must be a non-empty tuple of bit widths, got {choices!r}")
    return tuple(sorted({_checks.integer("choices", c, 1, MAX_BITS) for c in choices}))


def allocate_bits(
    model: nn.Module,
    memory_budget_bits: int,
    *,
    choices: Sequence[int] = (2, 4, 8),
    base_bits: int | None = None,
    score: str = "sensitivity",
    calibration_inputs=None,
) -> dict[str, int]:
    """Weight bits per quantized layer within a total weight memory, after SensiBoost and
    KurtBoost (Zhang et al., arXiv 2503.06518): every layer starts at `base_bits`, and the layers
    that are hardest to quantize, the highest `score`, get the extra bits.

    The rule: layers are ranked by score, highest first (module order breaks ties; a nan score
    ranks last). In rounds, each layer in rank order moves up to the next width in `choices` if
    that fits in what is left of the budget; rounds repeat until no layer can move. So the budget
    goes to the highest-score layers first, every layer gets one step before any gets a second,
    and a layer too large to raise does not keep the smaller ones behind it from rising. If the
    base widths alone exceed the budget, layers first step down, lowest score first and in rounds
    likewise, until the total fits. Memory is weight elements x bits (``bit_budget``).

    Args:
        model: a model containing quantized layers (``QuantLinear``, ``QuantConv2d``).
        memory_budget_bits: the most total weight memory, in bits.
        choices: the allowed widths, 1..8.
        base_bits: the starting width, one of `choices`; default the smallest.
        score: "sensitivity" (``layer_sensitivity`` at `base_bits`, which needs
            `calibration_inputs`) or "kurtosis" (``weight_kurtosis``).
        calibration_inputs: the model's input for "sensitivity" (see ``layer_sensitivity``).
    Returns: {qualified layer name: bits} in module order, for ``apply_bits``.
    Raises: ValueError when even every layer at the smallest choice exceeds `memory_budget_bits`.
    """
    _checks.integer("memory_budget_bits", memory_budget_bits, 0)
    widths = _check_choices(choices)
    base = widths[0] if base_bits is None else _checks.integer("base_bits", base_bits, 1, MAX_BITS)
    if base not in widths:
        raise ValueError(f"base_bits must be one of choices {widths}; got {base}")
    _checks.choice("score", score, SCORES)
    weights = {row.name: row.weights for row in bit_budget(model)}
    least = sum(weights.values()) * widths[0]
    if least > memory_budget_bits:
        raise ValueError(
            f"memory_budget_bits={memory_budget_bits} is below the {least} bits of every layer at "
            f"{widths[0]} bits (the smallest of choices)"
        )
    if score == "sensitivity":
        if calibration_inputs is None:
            raise ValueError('score="sensitivity" needs calibration_inputs')
        scores = layer_sensitivity(model, calibration_inputs, bits=base)
    else:
        scores = weight_kurtosis(model)
    ranked = sorted(weights, key=lambda name: math.inf if math.isnan(scores[name]) else -scores[name])

    bits = dict.fromkeys(weights, base)
    used = sum(weights[name] * base for name in weights)
    position = {width: i for i, width in enumerate(widths)}
    # Every round lowers some layer until all are at the smallest width, which fits (checked above).
    while used > memory_budget_bits:
        for name in reversed(ranked):
            if used <= memory_budget_bits:
                break
            if position[bits[name]] > 0:
                lower = widths[position[bits[name]] - 1]
                used -= weights[name] * (bits[name] - lower)
                bits[name] = lower
    moved = True
    while moved:
        moved = False
        for name in ranked:
            if position[bits[name]] + 1 < len(widths):
                higher = widths[position[bits[name]] + 1]
                extra = weights[name] * (higher - bits[name])
                if used + extra <= memory_budget_bits:
                    used += extra
                    bits[name], moved = higher, True
    return bits


def apply_bits(model: nn.Module, allocation: dict[str, int]) -> nn.Module:
    """Sets the weight bits of the named quantized layers in place (from ``allocate_bits``), and
    returns the model. A layer's ``weight_scale`` is carried to the new width: a default scale
    becomes the new width's default (``default_scale(bits, signed=True)``), a custom one keeps its
    ratio to the default. Every name and width is checked before any layer changes.

    Args: allocation: {qualified layer name: bits 1..8}.
    Raises: ValueError for a name that is not a module of the model, TypeError for one that is not
        a ``QuantLinear`` or ``QuantConv2d``.
    """
    modules = dict(model.named_modules())
    for name, bits in allocation.items():
        if name not in modules:
            raise ValueError(f"allocation names {name!r}, which is not a module of the model")
        if not isinstance(modules[name], QUANTIZED_LAYERS):
            raise TypeError(
                f"allocation names {name!r}, a {type(modules[name]).__name__}, not a QuantLinear or QuantConv2d"
            )
        _checks.integer(f"allocation[{name!r}]", bits, 1, MAX_BITS)
    for name, bits in allocation.items():
        layer = modules[name]
        layer.weight_scale = _scale_at(layer, bits)
        layer.weight_bits = bits
    return model
