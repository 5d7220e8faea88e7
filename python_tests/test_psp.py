"""Postsynaptic-potential normalization (SPEC.md section 4; Ikegawa et al., Sensors 2022):
y = gamma_c x / sqrt(E[x^2]_g + eps) + beta_c. The reference against float64 formulas written from
the spec; every kernel (CUDA through its host twins on the CPU, Triton under the interpreter, both
for real on a GPU) against the reference in each dtype, on odd, strided, channels-last and empty
inputs, forward and backward, training and eval; argument errors; torch.compile; the module."""

import copy

import pytest
import torch

import maqd_kernels as mk
from maqd_kernels import nn as mnn
from maqd_kernels.bench.validation import launcher

from helpers import KERNEL_DTYPES, assert_close_to_reference, kernel_or_skip, kernel_targets, op_backends

# (shape, groups): as the LBN kernels' cases: a Linear output, one sample, lengths that end inside
# a vector and a block, many rows of few channels (the column reduction), long planes split over
# several blocks, every group count from 1 to C, and one value per group (fine for a raw moment).
CASES = [
    ((7, 5), 1),
    ((7, 5), 5),
    ((1, 6), 6),
    ((3, 6, 7), 2),
    ((3, 6, 7), 6),
    ((2, 8, 5, 3), 4),
    ((1, 4, 9, 11), 1),
    ((4099, 3), 3),
    ((2, 3, 5000), 3),
    ((5, 2, 3001), 1),
]


def _random(shape, dtype=torch.float32, device="cpu", scale=2.0, shift=0.5):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def _params(channels, groups, dtype=torch.float32, device="cpu", moment_dtype=torch.float32):
    weight = (torch.rand(channels, dtype=torch.float64) + 0.5).to(dtype).to(device)
    bias = torch.randn(channels, dtype=torch.float64).to(dtype).to(device)
    running_moment = (torch.rand(groups, dtype=torch.float64) + 0.5).to(moment_dtype).to(device)
    return weight, bias, running_moment


