"""Pictures for anomaly detection: heat-map overlays, ROC curves, score histograms, bars.

Every writer goes through :func:`densead.io.atomic_path`, so an interrupted or
failed save never leaves a truncated PNG under the final name.

Plots are drawn on a bare :class:`matplotlib.figure.Figure` with an Agg canvas
instead of ``matplotlib.pyplot``: nothing here switches the global backend or
leaves figures registered in pyplot, so interactive users and other code in
the same process are unaffected, and it works on headless machines.

Convention: a higher score means more anomalous.
"""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from densead.io import atomic_path
from densead.metrics import auroc, roc_curve

__all__ = [
    "heatmap_overlay",
    "plot_bars",
    "plot_roc_curves",
    "plot_score_histograms",
    "save_png",
]

_DPI = 100


def _float_array(x: Any) -> np.ndarray:
    """float64 numpy copy of a numpy array, torch tensor or array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.array(x, dtype=np.float64)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _normalized(score_map: np.ndarray, vmin: float | None, vmax: float | None) -> np.ndarray:
    """Scores mapped to [0, 1]; non-finite scores count as ``vmax`` (i.e. 1)."""
    finite = np.isfinite(score_map)
    if vmin is None or vmax is None:
        values = score_map[finite]
        if values.size:
            # 1st/99th percentiles so a handful of extreme pixels cannot wash out the rest;
            # fall back to min/max when most pixels share one value (p1 == p99).
            lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.0]))
            if hi <= lo:
                lo, hi = float(values.min()), float(values.max())
        else:
            lo = hi = 0.0
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    vmin, vmax = float(vmin), float(vmax)
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmin > vmax:
        raise ValueError(f"need finite vmin <= vmax, got vmin={vmin}, vmax={vmax}")
    with np.errstate(invalid="ignore"):
        if vmax > vmin:
            norm = np.clip((score_map - vmin) / (vmax - vmin), 0.0, 1.0)
        else:
            # One level only: show a step, above it bright, at or below it dark.
            norm = (score_map > vmin).astype(np.float64)
    norm[~finite] = 1.0
    return norm


def heatmap_overlay(
    image: np.ndarray,
    score_map: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Blend a colour-mapped anomaly score map over an image.

    Args:
        image: uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grey.
        score_map: float ``(h, w)`` scores (numpy or torch); resized bilinearly
            to ``(H, W)`` when the sizes differ.
        alpha: weight of the heat map, in [0, 1] (0 = the image, 1 = the heat map).
        vmin: score shown with the lowest colour; default: the map's 1st percentile.
        vmax: score shown with the highest colour; default: the map's 99th
            percentile. Scores outside [vmin, vmax] are clipped; non-finite
            scores (nan, ±inf) are shown as ``vmax``.
        colormap: an OpenCV colormap id (``cv2.COLORMAP_*``).

    Returns:
        uint8 ``(H, W, 3)`` RGB image.

    Raises:
        ValueError: on a wrong shape or dtype (the message names the shapes),
            ``alpha`` outside [0, 1], or ``vmin > vmax``.
    """
    image = np.asarray(image)
    scores = _float_array(score_map)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype} (shape {image.shape})")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(
            f"score_map must be a non-empty (h, w) array, got shape {scores.shape} (image {image.shape})"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    h, w = rgb.shape[:2]

    # Normalise before resizing so non-finite and extreme scores are already tamed and
    # cannot smear into their neighbours through the interpolation.
    norm = _normalized(scores, vmin, vmax).astype(np.float32)
    if norm.shape != (h, w):
        norm = cv2.resize(norm, (w, h), interpolation=cv2.INTER_LINEAR)
    levels = np.round(np.clip(norm, 0.0, 1.0) * 255.0).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike[str], image_rgb_uint8: np.ndarray, make_parents: bool = True) -> None:
    """Write an RGB (or grey) uint8 image as PNG, atomically.

    Args:
        path: destination, must end in ``.png``; parent folders are created (unless
            ``make_parents`` is off: then a missing folder is an error).
        image_rgb_uint8: uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grey.

    Raises:
        ValueError: on a wrong shape/dtype or a non-``.png`` path.
        OSError: if OpenCV fails to write (the message names ``path``); no
            partial file is left behind.
    """
    image = np.asarray(image_rgb_uint8)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(
            "expected a uint8 (H, W, 3) RGB or (H, W) grey image, "
            f"got dtype {image.dtype} shape {image.shape}"
        )
    if not os.fspath(path).lower().endswith(".png"):
        # cv2 picks the format from the suffix: refuse to silently write a JPEG or fail later.
        raise ValueError(f"save_png needs a .png path, got {os.fspath(path)!r}")
    # OpenCV expects BGR channel order.
    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    with atomic_path(path, make_parents) as tmp:
        try:
            ok = cv2.imwrite(str(tmp), out)
        except cv2.error as exc:
            raise OSError(f"could not write PNG {os.fspath(path)!r}: {exc}") from exc
        if not ok:
            raise OSError(f"cv2.imwrite could not write PNG {os.fspath(path)!r}")


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot, no global backend switch
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)


