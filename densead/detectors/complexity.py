"""A lossless compressor as the general distribution (Serrà et al., ICLR 2020, "input complexity").

A lossless code of ``L(x)`` bits is a (sub-)probability ``p_c(x) = 2^−L(x)`` over the discrete
images (Kraft's inequality), so a compressor is a general distribution that needs no training
and no general data. Used like the general Glow of the ratio detector ("Diff"):

    complexity(x) = log p_c(x) − log p_in(x) = −L(x)·ln 2 − log p_in(x)      (nats)

Higher = more anomalous: an in-distribution image is coded much shorter by the model than by the
compressor; an anomaly is not, however simple it is (a digit on black is cheap for both). This is
Serrà et al.'s ``S(x)`` with PNG (``complexity``) or WebP lossless (``complexity_webp``) as
the complexity estimate, in nats instead of bits; they found that a stronger coder (FLIF) gives a
better estimate.

The code length is the whole file (headers included: nearly a constant for a given image size
and channel count, so rankings among same-size images hardly depend on it), written by OpenCV
from the image's quantization levels ``0 … n_bins−1``, which is the discrete object the Glow's
``log p(x)`` is a probability of.

A file's length is one number per image. ``loco`` (``complexity_loco``) is a coder whose length
is a sum over pixels, so the detector has a true pixel map, ``−L(x)[h, w]·ln 2 − log p_in(x)[h, w]``,
that sums to its score (:func:`pixel_code_lengths`): LOCO-I's causal predictor and activity
contexts (Weinberger et al., IEEE TIP 2000, the algorithm of JPEG-LS) with a colour transform by
prediction (a channel's prediction is shifted by the previous channel's prediction residual at
the same pixel), and per context adaptive counts of the residuals' magnitude classes (JPEG's
"categories": 0, ±1, ±2…3, ±4…7, …). Its length is the ideal one of an arithmetic coder driven
by that model (a real coder's is within 2 bits of it per image). On small images it codes
shorter than lossless WebP and PNG, photos and drawings alike (bits/dim on 1,000 test images
each, loco / WebP / PNG: CIFAR-10 4.37 / 4.62 / 5.92, Tiny ImageNet 4.57 / 4.75 / 6.35,
Fashion-MNIST 3.90 / 4.63 / 5.25, MNIST 1.71 / 2.05 / 2.63); on 360×480 road frames about 3%
longer than WebP (CamVid: 2.83 against 2.74, PNG 3.93, on every 40th of the 233 test frames).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CODERS",
    "CODER_NAMES",
    "PIXEL_CODERS",
    "CodedImages",
    "code_length",
    "coded_files",
    "coder_log_prob",
    "levels_from_input",
    "pixel_code_lengths",
]

# Lossless coders, as OpenCV writes them: file extension, parameters, channel counts it codes
# losslessly (OpenCV writes no grey + alpha; WebP drops the colour of transparent pixels).
#   png: zlib level 9, Serrà et al.'s PNG;
#   webp: WebP lossless (quality above 100 selects it), a stronger coder of photos.
CODERS: dict[str, tuple[str, list[int], tuple[int, ...]]] = {
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 9], (1, 3, 4)),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], (1, 3)),
}
# Coders whose length is a sum over pixels (:func:`pixel_code_lengths`): a per-pixel map.
PIXEL_CODERS: tuple[str, ...] = ("loco",)
# Every coder: file coders first (the order of scores.csv's log_prob columns).
CODER_NAMES: tuple[str, ...] = (*CODERS, *PIXEL_CODERS)

# loco's model: 256 levels (a valid code of every uint8 image, so a sub-probability of images with
# fewer levels, as PNG's is); activity contexts floor(log2(q + 1)) for q = 0 … 764, the last one
# taking q ≥ 511; magnitude classes of the residual e in −128 … 127: 0 for e = 0, 1 + floor(log2|e|)
# for 1 ≤ |e| ≤ 127, 8 for e = −128, of 1, 2, 4, …, 128 and 1 values; their counts start at ½
# (Krichevsky–Trofimov).
_LOCO_LEVELS = 256
_LOCO_CONTEXTS = 10
_LOCO_CLASSES = 9
_LOCO_PRIOR_COUNT = 0.5
# Values (images × channels × pixels) pixel_code_lengths codes at once.
_LOCO_CHUNK_VALUES = 1 << 22


def coded_files(levels: Tensor, coder: str = "png") -> list[bytes]:
    """Each image as a losslessly coded file: the code whose length :func:`code_length` is.

    Args:
        levels: ``(B, C, H, W)`` uint8 quantization levels, ``C`` one the coder takes
            (:data:`CODERS`: 1 or 3, and 4 for PNG), channel order as the model sees it (RGB).
        coder: a key of :data:`CODERS`.
    """
    if coder not in CODERS:
        raise ValueError(f"unknown coder {coder!r}; valid: {', '.join(CODERS)}")
    ext, params, channels = CODERS[coder]
    if levels.dim() != 4 or levels.dtype != torch.uint8 or levels.shape[1] not in channels:
        raise ValueError(
            f"{coder} code length: images must be (B, C, H, W) uint8 with C in {channels}, "
            f"got {tuple(levels.shape)} {levels.dtype}"
        )
    arrays = levels.cpu().permute(0, 2, 3, 1).numpy()
    if arrays.shape[-1] in (3, 4):  # OpenCV writes BGR(A): give it the channels in that order
        arrays = arrays[..., [2, 1, 0, *range(3, arrays.shape[-1])]]
    files = []
    for i, a in enumerate(arrays):
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(a), params)
        if not ok:
            raise RuntimeError(f"{coder} code length: OpenCV could not encode image {i} of shape {a.shape}")
        files.append(buf.tobytes())
    return files


def _check_uint8(levels: Tensor, who: str) -> None:
    if levels.dim() != 4 or levels.dtype != torch.uint8:
        raise ValueError(
            f"{who}: images must be (B, C, H, W) uint8, got {tuple(levels.shape)} {levels.dtype}"
        )


def _causal_neighbours(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LOCO-I's neighbours of every pixel of ``(B, C, H, W)`` int64 ``x``, each channel alone: left
    ``a``, up ``b``, up-left ``c``, up-right ``d``. Outside the image: the first row takes the left
    pixel for ``b``, ``c``, ``d`` (the first pixel the middle level for all four); the first
    column the up pixel for ``a`` and ``c``; the last column ``b`` for ``d``."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 0))  # a column left and right, a row on top
    left, up = padded[..., 1:, :-2], padded[..., :-1, 1:-1]
    up_left, up_right = padded[..., :-1, :-2], padded[..., :-1, 2:]
    rows = torch.arange(h, device=x.device).view(h, 1)
    cols = torch.arange(w, device=x.device).view(1, w)
    has_left, has_up, has_right = cols > 0, rows > 0, cols < w - 1
    a = torch.where(has_left, left, torch.where(has_up, up, torch.full_like(x, _LOCO_LEVELS // 2)))
    b = torch.where(has_up, up, a)
    c = torch.where(has_up & has_left, up_left, b)
    d = torch.where(has_up & has_right, up_right, b)
    return a, b, c, d


def _earlier_with_key(key: Tensor) -> Tensor:
    """``(B, L)`` int64 rows of keys in coding order: for each position, how many earlier
    positions of its row have its key."""
    order = torch.sort(key, dim=1, stable=True).indices  # by key, coding order within
    keys = key.gather(1, order)
    idx = torch.arange(keys.shape[1], device=keys.device).expand_as(keys)
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[:, 1:] = keys[:, 1:] != keys[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # where each one's key run starts
    return torch.empty_like(idx).scatter_(1, order, idx - first)


def pixel_code_lengths(levels: Tensor) -> Tensor:
    """``(B, H, W)`` float64: bits of each pixel (its channels together) under the ``loco`` coder.

    Coding order: pixels in raster order, a pixel's channels in order. Each value is predicted by
    LOCO-I's median edge detector (MED) from its channel's causal neighbours
    (:func:`_causal_neighbours`); from the second channel on, the prediction is shifted by the
    previous channel's MED residual at the pixel (value − its MED prediction: how far the pixel
    departs from its neighbours there; a colour transform by prediction) and clamped to the
    levels. The residual ``e``, taken modulo 256 into ``−128 … 127``, is coded in its channel's
    activity context (``floor(log2(q + 1))`` of LOCO-I's local activity
    ``q = |d − b| + |b − c| + |c − a|``) as its magnitude class ``k`` (0 for ``e = 0``,
    ``1 + floor(log2|e|)`` up to 7, 8 for ``e = −128``), with probability ``(n_k + ½) / (n + 9/2)``
    from the counts of the context's earlier classes, then one of the class's ``2^k`` values
    (1 for classes 0 and 8) at ``k`` bits. Everything it uses is decoded before the value, so a
    decoder rebuilds every distribution, and each sums to 1 over the 256 values: the bits are
    an arithmetic coder's ideal code length, and their sum over pixels is the image's.

    Args:
        levels: ``(B, C, H, W)`` uint8, any channel count.
    """
    _check_uint8(levels, "loco code length")
    n, ch, h, w = levels.shape
    if n == 0 or ch * h * w == 0:
        return torch.zeros(n, h, w, dtype=torch.float64, device=levels.device)
    # Images are coded alone: a chunk of them at a time bounds the memory (about 170 bytes per
    # value: a 1024×2048×3 frame takes 1 GB) without a Python loop over small images.
    per_chunk = max(1, _LOCO_CHUNK_VALUES // (ch * h * w))
    return torch.cat([_loco_bits(chunk) for chunk in levels.split(per_chunk)])


def _powers_of_two_below(values: Tensor, top: int) -> Tensor:
    """``floor(log2(v))`` of integers ``1 ≤ v``, exactly (integer comparisons), capped at ``top``."""
    bounds = torch.tensor([2**k for k in range(1, top + 1)], device=values.device)
    return torch.bucketize(values.contiguous(), bounds, right=True)


def _loco_bits(levels: Tensor) -> Tensor:
    """:func:`pixel_code_lengths` of a chunk of images."""
    x = levels.long()
    n, ch, h, w = x.shape
    a, b, c, d = _causal_neighbours(x)
    low, high = torch.minimum(a, b), torch.maximum(a, b)
    pred = torch.where(c >= high, low, torch.where(c <= low, high, a + b - c))
    if ch > 1:  # the previous channel's MED residual at this pixel, decoded before this value
        pred = torch.cat([pred[:, :1], (pred[:, 1:] + (x - pred)[:, :-1]).clamp(0, _LOCO_LEVELS - 1)], 1)
    half = _LOCO_LEVELS // 2
    size = ((x - pred + half) % _LOCO_LEVELS - half).abs()
    # |e| = 0 → 0; 1 … 127 → 1 + floor(log2|e|) (1 … 7); 128 → 8
    klass = torch.where(size == 0, 0, _powers_of_two_below(size.clamp(min=1), _LOCO_CLASSES - 1) + 1)
    within = torch.where(klass == _LOCO_CLASSES - 1, 0, klass).double()  # log2 of the class's values
    activity = (d - b).abs() + (b - c).abs() + (c - a).abs()
    context = _powers_of_two_below(activity + 1, _LOCO_CONTEXTS - 1)
    context = context + _LOCO_CONTEXTS * torch.arange(ch, device=x.device).view(1, ch, 1, 1)
    seen = _earlier_with_key(context.reshape(n, -1)).double()
    seen_class = _earlier_with_key((context * _LOCO_CLASSES + klass).reshape(n, -1)).double()
    prob = (seen_class + _LOCO_PRIOR_COUNT) / (seen + _LOCO_CLASSES * _LOCO_PRIOR_COUNT)
    bits = within - torch.log2(prob).view(n, ch, h, w)
    return bits.sum(dim=1)


def code_length(levels: Tensor, coder: str = "png") -> Tensor:
    """``(B,)`` float64: bits of each image: its coded file's (:func:`coded_files`), or for a coder
    of :data:`PIXEL_CODERS` the sum of :func:`pixel_code_lengths`."""
    if coder in PIXEL_CODERS:
        return pixel_code_lengths(levels).sum(dim=(-2, -1))
    if coder not in CODERS:
        raise ValueError(f"unknown coder {coder!r}; valid: {', '.join(CODER_NAMES)}")
    return torch.tensor([8.0 * len(f) for f in coded_files(levels, coder)], dtype=torch.float64)


def coder_log_prob(levels: Tensor, coder: str = "png") -> Tensor:
    """``(B,)`` float64: ``log p_c(x) = −L(x)·ln 2`` in nats (:func:`code_length`)."""
    return -code_length(levels, coder) * math.log(2)


class CodedImages:
    """A batch of images' levels, coded at most once per coder.

    One batch is coded by several consumers (a score and its map, a complexity column and the
    report's bits/dim): each :meth:`log_prob` of a coder after the first is the stored result.

    Args:
        levels: ``(B, C, H, W)`` uint8 quantization levels (:func:`coded_files`).
    """

    def __init__(self, levels: Tensor) -> None:
        self.levels = levels
        self._log_probs: dict[str, Tensor] = {}
        self._maps: dict[str, Tensor] = {}

    def log_prob_map(self, coder: str) -> Tensor:
        """``(B, H, W)`` float64 ``−L(x)[h, w]·ln 2`` of a coder of :data:`PIXEL_CODERS`."""
        if coder not in PIXEL_CODERS:
            raise ValueError(
                f"coder {coder!r} codes whole files (one length per image, no per-pixel map); "
                f"per-pixel coders: {', '.join(PIXEL_CODERS)}"
            )
        if coder not in self._maps:
            self._maps[coder] = -pixel_code_lengths(self.levels) * math.log(2)
        return self._maps[coder]

    def log_prob(self, coder: str) -> Tensor:
        """``(B,)`` float64 :func:`coder_log_prob` of the batch (a pixel coder's: its map's sum)."""
        if coder not in self._log_probs:
            if coder in PIXEL_CODERS:
                self._log_probs[coder] = self.log_prob_map(coder).sum(dim=(-2, -1))
            else:
                self._log_probs[coder] = coder_log_prob(self.levels, coder)
        return self._log_probs[coder]


def levels_from_input(x: Tensor, n_bins: int) -> Tensor:
    """The uint8 levels of noise-free model inputs (``(k + ½)/n_bins − ½``, as scoring makes them).

    Raises a ValueError for ``n_bins > 256`` (no uint8 levels) and for inputs that are not
    bin midpoints (dequantized training inputs, or a dtype too coarse to hold them): the
    compressor must code the very image the Glow's likelihood is of.
    """
    if not 2 <= n_bins <= 256:
        raise ValueError(f"a code length needs 2…256 quantization levels, the model has n_bins={n_bins}")
    scaled = (x.detach().double() + 0.5) * n_bins - 0.5
    levels = scaled.round()
    off = levels.numel() and not ((scaled - levels).abs().max() <= 0.25)  # NaN is off too
    if off or (levels.numel() and (levels.min() < 0 or levels.max() >= n_bins)):
        raise ValueError(
            "complexity: the model inputs are not noise-free levels ((k + 0.5)/n_bins − 0.5 for "
            f"k = 0…{n_bins - 1}, n_bins={n_bins}); score noise-free inputs "
            f"(to_model_input(..., dequantize=False)) in float32 ({x.dtype} given)"
        )
    return levels.to(torch.uint8)