def _moment64(x, groups):
    """E[x^2] of each group over (N, C/G, *), in float64, written from the spec."""
    n, c = x.shape[:2]
    return x.double().reshape(n, groups, c // groups, -1).square().mean(dim=(0, 2, 3))


def _psp64(x, weight, bias, moment, eps, groups):
    """y = gamma_c x / sqrt(moment_g(c) + eps) + beta_c in float64."""
    n, c = x.shape[:2]
    scale = (1 / torch.sqrt(moment.double() + eps)).repeat_interleave(c // groups).view(1, c, 1)
    y = x.double().reshape(n, c, -1) * scale
    if weight is not None:
        y = y * weight.double().view(1, c, 1)
    if bias is not None:
        y = y + bias.double().view(1, c, 1)
    return y.reshape(x.shape)


def _run_both(op, backend, *args):
    want = launcher(op, "reference")(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    got = kernel_or_skip(op, backend)(*args)
    assert len(got) == len(want)
    return got, want


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("batch", [1, 3])
def test_psp_norm_matches_float64(groups, batch):
    x = torch.randn(batch, 6, 4, 3, dtype=torch.float64) * 3 - 1
    weight, bias = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    running_moment = torch.rand(groups, dtype=torch.float64) + 0.5
    before = running_moment.clone()
    y = mk.psp_norm(x, weight, bias, running_moment, training=True, momentum=0.2, groups=groups)
    moment = _moment64(x, groups)
    torch.testing.assert_close(y, _psp64(x, weight, bias, moment, 1e-5, groups))
    # A raw moment: no n / (n - 1) in the update.
    torch.testing.assert_close(running_moment, 0.8 * before + 0.2 * moment)
    y_eval = mk.psp_norm(x, weight, bias, running_moment, training=False, groups=groups)
    torch.testing.assert_close(y_eval, _psp64(x, weight, bias, running_moment, 1e-5, groups))


def test_groups_equal_channels_is_per_channel_moment():
    """groups = C by hand: each channel divided by the root mean square of its own values over N and
    the plane, and no mean subtracted (a shifted input gives a different output, unlike BatchNorm)."""
    x = torch.randn(5, 3, 4, 2, dtype=torch.float64) + 2
    y = mk.psp_norm(x, None, None, None, training=True, groups=3)
    for c in range(3):
        values = x[:, c]
        rms = torch.sqrt((values**2).sum() / values.numel() + 1e-5)
        torch.testing.assert_close(y[:, c], values / rms)
    shifted = mk.psp_norm(x + 1, None, None, None, training=True, groups=3)
    assert (shifted - y).abs().max() > 0.01


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("groups", [1, 3, 6])
def test_psp_norm_gradcheck(training, groups):
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64).add(0.5).requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    moment = torch.rand(groups, dtype=torch.float64) + 0.5

    def f(x, weight, bias):
        return mk.psp_norm(x, weight, bias, moment.clone(), training=training, groups=groups)

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x: mk.psp_norm(x, None, None, None, training=True, groups=groups), (x,))


def test_training_gradient_is_the_spec_formula():
    """dx = r (gamma g - x_hat mean_group(gamma g x_hat)), r = (E[x^2] + eps)^-1/2, x_hat = x r."""
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    (mk.psp_norm(x, weight, None, None, training=True, groups=2) * g).sum().backward()
    xs = x.detach().reshape(3, 2, 2, 5)
    r = 1 / torch.sqrt(xs.square().mean(dim=(0, 2, 3), keepdim=True) + 1e-5)
    x_hat = xs * r
    gamma_g = (g * weight.view(1, 4, 1)).reshape(xs.shape)
    want = r * (gamma_g - x_hat * (gamma_g * x_hat).mean(dim=(0, 2, 3), keepdim=True))
    torch.testing.assert_close(x.grad, want.reshape(x.shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_follows_float32(dtype):
    x = torch.randn(4, 6, 5).to(dtype)
    weight, bias = torch.rand(6).to(dtype), torch.randn(6).to(dtype)
    moment, moment32 = torch.ones(2), torch.ones(2)
    y = mk.psp_norm(x, weight, bias, moment, training=True, groups=2)
    y32 = mk.psp_norm(x.float(), weight.float(), bias.float(), moment32, training=True, groups=2)
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype))
    assert torch.equal(moment, moment32)


# ----------------------------------------------------------------------------- every kernel


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,groups", CASES)
def test_training_forward_matches_reference(backend, device, dtype, shape, groups):
    x = _random(shape, dtype, device)
    weight, bias, moment = _params(shape[1], groups, dtype, device)
    got, want = _run_both("psp_norm_forward", backend, x, weight, bias, moment, True, 0.1, 1e-5, groups)
    for name, g, w in zip(("y", "rstd", "running_moment"), got, want):
        assert_close_to_reference(g, w, dtype if name == "y" else torch.float32, name)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,groups", CASES[::2])
def test_eval_forward_matches_reference(backend, device, dtype, shape, groups):
    x = _random(shape, dtype, device)
    weight, bias, moment = _params(shape[1], groups, dtype, device)
    (y, rstd, new_moment), want = _run_both(
        "psp_norm_forward", backend, x, weight, bias, moment, False, 0.1, 1e-5, groups
    )
    assert_close_to_reference(y, want[0], dtype, "y")
    assert_close_to_reference(rstd, want[1], torch.float32, "rstd")
    assert new_moment.numel() == 0


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,groups", CASES[1::2])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference(backend, device, dtype, shape, groups, training):
    x = _random(shape, dtype, device)
    grad = _random(shape, dtype, device, scale=1.0, shift=0.3)
    weight, bias, moment = _params(shape[1], groups, dtype, device)
    _, rstd, _ = launcher("psp_norm_forward", "reference")(
        x.cpu(), weight.cpu(), bias.cpu(), moment.cpu(), training, 0.1, 1e-5, groups
    )
    got, want = _run_both("psp_norm_backward", backend, grad, x, weight, bias, rstd.to(device), training, groups)
    for name, g, w in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        assert_close_to_reference(g, w, dtype, name)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("training", [True, False])
def test_no_affine_and_no_running_moment(backend, device, training):
    x = _random((4, 6, 5), torch.float32, device)
    moment = None if training else _params(6, 3, device=device)[2]
    (y, rstd, new_moment), want = _run_both("psp_norm_forward", backend, x, None, None, moment, training, 0.1, 1e-5, 3)
    assert_close_to_reference(y, want[0], torch.float32, "y")
    assert new_moment.numel() == 0
    grad = _random(x.shape, torch.float32, device, scale=1.0)
    got, want = _run_both("psp_norm_backward", backend, grad, x, None, None, want[1].to(device), training, 3)
    assert_close_to_reference(got[0], want[0], torch.float32, "grad_x")
    assert got[1] is None and got[2] is None


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parameters_and_moment_keep_their_dtypes(backend, device, dtype):
    x = _random((5, 4, 6), dtype, device)
    weight, bias, moment = _params(4, 2, dtype, device, moment_dtype=dtype)
    got, want = _run_both("psp_norm_forward", backend, x, weight, bias, moment, True, 0.3, 1e-5, 2)
    for name, g, w in zip(("y", "rstd", "running_moment"), got, want):
        assert_close_to_reference(g, w, dtype, name)
    grad = _random(x.shape, dtype, device, scale=1.0)
    grads, want_grads = _run_both("psp_norm_backward", backend, grad, x, weight, bias, want[1].to(device), True, 2)
    for name, g, w in zip(("grad_x", "grad_weight", "grad_bias"), grads, want_grads):
        assert_close_to_reference(g, w, dtype, name)


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_moment_far_from_zero(backend, device):
    """x = 1e4 +- 1: E[x^2] = 1e8 + var, which the kernels build from their shifted moments."""
    x64 = torch.randn(6, 4, 513, dtype=torch.float64) + 1e4
    x = x64.float().to(device)
    _, rstd, _ = kernel_or_skip("psp_norm_forward", backend)(x, None, None, None, True, 0.1, 1e-5, 2)
    want = 1 / torch.sqrt(_moment64(x64.float(), 2) + 1e-5)
    torch.testing.assert_close(rstd.double().cpu(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_strided_and_empty_inputs(backend, device):
    x = _random((6, 5, 4), torch.float32, device).transpose(0, 2)  # (4, 5, 6), not contiguous
    weight, bias, moment = _params(5, 5, device=device)
    got, want = _run_both("psp_norm_forward", backend, x, weight, bias, moment, True, 0.1, 1e-5, 5)
    assert_close_to_reference(got[0], want[0], torch.float32, "y")
    assert_close_to_reference(got[2], want[2], torch.float32, "running_moment")
    empty = torch.empty(0, 5, 3, device=device)
    y, rstd, new_moment = kernel_or_skip("psp_norm_forward", backend)(empty, weight, bias, moment, True, 0.1, 1e-5, 5)
    assert y.shape == empty.shape and torch.equal(new_moment, moment) and rstd.isnan().all()
    grads = kernel_or_skip("psp_norm_backward", backend)(empty, empty, weight, bias, want[1].to(device), True, 5)
    assert grads[0].shape == empty.shape
    assert torch.equal(grads[1].cpu(), torch.zeros(5)) and torch.equal(grads[2].cpu(), torch.zeros(5))


# ----------------------------------------------------------------------------- the public op on every backend


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("training", [True, False])
def test_layouts_keep_the_input_layout(backend, device, layout, training):
    x = _random((3, 6, 5, 4), device=device)
    strided = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(2, 3)
    weight, bias, moment = _params(6, 2, device=device)
    moments = moment.clone(), moment.clone()
    contiguous = strided.contiguous().requires_grad_(True)
    strided = strided.detach().requires_grad_(True)
    y = mk.psp_norm(strided, weight, bias, moments[0], training=training, groups=2, backend=backend)
    want = mk.psp_norm(contiguous, weight, bias, moments[1], training=training, groups=2, backend=backend)
    assert y.stride() == torch.empty_like(strided).stride()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(moments[0], moments[1])
    g = _random(y.shape, device=device, scale=1.0)
    (y * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(strided.grad, contiguous.grad)


@pytest.mark.parametrize("backend,device", op_backends())
def test_empty_batch_leaves_the_running_moment(backend, device):
    _, _, moment = _params(4, 2, device=device)
    before = moment.clone()
    x = torch.empty(0, 4, 3, device=device, requires_grad=True)
    y = mk.psp_norm(x, None, None, moment, training=True, groups=2, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(moment, before)


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_module_training_steps_match_float64(backend, device, dtype):
    """A few training steps of the module against float64: outputs, gradients, running moment."""
    norm = mnn.PSPNorm(6, groups=3, momentum=0.2, backend=backend).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    weight64, bias64 = norm.weight.detach().double().cpu(), norm.bias.detach().double().cpu()
    moment64 = torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        x64 = torch.randn(4, 6, 5, dtype=torch.float64) * 2 + 0.5
        x = x64.to(dtype).to(device).requires_grad_(True)
        x_ref = x64.to(dtype).double().requires_grad_(True)
        y = norm(x)
        moment = _moment64(x_ref, 3)
        y_ref = _psp64(x_ref, weight64, bias64, moment, 1e-5, 3)
        moment64 = 0.8 * moment64 + 0.2 * moment.detach()
        assert_close_to_reference(y.double().cpu(), y_ref.detach(), dtype, "y")
        g = torch.randn(y.shape, dtype=torch.float64)
        (y.double().cpu() * g).sum().backward()
        (y_ref * g).sum().backward()
        assert_close_to_reference(x.grad.double().cpu(), x_ref.grad, dtype, "grad_x")
        assert_close_to_reference(norm.running_moment.double().cpu(), moment64, torch.float32, "running_moment")
    norm.eval()
    x64 = torch.randn(4, 6, 5, dtype=torch.float64)
    y = norm(x64.to(dtype).to(device))
    assert_close_to_reference(
        y.double().cpu(), _psp64(x64.to(dtype), weight64, bias64, moment64, 1e-5, 3), dtype, "eval y"
    )


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"x": [[1.0, 2.0]]}, TypeError, "x must be a torch.Tensor"),
        ({"x": torch.randn(6)}, ValueError, "x must have at least 2"),
        ({"x": torch.ones(2, 6, dtype=torch.int32)}, TypeError, "x must have dtype"),
        ({"weight": torch.ones(5)}, ValueError, r"weight must have shape \(6,\)"),
        ({"bias": torch.ones(2, 3)}, ValueError, r"bias must have shape \(6,\)"),
        ({"running_moment": torch.ones(3)}, ValueError, r"running_moment must have shape \(2,\)"),
        ({"running_moment": None, "training": False}, ValueError, "running_moment is required"),
        ({"groups": 4}, ValueError, "groups must divide"),
        ({"groups": 0}, ValueError, "groups must satisfy"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"training": 1}, TypeError, "training"),
        ({"backend": "tpu"}, ValueError, "not a backend"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    args = {"x": torch.randn(3, 6, 4), "weight": torch.ones(6), "bias": torch.zeros(6)}
    args |= {"running_moment": torch.ones(2), "training": True, "groups": 2} | change
    with pytest.raises(error, match=match):
        mk.psp_norm(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("running_moment"), **args)


def test_module_rejects_groups_that_do_not_divide_and_flat_time_first_inputs():
    with pytest.raises(ValueError, match="groups must divide num_features 6"):
        mnn.PSPNorm(6, groups=4)
    with pytest.raises(ValueError, match="time-first PSPNorm"):
        mnn.PSPNorm(6, time_first=True)(torch.randn(2, 6))


# ----------------------------------------------------------------------------- the module


def test_module_train_eval_and_state_dict():
    torch.manual_seed(3)
    norm = mnn.PSPNorm(6, groups=2)
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"]
    assert [name for name, _ in norm.named_buffers()] == ["running_moment"]
    assert torch.equal(norm.running_moment, torch.ones(2))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    batches = [torch.randn(5, 6, 3) * 2 + 1 for _ in range(3)]
    expected = torch.ones(2, dtype=torch.float64)
    for x in batches:
        norm(x)
        expected = 0.9 * expected + 0.1 * _moment64(x, 2)
    torch.testing.assert_close(norm.running_moment.double(), expected, rtol=1e-6, atol=0)
    norm.eval()
    x = torch.randn(4, 6, 3)
    a, b = norm.inference_affine()
    torch.testing.assert_close(b, norm.bias.detach())
    torch.testing.assert_close(norm(x), a.view(1, -1, 1) * x + b.view(1, -1, 1), rtol=1e-6, atol=1e-6)
    before = norm.running_moment.clone()
    norm(x * 5)
    assert torch.equal(norm.running_moment, before), "eval must not update the running moment"
    fresh = mnn.PSPNorm(6, groups=2).eval()
    fresh.load_state_dict(copy.deepcopy(norm.state_dict()))
    assert torch.equal(fresh(x), norm(x))
    assert repr(norm) == "PSPNorm(6, groups=2, eps=1e-05, momentum=0.1, affine=True)"


def test_module_without_affine_and_time_first():
    plain = mnn.PSPNorm(4, affine=False)
    assert plain.weight is None and plain.bias is None
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(plain(x), x / torch.sqrt(x.square().mean() + 1e-5))
    time_first = mnn.PSPNorm(6, groups=2, time_first=True)
    flat = mnn.PSPNorm(6, groups=2)
    traces = torch.rand(4, 3, 6)
    torch.testing.assert_close(time_first(traces), flat(traces.reshape(12, 6)).reshape(traces.shape))
    torch.testing.assert_close(time_first.running_moment, flat.running_moment)
