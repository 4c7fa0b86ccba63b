"""The invertible-layer contract shared by every flow layer in densead.

Every layer maps data to latent with ``forward(x) -> (y, logdet_map)`` and back
with ``inverse(y) -> x``. The log-Jacobian-determinant is returned **per spatial
position** as a ``(B, H, W)`` map on the grid of ``y``; the usual per-sample
log-det is its sum over ``(H, W)``. Sign rule: ``forward`` returns ``log|det J|``
of the data-to-latent map; the inverse's log-det is its negative (and is not
returned, since only sampling uses the inverse).

See DESIGN.md, "The one idea: log-det maps, not scalars".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["FlowLayer", "FlowSequence", "logdet_dtype", "zero_logdet_map"]


def logdet_dtype(x: Tensor) -> torch.dtype:
    """Log-dets accumulate in float64 for float64 inputs and in float32 otherwise.

    Half-precision log-dets summed over 32×32×3 dimensions and 96 layers lose
    whole nats, so they never follow a bf16/fp16 activation dtype.
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def zero_logdet_map(y: Tensor) -> Tensor:
    """A ``(B, H, W)`` map of zeros on the grid of ``y`` (B, C, H, W)."""
    b, _, h, w = y.shape
    return y.new_zeros((b, h, w), dtype=logdet_dtype(y))


class FlowLayer(nn.Module):
    """Base class: an invertible map of ``(B, C, H, W)`` tensors.

    Subclasses implement ``forward(x) -> (y, logdet_map)`` and ``inverse(y) -> x``.
    Log-det maps are float32 (or float64 when the layer's input is float64),
    whatever the autocast state.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class FlowSequence(FlowLayer):
    """Layers applied in order; log-det maps add up (all layers keep the grid)."""

    def __init__(self, layers: Iterable[FlowLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = None
        for layer in self.layers:
            x, logdet = layer(x)
            total = logdet if total is None else total + logdet
        if total is None:
            total = zero_logdet_map(x)
        return x, total

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y
