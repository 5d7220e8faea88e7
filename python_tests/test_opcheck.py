"""torch.library.opcheck on every custom op in namespace maqd: schema, fake (meta) impl,
autograd registration and AOT dispatch. A new op without a case here fails the coverage test."""

import pytest
import torch

import maqd_kernels as mk  # noqa: F401  (registers the ops)

ops = torch.ops.maqd


def _r(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _cases():
    neuron = (0.5, 1.0, "saf_e", "sigmoid", 4.0, 1, 0, None)
    neuron_f = (0.7, 0.9, "saf_f", "rectangle", 2.0, 2, 3, None)
    backward_e, backward_f = (0.5, 1.0, "saf_e", "s2nn", 4.0, 2, None), (0.7, 0.9, "saf_f", "sigmoid", 4.0, 1, None)
    mask = torch.randint(-(2**31), 2**31 - 1, (4, 1), dtype=torch.int32)
    packed = mk.pack_weight(torch.randn(5, 11), 3)
    scale, state = torch.tensor(0.7), torch.rand(3, 4)
    return {
        "saf_neuron": [
            (_r(4, 3, 4, grad=True), None) + neuron[:-1] + (False, None),
            ((torch.randn(3, 3, 4) + 1).requires_grad_(True), state) + neuron_f[:-1] + (True, None),
            ((torch.randn(3, 3, 4) + 1), state) + neuron_f[:-1] + (False, None),
        ],
        "saf_neuron_backward": [
            (_r(4, 3, 4), torch.tensor(0.5), _r(4, 3, 4), None, state) + backward_e,
            (_r(4, 3, 4), torch.tensor(0.5), None, mask, None) + backward_f,
        ],
        "spike_trace": [(_r(5, 2, 3, grad=True), None, 0.5, None), (_r(2, 3, 4, grad=True), state, 0.8, None)],
        "saf_readout": [(_r(5, 2, 3, grad=True), None, 0.5, None), (_r(2, 3, 4, grad=True), state, 0.8, None)],
        "saf_linear": [
            (_r(4, 3, 6, grad=True), _r(4, 6, grad=True), _r(4, grad=True), state) + neuron,
            (_r(4, 3, 6, grad=True), _r(4, 6, grad=True), None, None) + neuron_f,
        ],
        "saf_linear_backward": [(_r(4, 3, 4), torch.tensor(1.0), _r(4, 3, 6), _r(4, 6), _r(4), None) + neuron_f],
        "saf_bias_factors": [(_r(6, 2, grad=True), 0.6, 4)],
        "lif_neuron": [
            (_r(5, 3, grad=True), 0.5, 1.0, "sigmoid", 4.0, False),
            (_r(5, 3, grad=True), 0.5, 1.0, "s2nn", 4.0, True),
        ],
        "lif_neuron_backward": [
            (_r(5, 3), _r(5, 3), 0.5, 1.0, "s2nn", 4.0, False),
            (_r(5, 3), _r(5, 3), 0.5, 1.0, "rectangle", 4.0, True),
        ],
        "ottt_linear": [
            (_r(4, 2, 5, grad=True), _r(3, 5, grad=True), _r(3, grad=True), 0.5),
            (_r(4, 2, 5, grad=True), _r(3, 5, grad=True), None, 0.5),
        ],
        "ottt_linear_backward": [(_r(4, 2, 3), _r(4, 2, 5), _r(3, 5), None, 0.5)],
        "weight_standardize": [(_r(4, 3, 2, grad=True), 1e-5, None)],
        "weight_standardize_backward": [(_r(4, 6), _r(4, 6), 1e-5, None)],
        "round_clip": [
            (_r(5, 7, grad=True), None, 0.6, 4, True, "ste", 4.0, None),
            (_r(5, 7, grad=True), scale.clone().requires_grad_(True), 0.0, 1, True, "sigmoid", 3.0, None),
            (_r(5, 7, grad=True), torch.rand(5, 1, requires_grad=True), 0.0, 3, False, "ste", 4.0, None),
        ],
        "round_clip_backward": [(_r(5, 7), _r(5, 7), torch.rand(1, 7) + 0.1, 0.0, 2, True, "sigmoid", 4.0, None)],
        "quantize": [(_r(5, 7), None, 0.5, 4, False, None), (_r(5, 7), torch.rand(5, 1) + 0.1, 0.0, 1, True, None)],
        "pack_weight": [
            (_r(5, 11), None, 0.8, 2, True, 1e-5, None),
            (_r(5, 11), torch.rand(5, 1, requires_grad=True), 0.0, 8, False, 1e-5, None),
        ],
        "unpack_weight": [(packed.packed, 3, 11, None)],
        "lowbit_linear": [
            (
                _r(2, 11, grad=True),
                packed.packed,
                packed.scale,
                3,
                11,
                _r(5, grad=True),
                None,
                None,
                _r(5, grad=True),
                _r(5, grad=True),
                None,
                None,
                None,
            ),
            (_r(2, 11, grad=True), packed.packed, packed.scale, 3, 11, None, 4, 0.3, None, None, None, None, None),
            (
                torch.randint(0, 255, (3, 11), dtype=torch.uint8),
                packed.packed,
                packed.scale,
                3,
                11,
                _r(5),
                None,
                0.1,
                _r(5),
                _r(5),
                4,
                0.2,
                None,
            ),
        ],
        "lowbit_linear_backward": [
            (_r(2, 5), _r(2, 11), packed.packed, packed.scale, 3, 11, _r(5), 4, 0.3, _r(5), _r(5), None),
            (
                _r(2, 5),
                torch.randint(0, 255, (2, 11), dtype=torch.uint8),
                packed.packed,
                packed.scale,
                3,
                11,
                _r(5),
                None,
                0.3,
                None,
                None,
                None,
            ),
        ],
        "quant_linear": [
            (_r(3, 6, grad=True), _r(4, 6, grad=True), _r(4, grad=True), 2, 1.2, 4, 0.2, "ste", None),
            (_r(3, 6, grad=True), _r(4, 6, grad=True), None, 1, 0.8, None, None, "sigmoid", None),
        ],
        "quant_linear_backward": [(_r(3, 4), _r(3, 6), _r(4, 6), _r(4), 4, 0.35, 4, 0.2, "sigmoid", None)],
        "quant_conv2d": [
            (
                _r(2, 4, 5, 5, grad=True),
                _r(6, 2, 3, 3, grad=True),
                _r(6, grad=True),
                [1, 1],
                [1, 1],
                [1, 1],
                2,
                3,
                0.65,
                4,
                0.2,
                "ste",
                None,
            )
        ],
        "quant_conv2d_backward": [
            (
                _r(2, 6, 2, 2),
                _r(2, 4, 5, 5),
                _r(6, 4, 3, 3),
                None,
                [2, 2],
                [0, 0],
                [1, 1],
                1,
                2,
                1.2,
                None,
                None,
                "ste",
                None,
            )
        ],
        "layer_batch_norm": [
            (
                _r(4, 6, 3, grad=True),
                _r(6, grad=True),
                _r(6, grad=True),
                torch.zeros(2),
                torch.ones(2),
                True,
                0.1,
                1e-5,
                2,
                None,
            ),
            (_r(4, 6, 3, grad=True), None, None, torch.zeros(6), torch.ones(6), False, 0.1, 1e-5, 6, None),
            (_r(1, 6, grad=True), _r(6, grad=True), None, None, None, True, 0.1, 1e-5, 1, None),
        ],
        "layer_batch_norm_backward": [
            (_r(4, 6, 3), _r(4, 6, 3), _r(6), None, _r(3), torch.rand(3) + 0.5, True, 3, None)
        ],
        "lbn_inference_affine": [
            (
                _r(6, grad=True),
                _r(6, grad=True),
                _r(3, grad=True),
                (torch.rand(3) + 0.5).requires_grad_(True),
                1e-5,
                3,
                6,
                None,
            ),
            (None, None, _r(1), torch.rand(1) + 0.5, 1e-5, 1, 4, None),
        ],
        "lbn_inference_affine_backward": [(_r(6), _r(6), _r(6), None, _r(2), torch.rand(2) + 0.5, 1e-5, 2, 6, None)],
        "fold_affine": [
            (_r(6, 3, 2, 2, grad=True), _r(6, grad=True), _r(6, grad=True), _r(6, grad=True), None),
            (_r(6, 5, grad=True), None, _r(6, grad=True), _r(6, grad=True), None),
        ],
        "fold_affine_backward": [(_r(6, 5), _r(6), _r(6, 5), _r(6), _r(6), _r(6), None)],
    }


CASES = _cases()
REGISTERED = sorted(
    name.removeprefix("maqd::") for name in torch._C._dispatch_get_all_op_names() if name.startswith("maqd::")
)


def test_every_registered_op_has_a_case():
    assert sorted(CASES) == REGISTERED


@pytest.mark.parametrize("name", REGISTERED)
def test_opcheck(name):
    op = getattr(ops, name).default
    for args in CASES[name]:
        torch.library.opcheck(op, args)
