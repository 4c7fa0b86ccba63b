"""Image- and pixel-level detectors derived from Glow outputs (Schirrmeister et al. 2020).

Every detector turns the :class:`~densead.flows.GlowOutput` of the
in-distribution model (and, for ratios, of the general model) into a score per
image and a map per pixel — the map is the same quantity before the spatial sum,
so ``score == map.sum()`` for every detector. Higher = more anomalous.

| name | score | paper |
|---|---|---|
| ``raw`` | ``−log p_in(x)`` | raw likelihood |
| ``ratio`` | ``log p_g(x) − log p_in(x)`` | Diff (hierarchy of distributions) |
| ``last_scale`` | ``−c_L(x)`` | 4x4 for 32×32 inputs (hierarchy of features) |
| ``scale<i>`` | ``−c_i(x)`` | any single scale, 1-based |
| ``ratio_scale<i>`` | ``c_i^g(x) − c_i^in(x)`` | a scale of the ratio |
| ``complexity`` | ``−L_PNG(x)·ln 2 − log p_in(x)`` | the ratio with a PNG coder as the general
  distribution (Serrà et al. 2020, :mod:`densead.detectors.complexity`) |
| ``complexity_webp`` | ``−L_WebP(x)·ln 2 − log p_in(x)`` | the same with WebP lossless |
| ``complexity_loco`` | ``−L_LOCO(x)·ln 2 − log p_in(x)`` | the same with a coder whose length is a
  sum over pixels (LOCO-I's predictor, adaptive contexts): a per-pixel map |
| ``typicality`` | ``|bpd_in(x) − b̄|`` | typicality test with one image (Nalisnick et al. 2019):
  ``b̄``, the model's mean bits/dim on its training images |

The ``complexity`` detectors need the image itself (its quantization levels) besides the Glow
output. A file's code length (``complexity``, ``complexity_webp``) is one number per image, so
their map spreads ``−L·ln 2`` evenly over the pixels (the map ranks pixels as ``raw``'s does) and
they have no place in per-pixel evaluation. ``complexity_loco``'s code length is a sum over
pixels, and its map is the ratio ``−L(x)[h, w]·ln 2 − log p_in(x)[h, w]`` summed over each block
of the Glow's coarsest grid (``2^L × 2^L`` pixels) and spread evenly over it: it ranks regions by
how much better the model codes them than a generic image coder does (road frames too). Per
block, because that is where both maps are the models' own numbers: the Glow's map spreads each
scale's terms evenly over the ``2^i × 2^i`` pixels they cover (a convention), while the coder's
lengths are per pixel and peak at every edge. On CamVid's validation frames, per pixel the
ratio lost to raw likelihood (pixel AUROC 56.0 against 61.3), per ``2^L`` block it gained (72.2;
blocks of 1, 2, 4 and 8 model pixels compared, ``benchmarks/complexity_loco_blocks.py``).

``typicality`` flags images the model finds too likely as well as too unlikely (digits under a
model of clothes or photos: a higher likelihood than the training images ever get). It needs
``b̄`` (``typical_bpd``: :func:`densead.scoring.typical_bits_per_dim`). Its map is each pixel's
bits/dim less ``b̄``'s even share, times the sign of the image's deviation: it sums to the score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from densead.detectors.complexity import CODER_NAMES, PIXEL_CODERS, CodedImages, levels_from_input
from densead.flows import Glow, GlowOutput, GraphedCall, apply_fast_path, resolve_fast_path

__all__ = [
    "DETECTORS",
    "MIN_LOG_PROB",
    "SENTINEL_LIMIT",
    "GlowDetector",
    "GlowScorer",
    "block_mean",
    "get_detector",
    "upsample_map",
    "with_sentinels",
]

# Paper S4.5: non-finite log-likelihoods are replaced by a very small constant
# before taking differences, so a model that assigns −inf still ranks the
# image as maximally unlikely instead of producing NaN scores.
MIN_LOG_PROB = -1e12
# Map values at or beyond this magnitude are such stand-ins (for a pixel's non-finite
# log-density), not scores: whatever rescales, spreads, averages or upsamples maps keeps them
# intact (:func:`with_sentinels`), and dense scoring leaves them out of its ranges and statistics.
SENTINEL_LIMIT = 0.5 * abs(MIN_LOG_PROB)


def with_sentinels(value: Tensor, parts: Tensor) -> Tensor:
    """``value`` where no part holds a sentinel; ``−MIN_LOG_PROB`` (most anomalous) where one
    holds it, else ``MIN_LOG_PROB`` where one holds that. ``parts``: ``(n, *value.shape)``, what
    ``value`` was computed from (say, the layer maps a mean of them)."""
    high = (parts >= SENTINEL_LIMIT).any(dim=0)
    low = (parts <= -SENTINEL_LIMIT).any(dim=0)
    return torch.where(high, -MIN_LOG_PROB, torch.where(low, MIN_LOG_PROB, value))


def upsample_map(m: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, h, w)`` maps bilinearly at ``size`` (``align_corners=False``), float32, sentinels kept:
    a sentinel covers its cell's pixels (nearest neighbour) and is not blended into its neighbours,
    which blend with the frame's largest real value instead (the cell is the most anomalous there
    when its sentinel is ``−MIN_LOG_PROB``, the usual one)."""
    m = m.float()

    def bilinear(t: Tensor) -> Tensor:
        return F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    marked = m.abs() >= SENTINEL_LIMIT
    if not bool(marked.any()):
        return bilinear(m)
    top = m.masked_fill(marked, -math.inf).amax(dim=(1, 2), keepdim=True)
    smooth = bilinear(torch.where(marked, torch.nan_to_num(top, neginf=0.0), m))  # 0: sentinels only
    marks = F.interpolate(torch.where(marked, m, 0.0)[:, None], size=size, mode="nearest-exact")[:, 0]
    return torch.where(marks != 0, marks, smooth)


