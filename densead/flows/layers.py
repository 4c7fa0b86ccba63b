"""Invertible layers of Glow (Kingma & Dhariwal, 2018) with per-position log-dets.

Each layer keeps the contract of :mod:`densead.flows.base`:
``forward(x) -> (y, logdet_map (B, H, W))`` and ``inverse(y) -> x``.

| layer | log-det at position (h, w) |
|---|---|
| :class:`ActNorm` | ``Σ_c log|s_c|`` |
| :class:`InvConv1x1` | ``log|det W|`` |
| :class:`AffineCoupling` | ``Σ_c log s_{c,h,w}`` |
| :class:`Squeeze` | 0 (position (h, w) of the output covers 2×2 inputs) |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densead.flows.base import FlowLayer, logdet_dtype, zero_logdet_map

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "CouplingNetFactory",
    "InvConv1x1",
    "Squeeze",
    "ZeroConv2d",
    "FusedParameters",
    "fused_actnorm_invconv",
    "fused_parameters",
    "glow_coupling_net",
    "lu_weight",
]

# Coupling scale = sigmoid(raw + SCALE_OFFSET): bounded in (0, 1) so no step can
# blow activations up, and sigmoid(2) ≈ 0.88 keeps a zero-initialized network
# close to the identity. Same constant as the paper's code (invglow).
SCALE_OFFSET = 2.0

# Keeps ActNorm's data-dependent scale finite on constant channels (e.g. padding).
ACTNORM_EPS = 1e-6


def _per_position(value: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample-constant log-det scalar to a ``(B, H, W)`` map."""
    b, _, h, w = like.shape
    return value.to(logdet_dtype(like)).expand(b, h, w)


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``E[x]`` and ``E[x²]`` of ``(B, C, H, W)``, averaged over every process."""
    mean = x.mean(dim=(0, 2, 3))
    sq = (x * x).mean(dim=(0, 2, 3))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stats = torch.stack([mean, sq])
        torch.distributed.all_reduce(stats)
        stats /= torch.distributed.get_world_size()
        mean, sq = stats[0], stats[1]
    return mean, sq


class ActNorm(FlowLayer):
    """Per-channel affine map ``y = (x + b) · exp(log_s)`` with data-dependent init.

    On the first forward in training mode, ``b`` and ``log_s`` are set so that
    the batch's output has zero mean and unit variance per channel (Glow §3.1).
    Under ``torch.distributed`` the statistics are all-reduced, so all replicas
    start identical. ``initialized`` is a buffer: it survives ``state_dict``
    round trips, and a loaded model is never re-initialized.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # Host-side mirror of the buffer: reading the buffer is a device sync per
        # layer and step on CUDA and a graph break under torch.compile. It only
        # goes False -> True, except when a state_dict is loaded (then re-read).
        self._initialized_cache = False

    def is_initialized(self) -> bool:
        """Whether the data-dependent init has happened (reads the buffer until it has)."""
        if not self._initialized_cache:
            self._initialized_cache = bool(self.initialized)
        return self._initialized_cache

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Module hook
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_cache = False

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and scale from the statistics of ``x`` (B, C, H, W)."""
        if x.shape[0] * x.shape[2] * x.shape[3] == 0:  # mean of nothing: NaN weights for good
            raise ValueError(
                f"ActNorm's data-dependent init needs a non-empty first training batch, got {tuple(x.shape)}"
            )
        mean, sq = _channel_moments(x.detach().to(self.bias.dtype))
        var = sq - mean * mean
        if bool((var <= 1e-3 * mean * mean).any()):
            # E[x²] − mean² cancels when a channel's spread is small next to its mean (float32,
            # mean 100, std 0.01: no correct digit left): centre first, in float64.
            xd = x.detach().double()
            mean64 = _channel_moments(xd)[0]
            var = _channel_moments(xd - mean64.view(1, -1, 1, 1))[1].to(var.dtype)
            mean = mean64.to(mean.dtype)
        std = var.clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + ACTNORM_EPS))
        self.initialized.fill_(True)
        self._initialized_cache = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.is_initialized():
            self.initialize(x)
        shape = (1, -1, 1, 1)
        y = (x + self.bias.view(shape).to(x.dtype)) * self.log_scale.exp().view(shape).to(x.dtype)
        return y, _per_position(self.log_scale.sum(), x)

    def inverse(self, y: Tensor) -> Tensor:
        shape = (1, -1, 1, 1)
        return y * torch.exp(-self.log_scale).view(shape).to(y.dtype) - self.bias.view(shape).to(y.dtype)


class InvConv1x1(FlowLayer):
    """Invertible 1×1 convolution, LU-parametrized: ``W = P · L · (U + diag(sign·exp(log_s)))``.

    ``log|det W| = Σ log_s`` is exact and cheap. The weight, its inverse and the
    log-det are built in float32 (float64 if the parameters are float64) with
    autocast disabled, so bf16 training never touches them.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        # A random rotation (det ±1) as starting point, as in Glow.
        q = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))[0]
        perm, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", perm.float())
        self.register_buffer("sign_s", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(diag.abs().log().float())

    def weight(self) -> Tensor:
        """The ``(C, C)`` matrix W, in the parameters' dtype (never autocast)."""
        with torch.autocast(device_type=self.lower.device.type, enabled=False):
            return lu_weight(
                self.perm, self.lower, self.upper, self.sign_s, self.log_s, self.lower_mask, self.eye
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weight()
        y = F.conv2d(x, w.to(x.dtype)[:, :, None, None])
        return y, _per_position(self.log_s.sum(), x)

    def inverse(self, y: Tensor) -> Tensor:
        with torch.autocast(device_type=y.device.type, enabled=False):
            w_inv = torch.linalg.inv(self.weight().double())
        return F.conv2d(y, w_inv.to(y.dtype)[:, :, None, None])


def lu_weight(
    perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_s: Tensor, lower_mask: Tensor, eye: Tensor
) -> Tensor:
    """``W = P · (L ⊙ M + I) · (U ⊙ Mᵀ + diag(sign·exp(log_s)))``, ``M`` the strictly lower
    triangle: of one ``(C, C)`` set of LU factors, or of a stack ``(K, C, C)`` of them
    (``sign_s``, ``log_s``: ``(C,)`` or ``(K, C)``; ``lower_mask``, ``eye``: ``(C, C)``)."""
    lower = lower * lower_mask + eye
    upper = upper * lower_mask.T + torch.diag_embed(sign_s * log_s.exp())
    return perm @ lower @ upper


class ZeroConv2d(nn.Conv2d):
    """A convolution initialized to output zeros, so a new coupling is near-identity."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


CouplingNetFactory = Callable[[int, int], nn.Module]
"""Builds a coupling network from (in_channels, out_channels)."""


def glow_coupling_net(hidden: int, kernel_size: int = 3) -> CouplingNetFactory:
    """Glow's coupling network: k×k conv → ReLU → 1×1 conv → ReLU → zero-init k×k conv.

    ``kernel_size`` is 3 for images and 1 for per-pixel feature flows (then
    every position is transformed independently of its neighbours).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"coupling kernel_size must be odd, got {kernel_size}")

    def build(in_channels: int, out_channels: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv2d(hidden, out_channels, kernel_size),
        )

    return build


class AffineCoupling(FlowLayer):
    """Affine coupling: ``y_b = (x_b + t(x_a)) · s(x_a)``, ``s = sigmoid(raw + 2)``.

    ``x_a`` (the first ``C // 2`` channels) passes through unchanged and
    conditions the shift ``t`` and bounded scale ``s`` of ``x_b``. The
    coupling network comes from ``net_factory(C // 2, 2 · (C − C // 2))``. The
    affine update and its log-det are computed in float32 (or float64) even
    when the network runs under autocast.
    """

    def __init__(self, channels: int, net_factory: CouplingNetFactory) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"AffineCoupling needs at least 2 channels, got {channels}")
        self.channels_a = channels // 2
        self.channels_b = channels - self.channels_a
        self.net = net_factory(self.channels_a, 2 * self.channels_b)

    def _shift_scale(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(xa).to(logdet_dtype(xa))
        # Channels interleave (shift, raw) pairs: h[:, 0::2] and h[:, 1::2], as one unbind, whose
        # backward is one stack (two strided slices would cost two zero-fills, two copies and an add).
        shift, raw = h.unflatten(1, (self.channels_b, 2)).unbind(2)
        return shift, torch.sigmoid(raw + SCALE_OFFSET)

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x_a``, ``x_b``: one split (its backward is one concatenation, not two padded slices)."""
        return x.split([self.channels_a, self.channels_b], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = self._halves(x)
        shift, scale = self._shift_scale(xa)
        yb = (xb.to(scale.dtype) + shift) * scale
        logdet = torch.log(scale).sum(dim=1)
        return torch.cat([xa, yb.to(x.dtype)], dim=1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        ya, yb = self._halves(y)
        shift, scale = self._shift_scale(ya)
        xb = yb.to(scale.dtype) / scale - shift
        return torch.cat([ya, xb.to(y.dtype)], dim=1)


class Squeeze(FlowLayer):
    """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``; log-det 0.

    Output position (h, w) holds the 2×2 input block at (2h.., 2w..). A
    channels_last input gives a channels_last output (and back in the inverse),
    so a channels_last Glow stays channels_last at every scale.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got input of shape {tuple(x.shape)}")
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return _same_memory_format(y, x), zero_logdet_map(y)

    def inverse(self, y: Tensor) -> Tensor:
        b, c4, h, w = y.shape
        c = c4 // 4
        x = y.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
        return _same_memory_format(x, y)


def _same_memory_format(out: Tensor, like: Tensor) -> Tensor:
    """``out`` in channels_last when ``like`` is (strictly) channels_last, else unchanged."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


FusedParameters = tuple[Tensor, Tensor, Tensor]
"""``(W', c, log-det)`` of an ActNorm → 1×1 conv pair as one 1×1 convolution (see
:func:`fused_actnorm_invconv`): ``(C, C)``, ``(C,)`` and a scalar."""


def fused_parameters(actnorms: Sequence[ActNorm], invconvs: Sequence[InvConv1x1]) -> list[FusedParameters]:
    """The fused weight ``W' = W·diag(s)``, bias ``c = W'·b`` and per-position log-det
    ``Σ log_scale + Σ log_s`` of each ActNorm → 1×1 conv pair, all pairs in one batched computation.

    K pairs of the same width cost one stack per parameter and batched matrix products: about 25
    small kernels forward and 20 backward for all K, where each pair on its own costs some 35
    (:class:`densead.flows.glow.FlowSteps`; a paper-size Glow's fused training step dispatches
    3,140 instead of 6,367 kernel-launching operators, ``benchmarks/profile_step.py``). One pair
    stacks nothing.
    In float32 (float64) with autocast disabled. The outputs are views of the batched results;
    their gradients flow back through one stack.
    """
    if len(actnorms) != len(invconvs) or not actnorms:
        raise ValueError(f"fused_parameters: {len(actnorms)} ActNorms for {len(invconvs)} 1×1 convs")

    def stacked(tensors: list[Tensor]) -> Tensor:
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

    first = invconvs[0]
    with torch.autocast(device_type=first.lower.device.type, enabled=False):
        log_s = stacked([m.log_s for m in invconvs])
        w = lu_weight(
            stacked([m.perm for m in invconvs]),
            stacked([m.lower for m in invconvs]),
            stacked([m.upper for m in invconvs]),
            stacked([m.sign_s for m in invconvs]),
            log_s,
            first.lower_mask,
            first.eye,
        )
        log_scale = stacked([m.log_scale for m in actnorms])
        w = w * log_scale.exp()[:, None, :]
        bias = (w @ stacked([m.bias for m in actnorms])[:, :, None])[:, :, 0]
        logdet = log_scale.sum(dim=1) + log_s.sum(dim=1)
    if len(actnorms) == 1:  # one pair: views whose backward launches nothing (unbind's would stack)
        return [(w.squeeze(0), bias.squeeze(0), logdet.squeeze(0))]
    return list(zip(w.unbind(0), bias.unbind(0), logdet.unbind(0), strict=True))


def fused_actnorm_invconv(
    actnorm: ActNorm, invconv: InvConv1x1, x: Tensor, params: FusedParameters | None = None
) -> tuple[Tensor, Tensor]:
    """ActNorm followed by the 1×1 conv as one 1×1 convolution with a bias.

    Both are per-position linear maps, so ``W·((x + b)·s) = W' x + c`` with
    ``W' = W·diag(s)``, ``s = exp(log_scale)`` and ``c = W'·b``; the log-det per
    position is ``Σ_c log_scale_c + log|det W|``. Same parameters, same result as
    ``invconv(actnorm(x))`` up to float rounding, one pass over the activations
    instead of two. ``W'``, ``c`` and the log-det are built in float32 (float64)
    with autocast disabled (:func:`fused_parameters`; pass ``params`` when they
    were built for several steps at once); only the convolution itself follows
    autocast. ActNorm must already be initialized (its data-dependent init needs
    the unfused path).
    """
    w, bias, logdet = fused_parameters([actnorm], [invconv])[0] if params is None else params
    y = F.conv2d(x, w.to(x.dtype)[:, :, None, None], bias.to(x.dtype))
    return y, _per_position(logdet, x)
