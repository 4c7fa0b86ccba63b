"""densead.metrics against scikit-learn, hand cases, error messages, binned accuracy and memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn import metrics as skm

from densead.metrics import (
    ComponentMetrics,
    FalsePositivesByClass,
    FrameHistograms,
    PixelF1,
    PixelMetrics,
    auroc,
    average_precision,
    bootstrap_component_metrics,
    bootstrap_frame_metrics,
    bootstrap_metrics,
    fpr_at_tpr,
    image_metrics,
    percentile_interval,
    roc_curve,
)

EXACT_TOL = 1e-12
BINNED_TOL = 0.005  # the accuracy budget of binned mode (AUROC and AP)


def sk_fpr_at(labels: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """Reference FPR at TPR: the lowest FPR among sklearn's ROC points with TPR >= tpr."""
    fpr, tp, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[tp >= tpr].min())


def sk_all(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {
        "auroc": skm.roc_auc_score(labels, scores),
        "ap": skm.average_precision_score(labels, scores),
        "fpr95": sk_fpr_at(labels, scores),
    }


def assert_metrics_close(got: dict[str, float], want: dict[str, float], tol: float) -> None:
    for key in ("auroc", "ap", "fpr95"):
        assert got[key] == pytest.approx(want[key], abs=tol), (key, got[key], want[key])


# ---------------------------------------------------------------------------
# Image-level metrics vs sklearn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "n_levels", "prevalence", "seed"),
    [
        (50, 5, 0.3, 0),  # very coarse scores: almost everything tied
        (500, 20, 0.1, 1),
        (2000, 200, 0.02, 2),  # rare anomalies
        (2000, 10**9, 0.5, 3),  # practically no ties
        (37, 3, 0.5, 4),
    ],
)
def test_image_metrics_match_sklearn_with_ties(n: int, n_levels: int, prevalence: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    labels[:2] = [0, 1]  # both classes present whatever the draw
    # Integer levels give many ties; anomalies shifted up so the numbers are not trivial.
    scores = rng.integers(0, n_levels, n).astype(float) + labels * (n_levels / 4)
    if n_levels <= 20:
        assert np.unique(scores).size < n / 2  # ties really are there
    want = sk_all(labels, scores)
    assert_metrics_close(image_metrics(scores, labels), want, EXACT_TOL)
    assert auroc(scores, labels) == pytest.approx(want["auroc"], abs=EXACT_TOL)
    assert average_precision(scores, labels) == pytest.approx(want["ap"], abs=EXACT_TOL)
    assert fpr_at_tpr(scores, labels) == pytest.approx(want["fpr95"], abs=EXACT_TOL)
    for target in (0.0, 0.5, 0.8, 1.0):
        assert fpr_at_tpr(scores, labels, tpr=target) == pytest.approx(
            sk_fpr_at(labels, scores, target), abs=EXACT_TOL
        )


def test_roc_curve_matches_sklearn_points() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # ties
    fpr, tpr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-15)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)


def test_accepts_torch_lists_and_other_dtypes() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 200)
    labels[:2] = [0, 1]
    scores = rng.normal(size=200).astype(np.float32) + labels
    want = image_metrics(scores, labels)
    assert want == image_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert want == image_metrics(scores.tolist(), labels.astype(bool).tolist())
    assert want == image_metrics(scores.astype(np.float64), labels.astype(np.float32))
    # bfloat16 (no numpy equivalent) goes through float32; rounding only adds ties.
    got = image_metrics(torch.from_numpy(scores).bfloat16(), torch.from_numpy(labels))
    sk = sk_all(labels, torch.from_numpy(scores).bfloat16().float().numpy())
    assert_metrics_close(got, sk, EXACT_TOL)


# ---------------------------------------------------------------------------
# Hand cases and the FPR95 definition
# ---------------------------------------------------------------------------


def test_sklearn_docstring_example() -> None:
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert auroc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # TPR reaches 1 at threshold 0.35, where one of the two inliers (0.4) is flagged.
    assert fpr_at_tpr(scores, labels) == pytest.approx(0.5)


def test_perfect_and_reversed_separation() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    scores = np.arange(40, dtype=float)
    assert image_metrics(scores, labels) == {"auroc": 1.0, "ap": 1.0, "fpr95": 0.0}
    reversed_ = image_metrics(-scores, labels)
    assert reversed_["auroc"] == 0.0
    assert reversed_["fpr95"] == 1.0  # every inlier is flagged before the first anomaly
    assert reversed_["ap"] == pytest.approx(skm.average_precision_score(labels, -scores), abs=EXACT_TOL)


def test_all_tied_is_chance_level() -> None:
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    got = image_metrics(np.full(8, 3.0), labels)
    assert got["auroc"] == 0.5  # a tie between an inlier and an anomaly earns half credit
    assert got["ap"] == pytest.approx(2 / 8)  # one step: precision = prevalence, recall 0 -> 1
    assert got["fpr95"] == 1.0


def test_fpr95_counts_tpr_equal_to_target_as_reached() -> None:
    # 20 anomalies, 19 above every inlier: TPR = 19/20 = 0.95 exactly with no false positive.
    labels = np.array([1] * 19 + [0] * 50 + [1])
    scores = np.concatenate([np.full(19, 10.0), np.linspace(0, 5, 50), [-1.0]])
    assert fpr_at_tpr(scores, labels) == 0.0
    assert fpr_at_tpr(scores, labels, tpr=0.96) == 1.0  # needs the last anomaly, below all inliers
    assert sk_fpr_at(labels, scores) == 0.0


def test_fpr95_is_one_when_reached_only_by_flagging_everything() -> None:
    # "Never reached" before the last threshold: with 10 anomalies, missing the lowest one
    # leaves TPR = 0.9 < 0.95, and it scores below every inlier, so the first threshold
    # reaching TPR >= 0.95 flags everything: FPR = 1.0.
    labels = np.array([1] * 9 + [0] * 40 + [1])
    scores = np.concatenate([np.full(9, 10.0), np.linspace(0, 5, 40), [-1.0]])
    assert fpr_at_tpr(scores, labels) == 1.0
    assert sk_fpr_at(labels, scores) == 1.0
    assert fpr_at_tpr(scores, labels, tpr=0.9) == 0.0
    assert fpr_at_tpr(scores, labels, tpr=0.0) == 0.0  # the start point (0, 0) reaches TPR 0


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise_with_count(bad: float) -> None:
    scores = np.array([0.1, bad, 0.3, bad, 0.5])
    labels = np.array([0, 1, 0, 1, 1])
    for fn in (auroc, average_precision, fpr_at_tpr, image_metrics, roc_curve):
        with pytest.raises(ValueError, match=r"2 of 5 scores are non-finite"):
            fn(scores, labels)


