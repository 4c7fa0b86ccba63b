"""Dense Glow on road scenes: masked maximum likelihood on random crops of in-distribution frames.

The fully convolutional Glow is trained on random crops of road frames (e.g. CamVid train) with
the pixels of held-out classes (the anomalies of the leave-out protocol) and void pixels removed
from the objective, so the model never learns the anomalies' appearance. Exactly what the loss is:

1. **Input.** A crop ``x`` (B, C, H, W) in ``[−0.5, 0.5)`` with uniform dequantization noise and a
   keep mask ``k`` (B, H, W): True where the frame's label is *inlier* (held-out, void and
   padding pixels are False). Before the forward pass every dropped pixel is overwritten with
   :data:`MASK_FILL` (mid-grey), so a dropped pixel's content cannot reach a kept position through
   the coupling networks' receptive fields either: the held-out objects are invisible to the model
   and any value planted under the mask changes neither the loss nor the gradients.
2. **Kept positions.** A position ``(h, w)`` of scale ``i`` (grid ``H/2^i × W/2^i``) covers the
   ``2^i × 2^i`` input pixels ``[h·2^i, (h+1)·2^i) × [w·2^i, (w+1)·2^i)``. It is kept iff *every*
   pixel it covers is kept: ``k_i = 1 − maxpool_{2^i}(1 − k)`` (:func:`position_masks`).
3. **Objective.** With the Glow's per-position contribution maps ``c_i`` (prior of ``z_i`` plus the
   log-dets of scale ``i`` at that position, DESIGN.md), per sample

       ℓ(x) = Σ_i Σ_{h,w} k_i[h, w]·c_i(x)[h, w]  −  n_kept · C · log(n_bins)
       d(x) = n_kept · C,          n_kept = Σ_{h,w} k[h, w]

   and the batch loss is the per-dimension NLL over kept pixels ``−Σ_b ℓ(x_b) / Σ_b d(x_b)``
   (pooled, so a crop with few kept pixels weighs less; a crop with none is skipped). With
   nothing masked, ``ℓ = log p(x)`` of the discrete data and the loss is bits/dim · ln 2 exactly.
   With a mask it is a surrogate: coarse scales lose a whole ``2^i × 2^i`` block around each
   dropped pixel while the dequantization term and ``d`` count kept pixels, so the number is a
   per-dimension NLL of the kept pixels only approximately (it is what the history logs, in bits).

Frames can be shrunk by an integer ``downscale`` (area averaging) before cropping; a shrunk pixel
is kept only if every native pixel it averages is inlier (:func:`shrink_keep_mask`).

Batches are a pure function of ``(seed, step)`` (frame choice, crop offsets, flips, natural-image
choice and dequantization noise all come from generators seeded by the step), so ``resume``
continues exactly like an uninterrupted run; checkpoints hold ``state_dict``s and the resolved
config, written atomically, loaded with ``weights_only=True`` (same format as
:mod:`densead.train`).

**The general-distribution Glow** (for the ratio detectors) is the same architecture trained with
the same masked loss on batches that mix masked road crops with natural photographs
(:class:`GeneralImagesConfig`: Tiny ImageNet, upsampled to the crop size). That distribution is
broader than road scenes and contains them, as the hierarchy of distributions requires. What it
must not contain are the anomalies: training it on *all* CamVid pixels, held-out classes included,
would teach the general model exactly the held-out objects of the very frames under test, and the
ratio ``log p_g − log p_in`` would then detect pedestrians because one model was shown pedestrians
and the other was not — label leakage, not anomaly detection. So the road part of the general
batches is masked exactly like the in-distribution crops, and the photo classes that are mostly
people (clothing worn, sports scenes, rickshaws) are excluded in the config; people appearing
incidentally in other photos cannot be filtered without labels and are accepted, as in the
paper's Tiny Images.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from densead.config import (
    DataConfig,
    FieldError,
    ModelConfig,
    TrainConfig,
    checkpoint_config,
    require,
    save_config,
    to_dict,
)
from densead.data.images import ImageSet, load_image_set
from densead.data.road import INLIER, ROAD_DATASETS, VOID, RoadDataset
from densead.data.transforms import to_model_input
from densead.flows import FastTraining, Glow, GlowOutput, resolve_fast_path
from densead.io import atomic_torch_save, check_output_dir, require_file
from densead.train import (
    CHECKPOINT_NAME,
    MAX_DROPPED_FRACTION,
    check_output,
    learning_rate,
    load_checkpoint,
    portable_optimizer_state,
    resolve_device,
    set_learning_rate,
    start_or_resume,
)

__all__ = [
    "GENERAL_FITS",
    "MASK_FILL",
    "GeneralImagesConfig",
    "RoadBatches",
    "RoadDataConfig",
    "RoadSource",
    "RoadStepResult",
    "RoadTrainConfig",
    "load_training_frames",
    "masked_log_likelihood",
    "masked_training_step",
    "pad_to_multiple",
    "position_masks",
    "road_log_likelihood",
    "shrink",
    "shrink_keep_mask",
    "train_road_glow",
    "downscale_of",
    "trained_data",
    "trained_downscale",
]

# Dropped pixels become mid-grey (0 in model units) before the forward pass: a constant that
# carries no information about what was under the mask.
MASK_FILL = 0.0

GENERAL_FITS = ("upsample", "mosaic")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class RoadSource:
    """Which road frames: a dataset of :data:`densead.data.road.ROAD_DATASETS` and its options.

    Attributes:
        dataset: registry key (``camvid``, ``cityscapes``, ``smiyc``, ``folder``, ...).
        root: the dataset folder.
        split: the split, for datasets that have splits (ignored by the others).
        held_out: CamVid classes labelled anomaly (leave-out protocol); CamVid only.
        void: CamVid classes labelled void; CamVid only.
        max_frames: only the first N frames of the dataset's order (0: all), for smoke runs.
        protocol: what the split names mean (CamVid: ``splits`` or ``sequences``,
            :data:`densead.data.road.CAMVID_PROTOCOLS`); None: the dataset's default.
    """

    dataset: str
    root: str
    split: str | None = None
    held_out: tuple[str, ...] | None = None
    void: tuple[str, ...] | None = None
    max_frames: int = 0
    protocol: str | None = None

    @property
    def name(self) -> str:
        """``<dataset>[_<protocol>]_<split>`` (or the dataset alone), the set's name in tables."""
        params = inspect.signature(ROAD_DATASETS[self.dataset].__init__).parameters
        if not (self.split and "split" in params):
            return self.dataset
        protocol = self.protocol if "protocol" in params and self.protocol not in (None, "splits") else ""
        return "_".join(p for p in (self.dataset, protocol, self.split) if p)

    def open(self) -> RoadDataset:
        """The dataset; options a dataset class does not take are not passed to it."""
        if self.dataset not in ROAD_DATASETS:
            valid = ", ".join(sorted(ROAD_DATASETS))
            raise ValueError(f"unknown road dataset {self.dataset!r}; valid: {valid}")
        cls = ROAD_DATASETS[self.dataset]
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict = {"root": self.root}
        for key in ("split", "held_out", "void", "protocol"):
            value = getattr(self, key)
            if value is not None and key in params:
                kwargs[key] = value
        dataset = cls(**kwargs)
        if self.max_frames:
            dataset.frames = dataset.frames[: self.max_frames]
        return dataset


