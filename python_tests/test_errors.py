"""Bad input raises a TypeError or ValueError naming the argument, before any kernel runs:
dtype, device, shape, bits range, threshold > 0, 0 < decay <= 1 (ARCHITECTURE.md)."""

import pytest
import torch

import maqd_kernels as mk

u = torch.randn(4, 3, 5)
w = torch.randn(6, 5)
packed = mk.pack_weight(w, 4)
meta = torch.device("meta")

BAD_CALLS = [
    # saf family
    ("decay", ValueError, lambda: mk.saf_neuron(u, decay=0.0)),
    ("decay", ValueError, lambda: mk.saf_neuron(u, decay=1.5)),
    ("decay", TypeError, lambda: mk.spike_trace(u, decay="0.5")),
    ("decay", ValueError, lambda: mk.saf_readout(u, decay=-0.1)),
    ("threshold", ValueError, lambda: mk.saf_neuron(u, threshold=0.0)),
    ("threshold", ValueError, lambda: mk.saf_linear(u, w, threshold=-1.0)),
    ("spike_bits", ValueError, lambda: mk.saf_neuron(u, spike_bits=0)),
    ("spike_bits", ValueError, lambda: mk.saf_neuron(u, spike_bits=9)),
    ("spike_bits", TypeError, lambda: mk.saf_neuron(u, spike_bits=2.0)),
    ("mode", ValueError, lambda: mk.saf_neuron(u, mode="ottt")),
    ("surrogate", ValueError, lambda: mk.saf_neuron(u, surrogate="tanh")),
    ("alpha", ValueError, lambda: mk.saf_neuron(u, alpha=0)),
    ("step", ValueError, lambda: mk.saf_neuron(u, step=-1)),
    ("u_hat", TypeError, lambda: mk.saf_neuron(u.to(torch.int32))),
    ("u_hat", TypeError, lambda: mk.saf_neuron(u.numpy())),
    ("u_hat", ValueError, lambda: mk.saf_neuron(torch.tensor(1.0))),
    ("state", ValueError, lambda: mk.saf_neuron(u, state=torch.zeros(3, 4))),
    ("state", ValueError, lambda: mk.saf_neuron(u, state=torch.zeros(3, 5, device=meta))),
    ("weight", ValueError, lambda: mk.saf_linear(u, torch.randn(6, 4))),
    ("weight", TypeError, lambda: mk.saf_linear(u, w.double())),
    ("weight", ValueError, lambda: mk.saf_linear(u, w.to(meta))),
    ("bias", ValueError, lambda: mk.saf_linear(u, w, torch.randn(5))),
    ("backend", ValueError, lambda: mk.saf_neuron(u, backend="cupy")),
    ("backend", ValueError, lambda: mk.saf_neuron(u, backend="cuda")),
    ("current", TypeError, lambda: mk.lif_bptt(u.long())),
    ("s_in", ValueError, lambda: mk.ottt_linear(torch.randn(5), w)),
    # quant family
    ("bits", ValueError, lambda: mk.round_clip(u, 0, 1.0, signed=True)),
    ("bits", ValueError, lambda: mk.quantize(u, 9, 1.0, signed=False)),
    ("bits", ValueError, lambda: mk.pack_weight(w, 16)),
    ("bits", ValueError, lambda: mk.default_scale(0, True)),
    ("signed", TypeError, lambda: mk.round_clip(u, 4, 1.0, signed=1)),
    ("scale", ValueError, lambda: mk.round_clip(u, 4, 0.0, signed=True)),
    ("scale", ValueError, lambda: mk.round_clip(u, 4, torch.ones(2), signed=True)),
    ("scale", ValueError, lambda: mk.quantize(u, 4, torch.ones(5, device=meta), signed=True)),
    ("scale", ValueError, lambda: mk.pack_weight(w, 4, scale=torch.ones(5))),
    ("surrogate", ValueError, lambda: mk.round_clip(u, 4, 1.0, signed=True, surrogate="tanh")),
    ("x", TypeError, lambda: mk.round_clip(u.int(), 4, 1.0, signed=True)),
    ("w", ValueError, lambda: mk.weight_standardize(torch.randn(5))),
    ("w", ValueError, lambda: mk.pack_weight(torch.randn(2, 3, 4), 4)),
    ("eps", ValueError, lambda: mk.weight_standardize(w, eps=0.0)),
    ("w", TypeError, lambda: mk.lowbit_linear(u, w)),
    ("x", ValueError, lambda: mk.lowbit_linear(torch.randn(3, 4), packed)),
    ("x", TypeError, lambda: mk.lowbit_linear(torch.randn(3, 5).int(), packed, act_scale=0.1)),
    ("x", ValueError, lambda: mk.lowbit_linear(torch.randn(3, 5, device=meta), packed)),
    ("act_scale", ValueError, lambda: mk.lowbit_linear(torch.zeros(3, 5, dtype=torch.uint8), packed)),
    ("act_bits", ValueError, lambda: mk.lowbit_linear(torch.randn(3, 5), packed, act_bits=12)),
    ("out_bits", ValueError, lambda: mk.lowbit_linear(torch.randn(3, 5), packed, out_bits=0)),
    ("out_scale", ValueError, lambda: mk.lowbit_linear(torch.randn(3, 5), packed, out_scale=torch.ones(6))),
    (
        "out_scale",
        ValueError,
        lambda: mk.lowbit_linear(torch.randn(3, 5), packed, out_scale=torch.ones(3), out_shift=torch.ones(3)),
    ),
    ("bias", ValueError, lambda: mk.lowbit_linear(torch.randn(3, 5), packed, torch.ones(2))),
    ("weight_bits", ValueError, lambda: mk.quant_linear(u, w, weight_bits=0)),
    ("act_bits", ValueError, lambda: mk.quant_linear(u, w, weight_bits=4, act_bits=9)),
    ("weight_scale", ValueError, lambda: mk.quant_linear(u, w, weight_bits=4, weight_scale=-1.0)),
    ("weight", ValueError, lambda: mk.quant_linear(u, torch.randn(6, 7), weight_bits=4)),
    ("weight", TypeError, lambda: mk.quant_linear(u, w.half(), weight_bits=4)),
    (
        "groups",
        ValueError,
        lambda: mk.quant_conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), groups=2, weight_bits=4),
    ),
    (
        "stride",
        TypeError,
        lambda: mk.quant_conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), stride=1.5, weight_bits=4),
    ),
    # lbn family
    ("groups", ValueError, lambda: mk.layer_batch_norm(u, None, None, None, None, training=True, groups=2)),
    ("weight", ValueError, lambda: mk.layer_batch_norm(u, torch.ones(4), None, None, None, training=True)),
    (
        "running_mean",
        ValueError,
        lambda: mk.layer_batch_norm(u, None, None, torch.zeros(2), torch.ones(2), training=True),
    ),
    ("running_mean", ValueError, lambda: mk.layer_batch_norm(u, None, None, torch.zeros(1), None, training=True)),
    ("running_mean", ValueError, lambda: mk.layer_batch_norm(u, None, None, None, None, training=False)),
    ("momentum", ValueError, lambda: mk.layer_batch_norm(u, None, None, None, None, training=True, momentum=2.0)),
    ("eps", ValueError, lambda: mk.layer_batch_norm(u, None, None, None, None, training=True, eps=0.0)),
    ("training", TypeError, lambda: mk.layer_batch_norm(u, None, None, None, None, training=1)),
    ("x", ValueError, lambda: mk.layer_batch_norm(torch.randn(1, 3), None, None, None, None, training=True, groups=3)),
    ("x", ValueError, lambda: mk.layer_batch_norm(torch.randn(5), None, None, None, None, training=True)),
    ("channels", ValueError, lambda: mk.lbn_inference_affine(None, None, torch.zeros(1), torch.ones(1))),
    (
        "running_var",
        ValueError,
        lambda: mk.lbn_inference_affine(torch.ones(4), None, torch.zeros(2), torch.ones(3), groups=2),
    ),
    ("a", ValueError, lambda: mk.fold_affine(w, None, torch.ones(5), torch.zeros(6))),
    ("bias", ValueError, lambda: mk.fold_affine(w, torch.ones(6, device=meta), torch.ones(6), torch.zeros(6))),
]


