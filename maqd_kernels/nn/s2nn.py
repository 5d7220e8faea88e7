"""The single-step spiking neural network, S2NN (Suetake et al., "S3NN: Time step reduction of
spiking surrogate gradients for training energy efficient single-step spiking neural networks",
arXiv 2201.10879).

An S2NN has no time axis: each hidden neuron fires once or not at all, s = H(u - V) (H(x) = 1 for
x >= 0, else 0), so hidden layers pass binary spikes, as an SNN's do, with no latency, as a binary
network's. Its surrogate gradient is the multi-step SNN surrogate reduced to a single time step
("s2nn" in SPEC.md section 1), with x = u - V:

    sigma'(x) = alpha g (1 - g),  g = sigmoid(alpha x)   for x < 0
    sigma'(x) = 1 / (x + 1)                              for x >= 0

A single step of the SAF neuron (SPEC.md section 1) with no state is exactly this neuron: at T = 1
the trace is a_hat[0] = s[0] = H(U_hat[0] - V) and SAF-E's gradient is sigma'(U_hat[0] - V). So
these modules run on the SAF kernels (CUDA, Triton and the reference) at T = 1, and S2NNLinear on
the fused Triton linear + neuron kernel of ``saf_linear``, where the bias factor S_0 is 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ..saf import op
from .saf import SpikeRecord, _init_like_torch

Tensor = torch.Tensor

# The leak multiplies only the trace of earlier steps, which a single step without state does not
# have: any valid decay gives the same spikes and gradients.
_SINGLE_STEP_DECAY = 1.0


class S2NNNeuron(nn.Module):
    """The S2NN neuron (Suetake et al., arXiv 2201.10879): spikes s = H(x - V) of its input x,
    trained with the single-step surrogate sigma'(x - V) of ``surrogate`` ("s2nn" by default; the
    multi-step SNN's "sigmoid" or the straight-through "rectangle" for comparison, SPEC.md section 1).

    Input: (*) float32, bfloat16, float16 (or float64, reference backend only), any strides.
    Output: spikes in {0, 1}, same shape and dtype; ``forward(x, return_spike_count=True)`` also
    returns their number (a scalar, float32, or float64 for float64 input; differentiable), counted
    inside the kernel. Each call also leaves it in ``spike_record`` (shape (1, *), a single step), so
    ``maqd_kernels.synaptic_penalty`` and ``energy_report`` see S2NN layers as they see SAF layers
    when inputs are (B, *). `backend` as in the ops (default: chosen per call).
    """

    def __init__(
        self, threshold: float = 1.0, alpha: float = 4.0, backend: str | None = None, *, surrogate: str = "s2nn"
    ):
        super().__init__()
        self.threshold = _checks.positive("threshold", threshold)
        self.alpha = _checks.positive("alpha", alpha)
        self.surrogate = _checks.choice("surrogate", surrogate, op.SURROGATES)
        self.backend = _checks.backend(backend)
        self.spike_record = SpikeRecord()

    def neuron_kwargs(self) -> dict:
        """The keywords of ``saf_neuron`` / ``saf_linear`` that make one SAF step this neuron."""
        return {
            "decay": _SINGLE_STEP_DECAY,
            "threshold": self.threshold,
            "mode": "saf_e",
            "surrogate": self.surrogate,
            "alpha": self.alpha,
            "backend": self.backend,
        }

    def forward(self, x: Tensor, return_spike_count: bool = False):
        _checks.tensor("x", x)
        spikes, count = op.saf_neuron(x.unsqueeze(0), return_spike_count=True, **self.neuron_kwargs())
        self.spike_record.update(count, spikes)
        return (spikes[0], count) if return_spike_count else spikes[0]

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, alpha={self.alpha}, surrogate={self.surrogate!r}, backend={self.backend!r}"


class S2NNLinear(S2NNNeuron):
    """Linear layer + S2NN neuron, fused: s = H(x W^T + b - V), (*, in_features) -> (*, out_features),
    computed by ``saf_linear`` at T = 1, so on a GPU the pre-activation never reaches memory (Triton;
    ``saf_linear`` has no hand-written CUDA kernel, so `backend` is "triton", "reference" or None).
    Equals ``S2NNNeuron(...)(torch.nn.functional.linear(x, weight, bias))`` with the pre-activation
    kept in float32 (for bfloat16 and float16 inputs too); parameters are initialised as
    torch.nn.Linear's. Suetake et al., arXiv 2201.10879.

    Input: float32, bfloat16, float16 (or float64, reference backend only), with weight and bias of
    the same dtype (inside ``torch.autocast``, all three in its dtype, as F.linear's operands).
    ``forward(x, return_spike_count=True)`` also returns the number of spikes, as S2NNNeuron's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 1.0,
        alpha: float = 4.0,
        backend: str | None = None,
        *,
        surrogate: str = "s2nn",
    ):
        super().__init__(threshold, alpha, backend, surrogate=surrogate)
        self.in_features = _checks.integer("in_features", in_features, 0)
        self.out_features = _checks.integer("out_features", out_features, 0)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_like_torch(self.weight, self.bias, in_features)

    def forward(self, x: Tensor, return_spike_count: bool = False):
        _checks.tensor("x", x, min_dim=1)
        spikes, count = op.saf_linear(
            x.unsqueeze(0), self.weight, self.bias, return_spike_count=True, **self.neuron_kwargs()
        )
        self.spike_record.update(count, spikes)
        return (spikes[0], count) if return_spike_count else spikes[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()
