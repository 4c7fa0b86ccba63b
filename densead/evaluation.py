"""Image-level evaluation: metrics for every detector × anomaly set, from score columns.

The input is the column dict of a scores CSV (:func:`densead.scoring.read_scores_csv`):
a ``set`` column naming each image's set and one column per detector. The
in-distribution test set gives the negatives, each anomaly set the positives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densead.io import atomic_write_text
from densead.metrics import image_metrics
from densead.viz import plot_roc_curves, plot_score_histograms

__all__ = ["MetricRow", "evaluate_columns", "markdown_tables", "rows_to_csv", "spearman", "write_evaluation"]

METRICS = ("auroc", "ap", "fpr95")


@dataclass(frozen=True)
class MetricRow:
    detector: str
    anomaly_set: str
    auroc: float
    ap: float
    fpr95: float
    n_in: int
    n_anomaly: int


def _scores(cols: Mapping[str, np.ndarray], detector: str, set_name: str) -> np.ndarray:
    if detector not in cols:
        raise KeyError(f"no score column {detector!r} (columns: {', '.join(cols)})")
    mask = cols["set"] == set_name
    if not mask.any():
        raise KeyError(f"no rows of set {set_name!r} (sets: {', '.join(sorted(set(cols['set'])))})")
    return np.asarray(cols[detector][mask], dtype=np.float64)


def evaluate_columns(
    cols: Mapping[str, np.ndarray], in_set: str, anomaly_sets: Sequence[str], detectors: Sequence[str]
) -> list[MetricRow]:
    """AUROC / AP / FPR@95%TPR of each detector on each anomaly set vs ``in_set``."""
    if "set" not in cols:
        raise KeyError("scores have no 'set' column")
    if in_set in anomaly_sets:  # against itself every metric is that of a coin flip
        raise ValueError(f"set {in_set!r} is the in-distribution set and cannot also be an anomaly set")
    rows = []
    for det in detectors:
        neg = _scores(cols, det, in_set)
        for name in anomaly_sets:
            pos = _scores(cols, det, name)
            m = image_metrics(np.concatenate([neg, pos]), np.r_[np.zeros(len(neg)), np.ones(len(pos))])
            rows.append(MetricRow(det, name, m["auroc"], m["ap"], m["fpr95"], len(neg), len(pos)))
    return rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN where either side is constant."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        # average the ranks of tied values
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else math.nan


def markdown_tables(rows: Sequence[MetricRow], display: Mapping[str, str] | None = None) -> str:
    """One table per metric: detectors as rows, anomaly sets as columns, in percent."""
    display = display or {}
    sets = list(dict.fromkeys(r.anomaly_set for r in rows))
    dets = list(dict.fromkeys(r.detector for r in rows))
    by = {(r.detector, r.anomaly_set): r for r in rows}
    out = []
    for metric, title in zip(METRICS, ("AUROC %", "AP %", "FPR at 95% TPR %"), strict=True):
        out.append(f"**{title}**\n")
        out.append("| detector | " + " | ".join(sets) + " |")
        out.append("|---|" + "---:|" * len(sets))
        for d in dets:
            vals = [f"{100 * getattr(by[(d, s)], metric):.1f}" for s in sets]
            out.append(f"| {display.get(d, d)} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def rows_to_csv(rows: Sequence[MetricRow]) -> str:
    lines = ["detector,anomaly_set,auroc,ap,fpr95,n_in,n_anomaly"]
    lines += [
        f"{r.detector},{r.anomaly_set},{r.auroc!r},{r.ap!r},{r.fpr95!r},{r.n_in},{r.n_anomaly}" for r in rows
    ]
    return "\n".join(lines) + "\n"


def write_evaluation(
    out_dir: str | Path,
    cols: Mapping[str, np.ndarray],
    in_set: str,
    anomaly_sets: Sequence[str],
    detectors: Sequence[str],
    display: Mapping[str, str] | None = None,
) -> list[MetricRow]:
    """Metrics as ``metrics.csv`` and ``metrics.md``, ROC curves and score histograms as PNG."""
    out_dir = Path(out_dir)
    rows = evaluate_columns(cols, in_set, anomaly_sets, detectors)
    atomic_write_text(out_dir / "metrics.csv", rows_to_csv(rows))
    atomic_write_text(out_dir / "metrics.md", markdown_tables(rows, display))
    display = display or {}
    for det in detectors:
        neg = _scores(cols, det, in_set)
        curves = {}
        for name in anomaly_sets:
            pos = _scores(cols, det, name)
            curves[name] = (np.concatenate([neg, pos]), np.r_[np.zeros(len(neg)), np.ones(len(pos))])
        label = display.get(det, det)
        plot_roc_curves(out_dir / f"roc_{det}.png", curves, title=f"ROC: {label} vs {in_set}")
        groups = {in_set: neg} | {name: _scores(cols, det, name) for name in anomaly_sets}
        plot_score_histograms(out_dir / f"hist_{det}.png", groups, title=f"scores: {label}")
    return rows
