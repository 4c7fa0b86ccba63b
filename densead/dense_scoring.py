"""Dense anomaly maps of road frames: map producers, dataset-level rescaling, files, pixel metrics.

**Maps** come from a :class:`~densead.frame_scorers.FrameScorer`: frames in, ``{detector: (B, H, W)}``
maps at the frames' native resolution out (higher = more anomalous), always the detectors' own
map functions, no second implementation (see :mod:`densead.frame_scorers` for the geometry):

* Glow detectors (raw, ratio, ``scale<i>``, ``last_scale``, ...): a frame is padded at the
  bottom/right (mirrored) to a multiple of ``downscale · 2^L``, shrunk by ``downscale`` (block
  means, as in training), and scored by :meth:`densead.detectors.GlowScorer.score_maps`. Each
  model pixel's value is then spread evenly over the ``downscale × downscale`` native pixels it
  covers (divided by ``downscale²``, as the Glow spreads its scales) and the padding is cut off.
  So on the padded frame the map sums to the detector's score of the padded, shrunk frame
  (``−log p`` for ``raw``).
* Feature-density detectors (``density_<tap>``, ``density_mean``, ``density_min``, ``msp``,
  ``max_logit``, ``entropy``, ``energy``, ``sml``) of a flows checkpoint: frames resized and
  padded as the flows run saw them, maps resized back bilinearly.
* Combinations ``combo:<a>+<b>``: the mean of the components' maps, each standardized on the
  inlier pixels of calibration frames of another split (:mod:`densead.combined_maps`).

:func:`score_road_dataset` builds the producer from detector names and checkpoints.

**Files** written by :func:`write_frame_maps` into ``out_dir``::

    maps/<detector>/<frame>.npy       float16 (H, W) in [0, 1], the frame's own shape
    overlays/<detector>/<frame>.png   the map as a heat map over the frame
                                      (combination folders: combo-<a>+<b>, see detector_folder)
    summary.csv                       per frame: name, height, width, anomaly_fraction,
                                      void_fraction, <detector>_mean, <detector>_max (raw units)
    rescale.json                      per detector the [lo, hi] of the rescaling
    run.json                          provenance: source, checkpoints, detectors, the producer's
                                      settings (downscale, feature scale, combinations and their
                                      calibration constants and frames), frames, and for
                                      feature detectors training_frames_scored: how many
                                      frames under test trained the flows (a warning if any)

(``/`` in a frame name becomes ``__`` in file names.)

**Rescaling to [0, 1]** (SegmentMeIfYouCan wants maps in [0, 1]): one affine map per detector for
the whole dataset, ``s ↦ clip((s − lo) / (hi − lo), 0, 1)``, with ``lo``/``hi`` the minimum and
maximum of that detector over every pixel of every frame, found by a first pass over the dataset
(or given, e.g. calibrated on another split: ``rescale=MapRescale.load(...)``; then scores outside
``[lo, hi]`` clip to 0 or 1). Being monotone and shared by all frames, it keeps the order of
pixels *across* frames, which the pixel metrics need; a per-frame min-max would not (every frame
would span [0, 1] whatever its scores). The float16 cast is monotone too but merges scores closer
than its resolution (2^-11 relative, about 5e-4 of the range near 1). Pixels whose log-density
was not finite carry the detectors' sentinel (±1e12) and are left out of ``lo``/``hi``; they clip
to 0 or 1. Overlays use each frame's 1st/99th percentiles for contrast (pictures only).

**Atomicity.** The first pass reads and scores every frame before anything is created, so a bad
frame (unreadable image, label of another size, missing label file) stops the run with an error
naming the file and no output. Maps and overlays are written into a hidden staging folder inside
``out_dir`` that is removed on any error, leaving ``out_dir`` as it was. Once every frame is
written, the run replaces the previous one in ``out_dir`` as a whole: the old ``run.json`` is
deleted first (then the old ``summary.csv`` and ``rescale.json``), the old ``maps/`` and
``overlays/`` folders are renamed into the staging folder and the new ones renamed into place (so
no map or overlay of a frame or detector the new run did not score is left behind, and without
``overlays`` the old overlays go too), ``summary.csv``, ``rescale.json`` and ``run.json`` are
written (atomically) last, and the staging folder, holding the old maps, is deleted. A crash
during the swap leaves ``out_dir`` without a ``run.json``, never an old one describing new maps.
Other files in ``out_dir`` are not touched.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from densead.combined_maps import (
    COMBO_PREFIX,
    CombinedFrameScorer,
    fit_inlier_stats,
    parse_combinations,
    spread_frames,
)
from densead.data.road import ANOMALY, VOID, RoadDataset, read_label
from densead.dense import RoadSource, downscale_of, trained_data
from densead.detectors import DETECTORS, GlowDetector, GlowScorer, get_detector
from densead.evaluation import (
    COMPONENT_METRICS,
    COMPONENT_TITLES,
    METRICS,
    Bootstrap,
    ComponentIntervals,
    DifferenceRow,
    MetricIntervals,
    check_comparison,
    differences_markdown,
    intervals,
    table_columns,
    write_differences,
)
from densead.frame_scorers import (
    SENTINEL_LIMIT,
    FeatureFrameScorer,
    FrameScorer,
    GlowFrameScorer,
    StackedFrameScorer,
    frame_maps,
    iter_frame_maps,
)
from densead.io import (
    atomic_write_text,
    check_output_dir,
    not_a_file,
    signals_deferred,
    staging_folder,
    swap_folders,
)
from densead.metrics import (
    ComponentMetrics,
    FalsePositivesByClass,
    FrameHistograms,
    PixelF1,
    PixelMetrics,
    bootstrap_component_metrics,
    bootstrap_frame_metrics,
)
from densead.scoring import write_scores_csv
from densead.train import load_glow, resolve_device
from densead.viz import heatmap_overlay, save_png

__all__ = [
    "ClassFalsePositiveRow",
    "ComponentMetricRow",
    "DenseEvaluation",
    "component_metrics_markdown",
    "evaluate_dense",
    "evaluate_dense_components",
    "write_component_metrics",
    "DenseRun",
    "MapRescale",
    "PixelMetricRow",
    "evaluate_dense_run",
    "evaluate_dense_run_by_class",
    "false_positives_by_class",
    "false_positives_markdown",
    "SENTINEL_LIMIT",
    "frame_maps",
    "pixel_metrics_markdown",
    "run_detectors",
    "detector_folder",
    "safe_name",
    "score_road_dataset",
    "write_dense_maps",
    "write_frame_maps",
    "write_false_positives",
    "write_pixel_metrics",
]

RUN_FILE = "run.json"
RESCALE_FILE = "rescale.json"
SUMMARY_FILE = "summary.csv"


def safe_name(name: str) -> str:
    """A frame name as a file stem (``/`` → ``__``)."""
    return name.replace("/", "__")


def detector_folder(detector: str) -> str:
    """A detector's folder under ``maps/`` and ``overlays/``: its name, with a combination's
    ``combo:`` as ``combo-`` (Windows allows no ``:`` in file names)."""
    return detector.replace(":", "-")


def _map_folder(run_dir: Path, detector: str) -> Path:
    """``maps/<detector_folder>`` of a run; runs written before the folders were renamed have
    ``maps/combo:<a>+<b>``, read where it is the one that exists."""
    folder = run_dir / "maps" / detector_folder(detector)
    legacy = run_dir / "maps" / detector
    return legacy if not folder.is_dir() and legacy.is_dir() else folder


# --------------------------------------------------------------------------- rescaling


@dataclass(frozen=True)
class MapRescale:
    """Dataset-level min-max per detector: ``s ↦ clip((s − lo) / (hi − lo), 0, 1)`` as float16.

    Attributes:
        bounds: ``{detector: (lo, hi)}``.
    """

    bounds: dict[str, tuple[float, float]]

    def apply(self, detector: str, score_map: np.ndarray) -> np.ndarray:
        """The rescaled float16 map; monotone in the scores, so their order is kept."""
        if detector not in self.bounds:
            raise KeyError(f"no rescaling bounds for detector {detector!r} (have: {', '.join(self.bounds)})")
        lo, hi = self.bounds[detector]
        s = np.asarray(score_map, dtype=np.float64)
        # With one level only (hi == lo), everything at or below it is 0.
        scaled = (s - lo) / (hi - lo) if hi > lo else (s > lo).astype(np.float64)
        return np.clip(np.nan_to_num(scaled, nan=1.0), 0.0, 1.0).astype(np.float16)

    @classmethod
    def fit(cls, ranges: Mapping[str, tuple[float, float]]) -> MapRescale:
        """From observed ``(min, max)`` per detector (``(inf, -inf)`` when nothing finite was seen)."""
        bounds = {}
        for name, (lo, hi) in ranges.items():
            if not (math.isfinite(lo) and math.isfinite(hi)):
                lo = hi = 0.0
            bounds[name] = (float(lo), float(hi))
        return cls(bounds)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({k: list(v) for k, v in self.bounds.items()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MapRescale:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(not_a_file(path, "rescale file"))
        try:
            data = json.loads(path.read_text())
            return cls({str(k): (float(v[0]), float(v[1])) for k, v in data.items()})
        except (ValueError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(f"{path}: not a rescale file ({{detector: [lo, hi]}}): {err}") from None


def _update_range(ranges: dict[str, tuple[float, float]], name: str, m: np.ndarray) -> None:
    real = m[np.abs(m) < SENTINEL_LIMIT]
    if real.size:
        lo, hi = ranges.get(name, (math.inf, -math.inf))
        ranges[name] = (min(lo, float(real.min())), max(hi, float(real.max())))
    else:
        ranges.setdefault(name, (math.inf, -math.inf))


# --------------------------------------------------------------------------- writing a run


@dataclass(frozen=True)
class DenseRun:
    """Where a dense scoring run wrote its files."""

    out_dir: Path
    names: tuple[str, ...]
    detectors: tuple[str, ...]
    rescale: MapRescale

    def map_path(self, detector: str, name: str) -> Path:
        return self.out_dir / "maps" / detector_folder(detector) / f"{safe_name(name)}.npy"

    def overlay_path(self, detector: str, name: str) -> Path:
        return self.out_dir / "overlays" / detector_folder(detector) / f"{safe_name(name)}.png"


def _label_stats(label: np.ndarray | None) -> tuple[Any, Any]:
    """``(anomaly fraction of non-void pixels, void fraction)``; empty strings without a label."""
    if label is None:
        return "", ""
    n_void = int(np.count_nonzero(label == VOID))
    valid = label.size - n_void
    anomaly = int(np.count_nonzero(label == ANOMALY)) / valid if valid else ""
    return anomaly, n_void / label.size


RUN_FOLDERS = ("maps", "overlays")


def _swap_in_run(staging: Path, out_dir: Path) -> None:
    """Replace the run in ``out_dir`` by the maps and overlays complete in ``staging`` (module docstring).

    ``run.json`` goes first, so no crash leaves it describing the new maps; the old folders are
    moved into ``staging`` (deleted with it), so no file of the old run stays next to the new ones.
    """
    for file in (RUN_FILE, SUMMARY_FILE, RESCALE_FILE):
        (out_dir / file).unlink(missing_ok=True)
    swap_folders(staging, out_dir, RUN_FOLDERS)


def write_frame_maps(
    dataset: RoadDataset,
    scorer: FrameScorer,
    out_dir: str | Path,
    rescale: MapRescale | None = None,
    overlays: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
) -> DenseRun:
    """Score every frame of ``dataset`` and write maps, overlays and the summary (module docstring).

    Args:
        dataset: road frames (labels optional).
        scorer: the map producer (:mod:`densead.frame_scorers`); its ``describe()`` goes into
            ``run.json``.
        out_dir: output folder (created). A previous run in it is replaced: its ``maps/`` and
            ``overlays/`` folders and its summary, rescale and run files (other files are kept).
        rescale: fixed ``[lo, hi]`` per detector; None calibrates them on ``dataset`` in a first
            pass.
        overlays: also write the heat-map PNGs.
        batch_size: consecutive frames of one size scored together.
        progress: tqdm bars.
        info: extra provenance for ``run.json`` (e.g. the source and checkpoints).
    """
    names = list(scorer.names)
    if len(set(names)) != len(names):
        raise ValueError(f"detectors repeat: {names}")
    out_dir = check_output_dir(out_dir, "output folder")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stems: dict[str, str] = {}
    for frame in dataset.frames:  # two frames must not write one map file
        other = stems.setdefault(safe_name(frame.name), frame.name)
        if other != frame.name:
            raise ValueError(
                f"frames {other!r} and {frame.name!r} would both be written as {safe_name(frame.name)}.npy "
                f"(frame names become file names with / as __): rename one"
            )
    if rescale is None:
        ranges: dict[str, tuple[float, float]] = {}
        for _, maps in iter_frame_maps(dataset, scorer, batch_size, progress, "calibrate"):
            for name, m in maps.items():
                _update_range(ranges, name, m)
        rescale = MapRescale.fit(ranges)
    else:
        missing = [n for n in names if n not in rescale.bounds]
        if missing:
            raise ValueError(
                f"rescale has no bounds for detector(s) {missing} (has: {', '.join(rescale.bounds)})"
            )

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with staging_folder(out_dir) as staging:  # removed however the block ends
            fixed = ("name", "height", "width", "anomaly_fraction", "void_fraction")
            columns: dict[str, list] = {k: [] for k in fixed}
            for n in names:
                columns[f"{n}_mean"], columns[f"{n}_max"] = [], []
            frame_names = []
            for item, maps in iter_frame_maps(dataset, scorer, batch_size, progress, f"score {out_dir.name}"):
                name, stem = item["name"], safe_name(item["name"])
                frame_names.append(name)
                anomaly, void = _label_stats(item["label"])
                columns["name"].append(name)
                columns["height"].append(item["image"].shape[0])
                columns["width"].append(item["image"].shape[1])
                columns["anomaly_fraction"].append(anomaly)
                columns["void_fraction"].append(void)
                for n, m in maps.items():
                    columns[f"{n}_mean"].append(float(m.mean(dtype=np.float64)))
                    columns[f"{n}_max"].append(float(m.max()))
                    folder = detector_folder(n)
                    (staging / "maps" / folder).mkdir(parents=True, exist_ok=True)
                    np.save(staging / "maps" / folder / f"{stem}.npy", rescale.apply(n, m))
                    if overlays:
                        overlay = heatmap_overlay(item["image"], m)
                        save_png(staging / "overlays" / folder / f"{stem}.png", overlay)
            _swap_in_run(staging, out_dir)
            write_scores_csv(out_dir / SUMMARY_FILE, columns)
            rescale.save(out_dir / RESCALE_FILE)
            run = {
                **dict(info or {}),
                "detectors": names,
                **scorer.describe(),
                "map_dtype": "float16",
                "rescale": {k: list(v) for k, v in rescale.bounds.items()},
                "frames": frame_names,
            }
            atomic_write_text(out_dir / RUN_FILE, json.dumps(run, indent=2) + "\n")
    except BaseException:
        with signals_deferred():
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    return DenseRun(out_dir, tuple(frame_names), tuple(names), rescale)


def write_dense_maps(
    dataset: RoadDataset,
    scorer: GlowScorer,
    detectors: Sequence[GlowDetector],
    out_dir: str | Path,
    downscale: int = 1,
    rescale: MapRescale | None = None,
    overlays: bool = True,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
) -> DenseRun:
    """:func:`write_frame_maps` of Glow detectors (:class:`~densead.frame_scorers.GlowFrameScorer`)."""
    glow = GlowFrameScorer(scorer, detectors, downscale, device)
    return write_frame_maps(dataset, glow, out_dir, rescale, overlays, batch_size, progress, info)


FEATURE_DETECTOR_NAMES = "density_<tap>, density_mean, density_min, msp, max_logit, entropy, energy, sml"


def _shared_frames(a: RoadDataset, b: RoadDataset) -> list[str]:
    """Names of the frames (same image file) that two opened datasets both hold."""
    return _frames_in(a, {f.image.resolve() for f in b.frames})


def _frames_in(dataset: RoadDataset, files: set[Path]) -> list[str]:
    return [f.name for f in dataset.frames if f.image.resolve() in files]


def _glow_detector(name: str, feature_names: Sequence[str] | None) -> GlowDetector:
    """The Glow detector ``name``; the error lists every valid name, feature detectors included."""
    try:
        return get_detector(name)
    except ValueError:
        features = f"{FEATURE_DETECTOR_NAMES} (need feature_flows)" if feature_names is None else ""
        hint = ""
        if name == "sml" and feature_names is not None:  # a flows checkpoint without its statistics
            hint = (
                " (sml needs the max-logit statistics of the training pixels, which the feature-flows "
                "checkpoint predates: retrain it with tools/train_feature_flows.py)"
            )
        raise ValueError(
            f"unknown detector {name!r}{hint}; valid: Glow detectors {', '.join(DETECTORS)}, scale<i>, "
            f"ratio_scale<i>; feature detectors {features or ', '.join(feature_names or ())}"
        ) from None


def _check_protocol(
    trained_by: str | Path, trained: Mapping[str, Any], dataset: RoadDataset, source: RoadSource
) -> None:
    """The model of ``trained_by`` scores only a dataset with the ``held_out`` / ``void`` classes
    it was trained with (``trained``: those it records; one it does not record is not checked):
    a model trained on the anomalies would see them."""
    for key in ("held_out", "void"):
        theirs, ours = trained.get(key), getattr(dataset, key, None)
        if theirs is not None and ours is not None and tuple(ours) != tuple(theirs):
            raise ValueError(
                f"{trained_by}: trained with {key}={list(theirs)}, but {source.name} uses {list(ours)}"
            )


def _glow_scorer(
    detectors: Sequence[GlowDetector],
    checkpoint: str | Path | None,
    general: str | Path | None,
    downscale: int | None,
    device: torch.device,
    dataset: RoadDataset,
    source: RoadSource,
) -> tuple[GlowFrameScorer, dict[str, Any]]:
    if checkpoint is None:
        raise ValueError(f"detector(s) {[d.name for d in detectors]} need a Glow checkpoint")
    if any(d.needs_general for d in detectors) and general is None:
        raise ValueError(f"detector(s) {[d.name for d in detectors if d.needs_general]} need a general Glow")
    model, _ = load_glow(checkpoint, device)
    general_model = load_glow(general, device)[0] if general is not None else None
    if general_model is not None and general_model.n_scales != model.n_scales:
        raise ValueError(f"{general}: {general_model.n_scales} scales, but {checkpoint} has {model.n_scales}")
    # Road Glows record their data protocol (image Glows record none: nothing to check).
    trained = {
        path: trained_data(path) for path in ([checkpoint] if general is None else [checkpoint, general])
    }
    for path, data in trained.items():
        _check_protocol(path, data, dataset, source)
    ours = downscale_of(trained[checkpoint])
    if general is not None:
        theirs = downscale_of(trained[general])
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(f"{general}: trained on frames shrunk {theirs}x, but {checkpoint} on {ours}x")
    if downscale is None:
        downscale = ours or 1
    info = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "general": str(Path(general).resolve()) if general is not None else None,
    }
    return GlowFrameScorer(GlowScorer(model, general_model), detectors, downscale, device), info


def _feature_scorer(
    feature_flows: str | Path,
    needed: Sequence[str],
    dataset: RoadDataset,
    source: RoadSource,
    device: torch.device,
    segmenter: str | Path | None = None,
) -> tuple[FeatureFrameScorer | None, tuple[str, ...], dict[str, Any]]:
    """(producer of the ``needed`` feature detectors or None, every feature detector name, provenance)."""
    from densead.detectors.feature_density import load_dense_detector  # pulls in timm (seconds)

    detector, cfg = load_dense_detector(feature_flows, device=device, segmenter=segmenter)
    _check_protocol(feature_flows, {"held_out": cfg.data.held_out, "void": cfg.data.void}, dataset, source)
    names = [n for n in needed if n in detector.names]
    scorer = (
        FeatureFrameScorer(detector, cfg.data.scale, cfg.data.pad_divisor, names, device) if names else None
    )
    try:
        seen: list[str] | None = _training_frames_scored(cfg.data, dataset)
    except (FileNotFoundError, ValueError) as err:  # e.g. a root not on this machine
        seen = None
        warnings.warn(
            f"cannot tell which frames of {source.name} the feature flows {feature_flows} were trained on "
            f"(run.json: training_frames_scored null): their training frames: {err}",
            stacklevel=3,
        )
    if seen:
        warnings.warn(
            f"{len(seen)} of the {len(dataset)} frames of {source.name} (e.g. {seen[0]}) are training frames "
            f"of the feature flows {feature_flows} (data.protocol {cfg.data.protocol}, role train): their "
            "maps are no held-out evaluation",
            stacklevel=3,
        )
    info = {
        "feature_flows": str(Path(feature_flows).resolve()),
        "segmenter": str(Path(cfg.segmenter).resolve()),
        "training_frames_scored": None if seen is None else len(seen),
    }
    return scorer, detector.names, info


def _training_frames_scored(data: Any, dataset: RoadDataset) -> list[str]:
    """Names of the frames of ``dataset`` that the feature flows were trained on (the ``train``
    role of their ``data`` config, a :class:`~densead.segmenter.SceneDataConfig`). Raises what
    listing that config's frames raises (FileNotFoundError, ValueError) where it cannot."""
    from densead.segmenter import scene_frames

    train = scene_frames(data, "train")
    return _frames_in(dataset, {ds.frames[i].image.resolve() for ds, i in train})


