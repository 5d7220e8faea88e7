"""Every SAF kernel (CUDA and Triton) against the eager reference (SPEC.md section 1): spikes,
traces and masks exact except at threshold ties, gradients to the dtype's tolerance, at odd shapes
and T in {1, 2, 5, 32}. On the CPU the Triton kernels run in the interpreter and the CUDA math
through its host entry points; on a GPU every kernel runs for real."""

import pytest
import torch

import maqd_kernels as mk
from maqd_kernels import _backend
from maqd_kernels import nn as mnn
from maqd_kernels.bench.validation import launcher, near_tie_neurons
from maqd_kernels.saf import reference, tables

from helpers import KERNEL_DTYPES, assert_equal_except_ties, kernel_or_skip, kernel_targets, op_backends, saf_forward

STEPS = [1, 2, 5, 32]
DECAY, THRESHOLD = 0.7, 0.85


def _u_hat(shape, dtype=torch.float32, device="cpu", spike_bits=1):
    """Random U_hat that fires some neurons and not others (never all zeros)."""
    return ((torch.randn(shape, dtype=torch.float64) * 1.5 + 0.6) * spike_bits).to(dtype).to(device)


def _shape(steps):
    return (steps, 3, 37) if steps < 32 else (steps, 2, 129)


def _ulp_tolerance(dtype):
    """Two float32 results one rounding apart may land one step apart in the storage dtype."""
    return {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]


def _near(u, state, spike_bits=1):
    return near_tie_neurons(u.cpu(), None if state is None else state.cpu(), DECAY, THRESHOLD, spike_bits)


# ----------------------------------------------------------------------------- saf_neuron


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spike_bits", [1, 2, 4])
def test_saf_neuron_forward_kernels_equal_reference(backend, device, dtype, steps, spike_bits):
    u = _u_hat(_shape(steps), dtype, device, spike_bits)
    for state, step in ((None, 0), (torch.rand(u.shape[1:], device=device) * 2, 3)):
        trace, count, mask = saf_forward(backend, u, state, DECAY, THRESHOLD, spike_bits, step, True)
        expected, expected_count, expected_mask = reference.saf_neuron_forward(
            u.cpu(), None if state is None else state.cpu(), DECAY, THRESHOLD, spike_bits, step, True
        )
        near = _near(u, state, spike_bits)
        assert_equal_except_ties(trace.cpu(), expected, near)
        inside = reference.unpack_bits(mask.cpu(), u.shape)
        assert_equal_except_ties(inside, reference.unpack_bits(expected_mask, u.shape), near)
        if not near.any():
            assert count.item() == expected_count.item()
            assert torch.equal(mask.cpu(), expected_mask)
        if state is not None:  # from zeros at T = 1 no binary neuron can lie strictly inside (0, S_0)
            assert inside.any()
        assert trace.device == u.device and count.dtype == torch.float32 and mask.dtype == torch.int32


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_saf_neuron_forward_without_mask_returns_an_empty_one(backend, device):
    _, _, mask = saf_forward(backend, _u_hat((3, 40), device=device), None, DECAY, THRESHOLD, 1)
    assert mask.shape == (0,) and mask.dtype == torch.int32


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_saf_neuron_kernels_take_empty_and_strided_inputs(backend, device):
    empty = torch.empty(0, 4, device=device)
    trace, count, mask = saf_forward(backend, empty, None, 0.5, 1.0, 1, 0, True)
    assert trace.shape == (0, 4) and count.item() == 0 and mask.shape == (0, 1)
    trace, count, mask = saf_forward(backend, torch.empty(3, 0, 5, device=device), None, 0.5, 1.0, 1, 0, True)
    assert trace.shape == (3, 0, 5) and count.item() == 0 and mask.shape == (3, 0)
    strided = _u_hat((9, 8), device=device)[:, ::2].t()  # (4, 9), not contiguous
    trace, _, _ = saf_forward(backend, strided, None, 0.5, 1.0, 1)
    expected, _, _ = reference.saf_neuron_forward(strided.contiguous().cpu(), None, 0.5, 1.0, 1)
    assert torch.equal(trace.cpu(), expected)
    backward = kernel_or_skip("saf_neuron_backward", backend)
    for mode in ("saf_e", "saf_f"):
        grad = backward(
            empty,
            torch.tensor(0.5),
            empty,
            torch.empty(0, 1, dtype=torch.int32),
            None,
            0.5,
            1.0,
            mode,
            "sigmoid",
            4.0,
            1,
        )
        assert grad.shape == (0, 4)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize(
    "mode,surrogate", [("saf_e", "sigmoid"), ("saf_e", "s2nn"), ("saf_e", "rectangle"), ("saf_f", "sigmoid")]
)
@pytest.mark.parametrize("spike_bits", [1, 3])
def test_saf_neuron_backward_kernels_match_reference(backend, device, dtype, steps, mode, surrogate, spike_bits):
    backward = kernel_or_skip("saf_neuron_backward", backend)
    u = _u_hat(_shape(steps), dtype, device, spike_bits)
    state = torch.rand(u.shape[1:], device=device) * 2
    grad_trace = torch.randn(u.shape, device=device).to(dtype)
    grad_count = torch.tensor(0.3, device=device)
    mask = reference.saf_neuron_forward(u.cpu(), state.cpu(), DECAY, THRESHOLD, spike_bits, 2, True)[2]
    saved = (u, None, state) if mode == "saf_e" else (None, mask.to(device), None)
    args = (DECAY, THRESHOLD, mode, surrogate, 2.5, spike_bits)
    grad = backward(grad_trace, grad_count, *saved, *args)
    cpu_saved = tuple(None if t is None else t.cpu() for t in saved)
    expected = reference.saf_neuron_backward(grad_trace.cpu(), grad_count.cpu(), *cpu_saved, *args)
    assert grad.dtype == dtype and grad.shape == u.shape and grad.device == u.device
    keep = ~_near(u, state, spike_bits)
    if mode == "saf_f" or surrogate == "rectangle":
        assert_equal_except_ties(grad.cpu(), expected, ~keep)
    else:  # expf differs between the GPU, the interpreter's numpy and PyTorch's CPU kernels
        tol = _ulp_tolerance(dtype)
        torch.testing.assert_close(grad.cpu()[:, keep], expected[:, keep], rtol=tol, atol=tol)
    assert expected[:, keep].abs().sum() > 0


