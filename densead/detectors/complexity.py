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
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["CODERS", "CodedImages", "code_length", "coded_files", "coder_log_prob", "levels_from_input"]

# Lossless coders, as OpenCV writes them: file extension, parameters, channel counts it codes
# losslessly (OpenCV writes no grey + alpha; WebP drops the colour of transparent pixels).
#   png: zlib level 9, Serrà et al.'s PNG;
#   webp: WebP lossless (quality above 100 selects it), a stronger coder of photos.
CODERS: dict[str, tuple[str, list[int], tuple[int, ...]]] = {
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 9], (1, 3, 4)),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], (1, 3)),
}


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


def code_length(levels: Tensor, coder: str = "png") -> Tensor:
    """``(B,)`` float64: bits of each image's coded file (:func:`coded_files`)."""
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

    def log_prob(self, coder: str) -> Tensor:
        """``(B,)`` float64 :func:`coder_log_prob` of the batch."""
        if coder not in self._log_probs:
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
