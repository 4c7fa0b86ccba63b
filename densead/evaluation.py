"""Image-level evaluation: metrics for every detector × anomaly set, from score columns.

The input is the column dict of a scores CSV (:func:`densead.scoring.read_scores_csv`):
a ``set`` column naming each image's set and one column per detector. The
in-distribution test set gives the negatives, each anomaly set the positives.

With a :class:`Bootstrap`, every number gets a percentile interval, and
:func:`compare_detectors` gives each detector's difference to a baseline detector
with a paired interval (the same resamples for both), which is what says whether
one detector beats another on these images; two overlapping intervals do not.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np

from densead.io import atomic_write_text
from densead.metrics import bootstrap_metrics, image_metrics, percentile_interval
from densead.viz import plot_roc_curves, plot_score_histograms

__all__ = [
    "COMPONENT_METRICS",
    "MIN_RESAMPLES",
    "Bootstrap",
    "ComponentIntervals",
    "DifferenceRow",
    "MetricIntervals",
    "MetricRow",
    "check_comparison",
    "compare_detectors",
    "differences_markdown",
    "differences_to_csv",
    "write_differences",
    "evaluate_columns",
    "intervals",
    "markdown_tables",
    "rows_to_csv",
    "spearman",
    "table_columns",
    "write_evaluation",
]

METRICS = ("auroc", "ap", "fpr95")
TITLES = ("AUROC %", "AP %", "FPR at 95% TPR %")
# SegmentMeIfYouCan's component-level metrics with intervals (densead.metrics.ComponentMetrics).
COMPONENT_METRICS = ("siou", "ppv", "f1_mean")
COMPONENT_TITLES = ("sIoU %", "PPV %", "mean F1 %")
# The fewest resamples the tools and experiment configs accept: fewer leave the tails of an
# interval (2.5 % each at 95 %) to a handful of resamples.
MIN_RESAMPLES = 100


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _percent(v: float, decimals: int = 1, signed: bool = False) -> str:
    return f"{100 * v:{'+' if signed else ''}.{decimals}f}"


@dataclass(frozen=True)
class Bootstrap:
    """Percentile intervals from a stratified, paired bootstrap (:func:`densead.metrics.bootstrap_metrics`).

    Each (in-distribution set, anomaly set) pair, or each road set's frames, is resampled
    ``n_resamples`` times with a seed made of ``seed`` and the set's name, so a set's intervals
    do not depend on which other sets are evaluated with it.
    """

    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not _whole(self.n_resamples) or self.n_resamples < 1:
            raise ValueError(f"bootstrap: n_resamples must be a whole number >= 1, got {self.n_resamples!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"bootstrap: confidence must be in (0, 1), got {self.confidence!r}")
        if not _whole(self.seed) or self.seed < 0:
            raise ValueError(f"bootstrap: seed must be a whole number >= 0, got {self.seed!r}")
        object.__setattr__(self, "n_resamples", int(self.n_resamples))
        object.__setattr__(self, "seed", int(self.seed))

    def caption(self) -> str:
        return f"{100 * self.confidence:g}% bootstrap interval, {self.n_resamples} resamples"

    def seed_for(self, set_name: str) -> list[int]:
        """The resamples' seed for one set: ``seed`` and the set's name."""
        return [self.seed, zlib.crc32(set_name.encode())]


@dataclass(frozen=True, kw_only=True)
class _Intervals:
    """A row's ``<metric>_lo`` / ``<metric>_hi`` bounds, one pair per metric of ``INTERVAL_METRICS``
    (the subclasses declare them); NaN without a bootstrap, or where the metric is undefined in
    some resamples."""

    INTERVAL_METRICS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def interval_fields(cls) -> list[str]:
        return [f"{m}_{end}" for m in cls.INTERVAL_METRICS for end in ("lo", "hi")]

    @property
    def has_interval(self) -> bool:
        return any(not math.isnan(getattr(self, f"{m}_lo")) for m in self.INTERVAL_METRICS)

    def cell(self, metric: str, decimals: int) -> str:
        """``metric`` in percent, followed by `` [lo, hi]`` where the row has its interval, or
        `` [—]`` where the row has others but not this one's."""
        text = _percent(getattr(self, metric), decimals)
        if not math.isnan(getattr(self, f"{metric}_lo")):
            lo, hi = (_percent(getattr(self, f"{metric}_{end}"), decimals) for end in ("lo", "hi"))
            text += f" [{lo}, {hi}]"
        elif self.has_interval:
            text += " [—]"
        return text


@dataclass(frozen=True, kw_only=True)
class MetricIntervals(_Intervals):
    """The ``*_lo`` / ``*_hi`` bounds of a row's AUROC, AP and FPR95; NaN without a bootstrap."""

    INTERVAL_METRICS: ClassVar[tuple[str, ...]] = METRICS

    auroc_lo: float = math.nan
    auroc_hi: float = math.nan
    ap_lo: float = math.nan
    ap_hi: float = math.nan
    fpr95_lo: float = math.nan
    fpr95_hi: float = math.nan


