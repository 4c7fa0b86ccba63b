"""Auxiliary outliers for dense training: photos pasted into road frames.

Dense anomaly detectors that train with negative data (outlier exposure: Hendrycks et al.,
ICLR 2019; for road scenes e.g. Chan et al., ICCV 2021, and Grcić et al., ECCV 2022, who paste
objects of another dataset into the training frames) see pasted content as "anything that is
not a road-scene class". :class:`PhotoPaster` pastes resized photos of an image set (e.g. Tiny
ImageNet, with classes showing the held-out anomalies excluded by the config) at random places
of a batch of frames and returns the pixel mask of what it pasted.

The pasted photos are input to the frozen segmenter like any frame content; what a detector
learns from them must generalize to anomalies it never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from densead.config import DataConfig, FieldError
from densead.data.images import load_image_set

__all__ = ["OutlierPasteConfig", "PasteConfig", "PhotoPaster", "paste_photos"]


@dataclass(frozen=True)
class PasteConfig:
    """Photos pasted into training frames (:class:`PhotoPaster`).

    Attributes:
        data: the photos (e.g. ``tinyimagenet_val_32.npz``; ``exclude_classes`` must drop the
            classes that show the benchmark's held-out anomalies).
        per_frame: photos pasted into each training frame.
        min_size, max_size: pasted height in pixels of the working-scale frame, drawn uniformly.
        max_aspect: width / height drawn log-uniformly from ``[1/max_aspect, max_aspect]``.
    """

    data: DataConfig
    per_frame: int = 2
    min_size: int = 12
    max_size: int = 48
    max_aspect: float = 2.0

    def __post_init__(self) -> None:
        # FieldError: read from a file, the error names the whole key (outliers.per_frame) and the file.
        if self.per_frame < 1:
            raise FieldError("per_frame", f"must be >= 1, got {self.per_frame}")
        if not 1 <= self.min_size <= self.max_size:
            raise FieldError(
                "min_size",
                f"need 1 <= min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}",
            )
        if self.max_aspect < 1:
            raise FieldError("max_aspect", f"must be >= 1, got {self.max_aspect}")


@dataclass(frozen=True)
class OutlierPasteConfig(PasteConfig):
    """Photos pasted into training frames as auxiliary outliers (:class:`PasteConfig`), and the
    loss of the feature flows they enter.

    Attributes:
        weight: ``λ`` of the outlier term (see
            :func:`densead.detectors.feature_density.flow_training_step`).
        temperature: ``T`` of the outlier term, in nats per feature dimension.
        margin: how far (nats per dimension) below the in-distribution positions' mean
            log-likelihood the term pushes an outlier before it saturates.
    """

    weight: float = 0.1
    temperature: float = 0.1
    margin: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight < 0:
            raise FieldError("weight", f"must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise FieldError("temperature", f"must be > 0, got {self.temperature}")


def paste_photos(
    images: np.ndarray,
    photos: np.ndarray,
    rng: np.random.Generator,
    per_frame: int,
    min_size: int,
    max_size: int,
    max_aspect: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``per_frame`` random photos into each frame.

    Args:
        images: uint8 ``(B, H, W, 3)`` frames (not modified).
        photos: uint8 ``(N, h, w, 3)``.
        rng: draws the photos, sizes and places.
        per_frame, min_size, max_size, max_aspect: see :class:`OutlierPasteConfig`; sizes are
            clipped to the frame.

    Returns:
        (a pasted copy of ``images``, bool ``(B, H, W)`` mask of the pasted pixels).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"frames must be (B, H, W, 3), got shape {images.shape}")
    if photos.ndim != 4 or photos.shape[-1] != 3 or len(photos) == 0:
        raise ValueError(f"photos must be a non-empty (N, h, w, 3) array, got shape {photos.shape}")
    out = images.copy()
    b, height, width = images.shape[:3]
    mask = np.zeros((b, height, width), dtype=bool)
    log_aspect = math.log(max_aspect)
    for i in range(b):
        for _ in range(per_frame):
            photo = photos[rng.integers(len(photos))]
            h = min(int(rng.integers(min_size, max_size + 1)), height)
            w = min(max(1, round(h * math.exp(rng.uniform(-log_aspect, log_aspect)))), width)
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            out[i, y : y + h, x : x + w] = cv2.resize(photo, (w, h), interpolation=cv2.INTER_LINEAR)
            mask[i, y : y + h, x : x + w] = True
    return out, mask


class PhotoPaster:
    """:func:`paste_photos` with the photos of ``cfg.data`` loaded once and a seeded generator."""

    def __init__(self, cfg: PasteConfig, seed: int = 0) -> None:
        if cfg.data.channels != 3:
            raise ValueError(f"outliers.data.channels must be 3 (RGB road frames), got {cfg.data.channels}")
        photos = load_image_set(cfg.data, name="outliers.data").images
        self.photos = np.ascontiguousarray(photos.permute(0, 2, 3, 1).numpy())
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        return paste_photos(images, self.photos, self.rng, c.per_frame, c.min_size, c.max_size, c.max_aspect)
