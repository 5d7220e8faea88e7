"""Every Layer-Batch Normalization kernel (CUDA and Triton) against the eager reference and
against torch's BatchNorm (SPEC.md section 3): training forward with its group statistics and
running-statistic update, backward, eval, in fp32/bf16/fp16, at every group count from 1 to C,
on (N, C), (N, C, L), (N, C, H, W) and time-first inputs. On the CPU the Triton kernels run in the
interpreter and the CUDA math through its host entry points; on a GPU every kernel runs for real."""

import subprocess
import sys

import pytest
import torch

from maqd_kernels import _backend
from maqd_kernels import nn as mnn
from maqd_kernels.bench.validation import launcher

import derivations
from helpers import KERNEL_DTYPES, assert_close_to_reference, kernel_or_skip, kernel_targets, op_backends

# (shape, groups): a plain (N, C) batch, one sample, lengths that end inside a vector and a
# block, many rows of few channels (the column reduction), long planes that need several blocks
# per group, and every group count from 1 to C.
CASES = [
    ((7, 5), 1),
    ((7, 5), 5),
    ((3, 6, 7), 1),
    ((3, 6, 7), 2),
    ((3, 6, 7), 6),
    ((2, 8, 5, 3), 4),
    ((2, 8, 5, 3), 8),
    ((1, 4, 9, 11), 1),
    ((1, 4, 9, 11), 4),
    ((4099, 3), 1),
    ((4099, 3), 3),
    ((2, 3, 5000), 3),
    ((5, 2, 3001), 1),
]


def _random(shape, dtype, device, scale=2.0, shift=0.5):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def _params(channels, groups, dtype, device, affine=True, stats_dtype=torch.float32):
    weight = (torch.rand(channels, dtype=torch.float64) + 0.5).to(dtype).to(device) if affine else None
    bias = torch.randn(channels, dtype=torch.float64).to(dtype).to(device) if affine else None
    running_mean = torch.randn(groups, dtype=torch.float64).to(stats_dtype).to(device)
    running_var = (torch.rand(groups, dtype=torch.float64) + 0.5).to(stats_dtype).to(device)
    return weight, bias, running_mean, running_var