@dataclass(frozen=True)
class RoadDataConfig:
    """Road frames to train on and how crops are cut from them.

    Attributes:
        dataset, root, split, held_out, void, max_frames, protocol: see :class:`RoadSource`.
        downscale: integer factor the frames are shrunk by (area averaging) before cropping;
            scoring uses the same factor (1: native resolution).
        crop_height, crop_width: crop size on the shrunk frames, multiples of ``2^n_scales``;
            frames smaller than a crop are padded bottom/right (image mirrored, pixels dropped).
        hflip: random horizontal flips.
    """

    dataset: str = "camvid"
    root: str = ""
    split: str = "train"
    held_out: tuple[str, ...] = ("Pedestrian", "Bicyclist")
    void: tuple[str, ...] = ("Unlabelled",)
    max_frames: int = 0
    protocol: str = "splits"
    downscale: int = 1
    crop_height: int = 64
    crop_width: int = 64
    hflip: bool = True

    def __post_init__(self) -> None:
        require(self, 1, "downscale", "crop_height", "crop_width")
        require(self, 0, "max_frames")

    def source(self) -> RoadSource:
        return RoadSource(
            self.dataset, self.root, self.split, self.held_out, self.void, self.max_frames, self.protocol
        )


@dataclass(frozen=True)
class GeneralImagesConfig:
    """Natural photographs mixed into every batch, for the general-distribution Glow.

    Attributes:
        data: the photos (e.g. ``tinyimagenet_val_32.npz``; ``exclude_classes`` drops classes).
        fraction: share of each batch taken from the photos; the rest are masked road crops.
        fit: ``upsample`` (bilinear to the crop's longer side, then a random crop: objects at
            road-crop scale) or ``mosaic`` (a grid of photos at their own scale; the crop size
            must be a multiple of the photo size).
    """

    data: DataConfig
    fraction: float = 0.5
    fit: str = "upsample"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise FieldError("fraction", f"must be in [0, 1], got {self.fraction}")
        if self.fit not in GENERAL_FITS:
            raise FieldError("fit", f"unknown {self.fit!r}; valid: {', '.join(GENERAL_FITS)}")


