"""Spiking modules of spike accumulation forwarding (Saiin et al., TMLR 2024; SPEC.md section 1).

All take and return time-first tensors (T, B, ...). Layers pass traces (accumulated spikes), not
spikes: SpikeTrace encodes the input, SAFLinear / SAFConv2d map traces to traces, SAFReadout
turns the last layer's U_hat into per-step logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..saf import op

Tensor = torch.Tensor


class SpikeTrace(nn.Module):
    """a_hat[t] = decay a_hat[t-1] + x[t]: spikes, or a static input repeated T times, into a trace.
    `backend` as in the ops (default: chosen per call, see ``maqd_kernels.backends()``)."""

    def __init__(self, decay: float = 0.5, backend: str | None = None):
        super().__init__()
        self.decay, self.backend = decay, backend

    def forward(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        return op.spike_trace(x, decay=self.decay, state=state, backend=self.backend)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


class SpikeRecord:
    """What a spiking layer's most recent call emitted: `count`, the number of spikes (a 0-dim
    float32 tensor, differentiable: ``maqd_kernels.synaptic_penalty`` back-propagates through it),
    and `shape`, the shape of the output that carried them, time-first (T, B, *features).

    Both are None before the first call. A record is never copied, pickled or saved: a deepcopy or
    an unpickled module starts with an empty one, so a model that holds a training step's graph
    here can still be copied (``convert_for_inference``) or saved. A forward with autograd on
    keeps its graph alive here until the next forward or ``backward()``: evaluate under
    ``torch.no_grad()``, as usual."""

    __slots__ = ("count", "shape")

    def __init__(self):
        self.count: Tensor | None = None
        self.shape: tuple[int, ...] | None = None

    def __deepcopy__(self, memo) -> SpikeRecord:
        return SpikeRecord()

    def __reduce__(self):
        return SpikeRecord, ()

    def update(self, count: Tensor, out: Tensor) -> None:
        self.count, self.shape = count, tuple(out.shape)


class SAFNeuron(nn.Module):
    """The SAF neuron over U_hat (T, *): returns the trace a_hat (T, *). See ``saf_neuron``;
    `backend` as in the ops (default: chosen per call).

    Each call leaves the number of spikes it emitted (counted inside the kernel, at no extra cost)
    in ``spike_record``, for ``maqd_kernels.synaptic_penalty`` and ``maqd_kernels.energy_report``."""

    def __init__(
        self,
        decay: float = 0.5,
        threshold: float = 1.0,
        mode: str = "saf_e",
        surrogate: str = "sigmoid",
        alpha: float = 4.0,
        spike_bits: int = 1,
        backend: str | None = None,
    ):
        super().__init__()
        self.decay, self.threshold, self.mode = decay, threshold, mode
        self.surrogate, self.alpha, self.spike_bits = surrogate, alpha, spike_bits
        self.backend = backend
        self.spike_record = SpikeRecord()

    def neuron_kwargs(self) -> dict:
        return {
            "decay": self.decay,
            "threshold": self.threshold,
            "mode": self.mode,
            "surrogate": self.surrogate,
            "alpha": self.alpha,
            "spike_bits": self.spike_bits,
            "backend": self.backend,
        }

    def forward(self, u_hat: Tensor, state: Tensor | None = None, step: int = 0) -> Tensor:
        return self._fire(u_hat, state, step)

    def _fire(self, u_hat: Tensor, state: Tensor | None, step: int) -> Tensor:
        trace, count = op.saf_neuron(u_hat, state=state, step=step, return_spike_count=True, **self.neuron_kwargs())
        self.spike_record.update(count, trace)
        return trace

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.neuron_kwargs().items())


class SAFLinear(SAFNeuron):
    """Linear layer + SAF neuron: a_hat = saf_neuron(W a_in[t] + b S_t), (T, *, in) -> (T, *, out).
    Parameters are initialised as torch.nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **neuron):
        super().__init__(**neuron)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_like_torch(self.weight, self.bias, in_features)

    def forward(self, a_in: Tensor, state: Tensor | None = None, step: int = 0) -> Tensor:
        trace, count = op.saf_linear(
            a_in, self.weight, self.bias, state=state, step=step, return_spike_count=True, **self.neuron_kwargs()
        )
        self.spike_record.update(count, trace)
        return trace

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class SAFConv2d(SAFNeuron):
    """2-D convolution (cuDNN) + SAF neuron on traces (T, B, C_in, H, W) -> (T, B, C_out, H', W'):
    U_hat[t] = conv(a_in[t]) + b S_t. Parameters are initialised as torch.nn.Conv2d's."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True, **neuron
    ):
        super().__init__(**neuron)
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_like_torch(self.weight, self.bias, in_channels * kernel[0] * kernel[1])

    def forward(self, a_in: Tensor, state: Tensor | None = None, step: int = 0) -> Tensor:
        steps, batch = a_in.shape[:2]
        u_hat = F.conv2d(a_in.flatten(0, 1), self.weight, None, self.stride, self.padding).unflatten(0, (steps, batch))
        if self.bias is not None:
            factors = op.saf_bias_factors(u_hat, decay=self.decay, step=step).to(u_hat.dtype)
            u_hat = u_hat + self.bias.to(u_hat.dtype).view(-1, 1, 1) * factors.view(-1, 1, 1, 1, 1)
        return self._fire(u_hat, state, step)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, " + super().extra_repr()
        )


class SAFReadout(nn.Module):
    """o[t] = U_hat[t] - decay U_hat[t-1] (= W s[t] + b): the classifier output of the last layer.
    `backend` as in the ops (default: chosen per call)."""

    def __init__(self, decay: float = 0.5, backend: str | None = None):
        super().__init__()
        self.decay, self.backend = decay, backend

    def forward(self, u_hat: Tensor, state: Tensor | None = None) -> Tensor:
        return op.saf_readout(u_hat, decay=self.decay, state=state, backend=self.backend)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def _init_like_torch(weight: nn.Parameter, bias: nn.Parameter | None, fan_in: int) -> None:
    """torch.nn.Linear / Conv2d's default initialisation."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _carry(module: nn.Module, x: Tensor, out: Tensor) -> Tensor | None:
    """The state that `module` hands to its next chunk of steps (None for stateless modules), copied
    so that it does not keep the whole chunk's output alive."""
    if isinstance(module, (SpikeTrace, SAFNeuron)):
        return out[-1].clone()
    if isinstance(module, SAFReadout):
        return x[-1].clone()
    return None


