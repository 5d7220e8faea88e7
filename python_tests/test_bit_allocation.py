"""Bit budgets, weight kurtosis, layer sensitivity and the bit allocator (maqd_kernels.bit_allocation;
SPEC.md section 4), and the example that compares allocations on real data."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maqd_kernels as mk
from maqd_kernels import nn as mnn

from helpers import requires_gpu, run_example

DEVICES = ("cpu", pytest.param("cuda", marks=requires_gpu))


def _standardized(weight: torch.Tensor) -> torch.Tensor:
    """SPEC.md section 2's weight standardization, in float64, per output channel."""
    w = weight.detach().double().flatten(1)
    centered = w - w.mean(1, keepdim=True)
    return (centered / torch.sqrt(centered.square().mean(1, keepdim=True) + 1e-5)).view_as(weight)


def _round_clipped(w_hat: torch.Tensor, bits: int) -> torch.Tensor:
    """SPEC.md section 2's signed round-clip at the default scale, written out."""
    scale = mk.default_scale(bits, True)
    if bits == 1:
        return torch.where(w_hat >= 0, scale, -scale)
    top = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w_hat / scale), -top, top) * scale


def _mlp() -> nn.Sequential:
    """8-bit input codes -> QuantLinear(6, 5, W4) -> LBN -> QuantAct(3) -> Flatten -> QuantLinear(5,
    4, W2, no bias) -> ReLU -> QuantLinear(4, 3, W8)."""
    return nn.Sequential(
        mnn.QuantAct(8, scale=1 / 255),
        mnn.QuantLinear(6, 5, weight_bits=4),
        mnn.LayerBatchNorm(5),
        mnn.QuantAct(3),
        nn.Flatten(),
        mnn.QuantLinear(5, 4, bias=False, weight_bits=2),
        nn.ReLU(),
        mnn.QuantLinear(4, 3, weight_bits=8),
    )


def _rows(budgets):
    return [
        (b.name, b.weight_bits, b.input_bits, b.steps, b.bit_budget, b.weights, b.parameters, b.weight_memory_bits)
        for b in budgets
    ]


# ----------------------------------------------------------------------------- bit_budget


def test_bit_budget_of_a_quantized_mlp_equals_the_hand_count():
    # B_s: 8 from the input QuantAct; 3 from QuantAct(3) through Flatten; 32 after a quantized
    # layer, through ReLU. T = 1 for a model without spiking modules, whatever steps says.
    expected = [
        ("1", 4, 8, 1, 4 * 8, 30, 35, 30 * 4),
        ("5", 2, 3, 1, 2 * 3, 20, 20, 20 * 2),
        ("7", 8, 32, 1, 8 * 32, 12, 15, 12 * 8),
    ]
    assert _rows(mk.bit_budget(_mlp())) == expected
    assert _rows(mk.bit_budget(_mlp(), steps=4)) == expected


def test_bit_budget_of_a_spiking_model_counts_steps_and_spike_bits():
    model = nn.Sequential(
        mnn.SpikeTrace(),
        mnn.QuantLinear(6, 5, weight_bits=4),
        mnn.LayerBatchNorm(5, time_first=True),
        mnn.SAFNeuron(spike_bits=2),
        mnn.QuantLinear(5, 4, weight_bits=2),
        mnn.SAFLinear(4, 4, spike_bits=3),
        mnn.QuantLinear(4, 3, bias=False, weight_bits=8),
        mnn.SAFReadout(),
    )
    assert _rows(mk.bit_budget(model, steps=4)) == [
        ("1", 4, 32, 4, 4 * 4 * 32, 30, 35, 120),  # reads the float image's trace
        ("4", 2, 2, 4, 4 * 2 * 2, 20, 24, 40),
        ("6", 8, 3, 4, 4 * 8 * 3, 12, 12, 96),
    ]


