"""Bad image-set files and bad Glow inputs give errors that name the file, the dtype or the size."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from densead.config import DataConfig
from densead.data.images import load_image_set, to_greyscale
from densead.data.transforms import to_model_input
from densead.flows import Glow


def _npz(path: Path) -> DataConfig:
    return DataConfig(source="npz", path=str(path), channels=1, size=0)


def test_npz_that_is_not_an_npz_archive_names_the_file(tmp_path: Path) -> None:
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "single.npy", images)
    with pytest.raises(ValueError, match=r"single\.npy: a single \.npy array, not an \.npz archive"):
        load_image_set(_npz(tmp_path / "single.npy"))

    np.savez(tmp_path / "whole.npz", images=images)
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz: not a readable \.npz archive"):
        load_image_set(_npz(tmp_path / "cut.npz"))

    ok, png = cv2.imencode(".png", np.zeros((4, 4), np.uint8))
    (tmp_path / "picture.npz").write_bytes(png.tobytes())
    (tmp_path / "notes.npz").write_text("images: none\n")
    for name in ("picture.npz", "notes.npz"):
        with pytest.raises(ValueError, match=rf"{name}: not an \.npz archive of arrays") as err:
            load_image_set(_npz(tmp_path / name))
        assert "pickle" not in str(err.value)


def test_npz_labels_are_checked_with_the_file_named(tmp_path: Path) -> None:
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "words.npz", images=images, labels=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"words\.npz: 'labels' must be integers.*'a'"):
        load_image_set(_npz(tmp_path / "words.npz"))
    np.savez(tmp_path / "pairs.npz", images=images, labels=np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"pairs\.npz: 'labels' must be one label per image.*\(2, 2\)"):
        load_image_set(_npz(tmp_path / "pairs.npz"))
    np.savez(tmp_path / "scalar.npz", images=images, labels=np.int64(3))
    with pytest.raises(ValueError, match=r"scalar\.npz: 'labels' must be one label per image"):
        load_image_set(_npz(tmp_path / "scalar.npz"))
    np.savez(tmp_path / "halves.npz", images=images, labels=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"halves\.npz: 'labels' must be integers.*0\.5"):
        load_image_set(_npz(tmp_path / "halves.npz"))
    # Whole numbers saved as floats are labels all the same.
    np.savez(tmp_path / "floats.npz", images=images, labels=np.array([3.0, -1.0]))
    assert load_image_set(_npz(tmp_path / "floats.npz")).labels.tolist() == [3, -1]


def test_folder_mixing_greyscale_and_rgb_converts_each_image(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    cv2.imwrite(str(tmp_path / "a_grey.png"), grey)
    cv2.imwrite(str(tmp_path / "b_rgb.png"), rgb[..., ::-1])  # OpenCV writes BGR
    as_grey = load_image_set(DataConfig(source="folder", path=str(tmp_path), channels=1, size=8))
    assert as_grey.images.shape == (2, 1, 8, 8)
    assert np.array_equal(as_grey.images[0, 0].numpy(), grey)
    assert np.array_equal(as_grey.images[1, 0].numpy(), to_greyscale(rgb)[..., 0])
    as_rgb = load_image_set(DataConfig(source="folder", path=str(tmp_path), channels=3, size=8))
    assert as_rgb.images.shape == (2, 3, 8, 8)
    assert all(np.array_equal(as_rgb.images[0, c].numpy(), grey) for c in range(3))
    assert np.array_equal(as_rgb.images[1].permute(1, 2, 0).numpy(), rgb)
    # Sizes that differ are still refused, naming the image.
    cv2.imwrite(str(tmp_path / "c_big.png"), np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"c_big\.png: image of shape \(16, 16, 1\) differs"):
        load_image_set(DataConfig(source="folder", path=str(tmp_path), channels=1, size=0))


@pytest.mark.parametrize("source", ["svhn", "mnist"])
def test_missing_torchvision_set_names_the_config_key_and_the_flag(source: str, tmp_path: Path) -> None:
    cfg = DataConfig(source=source, path=str(tmp_path / "missing"), split="test", channels=1)
    with pytest.raises(FileNotFoundError) as err:
        load_image_set(cfg)
    message = str(err.value)
    assert "missing" in message and "download: true" in message and "--download" in message
    assert "download=True" not in message and ".." not in message


def test_a_failed_download_is_named_and_leaves_no_empty_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    import torchvision.datasets as tvd

    def offline(self: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    root = tmp_path / "data" / "cifar10"
    with pytest.raises(FileNotFoundError) as err:
        load_image_set(DataConfig(source="cifar10", path=str(root), download=True), name="data")
    message = str(err.value)
    assert message.startswith(f"data: torchvision cifar10 (train) under '{root}': download failed (")
    assert "Name or service not known" in message and "source: npz" in message
    assert list(tmp_path.iterdir()) == []  # torchvision made data/cifar10; both are gone


def test_glow_names_the_dtype_it_expects() -> None:
    glow = Glow(in_channels=1, n_scales=2, n_steps=1, hidden=8).eval()
    x = torch.rand(2, 1, 8, 8) - 0.5
    assert glow(x).log_prob().shape == (2,)
    with pytest.raises(ValueError, match=r"expects float32 input.*got float64 of shape \(2, 1, 8, 8\)"):
        glow(x.double())
    levels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"got uint8.*densead\.data\.transforms\.to_model_input"):
        glow(levels)
    assert torch.isfinite(glow(to_model_input(levels, 256, dequantize=False)).log_prob()).all()
    # The parameters' dtype is the one expected: a float64 Glow takes float64 input.
    assert glow.double()(x.double()).log_prob().dtype == torch.float64
    with pytest.raises(ValueError, match=r"expects float64 input.*got float32"):
        glow(x)


def test_glow_sample_checks_the_size() -> None:
    glow = Glow(in_channels=1, n_scales=2, n_steps=1, hidden=8).eval()
    assert glow.sample(2, 8, 12).shape == (2, 1, 8, 12)
    for h, w in ((6, 6), (8, 6), (0, 8)):
        with pytest.raises(ValueError, match=rf"multiples of 4 .*n_scales=2.*got {h}×{w}"):
            glow.sample(2, h, w)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": 0}, r"Glow: hidden=0; each must be >= 1"),
        ({"in_channels": 0, "n_steps": -1}, r"Glow: in_channels=0, n_steps=-1; each must be >= 1"),
        ({"n_bins": 1}, r"Glow: n_bins=1; the data need at least 2 quantization levels"),
    ],
)
def test_glow_refuses_sizes_it_cannot_be_built_with(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Glow(**{"in_channels": 1, "n_scales": 1, "n_steps": 1, "hidden": 4, **kwargs})
