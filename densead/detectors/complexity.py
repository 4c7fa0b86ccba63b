"""A lossless compressor as the general distribution (Serrà et al., ICLR 2020, "input complexity").

A lossless code of ``L(x)`` bits is a (sub-)probability ``p_c(x) = 2^−L(x)`` over the discrete
images (Kraft's inequality), so a compressor is a general distribution that needs no training
and no general data. Used like the general Glow of the ratio detector ("Diff"):

    complexity(x) = log p_c(x) − log p_in(x) = −L(x)·ln 2 − log p_in(x)      (nats)

Higher = more anomalous: an in-distribution image is coded much shorter by the model than by the
compressor; an anomaly is not, however simple it is (a digit on black is cheap for both). This is
Serrà et al.'s ``S(x)`` with PNG as the complexity estimate, in nats instead of bits.

The code length is the whole PNG file (headers included: a constant for a given image size and
channel count, so rankings among same-size images do not depend on it), written by OpenCV at
the highest zlib level from the image's quantization levels ``0 … n_bins−1``, which is the
discrete object the Glow's ``log p(x)`` is a probability of.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["PNG_CHANNELS", "levels_from_input", "png_code_length", "png_files", "png_log_prob"]

# Channel counts written as one PNG image: grey, RGB, RGBA (OpenCV writes no grey + alpha).
PNG_CHANNELS = (1, 3, 4)


def png_files(levels: Tensor) -> list[bytes]:
    """Each image as a PNG file (zlib level 9): the code whose length :func:`png_code_length` is.

    Args:
        levels: ``(B, C, H, W)`` uint8 quantization levels, ``C`` in :data:`PNG_CHANNELS`
            (channel order as the model sees it: RGB).
    """
    if levels.dim() != 4 or levels.dtype != torch.uint8 or levels.shape[1] not in PNG_CHANNELS:
        raise ValueError(
            f"PNG code length: images must be (B, C, H, W) uint8 with C in {PNG_CHANNELS}, "
            f"got {tuple(levels.shape)} {levels.dtype}"
        )
    arrays = levels.cpu().permute(0, 2, 3, 1).numpy()
    if arrays.shape[-1] in (3, 4):  # OpenCV writes BGR(A): give it the channels in that order
        arrays = arrays[..., [2, 1, 0, *range(3, arrays.shape[-1])]]
    files = []
    for i, a in enumerate(arrays):
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(a), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:
            raise RuntimeError(f"PNG code length: OpenCV could not encode image {i} of shape {a.shape}")
        files.append(buf.tobytes())
    return files


def png_code_length(levels: Tensor) -> Tensor:
    """``(B,)`` float64: bits of each image's PNG file (:func:`png_files`)."""
    return torch.tensor([8.0 * len(f) for f in png_files(levels)], dtype=torch.float64)


def png_log_prob(levels: Tensor) -> Tensor:
    """``(B,)`` float64: ``log p_c(x) = −L(x)·ln 2`` in nats (:func:`png_code_length`)."""
    return -png_code_length(levels) * math.log(2)


def levels_from_input(x: Tensor, n_bins: int) -> Tensor:
    """The uint8 levels of noise-free model inputs (``(k + ½)/n_bins − ½``, as scoring makes them).

    Raises a ValueError for ``n_bins > 256`` (no uint8 levels) and for inputs that are not
    bin midpoints (dequantized training inputs, or a dtype too coarse to hold them): the
    compressor must code the very image the Glow's likelihood is of.
    """
    if not 2 <= n_bins <= 256:
        raise ValueError(f"PNG code length needs 2…256 quantization levels, the model has n_bins={n_bins}")
    scaled = (x.detach().double() + 0.5) * n_bins - 0.5
    levels = scaled.round()
    off = levels.numel() and (scaled - levels).abs().max() > 0.25
    if off or (levels.numel() and (levels.min() < 0 or levels.max() >= n_bins)):
        raise ValueError(
            "complexity: the model inputs are not noise-free levels ((k + 0.5)/n_bins − 0.5 for "
            f"k = 0…{n_bins - 1}, n_bins={n_bins}); score noise-free inputs "
            f"(to_model_input(..., dequantize=False)) in float32 ({x.dtype} given)"
        )
    return levels.to(torch.uint8)
