"""Per-pixel feature flows (embedding density): densities, masks, normalization, baselines, tools."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from densead.detectors.feature_density import (
    BASELINES,
    SML_MIN_PIXELS,
    STD_FLOOR,
    DenseFeatureDetector,
    FeatureDensity,
    FeatureFlowsRunConfig,
    FlowConfig,
    FlowTrainConfig,
    MaxLogitStats,
    MaxLogitSums,
    class_balance_table,
    energy_score,
    entropy_score,
    fit_max_logit_stats,
    fit_normalization,
    fit_standardization,
    flow_training_step,
    load_feature_density,
    max_logit_score,
    msp_score,
    position_weights,
    sample_feature_vectors,
    save_feature_density,
    train_feature_flows,
    valid_feature_mask,
)
from densead.detectors.glow import MIN_LOG_PROB, SENTINEL_LIMIT
from densead.features import FrozenFeatureExtractor
from densead.metrics import PixelMetrics
from densead.segmenter import SceneArrays, load_segmenter

REPO = Path(__file__).resolve().parents[1]


class _PoolTaps(nn.Module):
    """A fixed 'network': average pooling at strides 2 and 4, logits from the stride-2 map."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        a = F.avg_pool2d(x, 2)
        return {"a": a, "b": F.avg_pool2d(x, 4), "logits": torch.cat([4 * a, -4 * a], dim=1)}


def _toy_extractor() -> FrozenFeatureExtractor:
    return FrozenFeatureExtractor(_PoolTaps(), {"a": 3, "b": 3, "logits": 6}, {"a": 2, "b": 4, "logits": 2})


