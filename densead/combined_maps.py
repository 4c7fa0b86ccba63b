"""Combined anomaly maps: the mean of several detectors' maps, each standardized on inlier pixels.

For a combination of detectors ``1..n`` (named ``combo:<d1>+<d2>[+...]``)::

    combo(x) = (1/n) Σ_i (m_i(x) − μ_i) / σ_i

with ``μ_i`` and ``σ_i`` the mean and (population) standard deviation of map ``m_i`` over the
in-distribution pixels (label :data:`~densead.data.road.INLIER`) of a set of calibration frames,
found in a first pass (:func:`fit_inlier_stats`). The calibration frames must not be the frames
under test: by default they are the training split of the same dataset (the tools refuse the
split being scored), so no test label is ever looked at.

Why standardize: the components come in unrelated units (nats per native pixel for the Glow
maps, training-normalized log-likelihoods for ``density_*``, probabilities for ``msp``) and with
unrelated spreads; after standardization one unit means one inlier standard deviation for every
component, so each weighs equally on a typical in-distribution pixel, and the combination ranks
a pixel by how many inlier standard deviations above normal its components are on average.
Anomaly and void pixels never enter ``μ``/``σ``.

Pixels where a component carries a detector's sentinel for a non-finite log-density
(``|m| ≥`` :data:`~densead.frame_scorers.SENTINEL_LIMIT`) are excluded from ``μ``/``σ``; their
combined value is the sentinel itself (``+1e12`` if any component is ``+1e12``, otherwise
``−1e12``), so it is not averaged into an ordinary-looking number.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from densead.data.road import INLIER, RoadDataset
from densead.detectors.glow import with_sentinels
from densead.frame_scorers import SENTINEL_LIMIT, FrameScorer, iter_frame_maps

__all__ = [
    "COMBO_PREFIX",
    "Combination",
    "CombinedFrameScorer",
    "InlierStats",
    "fit_inlier_stats",
    "parse_combinations",
    "spread_frames",
]

COMBO_PREFIX = "combo:"


@dataclass(frozen=True)
class Combination:
    """Detectors averaged after standardization (module docstring)."""

    components: tuple[str, ...]

    @property
    def name(self) -> str:
        return COMBO_PREFIX + "+".join(self.components)

    @classmethod
    def parse(cls, spec: str) -> Combination:
        """``"density_cls+ratio"`` (``combo:`` prefix optional) → the combination."""
        body = spec.strip().removeprefix(COMBO_PREFIX)
        parts = tuple(p.strip() for p in body.split("+"))
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"combination {spec!r}: expected two or more detectors joined by '+'")
        if len(set(parts)) != len(parts):
            raise ValueError(f"combination {spec!r} repeats a detector")
        return cls(parts)


def parse_combinations(specs: str | Sequence[str]) -> list[Combination]:
    """Comma-separated (or listed) combinations, e.g. ``"density_cls+ratio,density_mean+last_scale"``."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    combos = [Combination.parse(s) for s in items if s.strip()]
    names = [c.name for c in combos]
    if len(set(names)) != len(names):
        raise ValueError(f"combinations repeat: {names}")
    return combos


@dataclass(frozen=True)
class InlierStats:
    """Per detector the mean, std and count of its map over the calibration frames' inlier pixels.

    Attributes:
        mean, std, count: ``{detector: value}``.
        frames: names of the calibration frames.
    """

    mean: dict[str, float]
    std: dict[str, float]
    count: dict[str, int]
    frames: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "count": self.count, "frames": list(self.frames)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InlierStats:
        return cls(
            {k: float(v) for k, v in data["mean"].items()},
            {k: float(v) for k, v in data["std"].items()},
            {k: int(v) for k, v in data["count"].items()},
            tuple(data["frames"]),
        )


def spread_frames(dataset: RoadDataset, n: int) -> RoadDataset:
    """A copy of ``dataset`` holding ``n`` frames evenly spread over it (all for ``n <= 0``).

    Road datasets are video sequences: the first frames would all show the same street.
    """
    if n <= 0 or n >= len(dataset):
        return dataset
    idx = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    subset = copy.copy(dataset)
    subset.frames = tuple(dataset.frames[i] for i in idx)
    return subset