def test_bit_budget_of_a_nested_conv_model_names_layers_by_qualified_name():
    model = nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Sequential(mnn.QuantAct(4), mnn.QuantConv2d(1, 2, 3, padding=1, weight_bits=2)),
        nn.Sequential(nn.MaxPool2d(2), mnn.QuantConv2d(2, 3, 3, bias=False, weight_bits=4)),
    )
    assert _rows(mk.bit_budget(model)) == [("1.1", 2, 4, 1, 8, 18, 20, 36), ("2.1", 4, 32, 1, 128, 54, 54, 216)]


def test_bit_budget_rejects_a_model_without_quantized_layers_and_bad_steps():
    with pytest.raises(ValueError, match="no quantized layer"):
        mk.bit_budget(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="steps"):
        mk.bit_budget(_mlp(), steps=0)


# ----------------------------------------------------------------------------- weight_kurtosis


def test_weight_kurtosis_is_pearsons_of_the_standardized_weights():
    model = _mlp()
    kurtosis = mk.weight_kurtosis(model)
    assert list(kurtosis) == ["1", "5", "7"]
    for name, layer in model.named_modules():
        if isinstance(layer, mnn.QuantLinear):
            values = _standardized(layer.weight).flatten()
            centered = values - values.mean()
            expected = (centered**4).mean() / (centered**2).mean() ** 2
            assert kurtosis[name] == pytest.approx(expected.item(), rel=1e-6)


def test_weight_kurtosis_is_three_for_gaussian_weights_more_for_heavy_tails_and_ignores_channel_scales():
    gaussian, heavy = mnn.QuantLinear(4096, 64, weight_bits=2), mnn.QuantLinear(4096, 64, weight_bits=2)
    with torch.no_grad():
        gaussian.weight.normal_()
        # Laplace weights: kurtosis 6. Row scales spanning 100x would make the raw weights' pooled
        # kurtosis far larger; standardization per channel removes them.
        heavy.weight.copy_(torch.distributions.Laplace(0.0, 1.0).sample((64, 4096)))
        heavy.weight.mul_(torch.logspace(-1, 1, 64).unsqueeze(1))
    kurtosis = mk.weight_kurtosis(nn.Sequential(gaussian, heavy))
    assert kurtosis["0"] == pytest.approx(3.0, abs=0.05)
    assert kurtosis["1"] == pytest.approx(6.0, abs=0.3)


# ----------------------------------------------------------------------------- layer_sensitivity


@pytest.mark.parametrize("device", DEVICES)
def test_layer_sensitivity_is_the_normalised_error_of_the_layer_forward_at_those_bits(device):
    model = _mlp().to(device)
    x = torch.rand(32, 6, device=device)
    model.eval()
    hidden = model[:5](x)  # what layer "5" reads, as layer_sensitivity runs the model: in eval mode
    for bits in (1, 2, 3, 5, 8):
        sensitivity = mk.layer_sensitivity(model, x, bits=bits)
        layer = mnn.QuantLinear(5, 4, bias=False, weight_bits=bits).to(device)
        layer.weight.data.copy_(model[5].weight)
        exact = F.linear(hidden, _standardized(model[5].weight).float())
        expected = (layer(hidden) - exact).square().mean() / exact.square().mean()
        assert sensitivity["5"] == pytest.approx(expected.item(), rel=1e-4)
        by_hand = F.linear(hidden, _round_clipped(_standardized(model[5].weight), bits).float())
        assert torch.allclose(layer(hidden), by_hand, atol=1e-5)
    assert model[5].weight_bits == 2  # the model itself is untouched


def test_layer_sensitivity_of_a_conv_layer_and_default_bits():
    model = nn.Sequential(mnn.QuantConv2d(2, 3, 3, stride=2, padding=1, weight_bits=3))
    x = torch.randn(4, 2, 7, 7)
    weight, bias = model[0].weight, model[0].bias
    exact = F.conv2d(x.double(), _standardized(weight), bias.double(), 2, 1)
    quantized = F.conv2d(x.double(), _round_clipped(_standardized(weight), 3), bias.double(), 2, 1)
    expected = ((quantized - exact).square().mean() / exact.square().mean()).item()
    assert mk.layer_sensitivity(model, x)["0"] == pytest.approx(expected, rel=1e-4)
    assert mk.layer_sensitivity(model, x, bits=3)["0"] == pytest.approx(expected, rel=1e-4)