def _run_both(op, backend, device, *args):
    want = launcher(op, "reference")(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    got = kernel_or_skip(op, backend)(*args)
    assert len(got) == len(want)
    return got, want


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,groups", CASES)
def test_training_forward_matches_reference(backend, device, dtype, shape, groups):
    x = _random(shape, dtype, device)
    weight, bias, rm, rv = _params(shape[1], groups, dtype, device)
    (y, mean, rstd, new_mean, new_var), want = _run_both(
        "layer_batch_norm_forward", backend, device, x, weight, bias, rm, rv, True, 0.1, 1e-5, groups
    )
    for name, got, expected in zip(
        ("y", "mean", "rstd", "running_mean", "running_var"), (y, mean, rstd, new_mean, new_var), want
    ):
        tolerance_dtype = dtype if name == "y" else torch.float32
        assert_close_to_reference(got, expected, tolerance_dtype, name)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,groups", CASES[::2])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference(backend, device, dtype, shape, groups, training):
    x = _random(shape, dtype, device)
    grad = _random(shape, dtype, device, scale=1.0, shift=0.3)
    weight, bias, rm, rv = _params(shape[1], groups, dtype, device)
    _, mean, rstd, _, _ = launcher("layer_batch_norm_forward", "reference")(
        x.cpu(), weight.cpu(), bias.cpu(), rm.cpu(), rv.cpu(), training, 0.1, 1e-5, groups
    )
    got, want = _run_both(
        "layer_batch_norm_backward",
        backend,
        device,
        grad,
        x,
        weight,
        bias,
        mean.to(device),
        rstd.to(device),
        training,
        groups,
    )
    for name, g, w in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        assert_close_to_reference(g, w, dtype, name)


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,groups", [((3, 6, 7), 2), ((4099, 3), 3), ((1, 4, 9, 11), 1)])
def test_eval_forward_matches_reference(backend, device, dtype, shape, groups):
    x = _random(shape, dtype, device)
    weight, bias, rm, rv = _params(shape[1], groups, dtype, device)
    (y, mean, rstd, new_mean, new_var), want = _run_both(
        "layer_batch_norm_forward", backend, device, x, weight, bias, rm, rv, False, 0.1, 1e-5, groups
    )
    assert_close_to_reference(y, want[0], dtype, "y")
    assert_close_to_reference(rstd, want[2], torch.float32, "rstd")
    assert new_mean.numel() == 0 and new_var.numel() == 0


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("training", [True, False])
def test_no_affine_and_no_running_statistics(backend, device, training):
    x = _random((4, 6, 5), torch.float32, device)
    _, _, rm, rv = _params(6, 3, torch.float32, device)
    stats = (rm, rv) if not training else (None, None)
    (y, _, rstd, new_mean, new_var), want = _run_both(
        "layer_batch_norm_forward", backend, device, x, None, None, *stats, training, 0.1, 1e-5, 3
    )
    assert_close_to_reference(y, want[0], torch.float32, "y")
    assert new_mean.numel() == 0 and new_var.numel() == 0
    grad = _random(x.shape, torch.float32, device, scale=1.0)
    got, want = _run_both(
        "layer_batch_norm_backward",
        backend,
        device,
        grad,
        x,
        None,
        None,
        want[1].to(device),
        want[2].to(device),
        training,
        3,
    )
    assert_close_to_reference(got[0], want[0], torch.float32, "grad_x")
    assert got[1] is None and got[2] is None


@pytest.mark.parametrize("backend,device", kernel_targets())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parameters_and_statistics_keep_their_dtypes(backend, device, dtype):
    """A model cast with .to(bf16) holds bf16 parameters and running statistics: the new statistics
    and the parameter gradients come back in those dtypes."""
    x = _random((5, 4, 6), dtype, device)
    weight, bias, rm, rv = _params(4, 2, dtype, device, stats_dtype=dtype)
    got, want = _run_both("layer_batch_norm_forward", backend, device, x, weight, bias, rm, rv, True, 0.3, 1e-5, 2)
    for name, g, w in zip(("y", "mean", "rstd", "running_mean", "running_var"), got, want):
        assert_close_to_reference(g, w, dtype, name)
    grad = _random(x.shape, dtype, device, scale=1.0)
    grads, want_grads = _run_both(
        "layer_batch_norm_backward",
        backend,
        device,
        grad,
        x,
        weight,
        bias,
        want[1].to(device),
        want[2].to(device),
        True,
        2,
    )
    for name, g, w in zip(("grad_x", "grad_weight", "grad_bias"), grads, want_grads):
        assert_close_to_reference(g, w, dtype, name)


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_statistics_are_stable_far_from_zero(backend, device):
    """A large common offset: a one-pass sum of squares in float32 would lose the variance entirely
    (E[x^2] - E[x]^2 at 1e8 has an error of about 8); the kernels' reduction must keep it."""
    x64 = torch.randn(6, 4, 513, dtype=torch.float64) + 1e4
    x = x64.float().to(device)
    _, mean, rstd, _, _ = kernel_or_skip("layer_batch_norm_forward", backend)(
        x, None, None, None, None, True, 0.1, 1e-5, 2
    )
    mean64, var64, _ = derivations.group_norm_stats(x64.float().double(), 2)
    torch.testing.assert_close(mean.double().cpu(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double().cpu(), 1 / torch.sqrt(var64 + 1e-5), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend,device", kernel_targets())
def test_strided_and_empty_inputs(backend, device):
    x = _random((6, 5, 4), torch.float32, device).transpose(0, 2)  # (4, 5, 6), not contiguous
    weight, bias, rm, rv = _params(5, 5, torch.float32, device)
    got, want = _run_both("layer_batch_norm_forward", backend, device, x, weight, bias, rm, rv, True, 0.1, 1e-5, 5)
    assert_close_to_reference(got[0], want[0], torch.float32, "y")
    empty = torch.empty(0, 5, 3, device=device)
    y, _, _, new_mean, new_var = kernel_or_skip("layer_batch_norm_forward", backend)(
        empty, weight, bias, rm, rv, True, 0.1, 1e-5, 5
    )
    assert y.shape == empty.shape and torch.equal(new_mean, rm) and torch.equal(new_var, rv)
    grads = kernel_or_skip("layer_batch_norm_backward", backend)(
        empty, empty, weight, bias, want[1].to(device), want[2].to(device), True, 5
    )
    assert grads[0].shape == empty.shape
    assert torch.equal(grads[1].cpu(), torch.zeros(5)) and torch.equal(grads[2].cpu(), torch.zeros(5))


# ----------------------------------------------------------------------------- the module on each backend


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("shape", [(8, 5), (4, 6, 7), (3, 4, 5, 6)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_groups_equal_channels_is_batchnorm_on_every_backend(backend, device, shape, dtype):
    channels = shape[1]
    bn_class = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)]
    bn = bn_class(channels).to(device)
    lbn = mnn.LayerBatchNorm(channels, groups=channels, backend=backend).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        lbn.weight.copy_(bn.weight), lbn.bias.copy_(bn.bias)
    for _ in range(3):
        x = _random(shape, torch.float32, device)
        x_bn, x_lbn = x.clone().requires_grad_(True), x.to(dtype).requires_grad_(True)
        y_bn, y_lbn = bn(x_bn), lbn(x_lbn)
        assert y_lbn.dtype == dtype
        assert_close_to_reference(y_lbn.float(), y_bn, dtype, "y")
        g = _random(shape, torch.float32, device, scale=1.0)
        (y_bn * g).sum().backward()
        (y_lbn * g.to(dtype)).sum().backward()
        assert_close_to_reference(x_lbn.grad.float(), x_bn.grad, dtype, "grad_x")
        assert_close_to_reference(lbn.running_mean, bn.running_mean, dtype, "running_mean")
        assert_close_to_reference(lbn.running_var, bn.running_var, dtype, "running_var")
    assert_close_to_reference(lbn.weight.grad, bn.weight.grad, dtype, "grad_weight")
    assert_close_to_reference(lbn.bias.grad, bn.bias.grad, dtype, "grad_bias")
    bn.eval(), lbn.eval()
    x = _random(shape, torch.float32, device)
    assert_close_to_reference(lbn(x.to(dtype)).float(), bn(x), dtype, "eval y")


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("batch", [1, 3])
def test_layer_norm_over_the_batch_matches_float64_on_every_backend(backend, device, batch):
    """groups=1 (LBN proper) against an independent float64 re-derivation, batch size 1 included."""
    x64 = torch.randn(batch, 6, 4, 3, dtype=torch.float64) * 3 - 1
    weight64, bias64 = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    lbn = mnn.LayerBatchNorm(6, groups=1, momentum=0.2, backend=backend).to(device)
    with torch.no_grad():
        lbn.weight.copy_(weight64), lbn.bias.copy_(bias64)
    x = x64.float().to(device).requires_grad_(True)
    y = lbn(x)
    x_ref = x64.float().double().requires_grad_(True)
    mean, var, n = derivations.group_norm_stats(x_ref, 1)  # differentiated too, as in training
    y_ref = derivations.layer_batch_norm(x_ref, weight64.float().double(), bias64.float().double(), mean, var, 1e-5, 1)
    mean, var = mean.detach(), var.detach()
    torch.testing.assert_close(y.double().cpu(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lbn.running_mean.double().cpu(), 0.2 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lbn.running_var.double().cpu(), 0.8 + 0.2 * var * n / (n - 1), rtol=1e-5, atol=1e-6)
    g = torch.randn(y.shape, dtype=torch.float64)
    (y.double().cpu() * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), x_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", op_backends())
def test_time_first_inputs_fold_time_into_the_batch(backend, device):
    """(T, B, C, *) traces from SAF layers: statistics over T, B and the rest, as (T*B, C, *)."""
    x = _random((4, 3, 6, 5), torch.float32, device)
    time_first = mnn.LayerBatchNorm(6, groups=2, time_first=True, backend=backend).to(device)
    flat = mnn.LayerBatchNorm(6, groups=2, backend=backend).to(device)
    y = time_first(x)
    torch.testing.assert_close(y, flat(x.reshape(12, 6, 5)).reshape(x.shape))
    torch.testing.assert_close(time_first.running_var, flat.running_var)
    with pytest.raises(ValueError, match="time-first"):
        time_first(x[0, 0])


@pytest.mark.skipif(_backend.cuda_extension() is None, reason="maqd_kernels._C not built")
def test_cuda_partition_of_rows_wider_than_two_to_the_32():
    """The CUDA planner sizes grids from int64 shapes: a (1, 2^32 + 4) input (24 GiB in float32,
    which an H200 holds) with one-element channels goes to the column partition, whose thread count
    once overflowed a power of two and never returned. Run in a subprocess so a regression fails
    instead of hanging."""
    code = (
        "from maqd_kernels import _backend; "
        "print(_backend.cuda_extension().layer_batch_norm_workspace(1, 2**32 + 4, 1, 1, 0, True, True, 132))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0
