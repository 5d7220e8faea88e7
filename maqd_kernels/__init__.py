"""maqd-kernels: fused CUDA and Triton kernels for low-bit and spiking neural networks.

The public API of SPEC.md: spike accumulation forwarding (``saf_*``, ``spike_trace``), MaQD
round-clip quantization and low-bit matmul (``round_clip``, ``pack_weight``, ``lowbit_linear``,
``quant_linear``, ...), Layer-Batch Normalization and its folding (``layer_batch_norm``,
``lbn_inference_affine``, ``fold_affine``, ``convert_for_inference``), and the companion
methods (``synaptic_penalty``, ``energy_report``, ...); modules in
``maqd_kernels.nn``. Every op is a ``torch.library`` custom op in namespace ``maqd``;
``backends()`` says which implementations can run here.
"""

from . import nn
from ._backend import BackendStatus, backends
from .bit_allocation import LayerBitBudget, allocate_bits, apply_bits, bit_budget, layer_sensitivity, weight_kurtosis
from .convert import convert_for_inference
from .energy import EnergyReport, energy_report, synaptic_operations, synaptic_penalty
from .lbn import fold_affine, layer_batch_norm, lbn_inference_affine, psp_norm
from .prune import magnitude_prune_rnn, spectral_prune_rnn
from .quant import (
    PackedWeight,
    default_scale,
    lowbit_linear,
    pack_weight,
    quant_conv2d,
    quant_linear,
    quantize,
    round_clip,
    weight_standardize,
)
from .saf import lif_bptt, ottt_linear, ottt_neuron, saf_bias_factors, saf_linear, saf_neuron, saf_readout, spike_trace

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "EnergyReport",
    "LayerBitBudget",
    "PackedWeight",
    "allocate_bits",
    "apply_bits",
    "backends",
    "bit_budget",
    "convert_for_inference",
    "default_scale",
    "energy_report",
    "fold_affine",
    "layer_batch_norm",
    "layer_sensitivity",
    "lbn_inference_affine",
    "lif_bptt",
    "lowbit_linear",
    "magnitude_prune_rnn",
    "nn",
    "ottt_linear",
    "ottt_neuron",
    "pack_weight",
    "psp_norm",
    "quant_conv2d",
    "quant_linear",
    "quantize",
    "round_clip",
    "saf_bias_factors",
    "saf_linear",
    "saf_neuron",
    "saf_readout",
    "spectral_prune_rnn",
    "spike_trace",
    "synaptic_operations",
    "synaptic_penalty",
    "weight_kurtosis",
    "weight_standardize",
]
