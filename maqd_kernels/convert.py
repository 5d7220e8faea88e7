"""``convert_for_inference``: an eval-mode model with every LayerBatchNorm (or PSPNorm) folded away
and every MaQD block fused into one low-bit kernel that takes and gives uint8 codes (SPEC.md
sections 3 and 4; MaQD, Sawada et al., arXiv 2403.14999)."""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .lbn import op as lbn_op
from .nn.inference import Dequantize, LowBitConv2d, LowBitLinear, Quantize
from .nn.quant import QuantAct, QuantConv2d, QuantLinear

# Modules that only move or drop values in eval mode: uint8 codes pass through them unchanged.
CODE_PASSTHROUGH = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
QUANT_LAYERS = (QuantLinear, QuantConv2d)
FLOAT_LAYERS = (nn.Linear, nn.Conv2d)


@runtime_checkable
class FoldableNorm(Protocol):
    """A normalization that is a per-channel affine y = a_c x + b_c in eval mode, over
    `num_features` channels: LayerBatchNorm, PSPNorm. Folded wherever one follows a layer."""

    num_features: int

    def inference_affine(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def convert_for_inference(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode with its layer runs folded and fused (SPEC.md section 3).

    Within every ``nn.Sequential`` (nested ones included, read as one flat run of modules):
      - ``QuantLinear | QuantConv2d`` (-> norm) (-> ``QuantAct``) becomes one
        ``LowBitLinear`` / ``LowBitConv2d``: the norm's affine in the low-bit matmul's epilogue and the
        QuantAct's quantization after it, so the kernel writes uint8 codes;
      - a ``QuantAct`` whose output only feeds such a layer (through Flatten, Dropout, Identity)
        becomes ``Quantize`` (codes), and one whose codes meet a float module becomes
        ``Dequantize`` after the fused layer: codes flow from kernel to kernel and floats appear
        only where a float module needs them;
      - ``Linear | Conv2d -> norm`` folds into the layer's weight and bias.
    A norm is any ``FoldableNorm``: ``LayerBatchNorm`` or ``PSPNorm`` (their eval forms are
    per-channel affines, ``inference_affine()``).
    Absorbed modules are replaced by ``nn.Identity``, so every module keeps its name and position.
    Outside Sequentials (the children of custom modules, whose data flow is their own Python),
    each QuantLinear / QuantConv2d becomes a fused layer with a float input and output, packed
    once instead of at every call; other modules are left as they are.

    A norm is taken to normalize the preceding layer's output features (``(N, C)``,
    time-first ``(T, B, C)`` or ``(N, C, H, W)``). Outputs equal ``model.eval()``'s: floats to
    float32 rounding, codes exactly except where a value sits on a rounding tie (the fused kernel
    accumulates integers exactly where the original sums floats). The original is not modified.

    Args:
        model: any module. backend: kernel backend for the fused layers (default: each layer's own).
    Returns: the converted copy, in eval mode; it saves and loads through ``state_dict``
        (``convert_for_inference(build_model()).load_state_dict(...)``).
    """
    converted = copy.deepcopy(model).eval()
    return _convert(converted, backend)


def _convert(module: nn.Module, backend: str | None) -> nn.Module:
    if isinstance(module, nn.Sequential):
        _convert_run(module, backend)
        return module
    if isinstance(module, QUANT_LAYERS):
        return _fused_class(module).from_layers(module, backend=backend)
    for name, child in module.named_children():
        setattr(module, name, _convert(child, backend))
    return module


def _flat_run(sequence: nn.Sequential) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of every non-Sequential module, nested Sequentials read in order."""
    run = []
    for name, child in sequence.named_children():
        if isinstance(child, nn.Sequential):
            run.extend(_flat_run(child))
        else:
            run.append((sequence, name, child))
    return run


def _next_consumer(modules: list[nn.Module], start: int) -> nn.Module | None:
    """The first module from `start` on that does more than pass codes through (None at the end)."""
    return next((m for m in modules[start:] if not isinstance(m, CODE_PASSTHROUGH)), None)


def _convert_run(sequence: nn.Sequential, backend: str | None) -> None:
    run = _flat_run(sequence)
    modules = [module for _, _, module in run]
    replaced: dict[int, nn.Module] = {}
    codes_in: tuple[int, float] | None = None  # (bits, scale) while uint8 codes flow
    i = 0
    while i < len(modules):
        module = modules[i]
        if isinstance(module, QUANT_LAYERS):
            norm = _following(modules, i + 1, FoldableNorm, _normalizes(module))
            act_at = i + 1 + (norm is not None)
            act = _following(modules, act_at, QuantAct)
            act_out = None if act is None else (act.bits, _scale_of(act))
            replaced[i] = _fused_class(module).from_layers(
                module, norm, act_in=codes_in, act_out=act_out, backend=backend
            )
            for j in range(i + 1, act_at + (act is not None)):
                replaced[j] = nn.Identity()
            codes_in = None
            if act is not None:
                if isinstance(_next_consumer(modules, act_at + 1), QUANT_LAYERS):
                    codes_in = act_out
                else:
                    replaced[act_at] = Dequantize(act_out[1], module.weight.dtype)
            i = act_at + (act is not None)
            continue
        if (
            isinstance(module, QuantAct)
            and codes_in is None
            and isinstance(_next_consumer(modules, i + 1), QUANT_LAYERS)
        ):
            codes_in = (module.bits, _scale_of(module))
            replaced[i] = Quantize(*codes_in, backend=module.backend if backend is None else backend)
        elif isinstance(module, FLOAT_LAYERS) and (
            norm := _following(modules, i + 1, FoldableNorm, _normalizes(module))
        ):
            replaced[i], replaced[i + 1] = _fold_float(module, norm), nn.Identity()
            i += 1
        elif not isinstance(module, CODE_PASSTHROUGH):
            replaced[i] = _convert(module, backend)
        i += 1
    for index, new in replaced.items():
        parent, name, _ = run[index]
        setattr(parent, name, new)


def _following(modules: list[nn.Module], index: int, kind: type, accept=lambda m: True) -> nn.Module | None:
    if index < len(modules) and isinstance(modules[index], kind) and accept(modules[index]):
        return modules[index]
    return None


def _normalizes(layer: nn.Module):
    """Whether a norm has one channel per output feature of `layer`."""
    features = layer.out_features if isinstance(layer, (nn.Linear, QuantLinear)) else layer.out_channels
    return lambda norm: norm.num_features == features


def _fused_class(layer: nn.Module) -> type[LowBitLinear]:
    return LowBitLinear if isinstance(layer, QuantLinear) else LowBitConv2d


def _scale_of(act: QuantAct) -> float:
    return float(act.scale.detach()) if isinstance(act.scale, torch.Tensor) else float(act.scale)


def _fold_float(layer: nn.Module, norm: FoldableNorm) -> nn.Module:
    """`layer` with the eval-mode `norm` folded into its weight and bias (``fold_affine``)."""
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        a, b = norm.inference_affine()
        weight, bias = lbn_op.fold_affine(layer.weight, layer.bias, a, b)
    folded.weight = nn.Parameter(weight, requires_grad=False)
    folded.bias = nn.Parameter(bias, requires_grad=False)
    return folded
