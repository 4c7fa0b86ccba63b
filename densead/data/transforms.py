"""Batch transforms on uint8 image tensors, on whatever device the batch is on.

Image-level training keeps the whole set as a uint8 tensor (on the GPU when
there is one), so augmentation and dequantization run there too and are driven
by an explicit ``torch.Generator``: the same seed and step give the same batch,
which makes ``--resume`` exact without saving any RNG state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AUGMENTATIONS", "augment_batch", "to_model_input", "to_uint8"]

# Paper S4: translations of up to 10% of the image size.
MAX_TRANSLATION = 0.1

AUGMENTATIONS = ("none", "translate", "flip", "flip_translate")


def to_model_input(
    images: Tensor, n_bins: int, dequantize: bool, generator: torch.Generator | None = None
) -> Tensor:
    """uint8 levels ``0 … n_bins−1`` → float in ``[−0.5, 0.5)``.

    Training adds uniform dequantization noise ``u ~ U[0, 1)`` to each level;
    evaluation adds the interval's midpoint 1/2 instead (noise-free, paper S4).
    """
    x = images.float()
    offset = torch.rand(x.shape, generator=generator, device=x.device) if dequantize else 0.5
    return (x + offset) / n_bins - 0.5


def to_uint8(x: Tensor, n_bins: int) -> Tensor:
    """Inverse of :func:`to_model_input` (for samples): float → uint8 levels."""
    return ((x + 0.5) * n_bins).floor().clamp(0, n_bins - 1).to(torch.uint8)


def augment_batch(images: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """Random translation ≤ 10%, at least a pixel (reflect padding; ``translate``), horizontal flips
    (``flip``), or both (``flip_translate``).

    Args:
        images: ``(B, C, H, W)`` uint8 (or float) batch.
        mode: one of :data:`AUGMENTATIONS`.
        generator: drives every random choice.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {mode!r}; valid: {', '.join(AUGMENTATIONS)}")
    if mode == "none":
        return images
    b, _, h, w = images.shape
    device = images.device
    if mode in ("flip", "flip_translate"):
        flip = torch.rand(b, generator=generator, device=device) < 0.5
        images = torch.where(flip.view(b, 1, 1, 1), images.flip(-1), images)
    if mode == "flip":
        return images
    # 10% of 8 pixels rounds down to none: a translation is at least a pixel (none of a 1-pixel side)
    mh, mw = (max(1, int(MAX_TRANSLATION * n)) if n > 1 else 0 for n in (h, w))
    if mh == 0 and mw == 0:
        return images
    # Reflect padding needs a float tensor; uint8 values survive the round trip exactly.
    padded = F.pad(images.float(), (mw, mw, mh, mh), mode="reflect").to(images.dtype)
    dy = torch.randint(0, 2 * mh + 1, (b,), generator=generator, device=device)
    dx = torch.randint(0, 2 * mw + 1, (b,), generator=generator, device=device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, chans, rows, cols]
