"""Image sets for image-level detection, reduced to one uint8 tensor.

Every source — ``.npz`` arrays, image folders, torchvision's CIFAR-10/100,
SVHN, MNIST and Fashion-MNIST (``download`` for real users), and the real
datasets that ship with scikit-learn (digits, two photographs) — becomes an
:class:`ImageSet`: uint8 images ``(N, C, H, W)`` with levels ``0 … n_bins−1``
and int64 labels (−1 where unknown). Sets of 32×32 images fit in memory (and on
the GPU) whole, which keeps the training input pipeline trivial and fast.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from densead.config import DataConfig
from densead.data.transforms import AUGMENTATIONS
from densead.io import missing_folders, not_a_file

__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "ImageSet", "load_image_set", "to_greyscale"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# ITU-R 601 luma, as the paper made its greyscale Tiny Images.
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)


@dataclass(frozen=True)
class ImageSet:
    """uint8 images ``(N, C, H, W)`` with levels ``0 … n_bins−1`` and int64 labels ``(N,)``."""

    images: Tensor
    labels: Tensor
    name: str
    # Per-image names: file paths for folders, else the index in the source file or dataset
    # (``00017``: after slicing and class filters, still the image's place in its source);
    # empty for a mix whose parts' names would repeat.
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class _Raw:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    levels: int  # quantization levels of the source (256 for 8-bit images)
    names: np.ndarray | None = None  # per-image names, where the source has them


def _nhwc(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: expected images (N, H, W) or (N, H, W, 1|3), got shape {images.shape}")
    return images


# The first bytes of a zip archive (np.savez; an empty archive starts with its end record)
# and of a single array's .npy file (np.save).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_NPZ_HELP = "np.savez(path, images=uint8 (N, H, W[, C]), labels=int (N,))"


def _npz_labels(labels: object, n: int, path: Path) -> np.ndarray:
    """The ``labels`` array of an npz set as int64 ``(n,)``; errors name the file."""
    if not isinstance(labels, np.ndarray):
        raise ValueError(f"{path}: 'labels' is not a numpy array; save the set with {_NPZ_HELP}")
    if labels.ndim != 1:
        raise ValueError(f"{path}: 'labels' must be one label per image, shape ({n},); got {labels.shape}")
    if len(labels) != n:
        raise ValueError(f"{path}: {n} images but {len(labels)} labels")
    if labels.dtype.kind in "iub":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.rint(labels)).all():
        return labels.astype(np.int64)  # whole numbers saved as floats
    example = next((v for v in labels.tolist() if not (isinstance(v, float) and v.is_integer())), None)
    raise ValueError(
        f"{path}: 'labels' must be integers (class indices, -1 for unknown), got dtype {labels.dtype}"
        + (f" (e.g. {example!r})" if example is not None else "")
    )


def _load_npz(cfg: DataConfig) -> _Raw:
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(not_a_file(path, "npz image set"))
    with path.open("rb") as fh:
        head = fh.read(len(_NPY_MAGIC))
    if head.startswith(_NPY_MAGIC):
        raise ValueError(f"{path}: a single .npy array, not an .npz archive; save the set with {_NPZ_HELP}")
    if not head.startswith(_ZIP_MAGIC):
        raise ValueError(
            f"{path}: not an .npz archive of arrays (not a zip file); save the set with {_NPZ_HELP}"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f:
                raise KeyError(f"{path}: no 'images' array (found: {', '.join(f.files)})")
            images = f["images"]
            labels = f.get("labels")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # Truncated or corrupt archives, object arrays (never unpickled here), bad .npy members.
        raise ValueError(f"{path}: not a readable .npz archive of arrays ({err})") from None
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{path}: 'images' is not a numpy array; save the set with {_NPZ_HELP}")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be uint8, got {images.dtype}")
    images = _nhwc(images, str(path))
    labels = (
        np.full(len(images), -1, dtype=np.int64) if labels is None else _npz_labels(labels, len(images), path)
    )
    return _Raw(images, labels, 256)


def _read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot read image file {path} (corrupt or unsupported format)")
    if img.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got {img.dtype}")
    if img.ndim == 2:
        return img[..., None]
    if img.shape[2] == 4:
        img = img[..., :3]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _load_folder(cfg: DataConfig) -> _Raw:
    root = Path(cfg.path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    class_dirs = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    use_classes = bool(class_dirs) and all(p.parent != root for p in files)
    labels = [class_dirs.index(p.relative_to(root).parts[0]) if use_classes else -1 for p in files]
    # Each image to the configured channels (as load_image_set does for whole sets), so a
    # folder may mix greyscale and colour images; then to the configured size.
    images = [_to_channels(_fit(_read_image(p), cfg, str(p)), cfg.channels) for p in files]
    first = images[0].shape
    for img, p in zip(images, files, strict=True):
        if img.shape != first:
            raise ValueError(
                f"{p}: image of shape {img.shape} differs from {first} ({files[0]}); set size and resize"
            )
    names = np.asarray([str(p.relative_to(root).with_suffix("")) for p in files])
    return _Raw(np.stack(images), np.asarray(labels, dtype=np.int64), 256, names)


def _load_torchvision(cfg: DataConfig) -> _Raw:
    import torchvision.datasets as tvd

    train = cfg.split == "train"
    if cfg.split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for {cfg.source}, got {cfg.split!r}")
    where = f"torchvision {cfg.source} ({cfg.split}) under {cfg.path!r}"
    made = missing_folders(Path(cfg.path).absolute())
    try:
        if cfg.source in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if cfg.source == "cifar10" else tvd.CIFAR100
            ds = cls(cfg.path, train=train, download=cfg.download)
            return _Raw(np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64), 256)
        if cfg.source == "svhn":
            ds = tvd.SVHN(cfg.path, split=cfg.split, download=cfg.download)
            return _Raw(np.asarray(ds.data).transpose(0, 2, 3, 1), np.asarray(ds.labels, dtype=np.int64), 256)
        cls = tvd.MNIST if cfg.source == "mnist" else tvd.FashionMNIST
        ds = cls(cfg.path, train=train, download=cfg.download)
        return _Raw(ds.data.numpy()[..., None], ds.targets.numpy().astype(np.int64), 256)
    except OSError as err:  # the download (URLError, HTTPError, a full disk, ...)
        _remove_empty(made)
        raise FileNotFoundError(
            f"{where}: download failed ({err}); without internet access here, fetch the files "
            f"elsewhere into that folder, or give the images as an .npz (source: npz)"
        ) from None
    except RuntimeError as err:
        # torchvision's advice ("You can use download=True") is for its Python API; say what the
        # config key and the command-line flag are.
        _remove_empty(made)
        reason = re.sub(r"\s*You can use download=True to download it\.?", "", str(err)).strip().rstrip(".")
        if cfg.download:
            raise FileNotFoundError(f"{where}: {reason} (after download)") from None
        raise FileNotFoundError(
            f"{where}: {reason}. To fetch it, set download: true in this data's config (training tools: "
            "--set <key>.download=true, e.g. data.download=true; score_images.py: --download)"
        ) from None


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download made, while they are empty (deepest first)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _load_sklearn_digits(cfg: DataConfig) -> _Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8×8 images with 17 grey levels 0…16 (bright ink on dark ground).
    return _Raw(digits.images.astype(np.uint8)[..., None], digits.target.astype(np.int64), 17)


def _load_sklearn_photo_patches(cfg: DataConfig) -> _Raw:
    from sklearn.datasets import load_sample_images

    if cfg.n_patches <= 0 or cfg.patch_size <= 0:
        raise ValueError("sklearn_photo_patches needs n_patches > 0 and patch_size > 0")
    photos = load_sample_images().images
    smallest = min(min(p.shape[:2]) for p in photos)
    if cfg.patch_size > smallest:
        raise ValueError(
            f"sklearn_photo_patches: patch_size {cfg.patch_size} is larger than the photos "
            f"({smallest} pixels on their short side)"
        )
    rng = np.random.default_rng(cfg.seed)
    which = rng.integers(0, len(photos), cfg.n_patches)
    patches = []
    for i in which:
        h, w, _ = photos[i].shape
        y, x = rng.integers(0, h - cfg.patch_size + 1), rng.integers(0, w - cfg.patch_size + 1)
        patches.append(photos[i][y : y + cfg.patch_size, x : x + cfg.patch_size])
    return _Raw(np.stack(patches), which.astype(np.int64), 256)


SOURCES = {
    "npz": _load_npz,
    "folder": _load_folder,
    "cifar10": _load_torchvision,
    "cifar100": _load_torchvision,
    "svhn": _load_torchvision,
    "mnist": _load_torchvision,
    "fashion_mnist": _load_torchvision,
    "sklearn_digits": _load_sklearn_digits,
    "sklearn_photo_patches": _load_sklearn_photo_patches,
}


def to_greyscale(images: np.ndarray) -> np.ndarray:
    """``(…, 3)`` uint8 RGB → ``(…, 1)`` uint8 luma, rounded (paper's formula)."""
    grey = images.astype(np.float64) @ np.asarray(GREY_WEIGHTS)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """``(…, 1|3)`` uint8 images to ``channels`` (1: luma of RGB; 3: grey repeated)."""
    if channels == 1 and images.shape[-1] == 3:
        return to_greyscale(images)
    if channels == 3 and images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images


def _fit(img: np.ndarray, cfg: DataConfig, where: str) -> np.ndarray:
    """One ``(H, W, C)`` image to ``size × size`` by padding or resizing."""
    h, w, c = img.shape
    size = cfg.size
    if size == 0 or (h, w) == (size, size):
        return img
    if cfg.resize == "none":
        raise ValueError(f"{where}: image is {h}×{w}, expected {size}×{size} (resize: none)")
    if cfg.resize == "pad":
        if h > size or w > size:
            raise ValueError(f"{where}: image {h}×{w} is larger than size {size}; use resize: resize")
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((size, size, c), dtype=img.dtype)
        out[top : top + h, left : left + w] = img
        return out
    if cfg.resize == "resize":
        interp = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_LINEAR
        out = cv2.resize(img, (size, size), interpolation=interp)
        return out.reshape(size, size, c)
    raise ValueError(f"{where}: unknown resize mode {cfg.resize!r} (pad, resize, none)")


def _all_rotations(images: np.ndarray) -> np.ndarray:
    """The 8 symmetries of the square (rotations and mirror images) of each image."""
    out = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    out += [np.flip(o, axis=2) for o in out]
    return np.concatenate(out)


def _quantize(images: np.ndarray, levels: int, n_bins: int) -> np.ndarray:
    if levels == n_bins:
        return images
    scaled = np.rint(images.astype(np.float64) * (n_bins - 1) / (levels - 1))
    return scaled.astype(np.uint8)


def load_image_set(cfg: DataConfig, n_bins: int = 256, name: str = "") -> ImageSet:
    """Load, slice, filter and shape the images that ``cfg`` describes.

    Args:
        cfg: what to load (see :class:`densead.config.DataConfig`).
        n_bins: quantization levels the model uses; 8-bit sources with
            ``n_bins < 256`` are requantized (and 17-level digits likewise).
        name: a name for messages and reports (default: the source).
    """
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data source {cfg.source!r}; valid: {', '.join(SOURCES)}")
    if cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {cfg.augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    if cfg.channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {cfg.channels}")
    try:
        raw = SOURCES[cfg.source](cfg)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {err}" if name else str(err)) from None
    images, labels = raw.images, raw.labels
    names = raw.names if raw.names is not None else np.asarray([f"{i:05d}" for i in range(len(raw.images))])
    stop = cfg.stop or len(images)
    images, labels = images[cfg.start : stop], labels[cfg.start : stop]
    names = names[cfg.start : stop]
    keep = np.ones(len(labels), dtype=bool)
    if cfg.classes:
        keep &= np.isin(labels, cfg.classes)
    if cfg.exclude_classes:
        keep &= ~np.isin(labels, cfg.exclude_classes)
    images, labels = images[keep], labels[keep]
    names = names[keep]
    if len(images) == 0:
        raise ValueError(
            f"{name or cfg.source} ({cfg.path or cfg.source}): no images left after slicing/filtering"
        )
    images = _to_channels(images, cfg.channels)
    where = name or cfg.path or cfg.source
    images = np.stack([_fit(img, cfg, where) for img in images])
    if cfg.rotations:  # of the fitted images: a non-square one would not stack with its rotations
        if images.shape[1] != images.shape[2]:
            raise ValueError(
                f"{where}: rotations need square images, these are {images.shape[1]}×{images.shape[2]}; "
                "set size (with resize: pad or resize)"
            )
        images, labels = _all_rotations(images), np.tile(labels, 8)
        names = np.asarray([f"{n}_sym{k}" for k in range(8) for n in names])
    images = _quantize(images, raw.levels, n_bins)
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    result = ImageSet(tensor, torch.from_numpy(labels.copy()), name or cfg.source, tuple(names.tolist()))
    for i, part_cfg in enumerate(cfg.mix):
        part = load_image_set(part_cfg, n_bins, f"{result.name}.mix[{i}]")
        if part.images.shape[1:] != result.images.shape[1:]:
            raise ValueError(
                f"{result.name}.mix[{i}]: images of shape {tuple(part.images.shape[1:])} do not match "
                f"{tuple(result.images.shape[1:])}; set channels and size alike"
            )
        names = result.names + part.names
        result = ImageSet(
            torch.cat([result.images, part.images]),
            torch.cat([result.labels, part.labels]),
            result.name,
            names if result.names and part.names and len(set(names)) == len(names) else (),
        )
    return result
