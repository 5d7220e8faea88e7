"""The modules of maqd_kernels.nn: each equals its functional op, trains, and round-trips its
state_dict."""

import io

import torch
import torch.nn.functional as F

import maqd_kernels as mk
from maqd_kernels import nn as mnn

import derivations


def _round_trip(module: torch.nn.Module, fresh: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    return fresh


def test_saf_linear_module_equals_op_and_trains():
    layer = mnn.SAFLinear(6, 4, mode="saf_f", spike_bits=2, decay=0.6)
    a_in = torch.rand(5, 3, 6) * 2
    out = layer(a_in)
    assert torch.equal(out, mk.saf_linear(a_in, layer.weight, layer.bias, mode="saf_f", spike_bits=2, decay=0.6))
    out.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    restored = _round_trip(layer, mnn.SAFLinear(6, 4, mode="saf_f", spike_bits=2, decay=0.6))
    assert torch.equal(restored(a_in), out.detach())
    assert "spike_bits=2" in repr(layer)


def test_saf_conv2d_is_conv_plus_bias_factor_plus_neuron():
    layer = mnn.SAFConv2d(2, 3, 3, stride=1, padding=1, decay=0.7)
    a_in = torch.rand(4, 2, 2, 5, 5)
    u = F.conv2d(a_in.flatten(0, 1), layer.weight, None, 1, 1).unflatten(0, (4, 2))
    factors = torch.tensor(derivations.bias_factors_f32(0.7, 0, 4)).view(-1, 1, 1, 1, 1)
    u = u + layer.bias.view(-1, 1, 1) * factors
    torch.testing.assert_close(layer(a_in), mk.saf_neuron(u, decay=0.7), rtol=0, atol=0)


def test_spike_trace_neuron_readout_modules():
    x = (torch.rand(5, 2, 3) < 0.5).float()
    assert torch.equal(mnn.SpikeTrace(0.25)(x), mk.spike_trace(x, decay=0.25))
    assert torch.equal(mnn.SAFNeuron(surrogate="s2nn")(x * 3), mk.saf_neuron(x * 3))
    assert torch.equal(mnn.SAFReadout(0.25)(x), mk.saf_readout(x, decay=0.25))


def test_quant_modules_equal_ops_and_learn_the_activation_scale():
    fc = mnn.QuantLinear(7, 5, weight_bits=3)
    x = torch.randn(4, 7)
    assert torch.equal(fc(x), mk.quant_linear(x, fc.weight, fc.bias, weight_bits=3))
    conv = mnn.QuantConv2d(3, 4, 3, padding=1, bias=False, weight_bits=2)
    images = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(images), mk.quant_conv2d(images, conv.weight, None, 1, 1, weight_bits=2))
    act = mnn.QuantAct(3, learn_scale=True)
    out = act(x)
    assert torch.equal(out, mk.round_clip(x, 3, act.scale.detach(), signed=False))
    out.sum().backward()
    assert act.scale.grad is not None and act.scale.grad.abs() > 0
    restored = _round_trip(act, mnn.QuantAct(3, learn_scale=True))
    assert torch.equal(restored.scale, act.scale)


def test_layer_batch_norm_module_at_batch_size_one():
    """LBN (groups=1) normalizes a single sample, where BatchNorm cannot."""
    lbn = mnn.LayerBatchNorm(4)
    y = lbn(torch.randn(1, 4, 3, 3) * 5 + 2)
    torch.testing.assert_close(y.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    restored = _round_trip(lbn, mnn.LayerBatchNorm(4))
    assert torch.equal(restored.running_mean, lbn.running_mean)
