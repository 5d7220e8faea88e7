"""The synaptic penalty and the energy report (maqd_kernels/energy.py; SPEC.md section 4): fan-outs
against a brute-force count, synaptic operations against spikes recovered from the traces, the
penalty's gradient against the surrogate written by hand, inside the one backward kernel call per
layer, on every backend."""

import copy
import csv
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import maqd_kernels as mk
from maqd_kernels import nn as mnn
from maqd_kernels.energy import ENERGY_PER_AC, ENERGY_PER_MAC, _synapses

from helpers import HAS_GPU, example_modules, op_backends, run_example

DECAY = 0.5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device"))]


def _spikes_of(trace: torch.Tensor) -> torch.Tensor:
    """s[t] = a_hat[t] - lambda a_hat[t-1]: the spikes (their levels, for multi-bit spikes) behind a SAF trace."""
    previous = torch.cat([torch.zeros_like(trace[:1]), trace[:-1]])
    return (trace.double() - DECAY * previous.double()).round()


def _mlp(backend=None, hidden=24, spike_bits=1) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        mnn.SpikeTrace(DECAY),
        mnn.SAFLinear(20, hidden, decay=DECAY, spike_bits=spike_bits, backend=backend),
        mnn.SAFLinear(hidden, hidden, decay=DECAY, spike_bits=spike_bits, backend=backend),
        nn.Linear(hidden, 7, bias=False),
        mnn.SAFReadout(DECAY),
    )
    with torch.no_grad():
        for layer in net[1:3]:
            layer.weight.mul_(3.0)  # so that a good share of the neurons fire
    return net


def _conv_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        mnn.SpikeTrace(DECAY),
        mnn.SAFConv2d(2, 5, 3, stride=2, padding=1, decay=DECAY),
        mnn.SAFConv2d(5, 4, 3, padding=1, decay=DECAY),
        nn.Flatten(2),
        nn.Linear(4 * 4 * 4, 3),
    )


