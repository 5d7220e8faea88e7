"""Layer-Batch Normalization and its inference folding (SPEC.md section 3), and
postsynaptic-potential normalization (section 4)."""

from .op import fold_affine, layer_batch_norm, lbn_inference_affine, psp_norm

__all__ = ["fold_affine", "layer_batch_norm", "lbn_inference_affine", "psp_norm"]