def test_label_length_class_and_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"0 \(inlier\) or 1 \(anomaly\), got 2, 255"):
        auroc([0.1, 0.2, 0.3, 0.4], [0, 1, 2, 255])
    with pytest.raises(ValueError, match=r"got 0.5"):
        auroc([0.1, 0.2], [0.5, 1.0])
    with pytest.raises(ValueError, match=r"3 scores, 2 labels"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"0 anomalies \(label 1\) and 3 inliers"):
        average_precision([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match=r"3 anomalies \(label 1\) and 0 inliers"):
        image_metrics([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match=r"both classes"):
        auroc([], [])
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        auroc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"labels must be numeric"):
        auroc([0.1, 0.2], ["a", "b"])
    with pytest.raises(ValueError, match=r"tpr must be in \[0, 1\], got 1.5"):
        fpr_at_tpr([0.1, 0.2], [0, 1], tpr=1.5)


# ---------------------------------------------------------------------------
# PixelMetrics, exact mode
# ---------------------------------------------------------------------------


def make_frame(rng: np.random.Generator, shape: tuple[int, ...], void_frac: float = 0.1):
    labels = (rng.random(shape) < 0.05).astype(np.uint8)
    labels[rng.random(shape) < void_frac] = 255
    scores = np.round(rng.normal(size=shape) + 1.5 * (labels == 1), 2)  # rounding -> ties
    return scores, labels


def test_pixel_exact_equals_sklearn_with_void_and_batches() -> None:
    rng = np.random.default_rng(10)
    pm = PixelMetrics(mode="exact")
    all_scores, all_labels = [], []
    frames = [make_frame(rng, (32, 48)), make_frame(rng, (3, 32, 48)), make_frame(rng, (16, 16))]
    for i, (scores, labels) in enumerate(frames):
        # Void pixels may carry garbage, even non-finite scores: they are ignored.
        scores = scores.copy()
        scores[labels == 255] = np.where(rng.random(np.count_nonzero(labels == 255)) < 0.5, np.nan, 1e9)
        if i == 1:
            pm.update(torch.from_numpy(scores).float(), torch.from_numpy(labels))
            scores = torch.from_numpy(scores).float().numpy().astype(np.float64)
        else:
            pm.update(scores, labels)
        valid = labels != 255
        all_scores.append(scores[valid])
        all_labels.append(labels[valid])
    s, y = np.concatenate(all_scores), np.concatenate(all_labels).astype(int)
    got = pm.compute()
    assert_metrics_close(got, sk_all(y, s), EXACT_TOL)
    assert got["n_pixels"] == y.size and got["n_anomaly"] == int(y.sum())
    assert 0 < got["n_anomaly"] < got["n_pixels"] < sum(f[1].size for f in frames)


def test_pixel_update_errors_leave_state_unchanged() -> None:
    rng = np.random.default_rng(11)
    pm = PixelMetrics(mode="exact")
    scores, labels = make_frame(rng, (8, 8))
    pm.update(scores, labels)
    before = pm.compute()

    bad = labels.copy()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match=r"0 \(inlier\), 1 \(anomaly\) or 255 \(void\), got 7"):
        pm.update(scores, bad)
    with pytest.raises(ValueError, match=r"\(8, 8\) does not match label_map shape \(8, 9\)"):
        pm.update(scores, np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\).*\(64,\)"):
        pm.update(scores.ravel(), labels.ravel())
    nan_scores = scores.copy()
    nan_scores[labels != 255] = np.nan
    n_valid = int(np.count_nonzero(labels != 255))
    with pytest.raises(ValueError, match=rf"{n_valid} of {n_valid} scores of non-void pixels are non-finite"):
        pm.update(nan_scores, labels)
    assert pm.compute() == before


def test_pixel_constructor_and_empty_errors() -> None:
    with pytest.raises(ValueError, match=r"mode must be 'binned' or 'exact', got 'fast'"):
        PixelMetrics(mode="fast")
    with pytest.raises(ValueError, match=r"even and >= 2, got 15"):
        PixelMetrics(n_bins=15)
    for mode in ("exact", "binned"):
        pm = PixelMetrics(mode=mode)
        with pytest.raises(ValueError, match=r"0 anomaly pixels and 0 inlier pixels"):
            pm.compute()
        pm.update(np.ones((4, 4)), np.zeros((4, 4), np.uint8))
        with pytest.raises(ValueError, match=r"0 anomaly pixels and 16 inlier pixels"):
            pm.compute()


# ---------------------------------------------------------------------------
# PixelMetrics, binned mode
# ---------------------------------------------------------------------------


def realistic_frames(kind: str, rng: np.random.Generator, n_frames: int = 6, shape=(256, 384), grow=False):
    """Frames whose scores look like real detectors': ~1 % anomalies, some void."""
    for i in range(n_frames):
        labels = (rng.random(shape) < 0.01).astype(np.uint8)
        labels[rng.random(shape) < 0.05] = 255
        anomaly = labels == 1
        if kind == "gauss":  # inliers N(0, 1), anomalies N(2, 1)
            scores = rng.normal(size=shape) + 2.0 * anomaly
        elif kind == "student":  # heavy tails around 1000, a few extreme pixels
            scores = 1000 + 40 * rng.standard_t(2, shape) + 150 * anomaly * rng.lognormal(0, 0.5, shape)
        else:  # "loglik": negative log-likelihoods in the thousands, skewed
            scores = 3000 + 200 * rng.lognormal(0, 1.0, shape) + anomaly * rng.exponential(800, shape)
        if grow:  # later frames reach far beyond the calibrated range
            scores = scores * (1 + i) + 20 * i
        yield scores.astype(np.float32), labels


@pytest.mark.parametrize("grow", [False, True])
@pytest.mark.parametrize("kind", ["gauss", "student", "loglik"])
def test_binned_close_to_exact(kind: str, grow: bool) -> None:
    rng = np.random.default_rng(20)
    exact, binned = PixelMetrics(mode="exact"), PixelMetrics(mode="binned")
    for scores, labels in realistic_frames(kind, rng, grow=grow):
        exact.update(scores, labels)
        binned.update(scores, labels)
    want, got = exact.compute(), binned.compute()
    assert got["n_pixels"] == want["n_pixels"] and got["n_anomaly"] == want["n_anomaly"]
    assert abs(got["auroc"] - want["auroc"]) < BINNED_TOL
    assert abs(got["ap"] - want["ap"]) < BINNED_TOL
    assert abs(got["fpr95"] - want["fpr95"]) < BINNED_TOL
    if grow:
        assert binned.n_rebins >= 1