@dataclass(frozen=True, kw_only=True)
class ComponentIntervals(_Intervals):
    """The ``*_lo`` / ``*_hi`` bounds of a row's mean sIoU, mean PPV and mean F1 (component level);
    NaN without a bootstrap (the PPV's also where some resample holds no predicted segment)."""

    INTERVAL_METRICS: ClassVar[tuple[str, ...]] = COMPONENT_METRICS

    siou_lo: float = math.nan
    siou_hi: float = math.nan
    ppv_lo: float = math.nan
    ppv_hi: float = math.nan
    f1_mean_lo: float = math.nan
    f1_mean_hi: float = math.nan


def table_columns(row_type: type[_Intervals], rows: Sequence[_Intervals]) -> list[str]:
    """A row type's fields in CSV order: its own, then the interval bounds where the rows have them."""
    bounds = row_type.interval_fields()
    own = [f.name for f in fields(row_type) if f.name not in bounds]
    return own + bounds * any(r.has_interval for r in rows)


@dataclass(frozen=True)
class MetricRow(MetricIntervals):
    """One detector on one anomaly set."""

    detector: str
    anomaly_set: str
    auroc: float
    ap: float
    fpr95: float
    n_in: int
    n_anomaly: int


@dataclass(frozen=True)
class DifferenceRow:
    """``metric`` of ``detector`` minus that of ``baseline`` on one set (an anomaly set against the
    in-distribution set, or a road set per pixel), with its paired interval."""

    detector: str
    baseline: str
    set_name: str
    metric: str
    difference: float
    lo: float
    hi: float


def _scores(cols: Mapping[str, np.ndarray], detector: str, set_name: str) -> np.ndarray:
    if detector not in cols:
        raise KeyError(f"no score column {detector!r} (columns: {', '.join(cols)})")
    mask = cols["set"] == set_name
    if not mask.any():
        raise KeyError(f"no rows of set {set_name!r} (sets: {', '.join(sorted(set(cols['set'])))})")
    return np.asarray(cols[detector][mask], dtype=np.float64)


def _labelled(
    cols: Mapping[str, np.ndarray], det: str, in_set: str, name: str
) -> tuple[np.ndarray, np.ndarray]:
    neg, pos = _scores(cols, det, in_set), _scores(cols, det, name)
    return np.concatenate([neg, pos]), np.r_[np.zeros(len(neg)), np.ones(len(pos))]


def _evaluate(
    cols: Mapping[str, np.ndarray],
    in_set: str,
    anomaly_sets: Sequence[str],
    detectors: Sequence[str],
    bootstrap: Bootstrap | None = None,
    baseline: str | None = None,
) -> tuple[list[MetricRow], list[DifferenceRow]]:
    if "set" not in cols:
        raise KeyError("scores have no 'set' column")
    if in_set in anomaly_sets:  # against itself every metric is that of a coin flip
        raise ValueError(f"set {in_set!r} is the in-distribution set and cannot also be an anomaly set")
    check_comparison(detectors, bootstrap, baseline)
    # Each detector's scores and labels on each anomaly set, for the values and the bootstrap.
    data = {(det, name): _labelled(cols, det, in_set, name) for det in detectors for name in anomaly_sets}
    points = {key: image_metrics(*scores_labels) for key, scores_labels in data.items()}
    bounds: dict[tuple[str, str], dict[str, float]] = {}
    diffs = []
    for name in anomaly_sets if bootstrap is not None else ():
        reps = bootstrap_metrics(
            {det: data[(det, name)][0] for det in detectors},
            data[(detectors[0], name)][1],  # the labels: the same for every detector
            bootstrap.n_resamples,
            bootstrap.seed_for(name),
        )
        set_bounds, set_diffs = intervals(
            reps, {d: points[(d, name)] for d in detectors}, bootstrap, baseline, name
        )
        bounds |= {(det, name): b for det, b in set_bounds.items()}
        diffs += set_diffs
    n_in = int(np.sum(cols["set"] == in_set))
    rows = [
        MetricRow(
            det,
            name,
            *(points[(det, name)][m] for m in METRICS),
            n_in,
            int(np.sum(cols["set"] == name)),
            **bounds.get((det, name), {}),
        )
        for det in detectors
        for name in anomaly_sets
    ]
    return rows, diffs


def check_comparison(detectors: Sequence[str], bootstrap: Bootstrap | None, baseline: str | None) -> None:
    """Refuse a ``baseline`` that is not among the ``detectors``, or that comes without a bootstrap."""
    if baseline is not None and baseline not in detectors:
        raise KeyError(f"baseline detector {baseline!r} is not among the detectors ({', '.join(detectors)})")
    if baseline is not None and bootstrap is None:
        raise ValueError("comparing detectors to a baseline needs a bootstrap (its paired intervals)")


