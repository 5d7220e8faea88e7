"""The single-step spiking network's modules (S2NN, Suetake et al., arXiv 2201.10879): S2NNNeuron
fires exactly H(x - V) and its gradient is the s2nn surrogate of SPEC.md section 1, on every
backend and kernel that runs here (one step of the SAF kernels); S2NNLinear is Linear + S2NNNeuron;
both compile, convert and refuse bad input; examples/s2nn.py runs."""

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maqd_kernels as mk
from maqd_kernels import _backend
from maqd_kernels import nn as mnn
from maqd_kernels.bench.validation import launcher

from helpers import KERNEL_DTYPES, kernel_or_skip, kernel_targets, op_backends, run_example

THRESHOLD = 0.85
# The s2nn surrogate is continuous at x = 0 only for alpha = 4: another alpha also tests that each
# side of the threshold takes its own branch.
ALPHA = 2.5
SHAPES = [(3, 37), (129,), (2, 5, 7)]
# Results computed in float32 and rounded to the storage dtype: one rounding step apart at most.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _inputs(shape, dtype=torch.float32, device="cpu", contiguous=True):
    """Random pre-activations around the threshold, some firing and some not; non-contiguous on
    request (every other column of a twice-as-wide tensor)."""
    if contiguous:
        x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.6
    else:
        x = (torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64) * 1.5 + 0.6)[..., ::2]
    return x.to(dtype).to(device)