def test_binned_rebinning_merges_counts_exactly() -> None:
    # A narrow first batch, then batches reaching ever further out on both sides.
    rng = np.random.default_rng(21)
    pm = PixelMetrics(mode="binned", n_bins=1024)
    pm.calibration_pixels = 1  # calibrated on the first batch, grown by the later ones
    exact = PixelMetrics(mode="exact")
    seen = []
    for i in range(6):
        labels = (rng.random((64, 64)) < 0.05).astype(np.uint8)
        scores = rng.normal(size=(64, 64)) * 0.1 * 4**i + labels * 0.2 * 4**i + (-1) ** i * 3.0**i
        pm.update(scores, labels)
        exact.update(scores, labels)
        seen.append(scores.ravel())
    assert pm.n_rebins >= 3
    # Every count sits in the bin a direct binning with the final edges would give it: pairs of
    # bins were merged, never split.
    t = pm._transform(np.concatenate(seen))
    idx = np.clip(np.floor((t - pm._lo) / pm._width).astype(np.int64), 0, pm.n_bins - 1)
    np.testing.assert_array_equal(pm._counts.sum(axis=0), np.bincount(idx, minlength=pm.n_bins))
    got, want = pm.compute(), exact.compute()
    assert got["n_pixels"] == 6 * 64 * 64
    assert abs(got["auroc"] - want["auroc"]) < BINNED_TOL


def test_binned_equals_exact_on_discrete_scores() -> None:
    # With fewer distinct scores than bins, every distinct score gets its own bin, so binning
    # loses nothing: the results equal the exact ones.
    rng = np.random.default_rng(22)
    exact, binned = PixelMetrics(mode="exact"), PixelMetrics(mode="binned")
    for _ in range(4):
        labels = (rng.random((2, 40, 40)) < 0.1).astype(np.uint8)
        labels[:, :3] = 255
        scores = rng.integers(0, 30, labels.shape) + 5 * (labels == 1)
        exact.update(scores, labels)
        binned.update(scores, labels)
    assert_metrics_close(binned.compute(), exact.compute(), 1e-12)


def test_binned_constant_scores_then_spread() -> None:
    # A degenerate first update (all scores equal) must still calibrate and then grow.
    pm, exact = PixelMetrics(mode="binned"), PixelMetrics(mode="exact")
    pm.calibration_pixels = 1
    labels = np.zeros((8, 8), np.uint8)
    for m in (pm, exact):
        m.update(np.full((8, 8), 5.0), labels)
    rng = np.random.default_rng(23)
    for _ in range(3):
        lab = (rng.random((32, 32)) < 0.1).astype(np.uint8)
        sc = rng.normal(size=(32, 32)) * 100 + 300.0 * lab
        pm.update(sc, lab)
        exact.update(sc, lab)
    assert pm.n_rebins >= 1
    assert_metrics_close(pm.compute(), exact.compute(), BINNED_TOL)


def test_binned_memory_does_not_grow() -> None:
    rng = np.random.default_rng(24)
    binned, exact = PixelMetrics(mode="binned", n_bins=4096), PixelMetrics(mode="exact")
    binned.calibration_pixels = 1
    sizes_b, sizes_e = [], []
    for i in range(30):
        labels = (rng.random((64, 64)) < 0.02).astype(np.uint8)
        scores = rng.normal(size=(64, 64)) * (1 + i)  # range keeps growing: rebins happen too
        binned.update(scores, labels)
        exact.update(scores, labels)
        sizes_b.append(binned.nbytes)
        sizes_e.append(exact.nbytes)
    assert binned.n_rebins >= 1
    assert set(sizes_b) == {2 * 4096 * 8}
    assert sizes_e[-1] == 30 * sizes_e[0] > sizes_e[0]  # the exact state grows, for contrast


def test_binned_calibration_waits_for_enough_pixels() -> None:
    """Two valid pixels far from every later score must not set the bins' scale (calibrated on
    them, the bulk of the pixels fell into the log tail's coarse bins: AP off by 2e-2)."""
    rng = np.random.default_rng(0)
    first_s, first_y = np.full((64, 64), 1000.0), np.full((64, 64), 255, np.uint8)
    first_y[0, :2] = (0, 1)
    frames = [(first_s, first_y)]
    for _ in range(15):
        y = (rng.random((64, 64)) < 0.05).astype(np.uint8)
        frames.append((rng.normal(size=(64, 64)) + 1.5 * y, y))
    exact, binned = PixelMetrics(mode="exact"), PixelMetrics()
    for s, y in frames:
        exact.update(s, y)
        binned.update(s, y)
    assert binned.nbytes > 2 * binned.n_bins * 8  # 15 frames of 4,096 pixels: held, not binned yet
    assert_metrics_close(binned.compute(), exact.compute(), BINNED_TOL)
    assert binned.nbytes == 2 * binned.n_bins * 8  # calibrated and binned: the fixed state


def test_binned_chunked_update_matches_whole() -> None:
    # Updates are processed in chunks to bound temporaries; a chunk boundary changes nothing,
    # and a bad value in a late chunk still rejects the whole update before any counting.
    rng = np.random.default_rng(25)
    scores, labels = make_frame(rng, (4, 50, 60))
    whole, chunked = PixelMetrics(), PixelMetrics()
    chunked.chunk_pixels = 1000
    whole.update(scores, labels)
    chunked.update(scores, labels)
    assert chunked.compute() == whole.compute()

    bad = labels.copy()
    bad[-1, -1, -1] = 3
    before = chunked.compute()
    with pytest.raises(ValueError, match=r"got 3"):
        chunked.update(scores, bad)
    assert chunked.compute() == before


def test_compute_is_repeatable_and_update_continues() -> None:
    rng = np.random.default_rng(26)
    for mode in ("exact", "binned"):
        pm = PixelMetrics(mode=mode)
        scores, labels = make_frame(rng, (16, 16))
        pm.update(scores, labels)
        first = pm.compute()
        assert pm.compute() == first
        pm.update(scores, labels)  # the same frame again: rates unchanged, counts doubled
        second = pm.compute()
        assert second["n_pixels"] == 2 * first["n_pixels"]
        assert_metrics_close(second, first, 1e-12)
        pm.reset()
        with pytest.raises(ValueError, match=r"both classes"):
            pm.compute()


# --------------------------------------------------------------------------- false positives by class