def score_road_dataset(
    source: RoadSource,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    detectors: Sequence[str] = ("raw",),
    general: str | Path | None = None,
    downscale: int | None = None,
    rescale: MapRescale | None = None,
    overlays: bool = True,
    batch_size: int = 1,
    device: str = "auto",
    progress: bool = True,
    feature_flows: str | Path | None = None,
    combine: Sequence[str] = (),
    calibration: RoadSource | None = None,
    calibration_frames: int = 64,
    segmenter: str | Path | None = None,
) -> DenseRun:
    """Dense maps of a road dataset (or image folder) from checkpoint(s), by detector names.

    Detector names may mix Glow detectors (from ``checkpoint`` and ``general``) and the
    feature-density detectors of ``feature_flows`` (``density_<tap>``, ``density_mean``,
    ``density_min``, ``msp``, ``max_logit``, ``entropy``, ``energy``, ``sml``); ``checkpoint``
    may be None when no Glow detector is asked for. ``combine`` (or detector names starting with
    ``combo:``) adds combinations such as ``"density_cls+ratio"``
    (:mod:`densead.combined_maps`), standardized on the inlier pixels of ``calibration_frames``
    frames spread over ``calibration`` (default: the ``train`` split of ``source``), which must
    not be the frames under test.

    ``downscale=None`` takes the factor the in-distribution Glow was trained with (1 for
    checkpoints that do not record one). ``segmenter`` replaces the segmenter path stored with
    ``feature_flows`` (its weights must still be those the flows were trained on). Everything
    else: :func:`write_frame_maps`.

    Raises:
        ValueError: an unknown detector or component (the message lists the valid ones), a
            detector whose checkpoint is missing, or calibration on the frames under test.
    """
    combos = parse_combinations([*combine, *(d for d in detectors if d.startswith(COMBO_PREFIX))])
    plain = [d for d in detectors if not d.startswith(COMBO_PREFIX)]
    needed = list(dict.fromkeys([*plain, *(c for combo in combos for c in combo.components)]))
    dev = resolve_device(device)
    check_output_dir(out_dir, "output folder")  # before the calibration pass, not after it
    info: dict[str, Any] = {"source": asdict(source), "set_name": source.name}
    info["source"]["root"] = str(Path(source.root).resolve())
    dataset = source.open()
    for key in ("held_out", "void"):  # the dataset's effective protocol, defaults included
        if hasattr(dataset, key):
            info["source"][key] = list(getattr(dataset, key))

    scorers: list[FrameScorer] = []
    feature_names: tuple[str, ...] = ()
    if feature_flows is not None:
        feature, feature_names, feature_info = _feature_scorer(
            feature_flows, needed, dataset, source, dev, segmenter
        )
        scorers += [feature] if feature is not None else []
        info.update(feature_info)
    glow_dets = [
        _glow_detector(n, feature_names if feature_flows else None) for n in needed if n not in feature_names
    ]
    if glow_dets:
        glow, glow_info = _glow_scorer(glow_dets, checkpoint, general, downscale, dev, dataset, source)
        scorers.insert(0, glow)
        info.update(glow_info)
    if not scorers:
        raise ValueError("no detectors asked for")

    scorer: FrameScorer
    if combos:
        calibration = calibration or replace(source, split="train", max_frames=0)
        cal_full = calibration.open()
        if shared := _shared_frames(cal_full, dataset):
            raise ValueError(
                f"calibration set {calibration.name} holds {len(shared)} frame(s) of the set under test "
                f"{source.name} (e.g. {shared[0]}): their labels must not be used"
            )
        cal_dataset = spread_frames(cal_full, calibration_frames)
        info["calibration_source"] = asdict(calibration)
        info["calibration_source"]["root"] = str(Path(calibration.root).resolve())
        for key in ("held_out", "void"):
            if hasattr(cal_dataset, key):
                info["calibration_source"][key] = list(getattr(cal_dataset, key))
        base = StackedFrameScorer(scorers)
        components = list(dict.fromkeys(c for combo in combos for c in combo.components))
        stats = fit_inlier_stats(base, cal_dataset, components, batch_size, progress)
        scorer = CombinedFrameScorer(base, combos, stats, keep=plain)
    else:
        scorer = StackedFrameScorer(scorers, plain)
    return write_frame_maps(dataset, scorer, out_dir, rescale, overlays, batch_size, progress, info)