@pytest.mark.parametrize("name,error,call", BAD_CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_CALLS)])
def test_bad_input_names_the_argument(name, error, call):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


def test_environment_backend_override_is_checked(monkeypatch):
    monkeypatch.setenv("MAQD_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MAQD_BACKEND"):
        mk.saf_neuron(u)
    monkeypatch.setenv("MAQD_BACKEND", "reference")
    assert torch.equal(mk.saf_neuron(u), mk.saf_neuron(u, backend="reference"))


def test_float64_is_refused_by_kernel_backends():
    with pytest.raises(TypeError, match="float64"):
        from maqd_kernels import _backend

        if _backend.triton_module() is None:
            pytest.skip("needs triton")
        mk.saf_neuron(u.double(), backend="triton")


def test_empty_inputs_work():
    """Empty batches and sequences pass through every op and its backward, changing no statistics."""
    empty = torch.empty(0, 3, 5, requires_grad=True)
    for out in (mk.saf_neuron(empty), mk.spike_trace(empty), mk.saf_readout(empty), mk.lif_bptt(empty)):
        assert out.shape == (0, 3, 5)
        out.sum().backward()
    assert mk.saf_linear(torch.empty(3, 0, 5), w, torch.randn(6)).shape == (3, 0, 6)
    assert mk.round_clip(torch.empty(0), 4, 1.0, signed=True).shape == (0,)
    assert mk.lowbit_linear(torch.empty(0, 5), packed, act_bits=4, out_bits=4).shape == (0, 6)
    assert mk.quant_conv2d(torch.empty(0, 3, 5, 5), torch.randn(4, 3, 3, 3), weight_bits=2).shape == (0, 4, 3, 3)
    running_mean, running_var = torch.zeros(1), torch.ones(1)
    y = mk.layer_batch_norm(empty, None, None, running_mean, running_var, training=True)
    y.sum().backward()
    assert y.shape == (0, 3, 5) and running_mean.item() == 0.0 and running_var.item() == 1.0
