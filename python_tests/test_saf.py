"""Spike accumulation forwarding (SPEC.md section 1): the ops against float64 re-derivations, the
LIF and OTTT baselines, streaming, and every kernel against the reference."""

import pytest
import torch
import torch.nn.functional as F

import maqd_kernels as mk
from maqd_kernels.bench.validation import near_tie_neurons
from maqd_kernels.saf import reference

import derivations
from helpers import LOW_PRECISION, assert_equal_except_ties

SHAPES = [(1, 1), (2, 3), (5, 7, 3), (32, 33)]


def _u_hat(shape, dtype=torch.float32, device="cpu"):
    """Random U_hat that fires some neurons and not others (never all zeros)."""
    return (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.6).to(dtype).to(device)


def _spikes_of(trace: torch.Tensor, decay: float, state=None) -> torch.Tensor:
    """s[t] = a_hat[t] - lambda a_hat[t-1], rounded: the spike levels behind a float32 trace."""
    previous = torch.cat([(torch.zeros_like(trace[0]) if state is None else state).unsqueeze(0), trace[:-1]])
    return torch.round(trace - reference.round_to(trace.dtype, decay) * previous)


# ----------------------------------------------------------------------------- forward vs float64


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spike_bits", [1, 2, 3])
@pytest.mark.parametrize("decay", [0.5, 0.8, 1.0])
def test_saf_neuron_forward_matches_float64_derivation(shape, spike_bits, decay):
    u = _u_hat(shape) * spike_bits
    state = torch.rand(shape[1:]) * 2
    trace, count = mk.saf_neuron(
        u, decay=decay, threshold=0.9, spike_bits=spike_bits, state=state, return_spike_count=True
    )
    expected, expected_count = derivations.saf_neuron(u, decay=decay, threshold=0.9, spike_bits=spike_bits, state=state)
    near = near_tie_neurons(u, state, decay, 0.9, spike_bits)
    assert_equal_except_ties(_spikes_of(trace, decay, state), _spikes_of(expected.float(), decay, state), near)
    keep = ~near
    torch.testing.assert_close(trace[:, keep].double(), expected[:, keep].detach(), rtol=2e-6, atol=1e-6)
    if not near.any():
        assert count.item() == expected_count.item()
    assert trace.dtype == torch.float32 and count.dtype == torch.float32 and count.shape == ()


