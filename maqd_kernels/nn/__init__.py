"""Modules users swap into their models (constructor signatures from SPEC.md)."""

from .lbn import LayerBatchNorm
from .quant import QuantAct, QuantConv2d, QuantLinear
from .saf import SAFConv2d, SAFLinear, SAFNeuron, SAFReadout, SpikeTrace, saf_f_last_step

__all__ = [
    "LayerBatchNorm",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "SAFConv2d",
    "SAFLinear",
    "SAFNeuron",
    "SAFReadout",
    "SpikeTrace",
    "saf_f_last_step",
]