def block_mean(m: Tensor, k: int) -> Tensor:
    """``(B, H, W)`` maps averaged over ``k × k`` blocks (``H``, ``W`` multiples of ``k``), each
    block's mean at its pixels: block sums kept. A block holding a sentinel is that sentinel
    (:func:`with_sentinels`)."""
    b, h, w = m.shape
    blocks = m.reshape(b, h // k, k, w // k, k)
    spread = blocks.mean(dim=(2, 4), keepdim=True).expand_as(blocks)
    extremes = torch.stack([blocks.amax(dim=(2, 4), keepdim=True), blocks.amin(dim=(2, 4), keepdim=True)])
    return with_sentinels(spread, extremes.expand(2, *blocks.shape)).reshape(b, h, w)


def _finite(t: Tensor) -> Tensor:
    return torch.nan_to_num(t, nan=MIN_LOG_PROB, posinf=MIN_LOG_PROB, neginf=MIN_LOG_PROB)


@dataclass(frozen=True)
class GlowDetector:
    """A detector over Glow outputs.

    Attributes:
        name: registry name.
        needs_general: whether the general-distribution model's output is needed.
        scale: 1-based scale index (negative counts from the last) or ``None``
            for the whole likelihood.
        compressor: the general distribution is this lossless coder (a key of
            :data:`~densead.detectors.complexity.CODER_NAMES`; ``complexity``): scoring needs the
            images' quantization levels.
        typical: the distance of bits/dim to the training images' mean (``typicality``):
            scoring needs that mean (``typical_bpd``).
    """

    name: str
    needs_general: bool
    scale: int | None = None
    compressor: str | None = None
    typical: bool = False

    def __post_init__(self) -> None:
        if self.compressor is not None and self.compressor not in CODER_NAMES:
            raise ValueError(
                f"detector {self.name!r}: unknown coder {self.compressor!r}; valid: {', '.join(CODER_NAMES)}"
            )

    @property
    def per_pixel(self) -> bool:
        """Whether the map is a per-pixel decomposition (a file's code length is not; a
        :data:`~densead.detectors.complexity.PIXEL_CODERS` coder's is)."""
        return self.compressor is None or self.compressor in PIXEL_CODERS

    def _log_density_map(self, out: GlowOutput) -> Tensor:
        """Per-pixel log-density on the input grid; sums to :meth:`_log_density`."""
        if self.scale is None:
            return out.pixel_map(discrete=True)
        n = len(out.contributions)
        i = self.scale - 1 if self.scale > 0 else n + self.scale
        if not 0 <= i < n:
            raise ValueError(f"detector {self.name!r}: scale {self.scale} out of range for a {n}-scale Glow")
        return out.scale_pixel_maps()[i]

    def _log_density(self, out: GlowOutput) -> Tensor:
        if self.scale is None:
            return out.log_prob(discrete=True)
        return self._log_density_map(out).sum(dim=(-2, -1))

    def _check(
        self,
        out_in: GlowOutput,
        general: GlowOutput | None,
        levels: Tensor | CodedImages | None,
        typical_bpd: float | None,
    ) -> CodedImages | None:
        """Raise a ValueError for what the detector lacks; the levels as :class:`CodedImages`."""
        if self.needs_general and general is None:
            raise ValueError(f"detector {self.name!r} needs a general-distribution model (--general)")
        if self.typical and (typical_bpd is None or not math.isfinite(typical_bpd)):
            raise ValueError(
                f"detector {self.name!r} needs the model's mean bits/dim on its training images "
                f"(typical_bpd, got {typical_bpd}; tools/score_images.py --typical-set)"
            )
        if self.compressor is None:
            return None
        if levels is None:
            raise ValueError(f"detector {self.name!r} needs the images' quantization levels (levels=...)")
        coded = levels if isinstance(levels, CodedImages) else CodedImages(levels)
        batch = out_in.contributions[0].shape[0]
        if tuple(coded.levels.shape) != (batch, *out_in.input_shape):
            raise ValueError(
                f"detector {self.name!r}: levels of shape {tuple(coded.levels.shape)} for a batch of {batch} "
                f"inputs of shape {out_in.input_shape}"
            )
        return coded

    def score_from(
        self,
        out_in: GlowOutput,
        out_g: GlowOutput | None = None,
        levels: Tensor | CodedImages | None = None,
        typical_bpd: float | None = None,
    ) -> Tensor:
        """``(B,)`` scores, higher = more anomalous. ``levels``: the ``(B, C, H, W)`` uint8
        images (quantization levels) the outputs are of, or them as :class:`CodedImages` (coded once
        for every detector and call that shares it); only ``complexity`` needs them.
        ``typical_bpd``: the model's mean bits/dim on its training images; only ``typicality``
        needs it."""
        coded = self._check(out_in, out_g, levels, typical_bpd)
        lp_in = _finite(self._log_density(out_in))
        if self.typical:
            return (-lp_in / (out_in.n_dims * math.log(2)) - typical_bpd).abs()
        if coded is not None:
            return coded.log_prob(self.compressor).to(lp_in) - lp_in
        if not self.needs_general:
            return -lp_in
        return _finite(self._log_density(out_g)) - lp_in

    def map_from(
        self,
        out_in: GlowOutput,
        out_g: GlowOutput | None = None,
        levels: Tensor | CodedImages | None = None,
        typical_bpd: float | None = None,
    ) -> Tensor:
        """``(B, H, W)`` pixel maps, higher = more anomalous; they sum to :meth:`score_from` where the
        log-densities are finite. A non-finite one becomes the sentinel (``−MIN_LOG_PROB``) at every
        pixel it covers, once in the score: a pixel's stand-in for "no density" is never divided
        among the pixels (dense scoring recognizes sentinels by their magnitude)."""
        coded = self._check(out_in, out_g, levels, typical_bpd)
        m_in = _finite(self._log_density_map(out_in))
        h, w = m_in.shape[-2:]
        if self.typical:  # each pixel's bits/dim less its share of the mean, signed as the image's
            bits = -m_in / (out_in.n_dims * math.log(2)) - typical_bpd / (h * w)
            return bits * bits.sum(dim=(-2, -1)).sign()[:, None, None]
        if coded is not None and self.compressor in PIXEL_CODERS:  # per block of the coarsest grid
            ratio = coded.log_prob_map(self.compressor).to(m_in) - m_in
            return block_mean(ratio, 2 ** len(out_in.contributions))
        if coded is not None:  # one code length per image: spread evenly
            return (coded.log_prob(self.compressor).to(m_in) / (h * w))[:, None, None] - m_in
        if not self.needs_general:
            return -m_in
        return _finite(self._log_density_map(out_g)) - m_in


DETECTORS: dict[str, GlowDetector] = {
    "raw": GlowDetector("raw", needs_general=False),
    "ratio": GlowDetector("ratio", needs_general=True),
    "last_scale": GlowDetector("last_scale", needs_general=False, scale=-1),
    "ratio_last_scale": GlowDetector("ratio_last_scale", needs_general=True, scale=-1),
    "complexity": GlowDetector("complexity", needs_general=False, compressor="png"),
    "complexity_webp": GlowDetector("complexity_webp", needs_general=False, compressor="webp"),
    "complexity_loco": GlowDetector("complexity_loco", needs_general=False, compressor="loco"),
    "typicality": GlowDetector("typicality", needs_general=False, typical=True),
}


def _copied(out: GlowOutput | None) -> GlowOutput | None:
    if out is None:
        return None
    return replace(
        out,
        latents=tuple(t.clone() for t in out.latents),
        contributions=tuple(t.clone() for t in out.contributions),
    )


# Canonical names only: ``scale1``, ``ratio_scale12``; not ``scale0``, ``scale01`` (a second name
# for ``scale1``, and a second CSV column) or non-ASCII digits.
_SCALE_NAME = re.compile(r"^(ratio_)?scale([1-9][0-9]*)$")


def get_detector(name: str) -> GlowDetector:
    """A registered detector, or ``scale<i>`` / ``ratio_scale<i>`` for scale ``i`` (1-based).

    ``i`` is written without leading zeros (``scale1``, not ``scale01``).
    """
    if name in DETECTORS:
        return DETECTORS[name]
    m = _SCALE_NAME.match(name)
    if m:
        return GlowDetector(name, needs_general=bool(m.group(1)), scale=int(m.group(2)))
    raise ValueError(
        f"unknown detector {name!r}; valid: {', '.join(DETECTORS)}, scale<i>, ratio_scale<i> (i = 1, 2, ...)"
    )


class GlowScorer:
    """Runs the in-distribution (and general) Glow once per batch and applies detectors.

    Args:
        model: the in-distribution Glow.
        general: the general-distribution Glow (for ratio detectors). It must see the
            data as ``model`` does (same ``in_channels`` and ``n_bins``: log-likelihoods
            of differently quantized data differ by a constant, not by the images);
            scale-wise ratios (``ratio_scale<i>``, ``ratio_last_scale``) also need the
            same number of scales (:meth:`check_detectors`).
        amp: run the coupling networks in bf16 (log-dets stay fp32).
        fast: speed levers of :mod:`densead.flows.fast`, switched on the models
            in place. ``auto`` pulls ``fused`` and ``channels_last`` on CUDA
            and nothing on CPU; it leaves ``compile`` off, because scoring is
            short and sees many input shapes (the last batch, road scenes of
            several sizes), each a recompilation. Ask for ``compile`` by name.
            ``cudagraphs`` (CUDA only, by name too) replays each model's forward
            from a CUDA graph for batches of the first full batch's shape (other
            shapes, such as the last batch, run eagerly); outputs are copied out
            of the graph, so every call's results stay valid.
        typical_bpd: ``model``'s mean bits/dim on its training images, for ``typicality``
            (:func:`densead.scoring.typical_bits_per_dim`).
    """

    def __init__(
        self,
        model: Glow,
        general: Glow | None = None,
        amp: bool = False,
        fast: str = "auto",
        typical_bpd: float | None = None,
    ) -> None:
        if general is not None:
            for attr in ("in_channels", "n_bins"):
                mine, theirs = getattr(model, attr), getattr(general, attr)
                if mine != theirs:
                    raise ValueError(
                        f"general model's {attr} ({theirs}) differs from the in-distribution model's ({mine})"
                    )
        self.model = model.eval()
        self.general = general.eval() if general is not None else None
        self.amp = amp
        self.typical_bpd = typical_bpd
        levers = resolve_fast_path(fast, next(model.parameters()).device, allow_compile=False)
        for m in (self.model, self.general):
            if m is not None:
                apply_fast_path(m, levers)
        self.graphed: dict[bool, GraphedCall] | None = None
        if levers.cudagraphs:  # one graph per need_general
            self.graphed = {
                need: GraphedCall(partial(self._forward, need_general=need)) for need in (False, True)
            }

    def _forward(self, x: Tensor, need_general: bool) -> tuple[GlowOutput, GlowOutput | None]:
        # Autocast's weight cache off: a CUDA graph must not capture it.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            return self.model(x), self.general(x) if need_general else None

    @torch.no_grad()
    def outputs(self, x: Tensor, need_general: bool) -> tuple[GlowOutput, GlowOutput | None]:
        if need_general and self.general is None:
            raise ValueError("a ratio detector needs a general-distribution model (--general)")
        if self.graphed is None:
            return self._forward(x, need_general)
        outs = self.graphed[need_general](x)  # the graph's tensors: the next replay overwrites them
        return tuple(_copied(out) for out in outs)

    def check_detectors(self, detectors: Sequence[GlowDetector]) -> None:
        """Raise a ValueError naming the detector if one cannot run on these models.

        Ratio detectors need the general model; scale detectors a scale the
        in-distribution model has; scale-wise ratios (``ratio_scale<i>``,
        ``ratio_last_scale``) two models with the same number of scales (the
        i-th or last scale of Glows of different depth are different
        resolutions). ``ratio`` compares whole log-likelihoods: any depths.
        """
        n = self.model.n_scales
        for d in detectors:
            if d.needs_general and self.general is None:
                raise ValueError(f"detector {d.name!r} needs a general-distribution model (--general)")
            if d.typical and self.typical_bpd is None:
                raise ValueError(
                    f"detector {d.name!r} needs the model's mean bits/dim on its training images "
                    "(GlowScorer(typical_bpd=...); tools/score_images.py --typical-set)"
                )
            if d.scale is None:
                continue
            if not (1 <= d.scale <= n or -n <= d.scale <= -1):
                raise ValueError(f"detector {d.name!r}: scale {d.scale} out of range for a {n}-scale Glow")
            if d.needs_general and self.general.n_scales != n:
                raise ValueError(
                    f"detector {d.name!r} compares one scale of both models, but the general model has "
                    f"{self.general.n_scales} scales and the in-distribution model {n}"
                )

    def _levels(self, x: Tensor, detectors: list[GlowDetector]) -> CodedImages | None:
        """The images' levels (noise-free ``x`` back to uint8), coded once per coder, when a
        detector codes them."""
        if not any(d.compressor is not None for d in detectors):
            return None
        return CodedImages(levels_from_input(x, self.model.n_bins))

    def score(self, x: Tensor, detectors: list[GlowDetector]) -> dict[str, Tensor]:
        """``{name: (B,) scores}`` for noise-free model inputs ``x``."""
        self.check_detectors(detectors)
        levels = self._levels(x, detectors)
        outs = self.outputs(x, any(d.needs_general for d in detectors))
        return {d.name: d.score_from(*outs, levels, self.typical_bpd) for d in detectors}

    def score_maps(self, x: Tensor, detectors: list[GlowDetector]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: ((B,) scores, (B, H, W) maps)}`` from one pass of each model."""
        self.check_detectors(detectors)
        levels = self._levels(x, detectors)
        outs = self.outputs(x, any(d.needs_general for d in detectors))
        t = self.typical_bpd
        return {d.name: (d.score_from(*outs, levels, t), d.map_from(*outs, levels, t)) for d in detectors}
