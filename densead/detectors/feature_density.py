"""Per-pixel flows over frozen segmentation features: "embedding density" (Blum et al., IJCV 2021).

One :class:`~densead.flows.FeatureFlow` per tapped layer of a frozen segmenter models the
density of the C-dimensional feature vector at each position. A pixel is anomalous where
its features are unlikely under the in-distribution density.

Training (maximum likelihood, :func:`flow_training_step`). Only in-distribution positions
are used: the pixel labels (0 inlier, 1 anomaly, 255 void) are reduced to each layer's grid
by :func:`valid_feature_mask` — rule ``"all"`` (default) keeps a position only if *every*
pixel of its ``stride × stride`` cell is an inlier; rule ``"center"`` looks at the cell's
centre pixel only. At most ``max_pixels`` valid positions per layer and step are sampled, so
memory stays flat whatever the frame size.

Normalization (Blum et al.: each layer's log-likelihood is normalized by that layer's mean
training log-likelihood). After training, ``μ_l`` (mean) and ``σ_l`` (standard deviation)
of ``log p_l`` over all valid training positions are computed with frozen flows and stored
as buffers — never batch statistics. With ``normalization="mean"`` the per-layer score is

    s_l(x) = (μ_l − log p_l(x)) / |μ_l|          (= −(log p_l − μ_l) / |μ_l|)

and with ``"zscore"`` the divisor is ``σ_l``. ``s_l = 0`` for a typical training position,
``s_l > 0`` for a less likely one; every map is upsampled bilinearly to the frame.

Floored log-posteriors (``log_softmax_floor: {tap: c}``, for a tap whose features are the
segmenter's logits). The flow then models ``max(log softmax(z), c)`` instead of the logits ``z``.
A density over raw logits has long tails on the *confident* side: the more certain the segmenter
(a car with a car logit far above the others), the further out in the tail and the more
"anomalous" the pixel — on CamVid such a density flagged nearly every car pixel. With the floor,
every confident configuration collapses onto one point per class (``0`` for the winner, ``c``
for the others), which the density learns as a peak; what is left spread out is the *pattern*
of uncertainty — which classes compete, and how much. Boundaries between road and pavement
compete in a way the training pixels show often; an unknown object makes classes compete that
rarely do. ``c = −4`` (classes below 1.8 % probability count as absent) was chosen on CamVid's
val drive. The density is that of the floored vector (no change of variables back to ``z``).

Detectors (higher = more anomalous everywhere):

| name | score map |
|---|---|
| ``density_<tap>`` | ``s_l`` of one layer |
| ``density_mean`` | ``mean_l s_l`` = minus the mean normalized log-likelihood |
| ``density_min`` | ``max_l s_l`` = minus the *minimum* normalized log-likelihood over layers |
| ``msp`` | ``1 − max_k softmax(logits)_k`` |
| ``max_logit`` | ``−max_k logits_k`` |
| ``entropy`` | ``−Σ_k p_k log p_k`` |
| ``energy`` | ``−log Σ_k exp(logits_k)`` |
| ``sml`` | ``−(max_k logits_k − μ_ĉ) / σ_ĉ``, ``ĉ = argmax_k logits_k`` |

``density_min`` is Blum et al.'s "min" ensemble, named after the log-likelihood it takes the
minimum of: a pixel is as anomalous as its least likely layer says.

The baselines come from the logits of the same frozen segmenter in the same forward pass,
bilinearly upsampled to the frame as the segmenter itself does.

Standardized max logits (``sml``, Jung et al., *Standardized Max Logits*, ICCV 2021): the max
logit's scale differs from class to class (a segmenter is surer of road than of sign poles), so
one threshold on it treats classes unequally. ``μ_k``, ``σ_k`` are the mean and standard deviation
of the max logit over the in-distribution training pixels the segmenter *predicts* as class ``k``
(fitted with the normalization, :func:`fit_max_logit_stats`, stored in the checkpoint). A class
predicted on fewer than :data:`SML_MIN_PIXELS` training pixels gets the statistics of all of them.
The paper's further steps (boundary suppression, dilated smoothing) are not part of ``sml`` (on
CamVid they moved its AUROC by at most 1.2 points: docs/results_camvid_features.md).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densead.config import (
    FieldError,
    check_device,
    checkpoint_config,
    from_dict,
    require,
    save_config,
)
from densead.data.outliers import OutlierPasteConfig, PhotoPaster
from densead.data.road import ANOMALY, INLIER, VOID
from densead.detectors.glow import MIN_LOG_PROB, SENTINEL_LIMIT, upsample_map, with_sentinels
from densead.features import FrozenFeatureExtractor
from densead.flows import ActNorm, FeatureFlow
from densead.io import (
    atomic_torch_save,
    atomic_write_text,
    check_heatmap_folder,
    check_overwrite,
    error_line,
    read_checkpoint,
    require_file,
    staged_heatmaps,
    state_dict_error,
)
from densead.metrics import PixelMetrics
from densead.segmenter import (
    SCENE_SPLITS,
    SceneArrays,
    SceneDataConfig,
    Segmenter,
    augmented_batch,
    batch_tensors,
    check_output_dir,
    check_pad_divisor,
    confusion_matrix,
    epoch_batches,
    iter_eval_batches,
    load_scene_arrays,
    load_segmenter,
    mean_iou,
    segmenter_fingerprint,
    train_augmentation,
)
from densead.train import resolve_device
from densead.viz import heatmap_overlay, save_png

__all__ = [
    "BASELINES",
    "CHECKPOINT_NAME",
    "LOGITS_TAP",
    "MASK_RULES",
    "SML_MIN_PIXELS",
    "NORMALIZATIONS",
    "STD_FLOOR",
    "DenseEvalConfig",
    "DenseFeatureDetector",
    "FeatureDensity",
    "FeatureFlowsRunConfig",
    "FlowConfig",
    "FlowTrainConfig",
    "LogProbStats",
    "MaxLogitStats",
    "MaxLogitSums",
    "class_balance_table",
    "energy_score",
    "entropy_score",
    "evaluate_dense_detectors",
    "evaluate_run",
    "fit_max_logit_stats",
    "fit_normalization",
    "fit_standardization",
    "flow_training_step",
    "check_geometry",
    "load_dense_detector",
    "load_feature_density",
    "markdown_table",
    "max_logit_score",
    "msp_score",
    "position_weights",
    "sample_feature_vectors",
    "save_feature_density",
    "train_feature_flows",
    "valid_feature_mask",
    "write_results",
]

CHECKPOINT_NAME = "feature_flows.pt"
LOGITS_TAP = "logits"
MASK_RULES = ("all", "center")
# Standardization scale floor, relative to the layer's mean channel std: a channel that is
# (nearly) constant on the training pixels is divided by STD_FLOOR × that mean, not by ~0.
STD_FLOOR = 1e-3
# sml: a class predicted on fewer training pixels than this takes the statistics of all of them.
SML_MIN_PIXELS = 100
# The checkpoint entry holding the sml statistics (MaxLogitStats.state()).
SML_KEY = "max_logit_stats"
NORMALIZATIONS = ("mean", "zscore")
# DenseEvalConfig.metrics_mode: the modes of densead.metrics.PixelMetrics.
METRICS_MODES = ("binned", "exact")
# The data keys a flows checkpoint must be evaluated with as it was trained: the features of
# another scale or padding are not the ones the densities and their normalization were fitted on.
GEOMETRY_KEYS = ("scale", "pad_divisor")

# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class FlowConfig:
    """One :class:`~densead.flows.FeatureFlow` per tap, all of this size."""

    n_steps: int = 8
    hidden: int = 256

    def __post_init__(self) -> None:
        require(self, 1, "n_steps", "hidden")


@dataclass(frozen=True)
class FlowTrainConfig:
    """Maximum-likelihood training of the flows (Adam, linear warm-up over ``warmup_steps``).

    The default learning rate is lower than Glow's 1e-3 on images: Adam's first steps move every
    entry of a 512×512 invertible 1×1 conv by about ``lr`` at once; on 512-channel CamVid
    features 1e-3 destroyed the density within a few steps and 3e-4 was unstable, while 1e-4 was
    safe (5e-4 was fine for 64 channels and fewer).

    Attributes:
        batch_size: frames per step (one frozen-segmenter pass feeds every flow).
        max_pixels: feature positions sampled per layer and step.
        max_grad_norm: clip the gradient norm of all flows together (0: off).
        noise: std of the Gaussian noise added to the standardized training features
            (a floor on the fitted density's width in every direction; 0: off).
        standardize_frames: training frames for the per-channel standardization (0: all).
        norm_frames: training frames used for the normalization constants (0: all).
        num_threads: torch intra-op threads (0: torch's default).
        class_balance: exponent ``α`` of class-balanced position sampling: a valid position is
            drawn with weight ``f_c^−α``, ``f_c`` the pixel frequency over the training frames of
            the class of its cell's centre pixel (0: uniform over positions, the density of the
            training pixels as they come; 1: every class equally often, so rare known classes
            are not low-density for being rare).
    """

    steps: int = 1000
    batch_size: int = 4
    max_pixels: int = 4096
    lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 10.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    noise: float = 0.1
    standardize_frames: int = 64
    norm_frames: int = 0
    num_threads: int = 0
    class_balance: float = 0.0

    def __post_init__(self) -> None:
        # class_balance is checked by train_feature_flows (a config may hold it unchecked).
        require(self, 1, "steps", "batch_size", "max_pixels", "log_every")
        require(self, 0, "warmup_steps", "weight_decay", "max_grad_norm", "noise")
        require(self, 0, "standardize_frames", "norm_frames", "num_threads")
        require(self, 0, "lr", strict=True)
        check_device(self.device)


@dataclass(frozen=True)
class DenseEvalConfig:
    """Pixel-level evaluation.

    Attributes:
        split: CamVid split to evaluate.
        batch_size: frames per forward pass.
        metrics_mode: :class:`~densead.metrics.PixelMetrics` mode (``exact`` or ``binned``).
        heatmap_detectors: detectors shown side by side in ``--heatmaps`` PNGs.
    """

    split: str = "test"
    batch_size: int = 4
    metrics_mode: str = "binned"
    heatmap_detectors: tuple[str, ...] = ("density_mean", "density_min", "msp")

    def __post_init__(self) -> None:
        require(self, 1, "batch_size")
        if self.split not in SCENE_SPLITS:
            raise FieldError("split", f"unknown split {self.split!r}; valid: {', '.join(SCENE_SPLITS)}")
        if self.metrics_mode not in METRICS_MODES:
            raise FieldError(
                "metrics_mode", f"unknown {self.metrics_mode!r}; valid: {', '.join(METRICS_MODES)}"
            )


@dataclass(frozen=True)
class FeatureFlowsRunConfig:
    """Everything ``tools/train_feature_flows.py`` and ``tools/evaluate_dense_features.py`` need.

    Attributes:
        output_dir: checkpoint, config and results go here.
        segmenter: checkpoint of :func:`densead.segmenter.train_segmenter`.
        taps: ``{tap name: FX node of the segmenter}``; one flow per tap.
        logits_node: FX node of the segmenter's logits (for the baselines).
        data: frames (``crop_height: 0`` trains on whole padded frames); ``held_out`` and
            ``void`` must match the segmenter's.
        mask_rule: ``all`` or ``center``, see :func:`valid_feature_mask`.
        normalization: ``mean`` (Blum et al.) or ``zscore``, see the module docstring.
        outliers: photos pasted into the training frames as auxiliary outliers, pushed below
            the in-distribution density by the outlier term of :func:`flow_training_step`
            (None: maximum likelihood only, as Blum et al.).
        log_softmax_floor: ``{tap: c}``: that tap's features (the segmenter's logits) enter its
            flow as ``max(log softmax, c)``, ``c < 0`` (see the module docstring); taps not
            named keep their raw features.
    """

    output_dir: str
    segmenter: str
    taps: dict[str, str]
    logits_node: str = "classifier"
    data: SceneDataConfig = SceneDataConfig(crop_height=0, crop_width=0, color_jitter=0.0)
    flow: FlowConfig = FlowConfig()
    train: FlowTrainConfig = FlowTrainConfig()
    mask_rule: str = "all"
    normalization: str = "mean"
    eval: DenseEvalConfig = DenseEvalConfig()
    outliers: OutlierPasteConfig | None = None
    log_softmax_floor: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.taps:
            raise FieldError("taps", "name at least one tap (tap name: FX node of the segmenter)")
        if LOGITS_TAP in self.taps:
            raise FieldError("taps", f"tap name {LOGITS_TAP!r} is reserved for the segmenter's logits")
        if self.mask_rule not in MASK_RULES:
            raise FieldError("mask_rule", f"unknown {self.mask_rule!r}; valid: {', '.join(MASK_RULES)}")
        if self.normalization not in NORMALIZATIONS:
            raise FieldError(
                "normalization", f"unknown {self.normalization!r}; valid: {', '.join(NORMALIZATIONS)}"
            )
        for tap in self.log_softmax_floor:
            if tap not in self.taps:
                raise FieldError("log_softmax_floor", f"names tap {tap!r}, not one of {list(self.taps)}")
            if self.taps[tap] != self.logits_node:  # a softmax of other features means nothing
                raise FieldError(
                    "log_softmax_floor",
                    f"tap {tap!r} reads {self.taps[tap]!r}, not the logits (logits_node "
                    f"{self.logits_node!r}): floored log-posteriors need class scores",
                )


def _check_choice(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


# --------------------------------------------------------------------------- baselines


def msp_score(logits: Tensor) -> Tensor:
    """``(B, K, H, W)`` → ``1 − max softmax`` ``(B, H, W)`` (Hendrycks & Gimpel)."""
    return 1.0 - torch.softmax(logits.float(), dim=1).amax(dim=1)


def max_logit_score(logits: Tensor) -> Tensor:
    """``(B, K, H, W)`` → ``−max logit`` ``(B, H, W)`` (Hendrycks et al., max logit)."""
    return -logits.float().amax(dim=1)


def energy_score(logits: Tensor) -> Tensor:
    """``(B, K, H, W)`` → the free energy ``−log Σ_k exp(logits_k)`` ``(B, H, W)`` (Liu et al.,
    NeurIPS 2020, temperature 1): the max logit's smooth counterpart, low where the logits are large."""
    return -torch.logsumexp(logits.float(), dim=1)


