"""The example models: a float baseline, MaQD quantized MLPs with LBN, SAF spiking networks and a
MaQD-quantized SAF network, all for flat images (B, features) and `classes` labels.

Every builder returns a module whose forward takes images (B, features) in [0, 1]: the float and
quantized MLPs return logits (B, classes); the spiking classifiers return per-step logits
(T, B, classes) (see ``SpikingClassifier.predict``). ``maqd_kernels.convert_for_inference`` turns
each of them into its inference form.
"""

from __future__ import annotations

import torch
from torch import nn

from maqd_kernels import nn as mnn

DECAY = 0.5  # the membrane decay of every SAF layer (SAF, Saiin et al., TMLR 2024)
PIXEL_BITS = 8  # input images quantized to 8-bit codes (exact for MNIST's 0..255 pixels)
# SAF-F's gradient flows only through neurons that fired on some steps but not on all of them
# (0 < a_hat < S_t). At torch.nn.Linear's initialisation about 1% of the first layer's neurons and
# none of the second's ever reach the threshold on these images, so SAF-F could never start to
# learn; three times those weights start 10-20% of them firing.
SAF_WEIGHT_GAIN = 3.0


def float_mlp(in_features: int, hidden: int, classes: int) -> nn.Sequential:
    """Linear -> LayerBatchNorm -> ReLU, twice, then a Linear classifier; at inference each LBN
    folds into the Linear before it."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        mnn.LayerBatchNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        mnn.LayerBatchNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def maqd_mlp(in_features: int, hidden: int, classes: int, *, weight_bits: int, act_bits: int) -> nn.Sequential:
    """MaQD (Sawada et al., arXiv 2403.14999): 8-bit input codes, then two blocks of QuantLinear
    (`weight_bits`) -> LayerBatchNorm -> QuantAct (`act_bits`), and a float classifier. At inference
    each block is one low-bit kernel from uint8 codes to uint8 codes."""
    return nn.Sequential(
        mnn.QuantAct(PIXEL_BITS, scale=1.0 / (2**PIXEL_BITS - 1)),
        mnn.QuantLinear(in_features, hidden, weight_bits=weight_bits),
        mnn.LayerBatchNorm(hidden),
        mnn.QuantAct(act_bits),
        mnn.QuantLinear(hidden, hidden, weight_bits=weight_bits),
        mnn.LayerBatchNorm(hidden),
        mnn.QuantAct(act_bits),
        nn.Linear(hidden, classes),
    )


def maqd_cnn(side: int, classes: int, *, weight_bits: int, act_bits: int, channels: int = 16) -> nn.Sequential:
    """A MaQD convolutional network for square grey images given flat (B, side * side): 8-bit input
    codes, two QuantConv2d (3x3; the second with stride 2) -> LayerBatchNorm -> QuantAct blocks, and
    a float classifier. At inference each block is one ``LowBitConv2d`` on uint8 codes."""
    reduced = (side + 1) // 2
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        mnn.QuantAct(PIXEL_BITS, scale=1.0 / (2**PIXEL_BITS - 1)),
        mnn.QuantConv2d(1, channels, 3, padding=1, weight_bits=weight_bits),
        mnn.LayerBatchNorm(channels),
        mnn.QuantAct(act_bits),
        mnn.QuantConv2d(channels, 2 * channels, 3, stride=2, padding=1, weight_bits=weight_bits),
        mnn.LayerBatchNorm(2 * channels),
        mnn.QuantAct(act_bits),
        nn.Flatten(),
        nn.Linear(2 * channels * reduced * reduced, classes),
    )


class SpikingClassifier(nn.Module):
    """Feeds the image as a constant input current for `steps` steps through `network`, a
    time-first nn.Sequential ending in ``SAFReadout``, and returns its per-step logits (T, B, classes).

    `mode` is the SAF neurons' training mode: "saf_e" puts a loss on every step (mean over steps),
    "saf_f" on the last step only (train with ``maqd_kernels.nn.saf_f_last_step(self.network,
    self.encode(images))``, whose memory does not grow with T).
    """

    def __init__(self, network: nn.Sequential, steps: int, mode: str):
        super().__init__()
        self.network, self.steps, self.mode = network, steps, mode

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, features) -> (T, B, features): the same image at every step."""
        return images.unsqueeze(0).expand(self.steps, *images.shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.encode(images))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class scores (B, classes) from per-step logits: the last step's for SAF-F (what it is
        trained on), the mean over steps for SAF-E."""
        return logits[-1] if self.mode == "saf_f" else logits.mean(0)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, mode={self.mode!r}"


def saf_mlp(in_features: int, hidden: int, classes: int, *, mode: str, steps: int) -> SpikingClassifier:
    """A SAF network: input trace, two fused SAFLinear layers (linear + neuron, traces between
    layers; weights at ``SAF_WEIGHT_GAIN`` times torch.nn.Linear's initialisation), and a linear
    readout of the last layer's trace."""
    layers = [
        mnn.SAFLinear(in_features, hidden, decay=DECAY, mode=mode),
        mnn.SAFLinear(hidden, hidden, decay=DECAY, mode=mode),
    ]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(SAF_WEIGHT_GAIN)
    network = nn.Sequential(
        mnn.SpikeTrace(DECAY), *layers, nn.Linear(hidden, classes, bias=False), mnn.SAFReadout(DECAY)
    )
    return SpikingClassifier(network, steps, mode)


def maqd_saf_mlp(
    in_features: int, hidden: int, classes: int, *, weight_bits: int, spike_bits: int, steps: int
) -> SpikingClassifier:
    """SAF-E with MaQD weights: QuantLinear (`weight_bits`) -> LayerBatchNorm over time and batch ->
    SAF neuron with `spike_bits`-bit spikes, twice. At inference each QuantLinear + LBN pair is one
    weight-only low-bit kernel with the LBN affine in its epilogue."""
    network = nn.Sequential(
        mnn.SpikeTrace(DECAY),
        mnn.QuantLinear(in_features, hidden, weight_bits=weight_bits),
        mnn.LayerBatchNorm(hidden, time_first=True),
        mnn.SAFNeuron(DECAY, spike_bits=spike_bits),
        mnn.QuantLinear(hidden, hidden, weight_bits=weight_bits),
        mnn.LayerBatchNorm(hidden, time_first=True),
        mnn.SAFNeuron(DECAY, spike_bits=spike_bits),
        nn.Linear(hidden, classes, bias=False),
        mnn.SAFReadout(DECAY),
    )
    return SpikingClassifier(network, steps, "saf_e")
