"""The latent prior: a learned per-channel affine map, then N(0, I).

This is the paper's variant (Schirrmeister et al. 2020, S1.3): each latent
``z_i`` is evaluated on its own, not conditioned on later scales. The affine
map is per channel rather than per dimension, so the prior — like the rest of
the Glow — works on any input size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from densead.flows.base import logdet_dtype

__all__ = ["GaussianPrior"]

_LOG_2PI = math.log(2 * math.pi)


class GaussianPrior(nn.Module):
    """``log p(z)`` per position: ``Σ_c log N((z_c − μ_c) / σ_c; 0, 1) − log σ_c``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def log_prob_map(self, z: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, H, W)``, in float32 (float64 for float64 input)."""
        dtype = logdet_dtype(z)
        loc = self.loc.to(dtype).view(1, -1, 1, 1)
        log_scale = self.log_scale.to(dtype).view(1, -1, 1, 1)
        u = (z.to(dtype) - loc) * torch.exp(-log_scale)
        return (-0.5 * (u * u + _LOG_2PI) - log_scale).sum(dim=1)

    def sample(
        self,
        shape: tuple[int, int, int, int],
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``z`` of ``shape`` (B, C, H, W); ``temperature`` scales the N(0, I) noise."""
        eps = torch.randn(shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc.view(1, -1, 1, 1) + self.log_scale.exp().view(1, -1, 1, 1) * temperature * eps
