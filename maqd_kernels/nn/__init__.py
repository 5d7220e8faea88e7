"""Modules users swap into their models (constructor signatures from SPEC.md)."""

from .inference import Dequantize, LowBitConv2d, LowBitLinear, Quantize
from .lbn import LayerBatchNorm, PSPNorm
from .quant import QuantAct, QuantConv2d, QuantLinear
from .s2nn import S2NNLinear, S2NNNeuron
from .saf import SAFConv2d, SAFLinear, SAFNeuron, SAFReadout, SpikeTrace, saf_f_last_step

__all__ = [
    "Dequantize",
    "LayerBatchNorm",
    "LowBitConv2d",
    "LowBitLinear",
    "PSPNorm",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "Quantize",
    "S2NNLinear",
    "S2NNNeuron",
    "SAFConv2d",
    "SAFLinear",
    "SAFNeuron",
    "SAFReadout",
    "SpikeTrace",
    "saf_f_last_step",
]