# ----------------------------------------------------------------------------- trace and readout


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("steps", STEPS)
def test_spike_trace_and_readout_kernels_equal_reference(backend, device, dtype, steps):
    x = _u_hat(_shape(steps), dtype, device)
    for state in (None, torch.rand(x.shape[1:], device=device)):
        cpu_state = None if state is None else state.cpu()
        for op in ("spike_trace_forward", "saf_readout_forward"):
            got = kernel_or_skip(op, backend)(x, state, DECAY)
            expected = launcher(op, "reference")(x.cpu(), cpu_state, DECAY)
            assert got.dtype == dtype and torch.equal(got.cpu(), expected), op


# ----------------------------------------------------------------------------- saf_linear


def _linear_inputs(steps, dtype, device, bias, batch=(3,), inputs=37, features=19):
    a_in = (torch.rand(steps, *batch, inputs) * 2).to(dtype).to(device)
    weight = (torch.randn(features, inputs) / inputs**0.5 * 1.5).to(dtype).to(device)
    b = (torch.randn(features) * 0.5 + 0.3).to(dtype).to(device) if bias else None
    state = torch.rand(*batch, features, device=device)
    return a_in, weight, b, state


def _linear_near(a_in, weight, bias, state, step):
    u = reference._linear_u_hat(a_in.cpu(), weight.cpu(), None if bias is None else bias.cpu(), DECAY, step)
    return near_tie_neurons(u, None if state is None else state.cpu(), DECAY, THRESHOLD, 1, tol=2e-5)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("bias", [True, False])
def test_saf_linear_forward_kernels_equal_reference(backend, device, dtype, steps, bias):
    forward = kernel_or_skip("saf_linear_forward", backend)
    a_in, weight, b, state = _linear_inputs(steps, dtype, device, bias, batch=(2, 3))
    for initial, step in ((None, 0), (state, 4)):
        trace, count = forward(a_in, weight, b, initial, DECAY, THRESHOLD, 1, step)
        cpu = [None if t is None else t.cpu() for t in (a_in, weight, b, initial)]
        expected, expected_count = reference.saf_linear_forward(*cpu, DECAY, THRESHOLD, 1, step)
        near = _linear_near(a_in, weight, b, initial, step)
        assert_equal_except_ties(trace.cpu(), expected, near)
        if not near.any():
            assert count.item() == expected_count.item()
        assert trace.dtype == dtype and count.dtype == torch.float32


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("mode,spike_bits", [("saf_e", 1), ("saf_f", 1), ("saf_e", 2)])
def test_saf_linear_backward_kernels_match_reference(backend, device, dtype, steps, mode, spike_bits):
    backward = kernel_or_skip("saf_linear_backward", backend)
    a_in, weight, b, state = _linear_inputs(steps, dtype, device, True)
    grad_trace = torch.randn(*a_in.shape[:-1], weight.shape[0], device=device).to(dtype)
    args = (state, DECAY, THRESHOLD, mode, "sigmoid", 4.0, spike_bits, 1)
    got = backward(grad_trace, torch.tensor(0.2, device=device), a_in, weight, b, *args)
    cpu = [t.cpu() for t in (grad_trace, a_in, weight, b)]
    expected = reference.saf_linear_backward(cpu[0], torch.tensor(0.2), *cpu[1:], state.cpu(), *args[1:])
    assert not _linear_near(a_in, weight, b, state, 1).any(), "a tie would move a gradient; pick other inputs"
    # dL/dU_hat is rounded to the storage dtype before the two gradient matmuls.
    tol = 1e-5 if dtype == torch.float32 else 4 * _ulp_tolerance(dtype)
    for name, g, e in zip(("a_in", "weight", "bias"), got, expected):
        assert g.dtype == e.dtype == dtype, name
        torch.testing.assert_close(g.cpu().float(), e.float(), rtol=tol, atol=tol * e.abs().max().item(), msg=name)


