"""``convert_for_inference`` (SPEC.md sections 3 and 4): converted MaQD models against their
eval-mode originals at several depths and widths, on every backend: each fused layer's uint8 codes
equal the original's except at rounding ties (judged by a float64 re-derivation of the layer), and
the whole model's outputs agree; the float fold; nested modules; the state_dict round trip. Each
norm, LayerBatchNorm or PSPNorm, folds in the same places."""

import io

import pytest
import torch
from torch import nn

import maqd_kernels as mk
from maqd_kernels import nn as mnn

from helpers import op_backends

# A float32 sum of K products errs by at most about K * 2^-24 of the sum of their magnitudes; a
# code may differ only where the exact value lies within this many such units of a half-integer.
TIE_ULPS = 2.0**-18


NORMS = (mnn.LayerBatchNorm, mnn.PSPNorm)


def _mlp(depth, width, weight_bits, act_bits, backend, in_features=24, groups=1, norm=mnn.LayerBatchNorm):
    layers, features = [mnn.QuantAct(act_bits, backend=backend)], in_features
    for _ in range(depth):
        layers += [
            mnn.QuantLinear(features, width, weight_bits=weight_bits, backend=backend),
            norm(width, groups=groups, backend=backend),
            mnn.QuantAct(act_bits, backend=backend),
        ]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, 10))


def _convnet(backend, norm=mnn.LayerBatchNorm):
    return nn.Sequential(
        mnn.QuantAct(4, backend=backend),
        mnn.QuantConv2d(3, 8, 3, padding=1, weight_bits=4, backend=backend),
        norm(8, backend=backend),
        mnn.QuantAct(4, backend=backend),
        mnn.QuantConv2d(8, 16, 3, stride=2, padding=1, weight_bits=2, backend=backend),
        norm(16, groups=4, backend=backend),
        mnn.QuantAct(4, learn_scale=True, backend=backend),
        nn.Flatten(),
        mnn.QuantLinear(16 * 4 * 4, 12, weight_bits=4, backend=backend),
        norm(12, backend=backend),
        mnn.QuantAct(8, backend=backend),
        nn.Linear(12, 10),
    )


def _trained(model, shape, device, steps=4):
    """Random affine parameters and running statistics from a few training-mode batches."""
    model.to(device).train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NORMS):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
            if isinstance(module, mnn.QuantAct) and module.learn_scale:
                module.scale.fill_(0.37)
        for _ in range(steps):
            model(torch.randn(shape, device=device) * 1.5 + 0.5)
    return model.eval()


def _inputs(shape, device):
    return torch.randn(shape, device=device) * 1.5 + 0.5


def _layer_values(model, x):
    """Per quantized layer of `model`: (its input, the codes of the QuantAct that ends its block,
    that QuantAct's scale, the block's norm)."""
    modules = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
    records, hooks = [], []
    for i, module in enumerate(modules):
        if isinstance(module, (mnn.QuantLinear, mnn.QuantConv2d)):
            norm, act = modules[i + 1], modules[i + 2]
            record = {"layer": module, "norm": norm, "act": act}
            records.append(record)
            hooks.append(module.register_forward_pre_hook(lambda m, args, r=record: r.update(input=args[0])))
            hooks.append(act.register_forward_hook(lambda m, args, out, r=record: r.update(output=out)))
    model(x)
    for hook in hooks:
        hook.remove()
    return records


def _scale(act) -> float:
    return float(act.scale.detach()) if isinstance(act.scale, torch.Tensor) else act.scale