# ----------------------------------------------------------------------------- fan-out


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0)),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
        mnn.SAFConv2d(3, 5, 5, stride=3, padding=2),
        mnn.QuantConv2d(3, 2, 3, stride=2, padding=1, weight_bits=4),
    ],
)
@pytest.mark.parametrize("size", [(7, 7), (8, 5)])
def test_conv_synapses_equal_a_brute_force_count(conv, size):
    """A convolution's synapses are the kernel taps of each output that land inside the input:
    convolving an all-ones input with all-ones weights counts them."""
    synapses = _synapses(conv)
    kernel = torch.ones(synapses.out_features, synapses.in_features // synapses.groups, *synapses.kernel)
    inputs = torch.ones(1, synapses.in_features, *size)
    expected = F.conv2d(inputs, kernel, None, synapses.stride, synapses.padding, synapses.dilation, synapses.groups)
    assert synapses.count((synapses.in_features, *size)) == int(expected.sum())


@pytest.mark.parametrize("layer", [nn.Linear(9, 4), mnn.QuantLinear(9, 4, weight_bits=2), mnn.SAFLinear(9, 4)])
def test_linear_fan_out_is_out_features(layer):
    assert _synapses(layer).count((9,)) / 9 == 4


def test_layers_without_synapses_are_not_counted():
    assert _synapses(mnn.LayerBatchNorm(4)) is None and _synapses(nn.Flatten()) is None


# ----------------------------------------------------------------------------- synaptic operations


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("spike_bits", [1, 2])
def test_synaptic_operations_are_spikes_times_fan_out(backend, device, spike_bits):
    net = _mlp(backend, spike_bits=spike_bits).to(device)
    traces = {}
    for index in (1, 2):
        net[index].register_forward_hook(lambda m, args, out, i=index: traces.__setitem__(i, out))
    x = torch.rand(5, 3, 20, device=device)
    net(x)
    operations = mk.synaptic_operations(net)
    assert list(operations) == ["1", "2"]
    for index, fan_out in ((1, 24), (2, 7)):
        spikes = _spikes_of(traces[index]).sum()
        assert spikes > 0
        torch.testing.assert_close(operations[str(index)].double().cpu(), (spikes * fan_out).cpu(), rtol=1e-6, atol=0)


def test_conv_network_operations_use_the_readers_geometry():
    net = _conv_net()
    traces = {}
    for index in (1, 2):
        net[index].register_forward_hook(lambda m, args, out, i=index: traces.__setitem__(i, out))
    net(torch.rand(3, 2, 2, 8, 8))
    operations = mk.synaptic_operations(net)
    # Layer 1's spikes (5, 4, 4) feed a 3x3 padded conv to 4 channels; layer 2's (4, 4, 4) a Linear to 3.
    taps = F.conv2d(torch.ones(1, 5, 4, 4), torch.ones(4, 5, 3, 3), padding=1).sum() / (5 * 4 * 4)
    torch.testing.assert_close(operations["1"].double(), _spikes_of(traces[1]).sum() * taps.double())
    torch.testing.assert_close(operations["2"].double(), _spikes_of(traces[2]).sum() * 3)


def test_a_layer_whose_spikes_nobody_reads_costs_nothing():
    net = nn.Sequential(mnn.SpikeTrace(DECAY), nn.Linear(6, 8), mnn.SAFNeuron(DECAY))
    net(torch.rand(4, 2, 6) * 4)
    assert net[2].spike_record.count > 0
    assert mk.synaptic_operations(net)["2"] == 0


# ----------------------------------------------------------------------------- the penalty


class _BackwardCalls(TorchDispatchMode):
    """Records every SAF backward op call and its grad_count argument."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "maqd" and "backward" in func.__name__:
            self.calls.append((func.__name__.split(".")[0], float(args[1]) if "saf" in func.__name__ else None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,device", op_backends())
def test_penalty_reaches_each_layers_backward_kernel_as_its_count_gradient(backend, device):
    """The penalty adds no backward op: each SAF layer's one backward call receives
    weight * f_l / B as the spike count's gradient, which the kernel adds to every spike's."""
    net = _mlp(backend).to(device)
    x = torch.rand(4, 3, 20, device=device)
    weight = 0.01

    def backward_calls(penalized: bool):
        net.zero_grad()
        out = net(x)
        loss = out.square().mean() + (mk.synaptic_penalty(net, weight) if penalized else 0)
        with _BackwardCalls() as recorder:
            loss.backward()
        return recorder.calls

    plain, penalized = backward_calls(False), backward_calls(True)
    assert [name for name, _ in plain] == [name for name, _ in penalized]
    saf = [count for name, count in penalized if name.startswith("saf_linear")]
    assert [count for name, count in plain if name.startswith("saf_linear")] == [0.0, 0.0]
    # Layers run backward from the last: layer 2 (fan-out 7), then layer 1 (fan-out 24); batch 3.
    assert saf == pytest.approx([weight * 7 / 3, weight * 24 / 3], rel=1e-6)


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("surrogate", ["sigmoid", "s2nn", "rectangle"])
def test_penalty_gradient_is_lambda_fan_out_times_the_surrogate(backend, device, surrogate):
    """dOmega/dU_hat[t] = weight * f / B * sigma'(U_hat[t] - V (lambda a_hat[t-1] + 1)), written by hand."""
    torch.manual_seed(2)
    net = nn.Sequential(
        mnn.SAFNeuron(DECAY, surrogate=surrogate, alpha=2.0, backend=backend), nn.Linear(11, 5, bias=False)
    ).to(device)
    u_hat = (torch.randn(6, 4, 11, device=device) + 1.0).requires_grad_()
    trace = net[0](u_hat)
    penalty = mk.synaptic_penalty(net, 0.3)
    (grad,) = torch.autograd.grad(penalty, u_hat)

    u, a = u_hat.detach().double().cpu(), trace.detach().double().cpu()
    previous = torch.cat([torch.zeros_like(a[:1]), a[:-1]])
    x = u - (DECAY * previous + 1.0)
    if surrogate == "sigmoid":
        derivative = 2.0 * torch.sigmoid(2.0 * x) * (1 - torch.sigmoid(2.0 * x))
    elif surrogate == "s2nn":
        derivative = torch.where(x < 0, 2.0 * torch.sigmoid(2.0 * x) * (1 - torch.sigmoid(2.0 * x)), 1 / (x + 1))
    else:
        derivative = 2.0 * (x.abs() < 0.25).double()
    torch.testing.assert_close(grad.double().cpu(), 0.3 * 5 / 4 * derivative, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(penalty.double().cpu(), 0.3 * 5 / 4 * _spikes_of(trace.detach().cpu()).sum())


def test_penalty_per_sample_and_sum():
    net = _mlp()
    net(torch.rand(4, 3, 20))
    total = sum(mk.synaptic_operations(net).values())
    torch.testing.assert_close(mk.synaptic_penalty(net, 2.0, per_sample=False), 2.0 * total)
    torch.testing.assert_close(mk.synaptic_penalty(net, 2.0), 2.0 * total / 3)


def test_training_with_the_penalty_fires_less():
    """The same network, data and steps: a strong penalty leaves far fewer spikes."""
    torch.manual_seed(3)
    x, y = torch.rand(64, 20), torch.randint(0, 7, (64,))

    def spikes_after_training(weight: float) -> float:
        net = _mlp()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(30):
            logits = net(x.expand(4, *x.shape))
            loss = F.cross_entropy(logits.mean(0), y) + mk.synaptic_penalty(net, weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            net(x.expand(4, *x.shape))
        return float(net[1].spike_record.count + net[2].spike_record.count)

    assert spikes_after_training(1e-3) < 0.5 * spikes_after_training(0.0)


def test_compiled_loss_with_the_penalty_equals_eager():
    def loss_of(net, x):
        return net(x).square().mean() + mk.synaptic_penalty(net, 0.05)

    eager, compiled = _mlp(), _mlp()
    x = torch.rand(4, 3, 20)
    expected = loss_of(eager, x)
    expected.backward()
    torch._dynamo.reset()
    actual = torch.compile(loss_of, fullgraph=True)(compiled, x)
    actual.backward()
    torch.testing.assert_close(actual, expected)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_penalty_errors():
    net = _mlp()
    with pytest.raises(ValueError, match="call the model first"):
        mk.synaptic_penalty(net, 1.0)
    net(torch.rand(2, 2, 20))
    for weight in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="weight"):
            mk.synaptic_penalty(net, weight)


def test_a_model_holding_a_training_graph_can_be_copied_saved_and_converted(tmp_path):
    net = _mlp()
    net(torch.rand(3, 2, 20)).sum().backward()
    assert net[1].spike_record.count.requires_grad
    copied = copy.deepcopy(net)
    assert copied[1].spike_record.count is None
    assert pickle.loads(pickle.dumps(net))[2].spike_record.count is None
    assert not any("spike" in key for key in net.state_dict())
    torch.save(net.state_dict(), tmp_path / "net.pt")
    mk.convert_for_inference(net)


# ----------------------------------------------------------------------------- energy report


@pytest.mark.parametrize("device", DEVICES)
def test_energy_report_counts_dense_macs_and_spike_driven_accumulates(device):
    net = _mlp().to(device)
    net.train()
    x = torch.rand(4, 3, 20, device=device)
    traces = {}
    for index in (1, 2):
        net[index].register_forward_hook(lambda m, args, out, i=index: traces.__setitem__(i, out))
    report = mk.energy_report(net, x, energy_per_ac=1e-12, energy_per_mac=5e-12)
    assert net.training and not net[1].spike_record.count.requires_grad

    assert [(layer.name, layer.kind, layer.inputs_from) for layer in report.layers] == [
        ("1", "MAC", ()),
        ("2", "AC", ("1",)),
        ("3", "AC", ("2",)),
    ]
    dense, second, readout = report.layers
    assert dense.operations == 4 * 3 * 20 * 24 and dense.joules == pytest.approx(dense.operations * 5e-12)
    for layer, index, fan_out in ((second, 1, 24), (readout, 2, 7)):
        spikes = float(_spikes_of(traces[index]).sum())
        assert layer.spikes == pytest.approx(spikes) and layer.fan_out == fan_out
        assert layer.operations == pytest.approx(spikes * fan_out)
        assert layer.joules == pytest.approx(spikes * fan_out * 1e-12)
    assert report.samples == 3
    assert report.synaptic_operations == pytest.approx(second.operations + readout.operations)
    assert report.joules_per_sample == pytest.approx((dense.joules + second.joules + readout.joules) / 3)
    text = str(report)
    assert text.splitlines()[-1].startswith("total") and "dense input" in text


def test_energy_report_of_a_conv_network_and_its_default_energies():
    net = _conv_net()
    x = torch.rand(2, 3, 2, 8, 8)
    report = mk.energy_report(net, x)
    dense = report.layers[0]
    taps = F.conv2d(torch.ones(1, 2, 8, 8), torch.ones(5, 2, 3, 3), stride=2, padding=1).sum()
    assert dense.kind == "MAC" and dense.operations == 2 * 3 * taps
    assert dense.joules == pytest.approx(dense.operations * ENERGY_PER_MAC)
    assert all(layer.joules == pytest.approx(layer.operations * ENERGY_PER_AC) for layer in report.layers[1:])


def test_energy_report_leaves_running_statistics_alone():
    models, _ = example_modules()
    model = models.maqd_saf_mlp(16, 12, 4, weight_bits=4, spike_bits=2, steps=3)
    norm = model.network[2]
    before = norm.running_mean.clone()
    report = mk.energy_report(model, torch.rand(5, 16))
    torch.testing.assert_close(norm.running_mean, before)
    assert [layer.kind for layer in report.layers] == ["MAC", "AC", "AC"]
    assert report.samples == 5


def test_energy_report_errors():
    with pytest.raises(ValueError, match="energy_per_ac"):
        mk.energy_report(_mlp(), torch.rand(2, 2, 20), energy_per_ac=-1.0)


def test_s2nn_layers_count_as_spiking_layers():
    """S2NN neurons record their single step's spikes: the report and the penalty see them."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(12, 16), mnn.S2NNNeuron(0.2), mnn.S2NNLinear(16, 9, threshold=0.2), nn.Linear(9, 3))
    spikes = {}
    for index in (1, 2):
        net[index].register_forward_hook(lambda m, args, out, i=index: spikes.__setitem__(i, out.sum().item()))
    x = torch.randn(5, 12)
    report = mk.energy_report(net, x)
    assert [(layer.name, layer.kind, layer.inputs_from) for layer in report.layers] == [
        ("0", "MAC", ()),
        ("2", "AC", ("1",)),
        ("3", "AC", ("2",)),
    ]
    assert report.samples == 5 and report.layers[0].operations == 5 * 12 * 16
    assert spikes[1] > 0 and spikes[2] > 0
    assert report.layers[1].operations == pytest.approx(spikes[1] * 9)
    assert report.layers[2].operations == pytest.approx(spikes[2] * 3)

    net(x)  # with autograd: the penalty of this forward
    penalty = mk.synaptic_penalty(net, 0.1)
    torch.testing.assert_close(penalty, torch.tensor(0.1 * (spikes[1] * 9 + spikes[2] * 3) / 5))
    penalty.backward()
    assert net[0].weight.grad.abs().sum() > 0 and net[2].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the example


def test_energy_example_smoke_run(tmp_path):
    result = run_example("energy.py", "--smoke", "--weights", "0,1e-4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(tmp_path / "energy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["lambda"]) for r in rows] == [(d, w) for d in ("digits", "mnist") for w in ("0", "0.0001")]
    for unpenalized, penalized in zip(rows[::2], rows[1::2]):
        assert float(penalized["synaptic ops/sample"]) < float(unpenalized["synaptic ops/sample"])
    assert (tmp_path / "energy.png").stat().st_size > 0 and "energy.png" in (tmp_path / "energy.md").read_text()
