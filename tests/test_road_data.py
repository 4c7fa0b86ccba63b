"""Road-scene loaders: layouts, label mapping to 0/1/255, errors that name files, transforms."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from densead.data.road import (
    CAMVID_CLASSES,
    ROAD_DATASETS,
    CamVid,
    Cityscapes,
    FishyscapesLostAndFound,
    ImageFolderFrames,
    LostAndFound,
    RoadAnomaly,
    SegmentMeIfYouCan,
    build_road_dataset,
    eval_transform,
    random_crop_transform,
    read_label,
)

H, W = 16, 24
RED = (255, 0, 0)


# ----------------------------------------------------------------------------------------------
# Writing fixtures in the real layouts
# ----------------------------------------------------------------------------------------------


def write_rgb(path: Path, rgb: np.ndarray | tuple[int, int, int], size: tuple[int, int] = (H, W)) -> None:
    """Write an RGB image (cv2 wants BGR); a colour tuple gives a uniform image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.empty((*size, 3), np.uint8)
    image[:] = rgb
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])), path


def write_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label), path


def pattern(values: list[int], shift: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Indices into ``values``, cycling over the pixels, shifted per frame so frames differ."""
    return ((np.arange(size[0] * size[1]) + shift) % len(values)).reshape(size)


@dataclass
class Layout:
    """A fixture dataset on disk and what the loader must return for it."""

    key: str  # ROAD_DATASETS name
    kwargs: dict[str, Any]
    names: list[str]
    images: list[Path]
    labels: list[Path | None]
    expected: list[np.ndarray | None]
    semantic: list[np.ndarray] | None = None
    lossy: bool = False  # JPEG frames: colours within a few levels
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, **overrides: Any) -> Any:
        return ROAD_DATASETS[self.key](**{**self.kwargs, **overrides})


def _frames(
    raw_values: list[int],
    mapped: list[int],
    images: list[Path],
    labels: list[Path | None],
    dtype: type = np.uint8,
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    expected: list[np.ndarray | None] = []
    raws = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        write_rgb(image, RED)
        if label is None:
            expected.append(None)
            continue
        idx = pattern(raw_values, 5 * i)
        raw = np.asarray(raw_values, dtype)[idx]
        write_label(label, raw)
        raws.append(raw)
        expected.append(np.asarray(mapped, np.uint8)[idx])
    return expected, raws


# CamVid: 0..11 plus an out-of-range 12; default protocol holds out 9, 10 and voids 11.
CAMVID_RAW = list(range(13))
CAMVID_MAPPED = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 255, 255]


def camvid_layout(root: Path, split: str = "train", with_list: bool = True) -> Layout:
    names = ["0001TP_006720", "0001TP_006690", "Seq05VD_f00000"]  # list order, deliberately unsorted
    images = [root / split / f"{n}.png" for n in names]
    labels: list[Path | None] = [root / f"{split}annot" / f"{n}.png" for n in names]
    expected, raws = _frames(CAMVID_RAW, CAMVID_MAPPED, images, labels)
    if with_list:
        lines = [f"/SegNet/CamVid/{split}/{n}.png /SegNet/CamVid/{split}annot/{n}.png" for n in names]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    else:
        order = np.argsort(names)
        names, images, labels = (
            [names[i] for i in order],
            [images[i] for i in order],
            [labels[i] for i in order],
        )
        expected, raws = [expected[i] for i in order], [raws[i] for i in order]
    return Layout("camvid", {"root": root, "split": split}, names, images, labels, expected, semantic=raws)


# Cityscapes: every labelId 0..33, plus 34 and 255 (not in the table -> void).
CS_TRAIN_ID_CLASSES = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CS_RAW = [*range(34), 34, 255]
CS_TRAIN_IDS = [CS_TRAIN_ID_CLASSES.index(v) if v in CS_TRAIN_ID_CLASSES else 255 for v in CS_RAW]
CS_MAPPED = [0 if t != 255 else 255 for t in CS_TRAIN_IDS]


def cityscapes_layout(root: Path) -> Layout:
    frames = [
        ("aachen", "aachen_000000_000019"),
        ("aachen", "aachen_000001_000019"),
        ("bochum", "bochum_000000_000313"),
    ]
    images = [root / "leftImg8bit" / "val" / c / f"{b}_leftImg8bit.png" for c, b in frames]
    labels: list[Path | None] = [root / "gtFine" / "val" / c / f"{b}_gtFine_labelIds.png" for c, b in frames]
    expected, raws = _frames(CS_RAW, CS_MAPPED, images, labels)
    semantic = [np.asarray(CS_TRAIN_IDS, np.uint8)[pattern(CS_RAW, 5 * i)] for i in range(len(frames))]
    for c, b in frames:  # the other gtFine files of the release must not confuse the loader
        write_label(root / "gtFine" / "val" / c / f"{b}_gtFine_instanceIds.png", np.zeros((H, W), np.uint8))
    return Layout(
        "cityscapes",
        {"root": root, "split": "val"},
        [b for _, b in frames],
        images,
        labels,
        expected,
        semantic,
    )


FS_RAW = [0, 1, 255, 2, 7]
FS_MAPPED = [0, 1, 255, 255, 255]


def fishyscapes_layout(root: Path) -> Layout:
    # One plain "0000.png" pair and one Cityscapes-style pair with different suffixes.
    images = [
        root / "images" / "0000.png",
        root / "images" / "04_Maurener_Weg_8_000000_000030_leftImg8bit.png",
    ]
    labels: list[Path | None] = [
        root / "labels" / "0000.png",
        root / "labels" / "04_Maurener_Weg_8_000000_000030_labels.png",
    ]
    expected, _ = _frames(FS_RAW, FS_MAPPED, images, labels)
    return Layout(
        "fishyscapes_laf",
        {"root": root},
        ["0000", "04_Maurener_Weg_8_000000_000030"],
        images,
        labels,
        expected,
    )


SMIYC_RAW = [0, 1, 255, 3]
SMIYC_MAPPED = [0, 1, 255, 255]


def smiyc_layout(root: Path, track: str = "RoadAnomaly21") -> Layout:
    ext = ".jpg" if track == "RoadAnomaly21" else ".webp"
    names = ["airplane0000", "validation0000", "validation0001"]  # the first is an unlabelled test frame
    images = [root / "images" / f"{n}{ext}" for n in names]
    labels: list[Path | None] = [None] + [
        root / "labels_masks" / f"{n}_labels_semantic.png" for n in names[1:]
    ]
    expected, _ = _frames(SMIYC_RAW, SMIYC_MAPPED, images, labels)
    # Colour renderings sit beside the id labels in the release and must be ignored.
    write_rgb(root / "labels_masks" / "validation0000_labels_semantic_color.png", (0, 0, 255))
    return Layout(
        "smiyc", {"root": root, "track": track}, names, images, labels, expected, lossy=ext == ".jpg"
    )


LAF_RAW = [0, 1, 2, 100, 200, 201, 255]
LAF_MAPPED = [255, 0, 1, 1, 1, 255, 255]


def lostandfound_layout(root: Path) -> Layout:
    frames = [
        ("02_Hanns_Klemm_Str_44", "02_Hanns_Klemm_Str_44_000000_000080"),
        ("04_Maurener_Weg_8", "04_Maurener_Weg_8_000000_000030"),
    ]
    images = [root / "leftImg8bit" / "test" / s / f"{b}_leftImg8bit.png" for s, b in frames]
    labels: list[Path | None] = [
        root / "gtCoarse" / "test" / s / f"{b}_gtCoarse_labelIds.png" for s, b in frames
    ]
    expected, _ = _frames(LAF_RAW, LAF_MAPPED, images, labels)
    return Layout(
        "lostandfound", {"root": root, "split": "test"}, [b for _, b in frames], images, labels, expected
    )


RA_RAW = [0, 2, 1, 3, 255]
RA_MAPPED = [0, 1, 255, 255, 255]


def road_anomaly_layout(root: Path) -> Layout:
    names = ["animals01_black_bear", "cones01"]
    images = [root / "frames" / f"{n}.jpg" for n in names]
    labels: list[Path | None] = [root / "frames" / f"{n}.labels" / "labels_semantic.png" for n in names]
    expected, _ = _frames(RA_RAW, RA_MAPPED, images, labels)
    return Layout("road_anomaly", {"root": root}, names, images, labels, expected, lossy=True)


def folder_layout(root: Path) -> Layout:
    rel = ["a.png", "b/c.jpg", "b/d/e.webp", "z.bmp"]
    images = [root / r for r in rel]
    for image in images:
        write_rgb(image, RED)
    (root / "notes.txt").write_text("not an image")
    names = ["a", "b/c", "b/d/e", "z"]
    return Layout("folder", {"root": root}, names, images, [None] * 4, [None] * 4, lossy=True)


LAYOUTS: dict[str, Callable[[Path], Layout]] = {
    "camvid": camvid_layout,
    "cityscapes": cityscapes_layout,
    "fishyscapes_laf": fishyscapes_layout,
    "smiyc": smiyc_layout,
    "smiyc_obstacle": lambda root: smiyc_layout(root, "RoadObstacle21"),
    "lostandfound": lostandfound_layout,
    "road_anomaly": road_anomaly_layout,
    "folder": folder_layout,
}
LABELLED = [k for k in LAYOUTS if k != "folder"]


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Layout:
    return LAYOUTS[request.param](tmp_path / "data")


@pytest.fixture(params=LABELLED)
def labelled(request: pytest.FixtureRequest, tmp_path: Path) -> Layout:
    return LAYOUTS[request.param](tmp_path / "data")


def first_labelled(layout: Layout) -> int:
    return next(i for i, label in enumerate(layout.labels) if label is not None)


# ----------------------------------------------------------------------------------------------
# Every loader on its layout
# ----------------------------------------------------------------------------------------------


def test_loader_frames_names_images_labels(layout: Layout) -> None:
    ds = layout.build()
    assert len(ds) == len(layout.names)
    assert ds.names == layout.names
    for i in range(len(ds)):
        item = ds[i]
        assert item["name"] == layout.names[i]
        assert item["path"] == str(layout.images[i])
        image = item["image"]
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        # Pure red on disk must come back as RGB [255, 0, 0] (not BGR).
        tol = 4 if layout.lossy else 0
        assert np.abs(image.astype(int) - np.array(RED)).max() <= tol, image[0, 0]
        if layout.expected[i] is None:
            assert item["label"] is None
        else:
            assert item["label"].dtype == np.uint8
            np.testing.assert_array_equal(item["label"], layout.expected[i])
        if layout.semantic is not None:
            np.testing.assert_array_equal(item["semantic"], layout.semantic[i])
        else:
            assert "semantic" not in item


def test_missing_label_fails_at_construction(labelled: Layout) -> None:
    i = first_labelled(labelled)
    label = labelled.labels[i]
    assert label is not None
    label.unlink()
    with pytest.raises(FileNotFoundError) as err:
        labelled.build()
    assert str(labelled.images[i]) in str(err.value)
    assert str(label) in str(err.value)


def test_label_size_mismatch_names_file_and_sizes(labelled: Layout) -> None:
    i = first_labelled(labelled)
    label = labelled.labels[i]
    assert label is not None
    write_label(label, np.zeros((H, W - 4), np.uint8))
    ds = labelled.build()
    with pytest.raises(ValueError) as err:
        ds[i]
    message = str(err.value)
    assert str(label) in message
    assert f"{W - 4}x{H}" in message and f"{W}x{H}" in message


def test_corrupt_image_fails_when_loaded_and_names_file(layout: Layout) -> None:
    layout.images[-1].write_bytes(b"this is not an image" * 10)
    ds = layout.build()  # pairing only looks at names, so construction still works
    ds[0]
    with pytest.raises((ValueError, OSError)) as err:
        ds[len(ds) - 1]
    assert str(layout.images[-1]) in str(err.value)


def test_missing_root_names_path_and_layout(layout: Layout, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        layout.build(root=missing)
    assert str(missing) in str(err.value)
    assert "expected layout" in str(err.value)


def test_root_without_frames_names_path_and_layout(layout: Layout) -> None:
    # Same folders as the real layout, but every image (and CamVid's lists) removed.
    for image in layout.images:
        image.unlink()
    for listing in Path(layout.kwargs["root"]).glob("*.txt"):
        listing.unlink()
    with pytest.raises(FileNotFoundError) as err:
        layout.build()
    assert str(layout.kwargs["root"]) in str(err.value)
    assert "expected layout" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Loader-specific behaviour
# ----------------------------------------------------------------------------------------------


def test_camvid_uses_file_names_from_list_and_falls_back_to_glob(tmp_path: Path) -> None:
    listed = camvid_layout(tmp_path / "a", "val")
    assert CamVid(tmp_path / "a", "val").names == listed.names  # list order, not sorted
    globbed = camvid_layout(tmp_path / "b", "test", with_list=False)
    assert CamVid(tmp_path / "b", "test").names == globbed.names == sorted(globbed.names)


def test_camvid_custom_protocol(tmp_path: Path) -> None:
    lay = camvid_layout(tmp_path, "train")
    ds = CamVid(tmp_path, "train", held_out=("Car",), void=("Sky", "Unlabelled"))
    mapped = np.zeros(13, np.uint8)
    mapped[8] = 1
    mapped[[0, 11, 12]] = 255
    np.testing.assert_array_equal(ds[0]["label"], mapped[lay.semantic[0]])
    # A single name given as a string is one class, not a sequence of letters.
    np.testing.assert_array_equal(
        CamVid(tmp_path, "train", held_out="Car")[0]["label"] == 1, lay.semantic[0] == 8
    )


def test_camvid_rejects_unknown_classes_and_split(tmp_path: Path) -> None:
    camvid_layout(tmp_path, "train")
    with pytest.raises(ValueError, match="Pedestrain") as err:
        CamVid(tmp_path, "train", held_out=("Pedestrain",))
    assert all(name in str(err.value) for name in CAMVID_CLASSES)
    with pytest.raises(ValueError, match="Void"):
        CamVid(tmp_path, "train", void=("Void",))
    with pytest.raises(ValueError, match="both held out and void"):
        CamVid(tmp_path, "train", held_out=("Car",), void=("Car",))
    with pytest.raises(ValueError, match="training"):
        CamVid(tmp_path, "training")


def test_camvid_list_naming_a_missing_image(tmp_path: Path) -> None:
    lay = camvid_layout(tmp_path, "train")
    lay.images[1].unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(lay.images[1]))):
        CamVid(tmp_path, "train")


def test_smiyc_splits_and_unlabelled_release(tmp_path: Path) -> None:
    lay = smiyc_layout(tmp_path / "smiyc")
    root = lay.kwargs["root"]
    assert SegmentMeIfYouCan(root, split="validation").names == ["validation0000", "validation0001"]
    test = SegmentMeIfYouCan(root, split="test")
    assert test.names == ["airplane0000"] and test[0]["label"] is None
    with pytest.raises(ValueError, match="RoadAnomaly22"):
        SegmentMeIfYouCan(root, track="RoadAnomaly22")
    # The RoadObstacle21 track reads .webp and finds none of the .jpg frames.
    with pytest.raises(FileNotFoundError, match="webp"):
        SegmentMeIfYouCan(root, track="RoadObstacle21")
    # A release unpacked with its own folder name is found from the parent.
    (tmp_path / "parent").mkdir()
    root.rename(tmp_path / "parent" / "dataset_AnomalyTrack")
    assert SegmentMeIfYouCan(tmp_path / "parent").names == lay.names


def test_smiyc_test_frames_only(tmp_path: Path) -> None:
    root = tmp_path / "test_only"
    write_rgb(root / "images" / "zebra0000.jpg", RED)
    ds = SegmentMeIfYouCan(root)
    assert ds.names == ["zebra0000"] and ds[0]["label"] is None
    with pytest.raises(FileNotFoundError, match="labels_semantic"):
        SegmentMeIfYouCan(root, split="validation")


def test_road_anomaly_frame_list(tmp_path: Path) -> None:
    lay = road_anomaly_layout(tmp_path)
    (tmp_path / "frame_list.json").write_text(json.dumps(["cones01.jpg", "animals01_black_bear"]))
    ds = RoadAnomaly(tmp_path)
    assert ds.names == ["cones01", "animals01_black_bear"]
    np.testing.assert_array_equal(ds[0]["label"], lay.expected[1])
    (tmp_path / "frame_list.json").write_text(json.dumps(["cones01.jpg", "missing.jpg"]))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        RoadAnomaly(tmp_path)
    (tmp_path / "frame_list.json").write_text(json.dumps({"frames": 1}))
    with pytest.raises(ValueError, match="frame_list.json"):
        RoadAnomaly(tmp_path)


def test_road_anomaly_found_from_zip_parent(tmp_path: Path) -> None:
    lay = road_anomaly_layout(tmp_path / "RoadAnomaly_jpg")
    assert RoadAnomaly(tmp_path).names == lay.names


def test_fishyscapes_duplicate_keys_rejected(tmp_path: Path) -> None:
    lay = fishyscapes_layout(tmp_path)
    write_rgb(tmp_path / "images" / "0000_leftImg8bit.png", RED)
    with pytest.raises(ValueError, match="0000"):
        FishyscapesLostAndFound(lay.kwargs["root"])


def test_folder_extension_filter_and_name_collisions(tmp_path: Path) -> None:
    folder_layout(tmp_path)
    assert ImageFolderFrames(tmp_path, extensions=(".PNG", "bmp")).names == ["a", "z"]
    write_rgb(tmp_path / "a.jpg", RED)
    names = ImageFolderFrames(tmp_path).names
    assert names == ["a.jpg", "a.png", "b/c.jpg", "b/d/e.webp", "z.bmp"]


def test_cityscapes_and_lostandfound_reject_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: train, val, test"):
        Cityscapes(tmp_path, split="training")
    with pytest.raises(ValueError, match="valid: train, test"):
        LostAndFound(tmp_path, split="val")


def test_read_label_channels_palette_and_wide_ids(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 2], [255, 1, 0]], np.uint8)
    grey_rgb = tmp_path / "grey_rgb.png"
    write_label(grey_rgb, np.repeat(ids[..., None], 3, axis=2))
    np.testing.assert_array_equal(read_label(grey_rgb), ids)

    colour = tmp_path / "colour.png"
    write_label(colour, np.dstack([ids, ids, np.zeros_like(ids)]))
    with pytest.raises(ValueError, match=re.escape(str(colour))):
        read_label(colour)

    # Indexed PNGs: the ids are the palette indices, whatever colours the palette shows.
    palette = tmp_path / "palette.png"
    img = Image.fromarray(ids)  # mode "L"; putpalette turns it into "P" keeping the indices
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9, 9, 9] * 253)
    img.save(palette)
    np.testing.assert_array_equal(read_label(palette), ids)

    # 16-bit ids beyond 255 are void, not wrapped around into valid ids.
    lay = lostandfound_layout(tmp_path / "laf")
    wide = np.full((H, W), 1, np.uint16)
    wide[0, :3] = [257, 258, 100]
    write_label(lay.labels[0], wide)
    label = LostAndFound(tmp_path / "laf")[0]["label"]
    np.testing.assert_array_equal(label[0, :4], [255, 255, 1, 0])


def test_registry(tmp_path: Path) -> None:
    assert set(ROAD_DATASETS) == {
        "camvid",
        "cityscapes",
        "fishyscapes_laf",
        "smiyc",
        "lostandfound",
        "road_anomaly",
        "folder",
    }
    camvid_layout(tmp_path, "val")
    ds = build_road_dataset("camvid", root=tmp_path, split="val")
    assert isinstance(ds, CamVid) and len(ds) == 3
    with pytest.raises(ValueError, match="kitti") as err:
        build_road_dataset("kitti", root=tmp_path)
    assert all(name in str(err.value) for name in ROAD_DATASETS)


# ----------------------------------------------------------------------------------------------
# The real CamVid
# ----------------------------------------------------------------------------------------------


def test_real_camvid(shared_data: Path) -> None:
    root = shared_data / "camvid"
    sizes = {split: len(CamVid(root, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 367, "val": 101, "test": 233}

    ds = CamVid(root, "train")
    assert len(set(ds.names)) == len(ds)
    found = 0
    for i in range(0, len(ds), 40):
        raw = cv2.imread(str(root / "trainannot" / f"{ds.names[i]}.png"), cv2.IMREAD_UNCHANGED)
        if not np.isin(raw, (9, 10)).any():
            continue
        item = ds[i]
        assert item["image"].shape == (360, 480, 3) and item["image"].dtype == np.uint8
        expected_rgb = cv2.imread(item["path"], cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(item["image"], expected_rgb)
        label = item["label"]
        assert label.shape == (360, 480)
        np.testing.assert_array_equal(label == 1, np.isin(raw, (9, 10)))
        np.testing.assert_array_equal(label == 255, raw == 11)
        np.testing.assert_array_equal(label == 0, raw <= 8)
        np.testing.assert_array_equal(item["semantic"], raw)
        found += 1
    assert found >= 3


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def synthetic_camvid(root: Path, size: tuple[int, int] = (360, 480)) -> np.ndarray:
    """A noise frame whose annotation is derived from its pixels: id = red % 12."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    write_rgb(root / "train" / "f.png", image, size)
    write_label(root / "trainannot" / "f.png", image[..., 0] % 12)
    return image


def test_random_crop_keeps_image_label_semantic_aligned(tmp_path: Path) -> None:
    synthetic_camvid(tmp_path)
    ds = CamVid(tmp_path, "train", transform=random_crop_transform(128, 128))
    table = np.array(CAMVID_MAPPED, np.uint8)
    corners = set()
    for _ in range(12):
        item = ds[0]
        image, label, semantic = item["image"], item["label"], item["semantic"]
        assert image.shape == (128, 128, 3) and label.shape == semantic.shape == (128, 128)
        # Noise pixels: any offset or flip between image and masks breaks these equalities.
        np.testing.assert_array_equal(semantic, image[..., 0] % 12)
        np.testing.assert_array_equal(label, table[semantic])
        corners.add(image[0, 0].tobytes())
    assert len(corners) > 1  # the crop is random


def test_random_crop_pads_labels_with_void(tmp_path: Path) -> None:
    lay = fishyscapes_layout(tmp_path)
    frame = FishyscapesLostAndFound(lay.kwargs["root"])[0]["image"]
    ds = FishyscapesLostAndFound(
        lay.kwargs["root"], transform=random_crop_transform(H + 8, W + 10, hflip=False)
    )
    item = ds[0]
    label, image = item["label"], item["image"]
    assert label.shape == (H + 8, W + 10) and image.shape == (H + 8, W + 10, 3)
    # Padded bottom/right: 8 rows and 10 columns, all void, the image mirrored into them (no
    # black band); the frame's own pixels and labels come through unchanged.
    np.testing.assert_array_equal(image[:H, :W], frame)
    np.testing.assert_array_equal(image[H:, :W], frame[H - 1 : H - 9 : -1])
    np.testing.assert_array_equal(image[:H, W:], frame[:, W - 1 : W - 11 : -1])
    assert (label[H:] == 255).all() and (label[:, W:] == 255).all()
    np.testing.assert_array_equal(label[:H, :W], lay.expected[0])


def test_eval_transform_pads_bottom_right(tmp_path: Path) -> None:
    lay = lostandfound_layout(tmp_path)
    frame = LostAndFound(tmp_path)[0]["image"]
    ds = LostAndFound(tmp_path, transform=eval_transform(32))
    item = ds[0]
    assert item["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(item["label"][:H, :W], lay.expected[0])
    assert (item["label"][H:] == 255).all() and (item["label"][:, W:] == 255).all()
    np.testing.assert_array_equal(item["image"][:H, :W], frame)
    np.testing.assert_array_equal(item["image"][H : 2 * H, :W], frame[::-1])  # mirrored, not black
    np.testing.assert_array_equal(
        LostAndFound(tmp_path, transform=eval_transform(8))[0]["label"], lay.expected[0]
    )
    # Without labels (unlabelled frames) only the image comes back.
    assert set(eval_transform(32)(image=frame)) == {"image"}


def test_transform_sizes_validated() -> None:
    with pytest.raises(ValueError, match="height"):
        random_crop_transform(0, 8)
    with pytest.raises(ValueError, match="divisor"):
        eval_transform(-1)
