"""Auxiliary outliers for the feature flows: pasting photos, the outlier term, its effect."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from densead.config import DataConfig
from densead.data.outliers import OutlierPasteConfig, PhotoPaster, paste_photos
from densead.detectors.feature_density import FeatureDensity, flow_training_step
from densead.metrics import PixelMetrics


def _bounding_box(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_paste_photos_mask_is_exactly_the_pasted_pixels() -> None:
    frames = np.zeros((6, 40, 50, 3), dtype=np.uint8)
    photos = np.full((3, 8, 8, 3), 200, dtype=np.uint8)
    photos[1] = 120
    pasted, mask = paste_photos(frames, photos, np.random.default_rng(0), 1, 5, 20, max_aspect=2.0)
    assert frames.max() == 0  # the input is not modified
    assert mask.shape == (6, 40, 50) and mask.dtype == bool
    np.testing.assert_array_equal(pasted.max(axis=-1) > 0, mask)
    for i in range(6):
        h, w = _bounding_box(mask[i])
        assert int(mask[i].sum()) == h * w  # one rectangle
        assert 5 <= h <= 20 and h / 2 - 1 <= w <= 2 * h + 1
    # Seeded: the same generator state pastes the same photos at the same places.
    again, mask_again = paste_photos(frames, photos, np.random.default_rng(0), 1, 5, 20, max_aspect=2.0)
    np.testing.assert_array_equal(again, pasted)
    np.testing.assert_array_equal(mask_again, mask)
    # Sizes are clipped to the frame.
    _, big = paste_photos(frames[:1, :10, :12], photos, np.random.default_rng(1), 2, 30, 40)
    assert big.all()


def test_paste_photos_errors_name_the_shapes() -> None:
    rng = np.random.default_rng(0)
    photos = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"frames must be \(B, H, W, 3\), got shape \(4, 5, 3\)"):
        paste_photos(np.zeros((4, 5, 3), np.uint8), photos, rng, 1, 2, 3)
    with pytest.raises(
        ValueError, match=r"photos must be a non-empty \(N, h, w, 3\) array, got shape \(0, 8, 8, 3\)"
    ):
        paste_photos(np.zeros((1, 9, 9, 3), np.uint8), photos[:0], rng, 1, 2, 3)
    data = DataConfig(source="npz", path="x.npz")
    with pytest.raises(ValueError, match="min_size <= max_size, got min_size=9, max_size=4"):
        OutlierPasteConfig(data, min_size=9, max_size=4)
    with pytest.raises(ValueError, match=r"^temperature: must be > 0, got 0\.0$"):
        OutlierPasteConfig(data, temperature=0.0)
    with pytest.raises(ValueError, match=r"^per_frame: must be >= 1, got 0$"):
        OutlierPasteConfig(data, per_frame=0)


def test_photo_paster_loads_and_filters_an_image_set(tmp_path) -> None:
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[:, :, :, 0] = np.array([10, 20, 30, 40], dtype=np.uint8)[:, None, None]
    np.savez(tmp_path / "photos.npz", images=images, labels=np.arange(4))
    cfg = OutlierPasteConfig(
        DataConfig(source="npz", path=str(tmp_path / "photos.npz"), size=8, exclude_classes=(1, 3)),
        per_frame=3,
        min_size=4,
        max_size=6,
    )
    paster = PhotoPaster(cfg, seed=0)
    assert paster.photos.shape == (2, 8, 8, 3)
    frames, mask = paster(np.zeros((5, 16, 16, 3), dtype=np.uint8))
    # Only the kept classes' photos (red 10 and 30) are pasted; never the excluded 20 and 40.
    assert set(np.unique(frames[..., 0][mask]).tolist()) <= {10, 30}
    assert mask.any(axis=(1, 2)).all()


# --------------------------------------------------------------------------- the outlier term


def test_outlier_term_is_the_stated_formula() -> None:
    torch.manual_seed(0)
    density = FeatureDensity({"a": 3}, n_steps=2, hidden=8).train()
    with torch.no_grad():
        for p in density.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = copy.deepcopy(density)
    features = torch.randn(2, 3, 6, 6)
    outlier = torch.zeros(2, 6, 6, dtype=torch.bool)
    outlier[:, :2] = True
    inlier = ~outlier
    # SGD with lr 1 and no clipping: each parameter moves by minus its gradient.
    optimizer = torch.optim.SGD(density.parameters(), lr=1.0)
    weight, temperature, margin = 2.0, 0.3, 0.4
    losses = flow_training_step(
        density, optimizer, {"a": features}, inlier, {"a": 1}, 1000, "all",
        outlier=outlier, outlier_loss=(weight, temperature, margin),
    )  # fmt: skip
    vectors = features.permute(0, 2, 3, 1)
    ell_in = reference.vector_log_prob("a", vectors[inlier]) / 3
    ell_out = reference.vector_log_prob("a", vectors[outlier]) / 3
    term = weight * F.softplus((ell_out - ell_in.mean() + margin) / temperature).mean()
    torch.testing.assert_close(losses["a"], -ell_in.mean().detach())
    torch.testing.assert_close(losses["a_out"], term.detach())
    # The gradient goes through the inlier reference too (a ranking term, not a push-down).
    (term - ell_in.mean()).backward()
    for (name, p), p_ref in zip(density.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), (p_ref - p_ref.grad).detach(), msg=name)
    # Without outliers there is no term.
    plain = flow_training_step(density, optimizer, {"a": features}, inlier, {"a": 1}, 1000)
    assert set(plain) == {"a"}


def _inliers(n: int) -> Tensor:
    return torch.randn(n, 2)


def _outliers(n: int) -> Tensor:
    return torch.tensor([0.7, 0.7]) + 0.15 * torch.randn(n, 2)


def _auroc_after_training(with_outliers: bool) -> float:
    """A 2-D flow trained on N(0, I) inliers; the outliers are a tight cluster inside the bulk of
    the inliers, where maximum likelihood puts *high* density."""
    torch.manual_seed(0)
    density = FeatureDensity({"a": 2}, n_steps=4, hidden=32).train()
    optimizer = torch.optim.Adam(density.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    outlier = torch.zeros(2, 16, 16, dtype=torch.bool)
    outlier[:, :4] = True
    for _ in range(60):
        v = _inliers(512)
        v[outlier.reshape(-1)] = _outliers(int(outlier.sum()))
        flow_training_step(
            density, optimizer, {"a": v.view(2, 16, 16, 2).permute(0, 3, 1, 2)}, ~outlier, {"a": 1},
            512, "all", generator, outlier=outlier if with_outliers else None,
        )  # fmt: skip
    density.eval()
    with torch.no_grad():
        scores = -torch.cat(
            [density.vector_log_prob("a", _inliers(2000)), density.vector_log_prob("a", _outliers(200))]
        )
    labels = torch.cat([torch.zeros(2000), torch.ones(200)]).to(torch.uint8)
    metrics = PixelMetrics(mode="exact")
    metrics.update(scores[None, None], labels[None, None])
    return float(metrics.compute()["auroc"])


def test_outlier_term_carves_the_outliers_out_of_the_density() -> None:
    plain = _auroc_after_training(with_outliers=False)
    exposed = _auroc_after_training(with_outliers=True)
    assert plain < 0.5  # maximum likelihood alone ranks the cluster as *more* typical
    assert exposed > 0.8
    assert math.isfinite(plain) and math.isfinite(exposed)