def _difference(x):
    """x - V as the kernels compute it: in float32 (float64 for float64 x), then widened."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(compute) - torch.tensor(THRESHOLD, dtype=compute)).double()


def _s2nn_surrogate(x, alpha):
    """The s2nn surrogate derivative written out from SPEC.md, in float64: alpha g (1 - g) with
    g = sigmoid(alpha x) below the threshold, 1 / (x + 1) at and above it."""
    d = _difference(x).cpu()
    g = 1.0 / (1.0 + torch.exp(-alpha * d))
    below = alpha * g * (1.0 - g)
    above = 1.0 / (d.clamp(min=0.0) + 1.0)
    return torch.where(d < 0, below, above)


def _heaviside(x):
    return (_difference(x) >= 0).to(x.dtype)


# ----------------------------------------------------------------------------- S2NNNeuron


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_neuron_spikes_are_heaviside_and_gradient_is_the_s2nn_surrogate(backend, device, dtype, shape, contiguous):
    neuron = mnn.S2NNNeuron(THRESHOLD, ALPHA, backend=backend)
    x = _inputs(shape, dtype, device, contiguous).requires_grad_(True)
    spikes, count = neuron(x, return_spike_count=True)
    expected = _heaviside(x.detach())
    assert spikes.dtype == dtype and spikes.shape == x.shape and spikes.device == x.device
    assert torch.equal(spikes, expected)
    assert 0 < count.item() < x.numel() and count.item() == expected.sum().item()

    upstream = torch.randn(shape, device=device).to(dtype)
    ((spikes * upstream).sum() + 0.3 * count).backward()
    want = (upstream.double().cpu() + 0.3) * _s2nn_surrogate(x.detach(), ALPHA)
    tol = TOLERANCE[dtype]
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.cpu().double(), want.to(dtype).double(), rtol=tol, atol=tol)


def test_neuron_in_float64_on_the_reference():
    x = _inputs((4, 33), torch.float64).requires_grad_(True)
    spikes = mnn.S2NNNeuron(THRESHOLD, ALPHA)(x)
    assert torch.equal(spikes, _heaviside(x.detach()))
    upstream = torch.randn(4, 33, dtype=torch.float64)
    (spikes * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream * _s2nn_surrogate(x.detach(), ALPHA), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu"), *kernel_targets()])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_one_step_of_every_saf_kernel_is_the_s2nn_neuron(backend, device, dtype):
    """The kernels themselves (the CUDA ones through their host entry points on the CPU) at T = 1
    with no state: what S2NNNeuron runs on."""
    backward = kernel_or_skip("saf_neuron_backward", backend)
    x = _inputs((5, 67), dtype, device)
    spikes, count, _ = launcher("saf_neuron_forward", backend)(x.unsqueeze(0), None, 1.0, THRESHOLD, 1, 0, False)
    assert torch.equal(spikes[0].cpu(), _heaviside(x.cpu()))
    assert count.item() == _heaviside(x).sum().item()
    upstream = torch.randn(5, 67, device=device).to(dtype)
    args = (None, None, 1.0, THRESHOLD, "saf_e", "s2nn", ALPHA, 1)
    grad = backward(upstream.unsqueeze(0), torch.tensor(0.0, device=device), x.unsqueeze(0), *args)
    want = upstream.double().cpu() * _s2nn_surrogate(x, ALPHA)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(grad[0].cpu().double(), want.to(dtype).double(), rtol=tol, atol=tol)


def test_other_surrogates_for_comparison():
    """surrogate="sigmoid" (the multi-step SNN's) and "rectangle" (a clipped straight-through
    estimator) change the gradient only, not the spikes."""
    x = _inputs((6, 21)).requires_grad_(True)
    d = _difference(x.detach())
    g = torch.sigmoid(4.0 * d)
    derivatives = {"sigmoid": 4.0 * g * (1 - g), "rectangle": 0.5 * (d.abs() < 1.0).double()}
    for surrogate, derivative in derivatives.items():
        x.grad = None
        alpha = 4.0 if surrogate == "sigmoid" else 0.5
        spikes = mnn.S2NNNeuron(THRESHOLD, alpha, surrogate=surrogate)(x)
        assert torch.equal(spikes, _heaviside(x.detach()))
        spikes.sum().backward()
        torch.testing.assert_close(x.grad.double(), derivative, rtol=2e-6, atol=2e-6, msg=surrogate)


def test_empty_input():
    assert mnn.S2NNNeuron()(torch.empty(0, 5)).shape == (0, 5)
    assert mnn.S2NNLinear(4, 3)(torch.empty(0, 4)).shape == (0, 3)


# ----------------------------------------------------------------------------- S2NNLinear


def test_linear_is_initialised_as_torch_linear():
    torch.manual_seed(3)
    linear = nn.Linear(7, 5)
    torch.manual_seed(3)
    s2nn = mnn.S2NNLinear(7, 5)
    assert torch.equal(s2nn.weight, linear.weight) and torch.equal(s2nn.bias, linear.bias)
    assert mnn.S2NNLinear(7, 5, bias=False).bias is None
    assert set(s2nn.state_dict()) == {"weight", "bias"}


def _linear_backends():
    return [p for p in op_backends() if p.values[0] in _backend.implemented_backends("saf_linear_forward")]


@pytest.mark.parametrize("backend,device", _linear_backends())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_linear_then_neuron(backend, device, dtype, bias):
    """S2NNLinear(x) = S2NNNeuron(x W^T + b), the pre-activation in float32 (the fused kernel never
    rounds it to the storage dtype), spikes exact away from threshold ties, gradients to the
    dtype's rounding."""
    torch.manual_seed(1)
    fused = mnn.S2NNLinear(37, 19, bias=bias, threshold=THRESHOLD, alpha=ALPHA, backend=backend)
    with torch.no_grad():
        fused.weight.mul_(4.0)
    fused = fused.to(device=device, dtype=dtype)
    x = torch.rand(2, 3, 37, device=device).to(dtype).transpose(0, 1)  # (3, 2, 37), strided
    params = [p.detach().float().requires_grad_(True) for p in (x, fused.weight)]
    if bias:
        params.append(fused.bias.detach().float().requires_grad_(True))
    pre_activation = F.linear(*params)
    expected = mnn.S2NNNeuron(THRESHOLD, ALPHA)(pre_activation)

    x = x.detach().requires_grad_(True)
    spikes = fused(x)
    near = (pre_activation.detach() - THRESHOLD).abs() < 1e-5
    assert not near.any(), "a tie could flip a spike; pick other inputs"
    assert spikes.dtype == dtype and torch.equal(spikes.float(), expected.detach())
    assert 0 < spikes.sum() < spikes.numel()

    upstream = torch.randn(spikes.shape, device=device)
    (spikes.float() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    got = [x.grad, fused.weight.grad] + ([fused.bias.grad] if bias else [])
    # dL/dU is rounded to the storage dtype before the gradient matmuls.
    tol = 1e-5 if dtype == torch.float32 else 4 * TOLERANCE[dtype]
    for name, g, want in zip(("x", "weight", "bias"), got, (p.grad for p in params)):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)


def test_linear_spike_count_is_the_number_of_spikes():
    layer = mnn.S2NNLinear(9, 13, threshold=0.2)
    spikes, count = layer(torch.rand(4, 9), return_spike_count=True)
    assert count.item() == spikes.sum().item() > 0


# ----------------------------------------------------------------------------- compile, convert, errors