def intervals(
    replicates: Mapping[str, Mapping[str, np.ndarray]],
    points: Mapping[str, Mapping[str, float]],
    bootstrap: Bootstrap,
    baseline: str | None,
    set_name: str,
    metrics: Sequence[str] = METRICS,
    may_be_undefined: Sequence[str] = (),
) -> tuple[dict[str, dict[str, float]], list[DifferenceRow]]:
    """From one set's bootstrap replicates (``{detector: {metric: (R,)}}``) and point values: each
    detector's ``{"<metric>_lo": .., "<metric>_hi": ..}`` and, with a ``baseline``, each other
    detector's paired differences to it. A metric of ``may_be_undefined`` with NaN replicates (a
    mean PPV over resampled frames without a predicted segment) gets NaN bounds, as does each
    difference it enters; NaN replicates of any other metric are an error
    (:func:`densead.metrics.percentile_interval`)."""

    def bounds_of(reps: np.ndarray, metric: str) -> tuple[float, float]:
        if metric in may_be_undefined and np.isnan(reps).any():
            return math.nan, math.nan
        return percentile_interval(reps, bootstrap.confidence)

    bounds: dict[str, dict[str, float]] = {}
    diffs = []
    for det, reps in replicates.items():
        for m in metrics:
            lo, hi = bounds_of(reps[m], m)
            bounds.setdefault(det, {}).update({f"{m}_lo": lo, f"{m}_hi": hi})
            if baseline is not None and det != baseline:
                lo, hi = bounds_of(reps[m] - replicates[baseline][m], m)
                d = points[det][m] - points[baseline][m]
                diffs.append(DifferenceRow(det, baseline, set_name, m, d, lo, hi))
    return bounds, diffs


def evaluate_columns(
    cols: Mapping[str, np.ndarray],
    in_set: str,
    anomaly_sets: Sequence[str],
    detectors: Sequence[str],
    bootstrap: Bootstrap | None = None,
) -> list[MetricRow]:
    """AUROC / AP / FPR@95%TPR of each detector on each anomaly set vs ``in_set``, with percentile
    intervals when a ``bootstrap`` is given."""
    return _evaluate(cols, in_set, anomaly_sets, detectors, bootstrap)[0]


def compare_detectors(
    cols: Mapping[str, np.ndarray],
    in_set: str,
    anomaly_sets: Sequence[str],
    detectors: Sequence[str],
    baseline: str,
    bootstrap: Bootstrap = Bootstrap(),
) -> list[DifferenceRow]:
    """Each detector's AUROC / AP / FPR95 minus the ``baseline`` detector's, per anomaly set, with
    a paired percentile interval: both detectors are scored on the same resamples, so the interval
    is that of the difference itself (an interval excluding 0 says the difference holds on
    resamples of these images)."""
    return _evaluate(cols, in_set, anomaly_sets, detectors, bootstrap, baseline)[1]


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