def entropy_score(logits: Tensor) -> Tensor:
    """``(B, K, H, W)`` → softmax entropy ``−Σ p log p`` ``(B, H, W)``, in nats."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


BASELINES: dict[str, Callable[[Tensor], Tensor]] = {
    "msp": msp_score,
    "max_logit": max_logit_score,
    "entropy": entropy_score,
    "energy": energy_score,
}


def frame_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """The segmenter's logits ``(B, K, h, w)`` upsampled (bilinear, float32) to the frame ``size``,
    as the baselines see them, at scoring and when their statistics are fitted."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


@dataclass(frozen=True, eq=False)  # tensor fields: no elementwise == as equality
class MaxLogitStats:
    """Per predicted class ``k``: mean ``μ_k`` and std ``σ_k`` of the max logit over training
    pixels, for standardized max logits (``sml``, see the module docstring).

    Attributes:
        mean: ``(K,)`` float64.
        std: ``(K,)`` float64, positive.
        count: ``(K,)`` int64, the training pixels predicted as each class (classes under
            :data:`SML_MIN_PIXELS` hold the pooled statistics).
    """

    mean: Tensor
    std: Tensor
    count: Tensor

    def __post_init__(self) -> None:
        k = self.mean.shape
        if len(k) != 1 or self.std.shape != k or self.count.shape != k:
            raise ValueError(
                f"mean, std and count must be vectors of one length, got shapes {tuple(self.mean.shape)}, "
                f"{tuple(self.std.shape)}, {tuple(self.count.shape)}"
            )
        if not bool(torch.isfinite(self.mean).all()):
            raise ValueError("mean holds non-finite values")
        if not bool((self.std > 0).all() and torch.isfinite(self.std).all()):
            raise ValueError("std must be positive and finite")

    @property
    def n_classes(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_sums(cls, count: Tensor, total: Tensor, total_sq: Tensor) -> MaxLogitStats:
        """From per-class pixel counts, sums and sums of squares of the max logit (float64)."""
        n = float(count.sum())
        if n == 0:
            raise ValueError("no in-distribution training pixels to fit the max-logit statistics on")
        pooled_mean = float(total.sum()) / n
        pooled_std = math.sqrt(max(float(total_sq.sum()) / n - pooled_mean**2, 0.0))
        safe = count.double().clamp_min(1)
        mean = total / safe
        std = (total_sq / safe - mean * mean).clamp_min(0).sqrt()
        few = count < SML_MIN_PIXELS
        mean = torch.where(few, torch.full_like(mean, pooled_mean), mean)
        std = torch.where(few, torch.full_like(std, pooled_std), std)
        # A (nearly) constant max logit: divide by a small fraction of the pooled spread, not by ~0.
        std = std.clamp_min(STD_FLOOR * pooled_std + torch.finfo(torch.float32).tiny)
        return cls(mean, std, count.long())

    def score(self, logits: Tensor) -> Tensor:
        """``(B, K, H, W)`` → ``−(max logit − μ_ĉ) / σ_ĉ`` ``(B, H, W)``, ``ĉ`` the predicted class."""
        if logits.shape[1] != self.n_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the sml statistics {self.n_classes}")
        top, cls = logits.float().max(dim=1)
        mean, std = self.mean.to(top.device)[cls], self.std.to(top.device)[cls]
        return (-(top.double() - mean) / std).float()

    def state(self) -> dict[str, Tensor]:
        return {"mean": self.mean.cpu(), "std": self.std.cpu(), "count": self.count.cpu()}

    @classmethod
    def from_state(cls, state: Any, where: str) -> MaxLogitStats:
        """:meth:`state` read back; ``where`` (file and key) names the culprit of a bad entry."""
        if not isinstance(state, Mapping) or not all(
            isinstance(state.get(k), Tensor) for k in ("mean", "std", "count")
        ):
            raise ValueError(f"{where}: expected tensors mean, std and count")
        try:
            return cls(state["mean"].double(), state["std"].double(), state["count"].long())
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


# --------------------------------------------------------------------------- masks and sampling


def valid_feature_mask(inlier: Tensor, grid: Sequence[int], stride: int, rule: str = "all") -> Tensor:
    """Reduce a pixel mask ``(B, H, W)`` to the ``(B, h, w)`` grid of a layer with ``stride``.

    Position ``(i, j)`` covers pixels ``[i·s, (i+1)·s) × [j·s, (j+1)·s)``; pixels beyond the
    frame count as not inlier.

    Args:
        inlier: bool, True where the pixel is in-distribution.
        grid: ``(h, w)`` of the feature map.
        stride: the layer's output stride.
        rule: ``"all"`` — every covered pixel must be an inlier; ``"center"`` — the cell's
            centre pixel ``(i·s + s//2, j·s + s//2)`` must be.
    """
    _check_choice(rule, MASK_RULES, "mask rule")
    h, w = grid
    b, height, width = inlier.shape
    full = inlier.new_zeros((b, h * stride, w * stride))
    hh, ww = min(height, h * stride), min(width, w * stride)
    full[:, :hh, :ww] = inlier[:, :hh, :ww]
    if rule == "center":
        c = stride // 2
        return full[:, c::stride, c::stride]
    outside = (~full).float().unsqueeze(1)
    return F.max_pool2d(outside, stride).squeeze(1) == 0


def sample_feature_vectors(
    features: Tensor,
    valid: Tensor,
    max_pixels: int,
    generator: torch.Generator | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """``(N, C)`` feature vectors at valid positions, a random subset of at most ``max_pixels``.

    Args:
        features: ``(B, C, h, w)``.
        valid: bool ``(B, h, w)``.
        max_pixels: the bound on ``N``.
        generator: CPU generator for the subset (seeded training is reproducible).
        weights: ``(B, h, w)`` sampling weights ≥ 0 (drawn without replacement in proportion
            to them; positions of weight 0 never); None: uniform.
    """
    c = features.shape[1]
    index = valid.reshape(-1).nonzero().squeeze(1)
    if weights is not None:
        w = weights.reshape(-1)[index].float().cpu()
        index = index[(w > 0).to(index.device)]
        if index.numel() > max_pixels:
            pick = torch.multinomial(w[w > 0], max_pixels, replacement=False, generator=generator)
            index = index[pick.to(index.device)]
    elif index.numel() > max_pixels:
        pick = torch.randperm(index.numel(), generator=generator)[:max_pixels].to(index.device)
        index = index[pick]
    return features.permute(0, 2, 3, 1).reshape(-1, c)[index]


def class_balance_table(train_ids: np.ndarray, n_classes: int, alpha: float) -> Tensor:
    """A 256-entry lookup ``train id → sampling weight f_c^−α`` (``f_c``: pixel frequency of
    class ``c`` in ``train_ids``; 0 for ids that never occur, void/held-out 255 included)."""
    counts = np.bincount(train_ids[train_ids < n_classes].ravel(), minlength=n_classes).astype(np.float64)
    table = torch.zeros(256, dtype=torch.float64)
    seen = counts > 0
    freq = counts[seen] / counts.sum()
    table[:n_classes][torch.from_numpy(seen)] = torch.from_numpy(freq**-alpha)
    return table.float()


def position_weights(table: Tensor, train_ids: Tensor, grid: Sequence[int], stride: int) -> Tensor:
    """``(B, h, w)`` sampling weights of a tap's positions: the table entry of the class of each
    cell's centre pixel (pixels past the frame: weight 0)."""
    h, w = grid
    centre = train_ids[:, stride // 2 :: stride, stride // 2 :: stride][:, :h, :w].long()
    out = torch.zeros(train_ids.shape[0], h, w, dtype=table.dtype, device=train_ids.device)
    out[:, : centre.shape[1], : centre.shape[2]] = table.to(train_ids.device)[centre]
    return out


# --------------------------------------------------------------------------- the density model


class _Standardize(nn.Module):
    """Fixed per-channel affine map ``u = (x − mean) / scale`` with buffers (identity until fitted)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W)`` → (``u``, the log-det ``−Σ_c log scale_c``)."""
        u = (x - self.mean.view(1, -1, 1, 1).to(x.dtype)) / self.scale.view(1, -1, 1, 1).to(x.dtype)
        return u, -torch.log(self.scale.double()).sum()


class FeatureDensity(nn.Module):
    """One :class:`~densead.flows.FeatureFlow` per tap, its input standardization and normalization.

    ``log p_l(x) = log p_flow((x − m_l) / a_l) − Σ_c log a_{l,c}``: a fixed per-channel
    standardization (mean ``m``, scale ``a``, fitted once on training features before the flow
    is trained, see :func:`fit_standardization`) puts every channel on a unit scale, so Adam's
    step size means the same for every layer (raw channels with a scale of 1e-4 would turn a
    1e-3 ActNorm bias step into a 10-sigma jump). The log-det term keeps ``p_l`` the density of
    the raw features. Identity until fitted. ActNorm layers start as the identity (no
    data-dependent init): the standardization has done that job on many frames.

    The normalization constants are buffers (``train_log_prob_mean`` / ``train_log_prob_std``,
    one entry per tap in :attr:`names` order), so they travel with the ``state_dict``.

    Args:
        channels: ``{tap: C}``, from the extractor.
        n_steps: flow steps per tap.
        hidden: hidden width of the 1×1 coupling networks.
        log_softmax_floor: ``{tap: c}`` with ``c < 0``: that tap's input ``z`` (logits) is
            replaced by ``max(log softmax(z), c)`` before the standardization (see
            :meth:`inputs`); the densities are then those of the floored vectors.
    """

    def __init__(
        self,
        channels: Mapping[str, int],
        n_steps: int = 8,
        hidden: int = 256,
        log_softmax_floor: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("FeatureDensity needs at least one tap")
        floors = dict(log_softmax_floor or {})
        for name, c in floors.items():
            if name not in channels:
                raise ValueError(f"log_softmax_floor names tap {name!r}, not one of {list(channels)}")
            if not (math.isfinite(c) and c < 0):
                raise ValueError(f"log_softmax_floor[{name!r}] must be a finite negative number, got {c}")
            if channels[name] < 2:
                raise ValueError(f"log_softmax_floor[{name!r}]: a softmax needs >= 2 channels, the tap has 1")
        self.log_softmax_floor = {name: float(c) for name, c in floors.items()}
        self.flows = nn.ModuleDict({name: FeatureFlow(c, n_steps, hidden) for name, c in channels.items()})
        self.standardize = nn.ModuleDict({name: _Standardize(c) for name, c in channels.items()})
        # The fixed standardization replaces ActNorm's data-dependent init: that init would
        # re-standardize every channel on the first batch alone, and a channel that barely
        # varies in one batch of a few frames (common at stride 32) would get a huge scale.
        for module in self.flows.modules():
            if isinstance(module, ActNorm):
                module.initialized.fill_(True)
        n = len(channels)
        self.register_buffer("train_log_prob_mean", torch.full((n,), math.nan, dtype=torch.float64))
        self.register_buffer("train_log_prob_std", torch.full((n,), math.nan, dtype=torch.float64))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.flows)

    def set_standardization(self, name: str, mean: Tensor, scale: Tensor) -> None:
        """Fix tap ``name``'s input map ``u = (x − mean) / scale`` (``scale > 0``, shape ``(C,)``)."""
        if not bool((scale > 0).all()):
            raise ValueError(f"tap {name!r}: standardization scales must be positive")
        with torch.no_grad():
            self.standardize[name].mean.copy_(mean)
            self.standardize[name].scale.copy_(scale)

    def inputs(self, name: str, features: Tensor) -> Tensor:
        """What tap ``name``'s flow models: ``features`` ``(B, C, h, w)`` as they come, or
        ``max(log softmax over C, c)`` for a tap in ``log_softmax_floor``."""
        floor = self.log_softmax_floor.get(name)
        if floor is None:
            return features
        return F.log_softmax(features, dim=1).clamp_min(floor)

    def log_prob_map(self, name: str, features: Tensor, noise: float = 0.0) -> Tensor:
        """``(B, C, h, w)`` → ``(B, h, w)`` log-density of tap ``name`` (of :meth:`inputs`).

        ``noise`` > 0 adds N(0, noise²) to the *standardized* features first (training only):
        the flow then fits the density smoothed at that scale, which bounds how narrow any
        direction can get.
        """
        u, logdet = self.standardize[name](self.inputs(name, features))
        if noise > 0:
            u = u + noise * torch.randn_like(u)
        lp = self.flows[name].log_prob_map(u)
        return lp + logdet.to(lp.dtype)

    def vector_log_prob(self, name: str, vectors: Tensor, noise: float = 0.0) -> Tensor:
        """``(N, C)`` feature vectors → ``(N,)`` log-densities under tap ``name``."""
        as_map = vectors.t().reshape(1, vectors.shape[1], vectors.shape[0], 1)
        return self.log_prob_map(name, as_map, noise).reshape(-1)

    def log_prob_maps(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{tap: (B, h, w)}`` log-densities; non-finite values become :data:`MIN_LOG_PROB`."""
        out = {}
        for name in self.names:
            lp = self.log_prob_map(name, features[name])
            out[name] = torch.nan_to_num(lp, nan=MIN_LOG_PROB, posinf=MIN_LOG_PROB, neginf=MIN_LOG_PROB)
        return out

    @property
    def is_normalized(self) -> bool:
        return bool(
            torch.isfinite(self.train_log_prob_mean).all() and torch.isfinite(self.train_log_prob_std).all()
        )

    def set_normalization(self, means: Mapping[str, float], stds: Mapping[str, float]) -> None:
        """Store the per-tap mean and std of the training log-likelihood."""
        with torch.no_grad():
            self.train_log_prob_mean.copy_(torch.tensor([means[n] for n in self.names], dtype=torch.float64))
            self.train_log_prob_std.copy_(torch.tensor([stds[n] for n in self.names], dtype=torch.float64))

    def normalized_scores(
        self, log_probs: Mapping[str, Tensor], normalization: str = "mean"
    ) -> dict[str, Tensor]:
        """``{tap: s_l}`` with ``s_l = (μ_l − log p_l) / |μ_l|`` (``mean``) or ``/ σ_l`` (``zscore``);
        a position without a finite log p keeps its sentinel, ``−MIN_LOG_PROB``, not divided."""
        _check_choice(normalization, NORMALIZATIONS, "normalization")
        if not self.is_normalized:
            raise ValueError("the normalization constants are not fitted (see fit_normalization)")
        out = {}
        for i, name in enumerate(self.names):
            mu = float(self.train_log_prob_mean[i])
            scale = abs(mu) if normalization == "mean" else float(self.train_log_prob_std[i])
            if not scale > 0:
                raise ValueError(
                    f"tap {name!r}: normalization divisor is {scale}; try normalization='zscore'"
                )
            lp = log_probs[name].double()
            out[name] = torch.where(lp <= -SENTINEL_LIMIT, -MIN_LOG_PROB, (mu - lp) / scale)
        return out


class LogProbStats:
    """Running float64 count, mean and standard deviation of log-likelihoods, per tap."""

    def __init__(self, names: Sequence[str]) -> None:
        self.count = dict.fromkeys(names, 0)
        self.sum = dict.fromkeys(names, 0.0)
        self.sum_sq = dict.fromkeys(names, 0.0)

    def update(self, name: str, values: Tensor) -> None:
        v = values.detach().double()
        self.count[name] += v.numel()
        self.sum[name] += float(v.sum())
        self.sum_sq[name] += float((v * v).sum())

    def mean(self) -> dict[str, float]:
        return {n: self.sum[n] / c if (c := self.count[n]) else math.nan for n in self.count}

    def std(self) -> dict[str, float]:
        out = {}
        for n, c in self.count.items():
            m = self.sum[n] / c if c else math.nan
            out[n] = math.sqrt(max(self.sum_sq[n] / c - m * m, 0.0)) if c else math.nan
        return out


def flow_training_step(
    density: FeatureDensity,
    optimizer: torch.optim.Optimizer,
    features: Mapping[str, Tensor],
    inlier: Tensor,
    strides: Mapping[str, int],
    max_pixels: int,
    rule: str = "all",
    generator: torch.Generator | None = None,
    max_grad_norm: float = 0.0,
    noise: float = 0.0,
    balance: tuple[Tensor, Tensor] | None = None,
    outlier: Tensor | None = None,
    outlier_loss: tuple[float, float, float] = (
        OutlierPasteConfig.weight,
        OutlierPasteConfig.temperature,
        OutlierPasteConfig.margin,
    ),
) -> dict[str, Tensor]:
    """One maximum-likelihood step of every flow on the valid positions of one batch.

    With ``outlier`` (a pixel mask of auxiliary outliers, e.g. pasted photos, excluded from
    ``inlier`` by the caller), each flow also gets the outlier term, on per-dimension
    log-likelihoods ``ℓ = log p / C`` of at most ``max_pixels`` outlier positions (rule ``rule``
    applied to the outlier mask)::

        λ · mean softplus((ℓ_out − ℓ̄_in + m) / T)

    with ``ℓ̄_in`` the mean ``ℓ`` of the batch's sampled inlier positions: the paper's outlier loss
    ``−λ log σ((log p_ref − log p)/T)`` with the reference ``ℓ̄_in − m`` in place of a general
    model's likelihood. The gradient flows through the reference too, so the term ranks outliers
    below inliers; with the reference detached, lowering the density everywhere lowered the
    outliers' and CamVid training diverged (inlier nll/dim 1.5 → 17 in 20 steps). The term fades
    once an outlier is a few ``T`` below the reference.

    Args:
        density: the flows (in training mode).
        optimizer: over ``density.parameters()``.
        features: ``{tap: (B, C, h, w)}`` from the frozen extractor.
        inlier: bool ``(B, H, W)`` pixel mask of in-distribution pixels.
        strides: ``{tap: stride}``.
        max_pixels: positions sampled per tap.
        rule: see :func:`valid_feature_mask`.
        generator: for the position subsets.
        max_grad_norm: gradient-norm clip over all flows (0: off).
        noise: std of the Gaussian noise added to the standardized features
            (see :meth:`FeatureDensity.log_prob_map`).
        balance: (:func:`class_balance_table`, train ids ``(B, H, W)``) for class-balanced
            position sampling; None: uniform.
        outlier: bool ``(B, H, W)`` pixel mask of auxiliary outliers; None: none.
        outlier_loss: ``(λ, T, m)`` of the outlier term.

    Returns:
        ``{tap: mean negative log-likelihood per dimension}`` and, with outliers,
        ``{tap + "_out": the outlier term}`` (detached). A step whose loss is not finite changes
        nothing (the gradients are dropped).
    """
    weight, temperature, margin = outlier_loss
    losses: dict[str, Tensor] = {}
    total = None
    for name in density.names:
        f = features[name]
        valid = valid_feature_mask(inlier, f.shape[-2:], strides[name], rule)
        weights = None if balance is None else position_weights(*balance, f.shape[-2:], strides[name])
        vectors = sample_feature_vectors(f, valid, max_pixels, generator, weights)
        if vectors.shape[0] == 0:
            continue
        # Per dimension, so layers of different widths weigh alike in the summed loss.
        nll = -density.vector_log_prob(name, vectors, noise).mean() / vectors.shape[1]
        losses[name] = nll.detach()
        if outlier is not None:
            out_valid = valid_feature_mask(outlier, f.shape[-2:], strides[name], rule)
            out_vectors = sample_feature_vectors(f, out_valid, max_pixels, generator)
            if out_vectors.shape[0] > 0:
                ell = density.vector_log_prob(name, out_vectors, noise) / out_vectors.shape[1]
                term = weight * F.softplus((ell + nll + margin) / temperature).mean()
                losses[f"{name}_out"] = term.detach()
                nll = nll + term
        total = nll if total is None else total + nll
    if total is None:
        return losses
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(density.parameters(), max_grad_norm)
    else:
        norm = total.detach()
    if torch.isfinite(norm):  # one host sync per step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


# --------------------------------------------------------------------------- the detector


@dataclass
class DenseFeatureDetector:
    """A frozen segmenter's taps + logits in one pass, turned into every detector's map.

    Attributes:
        extractor: frozen extractor returning the density taps and ``"logits"``.
        density: the fitted :class:`FeatureDensity`.
        normalization: ``mean`` or ``zscore``.
    """

    extractor: FrozenFeatureExtractor
    density: FeatureDensity
    normalization: str = "mean"
    max_logit_stats: MaxLogitStats | None = None
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.density.eval()
        taps = [f"density_{n}" for n in self.density.names]
        sml = ("sml",) if self.max_logit_stats is not None else ()
        self.names = (*taps, "density_mean", "density_min", *BASELINES, *sml)

    @torch.no_grad()
    def score_maps(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → (``{detector: (B, H, W)}``, logits ``(B, K, H, W)``).

        Higher = more anomalous. Per-layer maps are upsampled bilinearly from each layer's grid.
        """
        feats = self.extractor(x)
        size = x.shape[-2:]
        logits = frame_logits(feats[LOGITS_TAP], size)
        scores = self.density.normalized_scores(self.density.log_prob_maps(feats), self.normalization)
        layer_maps = {f"density_{n}": upsample_map(s, size) for n, s in scores.items()}
        stacked = torch.stack(list(layer_maps.values()))
        out = dict(layer_maps)
        out["density_mean"] = with_sentinels(stacked.mean(dim=0), stacked)
        out["density_min"] = stacked.amax(dim=0)  # min normalized log-likelihood = max score
        out.update({name: fn(logits) for name, fn in BASELINES.items()})
        if self.max_logit_stats is not None:
            out["sml"] = self.max_logit_stats.score(logits)
        return out, logits


# --------------------------------------------------------------------------- training run


def _load_checked_segmenter(cfg: FeatureFlowsRunConfig, device: torch.device) -> Segmenter:
    """The segmenter of ``cfg``, its held-out and void classes and its protocol checked against
    ``cfg.data``."""
    segmenter, seg_cfg = load_segmenter(cfg.segmenter, device)
    if seg_cfg.data.protocol != cfg.data.protocol:  # the splits' frames differ between protocols
        raise ValueError(
            f"{cfg.segmenter}: segmenter trained under data.protocol={seg_cfg.data.protocol}, but the flows "
            f"config says {cfg.data.protocol}: frames one protocol trains on are another's val or test "
            "frames (CamVid's val split is frames of a training drive under sequences)"
        )
    # The held-out classes must be the segmenter's too, or it may have trained on the anomalies.
    protocol = (tuple(cfg.data.held_out), tuple(cfg.data.void))
    if (tuple(seg_cfg.data.held_out), tuple(seg_cfg.data.void)) != protocol:
        raise ValueError(
            f"{cfg.segmenter}: segmenter trained with held_out={list(seg_cfg.data.held_out)}, "
            f"void={list(seg_cfg.data.void)}, but the flows config says held_out={list(cfg.data.held_out)}, "
            f"void={list(cfg.data.void)}"
        )
    return segmenter


def _tap_segmenter(
    cfg: FeatureFlowsRunConfig, segmenter: nn.Module, with_logits: bool
) -> FrozenFeatureExtractor:
    """``cfg.taps`` (and the logits node) of ``segmenter``; a node that is not a feature map of
    it is an error naming the key (``taps.<name>`` or ``logits_node``) and the segmenter."""
    nodes = dict(cfg.taps)  # FeatureFlowsRunConfig reserves the name LOGITS_TAP
    if with_logits:
        nodes[LOGITS_TAP] = cfg.logits_node
    try:
        extractor = FrozenFeatureExtractor.from_module(segmenter, nodes)
    except Exception:  # noqa: BLE001 - torchvision raises several kinds for a bad node: find which
        for tap, node in nodes.items():
            key = "logits_node" if tap == LOGITS_TAP else f"taps.{tap}"
            try:
                FrozenFeatureExtractor.from_module(segmenter, {tap: node})
            except Exception as err:  # noqa: BLE001
                raise ValueError(
                    f"{key}: {node!r} is not a feature map of segmenter {cfg.segmenter}: {error_line(err)}"
                ) from None
        raise
    k = getattr(segmenter, "num_classes", None)
    if with_logits and k is not None and extractor.channels[LOGITS_TAP] != k:
        raise ValueError(
            f"logits_node: {cfg.logits_node!r} has {extractor.channels[LOGITS_TAP]} channels, but segmenter "
            f"{cfg.segmenter} has {k} classes: it is not the logits"
        )
    return extractor


def _features_and_inliers(
    extractor: FrozenFeatureExtractor,
    arrays: SceneArrays,
    batch_size: int,
    divisor: int,
    device: torch.device | str,
) -> Iterator[tuple[dict[str, Tensor], Tensor, tuple[int, int]]]:
    """Every frame of ``arrays`` in order, padded to ``divisor``: (``{tap: features}``, inlier pixel
    mask of the unpadded frames, padded size ``(H, W)``)."""
    for _, x, labels, _ in iter_eval_batches(arrays, batch_size, divisor):
        size = (int(x.shape[-2]), int(x.shape[-1]))
        yield extractor(x.to(device)), torch.from_numpy(labels == INLIER).to(device), size


def fit_standardization(
    extractor: FrozenFeatureExtractor,
    density: FeatureDensity,
    arrays: SceneArrays,
    batch_size: int,
    divisor: int,
    rule: str,
    device: torch.device | str = "cpu",
) -> None:
    """Per-channel mean and std of each tap's flow inputs (:meth:`FeatureDensity.inputs`) over all
    valid positions of ``arrays``.

    Stored in ``density`` as its fixed input standardization; scales are floored at
    :data:`STD_FLOOR` times the layer's mean channel std.
    """
    sums: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for feats, inlier, _ in _features_and_inliers(extractor, arrays, batch_size, divisor, device):
            for name in density.names:
                f = density.inputs(name, feats[name])
                valid = valid_feature_mask(inlier, f.shape[-2:], extractor.strides[name], rule)
                v = f.permute(0, 2, 3, 1)[valid].double()
                acc = sums.setdefault(
                    name, [v.new_zeros(()), v.new_zeros(v.shape[1]), v.new_zeros(v.shape[1])]
                )
                acc[0] += v.shape[0]
                acc[1] += v.sum(0)
                acc[2] += (v * v).sum(0)
    for name in density.names:
        count, total, total_sq = sums[name]
        if count == 0:
            raise ValueError(f"tap {name!r}: no in-distribution positions to standardize on")
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
        scale = std.clamp_min(STD_FLOOR * float(std.mean()) + torch.finfo(torch.float32).tiny)
        density.set_standardization(name, mean.float(), scale.float())


def fit_normalization(
    extractor: FrozenFeatureExtractor,
    density: FeatureDensity,
    arrays: SceneArrays,
    batch_size: int,
    divisor: int,
    rule: str,
    device: torch.device | str = "cpu",
    max_logits: MaxLogitSums | None = None,
) -> LogProbStats:
    """Mean and std of each tap's log-likelihood over all valid positions of ``arrays``.

    The constants are stored in ``density`` (:meth:`FeatureDensity.set_normalization`) and returned.
    With ``max_logits`` (``extractor`` then returns :data:`LOGITS_TAP` too), the same pass adds
    the frames' max logits to it: the ``sml`` statistics of the same frames, without a second pass
    of the segmenter over them.
    """
    stats = LogProbStats(density.names)
    dropped = dict.fromkeys(density.names, 0)
    density.eval()
    with torch.no_grad():
        for feats, inlier, size in _features_and_inliers(extractor, arrays, batch_size, divisor, device):
            log_probs = density.log_prob_maps(feats)
            for name, lp in log_probs.items():
                valid = valid_feature_mask(inlier, lp.shape[-2:], extractor.strides[name], rule)
                real = lp.abs() < SENTINEL_LIMIT  # a non-finite log p's stand-in would be the mean
                stats.update(name, lp[valid & real])
                dropped[name] += int((valid & ~real).sum())
            if max_logits is not None:
                max_logits.update(feats[LOGITS_TAP], size, inlier)
    if any(dropped.values()):
        warnings.warn(
            f"normalization: training positions without a finite log-likelihood left out, per tap: {dropped}",
            stacklevel=2,
        )
    density.set_normalization(stats.mean(), stats.std())
    return stats


class MaxLogitSums:
    """Running per-class sums for :class:`MaxLogitStats`: over the in-distribution pixels given to
    :meth:`update`, per predicted class the pixel count, the sum and the sum of squares of the max
    logit (float64)."""

    def __init__(self, n_classes: int) -> None:
        self.sums = torch.zeros(3, n_classes, dtype=torch.float64)

    def update(self, logits: Tensor, size: Sequence[int], inlier: Tensor) -> None:
        """Logits ``(B, K, h, w)`` of frames padded to ``size``, taken as
        :meth:`DenseFeatureDetector.score_maps` takes them (:func:`frame_logits`, cut back to the
        frames), at the pixels where the bool mask ``inlier`` ``(B, H', W')`` of the unpadded
        frames is set."""
        k = self.sums.shape[1]
        if logits.shape[1] != k:
            raise ValueError(f"logits have {logits.shape[1]} classes, the sums {k}")
        h, w = inlier.shape[-2:]
        top, cls = frame_logits(logits, size)[:, :, :h, :w].max(dim=1)
        cls, top = cls[inlier].cpu(), top[inlier].double().cpu()
        self.sums[0] += torch.bincount(cls, minlength=k).double()
        self.sums[1] += torch.bincount(cls, weights=top, minlength=k)
        self.sums[2] += torch.bincount(cls, weights=top * top, minlength=k)

    def stats(self) -> MaxLogitStats:
        return MaxLogitStats.from_sums(self.sums[0].long(), self.sums[1], self.sums[2])


def fit_max_logit_stats(
    extractor: FrozenFeatureExtractor,
    arrays: SceneArrays,
    batch_size: int,
    divisor: int,
    device: torch.device | str = "cpu",
) -> MaxLogitStats:
    """The ``sml`` statistics: per predicted class, mean and std of the max logit over every
    in-distribution pixel of ``arrays`` (anomalous and void pixels left out), the logits taken
    as :meth:`DenseFeatureDetector.score_maps` takes them (:class:`MaxLogitSums`).
    ``extractor`` must return :data:`LOGITS_TAP`. (Training fits them in the normalization's pass:
    :func:`fit_normalization` with ``max_logits``.)"""
    if LOGITS_TAP not in extractor.channels:
        raise ValueError(f"the extractor returns no {LOGITS_TAP!r} tap")
    sums = MaxLogitSums(extractor.channels[LOGITS_TAP])
    with torch.no_grad():
        for feats, inlier, size in _features_and_inliers(extractor, arrays, batch_size, divisor, device):
            sums.update(feats[LOGITS_TAP], size, inlier)
    return sums.stats()


def train_feature_flows(cfg: FeatureFlowsRunConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """Train one flow per tap on in-distribution CamVid pixels, fit the normalization and the
    ``sml`` statistics, save.
    An existing checkpoint is refused unless ``overwrite``.

    Returns:
        ``<output_dir>/feature_flows.pt``: ``density`` state_dict (flows + normalization buffers),
        ``config``, ``channels``, ``strides``, ``train_seconds``, ``segmenter_sha256``,
        ``max_logit_stats`` (``sml``, :func:`fit_max_logit_stats` on the normalization frames);
        ``config.yaml`` beside it.
    """
    _check_choice(cfg.mask_rule, MASK_RULES, "mask_rule")
    _check_choice(cfg.normalization, NORMALIZATIONS, "normalization")
    tcfg = cfg.train
    if tcfg.class_balance < 0:
        raise ValueError(f"train.class_balance must be >= 0, got {tcfg.class_balance}")
    device = resolve_device(tcfg.device, "train.device")
    require_file(cfg.segmenter, "segmenter", "segmenter checkpoint")  # before the data is read
    check_overwrite(Path(cfg.output_dir) / CHECKPOINT_NAME, overwrite)
    out_dir = check_output_dir(cfg.output_dir, files=(CHECKPOINT_NAME, "config.yaml"))
    if tcfg.num_threads > 0:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed)
    segmenter = _load_checked_segmenter(cfg, device)
    check_pad_divisor(cfg.data.pad_divisor, segmenter, f"segmenter {cfg.segmenter}")
    fingerprint = segmenter_fingerprint(segmenter)
    # The logits node is what scoring taps besides the flows': a bad one fails here, not after training.
    with_logits = _tap_segmenter(cfg, segmenter, with_logits=True)
    extractor = _tap_segmenter(cfg, segmenter, with_logits=False)
    density = FeatureDensity(extractor.channels, cfg.flow.n_steps, cfg.flow.hidden, cfg.log_softmax_floor).to(
        device
    )
    optimizer = torch.optim.Adam(density.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    train = load_scene_arrays(cfg.data, "train")
    std_arrays = _spread_frames(train, tcfg.standardize_frames)
    fit_standardization(
        extractor, density, std_arrays, cfg.eval.batch_size, cfg.data.pad_divisor, cfg.mask_rule, device
    )
    augment = train_augmentation(cfg.data, tcfg.seed)
    paster, outlier_args = None, {}
    if (o := cfg.outliers) is not None:
        paster = PhotoPaster(o, tcfg.seed)
        outlier_args = {"outlier_loss": (o.weight, o.temperature, o.margin)}
    batches = epoch_batches(len(train), tcfg.batch_size, tcfg.seed)
    generator = torch.Generator().manual_seed(tcfg.seed)
    table = (
        class_balance_table(train.train_ids, len(train.classes), tcfg.class_balance)
        if tcfg.class_balance > 0
        else None
    )
    density.train()
    start = time.time()
    running: dict[str, Tensor] = {}
    for step in range(tcfg.steps):
        images, labels, train_ids = augmented_batch(train, next(batches), augment)
        outlier = None
        if paster is not None:
            images, pasted = paster(images)
            labels = np.where(pasted, VOID, labels)
            outlier = torch.from_numpy(pasted).to(device)
        (x,) = batch_tensors(images)
        feats = extractor(x.to(device))
        inlier = torch.from_numpy(labels == INLIER).to(device)
        balance = None if table is None else (table, torch.from_numpy(train_ids).to(device))
        for group in optimizer.param_groups:
            group["lr"] = tcfg.lr * min(1.0, (step + 1) / max(1, tcfg.warmup_steps))
        losses = flow_training_step(
            density, optimizer, feats, inlier, extractor.strides, tcfg.max_pixels, cfg.mask_rule,
            generator, tcfg.max_grad_norm, tcfg.noise, balance, outlier, **outlier_args,
        )  # fmt: skip
        for name, value in losses.items():
            running[name] = running.get(name, 0.0) + value
        if progress and ((step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps):
            n = step % tcfg.log_every + 1
            text = " ".join(f"{k} {float(v) / n:.3f}" for k, v in running.items())
            print(f"step {step + 1}/{tcfg.steps} nll/dim {text} ({time.time() - start:.0f} s)", flush=True)
            running = {}
    train_seconds = time.time() - start
    sums = MaxLogitSums(with_logits.channels[LOGITS_TAP])  # sml: filled by the normalization's pass
    stats = fit_normalization(
        with_logits, density, _spread_frames(train, tcfg.norm_frames), cfg.eval.batch_size,
        cfg.data.pad_divisor, cfg.mask_rule, device, sums,
    )  # fmt: skip
    sml = sums.stats()
    if progress:
        for name in density.names:
            print(
                f"normalization {name}: mean log p {stats.mean()[name]:.2f}, std {stats.std()[name]:.2f} "
                f"over {stats.count[name]} training positions"
            )
        pooled = int((sml.count < SML_MIN_PIXELS).sum())
        print(
            f"sml: max-logit statistics of {sml.n_classes} classes over {int(sml.count.sum())} training "
            f"pixels ({pooled} predicted on < {SML_MIN_PIXELS} pixels: pooled statistics)"
        )
    path = out_dir / CHECKPOINT_NAME
    save_feature_density(
        path, density, cfg, extractor.strides, train_seconds=train_seconds, segmenter_sha256=fingerprint,
        **{SML_KEY: sml.state()},
    )  # fmt: skip
    save_config(cfg, out_dir / "config.yaml")
    return path


def save_feature_density(
    path: str | Path,
    density: FeatureDensity,
    cfg: FeatureFlowsRunConfig,
    strides: Mapping[str, int],
    **extra: Any,
) -> None:
    """Checkpoint: ``density`` state_dict (flows + normalization buffers), ``config``, ``channels``,
    ``strides`` and ``extra`` entries, written atomically; read it with :func:`load_feature_density`.

    ``segmenter_sha256`` among ``extra`` (:func:`~densead.segmenter.segmenter_fingerprint` of the
    segmenter the flows were trained on) makes :func:`load_dense_detector` refuse another one;
    ``max_logit_stats`` (:meth:`MaxLogitStats.state`) gives its detector the ``sml`` map."""
    channels = {name: density.flows[name].channels for name in density.names}
    atomic_torch_save(
        {
            "density": {k: v.detach().cpu() for k, v in density.state_dict().items()},
            "config": checkpoint_config(cfg),
            "channels": channels,
            "strides": {name: int(strides[name]) for name in density.names},
            **extra,
        },
        path,
    )


def _spread_frames(arrays: SceneArrays, n: int) -> SceneArrays:
    """``n`` frames evenly spread over the split (all for ``n <= 0``): CamVid splits are video
    sequences, so the first frames would all show the same street."""
    if n <= 0 or n >= len(arrays):
        return arrays
    idx = np.linspace(0, len(arrays) - 1, n).round().astype(int)
    names = tuple(arrays.names[i] for i in idx)
    return SceneArrays(arrays.images[idx], arrays.labels[idx], arrays.train_ids[idx], names, arrays.classes)


def load_feature_density(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[FeatureDensity, FeatureFlowsRunConfig]:
    """The fitted flows (eval mode) and their run config, from :func:`train_feature_flows`'s checkpoint.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a feature-flow checkpoint, weights that do not fit, or missing
            normalization constants (the message names the file).
    """
    density, cfg, _ = _read_feature_density(path, device)
    return density, cfg


def _read_feature_density(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[FeatureDensity, FeatureFlowsRunConfig, dict[str, Any]]:
    path = Path(path)
    ckpt = read_checkpoint(path, ("density", "config", "channels"), "feature-flow", device)
    cfg = from_dict(FeatureFlowsRunConfig, ckpt["config"], f"{path} (config)")
    try:
        density = FeatureDensity(ckpt["channels"], cfg.flow.n_steps, cfg.flow.hidden, cfg.log_softmax_floor)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        density.load_state_dict(ckpt["density"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the stored config: {state_dict_error(err)}") from None
    if not density.is_normalized:
        raise ValueError(f"{path}: the normalization constants are missing (training did not finish)")
    return density.to(device).eval(), cfg, ckpt


def load_dense_detector(
    path: str | Path,
    cfg: FeatureFlowsRunConfig | None = None,
    device: torch.device | str = "cpu",
    segmenter: str | Path | None = None,
) -> tuple[DenseFeatureDetector, FeatureFlowsRunConfig]:
    """Flows checkpoint + a segmenter → a ready :class:`DenseFeatureDetector`.

    Args:
        path: checkpoint of :func:`train_feature_flows`.
        cfg: run config for the segmenter path, taps, logits node and normalization; None uses
            the one stored in the checkpoint. Its taps must be the checkpoint's.
        device: where to run.
        segmenter: the segmenter checkpoint, where it is not at the path the config names (a
            run moved to another folder or machine); its weights are checked as at that path.

    Raises:
        ValueError: among others, a segmenter whose weights are not those the flows were trained
            on (checkpoints that store ``segmenter_sha256``; older ones cannot be checked).
    """
    density, stored, ckpt = _read_feature_density(path, device)
    cfg = cfg or stored
    if segmenter is not None:
        cfg = replace(cfg, segmenter=str(segmenter))
    elif not Path(cfg.segmenter).is_file():
        raise FileNotFoundError(
            f"{path}: its segmenter {cfg.segmenter} is not found (relative paths are relative to the "
            "working folder); give its path (score_images.py --segmenter, or segmenter: in a flows config)"
        )
    if tuple(cfg.taps) != density.names:
        raise ValueError(
            f"{path}: holds flows for taps {list(density.names)}, the config names {list(cfg.taps)}"
        )
    moved = {n: (node, stored.taps[n]) for n, node in cfg.taps.items() if node != stored.taps[n]}
    if cfg.logits_node != stored.logits_node:
        moved["logits_node"] = (cfg.logits_node, stored.logits_node)
    if moved:  # another layer's features (maybe at another stride): not what the flows model
        what = "; ".join(f"{n} is {a!r} in the config, {b!r} in training" for n, (a, b) in moved.items())
        raise ValueError(f"{path}: the flows were trained on other nodes: {what}")
    segmenter = _load_checked_segmenter(cfg, torch.device(device))
    expected = ckpt.get("segmenter_sha256")  # older checkpoints have none: nothing to check
    if isinstance(expected, str) and expected != (fingerprint := segmenter_fingerprint(segmenter)):
        raise ValueError(
            f"{path}: the flows were trained on the features of segmenter {stored.segmenter} "
            f"(weights sha256 {expected[:16]}...), but {cfg.segmenter} holds other weights "
            f"(sha256 {fingerprint[:16]}...); use the segmenter the flows were trained on, or retrain them"
        )
    extractor = _tap_segmenter(cfg, segmenter, with_logits=True)
    wrong = {n: (extractor.channels[n], density.flows[n].channels) for n in density.names}
    wrong = {n: c for n, c in wrong.items() if c[0] != c[1]}
    if wrong:
        raise ValueError(f"{path}: tap channels (segmenter, flow) do not match: {wrong}")
    sml = None  # checkpoints from before the sml statistics have none: no sml detector
    if SML_KEY in ckpt:
        sml = MaxLogitStats.from_state(ckpt[SML_KEY], f"{path}: {SML_KEY}")
        if sml.n_classes != extractor.channels[LOGITS_TAP]:
            raise ValueError(
                f"{path}: {SML_KEY} holds {sml.n_classes} classes, segmenter {cfg.segmenter} has "
                f"{extractor.channels[LOGITS_TAP]}"
            )
    return DenseFeatureDetector(extractor, density, cfg.normalization, sml), cfg


def check_geometry(path: str | Path, stored: FeatureFlowsRunConfig, cfg: FeatureFlowsRunConfig) -> None:
    """``cfg.data`` must give the features the flows of checkpoint ``path`` were fitted on: the same
    :data:`GEOMETRY_KEYS` (scale, padding) as the stored config ``stored``; and the same protocol,
    or a split would name frames the flows were trained on."""
    if stored.data.protocol != cfg.data.protocol:
        raise ValueError(
            f"data.protocol: the config says {cfg.data.protocol}, but the flows of {path} were trained "
            f"under {stored.data.protocol}: each protocol's splits hold frames the other trains on; "
            f"evaluate with data.protocol={stored.data.protocol}"
        )
    for key in GEOMETRY_KEYS:
        trained, now = getattr(stored.data, key), getattr(cfg.data, key)
        if trained != now:
            raise ValueError(
                f"data.{key}: the config says {now}, but the flows of {path} were trained at "
                f"{key} {trained}; evaluate with data.{key}={trained} (features at another {key} are "
                "not what the densities model)"
            )


# --------------------------------------------------------------------------- evaluation


def _label_panel(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The frame with anomalies tinted red and void pixels darkened."""
    out = image.astype(np.float32)
    out[label == VOID] *= 0.4
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    out[label == ANOMALY] = 0.4 * out[label == ANOMALY] + 0.6 * red
    return out.astype(np.uint8)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    panel = panel.copy()
    cv2.putText(panel, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return panel


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``| detector | AUROC % | AP % | FPR95 % |`` from :func:`evaluate_dense_detectors`' rows."""
    lines = ["| detector | AUROC % | AP % | FPR95 % |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['detector']} | {100 * r['auroc']:.2f} | {100 * r['ap']:.2f} | {100 * r['fpr95']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_dense_detectors(
    detector: DenseFeatureDetector,
    arrays: SceneArrays,
    batch_size: int,
    divisor: int,
    metrics_mode: str = "binned",
    device: torch.device | str = "cpu",
    heatmap_dir: str | Path | None = None,
    n_heatmaps: int = 0,
    heatmap_detectors: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pixel AUROC / AP / FPR95 of every detector (anomaly = held-out classes, void ignored).

    Frames are padded to ``divisor``; the maps are cut back to the frame before scoring. With
    ``heatmap_dir``, the first ``n_heatmaps`` frames get one PNG each: the labels (anomalies
    red) next to :func:`~densead.viz.heatmap_overlay` of every detector in ``heatmap_detectors``.

    Returns:
        ``rows`` (``detector``, ``auroc``, ``ap``, ``fpr95``, ``n_inlier``, ``n_anomaly``) and
        the segmenter's ``miou`` / per-class ``iou`` on the same frames.
    """
    metrics = {name: PixelMetrics(mode=metrics_mode) for name in detector.names}
    for name in heatmap_detectors:
        _check_choice(name, detector.names, "heatmap detector")
    k = len(arrays.classes)
    conf = torch.zeros(k, k, dtype=torch.int64)
    n_inlier = n_anomaly = 0
    for s, x, labels, train_ids in iter_eval_batches(arrays, batch_size, divisor):
        h, w = labels.shape[1:]
        maps, logits = detector.score_maps(x.to(device))
        maps = {name: m[:, :h, :w].cpu() for name, m in maps.items()}
        for name, m in maps.items():
            metrics[name].update(m, labels)
        conf += confusion_matrix(logits[:, :, :h, :w].argmax(1).cpu(), torch.from_numpy(train_ids).long(), k)
        n_inlier += int((labels == INLIER).sum())
        n_anomaly += int((labels == ANOMALY).sum())
        if heatmap_dir is not None:
            for j in range(s.start, s.stop):
                if j >= n_heatmaps:
                    break
                image, label = arrays.images[j], arrays.labels[j]
                panels = [_titled(_label_panel(image, label), "label")]
                for name in heatmap_detectors:
                    panels.append(_titled(heatmap_overlay(image, maps[name][j - s.start].numpy()), name))
                save_png(Path(heatmap_dir) / f"{arrays.names[j]}.png", np.concatenate(panels, axis=1))
    rows = []
    for name, m in metrics.items():
        result = m.compute()
        rows.append(
            {
                "detector": name,
                "auroc": result["auroc"],
                "ap": result["ap"],
                "fpr95": result["fpr95"],
                "n_inlier": n_inlier,
                "n_anomaly": n_anomaly,
            }
        )
    miou, ious = mean_iou(conf)
    return rows, {"miou": miou, "iou": dict(zip(arrays.classes, ious, strict=True))}


def write_results(
    out_dir: str | Path, rows: Sequence[Mapping[str, Any]], header: str = ""
) -> tuple[Path, Path]:
    """``metrics.csv`` and ``metrics.md`` (``header`` above the table) in ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    lines = ["detector,auroc,ap,fpr95,n_inlier,n_anomaly"]
    lines += [
        f"{r['detector']},{r['auroc']!r},{r['ap']!r},{r['fpr95']!r},{r['n_inlier']},{r['n_anomaly']}"
        for r in rows
    ]
    csv_path, md_path = out_dir / "metrics.csv", out_dir / "metrics.md"
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    atomic_write_text(md_path, (header + "\n\n" if header else "") + markdown_table(rows))
    return csv_path, md_path


def evaluate_run(
    cfg: FeatureFlowsRunConfig,
    checkpoint: str | Path | None = None,
    heatmap_dir: str | Path | None = None,
    n_heatmaps: int = 8,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate a trained run on ``cfg.eval.split`` and write ``<output_dir>/eval_<split>/metrics.{csv,md}``.

    The flows and their normalization constants come from ``checkpoint`` (default
    ``<output_dir>/feature_flows.pt``); everything else (segmenter, data, normalization
    formula, evaluation settings) from ``cfg``.

    Returns:
        The rows of :func:`evaluate_dense_detectors` and the segmenter's mIoU on the split
        (plus ``seconds``, the evaluation wall time).
    """
    device = resolve_device(cfg.train.device, "train.device")
    checkpoint = checkpoint or Path(cfg.output_dir) / CHECKPOINT_NAME
    if heatmap_dir is not None:  # not where the tables go, nor where the run's files are
        tables = Path(cfg.output_dir) / f"eval_{cfg.eval.split}"
        check_heatmap_folder(heatmap_dir, outputs=[tables, checkpoint, cfg.segmenter, cfg.data.root])
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    _, stored = load_feature_density(checkpoint)
    check_geometry(checkpoint, stored, cfg)
    detector, _ = load_dense_detector(checkpoint, cfg, device)
    ecfg = cfg.eval
    arrays = load_scene_arrays(cfg.data, ecfg.split)
    start = time.time()
    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "split": ecfg.split,
        "frames": len(arrays),
        "frames_shown": min(len(arrays), n_heatmaps),
        "detectors": list(ecfg.heatmap_detectors),
        "files": "<frame>.png: labels (anomalies red), then each detector's overlay",
    }
    # PNGs go to a hidden folder that replaces heatmap_dir once the tables are written.
    staged = staged_heatmaps(heatmap_dir, record) if heatmap_dir is not None else contextlib.nullcontext()
    with staged as staging:
        rows, seg = evaluate_dense_detectors(
            detector, arrays, ecfg.batch_size, cfg.data.pad_divisor, ecfg.metrics_mode, device,
            staging, n_heatmaps if heatmap_dir is not None else 0, ecfg.heatmap_detectors,
        )  # fmt: skip
        seg["seconds"] = time.time() - start
        header = (
            f"CamVid {ecfg.split}, {len(arrays)} frames at scale {cfg.data.scale}; anomalies: "
            f"{', '.join(cfg.data.held_out)}; segmenter mIoU {100 * seg['miou']:.1f}% over "
            f"{len(arrays.classes)} classes; normalization {cfg.normalization}, mask rule {cfg.mask_rule}; "
            f"metrics {ecfg.metrics_mode}"
        )
        write_results(Path(cfg.output_dir) / f"eval_{ecfg.split}", rows, header)
    return rows, seg
