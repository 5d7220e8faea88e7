"""Layer-Batch Normalization and its inference folding (SPEC.md section 3)."""

from .op import fold_affine, layer_batch_norm, lbn_inference_affine

__all__ = ["fold_affine", "layer_batch_norm", "lbn_inference_affine"]
