"""MaQD round-clip quantization and low-bit matmul (SPEC.md section 2)."""

from .op import (
    PackedWeight,
    default_scale,
    lowbit_linear,
    pack_weight,
    quant_conv2d,
    quant_linear,
    quantize,
    round_clip,
    weight_standardize,
)

__all__ = [
    "PackedWeight",
    "default_scale",
    "lowbit_linear",
    "pack_weight",
    "quant_conv2d",
    "quant_linear",
    "quantize",
    "round_clip",
    "weight_standardize",
]
