"""The normalization modules of the LBN family: Layer-Batch Normalization (MaQD, Sawada et al.,
arXiv 2403.14999; SPEC.md section 3) and postsynaptic-potential normalization (Ikegawa et al.,
Sensors 2022; SPEC.md section 4)."""

from __future__ import annotations

import torch
from torch import nn

from ..lbn import op

Tensor = torch.Tensor


class _GroupedNormalization(nn.Module):
    """What LayerBatchNorm and PSPNorm share: channel groups, the affine, the time-first input.
    Each defines ``_normalize`` (x as (N, C, *)) and ``inference_affine`` (eval as a per-channel
    affine, which ``convert_for_inference`` folds)."""

    def __init__(
        self,
        num_features: int,
        groups: int,
        eps: float,
        momentum: float,
        affine: bool,
        time_first: bool,
        backend: str | None,
    ):
        super().__init__()
        if num_features % groups:
            raise ValueError(f"groups must divide num_features {num_features}; got groups={groups}")
        self.num_features, self.groups, self.eps, self.momentum = num_features, groups, eps, momentum
        self.time_first, self.backend = time_first, backend
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        if not self.time_first:
            return self._normalize(x)
        if x.dim() < 3:
            raise ValueError(
                f"a time-first {type(self).__name__} takes (T, B, C, *) inputs; got shape {tuple(x.shape)}"
            )
        return self._normalize(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, groups={self.groups}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.weight is not None}" + (", time_first=True" if self.time_first else "")
        )


class LayerBatchNorm(_GroupedNormalization):
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
        super().__init__(num_features, groups, eps, momentum, affine, time_first, backend)
        self.register_buffer("running_mean", torch.zeros(groups))
        self.register_buffer("running_var", torch.ones(groups))

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


class PSPNorm(_GroupedNormalization):
    """Postsynaptic-potential normalization (Ikegawa et al., Sensors 2022; SPEC.md section 4):
    y = gamma_c x / sqrt(E[x^2] + eps) + beta_c, E[x^2] the raw second moment of each group of
    C/groups channels over (N, C/groups, *), no mean subtracted (``psp_norm``). The buffer
    ``running_moment`` (one per group, starting at 1) tracks E[x^2] for eval mode, where PSPNorm is
    the per-channel affine a_c = gamma_c / sqrt(running_moment + eps), b_c = beta_c, which
    ``convert_for_inference`` folds exactly where it folds a LayerBatchNorm.

    ``time_first`` and ``backend`` as in LayerBatchNorm.
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
        super().__init__(num_features, groups, eps, momentum, affine, time_first, backend)
        self.register_buffer("running_moment", torch.ones(groups))

    def _normalize(self, x: Tensor) -> Tensor:
        return op.psp_norm(
            x,
            self.weight,
            self.bias,
            self.running_moment,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            groups=self.groups,
            backend=self.backend,
        )

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """(a, b), each (num_features,): eval-mode PSPNorm as y = a x + b, i.e. LBN's affine with a
        zero running mean and the running moment as its variance."""
        return op.lbn_inference_affine(
            self.weight,
            self.bias,
            torch.zeros_like(self.running_moment),
            self.running_moment,
            eps=self.eps,
            groups=self.groups,
            channels=self.num_features,
        )