# ----------------------------------------------------------------------------- through the ops


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("mode", ["saf_e", "saf_f"])
def test_ops_train_on_every_backend(backend, device, mode):
    """Forward and backward of the public ops on one backend equal the reference's."""
    kwargs = dict(decay=DECAY, threshold=THRESHOLD, mode=mode, spike_bits=2)
    u = _u_hat((5, 3, 11), device=device, spike_bits=2)

    def run(backend, u):
        u = u.clone().requires_grad_(True)
        trace, count = mk.saf_neuron(u, backend=backend, return_spike_count=True, **kwargs)
        ((trace * torch.linspace(-1, 1, trace.numel(), device=u.device).view_as(trace)).sum() + count).backward()
        return trace.detach(), u.grad

    trace, grad = run(backend, u)
    expected, expected_grad = run("reference", u)
    assert torch.equal(trace, expected)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)

    a_in, weight, bias, state = _linear_inputs(4, torch.float32, device, True)
    if backend in _backend.implemented_backends("saf_linear_forward"):
        outs = []
        for b in (backend, "reference"):
            params = [t.clone().requires_grad_(True) for t in (a_in, weight, bias)]
            out = mk.saf_linear(*params, state=state, backend=b, **kwargs)
            (out * out.detach().cos()).sum().backward()
            outs.append((out.detach(), [p.grad for p in params]))
        assert torch.equal(outs[0][0], outs[1][0])
        for g, e in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    x, state = u.clone().requires_grad_(True), torch.rand(u.shape[1:], device=device)
    for op in (mk.spike_trace, mk.saf_readout):
        out = op(x, decay=DECAY, state=state, backend=backend)
        assert torch.equal(out, op(x, decay=DECAY, state=state, backend="reference"))


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("mode", ["saf_e", "saf_f"])
@pytest.mark.parametrize("spike_bits", [1, 2])
def test_streaming_one_step_at_a_time_equals_multistep(backend, device, mode, spike_bits):
    kwargs = dict(decay=DECAY, threshold=0.9, mode=mode, spike_bits=spike_bits, backend=backend)
    u = _u_hat((8, 3, 5), device=device, spike_bits=spike_bits)
    u_full = u.clone().requires_grad_(True)
    trace = mk.saf_neuron(u_full, **kwargs)
    g = torch.randn_like(trace)
    (trace * g).sum().backward()

    state, steps, grads = None, [], []
    for t in range(u.shape[0]):
        u_t = u[t : t + 1].clone().requires_grad_(True)
        out = mk.saf_neuron(u_t, state=state, step=t, **kwargs)
        (out * g[t : t + 1]).sum().backward()
        steps.append(out.detach())
        grads.append(u_t.grad)
        state = out[-1].detach()
    assert torch.equal(torch.cat(steps), trace.detach())
    assert torch.equal(torch.cat(grads), u_full.grad)


# ----------------------------------------------------------------------------- what the backward keeps