def test_saf_neuron_float64_is_computed_in_float64():
    u = _u_hat((6, 50), torch.float64)
    trace = mk.saf_neuron(u, decay=0.7, threshold=1.1)
    expected, _ = derivations.saf_neuron(u, decay=0.7, threshold=1.1)
    assert trace.dtype == torch.float64
    torch.testing.assert_close(trace, expected.detach(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_input_upcasts_like_float32(dtype):
    """bf16 / fp16 inputs run in float32 and only the output is rounded."""
    u = _u_hat((5, 4, 9), dtype)
    state = torch.rand(4, 9)
    for spike_bits in (1, 2):
        trace, count = mk.saf_neuron(u, decay=0.6, spike_bits=spike_bits, state=state, return_spike_count=True)
        trace32, count32 = mk.saf_neuron(
            u.float(), decay=0.6, spike_bits=spike_bits, state=state, return_spike_count=True
        )
        assert trace.dtype == dtype
        assert torch.equal(trace, trace32.to(dtype)) and count.item() == count32.item()


def test_multibit_spikes_are_clipped_floor_levels():
    u = torch.tensor([[0.5, 1.0, 2.9, 3.0, 7.5, 100.0, -4.0]])
    trace = mk.saf_neuron(u, threshold=1.0, spike_bits=2)
    assert trace.tolist() == [[0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.0]]
    assert mk.saf_neuron(u, threshold=1.0).tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]


# ----------------------------------------------------------------------------- backward vs float64


@pytest.mark.parametrize("mode", ["saf_e", "saf_f"])
@pytest.mark.parametrize("surrogate", ["sigmoid", "s2nn", "rectangle"])
@pytest.mark.parametrize("spike_bits", [1, 3])
def test_saf_neuron_gradients_match_float64_derivation(mode, surrogate, spike_bits):
    u = _u_hat((5, 4, 6)) * spike_bits
    state = torch.rand(4, 6)
    kwargs = dict(
        decay=0.5, threshold=0.8, mode=mode, surrogate=surrogate, alpha=3.0, spike_bits=spike_bits, state=state, step=3
    )
    u_op = u.clone().requires_grad_(True)
    trace, count = mk.saf_neuron(u_op, return_spike_count=True, **kwargs)
    weights = torch.randn_like(trace)
    ((trace * weights).sum() + 0.3 * count).backward()

    u_ref = u.double().requires_grad_(True)
    expected, expected_count = derivations.saf_neuron(u_ref, **kwargs)
    ((expected * weights.double()).sum() + 0.3 * expected_count).backward()
    near = near_tie_neurons(u, state, 0.5, 0.8, spike_bits)
    torch.testing.assert_close(u_op.grad[:, ~near].double(), u_ref.grad[:, ~near], rtol=1e-5, atol=1e-6)
    assert u_op.grad.abs().sum() > 0


def test_saf_f_gradient_uses_global_step():
    """At step t0 the SAF-F bound (2^b - 1) S_t uses the global S_t, not S from zero."""
    u = torch.full((1, 1), 1.9, requires_grad=True)
    state = torch.full((1,), 1.0)
    # a_hat = 0.5 * 1 + 1 = 1.5: inside (0, S_0 = 1) fails at step 0 but (0, S_2 = 1.75) holds at step 2.
    mk.saf_neuron(u, mode="saf_f", state=state, step=0).sum().backward()
    assert u.grad.item() == 0.0
    u.grad = None
    mk.saf_neuron(u, mode="saf_f", state=state, step=2).sum().backward()
    assert u.grad.item() == 1.0


# ----------------------------------------------------------------------------- trace, readout, linear


def test_spike_trace_and_readout_match_float64():
    x = (torch.rand(6, 3, 5) < 0.4).float().requires_grad_(True)
    state = torch.rand(3, 5)
    trace = mk.spike_trace(x, decay=0.75, state=state)
    torch.testing.assert_close(trace.double(), derivations.trace_of(x, 0.75, state).detach(), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(trace)
    (trace * g).sum().backward()
    assert torch.equal(x.grad, g)

    u = torch.randn(6, 3, 5, requires_grad=True)
    out = mk.saf_readout(u, decay=0.75, state=state)
    previous = torch.cat([state.unsqueeze(0), u.detach()[:-1]]).double()
    torch.testing.assert_close(out.double(), u.double() - 0.75 * previous, rtol=1e-6, atol=1e-6)
    (out * g).sum().backward()
    assert torch.equal(u.grad, g)


@pytest.mark.parametrize("mode", ["saf_e", "saf_f"])
@pytest.mark.parametrize("bias", [True, False])
def test_saf_linear_matches_linear_plus_neuron_float64(mode, bias):
    a_in = torch.rand(5, 3, 7, dtype=torch.float64) * 2
    weight = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    trace, count = mk.saf_linear(
        a_in.requires_grad_(True), weight, b, decay=0.6, mode=mode, step=2, return_spike_count=True
    )
    (trace.square().sum() + count).backward()
    grads = [a_in.grad, weight.grad] + ([b.grad] if bias else [])

    a2, w2 = a_in.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True) if bias else None
    factors = [reference.bias_factor(0.6, 2 + t, torch.float64) for t in range(5)]
    u = a2 @ w2.T + (b2 * torch.tensor(factors, dtype=torch.float64).view(-1, 1, 1) if bias else 0)
    expected, expected_count = derivations.saf_neuron(
        u, decay=0.6, threshold=1.0, mode=mode, step=2, bias_factors=factors
    )
    (expected.square().sum() + expected_count).backward()
    torch.testing.assert_close(trace, expected.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, [a2.grad, w2.grad] + ([b2.grad] if bias else [])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bias_factors_follow_the_float32_recurrence():
    for decay in (0.5, 0.3, 0.9, 0.999):
        like = torch.empty(40)
        got = mk.saf_bias_factors(like, decay=decay, step=17)
        assert got.tolist() == derivations.bias_factors_f32(decay, 17, 40)
    # lambda = 1: S_t = t + 1 until float32 can no longer count.
    assert mk.saf_bias_factors(torch.empty(2), decay=1.0, step=2**24 + 5).tolist() == [2.0**24, 2.0**24]
    assert reference.bias_factor(0.5, 10**9) == 2.0  # the fixed point, reached without 10^9 steps


# ----------------------------------------------------------------------------- streaming


def test_streaming_saf_linear_trace_and_readout():
    a_in = torch.rand(6, 2, 5)
    weight, bias = torch.randn(3, 5), torch.randn(3)
    full_linear = mk.saf_linear(a_in, weight, bias, decay=0.8)
    full_trace = mk.spike_trace(a_in, decay=0.8)
    full_readout = mk.saf_readout(a_in, decay=0.8)
    lin_state = trace_state = readout_state = None
    for t in range(6):
        step = a_in[t : t + 1]
        out = mk.saf_linear(step, weight, bias, decay=0.8, state=lin_state, step=t)
        assert torch.equal(out, full_linear[t : t + 1])
        lin_state = out[-1]
        tr = mk.spike_trace(step, decay=0.8, state=trace_state)
        assert torch.equal(tr, full_trace[t : t + 1])
        trace_state = tr[-1]
        ro = mk.saf_readout(step, decay=0.8, state=readout_state)
        assert torch.equal(ro, full_readout[t : t + 1])
        readout_state = step[-1]


# ----------------------------------------------------------------------------- LIF and OTTT baselines


def _dyadic(shape, denominator=16):
    """Small multiples of 1/denominator: float32 arithmetic on them is exact, so two formulations
    of the same neuron cannot disagree at ties."""
    return torch.randint(-24, 25, shape).float() / denominator


def test_saf_spikes_equal_soft_reset_lif_spikes_in_a_network():
    """SAF's trace-based layers fire exactly the spikes of the LIF network they rewrite."""
    decay, threshold = 0.5, 1.0
    s0 = (torch.rand(8, 4, 10) < 0.5).float()
    weights = [_dyadic((12, 10)), _dyadic((9, 12)), _dyadic((6, 9))]
    biases = [_dyadic((12,)), _dyadic((9,)), _dyadic((6,))]

    lif_spikes, s = [], s0
    for w, b in zip(weights, biases):
        s = mk.lif_bptt(F.linear(s, w, b), decay=decay, threshold=threshold)
        lif_spikes.append(s)

    a = mk.spike_trace(s0, decay=decay)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        trace = mk.saf_linear(a, w, b, decay=decay, threshold=threshold)
        assert torch.equal(_spikes_of(trace, decay), lif_spikes[layer]), f"layer {layer}"
        assert lif_spikes[layer].sum() > 0
        a = trace


def test_saf_spikes_equal_lif_spikes_on_random_floats():
    current = torch.randn(10, 64, 16) + 0.5
    lif_spikes = mk.lif_bptt(current, decay=0.8, threshold=1.0)
    u_hat = reference.spike_trace_forward(current, None, 0.8)  # U_hat[t] = lambda U_hat[t-1] + I[t]
    trace = mk.saf_neuron(u_hat, decay=0.8)
    near = near_tie_neurons(u_hat, None, 0.8, 1.0, 1, tol=1e-4)
    assert_equal_except_ties(_spikes_of(trace, 0.8), lif_spikes, near, max_ties=0.05)


@pytest.mark.parametrize("online", [False, True])
def test_lif_baselines_match_float64_autograd(online):
    current = (torch.randn(7, 3, 5, dtype=torch.float64) + 0.7).requires_grad_(True)
    op = mk.ottt_neuron if online else mk.lif_bptt
    spikes = op(current, decay=0.6, threshold=0.9, surrogate="s2nn", alpha=2.0)
    g = torch.randn_like(spikes)
    (spikes * g).sum().backward()
    c2 = current.detach().clone().requires_grad_(True)
    expected = derivations.lif(c2, decay=0.6, threshold=0.9, surrogate="s2nn", alpha=2.0, online=online)
    (expected * g).sum().backward()
    assert torch.equal(spikes.detach(), expected.detach())
    torch.testing.assert_close(current.grad, c2.grad, rtol=1e-12, atol=1e-12)


def test_ottt_linear_weight_gradient_goes_through_the_trace():
    s_in = (torch.rand(5, 2, 4, dtype=torch.float64) < 0.5).double().requires_grad_(True)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = mk.ottt_linear(s_in, weight, bias, decay=0.5)
    torch.testing.assert_close(out, F.linear(s_in, weight, bias))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    trace = derivations.trace_of(s_in.detach(), 0.5)
    torch.testing.assert_close(weight.grad, torch.einsum("tbn,tbk->nk", g, trace))
    torch.testing.assert_close(bias.grad, g.sum(dim=(0, 1)))
    torch.testing.assert_close(s_in.grad, g @ weight.detach())


def test_saf_e_weight_gradients_equal_ottt_theorem_1():
    """Theorem 1 of the SAF paper: on a 3-layer network with a per-step loss, SAF-E's weight
    gradients equal OTTT's (float64, random weights)."""
    decay, threshold, steps = 0.5, 1.0, 6
    s0 = (torch.rand(steps, 8, 20, dtype=torch.float64) < 0.4).double()
    targets = torch.randint(0, 5, (steps, 8))
    init = [
        torch.randn(16, 20, dtype=torch.float64) * 0.6,
        torch.randn(12, 16, dtype=torch.float64) * 0.5,
        torch.randn(5, 12, dtype=torch.float64) * 0.5,
    ]
    biases = [
        torch.randn(16, dtype=torch.float64) * 0.2,
        torch.randn(12, dtype=torch.float64) * 0.2,
        torch.randn(5, dtype=torch.float64) * 0.2,
    ]

    def loss_of(logits):
        return sum(F.cross_entropy(logits[t], targets[t]) for t in range(steps))

    saf_w = [w.clone().requires_grad_(True) for w in init]
    a = mk.spike_trace(s0, decay=decay)
    a = mk.saf_linear(a, saf_w[0], biases[0], decay=decay, threshold=threshold)
    a = mk.saf_linear(a, saf_w[1], biases[1], decay=decay, threshold=threshold)
    u3 = F.linear(a, saf_w[2]) + biases[2] * mk.saf_bias_factors(a, decay=decay).view(-1, 1, 1)
    loss_of(mk.saf_readout(u3, decay=decay)).backward()

    ottt_w = [w.clone().requires_grad_(True) for w in init]
    s = s0
    for layer in range(2):
        s = mk.ottt_neuron(
            mk.ottt_linear(s, ottt_w[layer], biases[layer], decay=decay), decay=decay, threshold=threshold
        )
    loss_of(mk.ottt_linear(s, ottt_w[2], biases[2], decay=decay)).backward()

    for layer in range(3):
        assert saf_w[layer].grad.abs().sum() > 0
        torch.testing.assert_close(saf_w[layer].grad, ottt_w[layer].grad, rtol=1e-10, atol=1e-12)
