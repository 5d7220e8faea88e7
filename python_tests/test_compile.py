"""torch.compile(fullgraph=True) over small SAF and MaQD networks: no graph break, and the same
outputs and gradients as eager."""

import copy

import pytest
import torch
import torch.nn.functional as F

import maqd_kernels as mk
from maqd_kernels import nn as mnn

pytestmark = pytest.mark.slow


class SmallSAFNetwork(torch.nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.encode = mnn.SpikeTrace(decay=0.5)
        self.conv = mnn.SAFConv2d(2, 4, 3, padding=1, mode=mode)
        self.hidden = mnn.SAFLinear(4 * 6 * 6, 16, mode=mode, spike_bits=2)
        self.out = torch.nn.Linear(16, 3)
        self.readout = mnn.SAFReadout(decay=0.5)

    def forward(self, images):  # (T, B, 2, 6, 6)
        a = self.conv(self.encode(images))
        a = self.hidden(a.flatten(2))
        u = F.linear(a, self.out.weight) + self.out.bias * mk.saf_bias_factors(a, decay=0.5).view(-1, 1, 1)
        return self.readout(u)


class SmallMaQDNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = mnn.QuantConv2d(3, 6, 3, padding=1, weight_bits=4)
        self.norm1 = mnn.LayerBatchNorm(6)
        self.act1 = mnn.QuantAct(4, learn_scale=True)
        self.fc = mnn.QuantLinear(6 * 5 * 5, 10, weight_bits=2)
        self.norm2 = mnn.LayerBatchNorm(10, groups=2)
        self.act2 = mnn.QuantAct(2, surrogate="sigmoid")
        self.head = torch.nn.Linear(10, 4)

    def forward(self, x):
        x = self.act1(self.norm1(self.conv(x)))
        x = self.act2(self.norm2(self.fc(x.flatten(1))))
        return self.head(x)


class SmallPSPNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.norm1 = mnn.PSPNorm(6, groups=2)
        self.fc = torch.nn.Linear(6 * 5 * 5, 10)
        self.norm2 = mnn.PSPNorm(10, groups=10)
        self.head = torch.nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv(x)))
        return self.head(torch.relu(self.norm2(self.fc(x.flatten(1)))))


def _compare_eager_and_compiled(make_model, inputs, backend) -> torch.nn.Module:
    """Runs a training step of `make_model()` eagerly and compiled; returns the eager model."""
    torch.manual_seed(1)
    eager = make_model()
    compiled_model = make_model()
    compiled_model.load_state_dict(eager.state_dict())
    explanation = torch._dynamo.explain(copy.deepcopy(compiled_model))(inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    out_eager, out_compiled = eager(inputs), compiled(inputs)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b_eager), b_compiled in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_compiled, b_eager, rtol=1e-6, atol=1e-6, msg=name)
    return eager


@pytest.mark.parametrize("mode", ["saf_e", "saf_f"])
def test_compile_saf_network(mode):
    images = torch.rand(4, 3, 2, 6, 6)
    _compare_eager_and_compiled(lambda: SmallSAFNetwork(mode), images, "inductor" if mode == "saf_e" else "aot_eager")


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_maqd_network(backend):
    _compare_eager_and_compiled(SmallMaQDNetwork, torch.randn(5, 3, 5, 5), backend)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_psp_network(backend):
    eager = _compare_eager_and_compiled(SmallPSPNetwork, torch.randn(5, 3, 5, 5), backend)
    for norm in (eager.norm1, eager.norm2):  # the compiled step's moments were compared with these
        assert not torch.equal(norm.running_moment, torch.ones_like(norm.running_moment))


def test_compile_low_bit_inference_chain():
    """Packed weights and integer codes flow through a compiled inference function."""
    packed1 = mk.pack_weight(torch.randn(8, 12), 4)
    packed2 = mk.pack_weight(torch.randn(5, 8), 2)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)

    def infer(x):
        codes = mk.lowbit_linear(x, packed1, act_bits=4, out_scale=scale, out_shift=shift, out_bits=4)
        return mk.lowbit_linear(codes, packed2, act_scale=mk.default_scale(4, False))

    x = torch.rand(3, 12) * 2
    compiled = torch.compile(infer, fullgraph=True)
    assert torch.equal(compiled(x), infer(x))


def test_compile_converted_model():
    """A converted MaQD conv net (im2col of codes, fused layers, Quantize/Dequantize) compiles whole."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        mnn.QuantAct(4),
        mnn.QuantConv2d(3, 6, 3, padding=1, weight_bits=4),
        mnn.LayerBatchNorm(6),
        mnn.QuantAct(4),
        torch.nn.Flatten(),
        mnn.QuantLinear(6 * 5 * 5, 10, weight_bits=2),
        mnn.LayerBatchNorm(10, groups=2),
        mnn.QuantAct(2),
        torch.nn.Linear(10, 4),
    )
    for _ in range(3):
        model(torch.randn(8, 3, 5, 5))
    converted = mk.convert_for_inference(model)
    x = torch.randn(5, 3, 5, 5)
    explanation = torch._dynamo.explain(converted)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    assert torch.equal(torch.compile(converted, fullgraph=True)(x), converted(x))
