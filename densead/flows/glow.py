"""Multi-scale Glow whose forward pass returns per-scale contribution maps.

Scale ``i`` (1-based) squeezes its input to the grid ``H/2^i × W/2^i``, runs
``K`` steps of ActNorm → invertible 1×1 conv → affine coupling, then splits off
half of its channels as the latent ``z_i`` (the last scale keeps all of them).
Its contribution map is

    c_i(x)[h, w] = log N(z_i[:, h, w]) + Σ_{steps of scale i} logdet_map[h, w]

and ``log p(x) = Σ_i Σ_{h,w} c_i(x)[h, w]`` exactly (Schirrmeister et al. 2020,
eq. 3, per position). Spreading ``c_i`` evenly over the ``2^i × 2^i`` input pixels
each position covers gives pixel maps that still sum to ``log p(x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from densead.flows.base import FlowSequence
from densead.flows.layers import (
    ActNorm,
    AffineCoupling,
    CouplingNetFactory,
    FusedParameters,
    InvConv1x1,
    Squeeze,
    fused_actnorm_invconv,
    fused_parameters,
    glow_coupling_net,
)
from densead.flows.prior import GaussianPrior

__all__ = [
    "FlowStep",
    "FlowSteps",
    "Glow",
    "GlowOutput",
    "flow_step",
    "set_fused",
    "set_recompute",
    "spread_to_input_grid",
]


class FlowStep(FlowSequence):
    """One Glow step: ActNorm → invertible 1×1 conv → affine coupling.

    With ``fused`` set, ActNorm and the 1×1 conv run as one 1×1 convolution
    (:func:`~densead.flows.layers.fused_actnorm_invconv`) once ActNorm is
    initialized; before that (its data-dependent init on the first training
    batch) the step takes the plain path, which stays the reference. ``fused``
    is a plain attribute, not state: parameters, ``state_dict`` keys and the
    inverse are the same either way.

    With ``recompute`` set, a forward pass that records gradients keeps only the
    step's input: the activations inside (the coupling network's hidden layers,
    the bulk of a Glow's training memory) are recomputed during the backward pass
    (``torch.utils.checkpoint``, non-reentrant). Same values and gradients, about
    one more forward pass of compute, a fraction of the memory. Also a plain
    attribute, and also skipped until ActNorm's data-dependent init ran.
    """

    def __init__(self, actnorm: ActNorm, invconv: InvConv1x1, coupling: AffineCoupling) -> None:
        super().__init__([actnorm, invconv, coupling])
        self.fused = False
        self.recompute = False

    def forward(self, x: Tensor, params: FusedParameters | None = None) -> tuple[Tensor, Tensor]:
        """``params``: this step's fused weight, bias and log-det when :class:`FlowSteps` built
        them for all its steps at once (fused path only); else the step builds its own."""
        if self.recompute and torch.is_grad_enabled() and self.layers[0].is_initialized():
            return checkpoint(self._forward, x, params, use_reentrant=False)
        return self._forward(x, params)

    def is_fusable(self) -> bool:
        """Whether the next forward takes the fused path (``fused`` set, ActNorm initialized)."""
        return self.fused and self.layers[0].is_initialized()

    def _forward(self, x: Tensor, params: FusedParameters | None = None) -> tuple[Tensor, Tensor]:
        actnorm, invconv, coupling = self.layers
        if not self.is_fusable():
            return super().forward(x)
        y, logdet = fused_actnorm_invconv(actnorm, invconv, x, params)
        y, logdet_coupling = coupling(y)
        return y, logdet + logdet_coupling


class FlowSteps(FlowSequence):
    """Flow steps (:class:`FlowStep`) in order, as a Glow scale or a feature flow runs them.

    When every step takes the fused path, the fused weights, biases and log-dets
    of all steps are built in one batched computation (:func:`fused_parameters`)
    before the first step runs: these parameter-only computations are about a
    third of an eager step's operators, each tiny, so K steps launch one set of
    them instead of K (an eager GPU step is bound by launches). Same values up to
    float rounding, same parameters and ``state_dict`` keys as a plain
    :class:`FlowSequence`; log-det maps add up as there.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        steps = list(self.layers)
        if len(steps) < 2 or not all(step.is_fusable() for step in steps):
            return super().forward(x)
        params = fused_parameters([step.layers[0] for step in steps], [step.layers[1] for step in steps])
        total = None
        for step, step_params in zip(steps, params, strict=True):
            for tensor in step_params:
                # Compiled steps (the compile lever) specialize on these sizes as on parameters',
                # which dynamo keeps static; otherwise the second width seen makes them symbolic, and
                # inductor cannot order a channels_last weight's symbolic strides ("1 < s27").
                # Eager: a flag.
                torch._dynamo.mark_static(tensor)
            x, logdet = step(x, step_params)
            total = logdet if total is None else total + logdet
        return x, total