def fit_inlier_stats(
    scorer: FrameScorer,
    dataset: RoadDataset,
    names: Sequence[str],
    batch_size: int = 1,
    progress: bool = False,
) -> InlierStats:
    """Mean and std of each of ``names`` over the inlier pixels of every frame of ``dataset``.

    Accumulated per frame in float64 and merged with Chan et al.'s pairwise update, so millions of
    pixels do not lose precision.

    Raises:
        ValueError: an unknown name, a frame without a label, no inlier pixel, or a map that is
            constant on the inlier pixels (its std would divide by zero).
    """
    unknown = [n for n in names if n not in scorer.names]
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown}; valid: {', '.join(scorer.names)}")
    count = dict.fromkeys(names, 0)
    mean = dict.fromkeys(names, 0.0)
    m2 = dict.fromkeys(names, 0.0)
    frames = []
    for item, maps in iter_frame_maps(dataset, scorer, batch_size, progress, "calibrate combinations"):
        if item["label"] is None:
            raise ValueError(f"calibration frame {item['name']!r} has no label: inlier pixels are unknown")
        frames.append(item["name"])
        inlier = item["label"] == INLIER
        for name in names:
            v = maps[name][inlier].astype(np.float64)
            v = v[np.isfinite(v) & (np.abs(v) < SENTINEL_LIMIT)]
            if not v.size:
                continue
            n_b, mean_b = v.size, float(v.mean())
            m2_b = float(((v - mean_b) ** 2).sum())
            n_a, n = count[name], count[name] + n_b
            delta = mean_b - mean[name]
            mean[name] += delta * n_b / n
            m2[name] += m2_b + delta * delta * n_a * n_b / n
            count[name] = n
    std = {}
    for name in names:
        if count[name] == 0:
            raise ValueError(
                f"detector {name!r}: no finite inlier pixel in {len(frames)} calibration frame(s)"
            )
        std[name] = math.sqrt(m2[name] / count[name])
        if not std[name] > 0:
            raise ValueError(
                f"detector {name!r} is constant on the calibration inlier pixels; cannot standardize"
            )
    return InlierStats(mean, std, count, tuple(frames))


class CombinedFrameScorer:
    """A producer's maps plus standardized-mean combinations of them (module docstring).

    Args:
        base: produces every component (and every detector in ``keep``).
        combinations: the combinations to add.
        stats: inlier mean and std of every component (:func:`fit_inlier_stats`).
        keep: which of ``base``'s maps to pass through (default: all); components not listed
            are computed but not returned.
    """

    def __init__(
        self,
        base: FrameScorer,
        combinations: Sequence[Combination],
        stats: InlierStats,
        keep: Sequence[str] | None = None,
    ) -> None:
        for combo in combinations:
            for c in combo.components:
                if c not in base.names:
                    raise ValueError(
                        f"combination {combo.name}: unknown component {c!r}; valid: {', '.join(base.names)}"
                    )
                if c not in stats.mean or c not in stats.std:
                    raise ValueError(f"combination {combo.name}: no calibration statistics for {c!r}")
        keep = tuple(base.names if keep is None else keep)
        unknown = [n for n in keep if n not in base.names]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; valid: {', '.join(base.names)}")
        self.base = base
        self.combinations = list(combinations)
        self.stats = stats
        self.keep = keep
        self.names = (*keep, *(c.name for c in self.combinations))
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"detectors repeat: {list(self.names)}")

    def combine(self, maps: Mapping[str, np.ndarray], combo: Combination) -> np.ndarray:
        """The combined map of ``combo`` from its components' maps (any shape, float32)."""
        parts = [np.asarray(maps[c], dtype=np.float64) for c in combo.components]
        z = sum(
            (p - self.stats.mean[c]) / self.stats.std[c] for c, p in zip(combo.components, parts, strict=True)
        )
        out = with_sentinels(torch.from_numpy(z / len(parts)), torch.from_numpy(np.stack(parts)))
        return out.numpy().astype(np.float32)

    def maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        base = self.base.maps(images)
        out = {n: base[n] for n in self.keep}
        for combo in self.combinations:
            out[combo.name] = self.combine(base, combo)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **self.base.describe(),
            "combine": {c.name: list(c.components) for c in self.combinations},
            "calibration": self.stats.to_dict(),
        }
