"""Layer-Batch Normalization and folding (SPEC.md section 3): groups=C against torch's BatchNorm,
any group count against float64, the inference affine and the float fold."""

import pytest
import torch
import torch.nn.functional as F

import maqd_kernels as mk

import derivations


@pytest.mark.parametrize("shape", [(8, 5), (4, 6, 7), (3, 4, 5, 6)])
@pytest.mark.parametrize("affine", [True, False])
def test_groups_equal_channels_is_batchnorm(shape, affine):
    channels = shape[1]
    bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](
        channels, affine=affine
    )
    lbn = mk.nn.LayerBatchNorm(channels, groups=channels, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            lbn.weight.copy_(bn.weight), lbn.bias.copy_(bn.bias)
    for _ in range(3):  # several training steps: running statistics accumulate
        x = torch.randn(shape) * 2 + 1
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_bn, y_lbn = bn(x1), lbn(x2)
        torch.testing.assert_close(y_lbn, y_bn, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y_bn)
        (y_bn * g).sum().backward()
        (y_lbn * g).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lbn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lbn.running_var, bn.running_var, rtol=1e-6, atol=1e-6)
    if affine:
        torch.testing.assert_close(lbn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lbn.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-5)
    bn.eval(), lbn.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(lbn(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("batch", [1, 3])
def test_layer_batch_norm_matches_float64(groups, batch):
    x = torch.randn(batch, 6, 4, 3, dtype=torch.float64) * 3 - 1
    weight, bias = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    running_mean, running_var = torch.randn(groups, dtype=torch.float64), torch.rand(groups, dtype=torch.float64) + 0.5
    rm0, rv0 = running_mean.clone(), running_var.clone()
    y = mk.layer_batch_norm(x, weight, bias, running_mean, running_var, training=True, momentum=0.2, groups=groups)
    mean, var, n = derivations.group_norm_stats(x, groups)
    torch.testing.assert_close(y, derivations.layer_batch_norm(x, weight, bias, mean, var, 1e-5, groups))
    torch.testing.assert_close(running_mean, 0.8 * rm0 + 0.2 * mean)
    torch.testing.assert_close(running_var, 0.8 * rv0 + 0.2 * var * n / (n - 1))
    y_eval = mk.layer_batch_norm(x, weight, bias, running_mean, running_var, training=False, groups=groups)
    torch.testing.assert_close(
        y_eval, derivations.layer_batch_norm(x, weight, bias, running_mean, running_var, 1e-5, groups)
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_layer_batch_norm_gradcheck(training, groups):
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64).add(0.5).requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    stats = (torch.randn(groups, dtype=torch.float64), torch.rand(groups, dtype=torch.float64) + 0.5)

    def f(x, weight, bias):
        return mk.layer_batch_norm(
            x, weight, bias, stats[0].clone(), stats[1].clone(), training=training, groups=groups
        )

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x: mk.layer_batch_norm(x, None, None, None, None, training=True, groups=groups), (x,)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_batch_norm_low_precision_follows_float32(dtype):
    x = torch.randn(4, 6, 5).to(dtype)
    weight, bias = torch.rand(6).to(dtype), torch.randn(6).to(dtype)
    rm, rv = torch.zeros(2), torch.ones(2)
    rm32, rv32 = rm.clone(), rv.clone()
    y = mk.layer_batch_norm(x, weight, bias, rm, rv, training=True, groups=2)
    y32 = mk.layer_batch_norm(x.float(), weight.float(), bias.float(), rm32, rv32, training=True, groups=2)
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype))
    assert torch.equal(rm, rm32) and torch.equal(rv, rv32)


def test_lbn_inference_affine_is_the_eval_normalization():
    lbn = mk.nn.LayerBatchNorm(6, groups=2)
    with torch.no_grad():
        lbn.weight.uniform_(0.5, 2), lbn.bias.uniform_(-1, 1)
    for _ in range(4):
        lbn(torch.randn(5, 6, 3, 3) * 2 + 1)
    lbn.eval()
    a, b = lbn.inference_affine()
    x = torch.randn(5, 6, 3, 3)
    torch.testing.assert_close(lbn(x), a.view(1, -1, 1, 1) * x + b.view(1, -1, 1, 1), rtol=1e-6, atol=1e-6)
    args = [t.detach().double().requires_grad_(True) for t in (lbn.weight, lbn.bias, lbn.running_mean)]
    var = (lbn.running_var.double() + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, b, m, v: mk.lbn_inference_affine(w, b, m, v, groups=2), (*args, var))
    a_plain, b_plain = mk.lbn_inference_affine(None, None, lbn.running_mean, lbn.running_var, groups=2, channels=6)
    torch.testing.assert_close(a_plain, 1 / torch.sqrt(lbn.running_var.repeat_interleave(3) + 1e-5))


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_affine_equals_layer_then_eval_lbn(layer, bias):
    if layer == "linear":
        module = torch.nn.Linear(7, 6, bias=bias)
        x = torch.randn(4, 7)
    else:
        module = torch.nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        x = torch.randn(2, 3, 5, 5)
    lbn = mk.nn.LayerBatchNorm(6, groups=3)
    with torch.no_grad():
        lbn.weight.uniform_(0.5, 2), lbn.bias.uniform_(-1, 1)
        lbn.running_mean.uniform_(-1, 1), lbn.running_var.uniform_(0.5, 2)
    lbn.eval()
    a, b = lbn.inference_affine()
    folded_weight, folded_bias = mk.fold_affine(module.weight, module.bias, a, b)
    y_folded = (
        F.linear(x, folded_weight, folded_bias)
        if layer == "linear"
        else F.conv2d(x, folded_weight, folded_bias, padding=1)
    )
    torch.testing.assert_close(y_folded, lbn(module(x)), rtol=1e-5, atol=1e-5)
    inputs = [t.detach().double().requires_grad_(True) for t in (module.weight, a, b)]
    b_in = module.bias.detach().double().requires_grad_(True) if bias else None
    assert torch.autograd.gradcheck(lambda w, a, b: mk.fold_affine(w, b_in, a, b), inputs)
