"""Per-pixel flow over feature maps (Blum et al., Fishyscapes, "embedding density").

The same Glow steps with 1×1 coupling kernels and no squeeze: every position's
C-dimensional feature vector is transformed on its own, so the log-det map plus
the prior map *is* the per-pixel log-density ``log p(f[:, h, w])``.
"""

from __future__ import annotations

from torch import Tensor, nn

from densead.flows.glow import FlowSteps, flow_step
from densead.flows.layers import glow_coupling_net
from densead.flows.prior import GaussianPrior

__all__ = ["FeatureFlow"]


class FeatureFlow(nn.Module):
    """Density of per-position feature vectors of a ``(B, C, H, W)`` map.

    Args:
        channels: C, the feature dimension (read it from the backbone's
            ``feature_info``, never hard-code it).
        n_steps: flow steps.
        hidden: hidden width of the 1×1 coupling networks.
    """

    def __init__(self, channels: int, n_steps: int = 8, hidden: int = 256) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"FeatureFlow needs at least 2 feature channels, got {channels}")
        self.channels = channels
        net_factory = glow_coupling_net(hidden, kernel_size=1)
        self.steps = FlowSteps(flow_step(channels, net_factory) for _ in range(n_steps))
        self.prior = GaussianPrior(channels)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W)`` → (latent, ``log p`` map ``(B, H, W)``)."""
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(
                f"FeatureFlow expects features (B, {self.channels}, H, W), got shape {tuple(features.shape)}"
            )
        z, logdet = self.steps(features)
        return z, self.prior.log_prob_map(z) + logdet

    def log_prob_map(self, features: Tensor) -> Tensor:
        """``(B, H, W)`` per-pixel log-density of the feature vectors."""
        return self(features)[1]

    def inverse(self, z: Tensor) -> Tensor:
        return self.steps.inverse(z)