def test_false_positives_by_class_matches_fpr95_and_counts_each_class() -> None:
    """The overall FPR is fpr_at_tpr's on the same pixels (ties included: float16 maps hold few
    distinct values); each class's count is the hand count of its inliers at or above the
    threshold; streaming in pieces changes nothing; anomalies and void never count as classes."""
    rng = np.random.default_rng(3)
    n_frames, shape = 4, (30, 40)
    labels = rng.choice(np.array([0, 1, 255], dtype=np.uint8), size=(n_frames, *shape), p=[0.8, 0.1, 0.1])
    semantic = rng.integers(0, 5, size=(n_frames, *shape)).astype(np.uint8)  # 4 classes + id 4 = "other"
    scores = rng.random((n_frames, *shape)) * 0.5 + 0.4 * (labels == 1) + 0.2 * (semantic == 2)
    scores = np.round(np.clip(scores, 0, 1) * 50) / 50  # ties
    scores = scores.astype(np.float16)
    fp = FalsePositivesByClass(n_classes=4)
    for i in range(n_frames):
        fp.update(scores[i], labels[i], semantic[i])
    out = fp.compute()
    valid = labels != 255
    s, y = scores[valid].astype(np.float32), labels[valid] == 1
    assert out["fpr"] == fpr_at_tpr(s, y)
    assert out["n_anomaly"] == int(y.sum()) and out["n_inlier"] == int((~y).sum())
    flagged_total = int(((scores >= np.float16(out["threshold"])) & (labels == 0)).sum())
    assert flagged_total == round(out["fpr"] * out["n_inlier"])
    assert (s[y] >= out["threshold"]).mean() >= 0.95 > (s[y] > out["threshold"]).mean()
    by_id = {c["id"]: c for c in out["classes"]}
    assert list(by_id) == [0, 1, 2, 3, "other"]
    for cid, c in by_id.items():
        in_class = (labels == 0) & ((semantic == 4) if cid == "other" else (semantic == cid))
        n_flagged = int((in_class & (scores >= np.float16(out["threshold"]))).sum())
        assert (c["n_inlier"], c["n_flagged"]) == (int(in_class.sum()), n_flagged), cid
        assert c["fpr"] == n_flagged / c["n_inlier"] and c["share"] == n_flagged / flagged_total
    assert max(by_id.values(), key=lambda c: c["fpr"])["id"] == 2  # the class planted high
    whole = FalsePositivesByClass(n_classes=4)
    whole.update(scores, labels, semantic)
    assert whole.compute() == out


def test_false_positives_by_class_rejects_what_it_cannot_count_exactly() -> None:
    fp = FalsePositivesByClass(n_classes=2)
    lab, sem = np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="scores must be float16"):
        fp.update(np.zeros((2, 2), np.float32), lab, sem)
    with pytest.raises(ValueError, match="1 scores are negative or not finite"):
        fp.update(np.array([[0, 0.5], [-0.5, 1]], np.float16), lab, sem)
    with pytest.raises(ValueError, match=r"differ in shape"):
        fp.update(np.zeros((2, 3), np.float16), lab, sem)
    fp.update(np.zeros((2, 2), np.float16), lab, sem)
    with pytest.raises(ValueError, match="both classes are needed"):
        fp.compute()


# --------------------------------------------------------------------------- component-level metrics


def components_by_definition(
    scores: np.ndarray, labels: np.ndarray, threshold: float, min_segment: int, min_instance: int
) -> tuple[list[float], list[float]]:
    """sIoU per ground-truth component and PPV per predicted component, written out with masks
    from the definitions (SegmentMeIfYouCan), components from scipy (not the library's OpenCV)."""
    eight = np.ones((3, 3), dtype=int)
    roi = labels != 255
    pred, n_pred = ndimage.label((scores >= threshold) & roi, eight)
    for j in range(1, n_pred + 1):
        if (pred == j).sum() < min_segment:
            pred[pred == j] = 0
    gt, n_gt = ndimage.label(labels == 1, eight)
    for i in range(1, n_gt + 1):
        if (gt == i).sum() < min_instance:
            roi &= gt != i
    sious = []
    for i in range(1, n_gt + 1):
        k = (gt == i) & roi
        if not k.any():
            continue
        touching = [j for j in np.unique(pred[k]) if j != 0]
        k_hat = np.isin(pred, touching) & roi
        others = (gt > 0) & (gt != i) & roi
        sious.append((k & k_hat).sum() / ((k | k_hat) & ~others).sum())
    ppvs = []
    for j in np.unique(pred[roi]):
        if j == 0:
            continue
        segment = (pred == j) & roi
        ppvs.append((segment & (gt > 0)).sum() / segment.sum())
    return sious, ppvs


