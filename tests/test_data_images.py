"""Image sets: every source, slicing, filtering, greyscale, padding, augmentation, dequantization."""

from __future__ import annotations

import gzip
import struct
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from densead.config import DataConfig
from densead.data.images import load_image_set, to_greyscale
from densead.data.transforms import augment_batch, to_model_input, to_uint8


def test_cifar10_npz_slice_and_classes(shared_data: Path) -> None:
    path = str(shared_data / "cifar10_test.npz")
    train = load_image_set(DataConfig(source="npz", path=path, stop=8000))
    test = load_image_set(DataConfig(source="npz", path=path, start=8000))
    assert train.images.shape == (8000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 2000
    with np.load(path) as f:
        raw, labels = f["images"], f["labels"]
    assert np.array_equal(test.images[0].permute(1, 2, 0).numpy(), raw[8000])
    cats = load_image_set(DataConfig(source="npz", path=path, classes=(3,), stop=1000))
    assert len(cats) == int((labels[:1000] == 3).sum()) and set(cats.labels.tolist()) == {3}
    no_cats = load_image_set(DataConfig(source="npz", path=path, exclude_classes=(3,), stop=1000))
    assert len(no_cats) + len(cats) == 1000
    # names are places in the source file, slices and class filters notwithstanding
    assert test.names[:2] == ("08000", "08001") and len(set(test.names)) == 2000
    assert [int(n) for n in cats.names] == np.flatnonzero(labels[:1000] == 3).tolist()


def test_greyscale_uses_the_paper_formula_exactly() -> None:
    rgb = np.array([[[[10, 200, 30], [255, 255, 255], [0, 0, 0], [1, 2, 250]]]], dtype=np.uint8)
    grey = to_greyscale(rgb)[..., 0]
    expected = np.rint(0.2989 * rgb[..., 0] + 0.5870 * rgb[..., 1] + 0.1140 * rgb[..., 2])
    assert np.array_equal(grey, expected.astype(np.uint8))


def test_padding_28_to_32_is_exact_and_centred(shared_data: Path) -> None:
    path = str(shared_data / "mnist_test.npz")
    padded = load_image_set(DataConfig(source="npz", path=path, stop=50, channels=1, size=32, resize="pad"))
    with np.load(path) as f:
        raw = f["images"][:50]
    assert padded.images.shape == (50, 1, 32, 32)
    assert np.array_equal(padded.images[:, 0, 2:30, 2:30].numpy(), raw)
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0
    rgb = load_image_set(DataConfig(source="npz", path=path, stop=5, channels=3, size=32))
    assert rgb.images.shape == (5, 3, 32, 32) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    resized = load_image_set(
        DataConfig(source="npz", path=path, stop=5, channels=1, size=32, resize="resize")
    )
    assert resized.images.shape == (5, 1, 32, 32) and not torch.equal(resized.images, padded.images[:5])


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    header = struct.pack(">I" + "I" * array.ndim, magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_path_on_local_files(shared_data: Path, tmp_path: Path) -> None:
    """The real torchvision loader (what users get with download: true), on local files."""
    with np.load(shared_data / "mnist_test.npz") as f:
        images, labels = f["images"][:100], f["labels"][:100]
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    # torchvision checks that all four files exist; the test split reads only t10k.
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", labels)
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte"
            (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    s = load_image_set(DataConfig(source="mnist", path=str(tmp_path), split="test", channels=1, size=32))
    assert s.images.shape == (100, 1, 32, 32)
    assert np.array_equal(s.images[:, 0, 2:30, 2:30].numpy(), images)
    assert s.labels.tolist() == labels.tolist()
    with pytest.raises(FileNotFoundError, match=r"cifar10.*download: true"):
        load_image_set(DataConfig(source="cifar10", path=str(tmp_path / "none")))


def test_sklearn_sets_ship_offline() -> None:
    digits = load_image_set(DataConfig(source="sklearn_digits", channels=1, size=8), n_bins=17)
    assert digits.images.shape == (1797, 1, 8, 8) and int(digits.images.max()) == 16
    as8bit = load_image_set(DataConfig(source="sklearn_digits", channels=1, size=8, stop=20), n_bins=256)
    assert int(as8bit.images.max()) == 255
    patches = load_image_set(
        DataConfig(
            source="sklearn_photo_patches",
            n_patches=50,
            patch_size=16,
            channels=1,
            size=8,
            resize="resize",
            mix=(DataConfig(source="sklearn_digits", channels=1, size=8, stop=10, rotations=True),),
        ),
        n_bins=17,
    )
    assert patches.images.shape == (50 + 80, 1, 8, 8) and int(patches.images.max()) <= 16
    assert patches.names[48:52] == ("00048", "00049", "00000_sym0", "00001_sym0")
    assert patches.names[60] == "00000_sym1"
    twice = DataConfig(source="sklearn_digits", channels=1, size=8, stop=3)
    assert load_image_set(replace(twice, mix=(twice,)), n_bins=17).names == ()  # would repeat: none
    # rotations: the 8 symmetries of the square, the identity first
    assert torch.equal(patches.images[50:60], digits.images[:10])
    assert torch.equal(patches.images[60:70], torch.rot90(digits.images[:10], 1, dims=(2, 3)))


def test_folder_with_class_subfolders_and_names(tmp_path: Path) -> None:
    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            img = np.full((8, 8, 3), value + i, dtype=np.uint8)
            img[0, 0] = (255, 0, 0)  # red, to check the channel order
            cv2.imwrite(str(tmp_path / cls / f"{i}.png"), img[..., ::-1])
    s = load_image_set(DataConfig(source="folder", path=str(tmp_path), size=8))
    assert s.labels.tolist() == [0, 0, 1, 1]
    assert s.names == ("cat/0", "cat/1", "dog/0", "dog/1")
    assert s.images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert int(s.images[3, 1, 4, 4]) == 201


def test_bad_inputs_name_the_culprit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_image_set(DataConfig(source="npz", path=str(tmp_path / "missing.npz")))
    np.savez(tmp_path / "floats.npz", images=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"floats.npz.*uint8"):
        load_image_set(DataConfig(source="npz", path=str(tmp_path / "floats.npz")))
    np.savez(tmp_path / "two_channels.npz", images=np.zeros((2, 4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"two_channels.npz.*\(2, 4, 4, 2\)"):
        load_image_set(DataConfig(source="npz", path=str(tmp_path / "two_channels.npz")))
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "good.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_set(DataConfig(source="folder", path=str(tmp_path / "imgs"), size=8))
    with pytest.raises(ValueError, match="unknown data source 'nope'"):
        load_image_set(DataConfig(source="nope"))
    with pytest.raises(ValueError, match="8×8 is larger than size 4"):
        load_image_set(DataConfig(source="sklearn_digits", channels=1, size=4, resize="pad"))
    with pytest.raises(ValueError, match="no images left"):
        load_image_set(DataConfig(source="sklearn_digits", channels=1, size=8, classes=(42,)))
    np.savez(tmp_path / "wide.npz", images=np.zeros((2, 6, 10), dtype=np.uint8))
    wide = DataConfig(source="npz", path=str(tmp_path / "wide.npz"), channels=1, rotations=True)
    with pytest.raises(ValueError, match=r"wide\.npz: rotations need square images, these are 6×10"):
        load_image_set(replace(wide, size=0))
    assert load_image_set(replace(wide, size=12)).images.shape == (16, 1, 12, 12)  # rotated once padded
    with pytest.raises(ValueError, match=r"patch_size 1000 is larger than the photos \(427 pixels"):
        load_image_set(DataConfig(source="sklearn_photo_patches", n_patches=2, patch_size=1000, channels=1))


def test_dequantization_ranges() -> None:
    levels = torch.tensor([[[[0, 1, 254, 255]]]], dtype=torch.uint8)
    ev = to_model_input(levels, 256, dequantize=False)
    assert torch.allclose(ev, (levels.float() + 0.5) / 256 - 0.5)
    g = torch.Generator().manual_seed(0)
    tr = to_model_input(levels.expand(1000, 1, 1, 4), 256, dequantize=True, generator=g)
    lo = levels.float() / 256 - 0.5
    assert (tr >= lo).all() and (tr < lo + 1 / 256).all()
    assert tr.min() >= -0.5 and tr.max() < 0.5
    assert torch.equal(to_uint8(tr, 256), levels.expand(1000, 1, 1, 4))


def test_augmentation_is_seeded_and_only_moves_pixels() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment_batch(x, "flip_translate", torch.Generator().manual_seed(3))
    b = augment_batch(x, "flip_translate", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, x)
    # a shift of at most 3 pixels (10% of 32): the centre 26×26 block of the input appears in the output
    for i in range(16):
        src = x[i]
        found = any(
            torch.equal(a[i, :, 3 + dy : 29 + dy, 3 + dx : 29 + dx], s[:, 3:29, 3:29])
            for s in (src, src.flip(-1))
            for dy in range(-3, 4)
            for dx in range(-3, 4)
        )
        assert found, i
    t = augment_batch(x, "translate", torch.Generator().manual_seed(0))
    assert torch.equal(augment_batch(x, "none"), x) and t.shape == x.shape
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_batch(x, "rotate")
    flips = augment_batch(x, "flip", torch.Generator().manual_seed(3))
    assert all(torch.equal(f, s) or torch.equal(f, s.flip(-1)) for f, s in zip(flips, x, strict=True))
    assert any(torch.equal(f, s.flip(-1)) and not torch.equal(f, s) for f, s in zip(flips, x, strict=True))


def test_translation_of_small_images_moves_them_a_pixel() -> None:
    """10% of 8 pixels is 0.8: rounded down, an 8×8 digit would never move (and translate would be none)."""
    x = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).expand(64, 1, 8, 8)
    moved = augment_batch(x, "translate", torch.Generator().manual_seed(0))
    inner = x[0, :, 1:7, 1:7]
    shifts = set()
    for m in moved:
        (hit,) = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(m[:, 1 + dy : 7 + dy, 1 + dx : 7 + dx], inner)
        ]
        shifts.add(hit)
    assert len(shifts) == 9  # every shift of at most a pixel, 64 draws
    line = torch.zeros(4, 1, 1, 8, dtype=torch.uint8)  # a side of 1 pixel cannot move
    assert augment_batch(line, "translate", torch.Generator().manual_seed(0)).shape == line.shape
