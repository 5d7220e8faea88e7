"""Spike accumulation forwarding (SPEC.md section 1)."""

from .op import lif_bptt, ottt_linear, ottt_neuron, saf_bias_factors, saf_linear, saf_neuron, saf_readout, spike_trace

__all__ = [
    "lif_bptt",
    "ottt_linear",
    "ottt_neuron",
    "saf_bias_factors",
    "saf_linear",
    "saf_neuron",
    "saf_readout",
    "spike_trace",
]
