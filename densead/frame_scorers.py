"""Per-frame anomaly map producers for the dense pipeline (:mod:`densead.dense_scoring`).

A :class:`FrameScorer` turns same-size uint8 RGB frames ``(H, W, 3)`` into ``{detector: (B, H, W)
float32}`` maps at the frames' native resolution, higher = more anomalous. The producers wrap the
detectors' own map functions; none reimplements a score:

* :class:`GlowFrameScorer`: Glow pixel maps (raw, ratio, ``scale<i>``, ``last_scale``, ...) via
  :func:`frame_maps` — frames padded (mirrored) to ``downscale · 2^L``, shrunk by ``downscale``
  (block means), scored by :meth:`densead.detectors.GlowScorer.score_maps`, each model pixel
  spread evenly over the ``downscale²`` native pixels it covers, padding cut off.
* :class:`FeatureFrameScorer`: the per-pixel feature-density detector
  (:class:`~densead.detectors.feature_density.DenseFeatureDetector`: ``density_<tap>``,
  ``density_mean``, ``density_min``, ``msp``, ``max_logit``, ``entropy``, ``energy``, ``sml``).
  Frames go through the same geometry as the flows' training frames: resized by the run's ``data.scale`` with
  ``INTER_AREA`` (as :func:`densead.segmenter.load_scene_arrays`), mirror-padded bottom/right to
  ``data.pad_divisor`` (as :func:`densead.segmenter.iter_eval_batches`), scored, the padding cut
  off, and the maps resized back to the native frame bilinearly.
* :class:`StackedFrameScorer`: several producers side by side (e.g. Glow and feature detectors
  in one run).

Combined maps of several producers: :mod:`densead.combined_maps`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from densead.data.road import RoadDataset
from densead.data.transforms import to_model_input
from densead.dense import pad_to_multiple, shrink
from densead.detectors import GlowDetector, GlowScorer
from densead.detectors.glow import SENTINEL_LIMIT, upsample_map

if TYPE_CHECKING:
    from densead.detectors.feature_density import DenseFeatureDetector

__all__ = [
    "SENTINEL_LIMIT",
    "FeatureFrameScorer",
    "FrameScorer",
    "GlowFrameScorer",
    "StackedFrameScorer",
    "frame_maps",
    "iter_frame_maps",
]


@runtime_checkable
class FrameScorer(Protocol):
    """Anything that maps frames to named anomaly maps.

    Attributes:
        names: the detectors, in the order :meth:`maps` returns them.
    """

    names: tuple[str, ...]

    def maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Same-size uint8 ``(H, W, 3)`` frames → ``{name: (B, H, W) float32}``, higher = more anomalous."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance for ``run.json`` (JSON-serializable)."""
        ...


def _one_size(images: Sequence[np.ndarray], who: str) -> tuple[int, int]:
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{who} needs frames of one size, got {sorted(shapes)}")
    return images[0].shape[0], images[0].shape[1]


# --------------------------------------------------------------------------- Glow


def _check_per_pixel(detectors: Sequence[GlowDetector]) -> None:
    """A ValueError naming the detectors whose maps are no per-pixel decomposition."""
    whole = [d.name for d in detectors if not d.per_pixel or d.typical]
    if whole:
        raise ValueError(
            f"detector(s) {whole} score whole images (a file's code length is one number per image; "
            "typicality measures an image's bits/dim against the training images') and make no per-pixel "
            "map of road frames; score images with them (tools/score_images.py without --road, experiments)"
        )


def frame_maps(
    scorer: GlowScorer,
    images: Sequence[np.ndarray],
    detectors: Sequence[GlowDetector],
    downscale: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """``{detector: (B, H, W) float32}`` Glow maps of same-size uint8 RGB frames ``(H, W, 3)``.

    See the module docstring for padding, shrinking and spreading; higher = more anomalous.
    """
    _check_per_pixel(detectors)
    h, w = _one_size(images, "frame_maps")
    unit = downscale * 2**scorer.model.n_scales
    batch = np.stack([shrink(pad_to_multiple(im, unit), downscale) for im in images])
    x = to_model_input(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device), scorer.model.n_bins, False)
    results = scorer.score_maps(x, list(detectors))
    out = {}
    for name, (_, m) in results.items():
        m = m.float().cpu().numpy()
        if downscale > 1:
            m = np.repeat(np.repeat(m, downscale, axis=1), downscale, axis=2)
            # spread over the pixels it stands for; a sentinel stays one (SENTINEL_LIMIT)
            m = np.where(np.abs(m) >= SENTINEL_LIMIT, m, m / float(downscale * downscale))
        out[name] = np.ascontiguousarray(m[:, :h, :w], dtype=np.float32)
    return out


