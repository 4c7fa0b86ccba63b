"""Anomaly-detection metrics: AUROC, average precision and FPR at 95 % TPR.

Convention everywhere: a **higher score means more anomalous**, anomalies are
the positive class (label 1), inliers are label 0, and in pixel label maps the
value 255 marks void pixels that are ignored.

Image-level metrics (:func:`auroc`, :func:`average_precision`,
:func:`fpr_at_tpr`, :func:`image_metrics`, :func:`roc_curve`) sort all scores
and are exact; they agree with scikit-learn to rounding error. Tied scores form
a single threshold step, as in scikit-learn, so a tie between an inlier and an
anomaly earns half credit in AUROC rather than depending on the sort order.

Pixel-level metrics (:class:`PixelMetrics`) are streamed over frames. Mode
``"exact"`` keeps every (score, label) pair and matches scikit-learn; mode
``"binned"`` keeps two fixed-size histograms and uses constant memory whatever
the number of frames (see the class docstring for how the bins are chosen).
:class:`FalsePositivesByClass` says which in-distribution classes a pixel
detector's false alarms at 95 % TPR come from.

Component-level metrics (SegmentMeIfYouCan, Chan et al., NeurIPS 2021 datasets
track): :class:`PixelF1` finds the threshold with the best pixel F1 on float16
maps, :class:`ComponentMetrics` thresholds each frame there and scores connected
components: sIoU per ground-truth component, PPV per predicted component, F1 of
component detection averaged over sIoU/PPV thresholds 0.25, 0.30, …, 0.75.

Bootstrap intervals: :func:`bootstrap_metrics` resamples images (stratified by class),
:func:`bootstrap_frame_metrics` and :func:`bootstrap_component_metrics` resample whole frames;
each uses one draw for every detector, so differences between detectors get paired intervals
(:func:`percentile_interval`).

Scores must be finite: NaN or ±inf have no well-defined rank, so every entry
point raises ``ValueError`` with the number of offending values and leaves the
choice of a replacement to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

__all__ = [
    "SIOU_THRESHOLDS",
    "ComponentMetrics",
    "FalsePositivesByClass",
    "FrameHistograms",
    "PixelF1",
    "PixelMetrics",
    "auroc",
    "average_precision",
    "bootstrap_component_metrics",
    "bootstrap_frame_metrics",
    "bootstrap_metrics",
    "fpr_at_tpr",
    "image_metrics",
    "percentile_interval",
    "roc_curve",
]

VOID_LABEL = 255
_LABEL_KINDS = "biuf"  # bool, signed, unsigned, float: the dtypes a 0/1/255 label can come in


# ---------------------------------------------------------------------------
# Input checking shared by the image-level and the pixel-level metrics
# ---------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor or array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_score_dtype(s: np.ndarray) -> None:
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")


def _check_label_dtype(y: np.ndarray) -> None:
    if y.dtype.kind not in _LABEL_KINDS:
        raise ValueError(f"labels must be numeric (0/1), got dtype {y.dtype}")


def _bad_values_text(values: np.ndarray, limit: int = 5) -> str:
    """The first few distinct offending values, for error messages."""
    uniq = np.unique(values)
    shown = ", ".join(repr(v.item()) for v in uniq[:limit])
    return shown + (f", ... ({uniq.size} distinct)" if uniq.size > limit else "")


def _raise_if_non_finite(s: np.ndarray, what: str) -> None:
    n_bad = int(s.size - np.count_nonzero(np.isfinite(s)))
    if n_bad:
        raise ValueError(
            f"{n_bad} of {s.size} {what} are non-finite (nan or ±inf); "
            "replace them before computing metrics (e.g. np.nan_to_num with a large finite value)"
        )


def _map_inputs(score_map: Any, label_map: Any) -> tuple[np.ndarray, np.ndarray]:
    """A score map and its label map, ``(H, W)`` or ``(B, H, W)``, as numpy, shapes and dtypes checked."""
    s, y = _to_numpy(score_map), _to_numpy(label_map)
    if s.shape != y.shape:
        raise ValueError(f"score_map shape {s.shape} does not match label_map shape {y.shape}")
    if s.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (B, H, W) maps, got shape {s.shape}")
    _check_score_dtype(s)
    _check_label_dtype(y)
    return s, y


def _binary_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D float64 scores and boolean labels (True = anomaly)."""
    s = _to_numpy(scores)
    y = _to_numpy(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} scores, {y.shape[0]} labels")
    _check_score_dtype(s)
    _check_label_dtype(y)
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(f"labels must be 0 (inlier) or 1 (anomaly), got {_bad_values_text(y[bad])}")
    s = s.astype(np.float64, copy=False)
    _raise_if_non_finite(s, "scores")
    y = y.astype(bool, copy=False)
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"both classes are needed: got {n_pos} anomalies (label 1) and {y.size - n_pos} inliers (label 0)"
        )
    return s, y


# ---------------------------------------------------------------------------
# The threshold sweep and the three summary numbers
# ---------------------------------------------------------------------------