def flow_step(channels: int, net_factory: CouplingNetFactory) -> FlowStep:
    """One Glow step of ``channels`` channels; see :class:`FlowStep`."""
    return FlowStep(ActNorm(channels), InvConv1x1(channels), AffineCoupling(channels, net_factory))


def set_fused(module: nn.Module, fused: bool) -> None:
    """Switch the ActNorm + 1×1 conv fusion of every :class:`FlowStep` inside ``module``."""
    for m in module.modules():
        if isinstance(m, FlowStep):
            m.fused = fused


def set_recompute(module: nn.Module, recompute: bool) -> None:
    """Switch activation recomputation of every :class:`FlowStep` inside ``module``."""
    for m in module.modules():
        if isinstance(m, FlowStep):
            m.recompute = recompute


def spread_to_input_grid(contribution: Tensor, factor: int) -> Tensor:
    """Spread each value of a ``(B, h, w)`` map evenly over ``factor × factor`` pixels.

    The result has shape ``(B, h·factor, w·factor)`` and the same sum.
    """
    up = contribution.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return up / (factor * factor)


@dataclass(frozen=True)
class GlowOutput:
    """What one Glow forward pass yields; every detector is derived from it.

    Attributes:
        latents: ``z_i`` per scale, scale 1 first.
        contributions: ``c_i(x)`` per scale, shape ``(B, H/2^i, W/2^i)``, in nats
            of the continuous density (no dequantization term).
        input_shape: ``(C, H, W)`` of the input.
        n_bins: quantization levels of the data (256 for 8-bit images).
    """

    latents: tuple[Tensor, ...]
    contributions: tuple[Tensor, ...]
    input_shape: tuple[int, int, int]
    n_bins: int

    @property
    def n_dims(self) -> int:
        c, h, w = self.input_shape
        return c * h * w

    @property
    def dequantization_per_pixel(self) -> float:
        """``−C·log(n_bins)``: the discrete-data term at each input pixel."""
        return -self.input_shape[0] * math.log(self.n_bins)

    def scale_log_probs(self) -> Tensor:
        """``(B, L)``: each scale's scalar contribution ``Σ_{h,w} c_i(x)``."""
        return torch.stack([c.sum(dim=(-2, -1)) for c in self.contributions], dim=1)

    def log_prob(self, discrete: bool = True) -> Tensor:
        """``(B,)`` log-likelihood; ``discrete`` includes the ``−D·log(n_bins)`` term."""
        lp = self.scale_log_probs().sum(dim=1)
        return lp - self.n_dims * math.log(self.n_bins) if discrete else lp

    def bits_per_dim(self) -> Tensor:
        """``(B,)``: ``−log p(x) / (D·log 2)`` of the discrete data."""
        return -self.log_prob(discrete=True) / (self.n_dims * math.log(2))

    def scale_pixel_maps(self) -> tuple[Tensor, ...]:
        """``c_i`` of every scale spread onto the input grid, each ``(B, H, W)``."""
        return tuple(spread_to_input_grid(c, 2 ** (i + 1)) for i, c in enumerate(self.contributions))

    def pixel_map(self, discrete: bool = True) -> Tensor:
        """``(B, H, W)`` map that sums to ``log_prob(discrete)`` per image."""
        total = torch.stack(self.scale_pixel_maps()).sum(dim=0)
        return total + self.dequantization_per_pixel if discrete else total