# --------------------------------------------------------------------------- pixel metrics


@dataclass(frozen=True)
class PixelMetricRow(MetricIntervals):
    """One detector on one road set (interval bounds from a bootstrap over frames)."""

    set_name: str
    detector: str
    auroc: float
    ap: float
    fpr95: float
    n_pixels: int
    n_anomaly: int


def _read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished dense scoring run")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    for key in ("source", "detectors", "frames"):
        if key not in run:
            raise ValueError(f"{path}: missing {key!r}")
    return run


def run_detectors(run_dir: str | Path) -> list[str]:
    """The detectors a dense scoring run wrote maps for (its ``run.json``)."""
    return list(_read_run(Path(run_dir))["detectors"])


def _open_run(
    run_dir: Path, detectors: Sequence[str] | None
) -> tuple[dict[str, Any], RoadSource, RoadDataset, list[str]]:
    """``run.json``, the source and dataset it was scored from, and the detectors asked for."""
    run = _read_run(run_dir)
    src = dict(run["source"])
    for key in ("held_out", "void"):
        if src.get(key) is not None:
            src[key] = tuple(src[key])
    source = RoadSource(**src)
    dataset = source.open()
    detectors = list(detectors or run["detectors"])
    unknown = [d for d in detectors if d not in run["detectors"]]
    if unknown:
        raise KeyError(f"{run_dir}: no maps for detector(s) {unknown} (have: {', '.join(run['detectors'])})")
    return run, source, dataset, detectors