def plot_roc_curves(
    path: str | os.PathLike[str],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str = "",
) -> None:
    """Draw several ROC curves on one plot and save it as PNG, atomically.

    Args:
        path: destination PNG.
        curves: ``name -> (scores, labels)``; 1-D scores (higher = more
            anomalous) and 0/1 labels (1 = anomaly), as for
            :func:`densead.metrics.roc_curve`. The legend shows each curve's AUROC.
        title: plot title.

    Raises:
        ValueError: if ``curves`` is empty or an entry is invalid (see
            :func:`densead.metrics.roc_curve`).
    """
    if not curves:
        raise ValueError("plot_roc_curves needs at least one curve")
    fig = _new_figure((5.0, 5.0))
    ax = fig.add_subplot()
    for name, (scores, labels) in curves.items():
        fpr, tpr = roc_curve(scores, labels)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {auroc(scores, labels):.3f})")
    ax.plot([0.0, 1.0], [0.0, 1.0], ls="--", lw=1.0, color="grey", label="chance")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    _save_figure(fig, path)


def plot_score_histograms(
    path: str | os.PathLike[str],
    groups: dict[str, np.ndarray],
    title: str = "",
    bins: int = 50,
) -> None:
    """Overlay normalised score histograms of several groups and save as PNG, atomically.

    All groups share one set of bin edges, computed over the finite scores of
    every group, so their shapes compare directly; each histogram is a density
    (area 1). Non-finite scores are left out and counted in the legend.

    Args:
        path: destination PNG.
        groups: ``name -> scores`` (any shape, numpy or torch), e.g.
            ``{"in-dist test": ..., "SVHN": ...}``.
        title: plot title.
        bins: number of shared bins.

    Raises:
        ValueError: if ``groups`` is empty, ``bins < 1``, or a group has no
            finite score (the message names it).
    """
    if not groups:
        raise ValueError("plot_score_histograms needs at least one group")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    finite: dict[str, np.ndarray] = {}
    dropped: dict[str, int] = {}
    for name, scores in groups.items():
        values = _float_array(scores).ravel()
        keep = np.isfinite(values)
        if not keep.any():
            raise ValueError(f"group {name!r} has no finite score ({values.size} values)")
        finite[name] = values[keep]
        dropped[name] = int(values.size - np.count_nonzero(keep))
    edges = _bin_edges(np.concatenate(list(finite.values())), bins)

    fig = _new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    for name, values in finite.items():
        note = f", {dropped[name]} non-finite left out" if dropped[name] else ""
        label = f"{name} (n={values.size}{note})"
        _, _, patches = ax.hist(values, edges, density=True, histtype="stepfilled", alpha=0.35, label=label)
        # A solid outline in the same colour keeps overlapping groups readable.
        colour = patches[0].get_facecolor()[:3]
        ax.hist(values, edges, density=True, histtype="step", lw=1.2, color=colour)
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    _save_figure(fig, path)


def _bin_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """``bins`` equal-width bins over finite ``values``, as numpy makes them; fewer where their
    range holds fewer distinct floats, or spans more than the largest float (numpy refuses both)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # numpy overflows before it refuses
            return np.histogram_bin_edges(values, bins=bins)
    except ValueError:
        pass
    lo, hi = float(values.min()), float(values.max())
    edges = np.unique(np.linspace(lo / 2, hi / 2, bins + 1) * 2)  # halves: a finite difference
    edges[0], edges[-1] = lo, hi
    return edges


def plot_bars(
    path: str | os.PathLike[str],
    values: dict[str, float],
    title: str = "",
    ylabel: str = "",
) -> None:
    """A bar chart of named values (e.g. each scale's share of log p), saved as PNG atomically.

    Args:
        path: destination PNG.
        values: ``name -> value``, drawn in the given order, each bar labelled
            with its value.
        title: plot title.
        ylabel: y-axis label.

    Raises:
        ValueError: if ``values`` is empty.
    """
    if not values:
        raise ValueError("plot_bars needs at least one value")
    names = [str(k) for k in values]
    heights = [float(v) for v in values.values()]
    fig = _new_figure((max(4.0, 0.8 * len(names) + 2.0), 4.0))
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), heights, color="tab:blue")
    ax.bar_label(bars, labels=[f"{h:.3g}" for h in heights], fontsize="small")
    crowded = len(names) > 5  # slant long lists of names so they do not overlap
    ax.set_xticks(
        range(len(names)), names, rotation=30 if crowded else 0, ha="right" if crowded else "center"
    )
    ax.axhline(0.0, color="black", lw=0.8)
    ax.grid(axis="y", alpha=0.3)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    _save_figure(fig, path)