class SmallS2NN(nn.Module):
    """S2NNLinear, then Linear -> LayerBatchNorm -> S2NNNeuron, and a classifier; the spikes'
    count joins the loss as a synaptic penalty would."""

    def __init__(self):
        super().__init__()
        self.fused = mnn.S2NNLinear(12, 16, threshold=0.3)
        self.linear = nn.Linear(16, 8)
        self.norm = mnn.LayerBatchNorm(8)
        self.neuron = mnn.S2NNNeuron(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        hidden, first = self.fused(x, return_spike_count=True)
        hidden, second = self.neuron(self.norm(self.linear(hidden)), return_spike_count=True)
        return self.head(hidden), first + second


def _training_loss(model, x, labels):
    logits, spikes = model(x)
    return F.cross_entropy(logits, labels) + 1e-3 * spikes


@pytest.mark.slow
def test_training_step_compiles_without_graph_breaks():
    torch.manual_seed(2)
    eager = SmallS2NN()
    compiled_model = SmallS2NN()
    compiled_model.load_state_dict(eager.state_dict())
    x, labels = torch.rand(10, 12), torch.randint(0, 3, (10,))
    explanation = torch._dynamo.explain(_training_loss)(compiled_model, x, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled_loss = torch.compile(_training_loss, fullgraph=True, backend="aot_eager")
    loss_eager = _training_loss(eager, x, labels)
    loss_compiled = compiled_loss(compiled_model, x, labels)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    loss_eager.backward()
    loss_compiled.backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        assert p_eager.grad.abs().sum() > 0, name
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_convert_for_inference_folds_the_lbn_before_an_s2nn_neuron():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(20, 32),
        mnn.LayerBatchNorm(32),
        mnn.S2NNNeuron(),
        nn.Linear(32, 16),
        mnn.LayerBatchNorm(16),
        mnn.S2NNNeuron(0.7),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-0.5, 0.5)
    for _ in range(4):  # running statistics away from their initial values
        model(torch.rand(16, 20) * 3)
    model.eval()
    converted = mk.convert_for_inference(model)
    assert isinstance(converted[1], nn.Identity) and isinstance(converted[4], nn.Identity)
    assert isinstance(converted[2], mnn.S2NNNeuron) and converted[5].threshold == 0.7

    x = torch.rand(64, 20) * 3
    with torch.no_grad():
        hidden = model[1](model[0](x))
        spikes = model[2](hidden)
        out, out_converted = model(x), converted(x)
    assert not ((hidden - 1.0).abs() < 1e-5).any(), "a tie could flip a spike; pick other inputs"
    assert 0 < spikes.mean() < 1
    torch.testing.assert_close(out_converted, out, rtol=1e-5, atol=1e-5)


x_bad = torch.randn(4, 5)
BAD = [
    ("threshold", ValueError, lambda: mnn.S2NNNeuron(threshold=0.0)),
    ("threshold", ValueError, lambda: mnn.S2NNLinear(5, 3, threshold=-1.0)),
    ("threshold", TypeError, lambda: mnn.S2NNNeuron(threshold="1")),
    ("alpha", ValueError, lambda: mnn.S2NNNeuron(alpha=0.0)),
    ("surrogate", ValueError, lambda: mnn.S2NNNeuron(surrogate="tanh")),
    ("backend", TypeError, lambda: mnn.S2NNNeuron(backend=1)),
    ("backend", ValueError, lambda: mnn.S2NNNeuron(backend="cupy")(x_bad)),
    ("x", TypeError, lambda: mnn.S2NNNeuron()(x_bad.int())),
    ("x", TypeError, lambda: mnn.S2NNNeuron()(x_bad.numpy())),
    ("x", ValueError, lambda: mnn.S2NNLinear(5, 3)(torch.tensor(1.0))),
    ("weight", ValueError, lambda: mnn.S2NNLinear(4, 3)(x_bad)),
    ("weight", TypeError, lambda: mnn.S2NNLinear(5, 3)(x_bad.double())),
    ("in_features", ValueError, lambda: mnn.S2NNLinear(-1, 3)),
]


@pytest.mark.parametrize("argument,error,call", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(argument, error, call):
    with pytest.raises(error, match=argument):
        call()


def test_a_threshold_changed_after_construction_is_still_checked():
    neuron = mnn.S2NNNeuron()
    neuron.threshold = 0.0
    with pytest.raises(ValueError, match="threshold"):
        neuron(x_bad)


# ----------------------------------------------------------------------------- the example


def test_example_smoke_run_writes_every_model_and_dataset(tmp_path):
    result = run_example("s2nn.py", "--smoke", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(tmp_path / "s2nn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    models = ("s2nn", "s2nn-sigmoid", "binary-ste", "float-relu")
    assert [(r["dataset"], r["model"]) for r in rows] == [(d, m) for d in ("digits", "mnist") for m in models]
    for r in rows:
        assert 0.0 <= float(r["test acc %"]) <= 100.0, r
        assert float(r["hidden synops/sample"]) > 0, r
        equal, total = map(int, r["equal preds"].split("/"))
        assert total > 0 and equal == total, r
        rates = [float(r["L1 active %"]), float(r["L2 active %"])]
        assert all(0.0 <= rate <= 100.0 for rate in rates), r
    assert "## Settings" in (tmp_path / "s2nn.md").read_text()
    assert (tmp_path / "s2nn.png").read_bytes().startswith(b"\x89PNG")