def _stream(network: nn.Sequential, x: Tensor, states: list[Tensor | None], step: int) -> Tensor:
    """Runs `network` over steps step .. step + len(x) - 1, reading and updating each layer's state."""
    for index, module in enumerate(network):
        if isinstance(module, SAFNeuron):
            out = module(x, state=states[index], step=step)
        elif isinstance(module, (SpikeTrace, SAFReadout)):
            out = module(x, state=states[index])
        else:
            out = module(x)
        states[index] = _carry(module, x, out)
        x = out
    return x


def saf_f_last_step(network: nn.Sequential, inputs: Tensor) -> Tensor:
    """Runs a SAF-F network over `inputs` (T, B, ...) and returns its output at the last step,
    (1, B, ...), with the autograd graph of that step only.

    SAF-F's gradient (Saiin et al., TMLR 2024, Spike Representation) flows from a loss on the last
    step through U_hat[T-1] = W a_hat_in[T-1] + b S_{T-1} alone, so steps 0 .. T-2 run without
    autograd, carrying each layer's trace forward as streaming state: training memory is that of a
    single step whatever T is. The output and the gradients equal those of running the whole
    sequence with autograd and a loss on the last step.

    `network` is an nn.Sequential of SpikeTrace / SAFNeuron / SAFLinear / SAFConv2d / SAFReadout
    modules (all SAF neurons in mode "saf_f") and stateless per-step modules (Flatten, pooling,
    dropout in eval mode, ...), all taking time-first tensors.
    """
    saf_e = [name for name, m in network.named_modules() if isinstance(m, SAFNeuron) and m.mode != "saf_f"]
    if saf_e:
        raise ValueError(f"saf_f_last_step needs every SAF neuron in mode 'saf_f'; saf_e in: {', '.join(saf_e)}")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be time-first (T, ...) with T >= 1; got shape {tuple(inputs.shape)}")
    states: list[Tensor | None] = [None] * len(network)
    steps = inputs.shape[0]
    if steps > 1:
        with torch.no_grad():
            _stream(network, inputs[:-1], states, 0)
    return _stream(network, inputs[-1:], states, steps - 1)