def test_layer_sensitivity_falls_as_bits_grow_and_is_larger_for_weights_with_outliers():
    plain, outliers = mnn.QuantLinear(64, 64, weight_bits=2), mnn.QuantLinear(64, 64, weight_bits=2)
    with torch.no_grad():
        outliers.weight.copy_(plain.weight)
        outliers.weight[:, :2] *= 30  # two large weights per channel widen the standardized range
    x = torch.randn(256, 64)
    by_bits = [
        (
            mk.layer_sensitivity(nn.Sequential(plain), x, bits=b)["0"],
            mk.layer_sensitivity(nn.Sequential(outliers), x, bits=b)["0"],
        )
        for b in range(1, 9)
    ]
    for (plain_low, outlier_low), (plain_high, outlier_high) in zip(by_bits, by_bits[1:]):
        assert plain_high < plain_low and outlier_high < outlier_low
    for plain_error, outlier_error in by_bits[1:]:  # binary weights lose the outliers' size either way
        assert outlier_error > 2 * plain_error
    assert by_bits[-1][0] < 1e-3


def test_layer_sensitivity_restores_training_mode_and_running_statistics():
    model = _mlp().train()
    running = model[2].running_mean.clone()
    mk.layer_sensitivity(model, torch.rand(8, 6), bits=2)
    assert all(m.training for m in model.modules())
    assert torch.equal(model[2].running_mean, running)


def test_layer_sensitivity_rejects_bad_bits_inputs_and_layers_that_do_not_run():
    with pytest.raises(ValueError, match="bits"):
        mk.layer_sensitivity(_mlp(), torch.rand(2, 6), bits=9)
    with pytest.raises(TypeError, match="calibration_inputs"):
        mk.layer_sensitivity(_mlp(), 3.0)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = mnn.QuantLinear(3, 3, weight_bits=2), mnn.QuantLinear(3, 3, weight_bits=2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="unused did not run"):
        mk.layer_sensitivity(Skips(), torch.rand(2, 3))


# ----------------------------------------------------------------------------- allocate_bits, apply_bits


def _layers_with_kurtosis(sizes: list[int], outliers: list[float]) -> nn.Sequential:
    """QuantLinear(size, 16) layers (not a runnable chain: for the weight-only kurtosis score) whose
    weight rows are evenly spaced in [-1, 1] with the first replaced by -outlier: a larger outlier
    (beyond 1), a higher kurtosis."""
    layers = []
    for size, outlier in zip(sizes, outliers):
        layer = mnn.QuantLinear(size, 16, weight_bits=2)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(-1, 1, size))
            layer.weight[:, 0] = -outlier
        layers.append(layer)
    return nn.Sequential(*layers)


def _memory(model: nn.Module, allocation: dict[str, int]) -> int:
    return sum(row.weights * allocation[row.name] for row in mk.bit_budget(model))


def test_allocator_spends_the_budget_on_the_highest_kurtosis_layers_first():
    model = _layers_with_kurtosis([8, 8, 8, 8], [1, 20, 2, 8])
    kurtosis = mk.weight_kurtosis(model)
    assert kurtosis["1"] > kurtosis["3"] > kurtosis["2"] > kurtosis["0"]
    weights = 8 * 16
    base = 4 * weights * 2
    step = weights * 2  # one layer from 2 to 4 bits
    allocate = lambda budget: mk.allocate_bits(model, budget, score="kurtosis")  # noqa: E731
    assert allocate(base) == {"0": 2, "1": 2, "2": 2, "3": 2}
    assert allocate(base + step - 1) == {"0": 2, "1": 2, "2": 2, "3": 2}
    assert allocate(base + step) == {"0": 2, "1": 4, "2": 2, "3": 2}
    assert allocate(base + 2 * step) == {"0": 2, "1": 4, "2": 2, "3": 4}
    # Every layer gets a step before the top one gets its second (4 -> 8 costs two steps).
    assert allocate(base + 5 * step) == {"0": 4, "1": 4, "2": 4, "3": 4}
    assert allocate(base + 6 * step) == {"0": 4, "1": 8, "2": 4, "3": 4}
    assert allocate(base + 100 * step) == {"0": 8, "1": 8, "2": 8, "3": 8}


