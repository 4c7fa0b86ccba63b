"""Outlier exposure of the segmenter (entropy maximization on pasted photos) and finetuning from a
segmenter checkpoint (``train.init_from``)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_dense_checks import camvid, segmenter_config

import densead.segmenter as seg
from densead.config import ConfigError, DataConfig, load_config
from densead.segmenter import (
    SceneDataConfig,
    SegmenterOutlierConfig,
    SegmenterRunConfig,
    load_segmenter,
    outlier_exposure_loss,
    segmentation_loss,
    train_segmenter,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def test_outlier_exposure_loss_is_smallest_where_the_softmax_is_uniform() -> None:
    k = 9
    in_loss = torch.tensor(2.0)
    outlier = torch.zeros(2, 4, 4, dtype=torch.bool)
    outlier[0, :2] = True
    flat = torch.zeros(2, k, 4, 4, requires_grad=True)
    loss = outlier_exposure_loss(in_loss, flat, outlier, 0.9)
    assert loss.item() == pytest.approx(0.1 * 2.0 + 0.9 * math.log(k), rel=1e-6)
    loss.backward()
    assert flat.grad.abs().max() < 1e-6  # uniform: nothing to push
    confident = torch.zeros(2, k, 4, 4)
    confident[:, 3] = 5.0
    confident.requires_grad_(True)
    loss = outlier_exposure_loss(in_loss, confident, outlier, 0.9)
    assert loss.item() > 0.1 * 2.0 + 0.9 * math.log(k) + 1.0
    loss.backward()
    assert confident.grad[:, 3][outlier].min() > 0  # descent lowers the winning logit there
    assert confident.grad.permute(1, 0, 2, 3)[:, ~outlier].abs().max() == 0  # inlier pixels: in_loss only
    none = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert outlier_exposure_loss(in_loss, confident, none, 0.9).item() == pytest.approx(0.2)


def test_a_crop_of_void_and_pasted_pixels_only_costs_nothing() -> None:
    """The cross-entropy's mean over no pixel is NaN: it would be logged, and mixed into the
    outlier-exposure loss."""
    logits = torch.randn(2, 9, 4, 4, requires_grad=True)
    void = torch.full((2, 4, 4), seg.VOID)
    loss = segmentation_loss(logits, void)
    assert loss.item() == 0.0
    (outlier_exposure_loss(loss, logits, torch.ones(2, 4, 4, dtype=torch.bool), 0.9)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0  # the outlier term acts
    some = void.clone()
    some[0, 0, 0] = 3
    expected = torch.nn.functional.cross_entropy(logits[:1, :, :1, :1], torch.tensor([[[3]]]))
    assert segmentation_loss(logits, some).item() == pytest.approx(expected.item())


def photos(path: Path) -> DataConfig:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), labels=np.arange(6))
    return DataConfig(source="npz", path=str(path), channels=3, size=8)


def test_finetuning_with_outliers_starts_from_the_checkpoint_and_pushes_pasted_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = camvid(tmp_path / "camvid")
    first, _ = train_segmenter(segmenter_config(tmp_path / "a", root), progress=False)
    calls = []

    def recording(in_loss, logits, outlier, weight):
        calls.append((int(outlier.sum()), weight))
        return outlier_exposure_loss(in_loss, logits, outlier, weight)

    monkeypatch.setattr(seg, "outlier_exposure_loss", recording)
    cfg = replace(
        segmenter_config(tmp_path / "b", root, init_from=str(first), lr=1e-12, steps=2, seed=5),
        outliers=SegmenterOutlierConfig(photos(tmp_path / "p.npz"), per_frame=1, min_size=4, max_size=6),
    )
    tuned, _ = train_segmenter(cfg, progress=False)
    assert len(calls) == 2 and all(n >= 2 * 16 and w == 0.9 for n, w in calls)  # 2 frames, >= 4×4 each
    a, b = (dict(load_segmenter(p)[0].named_parameters()) for p in (first, tuned))
    for name in a:  # started from the checkpoint: a learning rate of 1e-12 leaves the weights there
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)  # (BN statistics move)
    saved = load_segmenter(tuned)[1]
    assert saved.outliers == cfg.outliers.__class__(**{**vars(cfg.outliers), "data": saved.outliers.data})
    assert Path(saved.train.init_from).is_absolute() and Path(saved.outliers.data.path).is_absolute()


def test_outlier_and_init_errors_name_the_key_or_file(tmp_path: Path) -> None:
    root = camvid(tmp_path / "camvid")
    outliers = {"data": {"source": "npz", "path": "x.npz"}, "weight": 1.0}
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"output_dir": str(tmp_path / "s"), "outliers": outliers})
    )
    with pytest.raises(ConfigError, match=r"c\.yaml: outliers\.weight: must be in \[0, 1\), got 1\.0"):
        load_config(SegmenterRunConfig, tmp_path / "c.yaml")
    shipped = REPO / "configs" / "camvid_segmenter_outliers.yaml"
    with pytest.raises(
        ConfigError, match=r"camvid_segmenter_outliers\.yaml: outliers\.per_frame: must be >= 1"
    ):
        load_config(SegmenterRunConfig, shipped, ["outliers.per_frame=0"])
    first, _ = train_segmenter(segmenter_config(tmp_path / "a", root), progress=False)
    other = replace(
        segmenter_config(tmp_path / "b", root, init_from=str(first)),
        data=SceneDataConfig(
            root=str(root), scale=1.0, crop_height=16, crop_width=16, held_out=["Pedestrian"]
        ),
    )
    with pytest.raises(ValueError, match=rf"train\.init_from {first}: its classes .* are not this run's"):
        train_segmenter(other, progress=False)