def blobs(rng: np.random.Generator, shape: tuple[int, int], fraction: float, smooth: float) -> np.ndarray:
    """A mask of random blobs covering about ``fraction`` of the frame."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
    return field > np.quantile(field, 1.0 - fraction)


def test_component_metrics_follow_the_definition_on_random_frames() -> None:
    rng = np.random.default_rng(0)
    metric = ComponentMetrics(threshold=0.3, min_segment_size=6, min_instance_size=5)
    all_siou, all_ppv = [], []
    for _ in range(12):
        labels = np.where(blobs(rng, (48, 64), 0.15, 2.0), 1, 0).astype(np.uint8)
        labels[blobs(rng, (48, 64), 0.1, 3.0)] = 255
        # scores: noisy anomaly evidence, so predicted blobs overlap, merge and miss objects
        scores = 0.4 * (labels == 1) + ndimage.gaussian_filter(rng.standard_normal((48, 64)), 1.5)
        scores[labels == 255] = np.nan  # void scores are never read
        metric.update(scores.astype(np.float32), labels)
        sious, ppvs = components_by_definition(scores, labels, 0.3, 6, 5)
        all_siou += sious
        all_ppv += ppvs
    out = metric.compute()
    assert out["n_instances"] == len(all_siou) > 20 and out["n_segments"] == len(all_ppv) > 20
    assert out["siou"] == pytest.approx(np.mean(all_siou), abs=1e-12)
    assert out["ppv"] == pytest.approx(np.mean(all_ppv), abs=1e-12)
    assert 0.05 < out["siou"] < 0.95 and 0.05 < out["ppv"] < 0.95, "a case with hits and misses"
    sious, ppvs = np.array(all_siou), np.array(all_ppv)
    for row in out["per_threshold"]:
        t = row["threshold"]
        tp, fn, fp = (sious >= t).sum(), (sious < t).sum(), (ppvs < t).sum()
        assert (row["tp"], row["fn"], row["fp"]) == (tp, fn, fp)
        assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fn + fp))
    assert [r["threshold"] for r in out["per_threshold"]] == pytest.approx(np.linspace(0.25, 0.75, 11))
    assert out["f1_mean"] == pytest.approx(np.mean([r["f1"] for r in out["per_threshold"]]))


def test_component_metrics_hand_cases() -> None:
    # Two objects side by side (10×10 each, a column apart), one predicted blob over both and a
    # 10×5 strip of road beside them: each object's sIoU ignores the other object's pixels.
    labels = np.zeros((30, 40), dtype=np.uint8)
    labels[5:15, 5:15] = 1
    labels[5:15, 16:26] = 1
    scores = np.zeros((30, 40), dtype=np.float32)
    scores[5:15, 5:31] = 1.0  # both objects, the column between them and the strip 26..30
    m = ComponentMetrics(0.5, min_segment_size=0, min_instance_size=0)
    m.update(scores, labels)
    out = m.compute()
    # |k| = 100, the blob's road pixels: the column (10) and the strip (50)
    assert out["siou"] == pytest.approx(100 / (100 + 60))
    assert out["ppv"] == pytest.approx(200 / 260)
    assert (out["n_instances"], out["n_segments"]) == (2, 1)
    # Half an object found, plus a stray blob on the road far away: sIoU 1/2, PPVs 1 and 0.
    labels = np.zeros((30, 40), dtype=np.uint8)
    labels[5:15, 5:15] = 1
    scores = np.zeros((30, 40), dtype=np.float32)
    scores[5:15, 5:10] = 1.0
    scores[20:25, 30:35] = 1.0
    m = ComponentMetrics(0.5, min_segment_size=0, min_instance_size=0)
    m.update(scores, labels)
    out = m.compute()
    assert out["siou"] == pytest.approx(0.5) and out["ppv"] == pytest.approx(0.5)
    by_t = {r["threshold"]: r for r in out["per_threshold"]}
    assert (by_t[0.5]["tp"], by_t[0.5]["fn"], by_t[0.5]["fp"]) == (1, 0, 1)  # sIoU 0.5 ≥ 0.5; PPV 0 < 0.5
    assert (by_t[0.55]["tp"], by_t[0.55]["fn"]) == (0, 1)
    assert by_t[0.5]["f1"] == pytest.approx(2 / 3) and by_t[0.55]["f1"] == 0.0
    # The stray blob (25 px) under min_segment_size disappears; an object under
    # min_instance_size becomes void, so a blob on it counts nowhere.
    labels[20:23, 2:5] = 1  # 9 px
    scores[20:23, 2:5] = 1.0
    m = ComponentMetrics(0.5, min_segment_size=26, min_instance_size=10)
    m.update(scores, labels)
    out = m.compute()
    assert (out["n_instances"], out["n_segments"]) == (1, 1)
    assert out["siou"] == pytest.approx(0.5) and out["ppv"] == pytest.approx(1.0)
    # Void pixels are never predicted: a blob over void and the object keeps only its ROI part.
    labels = np.zeros((30, 40), dtype=np.uint8)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 255
    scores = np.zeros((30, 40), dtype=np.float32)
    scores[5:15, 5:25] = 1.0
    m = ComponentMetrics(0.5, min_segment_size=150, min_instance_size=0)
    m.update(scores[None], labels[None])  # a batch of one frame
    out = m.compute()
    assert out["n_segments"] == 0 and np.isnan(out["ppv"]), "100 px left in the ROI < 150"
    assert out["siou"] == 0.0 and out["f1_mean"] == 0.0


def test_component_metrics_errors_and_atomic_updates() -> None:
    m = ComponentMetrics(0.5, min_segment_size=0, min_instance_size=0)
    with pytest.raises(ValueError, match="no anomaly component"):
        m.compute()
    good = np.zeros((8, 8), dtype=np.uint8)
    good[2:4, 2:4] = 1
    bad = good.copy()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="got 7"):
        m.update(np.zeros((2, 8, 8), dtype=np.float32), np.stack([good, bad]))
    with pytest.raises(ValueError, match="does not match"):
        m.update(np.zeros((8, 9), dtype=np.float32), good)
    nan_scores = np.zeros((8, 8), dtype=np.float32)
    nan_scores[2, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        m.update(nan_scores, good)
    with pytest.raises(ValueError, match="no anomaly component"):
        m.compute()  # nothing of the bad batches was kept
    for kwargs, text in (
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"threshold": 0.5, "min_segment_size": -1}, "min_segment_size"),
        ({"threshold": 0.5, "min_instance_size": 2.5}, "min_instance_size"),
        ({"threshold": 0.5, "siou_thresholds": (0.0, 0.5)}, "siou_thresholds"),
    ):
        with pytest.raises(ValueError, match=text):
            ComponentMetrics(**kwargs)


def test_pixel_f1_threshold_is_the_best_of_every_threshold() -> None:
    rng = np.random.default_rng(1)
    f1 = PixelF1()
    scores, labels = [], []
    for _ in range(3):
        y = (rng.random((40, 50)) < 0.1).astype(np.uint8)
        s = np.clip(rng.normal(0.3 + 0.25 * y, 0.15), 0, 1).astype(np.float16)  # many tied values
        y[rng.random((40, 50)) < 0.05] = 255
        s[y == 255] = np.float16(np.inf)  # void: ignored
        f1.update(s, y)
        scores.append(s[y != 255].astype(np.float64))
        labels.append(y[y != 255])
    s, y = np.concatenate(scores), np.concatenate(labels)
    out = f1.compute()
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1s = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    assert out["f1"] == pytest.approx(f1s.max(), abs=1e-12)
    assert out["threshold"] == thresholds[np.flatnonzero(f1s == f1s.max()).max()]  # the highest best one
    flagged = s >= out["threshold"]
    assert out["precision"] == pytest.approx(y[flagged].mean())
    assert out["recall"] == pytest.approx(flagged[y == 1].mean())
    with pytest.raises(ValueError, match="float16"):
        f1.update(s.astype(np.float32), y)
    with pytest.raises(ValueError, match="both classes"):
        PixelF1().compute()


def test_spearman_matches_scipy_and_is_nan_without_a_warning_for_constant_scores() -> None:
    import warnings

    from scipy.stats import spearmanr

    from densead.evaluation import spearman

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(spearman(np.full(10, 3.0), np.arange(10.0)))


def test_evaluate_columns_refuses_the_in_distribution_set_as_an_anomaly_set() -> None:
    from densead.evaluation import evaluate_columns

    cols = {"set": np.array(["in"] * 4 + ["out"] * 4), "raw": np.arange(8.0)}
    (row,) = evaluate_columns(cols, "in", ["out"], ["raw"])
    assert row.auroc == 1.0 and (row.n_in, row.n_anomaly) == (4, 4)
    with pytest.raises(
        ValueError, match="set 'in' is the in-distribution set and cannot also be an anomaly set"
    ):
        evaluate_columns(cols, "in", ["out", "in"], ["raw"])


# ---------------------------------------------------------------------------
# Bootstrap replicates and intervals
# ---------------------------------------------------------------------------


def tied_scores(
    rng: np.random.Generator, n_in: int, n_out: int, shift: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to one decimal (many ties across the classes) and their labels."""
    s = np.round(np.r_[rng.normal(0, 1, n_in), rng.normal(shift, 1, n_out)], 1)
    return s, np.r_[np.zeros(n_in), np.ones(n_out)]


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Every ``(rows, n)`` draw-count matrix the bootstraps draw, in order."""
    import densead.metrics as metrics

    recorded, real = [], metrics._draw_counts

    def recording(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
        recorded.append(real(rng, n, rows))
        return recorded[-1]

    monkeypatch.setattr(metrics, "_draw_counts", recording)
    return recorded


def test_each_bootstrap_replicate_is_the_metrics_of_its_drawn_samples(draws, monkeypatch) -> None:
    """Replicate r equals image_metrics on the samples drawn for it (ties, samples drawn 0 times,
    chunk boundaries), every replicate keeps each class's size, and both detectors see one draw."""
    monkeypatch.setattr("densead.metrics._BOOTSTRAP_CHUNK", 7 * 90)  # 7 replicates per chunk: 3 chunks
    rng = np.random.default_rng(0)
    s, y = tied_scores(rng, 60, 30, 1.0)
    other = np.round(s + rng.normal(0, 1, s.size), 1)
    reps = bootstrap_metrics({"a": s, "b": other}, y, n_resamples=20, seed=5)
    assert len(draws) == 6 and all(d.shape[1] in (60, 30) for d in draws)
    neg = np.concatenate(draws[0::2])  # per chunk: the inliers' counts, then the anomalies'
    pos = np.concatenate(draws[1::2])
    assert neg.shape == (20, 60) and pos.shape == (20, 30)
    assert (neg.sum(axis=1) == 60).all() and (pos.sum(axis=1) == 30).all()
    assert (neg == 0).any() and (neg > 1).any()
    for r in range(20):
        picked = np.r_[np.repeat(np.arange(60), neg[r]), 60 + np.repeat(np.arange(30), pos[r])]
        for name, scores in (("a", s), ("b", other)):
            want = image_metrics(scores[picked], y[picked])
            for key, value in want.items():
                assert reps[name][key][r] == pytest.approx(value, abs=EXACT_TOL), (name, key, r)


