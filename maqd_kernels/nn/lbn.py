"""The Layer-Batch Normalization module (MaQD, Sawada et al., arXiv 2403.14999; SPEC.md section 3)."""

from __future__ import annotations

import torch
from torch import nn

from ..lbn import op

Tensor = torch.Tensor


class LayerBatchNorm(nn.Module):
    """Normalizes (N, C, *) inputs with one mean and variance per group of C/groups channels over
    (N, C/groups, *): groups=1 is LBN (works at any batch size, batch 1 included), groups=C is
    BatchNorm. Running statistics (one per group) serve eval mode, where LBN is a per-channel affine
    that folds into the preceding layer (``lbn_inference_affine``, ``fold_affine``, and
    ``convert_for_inference`` for whole models).

    With ``time_first=True`` the input is a time-first SNN tensor (T, B, C, *), such as the traces
    of SAFLinear / SAFConv2d, and the time axis is folded into the batch: statistics over (T, B, *).
    ``backend`` picks the kernels ("cuda", "triton", "reference"; None chooses by device).
    """

    def __init__(
        self,
        num_features: int,
        groups: int = 1,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        *,
        time_first: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        if num_features % groups:
            raise ValueError(f"groups must divide num_features {num_features}; got groups={groups}")
        self.num_features, self.groups, self.eps, self.momentum = num_features, groups, eps, momentum
        self.time_first, self.backend = time_first, backend
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(groups))
        self.register_buffer("running_var", torch.ones(groups))

    def forward(self, x: Tensor) -> Tensor:
        if not self.time_first:
            return self._normalize(x)
        if x.dim() < 3:
            raise ValueError(f"a time-first LayerBatchNorm takes (T, B, C, *) inputs; got shape {tuple(x.shape)}")
        return self._normalize(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def _normalize(self, x: Tensor) -> Tensor:
        return op.layer_batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            groups=self.groups,
            backend=self.backend,
        )

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """(a, b), each (num_features,): eval-mode LBN as y = a x + b."""
        return op.lbn_inference_affine(
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            eps=self.eps,
            groups=self.groups,
            channels=self.num_features,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, groups={self.groups}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.weight is not None}" + (", time_first=True" if self.time_first else "")
        )