def markdown_tables(
    rows: Sequence[MetricRow], display: Mapping[str, str] | None = None, bootstrap: Bootstrap | None = None
) -> str:
    """One table per metric: detectors as rows, anomaly sets as columns, in percent; with
    intervals as ``value [lo, hi]`` where the rows have them (``bootstrap`` names them)."""
    display = display or {}
    sets = list(dict.fromkeys(r.anomaly_set for r in rows))
    dets = list(dict.fromkeys(r.detector for r in rows))
    by = {(r.detector, r.anomaly_set): r for r in rows}
    out = []
    for metric, title in zip(METRICS, TITLES, strict=True):
        caption = f" ({bootstrap.caption()})" if bootstrap is not None else ""
        out.append(f"**{title}**{caption}\n")
        out.append("| detector | " + " | ".join(sets) + " |")
        out.append("|---|" + "---:|" * len(sets))
        for d in dets:
            vals = [by[(d, s)].cell(metric, 1) for s in sets]
            out.append(f"| {display.get(d, d)} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def differences_markdown(
    diffs: Sequence[DifferenceRow],
    bootstrap: Bootstrap,
    display: Mapping[str, str] | None = None,
    decimals: int = 1,
    metrics: Sequence[str] = METRICS,
    titles: Sequence[str] = TITLES,
) -> str:
    """Per metric (``metrics``, headed ``titles``): each detector minus the baseline, per set, in
    points with ``decimals`` decimals, with its paired interval; bold where the interval excludes
    0; ``[—]`` where it is undefined (NaN bounds, :func:`intervals`)."""
    if not diffs:
        return ""
    display = display or {}
    baseline = display.get(diffs[0].baseline, diffs[0].baseline)
    sets = list(dict.fromkeys(r.set_name for r in diffs))
    dets = list(dict.fromkeys(r.detector for r in diffs))
    by = {(r.detector, r.set_name, r.metric): r for r in diffs}
    out = []
    for metric, title in zip(metrics, titles, strict=True):
        better = "lower is better" if metric == "fpr95" else "higher is better"
        undefined = any(math.isnan(r.lo) for r in diffs if r.metric == metric)
        note = "; [—]: undefined in some resamples (one side has no predicted segment there)" * undefined
        out.append(
            f"**{title}, detector − {baseline}** (points; paired {bootstrap.caption()}; bold: the interval "
            f"excludes 0; {better}{note})\n"
        )
        out.append("| detector | " + " | ".join(sets) + " |")
        out.append("|---|" + "---:|" * len(sets))
        for d in dets:
            cells = []
            for s in sets:
                r = by[(d, s, metric)]
                cell = _percent(r.difference, decimals, True)
                if math.isnan(r.lo):
                    cells.append(f"{cell} [—]")
                    continue
                lo, hi = _percent(r.lo, decimals, True), _percent(r.hi, decimals, True)
                cell += f" [{lo}, {hi}]"
                cells.append(f"**{cell}**" if r.lo > 0 or r.hi < 0 else cell)
            out.append(f"| {display.get(d, d)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _csv(rows: Sequence[object], columns: Sequence[str], header: Sequence[str] | None = None) -> str:
    """The rows' attributes ``columns`` as CSV, under ``header`` (default: the column names)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes a set or detector name with a comma
    writer.writerow(header or columns)
    for r in rows:
        writer.writerow(repr(v) if isinstance(v, float) else str(v) for v in (getattr(r, c) for c in columns))
    return text.getvalue()


def rows_to_csv(rows: Sequence[MetricRow]) -> str:
    """``metrics.csv``: a line per detector and anomaly set; interval columns where the rows have them."""
    return _csv(rows, table_columns(MetricRow, rows))


def differences_to_csv(diffs: Sequence[DifferenceRow], set_column: str = "set_name") -> str:
    """One line per detector, set and metric; the set's column is named ``set_column``
    (``anomaly_set`` in ``differences.csv``, as in ``metrics.csv``)."""
    columns = [f.name for f in fields(DifferenceRow)]
    return _csv(diffs, columns, [set_column if c == "set_name" else c for c in columns])


def write_differences(path: Path, diffs: Sequence[DifferenceRow], set_column: str = "set_name") -> None:
    """``diffs`` as CSV at ``path`` (atomically); without any, the file is removed: one left by an
    earlier evaluation into this folder would not describe this one."""
    if diffs:
        atomic_write_text(path, differences_to_csv(diffs, set_column))
    else:
        path.unlink(missing_ok=True)


def write_evaluation(
    out_dir: str | Path,
    cols: Mapping[str, np.ndarray],
    in_set: str,
    anomaly_sets: Sequence[str],
    detectors: Sequence[str],
    display: Mapping[str, str] | None = None,
    bootstrap: Bootstrap | None = None,
    baseline: str | None = None,
) -> tuple[list[MetricRow], list[DifferenceRow]]:
    """Metrics as ``metrics.csv`` and ``metrics.md`` (with intervals under a ``bootstrap``; with a
    ``baseline`` also ``differences.csv`` and the paired differences in ``metrics.md``, and without
    one no ``differences.csv``), ROC curves and score histograms as PNG."""
    out_dir = Path(out_dir)
    bad = [d for d in detectors if "/" in d or "\\" in d]
    if bad:  # roc_<detector>.png would land in another folder
        raise ValueError(f"detector name(s) {bad} hold a path separator; they name the plot files")
    rows, diffs = _evaluate(cols, in_set, anomaly_sets, detectors, bootstrap, baseline)
    markdown = markdown_tables(rows, display, bootstrap)
    if diffs:
        markdown += "\n" + differences_markdown(diffs, bootstrap, display)
    write_differences(out_dir / "differences.csv", diffs, "anomaly_set")
    atomic_write_text(out_dir / "metrics.csv", rows_to_csv(rows))
    atomic_write_text(out_dir / "metrics.md", markdown)
    display = display or {}
    for det in detectors:
        neg = _scores(cols, det, in_set)
        curves = {name: _labelled(cols, det, in_set, name) for name in anomaly_sets}
        label = display.get(det, det)
        plot_roc_curves(out_dir / f"roc_{det}.png", curves, title=f"ROC: {label} vs {in_set}")
        groups = {in_set: neg} | {name: _scores(cols, det, name) for name in anomaly_sets}
        plot_score_histograms(out_dir / f"hist_{det}.png", groups, title=f"scores: {label}")
    return rows, diffs