def test_bootstrap_is_paired_seeded_and_rank_based() -> None:
    rng = np.random.default_rng(1)
    s = np.r_[rng.normal(0, 1, 200), rng.normal(1.5, 1, 50)]  # no ties
    y = np.r_[np.zeros(200), np.ones(50)]
    reps = bootstrap_metrics({"a": s, "exp": np.exp(s), "neg": -s}, y, n_resamples=50, seed=3)
    for key in ("auroc", "ap", "fpr95"):  # a monotone transform ranks every draw the same way
        np.testing.assert_array_equal(reps["a"][key], reps["exp"][key])
    np.testing.assert_allclose(reps["neg"]["auroc"], 1.0 - reps["a"]["auroc"], atol=EXACT_TOL)
    again = bootstrap_metrics({"a": s}, y, n_resamples=50, seed=3)
    np.testing.assert_array_equal(again["a"]["auroc"], reps["a"]["auroc"])
    other_seed = bootstrap_metrics({"a": s}, y, n_resamples=50, seed=4)
    assert not np.array_equal(other_seed["a"]["auroc"], reps["a"]["auroc"])
    assert np.unique(reps["a"]["auroc"]).size > 40  # the draws differ from one another


def test_bootstrap_interval_covers_the_population_auroc() -> None:
    """Two Gaussians one standard deviation apart: AUROC = Φ(1/√2) = 0.7602. The 95% intervals of
    40 independent samples (100 inliers, 100 anomalies) should contain it about 38 times (binomial,
    sd 1.4; these seeds: 39), and be about 3.92 σ wide, σ ≈ 0.034 by Hanley and McNeil's formula:
    0.133 (these seeds: median 0.129)."""
    truth = 0.5 * (1.0 + math.erf(0.5))
    covered, widths = 0, []
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        s = np.r_[rng.normal(0, 1, 100), rng.normal(1, 1, 100)]
        y = np.r_[np.zeros(100), np.ones(100)]
        lo, hi = percentile_interval(bootstrap_metrics({"d": s}, y, 400, seed=seed)["d"]["auroc"])
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert 36 <= covered <= 40
    assert 0.10 < np.median(widths) < 0.16