def _labelled_maps(
    run_dir: Path,
    run: Mapping[str, Any],
    source: RoadSource,
    dataset: RoadDataset,
    detectors: Sequence[str],
    progress: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]]:
    """Per frame of the run: (label 0/1/255, semantic ids or None, ``{detector: float16 map}``)."""
    frames = {f.name: f for f in dataset.frames}
    folders = {det: _map_folder(run_dir, det) for det in detectors}
    for name in tqdm(run["frames"], desc=f"evaluate {run_dir.name}", disable=not progress, leave=False):
        frame = frames.get(name)
        if frame is None:
            raise FileNotFoundError(f"frame {name!r} of {run_dir / RUN_FILE} is not in {source.root}")
        if frame.label is None:
            raise ValueError(f"frame {frame.image} has no label: pixel metrics need labelled frames")
        label, semantic = dataset.map_label(read_label(frame.label))
        maps = {}
        for det in detectors:
            maps[det] = _read_map(folders[det] / f"{safe_name(name)}.npy", label.shape, frame.label)
        yield label, semantic, maps


def _read_map(path: Path, shape: tuple[int, ...], label_path: Path) -> np.ndarray:
    """One written score map, checked as :func:`write_frame_maps` writes them: float16 in [0, 1],
    the label's shape. Errors name the map file."""
    if not path.is_file():
        raise FileNotFoundError(f"score map not found: {path}")
    try:
        m = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable score map ({err})") from None
    if m.dtype != np.float16:
        raise ValueError(f"{path}: score maps are float16 as dense scoring writes them, got {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"{path}: map of shape {m.shape} but label {label_path} is {shape}")
    bad = ~((m >= 0) & (m <= 1))  # NaN included
    if bad.any():
        raise ValueError(
            f"{path}: {int(bad.sum())} values outside [0, 1] or not finite (maps are rescaled to [0, 1])"
        )
    return m


def evaluate_dense_run(
    run_dir: str | Path,
    detectors: Sequence[str] | None = None,
    mode: str = "binned",
    progress: bool = False,
) -> list[PixelMetricRow]:
    """Pixel AUROC / AP / FPR95 of the written maps against the dataset's labels (void excluded).

    Reads ``run.json`` to reopen the dataset, then streams every frame's ``.npy`` maps and label
    through one :class:`densead.metrics.PixelMetrics` per detector.
    """
    return evaluate_dense(run_dir, detectors, mode, progress=progress).pixel


@dataclass(frozen=True)
class ClassFalsePositiveRow:
    """One class's part of a detector's false alarms at 95 % TPR (:class:`FalsePositivesByClass`)."""

    set_name: str
    detector: str
    class_name: str
    n_inlier: int
    n_flagged: int
    fpr: float
    share: float
    threshold: float


@dataclass(frozen=True)
class ComponentMetricRow(ComponentIntervals):
    """SegmentMeIfYouCan's component-level metrics of one detector on one road set (interval
    bounds of sIoU, PPV and mean F1 from a bootstrap over frames, at the row's threshold)."""

    set_name: str
    detector: str
    threshold: float  # the pixel-F1-optimal threshold of the [0, 1] maps
    pixel_f1: float
    siou: float
    ppv: float
    f1_mean: float
    f1_25: float
    f1_50: float
    f1_75: float
    n_instances: int
    n_segments: int
    min_segment_size: int
    min_instance_size: int


def false_positives_by_class(
    run_dir: str | Path, detectors: Sequence[str] | None = None, progress: bool = False
) -> list[ClassFalsePositiveRow]:
    """Which in-distribution classes each detector's false alarms at 95 % TPR come from.

    Needs a dataset with semantic labels (CamVid, Cityscapes: ``semantic_classes``); exact on the
    written float16 maps (:class:`densead.metrics.FalsePositivesByClass`). The rows of a detector
    follow the class ids; their ``n_flagged`` add up to the FPR95 of :func:`evaluate_dense_run`
    times the inlier count.
    """
    return evaluate_dense(run_dir, detectors, None, by_class=True, progress=progress).by_class


def evaluate_dense_run_by_class(
    run_dir: str | Path,
    detectors: Sequence[str] | None = None,
    mode: str = "binned",
    progress: bool = False,
) -> tuple[list[PixelMetricRow], list[ClassFalsePositiveRow]]:
    """:func:`evaluate_dense_run` and :func:`false_positives_by_class` in one pass over the maps."""
    out = evaluate_dense(run_dir, detectors, mode, by_class=True, progress=progress)
    return out.pixel, out.by_class


@dataclass(frozen=True)
class DenseEvaluation:
    """What :func:`evaluate_dense` was asked for; lists of what it was not asked for are empty."""

    pixel: list[PixelMetricRow]
    by_class: list[ClassFalsePositiveRow]
    components: list[ComponentMetricRow]
    differences: list[DifferenceRow]  # of the pixel metrics
    component_differences: list[DifferenceRow]

    def renamed(self, set_name: str) -> DenseEvaluation:
        """The same rows under another set name (two runs of one set evaluated together)."""
        tables = (getattr(self, f) for f in self.__dataclass_fields__)
        return DenseEvaluation(*([replace(r, set_name=set_name) for r in rows] for rows in tables))


def evaluate_dense(
    run_dir: str | Path,
    detectors: Sequence[str] | None = None,
    mode: str | None = "binned",
    by_class: bool = False,
    components: tuple[int, int] | None = None,
    progress: bool = False,
    bootstrap: Bootstrap | None = None,
    baseline: str | None = None,
) -> DenseEvaluation:
    """Everything asked of a run's maps, reading them as few times as it can.

    One pass gives the pixel metrics (``mode`` given, :func:`evaluate_dense_run`; with a
    ``bootstrap``, intervals from resampled frames, :func:`densead.metrics.bootstrap_frame_metrics`,
    and with a ``baseline`` detector each other detector's paired difference to it), the false
    alarms by class (``by_class``, :func:`false_positives_by_class`) and, with ``components =
    (min_segment_size, min_instance_size)``, each detector's best-pixel-F1 threshold; a second pass
    then scores the components there (:func:`evaluate_dense_components`; with a ``bootstrap``,
    intervals and differences of sIoU, PPV and mean F1 from resampled frames at those thresholds,
    :func:`densead.metrics.bootstrap_component_metrics`).
    """
    run_dir = Path(run_dir)
    if bootstrap is not None and mode is None and components is None:
        raise ValueError("a bootstrap needs the pixel metrics (mode binned or exact) or the components")
    run, source, dataset, detectors = _open_run(run_dir, detectors)
    check_comparison(detectors, bootstrap, baseline)
    names = dataset.semantic_classes
    if by_class and not names:
        raise ValueError(f"{source.name} ({type(dataset).__name__}) has no semantic labels to break down by")
    metrics = {d: PixelMetrics(mode) for d in detectors} if mode is not None else {}
    frames = {d: FrameHistograms() for d in detectors} if bootstrap is not None and metrics else {}
    counters = {d: FalsePositivesByClass(len(names)) for d in detectors} if by_class else {}
    pixel_f1 = {d: PixelF1() for d in detectors} if components is not None else {}
    for label, semantic, maps in _labelled_maps(run_dir, run, source, dataset, detectors, progress):
        for det, m in maps.items():
            if metrics:
                metrics[det].update(m.astype(np.float32), label)
            if frames:
                frames[det].update(m, label)
            if counters:
                counters[det].update(m, label, semantic)
            if pixel_f1:
                pixel_f1[det].update(m, label)
    set_name = run.get("set_name", source.name)
    points = {det: pm.compute() for det, pm in metrics.items()}
    bounds: dict[str, dict[str, float]] = {}
    diffs: list[DifferenceRow] = []
    if frames:
        reps = bootstrap_frame_metrics(frames, bootstrap.n_resamples, bootstrap.seed_for(set_name))
        bounds, diffs = intervals(reps, points, bootstrap, baseline, set_name)
    rows = [
        PixelMetricRow(
            set_name,
            det,
            *(r[k] for k in ("auroc", "ap", "fpr95", "n_pixels", "n_anomaly")),
            **bounds.get(det, {}),
        )
        for det, r in points.items()
    ]
    class_rows = []
    for det, counter in counters.items():
        out = counter.compute()
        for c in out["classes"]:
            name = names[c["id"]] if c["id"] != "other" else "other"
            values = (c["n_inlier"], c["n_flagged"], c["fpr"], c["share"], out["threshold"])
            class_rows.append(ClassFalsePositiveRow(set_name, det, name, *values))
    component_rows, component_diffs = [], []
    if components is not None:
        best = {det: f1.compute() for det, f1 in pixel_f1.items()}
        min_segment_size, min_instance_size = components
        scored = {det: ComponentMetrics(best[det]["threshold"], *components) for det in detectors}
        for label, _, maps in _labelled_maps(run_dir, run, source, dataset, detectors, progress):
            for det, m in maps.items():
                scored[det].update(m, label)
        outs = {det: cm.compute() for det, cm in scored.items()}
        component_bounds: dict[str, dict[str, float]] = {}
        if bootstrap is not None:
            reps = bootstrap_component_metrics(scored, bootstrap.n_resamples, bootstrap.seed_for(set_name))
            component_bounds, component_diffs = intervals(
                reps, outs, bootstrap, baseline, set_name, COMPONENT_METRICS, may_be_undefined=("ppv",)
            )
        for det, out in outs.items():
            f1 = {round(100 * r["threshold"]): r["f1"] for r in out["per_threshold"]}
            values = (out["siou"], out["ppv"], out["f1_mean"], f1[25], f1[50], f1[75])
            counts = (out["n_instances"], out["n_segments"], min_segment_size, min_instance_size)
            component_rows.append(
                ComponentMetricRow(
                    set_name,
                    det,
                    best[det]["threshold"],
                    best[det]["f1"],
                    *values,
                    *counts,
                    **component_bounds.get(det, {}),
                )
            )
    return DenseEvaluation(rows, class_rows, component_rows, diffs, component_diffs)


def evaluate_dense_components(
    run_dir: str | Path,
    detectors: Sequence[str] | None = None,
    min_segment_size: int = 500,
    min_instance_size: int = 100,
    progress: bool = False,
    bootstrap: Bootstrap | None = None,
) -> list[ComponentMetricRow]:
    """Component-level sIoU / PPV / mean F1 of the written maps (:class:`densead.metrics.ComponentMetrics`).

    Two passes over the maps, as the benchmark: the first finds each detector's threshold of best
    pixel F1 (:class:`densead.metrics.PixelF1`, exact on the float16 maps), the second thresholds
    every frame there and scores its connected components. The size limits are in pixels of the
    written maps (the benchmark's RoadAnomaly21 defaults, 500 and 100, are for frames of about
    2048 × 1024; RoadObstacle21 uses 50 and 10). With a ``bootstrap``: intervals of sIoU, PPV and
    mean F1 from resampled frames, each detector at its threshold.
    """
    components = (min_segment_size, min_instance_size)
    out = evaluate_dense(
        run_dir, detectors, None, components=components, progress=progress, bootstrap=bootstrap
    )
    return out.components


def component_metrics_markdown(
    rows: Sequence[ComponentMetricRow],
    differences: Sequence[DifferenceRow] = (),
    bootstrap: Bootstrap | None = None,
) -> str:
    """One markdown table per road set: the component metrics per detector, in %, with intervals
    of sIoU, PPV and mean F1 as ``value [lo, hi]`` where the rows have them (``bootstrap`` names
    them); then the ``differences`` to a baseline, if any."""
    parts = []
    for set_name in dict.fromkeys(r.set_name for r in rows):
        sub = [r for r in rows if r.set_name == set_name]
        caption = f"; {bootstrap.caption()} over frames at each threshold" if bootstrap is not None else ""
        lines = [
            f"### {set_name}: components ({sub[0].n_instances} anomaly instances of ≥ "
            f"{sub[0].min_instance_size} px; segments of ≥ {sub[0].min_segment_size} px{caption})",
            "",
            "| detector | threshold | pixel F1 | sIoU | PPV | mean F1 | F1 @0.25 | F1 @0.50 | F1 @0.75 "
            "| segments |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.detector} | {r.threshold:.4g} | {100 * r.pixel_f1:.2f} | "
            + " | ".join(r.cell(m, 2) for m in COMPONENT_METRICS)
            + f" | {100 * r.f1_25:.2f} | {100 * r.f1_50:.2f} | {100 * r.f1_75:.2f} | {r.n_segments} |"
            for r in sub
        ]
        parts.append("\n".join(lines))
    markdown = "\n\n".join(parts) + "\n"
    if differences and bootstrap is not None:
        markdown += "\n" + differences_markdown(
            differences, bootstrap, decimals=2, metrics=COMPONENT_METRICS, titles=COMPONENT_TITLES
        )
    return markdown


def write_component_metrics(
    out_dir: str | Path,
    rows: Sequence[ComponentMetricRow],
    differences: Sequence[DifferenceRow] = (),
    bootstrap: Bootstrap | None = None,
) -> None:
    """``component_metrics.csv`` and ``component_metrics.md`` in ``out_dir`` (atomically); with
    ``differences`` also ``component_differences.csv`` (and without them none, as
    :func:`write_pixel_metrics`). Interval columns only where the rows have them."""
    markdown = component_metrics_markdown(rows, differences, bootstrap)
    _write_interval_table(Path(out_dir), "component", ComponentMetricRow, rows, differences, markdown)


def _write_interval_table(
    out_dir: Path,
    prefix: str,
    row_type: type[PixelMetricRow] | type[ComponentMetricRow],
    rows: Sequence[Any],
    differences: Sequence[DifferenceRow],
    markdown: str,
) -> None:
    """``<prefix>_metrics.csv`` (interval columns where the rows have them) and ``.md``, and
    ``<prefix>_differences.csv`` (:func:`densead.evaluation.write_differences`), each atomically."""
    write_differences(out_dir / f"{prefix}_differences.csv", differences)
    fields = table_columns(row_type, rows)
    write_scores_csv(out_dir / f"{prefix}_metrics.csv", {f: [getattr(r, f) for r in rows] for f in fields})
    atomic_write_text(out_dir / f"{prefix}_metrics.md", markdown)


def _write_table(stem: Path, row_type: type, rows: Sequence[Any], markdown: Callable[[Any], str]) -> None:
    """``stem.csv`` (one column per field of ``row_type``) and ``stem.md``, each written atomically."""
    fields = list(row_type.__dataclass_fields__)
    write_scores_csv(stem.with_suffix(".csv"), {f: [getattr(r, f) for r in rows] for f in fields})
    atomic_write_text(stem.with_suffix(".md"), markdown(rows))


def false_positives_markdown(rows: Sequence[ClassFalsePositiveRow]) -> str:
    """Per road set: one row per detector, per class "FPR (share of all false alarms)" in %."""
    parts = []
    for set_name in dict.fromkeys(r.set_name for r in rows):
        sub = [r for r in rows if r.set_name == set_name]
        classes = list(dict.fromkeys(r.class_name for r in sub))
        lines = [
            f"### {set_name}: inlier pixels flagged at 95 % TPR, per class — FPR % (share of all flagged %)",
            "",
            "| detector | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes),
        ]
        for det in dict.fromkeys(r.detector for r in sub):
            cells = {
                r.class_name: f"{100 * r.fpr:.1f} ({100 * r.share:.1f})" for r in sub if r.detector == det
            }
            lines.append(f"| {det} | " + " | ".join(cells.get(c, "—") for c in classes) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_false_positives(out_dir: str | Path, rows: Sequence[ClassFalsePositiveRow]) -> None:
    """``pixel_fp_by_class.csv`` and ``pixel_fp_by_class.md`` in ``out_dir`` (atomically)."""
    _write_table(Path(out_dir) / "pixel_fp_by_class", ClassFalsePositiveRow, rows, false_positives_markdown)


def pixel_metrics_markdown(rows: Sequence[PixelMetricRow], bootstrap: Bootstrap | None = None) -> str:
    """One markdown table per road set: AUROC / AP / FPR95 per detector, with intervals as
    ``value [lo, hi]`` where the rows have them (``bootstrap`` names them)."""
    parts = []
    for set_name in dict.fromkeys(r.set_name for r in rows):
        sub = [r for r in rows if r.set_name == set_name]
        caption = f"; {bootstrap.caption()} over frames" if bootstrap is not None else ""
        lines = [
            f"### {set_name} ({sub[0].n_pixels} pixels, {sub[0].n_anomaly} anomalous, void excluded"
            f"{caption})",
            "",
            "| detector | AUROC % | AP % | FPR95 % |",
            "|---|---|---|---|",
        ]
        # Percent with two decimals, as every other table here (the CSV keeps the fractions).
        lines += [f"| {r.detector} | " + " | ".join(r.cell(m, 2) for m in METRICS) + " |" for r in sub]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_pixel_metrics(
    out_dir: str | Path,
    rows: Sequence[PixelMetricRow],
    differences: Sequence[DifferenceRow] = (),
    bootstrap: Bootstrap | None = None,
) -> None:
    """``pixel_metrics.csv`` and ``pixel_metrics.md`` in ``out_dir`` (atomically); with
    ``differences`` also ``pixel_differences.csv`` and their tables in ``pixel_metrics.md``, and
    without them no ``pixel_differences.csv``. Interval columns only where the rows have them."""
    markdown = pixel_metrics_markdown(rows, bootstrap)
    if differences:
        markdown += "\n" + differences_markdown(differences, bootstrap, decimals=2)
    _write_interval_table(Path(out_dir), "pixel", PixelMetricRow, rows, differences, markdown)