def _saved_bytes(fn) -> dict[torch.dtype, int]:
    """Bytes autograd keeps for the backward of fn(), per dtype (each storage counted once)."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    totals: dict[torch.dtype, int] = {}
    for t in saved.values():
        totals[t.dtype] = totals.get(t.dtype, 0) + t.untyped_storage().nbytes()
    return totals


def test_saf_f_keeps_one_bit_per_neuron_and_step_and_saf_e_keeps_u_hat():
    steps, neurons = 6, 4 * 64
    u = _u_hat((steps, 4, 64), torch.bfloat16).requires_grad_(True)
    assert _saved_bytes(lambda: mk.saf_neuron(u, mode="saf_f")) == {torch.int32: steps * neurons // 8}
    assert _saved_bytes(lambda: mk.saf_neuron(u, mode="saf_e")) == {torch.bfloat16: steps * neurons * 2}


def test_saf_linear_keeps_only_its_inputs():
    a_in, weight, bias, _ = _linear_inputs(6, torch.float32, "cpu", True)
    params = [t.requires_grad_(True) for t in (a_in, weight, bias)]
    expected = sum(t.numel() * 4 for t in params)
    for mode in ("saf_e", "saf_f"):
        assert _saved_bytes(lambda: mk.saf_linear(*params, mode=mode)) == {torch.float32: expected}


# ----------------------------------------------------------------------------- SAF-F training helper


def _saf_f_network(spike_bits=1):
    torch.manual_seed(1)
    neuron = dict(mode="saf_f", decay=0.6, threshold=0.2, spike_bits=spike_bits)
    return torch.nn.Sequential(
        mnn.SpikeTrace(0.6),
        mnn.SAFConv2d(2, 3, 3, padding=1, **neuron),
        torch.nn.Flatten(2),
        mnn.SAFLinear(3 * 5 * 5, 7, **neuron),
        mnn.SAFLinear(7, 4, **neuron),
        mnn.SAFReadout(0.6),
    )


@pytest.mark.parametrize("spike_bits", [1, 2])
def test_saf_f_last_step_equals_the_full_graph(spike_bits):
    """The last step's output and the SAF-F weight gradients equal those of the whole sequence run
    with autograd, while the earlier steps ran without it."""
    images = torch.rand(6, 2, 2, 5, 5)
    full_net, last_net = _saf_f_network(spike_bits), _saf_f_network(spike_bits)
    full_out = full_net(images)[-1:]
    full_out.square().sum().backward()
    last_out = mnn.saf_f_last_step(last_net, images)
    last_out.square().sum().backward()
    assert torch.equal(last_out, full_out)
    for (name, p), q in zip(full_net.named_parameters(), last_net.parameters()):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-4)


def test_saf_f_last_step_memory_does_not_grow_with_steps():
    network = _saf_f_network()
    short, long = (_saved_bytes(lambda: mnn.saf_f_last_step(network, torch.rand(t, 2, 2, 5, 5))) for t in (2, 16))
    assert short == long and sum(short.values()) > 0


def test_saf_f_last_step_refuses_saf_e_layers():
    network = torch.nn.Sequential(mnn.SpikeTrace(), mnn.SAFLinear(3, 2, mode="saf_e"))
    with pytest.raises(ValueError, match="saf_e"):
        mnn.saf_f_last_step(network, torch.rand(3, 1, 3))


# ----------------------------------------------------------------------------- device tables and modules


def test_device_tables_equal_the_reference_and_share_the_fixed_point():
    for decay in (0.5, 0.9, 1.0):
        for step in (0, 3, 200, 10**6):
            got = tables.bias_factors(decay, step, 5, "cpu")
            assert torch.equal(got, reference.bias_factors(decay, step, 5, torch.float32))
            upper = tables.saf_f_upper_bounds(decay, step, 5, 3, "cpu")
            assert torch.equal(upper, reference.saf_f_upper_bounds(decay, step, 5, 3, torch.float32))
    # Past the fixed point every window is one cached tensor: streaming costs no new copies.
    assert tables.bias_factors(0.5, 10**6, 4, "cpu") is tables.bias_factors(0.5, 10**7, 4, "cpu")


@pytest.mark.parametrize("backend,device", op_backends())
def test_modules_take_a_backend(backend, device):
    layers = [
        mnn.SpikeTrace(0.5, backend=backend),
        mnn.SAFLinear(5, 4, decay=0.5, threshold=0.3, backend=backend),
        mnn.SAFReadout(0.5, backend=backend),
    ]
    # Multiples of 1/16 at decay 0.5: every sum is exact in float32, whatever order a matmul takes.
    with torch.no_grad():
        layers[1].weight.copy_(torch.randint(-8, 9, (4, 5)) / 16)
        layers[1].bias.copy_(torch.randint(-4, 5, (4,)) / 16)
    network = torch.nn.Sequential(*layers).to(device)
    x = (torch.randint(0, 17, (4, 2, 5)) / 16).to(device)
    for layer in layers:
        layer.backend = "reference"
    expected = network(x)
    for layer in layers:
        layer.backend = backend
    assert torch.equal(network(x), expected)
    assert expected.abs().sum() > 0
    assert f"backend={backend!r}" in repr(layers[1])