def test_percentile_interval_and_bootstrap_errors() -> None:
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1.0"):
        percentile_interval([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        percentile_interval([], 0.9)
    with pytest.raises(ValueError, match="1 of 3 replicates are NaN: no interval"):
        percentile_interval([0.5, np.nan, 0.7])
    s, y = np.arange(6.0), np.r_[np.zeros(3), np.ones(3)]
    with pytest.raises(ValueError, match="n_resamples must be a whole number >= 1, got 0"):
        bootstrap_metrics({"a": s}, y, n_resamples=0)
    with pytest.raises(ValueError, match="no detector scores"):
        bootstrap_metrics({}, y)
    with pytest.raises(ValueError, match=r"detector 'b': 1 of 6 scores are non-finite"):
        bootstrap_metrics({"a": s, "b": np.r_[s[:5], np.nan]}, y)


def test_detector_differences_come_from_paired_resamples() -> None:
    """A detector ranking the images as the baseline does differs by exactly 0 in every resample;
    a clearly better one gets an interval above 0 (bold in the table), and the interval of every
    difference is that of the per-resample differences, not of two separate intervals."""
    from densead.evaluation import Bootstrap, compare_detectors, differences_markdown, evaluate_columns

    rng = np.random.default_rng(2)
    base = np.r_[rng.normal(0, 1, 300), rng.normal(0.5, 1, 100), rng.normal(0.3, 1, 80)]
    cols = {
        "set": np.array(["in"] * 300 + ["a"] * 100 + ["b"] * 80),
        "raw": base,
        "rescaled": 3 * base + 1,
        "better": base + np.r_[np.zeros(300), np.full(180, 1.5)],
    }
    boot = Bootstrap(300, 0.9, seed=7)
    diffs = compare_detectors(cols, "in", ["a", "b"], ["raw", "rescaled", "better"], "raw", boot)
    assert len(diffs) == 2 * 2 * 3
    by = {(d.detector, d.set_name, d.metric): d for d in diffs}
    rows = {
        (r.detector, r.anomaly_set): r
        for r in evaluate_columns(cols, "in", ["a", "b"], ["raw", "better"], boot)
    }
    for s in ("a", "b"):
        for m in ("auroc", "ap", "fpr95"):
            assert (
                by[("rescaled", s, m)].difference,
                by[("rescaled", s, m)].lo,
                by[("rescaled", s, m)].hi,
            ) == (0, 0, 0)
            d = by[("better", s, m)]
            assert d.difference == pytest.approx(
                getattr(rows[("better", s)], m) - getattr(rows[("raw", s)], m)
            )
            assert (d.lo > 0) if m != "fpr95" else (d.hi < 0), (s, m)
            assert d.lo <= d.difference <= d.hi
            r = rows[("better", s)]
            assert getattr(r, f"{m}_lo") <= getattr(r, m) <= getattr(r, f"{m}_hi")
    # The paired interval of the AUROC gain is narrower than the gap between two separate intervals
    # would suggest: the two detectors' resampling noise is shared.
    separate = (rows[("better", "a")].auroc_hi - rows[("better", "a")].auroc_lo) + (
        rows[("raw", "a")].auroc_hi - rows[("raw", "a")].auroc_lo
    )
    assert by[("better", "a", "auroc")].hi - by[("better", "a", "auroc")].lo < 0.5 * separate
    table = differences_markdown(diffs, boot)
    assert "detector − raw" in table and "90% bootstrap interval, 300 resamples" in table
    assert "| rescaled | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |" in table
    assert table.count("| better | **") == 3
    with pytest.raises(KeyError, match="baseline detector 'nope' is not among the detectors"):
        compare_detectors(cols, "in", ["a"], ["raw"], "nope", boot)
    with pytest.raises(ValueError, match="n_resamples must be a whole number >= 1, got 0"):
        Bootstrap(0)


def road_frames(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` float16 maps in [0, 1] of two detectors and their labels: a blob of anomaly pixels in
    about half the frames, void borders, scores coarse enough to tie across frames."""
    labels = np.zeros((n, 12, 16), np.uint8)
    labels[:, :, :2] = 255  # void
    for f in range(0, n, 2):
        r, c = rng.integers(0, 8), rng.integers(2, 12)
        labels[f, r : r + 4, c : c + 4] = 1
    base = rng.random((n, 12, 16)) + 0.8 * (labels == 1)
    a = np.round(np.clip(base / 1.8, 0, 1), 2).astype(np.float16)
    b = np.clip(base / 1.8 + rng.normal(0, 0.2, base.shape), 0, 1).astype(np.float16)
    return a, b, labels


def test_each_frame_bootstrap_replicate_is_the_exact_metrics_of_its_drawn_frames(draws) -> None:
    a, b, labels = road_frames(np.random.default_rng(0), 9)
    hist = {"a": FrameHistograms(), "b": FrameHistograms()}
    for f in range(9):  # one frame per update for a, a batch of frames for b
        hist["a"].update(a[f], labels[f])
    hist["b"].update(b[:4], labels[:4])
    hist["b"].update(b[4:], labels[4:])
    reps = bootstrap_frame_metrics(hist, n_resamples=12, seed=3)
    assert len(draws) == 2  # frames with anomalies (0, 2, 4, 6, 8), then the others
    with_anomaly, without = draws
    assert with_anomaly.shape == (12, 5) and without.shape == (12, 4)
    assert (with_anomaly.sum(axis=1) == 5).all() and (without.sum(axis=1) == 4).all()
    for r in range(12):
        picked = np.r_[np.repeat([0, 2, 4, 6, 8], with_anomaly[r]), np.repeat([1, 3, 5, 7], without[r])]
        for name, maps in (("a", a), ("b", b)):
            exact = PixelMetrics("exact")
            exact.update(maps[picked].astype(np.float32), labels[picked])
            want = exact.compute()
            for key in ("auroc", "ap", "fpr95"):
                assert reps[name][key][r] == pytest.approx(want[key], abs=EXACT_TOL), (name, key, r)


def test_frame_bootstrap_errors() -> None:
    a, b, labels = road_frames(np.random.default_rng(1), 4)
    one, other = FrameHistograms(), FrameHistograms()
    one.update(a, labels)
    other.update(b[:3], labels[:3])
    with pytest.raises(
        ValueError, match=r"detectors 'one' and 'other' were given different frames \(4 and 3\)"
    ):
        bootstrap_frame_metrics({"one": one, "other": other})
    shifted = FrameHistograms()  # as many frames, but others have the anomalies
    shifted.update(a[[1, 0, 3, 2]], labels[[1, 0, 3, 2]])
    with pytest.raises(ValueError, match="their frames with anomaly or inlier pixels differ"):
        bootstrap_frame_metrics({"one": one, "shifted": shifted})
    inliers_only = FrameHistograms()
    inliers_only.update(a[1::2], labels[1::2])
    with pytest.raises(ValueError, match="of 2 frames, 0 have anomaly pixels and 2 inlier pixels"):
        bootstrap_frame_metrics({"x": inliers_only})
    with pytest.raises(ValueError, match="float16"):
        one.update(a.astype(np.float32), labels)
    bad = labels.copy()
    bad[0, 0, 5] = 7
    with pytest.raises(
        ValueError, match=r"label_map values must be 0 \(inlier\), 1 \(anomaly\) or 255 \(void\)"
    ):
        one.update(a, bad)
    assert one.n_frames == 4  # the refused updates added nothing


def test_frame_bootstrap_draws_frames_within_their_group_so_every_replicate_has_both_classes(draws) -> None:
    """A frame of anomaly pixels only, a frame of inliers only, a frame with both and an all-void
    frame: each is its own group, so no replicate lacks a class (drawn freely, one in sixteen would
    have no inlier pixel, and its AUROC would be NaN)."""
    labels = np.zeros((4, 6, 6), np.uint8)
    labels[0] = 1  # anomalies only
    labels[2, :3] = 1  # both
    labels[3] = 255  # void only
    maps = np.random.default_rng(3).random((4, 6, 6)).astype(np.float16)
    hist = FrameHistograms()
    hist.update(maps, labels)
    np.testing.assert_array_equal(hist.frame_classes(), [[1, 0], [0, 1], [1, 1], [0, 0]])
    # 6 bytes per non-empty bin of a frame and class (16-bit bin, 32-bit count); void takes none
    distinct = sum(np.unique(maps[f][labels[f] == c]).size for f in range(4) for c in (0, 1))
    assert hist.nbytes() == 6 * distinct and distinct > 0
    reps = bootstrap_frame_metrics({"d": hist}, n_resamples=50, seed=0)
    assert [d.shape for d in draws] == [(50, 1)] * 4  # both, anomalies only, inliers only, neither
    assert all(np.isfinite(reps["d"][k]).all() for k in ("auroc", "ap", "fpr95"))
    assert np.ptp(reps["d"]["auroc"]) == 0  # one frame per group: every replicate is the whole set


def component_frames(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``n`` frames of random anomaly blobs (none in frames 1 and 5), void patches, and the maps of
    two noisy detectors and of one that flags only frame 0's anomalies."""
    labels = np.zeros((n, 48, 64), np.uint8)
    for f in range(n):
        if f not in (1, 5):
            labels[f][blobs(rng, (48, 64), 0.12, 2.0)] = 1
        labels[f][blobs(rng, (48, 64), 0.08, 3.0)] = 255
    evidence = 0.5 * (labels == 1)
    maps = {
        name: evidence + ndimage.gaussian_filter(rng.standard_normal(labels.shape), (0, sigma, sigma))
        for name, sigma in (("a", 1.5), ("b", 2.5))
    }
    maps["sparse"] = np.zeros(labels.shape)
    maps["sparse"][0] = labels[0] == 1
    return {k: v.astype(np.float32) for k, v in maps.items()}, labels


def test_each_component_bootstrap_replicate_is_the_component_metrics_of_its_drawn_frames(draws) -> None:
    """Replicate r equals ComponentMetrics.compute on the frames drawn for it (sIoU, PPV, mean F1;
    a NaN PPV where no drawn frame has a predicted segment), each group keeps its size, and all
    detectors see one draw."""
    maps, labels = component_frames(np.random.default_rng(0), 8)
    settings = {"threshold": 0.35, "min_segment_size": 6, "min_instance_size": 5}
    metrics = {name: ComponentMetrics(**settings) for name in maps}
    for f in range(8):  # one frame per update for a, batches of frames for the others
        metrics["a"].update(maps["a"][f], labels[f])
    for name in ("b", "sparse"):
        metrics[name].update(maps[name][:3], labels[:3])
        metrics[name].update(maps[name][3:], labels[3:])
    assert metrics["a"].n_frames == 8
    reps = bootstrap_component_metrics(metrics, n_resamples=20, seed=4)
    with_instances, without = draws
    assert with_instances.shape == (20, 6) and without.shape == (20, 2)
    assert (with_instances.sum(axis=1) == 6).all() and (without.sum(axis=1) == 2).all()
    for r in range(20):
        picked = np.r_[np.repeat([0, 2, 3, 4, 6, 7], with_instances[r]), np.repeat([1, 5], without[r])]
        for name, m in maps.items():
            want = ComponentMetrics(**settings)
            want.update(m[picked], labels[picked])
            out = want.compute()
            for key in ("siou", "ppv", "f1_mean"):
                assert reps[name][key][r] == pytest.approx(out[key], abs=EXACT_TOL, nan_ok=True), (
                    name,
                    key,
                    r,
                )
    # the sparse detector's only segments are in frame 0: the resamples without it have no PPV
    missed = with_instances[:, 0] == 0
    assert missed.any() and not missed.all()
    assert np.isnan(reps["sparse"]["ppv"][missed]).all() and np.isfinite(reps["sparse"]["ppv"][~missed]).all()
    assert all(np.isfinite(reps[n][k]).all() for n in ("a", "b") for k in ("siou", "ppv", "f1_mean"))
    assert np.ptp(reps["a"]["siou"]) > 0  # the frames differ, so do the replicates


def test_component_bootstrap_errors() -> None:
    maps, labels = component_frames(np.random.default_rng(1), 6)
    one, fewer, small = (ComponentMetrics(0.35, 6, 5) for _ in range(3))
    one.update(maps["a"], labels)
    fewer.update(maps["b"][:5], labels[:5])
    with pytest.raises(
        ValueError, match=r"detectors 'one' and 'fewer' were given different frames.*\(6 and 5"
    ):
        bootstrap_component_metrics({"one": one, "fewer": fewer})
    other_thresholds = ComponentMetrics(0.35, 6, 5, siou_thresholds=(0.5,))
    other_thresholds.update(maps["b"], labels)
    with pytest.raises(ValueError, match="different frames, instances or sIoU thresholds"):
        bootstrap_component_metrics({"one": one, "other": other_thresholds})
    as_many = ComponentMetrics(
        0.35, 6, 5, siou_thresholds=tuple(round(0.26 + 0.05 * i, 2) for i in range(11))
    )
    as_many.update(maps["b"], labels)  # as many thresholds as one's, at other values
    with pytest.raises(ValueError, match="different frames, instances or sIoU thresholds"):
        bootstrap_component_metrics({"one": one, "as_many": as_many})
    small.update(maps["a"][[1, 5]], labels[[1, 5]])  # the two frames without anomalies
    with pytest.raises(ValueError, match="no anomaly instance in the 2 frames"):
        bootstrap_component_metrics({"small": small})
    with pytest.raises(ValueError, match="n_resamples must be a whole number >= 1, got 0"):
        bootstrap_component_metrics({"one": one}, n_resamples=0)
    with pytest.raises(ValueError, match="no detector"):
        bootstrap_component_metrics({})


def test_an_undefined_ppv_interval_is_shown_as_such_and_other_nan_replicates_are_refused() -> None:
    """intervals(): a PPV with NaN replicates (resamples without a predicted segment) gets NaN
    bounds, as its differences do, and the tables show [—]; NaN replicates of sIoU are an error."""
    from densead.dense_scoring import ComponentMetricRow, component_metrics_markdown
    from densead.evaluation import COMPONENT_METRICS, Bootstrap, intervals

    boot = Bootstrap(100)
    rng = np.random.default_rng(0)
    reps = {d: {m: rng.uniform(0.2, 0.4, 100) for m in COMPONENT_METRICS} for d in ("base", "sparse")}
    reps["sparse"]["ppv"][[3, 50]] = np.nan
    points = {d: {m: 0.3 for m in COMPONENT_METRICS} for d in reps}
    bounds, diffs = intervals(reps, points, boot, "base", "s", COMPONENT_METRICS, may_be_undefined=("ppv",))
    assert math.isnan(bounds["sparse"]["ppv_lo"]) and math.isnan(bounds["sparse"]["ppv_hi"])
    assert 0.2 <= bounds["sparse"]["siou_lo"] < bounds["sparse"]["siou_hi"] <= 0.4
    assert 0.2 <= bounds["base"]["ppv_lo"] < bounds["base"]["ppv_hi"] <= 0.4
    by = {d.metric: d for d in diffs}
    assert math.isnan(by["ppv"].lo) and by["siou"].lo < 0 < by["siou"].hi
    counts = dict(n_instances=4, n_segments=2, min_segment_size=0, min_instance_size=0)
    rows = [
        ComponentMetricRow("s", d, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, **counts, **bounds[d])
        for d in ("base", "sparse")
    ]
    table = component_metrics_markdown(rows, diffs, boot)
    assert "| sparse | 0.5 | 40.00 | 30.00 [" in table and "| 30.00 [—] | 30.00 [" in table
    assert "**PPV %, detector − base**" in table and "| sparse | +0.00 [—] |" in table
    assert "[—]: undefined in some resamples" in table
    reps["sparse"]["siou"][0] = np.nan
    with pytest.raises(ValueError, match="1 of 100 replicates are NaN"):
        intervals(reps, points, boot, None, "s", COMPONENT_METRICS, may_be_undefined=("ppv",))