def _exact_values(record) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 re-derivation of one block's pre-quantization value v = norm(layer(x)) / scale, and a
    bound on the float32 error either implementation can make in it."""
    layer, norm, act = record["layer"], record["norm"], record["act"]
    packed = layer.packed_weight()
    weight = packed.dequantize().double()
    x = record["input"].double()
    if isinstance(layer, mnn.QuantConv2d):
        weight = weight.reshape(layer.weight.shape)
        conv = lambda inp, w: nn.functional.conv2d(inp, w, None, layer.stride, layer.padding)  # noqa: E731
        y, magnitude = conv(x, weight), conv(x.abs(), weight.abs())
        shape = (1, -1, 1, 1)
    else:
        y, magnitude = x @ weight.T, x.abs() @ weight.abs().T
        shape = (1, -1)
    bias = layer.bias.double().reshape(shape)
    a, b = (t.double().reshape(shape) for t in norm.inference_affine())
    scale = _scale(act)
    v = ((y + bias) * a + b) / scale
    bound = TIE_ULPS * ((magnitude + bias.abs()) * a.abs() + b.abs()) / scale + 1e-6 * v.abs()
    return v, bound


def _assert_codes_equal_except_ties(got, want, v, bound):
    got, want = got.cpu().to(torch.int16), want.cpu().to(torch.int16)
    assert got.shape == want.shape
    distance = (v - v.floor() - 0.5).abs().cpu()
    excused = distance <= bound.cpu()
    differ = got != want
    assert not (differ & ~excused).any(), f"{int((differ & ~excused).sum())} codes differ away from a tie"
    assert (got - want).abs().max() <= 1
    assert excused.float().mean() < 0.05, "too many near-ties for a meaningful comparison"


def _codes_of(record):
    return torch.round(record["output"] / _scale(record["act"]))


def _fused_layers(converted):
    return [m for m in converted.modules() if isinstance(m, mnn.LowBitLinear)]


def _check_layer_by_layer(model, converted, x):
    """Each fused layer, given the original's input codes, writes the original's output codes."""
    records = _layer_values(model, x)
    fused = _fused_layers(converted)
    assert len(fused) == len(records)
    for record, layer in zip(records, fused):
        x_in = record["input"]
        if layer.act_bits is not None:
            x_in = mk.quantize(x_in, layer.act_bits, layer.act_scale, signed=False)
        got = layer(x_in)
        if layer.out_bits is None:
            continue
        assert got.dtype == torch.uint8
        _assert_codes_equal_except_ties(got, _codes_of(record), *_exact_values(record))


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize(
    "depth,width,weight_bits,act_bits,groups",
    [(1, 8, 4, 4, 1), (2, 33, 2, 2, 1), (3, 64, 4, 8, 4), (5, 17, 8, 4, 17), (2, 130, 1, 4, 2)],
)
def test_converted_mlp_equals_the_original(backend, device, depth, width, weight_bits, act_bits, groups):
    torch.manual_seed(depth * 100 + width)
    model = _trained(_mlp(depth, width, weight_bits, act_bits, backend, groups=groups), (64, 24), device)
    converted = mk.convert_for_inference(model)
    x = _inputs((200, 24), device)
    _check_layer_by_layer(model, converted, x)
    with torch.no_grad():
        want, got = model(x), converted(x)
    # Whole-model: every sample whose path met no tie agrees to float32 rounding of the last layer.
    close = (got - want).abs().amax(dim=1) <= 1e-4 * want.abs().amax(dim=1).clamp(min=1)
    assert close.float().mean() >= 0.97


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("depth,width,groups", [(2, 33, 1), (3, 64, 4)])
def test_converted_psp_mlp_equals_the_original(backend, device, depth, width, groups):
    """PSPNorm in place of LayerBatchNorm: folded into the same epilogue, codes equal but at ties."""
    torch.manual_seed(depth * 100 + width)
    model = _trained(_mlp(depth, width, 4, 4, backend, groups=groups, norm=mnn.PSPNorm), (64, 24), device)
    converted = mk.convert_for_inference(model)
    assert not any(isinstance(m, mnn.PSPNorm) for m in converted.modules())
    assert all(layer.out_scale is not None for layer in _fused_layers(converted))
    x = _inputs((200, 24), device)
    _check_layer_by_layer(model, converted, x)
    with torch.no_grad():
        want, got = model(x), converted(x)
    close = (got - want).abs().amax(dim=1) <= 1e-4 * want.abs().amax(dim=1).clamp(min=1)
    assert close.float().mean() >= 0.97


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("norm", NORMS)
def test_converted_convnet_equals_the_original(backend, device, norm):
    torch.manual_seed(1)
    model = _trained(_convnet(backend, norm), (16, 3, 8, 8), device)
    converted = mk.convert_for_inference(model)
    kinds = [type(m).__name__ for m in converted]
    assert kinds == [
        "Quantize", "LowBitConv2d", "Identity", "Identity", "LowBitConv2d", "Identity", "Identity",
        "Flatten", "LowBitLinear", "Identity", "Dequantize", "Linear",
    ]  # fmt: skip
    x = _inputs((24, 3, 8, 8), device)
    _check_layer_by_layer(model, converted, x)
    with torch.no_grad():
        want, got = model(x), converted(x)
    close = (got - want).abs().amax(dim=1) <= 1e-4 * want.abs().amax(dim=1).clamp(min=1)
    assert close.float().mean() >= 0.9


def test_codes_flow_between_fused_layers_and_floats_only_where_needed():
    model = _trained(_mlp(3, 16, 4, 4, None), (32, 24), "cpu").train()
    converted = mk.convert_for_inference(model)
    assert model.training and isinstance(model[1], mnn.QuantLinear), "the original was modified"
    assert not converted.training
    seen = []
    for module in converted:
        module.register_forward_hook(lambda m, args, out: seen.append((type(m).__name__, args[0].dtype, out.dtype)))
    converted(_inputs((5, 24), "cpu"))
    fused = [(name, i, o) for name, i, o in seen if name == "LowBitLinear"]
    assert [i for _, i, _ in fused] == [torch.uint8] * 3 and [o for _, _, o in fused] == [torch.uint8] * 3
    assert seen[-1] == ("Linear", torch.float32, torch.float32)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("norm", NORMS)
def test_float_layers_fold_their_norm(layer, norm):
    torch.manual_seed(2)
    if layer == "linear":
        model = nn.Sequential(nn.Linear(10, 6, bias=False), norm(6, groups=2), nn.ReLU())
        shape = (16, 10)
    else:
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm(6, groups=3), nn.ReLU())
        shape = (4, 3, 5, 5)
    model = _trained(model, shape, "cpu")
    converted = mk.convert_for_inference(model)
    assert isinstance(converted[1], nn.Identity) and converted[0].bias is not None
    x = _inputs(shape, "cpu")
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


class _Residual(nn.Module):
    """A custom module: its children are converted one by one, its Sequential is fused."""

    def __init__(self, features):
        super().__init__()
        self.body = nn.Sequential(
            mnn.QuantAct(4),
            mnn.QuantLinear(features, features, weight_bits=4),
            mnn.LayerBatchNorm(features),
            mnn.QuantAct(4),
        )
        self.skip = mnn.QuantLinear(features, features, weight_bits=2)

    def forward(self, x):
        return self.body(x) + self.skip(x)


def test_nested_modules_are_converted():
    torch.manual_seed(3)
    model = _trained(nn.Sequential(_Residual(12), nn.ReLU(), _Residual(12)), (32, 12), "cpu")
    converted = mk.convert_for_inference(model)
    for block in (converted[0], converted[2]):
        assert isinstance(block.body[0], mnn.Quantize) and isinstance(block.body[1], mnn.LowBitLinear)
        assert isinstance(block.body[3], mnn.Dequantize) and isinstance(block.skip, mnn.LowBitLinear)
        assert block.skip.act_bits is None and block.skip.out_bits is None
    x = _inputs((40, 12), "cpu")
    with torch.no_grad():
        want, got = model(x), converted(x)
    close = (got - want).abs().amax(dim=1) <= 1e-4 * want.abs().amax(dim=1).clamp(min=1)
    assert close.float().mean() >= 0.95


@pytest.mark.parametrize("norm", NORMS)
def test_time_first_norm_after_a_quantized_layer_folds(norm):
    torch.manual_seed(4)
    model = nn.Sequential(
        mnn.QuantAct(4), mnn.QuantLinear(8, 6, weight_bits=4), norm(6, time_first=True), mnn.QuantAct(4)
    )
    model = _trained(model, (4, 3, 8), "cpu")
    converted = mk.convert_for_inference(model)
    x = _inputs((4, 5, 8), "cpu")
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-6)


def test_state_dict_round_trip_of_a_converted_model():
    torch.manual_seed(5)
    converted = mk.convert_for_inference(_trained(_convnet(None), (16, 3, 8, 8), "cpu"))
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    fresh = mk.convert_for_inference(_convnet(None).eval())
    # The learned activation scale lives on in the fused layers on both sides of it.
    assert converted[4].out_act_scale == converted[8].act_scale != fresh[8].act_scale
    fresh.load_state_dict(torch.load(buffer))
    x = _inputs((6, 3, 8, 8), "cpu")
    assert torch.equal(fresh(x), converted(x))


def test_lbn_trains_after_saf_layers():
    """LayerBatchNorm on the time-first traces of a SAF layer: gradients reach the SAF weights."""
    torch.manual_seed(6)
    model = nn.Sequential(mnn.SAFLinear(8, 16), mnn.LayerBatchNorm(16, time_first=True), mnn.SAFLinear(16, 4))
    traces = mnn.SpikeTrace()(torch.rand(5, 3, 8).bernoulli())
    model(traces).square().mean().backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[1].weight.grad.abs().sum() > 0
    assert model[1].running_var.ne(1).all()


def test_mismatched_norm_is_left_alone_and_bad_inputs_are_refused():
    """A LayerBatchNorm whose features are not the layer's outputs (it normalizes another axis)
    is not folded; a fused conv names the input it expected."""
    model = _trained(nn.Sequential(mnn.QuantLinear(6, 4, weight_bits=4), mnn.LayerBatchNorm(3)), (3, 3, 6), "cpu")
    converted = mk.convert_for_inference(model)
    assert isinstance(converted[0], mnn.LowBitLinear) and converted[0].out_scale is None
    assert isinstance(converted[1], mnn.LayerBatchNorm)
    x = _inputs((2, 3, 6), "cpu")
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    conv = mk.convert_for_inference(nn.Sequential(mnn.QuantConv2d(3, 4, 3, weight_bits=2)))[0]
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\)"):
        conv(torch.randn(2, 5, 6, 6))