@dataclass(frozen=True)
class RoadTrainConfig:
    """Everything ``tools/train_road_glow.py`` needs to train one road Glow."""

    output_dir: str
    data: RoadDataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    general_images: GeneralImagesConfig | None = None


# --------------------------------------------------------------------------- frame geometry


def pad_to_multiple(array: np.ndarray, multiple: int, fill: int | None = None) -> np.ndarray:
    """Pad ``(H, W[, C])`` at the bottom and right up to multiples of ``multiple``.

    ``fill=None`` mirrors the frame (symmetric padding: natural image statistics at the border);
    an int pads with that constant (e.g. :data:`VOID` for labels).
    """
    h, w = array.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return array
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
    if fill is None:
        return np.pad(array, pad, mode="symmetric")
    return np.pad(array, pad, mode="constant", constant_values=fill)


def shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """Shrink a uint8 ``(H, W, C)`` frame by an integer factor: the mean of each block (rounded)."""
    if factor == 1:
        return image
    h, w = image.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"frame {w}x{h} (WxH) is not divisible by downscale {factor}; pad it first")
    return cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA).reshape(
        h // factor, w // factor, *image.shape[2:]
    )


def shrink_keep_mask(label: np.ndarray, factor: int) -> np.ndarray:
    """Bool ``(H/f, W/f)``: True where every native pixel of the block is inlier."""
    keep = label == INLIER
    if factor == 1:
        return keep
    h, w = keep.shape
    if h % factor or w % factor:
        raise ValueError(f"label {w}x{h} (WxH) is not divisible by downscale {factor}; pad it first")
    return keep.reshape(h // factor, factor, w // factor, factor).all(axis=(1, 3))


# --------------------------------------------------------------------------- the masked loss


def position_masks(keep: Tensor, n_scales: int) -> list[Tensor]:
    """Per scale ``i = 1..L`` a bool ``(B, H/2^i, W/2^i)``: every covered input pixel is kept."""
    dropped = (~keep).unsqueeze(1).float()
    return [F.max_pool2d(dropped, 2**i).squeeze(1) == 0 for i in range(1, n_scales + 1)]


def masked_log_likelihood(out: GlowOutput, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(ℓ, d)`` of the module docstring: kept log-likelihood terms and kept dims.

    Args:
        out: the Glow's output for the (already masked) input.
        keep: bool ``(B, H, W)``, True for pixels that count.

    Returns:
        ``ℓ`` (B,) = kept contributions + the dequantization term of kept pixels, and
        ``d`` (B,) = ``C ·`` kept pixels, both float32 (float64 for float64 maps).
    """
    masks = position_masks(keep, len(out.contributions))
    total = None
    for c, m in zip(out.contributions, masks, strict=True):
        # where, not multiply: a non-finite value at a dropped position must not become NaN.
        kept = torch.where(m, c, torch.zeros((), dtype=c.dtype, device=c.device)).sum(dim=(-2, -1))
        total = kept if total is None else total + kept
    n_kept = keep.sum(dim=(-2, -1)).to(total.dtype)
    return total + n_kept * out.dequantization_per_pixel, n_kept * out.input_shape[0]


def road_log_likelihood(model: Glow, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Mask the input (dropped pixels → :data:`MASK_FILL`), run the Glow, return ``(ℓ, d)``."""
    x = torch.where(keep.unsqueeze(1), x, torch.full((), MASK_FILL, dtype=x.dtype, device=x.device))
    return masked_log_likelihood(model(x), keep)


@dataclass(frozen=True)
class RoadStepResult:
    """What one masked step did (the tensor stays on the device until logged)."""

    nll: Tensor  # per-dimension NLL over kept pixels, nats
    skipped: bool
    dropped: int  # samples dropped for non-finite log-likelihoods


def masked_training_step(
    model: Glow,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    keep: Tensor,
    amp: bool = False,
    max_grad_norm: float = 0.0,
) -> RoadStepResult:
    """One step of the masked loss, with :func:`densead.train.training_step`'s numerics.

    One host sync: the finiteness of the gradient norm. Only when it is not finite are the
    per-sample ``ℓ`` inspected; samples with a non-finite ``ℓ`` are dropped and the step is
    recomputed on the rest, or skipped when more than 75% would go (paper S4.3, S4.5).
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def attempt(xi: Tensor, ki: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=xi.device.type, dtype=torch.bfloat16, enabled=amp):
            ll, dims = road_log_likelihood(model, xi, ki)
        loss = -ll.sum() / dims.sum().clamp_min(1.0)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        return loss.detach(), ll.detach(), norm

    loss, ll, norm = attempt(x, keep)
    dropped = 0
    if not torch.isfinite(norm):  # the step's one host sync
        ok = torch.isfinite(ll)
        dropped = int((~ok).sum())
        if dropped == 0 or dropped > MAX_DROPPED_FRACTION * len(ll) or not bool(ok.any()):
            optimizer.zero_grad(set_to_none=True)
            return RoadStepResult(loss, True, dropped)
        loss, ll, norm = attempt(x[ok], keep[ok])
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return RoadStepResult(loss, True, dropped)
    optimizer.step()
    return RoadStepResult(loss, False, dropped)


# --------------------------------------------------------------------------- batches


def _step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 8 + stream) % (2**62)


def load_training_frames(
    cfg: RoadDataConfig, multiple: int, progress: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """Every frame shrunk by ``cfg.downscale``: uint8 ``(C, h, w)`` images and bool keep masks.

    Frames are padded (image mirrored, label void) to multiples of ``downscale · multiple`` so
    shrinking is exact and every crop position is reachable.
    """
    dataset = cfg.source().open()
    images, keeps = [], []
    for i in tqdm(
        range(len(dataset)),
        desc=f"load {cfg.dataset}",
        leave=False,
        disable=not progress or len(dataset) < 50,
    ):
        item = dataset[i]
        if item["label"] is None:
            raise ValueError(f"frame {dataset.frames[i].image} has no label; training needs labelled frames")
        unit = cfg.downscale * multiple
        image = shrink(pad_to_multiple(item["image"], unit), cfg.downscale)
        keep = shrink_keep_mask(pad_to_multiple(item["label"], unit, fill=VOID), cfg.downscale)
        images.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
        keeps.append(torch.from_numpy(keep))
    return images, keeps


class RoadBatches:
    """Batch ``s`` of masked road crops (and natural photos) as a pure function of ``(seed, s)``.

    Each crop comes from a frame drawn uniformly (with replacement), at a uniform offset, flipped
    with probability 1/2; photos likewise, fitted to the crop size as ``general.fit`` says.
    """

    def __init__(
        self,
        frames: Sequence[Tensor],
        keeps: Sequence[Tensor],
        crop: tuple[int, int],
        batch_size: int,
        seed: int,
        hflip: bool = True,
        general: ImageSet | None = None,
        general_fraction: float = 0.0,
        general_fit: str = "upsample",
        n_bins: int = 256,
    ) -> None:
        if general_fit not in GENERAL_FITS:
            raise ValueError(f"unknown general_images.fit {general_fit!r}; valid: {', '.join(GENERAL_FITS)}")
        if not 0.0 <= general_fraction <= 1.0:
            raise ValueError(f"general_images.fraction must be in [0, 1], got {general_fraction}")
        self.frames, self.keeps = list(frames), list(keeps)
        self.crop, self.seed, self.hflip = crop, seed, hflip
        self.general, self.fit, self.n_bins = general, general_fit, n_bins
        self.n_general = round(general_fraction * batch_size) if general is not None else 0
        self.n_road = batch_size - self.n_general
        if self.n_road and not self.frames:
            raise ValueError("no road frames to crop from")
        if general is not None and general_fit == "mosaic":
            tile = general.images.shape[-1]
            if crop[0] % tile or crop[1] % tile:
                raise ValueError(
                    f"mosaic needs crop sizes that are multiples of the photo size {tile}, got {crop}"
                )

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Model input ``x`` (B, C, h, w) with dequantization noise and keep mask (B, h, w), on CPU."""
        g = torch.Generator().manual_seed(_step_seed(self.seed, step, 0))
        parts = []
        if self.n_road:
            parts.append(self._road(g))
        if self.n_general:
            parts.append(self._photos(g))
        images = torch.cat([p[0] for p in parts])
        keep = torch.cat([p[1] for p in parts])
        if self.hflip:
            flip = torch.rand(len(images), generator=g) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            keep = torch.where(flip.view(-1, 1, 1), keep.flip(-1), keep)
        return to_model_input(images, self.n_bins, dequantize=True, generator=g), keep

    def _road(self, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ch, cw = self.crop
        idx = torch.randint(len(self.frames), (self.n_road,), generator=g).tolist()
        u = torch.rand(self.n_road, 2, generator=g)
        images, keeps = [], []
        for j, i in enumerate(idx):
            img, keep = self.frames[i], self.keeps[i]
            h, w = keep.shape
            if h < ch or w < cw:  # pad bottom/right: image mirrored (as at scoring time), pixels dropped
                ph, pw = max(0, ch - h), max(0, cw - w)
                img = torch.from_numpy(np.pad(img.numpy(), [(0, 0), (0, ph), (0, pw)], mode="symmetric"))
                keep = F.pad(keep, (0, pw, 0, ph), value=False)
                h, w = keep.shape
            top = int(u[j, 0] * (h - ch + 1))
            left = int(u[j, 1] * (w - cw + 1))
            images.append(img[:, top : top + ch, left : left + cw])
            keeps.append(keep[top : top + ch, left : left + cw])
        return torch.stack(images), torch.stack(keeps)

    def _photos(self, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ch, cw = self.crop
        photos = self.general.images
        if self.fit == "mosaic":
            tile = photos.shape[-1]
            rows, cols = ch // tile, cw // tile
            idx = torch.randint(len(photos), (self.n_general * rows * cols,), generator=g)
            grid = photos[idx].view(self.n_general, rows, cols, photos.shape[1], tile, tile)
            images = grid.permute(0, 3, 1, 4, 2, 5).reshape(self.n_general, photos.shape[1], ch, cw)
        else:
            side = max(ch, cw)
            idx = torch.randint(len(photos), (self.n_general,), generator=g)
            up = F.interpolate(photos[idx].float(), size=(side, side), mode="bilinear", align_corners=False)
            up = up.round().clamp(0, 255).to(torch.uint8)
            tops = torch.randint(side - ch + 1, (self.n_general,), generator=g).tolist()
            lefts = torch.randint(side - cw + 1, (self.n_general,), generator=g).tolist()
            images = torch.stack(
                [u[:, t : t + ch, x0 : x0 + cw] for u, t, x0 in zip(up, tops, lefts, strict=True)]
            )
        return images, torch.ones(self.n_general, ch, cw, dtype=torch.bool)


# --------------------------------------------------------------------------- the loop


# The data keys that define which frames a road Glow sees and which pixels are inlier, anomaly
# or void: a resumed run must keep them (crop size, flips and every train key may change).
PROTOCOL_KEYS = ("dataset", "root", "split", "held_out", "void", "max_frames", "protocol", "downscale")


def _is_protocol_key(key: str) -> bool:
    """Keys of a road Glow's config that define which pixels are inliers, anomalies or void."""
    if key == "general_images" or key.startswith("general_images.data"):
        return True
    return key.startswith("data.") and key.split(".")[1].split("[")[0] in PROTOCOL_KEYS


def _check_config(cfg: RoadTrainConfig) -> None:
    mcfg, dcfg = cfg.model, cfg.data
    if cfg.train.steps < 1:
        raise ValueError(f"train.steps must be >= 1 to train, got {cfg.train.steps}")
    factor = 2**mcfg.n_scales
    if dcfg.crop_height % factor or dcfg.crop_width % factor or min(dcfg.crop_height, dcfg.crop_width) < 1:
        raise ValueError(
            f"data.crop_height/crop_width ({dcfg.crop_height}x{dcfg.crop_width}) must be positive "
            f"multiples of 2^n_scales = {factor}"
        )
    if dcfg.downscale < 1:
        raise ValueError(f"data.downscale must be a positive integer, got {dcfg.downscale}")
    if mcfg.in_channels != 3 or mcfg.n_bins != 256:
        raise ValueError(
            f"road frames are 8-bit RGB: model.in_channels must be 3 and model.n_bins 256, "
            f"got {mcfg.in_channels} and {mcfg.n_bins}"
        )


def train_road_glow(
    cfg: RoadTrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, RoadStepResult], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train one road Glow with the masked loss as ``cfg`` says; returns the checkpoint path.

    ``<output_dir>/checkpoint.pt`` is written every ``train.checkpoint_every`` steps and at the
    end. An existing one is continued with ``resume`` (a finished one is returned as it is; one
    of another data protocol or other settings is refused), replaced with ``overwrite``, and
    refused otherwise (:func:`densead.train.check_output`).
    """
    _check_config(cfg)
    tcfg, mcfg, dcfg, gcfg = cfg.train, cfg.model, cfg.data, cfg.general_images
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    device = resolve_device(tcfg.device, "train.device")
    check_output_dir(out_dir, files=(CHECKPOINT_NAME, "config.yaml"))
    done = check_output(ckpt_path, cfg, resume, overwrite, _is_protocol_key)
    if done is not None and done["finished"] and done["step"] >= tcfg.steps:
        return ckpt_path
    if done is None and tcfg.init_from:  # before the frames are read
        require_file(tcfg.init_from, "train.init_from")
    torch.manual_seed(tcfg.seed)  # initial weights (InvConv rotations) only

    general = None
    if gcfg is not None:
        general = load_image_set(gcfg.data, mcfg.n_bins, name="general_images")
        if general.images.shape[1] != mcfg.in_channels:
            raise ValueError(f"general_images.data: images have {general.images.shape[1]} channels, need 3")
    needs_road = gcfg is None or round(gcfg.fraction * tcfg.batch_size) < tcfg.batch_size
    frames, keeps = load_training_frames(dcfg, 2**mcfg.n_scales, progress) if needs_road else ([], [])
    batches = RoadBatches(
        frames,
        keeps,
        (dcfg.crop_height, dcfg.crop_width),
        tcfg.batch_size,
        tcfg.seed,
        dcfg.hflip,
        general,
        gcfg.fraction if gcfg is not None else 0.0,
        gcfg.fit if gcfg is not None else "upsample",
        mcfg.n_bins,
    )

    model, optimizer, step, history = start_or_resume(mcfg, tcfg, ckpt_path, resume, device)
    # Crops have one fixed size, so compiled steps are traced once per scale.
    fast = resolve_fast_path(tcfg.fast, device, where="train.fast")
    if fast.cudagraphs:
        raise ValueError(
            "train.fast: cudagraphs is for the image Glow's trainer; the road Glow's masked steps run eagerly"
        )
    fast_training = FastTraining(model, fast)

    def save(finished: bool) -> None:
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": portable_optimizer_state(optimizer),
                "step": step,
                "finished": finished,
                "history": history,
                "model_config": to_dict(mcfg),
                "config": checkpoint_config(cfg),
            },
            ckpt_path,
        )
        save_config(cfg, out_dir / "config.yaml")  # with the checkpoint (see densead.train.train_glow)

    model.train()
    desc = f"train {out_dir.name}"
    bar = tqdm(total=tcfg.steps, initial=step, desc=desc, disable=not progress, leave=False)
    while step < tcfg.steps:
        set_learning_rate(optimizer, learning_rate(tcfg, step))
        x, keep = batches.batch(step)
        if keep.any():  # on the CPU: no device sync
            fast_training.before_step()
            result = masked_training_step(
                model, optimizer, x.to(device), keep.to(device), tcfg.amp, tcfg.max_grad_norm
            )
        else:
            result = RoadStepResult(torch.full((), math.nan), True, 0)
        step += 1
        if on_step is not None:
            on_step(step, result)
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            bpd = float(result.nll) / math.log(2)
            history.append([step, bpd])
            bar.set_postfix(bpd_kept=f"{bpd:.3f}")
        bar.update(1)
        if step % tcfg.checkpoint_every == 0 and step < tcfg.steps:
            save(finished=False)
    bar.close()
    save(finished=True)
    return ckpt_path


def trained_data(checkpoint: str | Path) -> dict:
    """The ``data`` section of the config a road Glow was trained with; ``{}`` for checkpoints
    without one (image Glows)."""
    config = load_checkpoint(checkpoint, mmap=True).get("config", {})
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def downscale_of(data: Mapping[str, Any]) -> int | None:
    """``data.downscale`` of a :func:`trained_data` section, or None where it records none."""
    value = data.get("downscale")
    return int(value) if isinstance(value, int) else None


def trained_downscale(checkpoint: str | Path) -> int | None:
    """The ``data.downscale`` a road Glow was trained with, or None for other checkpoints."""
    return downscale_of(trained_data(checkpoint))