def _perturbed(density: FeatureDensity, scale: float = 0.1) -> FeatureDensity:
    """Move every parameter off its (identity-like) initialization, so nothing is trivial."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in density.parameters():
            p.add_(scale * torch.randn_like(p))
    return density.eval()


# --------------------------------------------------------------------------- densities


def test_per_pixel_density_equals_pixel_by_pixel() -> None:
    density = FeatureDensity({"a": 5}, n_steps=3, hidden=16).double()
    features = {"a": 2.0 * torch.randn(2, 5, 3, 4, dtype=torch.float64) + 1.0}
    density.set_standardization("a", torch.full((5,), 1.0), torch.linspace(0.5, 3.0, 5))
    _perturbed(density)
    maps = density.log_prob_maps(features)["a"]
    assert maps.shape == (2, 3, 4)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                one = features["a"][b : b + 1, :, i : i + 1, j : j + 1]
                assert torch.allclose(density.log_prob_maps({"a": one})["a"].reshape(()), maps[b, i, j])
    vectors = features["a"].permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.allclose(density.vector_log_prob("a", vectors), maps.reshape(-1))


def test_per_pixel_density_is_change_of_variables() -> None:
    """log p(f) = log N(z; prior) + log|det ∂z/∂f| for one feature vector, via the autograd Jacobian."""
    density = FeatureDensity({"a": 4}, n_steps=2, hidden=8).double()
    mean, scale = torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([0.5, 2.0, 1.0, 4.0])
    density.set_standardization("a", mean, scale)
    _perturbed(density)
    flow = density.flows["a"]

    def to_latent(f: Tensor) -> Tensor:  # raw feature vector -> z: standardization, then the flow
        u = (f - mean.double()) / scale.double()
        return flow(u.view(1, 4, 1, 1))[0].reshape(4)

    f = torch.randn(4, dtype=torch.float64)
    z = to_latent(f)
    jac = torch.autograd.functional.jacobian(to_latent, f)
    expected = flow.prior.log_prob_map(z.view(1, 4, 1, 1)).reshape(()) + torch.linalg.slogdet(jac)[1]
    assert torch.allclose(density.vector_log_prob("a", f.view(1, 4))[0], expected)


# --------------------------------------------------------------------------- masks


def test_valid_feature_mask_rules() -> None:
    inlier = torch.ones(1, 5, 6, dtype=torch.bool)
    inlier[0, 0, 1] = False  # one pixel of cell (0, 0)
    inlier[0, 3, 3] = False  # the centre pixel of cell (1, 1)
    all_rule = valid_feature_mask(inlier, (3, 3), 2, "all")
    centre = valid_feature_mask(inlier, (3, 3), 2, "center")
    # Row 2 covers pixel rows 4 and 5; row 5 is outside the frame, so "all" rejects it.
    assert all_rule.tolist() == [[[False, True, True], [True, False, True], [False, False, False]]]
    # Centres are pixels (1, 1), (1, 3), ... (5, ·) outside the frame -> False.
    assert centre.tolist() == [[[True, True, True], [True, False, True], [False, False, False]]]
    assert valid_feature_mask(torch.ones(2, 8, 8, dtype=torch.bool), (2, 2), 4).all()


def test_sample_feature_vectors_bounds_and_picks_valid() -> None:
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[0, 1, 2] = valid[1, 3, 0] = True
    got = sample_feature_vectors(features, valid, max_pixels=10)
    assert torch.equal(got, torch.stack([features[0, :, 1, 2], features[1, :, 3, 0]]))
    valid[:] = True
    assert sample_feature_vectors(features, valid, max_pixels=7).shape == (7, 3)


def test_class_balanced_sampling_draws_rare_classes_as_often_as_common_ones() -> None:
    """``train.class_balance``: weights f_c^−α from the training pixels' class frequencies, the
    class of a position is its cell's centre pixel, and α = 1 draws a 2 % class as often as a
    98 % one (α = 0: uniform); ids that never occur, void and held-out (255) get weight 0."""
    ids = np.zeros((4, 20, 20), dtype=np.uint8)
    ids[:, :4, :2] = 1  # 8 of 400 pixels per frame: 2 %
    ids[:, -1, :] = 255
    table = class_balance_table(ids, n_classes=3, alpha=1.0)
    n0, n1 = (ids == 0).sum(), (ids == 1).sum()
    assert table[0] == pytest.approx((n0 + n1) / n0) and table[1] == pytest.approx((n0 + n1) / n1)
    assert table[2] == 0 and table[255] == 0  # class 2 never occurs
    assert torch.equal(class_balance_table(ids, 3, 0.0)[:3], torch.tensor([1.0, 1.0, 0.0]))
    grid_ids = torch.from_numpy(ids)
    weights = position_weights(table, grid_ids, (10, 10), stride=2)  # centre pixels: rows/cols 1, 3, ...
    assert torch.equal(weights, table[grid_ids[:, 1::2, 1::2].long()])
    assert (weights[:, :2, :1] == table[1]).all() and (weights[:, 2:, :] != table[1]).all()
    features = grid_ids[:, 1::2, 1::2].float()[:, None]  # the feature is the position's class
    valid = torch.ones(4, 10, 10, dtype=torch.bool)
    valid[:, -1, :] = False  # cells with a void pixel: invalid (and of weight 0 anyway)
    generator = torch.Generator().manual_seed(0)
    balanced = sample_feature_vectors(features, valid, 80, generator, weights)
    uniform = sample_feature_vectors(features, valid, 80, generator)
    assert balanced.shape == uniform.shape == (80, 1)
    assert (balanced == 1).sum() == 8  # every rare position (2 per frame): as many as exist
    assert (uniform == 1).sum() < 8
    few = sample_feature_vectors(features, valid, 1000, generator, weights)
    assert few.shape == (int(valid.sum()), 1)  # fewer valid positions than asked: all of them
    bad = FeatureFlowsRunConfig(
        "unused", "no_segmenter.pt", {"a": "a"}, train=FlowTrainConfig(class_balance=-1)
    )
    with pytest.raises(ValueError, match="train.class_balance must be >= 0, got -1"):
        train_feature_flows(bad, progress=False)


def _trained_state(features: Tensor, inlier: Tensor, steps: int = 3) -> dict[str, Tensor]:
    torch.manual_seed(0)
    density = FeatureDensity({"a": features.shape[1]}, n_steps=2, hidden=16).train()
    optimizer = torch.optim.Adam(density.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        flow_training_step(density, optimizer, {"a": features}, inlier, {"a": 2}, 6, "all", generator)
    return density.flows.state_dict()


def test_masked_pixels_never_reach_the_fit() -> None:
    torch.manual_seed(1)
    features = torch.randn(2, 4, 4, 4)
    inlier = torch.rand(2, 8, 8) > 0.1  # ~40% of the cells have a non-inlier pixel
    valid = valid_feature_mask(inlier, (4, 4), 2)
    assert 6 < int(valid.sum()) < 32
    crazy = features.clone()
    crazy.permute(0, 2, 3, 1)[~valid] = 1e4  # every channel of every masked position
    reference = _trained_state(features, inlier)
    with_crazy = _trained_state(crazy, inlier)
    assert all(torch.equal(reference[k], with_crazy[k]) for k in reference)
    # Control: were the masked positions used, the crazy values would change the fit.
    unmasked = _trained_state(crazy, torch.ones_like(inlier))
    assert not all(torch.equal(reference[k], unmasked[k]) for k in reference)


# --------------------------------------------------------------------------- normalization


def _toy_arrays(n: int = 3, h: int = 20, w: int = 24) -> SceneArrays:
    rng = np.random.default_rng(0)
    labels = np.zeros((n, h, w), dtype=np.uint8)
    labels[:, 2:7, 3:9] = 1
    labels[:, 12:, :5] = 255
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return SceneArrays(images, labels, np.zeros_like(labels), tuple(f"f{i}" for i in range(n)), ("thing",))


def _toy_input(arrays: SceneArrays) -> Tensor:
    """The frames of :func:`_toy_arrays` as the fitting functions see them with ``divisor=8``:
    padded bottom to 24 rows by mirroring, ``(B, 3, H, W)`` in ``[0, 1]`` (written out here, not
    taken from the library's padding)."""
    x = torch.from_numpy(np.pad(arrays.images, [(0, 0), (0, 4), (0, 0), (0, 0)], mode="symmetric"))
    return x.permute(0, 3, 1, 2).float() / 255.0


def _fitted_toy(tmp_seed: int = 0) -> tuple[FeatureDensity, FrozenFeatureExtractor]:
    torch.manual_seed(tmp_seed)
    extractor = _toy_extractor()
    density = FeatureDensity({"a": 3, "b": 3}, n_steps=2, hidden=8)
    return _perturbed(density), extractor


def test_standardization_uses_valid_positions_only() -> None:
    density, extractor = _fitted_toy()
    arrays = _toy_arrays()
    fit_standardization(extractor, density, arrays, batch_size=2, divisor=8, rule="all")
    feats = extractor(_toy_input(arrays))
    inlier = torch.from_numpy(arrays.labels == 0)
    for name, stride in [("a", 2), ("b", 4)]:
        valid = valid_feature_mask(inlier, feats[name].shape[-2:], stride)
        v = feats[name].permute(0, 2, 3, 1)[valid].double()
        assert torch.allclose(density.standardize[name].mean.double(), v.mean(0), atol=1e-6)
        assert torch.allclose(density.standardize[name].scale.double(), v.std(0, unbiased=False), rtol=1e-4)
    before = {k: v.clone() for k, v in density.standardize.state_dict().items()}
    wild = arrays.images.copy()
    wild[arrays.labels != 0] = 255
    wild_arrays = SceneArrays(wild, arrays.labels, arrays.train_ids, arrays.names, arrays.classes)
    fit_standardization(extractor, density, wild_arrays, batch_size=2, divisor=8, rule="all")
    assert all(torch.equal(v, density.standardize.state_dict()[k]) for k, v in before.items())
    # A constant channel gets the floored scale, not zero.
    flat = SceneArrays(np.full_like(arrays.images, 7), arrays.labels, arrays.train_ids, arrays.names, ("t",))
    flat.images[..., 0] = np.arange(arrays.images.shape[2], dtype=np.uint8)  # only channel 0 varies
    fit_standardization(extractor, density, flat, batch_size=2, divisor=8, rule="all")
    scale = density.standardize["a"].scale
    assert scale[0] > 0.01 and 0 < float(scale[1]) < 1e-3 * float(scale[0])


def test_normalization_constants_come_from_training_pixels(tmp_path: Path) -> None:
    density, extractor = _fitted_toy()
    arrays = _toy_arrays()
    stats = fit_normalization(extractor, density, arrays, batch_size=2, divisor=8, rule="all")
    # By hand: every frame mirror-padded to 24×24, all valid positions of each tap pooled.
    with torch.no_grad():
        maps = density.log_prob_maps(extractor(_toy_input(arrays)))
    inlier = torch.from_numpy(arrays.labels == 0)
    for i, (name, stride) in enumerate([("a", 2), ("b", 4)]):
        values = maps[name][valid_feature_mask(inlier, maps[name].shape[-2:], stride)].double()
        assert stats.count[name] == values.numel() > 0
        # float32 maps of a batch of 2 + 1 frames vs. one batch of 3: equal up to float32 rounding.
        assert math.isclose(float(density.train_log_prob_mean[i]), float(values.mean()), abs_tol=1e-5)
        assert math.isclose(
            float(density.train_log_prob_std[i]), float(values.std(unbiased=False)), rel_tol=1e-5
        )
    # Anomalous and void pixels do not enter: making them crazy leaves the constants alone.
    mean_before = density.train_log_prob_mean.clone()
    wild = arrays.images.copy()
    wild[arrays.labels != 0] = 255
    fit_normalization(
        extractor,
        density,
        SceneArrays(wild, arrays.labels, arrays.train_ids, arrays.names, arrays.classes),
        2,
        8,
        "all",
    )
    assert torch.equal(density.train_log_prob_mean, mean_before)
    # A training position without a finite log p is left out (named), not averaged in as −1e12.
    plain = density.log_prob_maps

    def one_bad(feats: dict[str, Tensor]) -> dict[str, Tensor]:
        out = plain(feats)
        out["a"][0, 0, 0] = MIN_LOG_PROB
        return out

    density.log_prob_maps = one_bad
    with pytest.warns(
        UserWarning, match=r"without a finite log-likelihood left out, per tap: \{'a': 2, 'b': 0\}"
    ):
        fit_normalization(extractor, density, arrays, 2, 8, "all")
    del density.log_prob_maps
    assert abs(float(density.train_log_prob_mean[0]) - float(mean_before[0])) < 1.0
    # Checkpoint round trip.
    cfg = FeatureFlowsRunConfig(
        output_dir=str(tmp_path), segmenter="seg.pt", taps={"a": "x", "b": "y"}, flow=FlowConfig(2, 8)
    )
    save_feature_density(tmp_path / "flows.pt", density, cfg, {"a": 2, "b": 4})
    loaded, loaded_cfg = load_feature_density(tmp_path / "flows.pt")
    # The files it names are stored absolute (densead.config.checkpoint_config).
    absolute = os.path.abspath
    assert loaded_cfg == replace(
        cfg, segmenter=absolute("seg.pt"), data=replace(cfg.data, root=absolute(cfg.data.root))
    )
    assert torch.equal(loaded.train_log_prob_mean, density.train_log_prob_mean)
    assert torch.equal(loaded.train_log_prob_std, density.train_log_prob_std)
    feats = extractor(torch.rand(1, 3, 16, 16))
    for name, s in density.normalized_scores(density.log_prob_maps(feats)).items():
        assert torch.equal(loaded.normalized_scores(loaded.log_prob_maps(feats))[name], s)


def test_unfitted_normalization_is_refused(tmp_path: Path) -> None:
    density = FeatureDensity({"a": 3}, n_steps=1, hidden=4)
    with pytest.raises(ValueError, match="not fitted"):
        density.normalized_scores({"a": torch.zeros(1, 2, 2)})
    cfg = FeatureFlowsRunConfig(
        output_dir=str(tmp_path), segmenter="s.pt", taps={"a": "x"}, flow=FlowConfig(1, 4)
    )
    save_feature_density(tmp_path / "half.pt", density, cfg, {"a": 2})
    with pytest.raises(ValueError, match="half.pt.*normalization"):
        load_feature_density(tmp_path / "half.pt")


def test_normalized_score_formulas() -> None:
    density = FeatureDensity({"a": 2, "b": 2}, n_steps=1, hidden=4)
    density.set_normalization({"a": -10.0, "b": 4.0}, {"a": 2.0, "b": 0.5})
    lp = {"a": torch.tensor([[[-10.0, -20.0]]]), "b": torch.tensor([[[4.0, 2.0]]])}
    mean = density.normalized_scores(lp, "mean")
    assert torch.allclose(mean["a"], torch.tensor([[[0.0, 1.0]]], dtype=torch.float64))
    assert torch.allclose(mean["b"], torch.tensor([[[0.0, 0.5]]], dtype=torch.float64))
    z = density.normalized_scores(lp, "zscore")
    assert torch.allclose(z["a"], torch.tensor([[[0.0, 5.0]]], dtype=torch.float64))
    assert torch.allclose(z["b"], torch.tensor([[[0.0, 4.0]]], dtype=torch.float64))


# --------------------------------------------------------------------------- planted anomalies


def test_two_gaussians_planted_anomalies_auroc() -> None:
    """In-distribution: two Gaussian clusters; anomalies: a third cluster off both of them.

    The anomalies lie inside the range of every single channel of the inliers (±1.5 per
    channel), so only the joint density separates them.
    """
    torch.manual_seed(0)
    c = 4
    axis = torch.ones(c) / 2.0
    off_axis = torch.tensor([1.0, -1.0, 1.0, -1.0]) / 2.0

    def inliers(n: int) -> Tensor:
        sign = torch.where(torch.rand(n, 1) < 0.5, -1.0, 1.0)
        return 3.0 * sign * axis + 0.5 * torch.randn(n, c)

    density = FeatureDensity({"a": c}, n_steps=2, hidden=16).train()
    optimizer = torch.optim.Adam(density.parameters(), lr=1e-2)
    inlier = torch.ones(2, 16, 16, dtype=torch.bool)
    for _ in range(40):
        feats = inliers(2 * 16 * 16).view(2, 16, 16, c).permute(0, 3, 1, 2)
        flow_training_step(density, optimizer, {"a": feats}, inlier, {"a": 1}, 512)
    density.eval()
    with torch.no_grad():
        train_lp = density.vector_log_prob("a", inliers(4096))
    density.set_normalization({"a": float(train_lp.mean())}, {"a": float(train_lp.std())})
    vectors = inliers(2 * 32 * 32)
    labels = torch.zeros(2 * 32 * 32, dtype=torch.uint8)
    planted = torch.randperm(len(vectors))[:200]
    vectors[planted] = 3.0 * off_axis + 0.5 * torch.randn(200, c)  # > 8 std from both clusters
    labels[planted] = 1
    feats = vectors.view(2, 32, 32, c).permute(0, 3, 1, 2)
    with torch.no_grad():
        scores = density.normalized_scores(density.log_prob_maps({"a": feats}))["a"]
    metrics = PixelMetrics(mode="exact")
    metrics.update(scores, labels.view(2, 32, 32))
    assert metrics.compute()["auroc"] > 0.99
    # The anomalies' scores are positive: less likely than a typical training position.
    assert float(scores.flatten()[planted].median()) > 0


# --------------------------------------------------------------------------- baselines and the detector


def test_baselines_on_hand_made_logits() -> None:
    logits = torch.tensor([[10.0, 0, 0], [2, 1, 0], [1, 1, 1], [0.1, 0, 0]]).t().reshape(1, 3, 1, 4)
    msp, max_logit, entropy = (
        msp_score(logits)[0, 0],
        max_logit_score(logits)[0, 0],
        entropy_score(logits)[0, 0],
    )
    assert torch.argsort(msp).tolist() == [0, 1, 3, 2]
    assert torch.argsort(entropy).tolist() == [0, 1, 3, 2]
    assert torch.argsort(max_logit).tolist() == [0, 1, 2, 3]  # raw logit scale matters here
    assert math.isclose(float(msp[2]), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(entropy[2]), math.log(3), rel_tol=1e-6)
    assert torch.allclose(max_logit, torch.tensor([-10.0, -2.0, -1.0, -0.1]))
    shifted = logits + 5.0
    assert torch.allclose(msp_score(shifted), msp_score(logits), atol=1e-6)
    assert torch.allclose(entropy_score(shifted), entropy_score(logits), atol=1e-5)
    assert torch.allclose(max_logit_score(shifted), max_logit_score(logits) - 5.0)
    # Energy: −log Σ exp(z), written out; a smooth max logit (−max z − log K ≤ energy ≤ −max z).
    energy = energy_score(logits)[0, 0]
    by_hand = torch.tensor([-math.log(math.exp(10) + 2), -math.log(math.exp(2) + math.exp(1) + 1),
                            -math.log(3 * math.e), -math.log(math.exp(0.1) + 2)])  # fmt: skip
    assert torch.allclose(energy, by_hand)
    assert (energy <= max_logit).all() and (energy >= max_logit - math.log(3)).all()
    assert torch.allclose(energy_score(shifted), energy - 5.0)


def test_detector_maps_and_ensembles() -> None:
    density, extractor = _fitted_toy()
    density.set_normalization({"a": -3.0, "b": -5.0}, {"a": 1.0, "b": 1.0})
    detector = DenseFeatureDetector(extractor, density)
    x = torch.rand(2, 3, 16, 24)
    maps, logits = detector.score_maps(x)
    assert set(maps) == {"density_a", "density_b", "density_mean", "density_min", *BASELINES}
    assert all(m.shape == (2, 16, 24) for m in maps.values()) and logits.shape == (2, 6, 16, 24)
    feats = extractor(x)
    scores = density.normalized_scores(density.log_prob_maps(feats))
    expected_a = F.interpolate(
        scores["a"][:, None].float(), size=(16, 24), mode="bilinear", align_corners=False
    )
    assert torch.allclose(maps["density_a"], expected_a[:, 0])
    layers = torch.stack([maps["density_a"], maps["density_b"]])
    assert torch.allclose(maps["density_mean"], layers.mean(0))
    # "min" ensemble: the least likely layer decides = the largest anomaly score.
    assert torch.equal(maps["density_min"], layers.amax(0))
    assert (maps["density_min"] >= maps["density_mean"]).all()
    up = F.interpolate(feats["logits"], size=(16, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(maps["msp"], msp_score(up))


def test_a_non_finite_feature_stays_a_sentinel_in_every_density_map() -> None:
    """A position without density is the sentinel over its whole cell, in its layer, the mean and the
    min ensemble; scaled by 1/|μ| and blended bilinearly it would pass for a real score (and squeeze
    every real one into a single float16 value of a dataset-wide rescale)."""
    density, extractor = _fitted_toy()
    density.set_normalization({"a": -3.0, "b": -5.0}, {"a": 1.0, "b": 1.0})
    detector = DenseFeatureDetector(extractor, density)
    x = torch.rand(2, 3, 16, 24)
    clean, _ = detector.score_maps(x)
    x[0, :, 4:8, 8:12] = math.inf  # one cell of tap "b" (stride 4): pooled to inf
    maps, _ = detector.score_maps(x)
    cell = torch.zeros(2, 16, 24, dtype=torch.bool)
    cell[0, 4:8, 8:12] = True
    for name in ("density_b", "density_mean", "density_min"):
        assert torch.equal(maps[name].abs() >= SENTINEL_LIMIT, cell), name
        assert (maps[name][cell] == -MIN_LOG_PROB).all(), name
        real = maps[name][~cell]
        assert real.abs().max() < 100, name  # no fraction of the sentinel leaked into a neighbour
    # tap "a" (stride 2) sees the same inf pixels: its sentinels are exactly the cells it pooled them into
    assert torch.equal(maps["density_a"].abs() >= SENTINEL_LIMIT, cell)
    assert torch.equal(maps["density_b"][1], clean["density_b"][1])  # the other frame is untouched


def test_sml_standardizes_the_max_logit_per_predicted_class() -> None:
    # Class 0 is predicted with max logits around 10 (std 1), class 1 around 2 (std 0.5).
    stats = MaxLogitStats(
        torch.tensor([10.0, 2.0], dtype=torch.float64),
        torch.tensor([1.0, 0.5], dtype=torch.float64),
        torch.tensor([500, 500]),
    )
    # Pixels: (class 0, max 8), (class 1, max 2), (class 1, max 3), (class 0, max 12).
    logits = torch.tensor([[8.0, 0.0], [0.0, 2.0], [1.0, 3.0], [12.0, -1.0]]).t().reshape(1, 2, 1, 4)
    sml = stats.score(logits)[0, 0]
    assert torch.allclose(sml, torch.tensor([2.0, 0.0, -2.0, -2.0]))
    # Raw max logit calls the class-1 pixels the most anomalous; sml, the unusually low class-0 one.
    assert int(max_logit_score(logits)[0, 0].argmax()) == 1 and int(sml.argmax()) == 0
    with pytest.raises(ValueError, match="logits have 3 classes, the sml statistics 2"):
        stats.score(torch.zeros(1, 3, 1, 1))
    with pytest.raises(ValueError, match="std must be positive"):
        MaxLogitStats(stats.mean, torch.tensor([1.0, 0.0], dtype=torch.float64), stats.count)
    # A checkpoint entry read back: the error names where it came from.
    again = MaxLogitStats.from_state(stats.state(), "here")
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.count, stats.count)
    with pytest.raises(ValueError, match=r"^f.pt: max_logit_stats: expected tensors mean, std and count"):
        MaxLogitStats.from_state({"mean": stats.mean, "std": stats.std}, "f.pt: max_logit_stats")
    with pytest.raises(ValueError, match=r"^f.pt: max_logit_stats: mean holds non-finite"):
        MaxLogitStats.from_state(
            {**stats.state(), "mean": torch.tensor([0.0, math.nan])}, "f.pt: max_logit_stats"
        )


def test_sml_rare_and_constant_classes_fall_back_to_pooled_statistics() -> None:
    values = {0: torch.linspace(4.0, 8.0, 400), 1: torch.full((SML_MIN_PIXELS,), 3.0), 2: torch.tensor([9.0])}
    count = torch.tensor([len(v) for v in values.values()] + [0])
    total = torch.tensor([float(v.double().sum()) for v in values.values()] + [0.0], dtype=torch.float64)
    total_sq = torch.tensor(
        [float((v.double() ** 2).sum()) for v in values.values()] + [0.0], dtype=torch.float64
    )
    stats = MaxLogitStats.from_sums(count, total, total_sq)
    pooled = torch.cat(list(values.values())).double()
    assert math.isclose(float(stats.mean[0]), float(values[0].double().mean()), rel_tol=1e-12)
    assert math.isclose(float(stats.std[0]), float(values[0].double().std(unbiased=False)), rel_tol=1e-9)
    # Class 1: SML_MIN_PIXELS pixels, all alike: its own mean, a std floored at STD_FLOOR × pooled std.
    assert float(stats.mean[1]) == 3.0
    assert math.isclose(float(stats.std[1]), STD_FLOOR * float(pooled.std(unbiased=False)), rel_tol=1e-6)
    # Classes 2 (one pixel) and 3 (never predicted) take the pooled statistics.
    for k in (2, 3):
        assert math.isclose(float(stats.mean[k]), float(pooled.mean()), rel_tol=1e-12)
        assert math.isclose(float(stats.std[k]), float(pooled.std(unbiased=False)), rel_tol=1e-9)
    assert stats.count.tolist() == [400, SML_MIN_PIXELS, 1, 0]
    with pytest.raises(ValueError, match="no in-distribution training pixels"):
        MaxLogitStats.from_sums(torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2))


def test_sml_statistics_come_from_the_inlier_pixels_as_scored() -> None:
    extractor = _toy_extractor()
    arrays = _toy_arrays()
    stats = fit_max_logit_stats(extractor, arrays, batch_size=2, divisor=8)
    # By hand: logits upsampled to the padded 24×24 frame (as score_maps does), cut to 20×24,
    # grouped by predicted class over the inlier pixels.
    x = _toy_input(arrays)
    up = F.interpolate(extractor(x)["logits"], size=(24, 24), mode="bilinear", align_corners=False)[:, :, :20]
    top, cls = up.max(1)
    inlier = torch.from_numpy(arrays.labels == 0)
    top, cls = top[inlier].double(), cls[inlier]
    assert int(stats.count.sum()) == int(inlier.sum()) and stats.n_classes == 6
    for k in range(6):
        v = top[cls == k]
        assert int(stats.count[k]) == v.numel()
        if v.numel() >= SML_MIN_PIXELS:
            assert math.isclose(float(stats.mean[k]), float(v.mean()), rel_tol=1e-6)
            assert math.isclose(float(stats.std[k]), float(v.std(unbiased=False)), rel_tol=1e-4)
    assert int((stats.count >= SML_MIN_PIXELS).sum()) >= 2  # the check above compared something
    # Training fits them in the normalization's pass: the same statistics, the same normalization.
    density, _ = _fitted_toy()
    plain = fit_normalization(extractor, density, arrays, 2, 8, "all")
    sums = MaxLogitSums(6)
    shared = fit_normalization(extractor, density, arrays, 2, 8, "all", max_logits=sums)
    assert shared.mean() == plain.mean() and shared.std() == plain.std()
    assert torch.equal(sums.stats().count, stats.count) and torch.equal(sums.stats().mean, stats.mean)
    assert torch.equal(sums.stats().std, stats.std)
    # A detector with the statistics scores sml as their standardization of its logits.
    density, _ = _fitted_toy()
    density.set_normalization({"a": -3.0, "b": -5.0}, {"a": 1.0, "b": 1.0})
    maps, logits = DenseFeatureDetector(extractor, density, max_logit_stats=stats).score_maps(x)
    assert torch.equal(maps["sml"], stats.score(logits))
    assert "sml" not in DenseFeatureDetector(extractor, density).score_maps(x)[0]
    # Only inlier pixels enter: a frame labelled void throughout counts as no frame at all.
    labels = arrays.labels.copy()
    labels[0] = 255
    voided = SceneArrays(arrays.images, labels, arrays.train_ids, arrays.names, arrays.classes)
    rest = SceneArrays(
        arrays.images[1:], arrays.labels[1:], arrays.train_ids[1:], arrays.names[1:], ("thing",)
    )
    a, b = fit_max_logit_stats(extractor, voided, 2, 8), fit_max_logit_stats(extractor, rest, 2, 8)
    assert torch.equal(a.count, b.count) and int(a.count.sum()) < int(stats.count.sum())
    assert torch.allclose(a.mean, b.mean, rtol=1e-9) and torch.allclose(a.std, b.std, rtol=1e-6)


# --------------------------------------------------------------------------- the tools


def _run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_tools_smoke(tmp_path: Path, shared_data: Path) -> None:
    """Segmenter → flows → evaluation, two steps each on three CamVid frames at quarter scale."""
    data = {"root": str(shared_data / "camvid"), "scale": 0.25, "max_frames": 3}
    seg_cfg = {
        "output_dir": str(tmp_path / "seg"),
        "data": {**data, "crop_height": 64, "crop_width": 96},
        "model": {"backbone": "resnet18", "decoder_channels": 8},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "num_threads": 1},
    }
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(seg_cfg, sort_keys=False))
    out = _run("tools/train_segmenter.py", str(tmp_path / "seg.yaml"))
    assert "test mIoU over 9 in-distribution classes" in out.stdout
    model, loaded_cfg = load_segmenter(tmp_path / "seg" / "checkpoint.pt")
    assert model.num_classes == 9 and loaded_cfg.train.steps == 2

    flows_cfg = {
        "output_dir": str(tmp_path / "flows"),
        "segmenter": str(tmp_path / "seg" / "checkpoint.pt"),
        "taps": {"layer3": "backbone.layer3.1.add", "fuse": "fuse.1"},
        "data": {**data, "crop_height": 0, "crop_width": 0},
        "flow": {"n_steps": 1, "hidden": 8},
        "train": {"steps": 2, "batch_size": 2, "max_pixels": 64, "log_every": 1, "num_threads": 1},
        "eval": {"metrics_mode": "exact", "heatmap_detectors": ["density_min", "entropy"]},
    }
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(flows_cfg, sort_keys=False))
    out = _run("tools/train_feature_flows.py", str(tmp_path / "flows.yaml"))
    assert "normalization layer3" in out.stdout
    density, _ = load_feature_density(tmp_path / "flows" / "feature_flows.pt")
    assert density.names == ("layer3", "fuse") and density.is_normalized

    # With auxiliary outliers (Tiny ImageNet photos pasted into the frames, the outlier term
    # logged) and floored log-posteriors on a logits tap, stored and restored with the checkpoint.
    photos = {"source": "npz", "path": str(shared_data / "tinyimagenet_val_32.npz"), "stop": 50}
    oe_cfg = {
        **flows_cfg,
        "taps": {"fuse": "fuse.1", "cls": "classifier"},
        "log_softmax_floor": {"cls": -4},
        "output_dir": str(tmp_path / "flows_oe"),
        "outliers": {"data": photos, "per_frame": 2, "min_size": 16, "max_size": 24},
    }
    (tmp_path / "flows_oe.yaml").write_text(yaml.safe_dump(oe_cfg, sort_keys=False))
    out = _run("tools/train_feature_flows.py", str(tmp_path / "flows_oe.yaml"))
    assert "fuse_out" in out.stdout and "cls_out" in out.stdout
    density, oe_loaded = load_feature_density(tmp_path / "flows_oe" / "feature_flows.pt")
    assert density.is_normalized and oe_loaded.outliers is not None
    assert density.log_softmax_floor == {"cls": -4.0} == oe_loaded.log_softmax_floor
    assert float(density.standardize["cls"].mean.max()) <= 0.0  # log-probabilities, not logits
    assert oe_loaded.outliers.data.stop == 50 and oe_loaded.outliers.max_size == 24

    out = _run(
        "tools/evaluate_dense_features.py", str(tmp_path / "flows.yaml"), "--heatmaps", str(tmp_path / "hm")
    )
    with open(tmp_path / "flows" / "eval_test" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    names = [r["detector"] for r in rows]
    assert names == [
        "density_layer3",
        "density_fuse",
        "density_mean",
        "density_min",
        "msp",
        "max_logit",
        "entropy",
        "energy",
        "sml",
    ]
    assert all(0.0 <= float(r["auroc"]) <= 1.0 and int(r["n_anomaly"]) > 0 for r in rows)
    assert "| density_mean |" in out.stdout
    assert "| density_min |" in (tmp_path / "flows" / "eval_test" / "metrics.md").read_text()
    assert len(list((tmp_path / "hm").glob("*.png"))) == 3
    assert json.loads((tmp_path / "hm" / "heatmaps.json").read_text())["frames_shown"] == 3
    # A rerun showing fewer frames replaces the folder whole; a folder of other files is refused.
    _run("tools/evaluate_dense_features.py", str(tmp_path / "flows.yaml"), "--heatmaps", str(tmp_path / "hm"),
         "--n-heatmaps", "1")  # fmt: skip
    assert len(list((tmp_path / "hm").glob("*.png"))) == 1
    (tmp_path / "hm" / "heatmaps.json").unlink()
    proc = _run("tools/evaluate_dense_features.py", str(tmp_path / "flows.yaml"), "--heatmaps",
                str(tmp_path / "hm"), ok=False)  # fmt: skip
    assert proc.returncode == 2 and "holds files that no heat-map run wrote" in proc.stderr
    assert len(list((tmp_path / "hm").iterdir())) == 1
    proc = _run("tools/evaluate_dense_features.py", str(tmp_path / "flows.yaml"), "--heatmaps",
                str(tmp_path / "flows" / "eval_test"), ok=False)  # fmt: skip
    assert proc.returncode == 2 and "eval_test, which the heat maps would replace" in proc.stderr


# --------------------------------------------------------------------------- floored log-posteriors


def _manual_floored(z: Tensor, floor: float) -> Tensor:
    """max(log softmax(z), floor) position by position, written out (exp, sum, log)."""
    out = torch.empty_like(z)
    for b in range(z.shape[0]):
        for i in range(z.shape[2]):
            for j in range(z.shape[3]):
                v = z[b, :, i, j]
                log_p = v - v.max() - torch.log(torch.exp(v - v.max()).sum())
                out[b, :, i, j] = torch.maximum(log_p, torch.full_like(log_p, floor))
    return out


def test_log_softmax_floor_is_the_flow_input() -> None:
    plain = _perturbed(FeatureDensity({"z": 4}, n_steps=2, hidden=8).double())
    floored = FeatureDensity({"z": 4}, n_steps=2, hidden=8, log_softmax_floor={"z": -3.0}).double()
    floored.load_state_dict(plain.state_dict())
    floored.eval()
    torch.manual_seed(0)
    z = 4.0 * torch.randn(2, 4, 3, 5, dtype=torch.float64)
    expected = _manual_floored(z, -3.0)
    assert torch.allclose(floored.inputs("z", z), expected)
    assert bool((expected == -3.0).any()) and bool((expected > -3.0).any())  # the floor is active
    assert torch.allclose(floored.log_prob_map("z", z), plain.log_prob_map("z", expected))
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(floored.vector_log_prob("z", vectors), floored.log_prob_map("z", z).reshape(-1))
    # Shifting all logits, or making a confident pixel more confident, changes nothing.
    confident = torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
    same = [floored.log_prob_map("z", m) for m in (z + 7.0, 3 * confident)]
    assert torch.allclose(same[0], floored.log_prob_map("z", z))
    assert torch.allclose(same[1], floored.log_prob_map("z", confident))
    assert not torch.allclose(plain.log_prob_map("z", 3 * confident), plain.log_prob_map("z", confident))


def test_log_softmax_floor_is_checked() -> None:
    with pytest.raises(ValueError, match="names tap 'logits'"):
        FeatureDensity({"cls": 3}, log_softmax_floor={"logits": -4.0})
    for bad in (0.0, 2.0, math.nan, -math.inf):
        with pytest.raises(ValueError, match=r"log_softmax_floor\['cls'\] must be a finite negative"):
            FeatureDensity({"cls": 3}, log_softmax_floor={"cls": bad})
    with pytest.raises(ValueError, match="needs >= 2 channels"):
        FeatureDensity({"cls": 1}, log_softmax_floor={"cls": -4.0})


def test_standardization_of_floored_logits() -> None:
    extractor = _toy_extractor()
    density = FeatureDensity({"logits": 6}, n_steps=1, hidden=4, log_softmax_floor={"logits": -2.0})
    arrays = _toy_arrays()
    fit_standardization(extractor, density, arrays, batch_size=2, divisor=8, rule="all")
    logits = extractor(_toy_input(arrays))["logits"]
    valid = valid_feature_mask(torch.from_numpy(arrays.labels == 0), logits.shape[-2:], 2)
    v = _manual_floored(logits.double(), -2.0).permute(0, 2, 3, 1)[valid]
    assert torch.allclose(density.standardize["logits"].mean.double(), v.mean(0), atol=1e-6)
    std = v.std(0, unbiased=False)
    assert bool((std[3:] == 0).all())  # the toy's last three logits are always floored: constant
    expected = std.clamp_min(STD_FLOOR * float(std.mean()))
    assert torch.allclose(density.standardize["logits"].scale.double(), expected, rtol=1e-4)


def test_floored_logit_density_does_not_flag_confidence() -> None:
    """Planted: the density of raw logits flags very confident inliers; the floored one does not.

    Four classes. Training pixels: confident ones (winner logit m above the others, m mostly
    3–8, a few up to 30) and boundary pixels where classes 0 and 1 compete. Test anomalies:
    classes 2 and 3 compete, at a moderate margin; test inliers: pixels *more* confident than any
    training pixel (m = 30–60). The raw density puts those inliers in its tail; with the floor
    they sit on the commonest points of all.
    """
    gen = torch.Generator().manual_seed(0)

    def confident(n: int, low: float, high: float) -> Tensor:
        m = low + (high - low) * torch.rand(n, 1, generator=gen)
        k = torch.randint(4, (n,), generator=gen)
        return m * F.one_hot(k, 4).double() + 0.3 * torch.randn(n, 4, generator=gen, dtype=torch.float64)

    def competing(n: int, a: int, b: int) -> Tensor:
        v = 0.3 * torch.randn(n, 4, generator=gen, dtype=torch.float64)
        v[:, [a, b]] += 5.0 + torch.randn(n, 1, generator=gen, dtype=torch.float64)
        return v

    def training_vectors(n: int) -> Tensor:
        parts = [
            confident(n * 6 // 10, 3, 8),
            confident(n // 20, 8, 30),
            competing(n - n * 6 // 10 - n // 20, 0, 1),
        ]
        return torch.cat(parts)[torch.randperm(n, generator=gen)]

    scores = {}
    for floor in (None, -4.0):
        torch.manual_seed(0)
        density = FeatureDensity(
            {"z": 4}, n_steps=2, hidden=16, log_softmax_floor=None if floor is None else {"z": floor}
        ).double()
        x = density.inputs("z", training_vectors(4096).view(-1, 4, 1, 1))[..., 0, 0]
        density.set_standardization("z", x.mean(0).float(), x.std(0).float())
        density.train()
        optimizer = torch.optim.Adam(density.parameters(), lr=1e-2)
        inlier = torch.ones(1, 512, 1, dtype=torch.bool)
        for _ in range(150):
            feats = training_vectors(512).t().reshape(1, 4, 512, 1)
            flow_training_step(density, optimizer, {"z": feats}, inlier, {"z": 1}, 512, noise=0.1)
        density.eval()
        test = torch.cat([confident(400, 30, 60), competing(100, 2, 3)])
        with torch.no_grad():
            scores[floor] = -density.vector_log_prob("z", test)
    labels = torch.cat([torch.zeros(400), torch.ones(100)]).to(torch.uint8)
    auroc = {}
    for floor, s in scores.items():
        metrics = PixelMetrics(mode="exact")
        metrics.update(s.view(1, 1, -1), labels.view(1, 1, -1))
        auroc[floor] = metrics.compute()["auroc"]
    assert auroc[-4.0] > 0.99
    assert auroc[None] < 0.7  # 0.20–0.48 over four data seeds when written