def test_allocator_lets_smaller_layers_use_what_a_large_top_layer_cannot():
    model = _layers_with_kurtosis([64, 8, 8], [20, 1, 3])
    base = (64 + 8 + 8) * 16 * 2
    # The top layer's step (64 * 16 * 2 bits) does not fit; the next ones, in score order, do.
    assert mk.allocate_bits(model, base + 8 * 16 * 2, score="kurtosis") == {"0": 2, "1": 2, "2": 4}
    assert mk.allocate_bits(model, base + 8 * 16 * 4, score="kurtosis") == {"0": 2, "1": 4, "2": 4}


def test_allocator_never_exceeds_the_budget_uses_only_the_choices_and_leaves_nothing_that_fits():
    model = _layers_with_kurtosis([40, 8, 24, 16, 4], [3, 1, 8, 2, 20])
    rows = mk.bit_budget(model)
    total = sum(row.weights for row in rows)
    for budget in range(total, 9 * total, 679):
        for choices in ((2, 4, 8), (1, 3, 5), (4,)):
            for base in (b for b in choices if min(choices) * total <= budget):
                allocation = mk.allocate_bits(model, budget, choices=choices, base_bits=base, score="kurtosis")
                used = _memory(model, allocation)
                assert used <= budget
                assert set(allocation.values()) <= set(choices)
                for row in rows:
                    higher = [c for c in choices if c > allocation[row.name]]
                    if higher:
                        assert used + row.weights * (higher[0] - allocation[row.name]) > budget


def test_allocator_by_sensitivity_raises_the_layer_with_outliers():
    first, second = mnn.QuantLinear(32, 32, weight_bits=2), mnn.QuantLinear(32, 32, weight_bits=2)
    with torch.no_grad():
        second.weight[:, :1] *= 30
    model = nn.Sequential(first, mnn.LayerBatchNorm(32), mnn.QuantAct(4), second)
    x = torch.randn(128, 32)
    sensitivity = mk.layer_sensitivity(model, x, bits=2)
    assert sensitivity["3"] > sensitivity["0"]
    budget = 32 * 32 * (2 + 4)
    assert mk.allocate_bits(model, budget, calibration_inputs=x) == {"0": 2, "3": 4}
    assert mk.allocate_bits(model, budget + 32 * 32 * 2, calibration_inputs=x) == {"0": 4, "3": 4}


def test_allocator_ranks_a_layer_without_a_kurtosis_last():
    model = nn.Sequential(mnn.QuantLinear(1, 4, weight_bits=2), mnn.QuantLinear(8, 4, weight_bits=2))
    kurtosis = mk.weight_kurtosis(model)
    assert math.isnan(kurtosis["0"]) and kurtosis["1"] > 0  # one input per channel: standardized to zeros
    # Room for one step of the larger layer: had the nan layer ranked first, its cheaper step would
    # have left too little for the other's.
    assert mk.allocate_bits(model, (4 + 32) * 2 + 32 * 2, score="kurtosis") == {"0": 2, "1": 4}


def test_allocator_steps_down_from_a_base_that_does_not_fit_lowest_score_first():
    model = _layers_with_kurtosis([8, 8, 8], [1, 20, 3])
    weights = 8 * 16
    allocation = mk.allocate_bits(model, weights * (4 + 4 + 2), base_bits=4, score="kurtosis")
    assert allocation == {"0": 2, "1": 4, "2": 4}
    allocation = mk.allocate_bits(model, weights * (4 + 2 + 2), base_bits=4, score="kurtosis")
    assert allocation == {"0": 2, "1": 4, "2": 2}