def _cumulative_counts(
    s: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """True/false positives at each distinct threshold, from the highest score down.

    Entry ``k`` counts the samples with a score >= the k-th highest distinct
    score; all samples sharing a score enter at the same step, so the result
    does not depend on how the sort orders ties. ``weights`` ``(R, N)``, whole
    numbers (how often each sample is drawn), give ``(R, T)`` counts, one row per
    weighting: the counts of the resampled sets, from one sort.
    """
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    # Index of the last sample of every run of equal scores.
    ends = np.append(np.flatnonzero(np.diff(s_sorted)), s.size - 1)
    if weights is None:
        tp = np.cumsum(y[order], dtype=np.int64)[ends]
        return tp, (ends + 1) - tp
    w = weights[:, order]
    tp = np.cumsum(w * y[order], axis=1)[:, ends]
    return tp, np.cumsum(w, axis=1)[:, ends] - tp


# The summaries below take counts of one sweep (T,) or of many (R, T), along the last axis.


def _tpr_fpr(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points with the (0, 0) start (threshold above every score) prepended."""
    start = np.zeros(tp.shape[:-1] + (1,))
    fpr = np.concatenate((start, fp / fp[..., -1:]), axis=-1)
    tpr = np.concatenate((start, tp / tp[..., -1:]), axis=-1)
    return fpr, tpr


def _auroc(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    # Trapezoid rule on the counts, normalised once at the end: sums of whole numbers are exact
    # in float64 (below 2**53), so perfect separation gives exactly 1.0 instead of a sum of
    # rounded FPR steps. float64 rather than int64 so huge pixel counts cannot overflow.
    tp = tp.astype(np.float64)
    fp = fp.astype(np.float64)
    d_fp = np.diff(fp, axis=-1, prepend=0.0)
    tp_prev = np.concatenate((np.zeros(tp.shape[:-1] + (1,)), tp[..., :-1]), axis=-1)
    return np.sum(d_fp * (tp + tp_prev), axis=-1) / (2.0 * tp[..., -1] * fp[..., -1])


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    # Step-wise AP as scikit-learn defines it: sum over thresholds of
    # (recall gained at this threshold) x (precision at this threshold), no interpolation.
    # Dividing by the anomaly count once at the end keeps a perfect ranking at exactly 1.0.
    # A threshold no sample reaches (weight 0 in a resample) gains no recall: precision 0 there.
    flagged = (tp + fp).astype(np.float64)
    precision = np.divide(tp, flagged, out=np.zeros_like(flagged), where=flagged > 0)
    tp_gain = np.diff(tp, axis=-1, prepend=0).astype(np.float64)
    return np.sum(tp_gain * precision, axis=-1) / tp[..., -1]


def _fpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> np.ndarray:
    # tpr is non-decreasing, so the first point reaching the target is the highest
    # threshold reaching it and has the lowest FPR among all such points. The sweep
    # ends with every sample flagged (tpr = fpr = 1), so any target <= 1 is reached;
    # "not reached before flagging everything" therefore reports 1.0.
    idx = np.argmax(tpr >= target, axis=-1)
    return np.take_along_axis(fpr, np.expand_dims(idx, -1), axis=-1)[..., 0]


def _check_tpr(tpr: float) -> float:
    tpr = float(tpr)
    if not 0.0 <= tpr <= 1.0:
        raise ValueError(f"tpr must be in [0, 1], got {tpr}")
    return tpr


def _summary(tp: np.ndarray, fp: np.ndarray, tpr_target: float = 0.95) -> dict[str, Any]:
    """AUROC, AP and FPR at ``tpr_target``: floats from counts ``(T,)``, ``(R,)`` arrays from ``(R, T)``."""
    fpr, tpr = _tpr_fpr(tp, fp)
    out = {
        "auroc": _auroc(tp, fp),
        "ap": _average_precision(tp, fp),
        "fpr95": _fpr_at(fpr, tpr, tpr_target),
    }
    return {k: float(v) for k, v in out.items()} if tp.ndim == 1 else out


# ---------------------------------------------------------------------------
# Image-level (exact) metrics
# ---------------------------------------------------------------------------


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC points at every distinct score threshold.

    Args:
        scores: 1-D anomaly scores (numpy, torch or array-like), finite; higher = more anomalous.
        labels: 1-D labels of the same length, 1 = anomaly, 0 = inlier.

    Returns:
        ``(fpr, tpr)``: float64 arrays, non-decreasing, starting at ``(0, 0)``
        (threshold above every score) and ending at ``(1, 1)``. Same points as
        ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.

    Raises:
        ValueError: on non-finite scores, labels other than 0/1, a length
            mismatch, or a missing class.
    """
    s, y = _binary_inputs(scores, labels)
    return _tpr_fpr(*_cumulative_counts(s, y))


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (ties count half).

    Args:
        scores: 1-D anomaly scores, finite; higher = more anomalous.
        labels: 1-D labels, 1 = anomaly, 0 = inlier.

    Returns:
        AUROC in [0, 1]; equals ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Raises:
        ValueError: see :func:`roc_curve`.
    """
    s, y = _binary_inputs(scores, labels)
    return float(_auroc(*_cumulative_counts(s, y)))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision with anomalies as the positive class.

    Step-wise (no interpolation): ``sum_k (R_k - R_{k-1}) * P_k`` over the
    distinct thresholds, exactly as ``sklearn.metrics.average_precision_score``.

    Args:
        scores: 1-D anomaly scores, finite; higher = more anomalous.
        labels: 1-D labels, 1 = anomaly, 0 = inlier.

    Returns:
        AP in (0, 1]; a random detector scores about the anomaly prevalence.

    Raises:
        ValueError: see :func:`roc_curve`.
    """
    s, y = _binary_inputs(scores, labels)
    return float(_average_precision(*_cumulative_counts(s, y)))


def fpr_at_tpr(scores: Any, labels: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose TPR reaches ``tpr``.

    Thresholds are swept from the highest score down; the answer is the FPR at
    the highest threshold with ``TPR >= tpr``, which is the lowest FPR among all
    operating points with ``TPR >= tpr``. The sweep ends with every sample
    flagged (TPR = FPR = 1), so when the target is reached only there — e.g.
    an anomaly scored below every inlier with fewer than 20 anomalies — the
    result is 1.0.

    Args:
        scores: 1-D anomaly scores, finite; higher = more anomalous.
        labels: 1-D labels, 1 = anomaly, 0 = inlier.
        tpr: target true-positive rate in [0, 1].

    Returns:
        The FPR in [0, 1].

    Raises:
        ValueError: see :func:`roc_curve`; also when ``tpr`` is outside [0, 1].
    """
    target = _check_tpr(tpr)
    return float(_fpr_at(*roc_curve(scores, labels), target))


def image_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """AUROC, AP and FPR at 95 % TPR from one sort.

    Args:
        scores: 1-D anomaly scores, finite; higher = more anomalous.
        labels: 1-D labels, 1 = anomaly, 0 = inlier.

    Returns:
        ``{"auroc": ..., "ap": ..., "fpr95": ...}``.

    Raises:
        ValueError: see :func:`roc_curve`.
    """
    s, y = _binary_inputs(scores, labels)
    return _summary(*_cumulative_counts(s, y))


# Elements of the (resamples x samples) weight matrices one chunk of resamples may hold.
_BOOTSTRAP_CHUNK = 4_000_000


def _draw_counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """``(rows, n)`` counts: how often each of ``n`` samples is drawn in ``n`` draws with replacement."""
    idx = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)


def _stratified_counts(
    rng: np.random.Generator, groups: Sequence[np.ndarray], n: int, rows: int
) -> np.ndarray:
    """``(rows, n)`` draw counts of ``n`` samples, each group of sample indices resampled with
    replacement within itself (keeping its size), the groups in order; empty groups are skipped."""
    weights = np.zeros((rows, n))
    for members in groups:
        if members.size:
            weights[:, members] = _draw_counts(rng, members.size, rows)
    return weights


def _check_resamples(n_resamples: int, who: str) -> int:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"{who}: n_resamples must be a whole number >= 1, got {n_resamples}")
    return int(n_resamples)


def bootstrap_metrics(
    scores: Mapping[str, Any], labels: Any, n_resamples: int = 1000, seed: int | Sequence[int] = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap replicates of AUROC, AP and FPR at 95 % TPR, paired over detectors.

    Each replicate draws the inliers and the anomalies with replacement, each
    class keeping its size (a stratified bootstrap: every replicate has both
    classes and the anomaly prevalence of the data), and scores every detector
    on that same draw, so a difference between two detectors can be read
    replicate by replicate (:func:`percentile_interval` of the differences).
    Replicate ``r`` equals :func:`image_metrics` on the drawn samples (tested),
    computed with the draw counts as weights on each detector's sorted scores (one sort per
    chunk of about 4 million samples × resamples).

    Args:
        scores: detector name -> 1-D scores of the same samples (finite; higher = more anomalous).
        labels: 1-D labels of those samples, 1 = anomaly, 0 = inlier.
        n_resamples: number of replicates (at least 1).
        seed: seed of the draws (``numpy.random.default_rng``'s); the same seed, the same replicates.

    Returns:
        ``{detector: {"auroc": (R,), "ap": (R,), "fpr95": (R,)}}``, float64.

    Raises:
        ValueError: no detector, ``n_resamples`` < 1, or what :func:`image_metrics` refuses
            (named with the detector).
    """
    if not scores:
        raise ValueError("bootstrap_metrics: no detector scores given")
    n_resamples = _check_resamples(n_resamples, "bootstrap_metrics")
    checked = {}
    for name, values in scores.items():
        try:
            checked[name] = _binary_inputs(values, labels)
        except ValueError as err:
            raise ValueError(f"detector {name!r}: {err}") from None
    y = next(iter(checked.values()))[1]
    groups = (np.flatnonzero(~y), np.flatnonzero(y))
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK // y.size)
    parts: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in checked}
    for start in range(0, n_resamples, chunk):
        weights = _stratified_counts(rng, groups, y.size, min(chunk, n_resamples - start))
        for name, (s, _) in checked.items():
            parts[name].append(_summary(*_cumulative_counts(s, y, weights)))
    return {
        name: {k: np.concatenate([p[k] for p in chunks]) for k in ("auroc", "ap", "fpr95")}
        for name, chunks in parts.items()
    }


def percentile_interval(replicates: Any, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap replicates (percentile method)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    r = np.asarray(replicates, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"replicates must be a non-empty 1-D array, got shape {r.shape}")
    if np.isnan(r).any():
        raise ValueError(f"{int(np.isnan(r).sum())} of {r.size} replicates are NaN: no interval")
    lo, hi = np.quantile(r, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------
# Streaming pixel-level metrics
# ---------------------------------------------------------------------------


class PixelMetrics:
    """Pixel-level AUROC / AP / FPR95 accumulated over many frames.

    Call :meth:`update` once per frame or batch, then :meth:`compute`.

    Mode ``"exact"`` stores every valid (score, label) pair and gives exactly
    the scikit-learn numbers; its memory grows with the pixel count, so it is
    meant for small sets and for checking.

    Mode ``"binned"`` stores two ``int64`` histograms of ``n_bins`` bins (inlier
    and anomaly counts), so memory is fixed whatever the number of frames
    (2 x 8 x 65536 bytes = 1 MiB by default) and each update only needs temporaries
    for a bounded chunk of pixels. Scores in one bin are treated as tied:
    AUROC is the trapezoid over the binned ROC, AP is step-wise over bins and
    FPR95 comes from the cumulative counts.

    How bins are placed. Only the ranking of scores matters, so the
    histogram is laid on a monotone transform ``t = sign(z) log(1 + |z|)``
    of ``z = (s - c) / w``, with centre ``c`` (median) and width ``w``
    (robust spread) calibrated on the first valid pixels seen (at least
    :attr:`calibration_pixels` of them: smaller first frames wait, exactly, until enough have
    come, so a tiny or unusual first frame cannot set the scale). Near ``c`` the transform is
    linear; far from it it is logarithmic, so a few extreme scores (heavy-tailed log-likelihoods in
    the thousands) cannot squeeze the bulk of the pixels into a handful of
    bins. The bin range in ``t`` starts at the first update's span; when a
    later score falls outside, the range is doubled (repeatedly if needed):
    pairs of old bins merge into one new bin, with the old range placed at an
    even bin offset inside the new one, so every new bin edge is an old edge and
    no count is ever split. Each doubling is counted in :attr:`n_rebins`.

    Accuracy. The default ``n_bins`` keeps AUROC and AP within about 1e-4 to
    3e-4 of exact on Gaussian and heavy-tailed score mixtures, even when the
    range grows several-fold after calibration (tests/test_metrics.py); with
    4096 bins the AP error of such a growing stream reached 4e-3, too close to
    the 5e-3 budget. AP is the sensitive one: it hinges on the few highest
    scores, where one bin may hold both an inlier and an anomaly. FPR95 keeps
    the same budget on those streams, but it is read at a bin edge: scores that
    pile many inliers into the bin where the TPR reaches 95 % move it further
    (2.4e-2 on a contrived spiky mixture). Use ``"exact"`` where it must be exact.

    Args:
        mode: ``"binned"`` (default) or ``"exact"``.
        n_bins: number of histogram bins in binned mode; even, >= 2.
    """

    #: Pixels processed per step in binned mode: bounds the float64/int64 temporaries
    #: of one update to a few hundred MB whatever the batch size.
    chunk_pixels: int = 1 << 22
    #: Valid pixels the binned mode holds exactly before it calibrates its bins on them.
    calibration_pixels: int = 1 << 16

    def __init__(self, mode: str = "binned", n_bins: int = 65536) -> None:
        if mode not in ("binned", "exact"):
            raise ValueError(f"mode must be 'binned' or 'exact', got {mode!r}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
            raise ValueError(f"n_bins must be an int, got {type(n_bins).__name__}")
        if n_bins < 2 or n_bins % 2:
            # Even so that doubling the range merges bins in exact pairs.
            raise ValueError(f"n_bins must be even and >= 2, got {n_bins}")
        self.mode = mode
        self.n_bins = int(n_bins)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far (the calibration too)."""
        self.n_rebins = 0
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        # Row 0: inlier counts, row 1: anomaly counts, per bin (binned mode).
        self._counts = np.zeros((2, self.n_bins), dtype=np.int64) if self.mode == "binned" else None
        self._center = 0.0
        self._spread = 1.0
        self._lo = 0.0  # left edge of bin 0, in transformed units
        self._width = 0.0  # bin width in transformed units; 0 = not calibrated yet
        self._t_min = math.inf  # observed range of transformed scores
        self._t_max = -math.inf
        # Binned mode, before calibration: the first valid pixels, held exactly.
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulated state (fixed in binned mode)."""
        if self._counts is not None:
            return int(self._counts.nbytes + sum(s.nbytes + p.nbytes for s, p in self._pending))
        return int(sum(a.nbytes for a in self._scores) + sum(a.nbytes for a in self._labels))

    # -- update ----------------------------------------------------------------

    def update(self, score_map: Any, label_map: Any) -> None:
        """Add one frame ``(H, W)`` or a batch ``(B, H, W)``.

        Args:
            score_map: anomaly scores, numpy or torch; higher = more anomalous.
                Scores of void pixels are ignored and may be non-finite.
            label_map: same shape; 0 inlier, 1 anomaly, 255 void (ignored).

        Raises:
            ValueError: on a shape mismatch or a shape that is not 2-D/3-D, a
                label value other than 0/1/255, or a non-finite score on a
                non-void pixel. The state is unchanged when this is raised.
        """
        s, y = _map_inputs(score_map, label_map)
        s = s.reshape(-1)
        y = y.reshape(-1)
        step = self.chunk_pixels
        # Validate everything before touching the state so a bad frame cannot half-update it.
        for i in range(0, s.size, step):
            self._validate_chunk(s[i : i + step], y[i : i + step])
        for i in range(0, s.size, step):
            s_c, y_c = s[i : i + step], y[i : i + step]
            valid = y_c != VOID_LABEL
            s_valid = s_c[valid].astype(np.float64)
            pos_valid = y_c[valid] == 1
            if s_valid.size == 0:
                continue
            if self.mode == "exact":
                self._scores.append(s_valid)
                self._labels.append(pos_valid)
            else:
                self._add_binned(s_valid, pos_valid)

    @staticmethod
    def _validate_chunk(s: np.ndarray, y: np.ndarray) -> None:
        bad = (y != 0) & (y != 1) & (y != VOID_LABEL)
        if bad.any():
            raise ValueError(
                "label_map values must be 0 (inlier), 1 (anomaly) or 255 (void), "
                f"got {_bad_values_text(y[bad])}"
            )
        _raise_if_non_finite(s[y != VOID_LABEL].astype(np.float64, copy=False), "scores of non-void pixels")

    # -- binned internals --------------------------------------------------------

    def _transform(self, s: np.ndarray) -> np.ndarray:
        """``sign(z) * log(1 + |z|)`` with ``z = (s - centre) / spread``: monotone, linear
        near the centre, logarithmic in the tails (cheaper than asinh, same shape)."""
        with np.errstate(over="ignore"):
            z = (s - self._center) * (1.0 / self._spread)
        # Clip so an overflow to +-inf (absurd scores over a tiny spread) still maps to a
        # finite t (log(1e300) ~ 691). Every step below is monotone under rounding, so
        # the order of scores is kept (at worst close scores become ties).
        np.clip(z, -1e300, 1e300, out=z)
        t = np.abs(z)
        t += 1.0
        np.log(t, out=t)
        return np.copysign(t, z, out=t)

    def _calibrate(self, s: np.ndarray) -> None:
        center = float(np.median(s))
        q25, q75 = np.percentile(s, [25.0, 75.0])
        spread = float(q75 - q25) / 1.349  # the standard deviation for Gaussian scores
        if not spread > 0.0:
            spread = float(np.std(s))
        if not (spread > 0.0 and math.isfinite(spread)):
            # All scores equal (or nearly): any scale works since t is log-like far from
            # the centre; pick one relative to the score magnitude.
            spread = max(abs(center), 1.0) * 1e-3
        self._center, self._spread = center, spread
        t = self._transform(s)
        t_min, t_max = float(t.min()), float(t.max())
        span = t_max - t_min
        # Half a bin of margin on each side; 2 / n_bins (about the t-range of +-1 spread)
        # when all first scores tie, later doublings widen it as needed.
        width = span / (self.n_bins - 1) if span > 0.0 else 2.0 / self.n_bins
        self._width = width
        self._lo = t_min - 0.5 * width

    def _grow_to(self, t_min: float, t_max: float) -> None:
        """Double the bin range until it holds [t_min, t_max] (and all earlier scores)."""
        n = self.n_bins
        need_lo = min(t_min, self._t_min)
        need_hi = max(t_max, self._t_max)
        while need_lo < self._lo or need_hi >= self._lo + n * self._width:
            w = self._width
            # New range [lo - 2kw, lo - 2kw + 2nw): an even offset 2k keeps every other old
            # edge, so old bins (2j - 2k, 2j - 2k + 1) merge into new bin j. Choose k to centre
            # the scores seen so far, leaving room to grow on both sides; 0 <= k <= n/2 keeps
            # the old range inside the new one.
            mid = 0.5 * (need_lo + need_hi)
            k = (self._lo + n * w - mid) / (2.0 * w)
            k = int(round(min(max(k, 0.0), n // 2)))
            fine = np.zeros((2, 2 * n), dtype=np.int64)
            fine[:, 2 * k : 2 * k + n] = self._counts
            self._counts = fine.reshape(2, n, 2).sum(axis=2)
            self._lo -= 2 * k * w
            self._width = 2.0 * w
            self.n_rebins += 1

    def _add_binned(self, s: np.ndarray, pos: np.ndarray) -> None:
        if self._width == 0.0:
            self._pending.append((s, pos))
            if sum(p.size for p, _ in self._pending) >= self.calibration_pixels:
                self._flush_pending()
            return
        self._bin(s, pos)

    def _flush_pending(self) -> None:
        """Calibrate on the pixels held so far, then bin them."""
        if not self._pending:
            return
        s = np.concatenate([p for p, _ in self._pending])
        pos = np.concatenate([q for _, q in self._pending])
        self._pending = []
        self._calibrate(s)
        self._bin(s, pos)

    def _bin(self, s: np.ndarray, pos: np.ndarray) -> None:
        t = self._transform(s)
        t_min, t_max = float(t.min()), float(t.max())
        self._grow_to(t_min, t_max)
        self._t_min = min(self._t_min, t_min)
        self._t_max = max(self._t_max, t_max)
        n = self.n_bins
        # t >= lo here, so truncation is floor; rounding can put a score sitting on the top
        # edge one past the end, hence the clip.
        t -= self._lo
        t *= 1.0 / self._width
        idx = t.astype(np.int64)
        np.clip(idx, 0, n - 1, out=idx)
        idx += n * pos  # anomalies count in row 1
        self._counts += np.bincount(idx, minlength=2 * n).reshape(2, n)

    # -- compute -----------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        """The metrics over every valid pixel seen so far.

        Returns:
            ``{"auroc", "ap", "fpr95", "n_pixels", "n_anomaly"}``; the two counts
            are ints (number of non-void pixels and of anomaly pixels).

        Raises:
            ValueError: if no inlier or no anomaly pixel has been seen.
        """
        if self.mode == "exact":
            s = np.concatenate(self._scores) if self._scores else np.zeros(0)
            y = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=bool)
            n_pixels, n_anomaly = int(y.size), int(np.count_nonzero(y))
        else:
            self._flush_pending()
            neg, pos = self._counts
            n_pixels, n_anomaly = int(neg.sum() + pos.sum()), int(pos.sum())
        if n_anomaly == 0 or n_anomaly == n_pixels:
            raise ValueError(
                "both classes are needed: got "
                f"{n_anomaly} anomaly pixels and {n_pixels - n_anomaly} inlier pixels (void excluded)"
            )
        if self.mode == "exact":
            tp, fp = _cumulative_counts(s, y)
        else:
            # Sweep the bins from the highest scores down; each non-empty bin is one threshold step.
            pos_desc, neg_desc = pos[::-1], neg[::-1]
            nonempty = (pos_desc + neg_desc) > 0
            tp = np.cumsum(pos_desc)[nonempty]
            fp = np.cumsum(neg_desc)[nonempty]
        out = _summary(tp, fp)
        out["n_pixels"] = n_pixels
        out["n_anomaly"] = n_anomaly
        return out


# ---------------------------------------------------------------------------
# Float16 maps: exact histograms over the stored values
# ---------------------------------------------------------------------------

N_FLOAT16_VALUES = 1 << 16


def _float16_bins(scores: np.ndarray) -> np.ndarray:
    """The histogram bin of each score of a float16 map with values ≥ 0, flattened: its 16-bit
    pattern, which orders non-negative float16 values, so each stored value has its own bin."""
    if scores.dtype != np.float16:
        raise ValueError(f"scores must be float16 (the dense maps' dtype), got {scores.dtype}")
    bad = ~np.isfinite(scores) | (scores < 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} scores are negative or not finite: expected maps in [0, 1]")
    return (scores + np.float16(0)).view(np.uint16).astype(np.int64).ravel()  # + 0 turns -0 into +0


def _float16_value(bin_index: int) -> float:
    """The float16 value whose bin (:func:`_float16_bins`) is ``bin_index``."""
    return float(np.array([bin_index], dtype=np.uint16).view(np.float16)[0])


class FrameHistograms:
    """Per-frame histograms of a float16 map's values, inlier and anomaly pixels apart (void left
    out), for a bootstrap over frames (:func:`bootstrap_frame_metrics`).

    Pixels of one frame are not independent draws (an object spans many), so intervals of pixel
    metrics resample whole frames. Each stored value of a non-negative float16 map has its own bin
    (:func:`_float16_bins`), so a resampled set's metrics are exact on the stored maps. A frame
    keeps only its non-empty bins, each class apart (for maps in [0, 1] at most 15,361 bins of 6
    bytes each: a 16-bit bin and a 32-bit count); its few anomaly pixels take few.
    """

    def __init__(self) -> None:
        # Per frame: (inlier bins, their counts, anomaly bins, their counts).
        self._frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    @property
    def n_frames(self) -> int:
        return len(self._frames)

    def nbytes(self) -> int:
        """Bytes the histograms hold."""
        return sum(a.nbytes for frame in self._frames for a in frame)

    def update(self, score_map: Any, label_map: Any) -> None:
        """One frame ``(H, W)`` or several ``(B, H, W)``: float16 scores ≥ 0, labels 0 / 1 / 255."""
        s, y = _map_inputs(score_map, label_map)
        s, y = s.reshape(-1, *s.shape[-2:]), y.reshape(-1, *y.shape[-2:])
        count_type = np.uint32 if s[0].size < 2**32 else np.uint64
        entries = []
        for frame, labels in zip(s, y, strict=True):
            PixelMetrics._validate_chunk(frame.ravel(), labels.ravel())
            bins, labels = _float16_bins(frame), labels.ravel()  # void pixels' values checked too
            valid = labels != VOID_LABEL
            counts = np.bincount(
                bins[valid] + N_FLOAT16_VALUES * (labels[valid] == 1), minlength=2 * N_FLOAT16_VALUES
            ).reshape(2, N_FLOAT16_VALUES)  # row 0 inliers, row 1 anomalies, as in PixelF1
            entry = []
            for row in counts:
                used = np.flatnonzero(row)
                entry += [used.astype(np.uint16), row[used].astype(count_type)]
            entries.append(tuple(entry))
        self._frames += entries  # all frames of the call or none

    def bins(self) -> np.ndarray:
        """The sorted histogram bins (:func:`_float16_bins`) some frame has pixels in."""
        if not self._frames:
            return np.zeros(0, np.uint16)
        return np.unique(np.concatenate([b for f in self._frames for b in (f[0], f[2])]))

    def dense(self, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(F, len(used))`` inlier and anomaly counts of every frame over the bins ``used`` (sorted)."""
        inlier = np.zeros((self.n_frames, used.size))
        anomaly = np.zeros((self.n_frames, used.size))
        for f, (neg_bins, neg, pos_bins, pos) in enumerate(self._frames):
            inlier[f, np.searchsorted(used, neg_bins)] = neg
            anomaly[f, np.searchsorted(used, pos_bins)] = pos
        return inlier, anomaly

    def frame_classes(self) -> np.ndarray:
        """``(F, 2)`` bool: whether each frame has anomaly pixels, and inlier pixels."""
        has = [(pos.size > 0, neg.size > 0) for _, neg, _, pos in self._frames]
        return np.array(has, dtype=bool).reshape(-1, 2)


def bootstrap_frame_metrics(
    frames: Mapping[str, FrameHistograms], n_resamples: int = 1000, seed: int | Sequence[int] = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap replicates of pixel AUROC, AP and FPR at 95 % TPR, resampling whole frames.

    Frames are drawn with replacement within their group — with anomaly and inlier pixels, with
    anomaly pixels only, with inlier pixels only, with neither (all void) — each group keeping its
    size, so every replicate has both classes; the same draw for every detector (paired, as
    :func:`bootstrap_metrics`). Replicate ``r`` equals :class:`PixelMetrics` (``"exact"``) on the
    drawn frames' maps (tested).

    Args:
        frames: detector name -> its :class:`FrameHistograms`, all updated with the same frames
            in the same order.
        n_resamples: number of replicates (at least 1).
        seed: seed of the draws (``numpy.random.default_rng``'s).

    Returns:
        ``{detector: {"auroc": (R,), "ap": (R,), "fpr95": (R,)}}``, float64.

    Raises:
        ValueError: no detector, detectors that saw different frames, no anomaly or no inlier
            pixel, ``n_resamples`` < 1.
    """
    if not frames:
        raise ValueError("bootstrap_frame_metrics: no detector histograms given")
    n_resamples = _check_resamples(n_resamples, "bootstrap_frame_metrics")
    first_name, first = next(iter(frames.items()))
    classes = first.frame_classes()
    for name, h in frames.items():
        if h.n_frames != first.n_frames:
            raise ValueError(
                f"detectors {first_name!r} and {name!r} were given different frames ({first.n_frames} "
                f"and {h.n_frames}); a paired bootstrap needs the same frames"
            )
        if not np.array_equal(h.frame_classes(), classes):
            raise ValueError(
                f"detectors {first_name!r} and {name!r} were given different frames: their frames with "
                "anomaly or inlier pixels differ; a paired bootstrap needs the same frames"
            )
    if not classes[:, 0].any() or not classes[:, 1].any():
        raise ValueError(
            f"both classes are needed: of {first.n_frames} frames, {int(classes[:, 0].sum())} have anomaly "
            f"pixels and {int(classes[:, 1].sum())} inlier pixels"
        )
    code = 2 * classes[:, 0] + classes[:, 1]  # 3: both, 2: anomalies only, 1: inliers only, 0: neither
    groups = [np.flatnonzero(code == c) for c in (3, 2, 1, 0)]
    w = _stratified_counts(np.random.default_rng(seed), groups, first.n_frames, n_resamples)
    out = {}
    for name, h in frames.items():
        used = h.bins()
        inlier, anomaly = h.dense(used)
        # Thresholds from the highest value down: the bins in descending order.
        inlier, anomaly = inlier[:, ::-1], anomaly[:, ::-1]
        chunk = max(1, _BOOTSTRAP_CHUNK // max(1, used.size))
        parts = [
            _summary(
                np.cumsum(w[i : i + chunk] @ anomaly, axis=1), np.cumsum(w[i : i + chunk] @ inlier, axis=1)
            )
            for i in range(0, w.shape[0], chunk)
        ]
        out[name] = {k: np.concatenate([p[k] for p in parts]) for k in ("auroc", "ap", "fpr95")}
    return out


class FalsePositivesByClass:
    """Where a pixel detector's false alarms come from: the inlier pixels of each semantic class
    scored at or above the threshold at which the detector finds ``tpr`` of the anomalous pixels.

    That threshold is :func:`fpr_at_tpr`'s (the highest one with TPR ≥ ``tpr``), so the overall
    FPR equals its FPR95. Per class: ``fpr``, the fraction of the class's inlier pixels flagged,
    and ``share``, the class's part of all flagged inlier pixels (the shares sum to 1).

    For float16 maps of non-negative values — what the dense pipeline writes (float16 in
    [0, 1]) — the counts are exact in constant memory: the 16-bit pattern of a non-negative
    float16 orders it, so each stored value gets its own histogram bin (65,536 bins; one
    histogram for the anomalies, one per class for the inliers).

    Args:
        n_classes: semantic ids ``0 .. n_classes − 1`` are classes; inlier pixels with other
            ids (void ids of the semantic map) count under ``other``.
        tpr: target true-positive rate in [0, 1].
    """

    N_VALUES = N_FLOAT16_VALUES

    def __init__(self, n_classes: int, tpr: float = 0.95) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self.tpr = _check_tpr(tpr)
        self._anomaly = np.zeros(self.N_VALUES, dtype=np.int64)
        self._inlier = np.zeros((self.n_classes + 1, self.N_VALUES), dtype=np.int64)

    def update(self, scores: Any, labels: Any, semantic: Any) -> None:
        """One frame (or batch): float16 ``scores`` ≥ 0, ``labels`` 0/1/255, ``semantic`` class ids,
        all of one shape."""
        s, y, c = _to_numpy(scores), _to_numpy(labels), _to_numpy(semantic)
        if not (s.shape == y.shape == c.shape):
            raise ValueError(f"scores {s.shape}, labels {y.shape} and semantic {c.shape} differ in shape")
        bits = _float16_bins(s)
        y, c = y.ravel(), c.ravel().astype(np.int64)
        self._anomaly += np.bincount(bits[y == 1], minlength=self.N_VALUES)
        inlier = y == 0
        row = np.where((c >= 0) & (c < self.n_classes), c, self.n_classes)[inlier]
        counts = np.bincount(row * self.N_VALUES + bits[inlier], minlength=self._inlier.size)
        self._inlier += counts.reshape(self._inlier.shape)

    def compute(self) -> dict[str, Any]:
        """``{"threshold", "fpr", "n_inlier", "n_anomaly", "classes": [{"id", "n_inlier", "n_flagged",
        "fpr", "share"}, ...]}``; ``id`` is the class id, or ``"other"``.

        Raises:
            ValueError: if no inlier or no anomaly pixel has been seen.
        """
        n_anomaly, n_inlier = int(self._anomaly.sum()), int(self._inlier.sum())
        if n_anomaly == 0 or n_inlier == 0:
            raise ValueError(f"both classes are needed: got {n_anomaly} anomaly and {n_inlier} inlier pixels")
        # Sweep the stored values from the highest down: the first value at which the anomalies
        # at or above it reach the target TPR is the threshold.
        # (The same comparison as fpr_at_tpr: TPR = found / n_anomaly against the target.)
        tpr = np.cumsum(self._anomaly[::-1]) / n_anomaly
        top = int(np.searchsorted(tpr, self.tpr, side="left"))
        cut = self.N_VALUES - 1 - min(top, self.N_VALUES - 1)
        flagged = self._inlier[:, cut:].sum(axis=1)
        total = int(flagged.sum())
        classes = []
        for i in range(self.n_classes + 1):
            n = int(self._inlier[i].sum())
            if n == 0:
                continue
            classes.append(
                {
                    "id": i if i < self.n_classes else "other",
                    "n_inlier": n,
                    "n_flagged": int(flagged[i]),
                    "fpr": float(flagged[i]) / n,
                    "share": float(flagged[i]) / total if total else 0.0,
                }
            )
        return {
            "threshold": _float16_value(cut),
            "fpr": total / n_inlier,
            "n_inlier": n_inlier,
            "n_anomaly": n_anomaly,
            "classes": classes,
        }


# ---------------------------------------------------------------------------
# Component-level metrics (SegmentMeIfYouCan)
# ---------------------------------------------------------------------------


class PixelF1:
    """The threshold with the best pixel-level F1 score on float16 maps, void excluded.

    SegmentMeIfYouCan turns score maps into anomaly masks at this threshold before it scores
    components (:class:`ComponentMetrics`). Exact in constant memory, as
    :class:`FalsePositivesByClass`: each stored float16 value (maps in [0, 1], as the dense
    pipeline writes them) has its own histogram bin. Pixels at or above the threshold are
    flagged; among thresholds with equal F1 the highest is taken.
    """

    def __init__(self) -> None:
        self._counts = np.zeros((2, N_FLOAT16_VALUES), dtype=np.int64)  # row 0 inliers, row 1 anomalies

    def update(self, scores: Any, labels: Any) -> None:
        """One frame or a batch: float16 ``scores`` ≥ 0 and ``labels`` 0/1/255 of one shape; scores of
        void pixels are ignored (they may be anything)."""
        s, y = _to_numpy(scores), _to_numpy(labels)
        if s.shape != y.shape:
            raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
        _check_label_dtype(y)
        PixelMetrics._validate_chunk(s.ravel(), y.ravel())
        valid = y != VOID_LABEL
        y = y[valid]
        bits = _float16_bins(s[valid])
        counts = np.bincount(bits + N_FLOAT16_VALUES * (y == 1), minlength=2 * N_FLOAT16_VALUES)
        self._counts += counts.reshape(2, N_FLOAT16_VALUES)

    def compute(self) -> dict[str, float]:
        """``{"threshold", "f1", "precision", "recall"}`` of the mask ``score >= threshold``.

        Raises:
            ValueError: if no inlier or no anomaly pixel has been seen.
        """
        neg, pos = self._counts
        n_anomaly, n_inlier = int(pos.sum()), int(neg.sum())
        if n_anomaly == 0 or n_inlier == 0:
            raise ValueError(f"both classes are needed: got {n_anomaly} anomaly and {n_inlier} inlier pixels")
        # Flag the values from the highest down: tp and fp of the mask "score >= value".
        tp = np.cumsum(pos[::-1])
        fp = np.cumsum(neg[::-1])
        f1 = 2.0 * tp / (tp + fp + n_anomaly)
        best = int(np.argmax(f1))  # the first maximum: the highest threshold
        flagged = int(tp[best] + fp[best])
        return {
            "threshold": _float16_value(N_FLOAT16_VALUES - 1 - best),
            "f1": float(f1[best]),
            "precision": float(tp[best]) / flagged,
            "recall": float(tp[best]) / n_anomaly,
        }


#: sIoU / PPV thresholds of SegmentMeIfYouCan's component F1 (0.25, 0.30, …, 0.75).
SIOU_THRESHOLDS = tuple(round(0.25 + 0.05 * i, 2) for i in range(11))


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected components of a boolean mask: (number of labels incl. background 0, label map)."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return int(n), labels


class ComponentMetrics:
    """SegmentMeIfYouCan's component-level metrics: sIoU, PPV and the mean component F1.

    Per frame, pixels with ``score >= threshold`` (normally :class:`PixelF1`'s, as the benchmark
    does) outside void form the predicted mask. Connected components (8-neighbourhood) of the
    anomaly label are the ground-truth components ``k``; those smaller than
    ``min_instance_size`` pixels become void. Connected components of the predicted mask
    smaller than ``min_segment_size`` pixels are dropped. Everything is then counted inside the
    region of interest (not void):

    * ``sIoU(k) = |k ∩ K̂(k)| / |(k ∪ K̂(k)) \\ A(k)|``, where ``K̂(k)`` is the union of the predicted
      components that touch ``k`` and ``A(k)`` the pixels of the other ground-truth components
      (a predicted blob covering two neighbouring objects is not punished for the other one);
    * ``PPV(k̂)``: the fraction of a predicted component's pixels that are anomalous;
    * at each threshold ``τ`` of ``siou_thresholds``: a ground-truth component with
      ``sIoU ≥ τ`` is a true positive, else a false negative; a predicted component with
      ``PPV < τ`` a false positive; ``F1(τ) = 2 TP / (2 TP + FN + FP)`` over the whole dataset.

    :meth:`compute` gives the mean sIoU over all ground-truth components of the dataset, the
    mean PPV over all predicted components, and F1 averaged over ``τ`` ("mean F1"). Defaults are
    the benchmark's RoadAnomaly21 settings (segments ≥ 500, instances ≥ 100 pixels);
    RoadObstacle21 uses 50 and 10. One difference: the benchmark flags ``score > threshold``, here
    ``score >= threshold`` (the mask whose F1 :class:`PixelF1` maximised; the two differ only on
    pixels scored exactly at the threshold).

    State: one float per component (ground truth and predicted), so memory grows with the number
    of components, not of pixels.
    """

    def __init__(
        self,
        threshold: float,
        min_segment_size: int = 500,
        min_instance_size: int = 100,
        siou_thresholds: tuple[float, ...] = SIOU_THRESHOLDS,
    ) -> None:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        for name, value in (("min_segment_size", min_segment_size), ("min_instance_size", min_instance_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not siou_thresholds or not all(0.0 < t <= 1.0 for t in siou_thresholds):
            raise ValueError(f"siou_thresholds must be in (0, 1], got {siou_thresholds}")
        self.threshold = float(threshold)
        self.min_segment_size = int(min_segment_size)
        self.min_instance_size = int(min_instance_size)
        self.siou_thresholds = tuple(float(t) for t in siou_thresholds)
        self._siou: list[np.ndarray] = []
        self._ppv: list[np.ndarray] = []

    def update(self, score_map: Any, label_map: Any) -> None:
        """Add one frame ``(H, W)`` or a batch of frames ``(B, H, W)`` (components never cross frames).

        Raises:
            ValueError: on a shape mismatch, a label other than 0/1/255 or a non-finite score on a
                non-void pixel; the state is unchanged then.
        """
        s, y = _map_inputs(score_map, label_map)
        s, y = s.reshape(-1, *s.shape[-2:]), y.reshape(-1, *y.shape[-2:])
        for s_f, y_f in zip(s, y, strict=True):  # validate every frame before keeping any
            PixelMetrics._validate_chunk(s_f.ravel(), y_f.ravel())
        results = [self._frame(s_f, y_f) for s_f, y_f in zip(s, y, strict=True)]
        for siou, ppv in results:
            self._siou.append(siou)
            self._ppv.append(ppv)

    def _frame(self, s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sIoU of each kept ground-truth component and PPV of each predicted one, of one frame."""
        roi = y != VOID_LABEL
        with np.errstate(invalid="ignore"):  # void scores may be NaN; they are masked out
            flagged = (s >= self.threshold) & roi
        n_pred, pred = _components(flagged)
        pred_size = np.bincount(pred.ravel(), minlength=n_pred)
        pred[(pred_size < self.min_segment_size)[pred] & (pred > 0)] = 0
        n_gt, gt = _components(y == 1)
        gt_size = np.bincount(gt.ravel(), minlength=n_gt)
        roi &= ~((gt_size < self.min_instance_size)[gt] & (gt > 0))  # small instances become void
        g, p = gt[roi].astype(np.int64), pred[roi].astype(np.int64)
        # Pixels per (ground-truth component, predicted component) pair, 0 = none, inside the ROI.
        pairs, counts = np.unique(g * n_pred + p, return_counts=True)
        pg, pp = np.divmod(pairs, n_pred)
        # Pixels of each predicted component on no ground-truth component.
        on_inliers = np.zeros(n_pred, dtype=np.int64)
        on_inliers[pp[pg == 0]] = counts[pg == 0]
        touching = (pg > 0) & (pp > 0)
        # sIoU(k) = Σ_p |k ∩ p| / (|k| + Σ_p |p \ anomalies|) over the predicted p touching k: the
        # union minus the other components' pixels (the adjustment A(k)).
        intersection = np.bincount(pg[touching], weights=counts[touching], minlength=n_gt)
        outside = np.bincount(pg[touching], weights=on_inliers[pp[touching]], minlength=n_gt)
        size_in_roi = np.bincount(g, minlength=n_gt)
        kept = np.flatnonzero(size_in_roi[1:] > 0) + 1
        siou = intersection[kept] / (size_in_roi[kept] + outside[kept])
        pred_in_roi = np.bincount(p, minlength=n_pred)
        shown = np.flatnonzero(pred_in_roi[1:] > 0) + 1
        ppv = (pred_in_roi[shown] - on_inliers[shown]) / pred_in_roi[shown]
        return siou.astype(np.float64), ppv.astype(np.float64)

    @property
    def n_frames(self) -> int:
        return len(self._siou)

    def frame_counts(self) -> dict[str, np.ndarray]:
        """Each frame's share of :meth:`compute`'s sums, one row per frame seen, in order:
        ``n_instances``, ``siou_sum``, ``n_segments``, ``ppv_sum`` ``(F,)`` and, per sIoU/PPV
        threshold, ``tp`` and ``fp`` ``(F, len(siou_thresholds))``. Any set of frames' metrics
        follow from the sums of its rows (a frame bootstrap, :func:`bootstrap_component_metrics`)."""
        t = np.asarray(self.siou_thresholds)[:, None]
        return {
            "n_instances": np.array([s.size for s in self._siou], dtype=np.float64),
            "siou_sum": np.array([s.sum() for s in self._siou], dtype=np.float64),
            "n_segments": np.array([p.size for p in self._ppv], dtype=np.float64),
            "ppv_sum": np.array([p.sum() for p in self._ppv], dtype=np.float64),
            "tp": np.array([(s >= t).sum(axis=1) for s in self._siou], np.float64).reshape(-1, t.size),
            "fp": np.array([(p < t).sum(axis=1) for p in self._ppv], np.float64).reshape(-1, t.size),
        }

    def compute(self) -> dict[str, Any]:
        """``{"siou", "ppv", "f1_mean", "n_instances", "n_segments", "per_threshold": [{"threshold",
        "tp", "fn", "fp", "f1"}, ...]}``: mean sIoU over ground-truth components, mean PPV over
        predicted components (NaN when there are none), F1 at each sIoU/PPV threshold and its mean.

        Raises:
            ValueError: if no ground-truth component has been seen (F1 is then undefined).
        """
        siou = np.concatenate(self._siou) if self._siou else np.zeros(0)
        ppv = np.concatenate(self._ppv) if self._ppv else np.zeros(0)
        if siou.size == 0:
            raise ValueError(
                f"no anomaly component of at least {self.min_instance_size} pixels in the frames seen"
            )
        rows = []
        for t in self.siou_thresholds:
            tp, fn, fp = int((siou >= t).sum()), int((siou < t).sum()), int((ppv < t).sum())
            rows.append({"threshold": t, "tp": tp, "fn": fn, "fp": fp, "f1": 2 * tp / (2 * tp + fn + fp)})
        return {
            "siou": float(siou.mean()),
            "ppv": float(ppv.mean()) if ppv.size else math.nan,
            "f1_mean": float(np.mean([r["f1"] for r in rows])),
            "n_instances": int(siou.size),
            "n_segments": int(ppv.size),
            "per_threshold": rows,
        }


def bootstrap_component_metrics(
    metrics: Mapping[str, ComponentMetrics], n_resamples: int = 1000, seed: int | Sequence[int] = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap replicates of the component metrics (mean sIoU, mean PPV, mean F1), resampling
    whole frames.

    Frames with at least one anomaly instance (of ``min_instance_size``) and frames without are
    drawn with replacement within their group, each group keeping its size, so every replicate
    has instances and its sIoU and F1 are defined; the same draw for every detector (paired, as
    :func:`bootstrap_metrics`). Each detector's threshold stays the one it was scored at: the
    intervals are those of its components at that threshold (choosing the threshold again per
    replicate would mean thresholding every frame again). Replicate ``r`` equals
    :meth:`ComponentMetrics.compute` on the drawn frames (tested).

    Args:
        metrics: detector name -> its :class:`ComponentMetrics`, all updated with the same frames
            in the same order and the same ``min_instance_size`` and ``siou_thresholds``.
        n_resamples: number of replicates (at least 1).
        seed: seed of the draws (``numpy.random.default_rng``'s).

    Returns:
        ``{detector: {"siou": (R,), "ppv": (R,), "f1_mean": (R,)}}``, float64; a replicate
        whose frames hold no predicted segment has a NaN PPV (a mean over no segment).

    Raises:
        ValueError: no detector, detectors that saw different frames or instances, no instance,
            ``n_resamples`` < 1.
    """
    if not metrics:
        raise ValueError("bootstrap_component_metrics: no detector component metrics given")
    n_resamples = _check_resamples(n_resamples, "bootstrap_component_metrics")
    counts = {name: m.frame_counts() for name, m in metrics.items()}
    first_name, first = next(iter(counts.items()))
    instances, thresholds = first["n_instances"], metrics[first_name].siou_thresholds
    for name, c in counts.items():
        if not np.array_equal(c["n_instances"], instances) or metrics[name].siou_thresholds != thresholds:
            raise ValueError(
                f"detectors {first_name!r} and {name!r} were given different frames, instances or sIoU "
                f"thresholds ({instances.size} and {c['n_instances'].size} frames, "
                f"{int(instances.sum())} and {int(c['n_instances'].sum())} instances); a paired bootstrap "
                "needs the same"
            )
    if not instances.any():
        raise ValueError(
            f"no anomaly instance in the {instances.size} frames: no component metric to resample"
        )
    groups = (np.flatnonzero(instances > 0), np.flatnonzero(instances == 0))
    w = _stratified_counts(np.random.default_rng(seed), groups, instances.size, n_resamples)
    n = w @ instances  # > 0 in every replicate: the frames with instances keep their number
    out = {}
    for name, c in counts.items():
        tp, segments = w @ c["tp"], w @ c["n_segments"]
        with np.errstate(invalid="ignore", divide="ignore"):
            ppv = np.where(segments > 0, (w @ c["ppv_sum"]) / segments, np.nan)
        f1 = 2 * tp / (tp + n[:, None] + w @ c["fp"])  # 2TP / (2TP + FN + FP), FN = n - TP
        out[name] = {"siou": (w @ c["siou_sum"]) / n, "ppv": ppv, "f1_mean": f1.mean(axis=1)}
    return out