class GlowFrameScorer:
    """Glow detectors as a :class:`FrameScorer` (:func:`frame_maps`).

    Args:
        scorer: the in-distribution (and general) Glow.
        detectors: which maps.
        downscale: integer shrink factor of the frames before scoring.
        device: where the models are.
    """

    def __init__(
        self,
        scorer: GlowScorer,
        detectors: Sequence[GlowDetector],
        downscale: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if downscale < 1:
            raise ValueError(f"downscale must be a positive integer, got {downscale}")
        _check_per_pixel(detectors)
        self.scorer = scorer
        self.detectors = list(detectors)
        self.names = tuple(d.name for d in self.detectors)
        self.downscale = downscale
        self.device = torch.device(device)

    def maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return frame_maps(self.scorer, images, self.detectors, self.downscale, self.device)

    def describe(self) -> dict[str, Any]:
        return {"downscale": self.downscale}


# --------------------------------------------------------------------------- feature density


class FeatureFrameScorer:
    """The feature-density detector as a :class:`FrameScorer`, in its training geometry.

    Args:
        detector: segmenter taps + fitted flows.
        scale: resize factor of the flows run (``cfg.data.scale``).
        pad_divisor: padding multiple of the flows run (``cfg.data.pad_divisor``).
        names: which of ``detector.names`` to return (default: all).
        device: where the detector is.
    """

    def __init__(
        self,
        detector: DenseFeatureDetector,
        scale: float,
        pad_divisor: int,
        names: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if pad_divisor < 1:
            raise ValueError(f"pad_divisor must be a positive integer, got {pad_divisor}")
        names = tuple(detector.names if names is None else names)
        unknown = [n for n in names if n not in detector.names]
        if unknown:
            raise ValueError(f"unknown feature detector(s) {unknown}; valid: {', '.join(detector.names)}")
        self.detector = detector
        self.scale = scale
        self.pad_divisor = pad_divisor
        self.names = names
        self.device = torch.device(device)

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of a native frame after the run's resize (rounded as at training time)."""
        if self.scale == 1.0:
            return height, width
        return max(1, round(height * self.scale)), max(1, round(width * self.scale))

    def model_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The detector's input ``(B, 3, h', w')`` in ``[0, 1]``: resized, mirror-padded to the divisor."""
        # Imported here: the segmenter module pulls in timm (seconds), which Glow-only runs never need.
        from densead.segmenter import batch_tensors
        from densead.segmenter import pad_to_multiple as pad_batch

        h, w = _one_size(images, "FeatureFrameScorer")
        hs, ws = self.working_size(h, w)
        if (hs, ws) != (h, w):
            images = [cv2.resize(im, (ws, hs), interpolation=cv2.INTER_AREA) for im in images]
        (x,) = batch_tensors(pad_batch(np.stack(images), self.pad_divisor))
        return x

    def maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        h, w = _one_size(images, "FeatureFrameScorer")
        hs, ws = self.working_size(h, w)
        scores, _ = self.detector.score_maps(self.model_input(images).to(self.device))
        out = {}
        for name in self.names:
            m = scores[name][:, :hs, :ws].float()
            if (hs, ws) != (h, w):
                m = upsample_map(m, (h, w))
            out[name] = np.ascontiguousarray(m.cpu().numpy(), dtype=np.float32)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "feature_scale": self.scale,
            "feature_pad_divisor": self.pad_divisor,
            "feature_normalization": self.detector.normalization,
        }


# --------------------------------------------------------------------------- several producers


class StackedFrameScorer:
    """Several producers side by side (e.g. Glow and feature detectors in one run).

    Args:
        scorers: the producers; their names must not repeat.
        names: which maps to return, in this order (default: all, producer by producer).
    """

    def __init__(self, scorers: Sequence[FrameScorer], names: Sequence[str] | None = None) -> None:
        if not scorers:
            raise ValueError("StackedFrameScorer needs at least one scorer")
        have = [n for s in scorers for n in s.names]
        repeated = sorted({n for n in have if have.count(n) > 1})
        if repeated:
            raise ValueError(f"detector(s) {repeated} come from more than one scorer")
        names = tuple(have if names is None else names)
        unknown = [n for n in names if n not in have]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; valid: {', '.join(have)}")
        self.scorers = list(scorers)
        self.names = names

    def maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for s in self.scorers:
            out.update(s.maps(images))
        return {n: out[n] for n in self.names}

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        for s in self.scorers:
            info.update(s.describe())
        return info


# --------------------------------------------------------------------------- datasets


def iter_frame_maps(
    dataset: RoadDataset,
    scorer: FrameScorer,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "",
) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """``(item, {detector: (H, W) map})`` per frame, batching consecutive frames of one size."""

    def flush(items: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        maps = scorer.maps([it["image"] for it in items])
        for j, it in enumerate(items):
            yield it, {name: m[j] for name, m in maps.items()}

    pending: list[dict[str, Any]] = []
    for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, leave=False):
        item = dataset[i]
        if pending and (len(pending) == batch_size or item["image"].shape != pending[0]["image"].shape):
            yield from flush(pending)
            pending = []
        pending.append(item)
    if pending:
        yield from flush(pending)