def test_allocator_rejects_an_impossible_budget_and_bad_arguments():
    model = _layers_with_kurtosis([8, 8], [1, 3])
    with pytest.raises(ValueError, match=r"memory_budget_bits=511 is below the 512 bits"):
        mk.allocate_bits(model, 2 * 8 * 16 * 2 - 1, score="kurtosis")
    with pytest.raises(ValueError, match="calibration_inputs"):
        mk.allocate_bits(model, 10_000)
    with pytest.raises(ValueError, match="base_bits"):
        mk.allocate_bits(model, 10_000, base_bits=3, score="kurtosis")
    with pytest.raises(ValueError, match="score"):
        mk.allocate_bits(model, 10_000, score="hessian")
    with pytest.raises(ValueError, match="choices"):
        mk.allocate_bits(model, 10_000, choices=(2, 16), score="kurtosis")


@pytest.mark.parametrize("device", DEVICES)
def test_apply_bits_changes_the_outputs_to_those_of_a_model_built_at_those_bits(device):
    torch.manual_seed(1)
    model = _mlp().to(device).eval()
    x = torch.rand(16, 6, device=device)
    before = model(x)
    returned = mk.apply_bits(model, {"1": 2, "5": 8})
    assert returned is model and (model[1].weight_bits, model[5].weight_bits, model[7].weight_bits) == (2, 8, 8)
    assert model[1].weight_scale == mk.default_scale(2, True) and model[5].weight_scale == mk.default_scale(8, True)

    rebuilt = _mlp().to(device).eval()
    rebuilt[1] = mnn.QuantLinear(6, 5, weight_bits=2).to(device)
    rebuilt[5] = mnn.QuantLinear(5, 4, bias=False, weight_bits=8).to(device)
    rebuilt.load_state_dict(model.state_dict())
    after = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, rebuilt(x), rtol=0, atol=0)


def test_apply_bits_keeps_a_custom_scale_ratio_and_checks_every_name_first():
    model = _mlp()
    model[1].weight_scale = 1.5 * mk.default_scale(4, True)
    mk.apply_bits(model, {"1": 3})
    assert model[1].weight_scale == pytest.approx(1.5 * mk.default_scale(3, True), rel=1e-12)
    for allocation, error, message in (
        ({"5": 4, "nope": 2}, ValueError, "'nope', which is not a module"),
        ({"5": 4, "2": 2}, TypeError, "LayerBatchNorm, not a QuantLinear"),
        ({"5": 4, "7": 0}, ValueError, "allocation"),
    ):
        with pytest.raises(error, match=message):
            mk.apply_bits(model, allocation)
        assert model[5].weight_bits == 2  # nothing applied


# ----------------------------------------------------------------------------- the example


def test_example_smoke_run_compares_allocations_at_equal_memory(tmp_path):
    result = run_example("bit_allocation.py", "--smoke", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(tmp_path / "bit_allocation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["dataset"] for r in rows} == {"digits", "mnist"}
    for dataset in ("digits", "mnist"):
        by_name = {r["allocation"]: r for r in rows if r["dataset"] == dataset}
        assert {"uniform-3", "sensitivity", "kurtosis"} <= by_name.keys()
        budget = int(by_name["uniform-3"]["memory bits"])
        for name in ("sensitivity", "kurtosis"):
            assert int(by_name[name]["memory bits"]) <= budget
            assert set(by_name[name]["bits per layer"].split("/")) <= {"2", "4", "8"}
        for r in by_name.values():
            assert 0.0 <= float(r["test acc % mean"]) <= 100.0 and not math.isnan(float(r["test acc % std"]))
    assert "## Settings" in (tmp_path / "bit_allocation.md").read_text()
    assert (tmp_path / "bit_allocation.png").read_bytes().startswith(b"\x89PNG")