class _GlowScale(nn.Module):
    def __init__(self, in_channels: int, n_steps: int, net_factory: CouplingNetFactory, split: bool) -> None:
        super().__init__()
        channels = 4 * in_channels
        self.squeeze = Squeeze()
        self.steps = FlowSteps(flow_step(channels, net_factory) for _ in range(n_steps))
        self.split = split
        self.z_channels = channels // 2 if split else channels
        self.out_channels = channels - self.z_channels
        self.prior = GaussianPrior(self.z_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (input of the next scale, z, contribution map)."""
        h, _ = self.squeeze(x)
        h, logdet = self.steps(h)
        keep, z = h.split([self.out_channels, self.z_channels], dim=1)
        return keep, z, self.prior.log_prob_map(z) + logdet

    def inverse(self, keep: Tensor | None, z: Tensor) -> Tensor:
        h = z if keep is None else torch.cat([keep, z], dim=1)
        return self.squeeze.inverse(self.steps.inverse(h))


class Glow(nn.Module):
    """Multi-scale Glow with exact ``log p(x)`` and per-scale contribution maps.

    Fully convolutional: any input whose height and width are divisible by
    ``2^n_scales`` works (32×32 images, 256×512 road crops). Paper defaults:
    ``n_scales=3, n_steps=32, hidden=512``.

    Args:
        in_channels: channels of the input image (3 for RGB, 1 for greyscale).
        n_scales: ``L``, the number of scales.
        n_steps: ``K``, flow steps per scale.
        hidden: channels of the coupling networks' hidden layers.
        kernel_size: coupling convolution kernel (3 for images).
        n_bins: quantization levels of the data, for the discrete log-likelihood.
        fused: run ActNorm + 1×1 conv as one convolution (see :meth:`set_fast`).
        channels_last: keep weights and activations in channels_last memory
            format (see :meth:`set_fast`).
        recompute: recompute each step's activations in the backward pass
            instead of storing them (see :meth:`set_fast`).
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_scales: int = 3,
        n_steps: int = 32,
        hidden: int = 512,
        kernel_size: int = 3,
        n_bins: int = 256,
        fused: bool = False,
        channels_last: bool = False,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        sizes = {"in_channels": in_channels, "n_scales": n_scales, "n_steps": n_steps, "hidden": hidden}
        if small := {k: v for k, v in sizes.items() if v < 1}:
            raise ValueError(f"Glow: {', '.join(f'{k}={v}' for k, v in small.items())}; each must be >= 1")
        if n_bins < 2:
            raise ValueError(f"Glow: n_bins={n_bins}; the data need at least 2 quantization levels")
        self.in_channels = in_channels
        self.n_bins = n_bins
        net_factory = glow_coupling_net(hidden, kernel_size)
        scales = []
        channels = in_channels
        for i in range(n_scales):
            scale = _GlowScale(channels, n_steps, net_factory, split=i < n_scales - 1)
            scales.append(scale)
            channels = scale.out_channels
        self.scales = nn.ModuleList(scales)
        self.channels_last = False
        self.set_fast(fused=fused, channels_last=channels_last, recompute=recompute)

    def set_fast(self, fused: bool, channels_last: bool, recompute: bool = False) -> Glow:
        """Switch the fast-path levers that need no compiler; returns ``self``.

        Neither changes parameters, ``state_dict`` keys or checkpoints, and both
        give the plain path's ``log p`` up to float rounding (tests/test_fast_path.py).

        Args:
            fused: ActNorm + invertible 1×1 conv as one 1×1 convolution in every
                step whose ActNorm is initialized (half the memory passes of the
                two per-position linear maps), the fused weights of all steps of
                a scale built in one batched computation (:class:`FlowSteps`).
            channels_last: convolution weights and the activations (inputs are
                converted in :meth:`forward`) in channels_last (NHWC) memory
                format, which tensor-core convolutions prefer.
            recompute: store only each step's input during training and recompute
                its activations in the backward pass: same gradients, ~1.3× the
                compute, a fraction of the activation memory (larger batches fit).
        """
        set_fused(self, fused)
        set_recompute(self, recompute)
        if channels_last != self.channels_last:
            self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.channels_last = channels_last
        return self

    @property
    def fused(self) -> bool:
        """Whether the steps fuse ActNorm and the 1×1 conv (see :meth:`set_fast`)."""
        return all(m.fused for m in self.modules() if isinstance(m, FlowStep))

    @property
    def n_scales(self) -> int:
        return len(self.scales)

    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError naming the shape or dtype if ``x`` cannot go through this Glow.

        ``x`` must be ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by
        ``2^n_scales``, of the parameters' floating dtype (float32 unless the model was
        converted); uint8 images become model input through
        :func:`densead.data.transforms.to_model_input`.
        """
        factor = 2**self.n_scales
        if x.dim() != 4 or x.shape[1] != self.in_channels or any(n < 1 or n % factor for n in x.shape[2:]):
            raise ValueError(
                f"Glow expects input (B, {self.in_channels}, H, W) with H and W positive and divisible by "
                f"{factor}, got shape {tuple(x.shape)}"
            )
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            expected, got = (str(t).removeprefix("torch.") for t in (dtype, x.dtype))
            hint = ""
            if not x.dtype.is_floating_point:
                hint = "; make model input of uint8 images with densead.data.transforms.to_model_input"
            raise ValueError(
                f"Glow expects {expected} input in [-0.5, 0.5) (the dtype of its parameters), "
                f"got {got} of shape {tuple(x.shape)}{hint}"
            )

    def forward(self, x: Tensor) -> GlowOutput:
        """Data ``x`` (B, C, H, W) in ``[−0.5, 0.5)`` → latents and contribution maps."""
        self.check_input(x)
        latents, contributions = [], []
        h = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        for scale in self.scales:
            h, z, contribution = scale(h)
            latents.append(z)
            contributions.append(contribution)
        return GlowOutput(tuple(latents), tuple(contributions), tuple(x.shape[1:]), self.n_bins)

    def inverse(self, latents: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        """Latents ``(z_1, …, z_L)`` → data ``x``."""
        if len(latents) != self.n_scales:
            raise ValueError(f"expected {self.n_scales} latents, got {len(latents)}")
        h = None
        for scale, z in zip(reversed(self.scales), reversed(latents), strict=True):
            h = scale.inverse(h, z)
        return h

    def latent_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Shapes of ``z_1 … z_L`` for inputs of ``batch × C × height × width``."""
        return [
            (batch, *shape[1:])
            for shape in self.latent_shapes_of(self.in_channels, self.n_scales, height, width)
        ]

    @staticmethod
    def latent_shapes_of(
        in_channels: int, n_scales: int, height: int, width: int
    ) -> list[tuple[int, int, int, int]]:
        """Shapes ``(1, C_i, H/2^i, W/2^i)`` of ``z_1 … z_L`` without building a model."""
        shapes, channels = [], in_channels
        for i in range(1, n_scales + 1):
            channels *= 4
            z = channels // 2 if i < n_scales else channels
            shapes.append((1, z, height >> i, width >> i))
            channels -= z
        return shapes

    @torch.no_grad()
    def sample(
        self,
        n: int,
        height: int,
        width: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``n`` images of ``height × width`` by inverting prior samples.

        ``height`` and ``width`` must be positive multiples of ``2^n_scales`` (as inputs).
        """
        factor = 2**self.n_scales
        if height < 1 or width < 1 or height % factor or width % factor:
            raise ValueError(
                f"Glow.sample: height and width must be positive multiples of {factor} "
                f"(2^n_scales, n_scales={self.n_scales}), got {height}×{width}"
            )
        latents = [
            scale.prior.sample(shape, temperature, generator)
            for scale, shape in zip(self.scales, self.latent_shapes(n, height, width), strict=True)
        ]
        return self.inverse(latents)
