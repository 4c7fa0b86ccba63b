"""An image-level experiment of Schirrmeister et al. (2020), end to end and resumable.

Stages, each reused when finished and resumed when interrupted:

1. ``general``: Glow on the general distribution.
2. ``in_dist``: Glow on the in-distribution data, finetuned from ``general``.
3. Diff† (when ``outlier_train.steps > 0``): ``in_dist_outlier`` finetunes
   ``in_dist`` with the outlier loss on general samples (reference: frozen
   ``general``); ``general_outlier`` finetunes ``general`` with in-distribution
   samples as its outliers (reference: frozen ``in_dist``).
4. Scoring of every test set with every model → ``scores.csv`` (with each image's PNG, WebP and
   LOCO code lengths for ``complexity``, ``complexity_webp`` and ``complexity_loco``, Serrà et
   al.'s ratio to a lossless coder, which needs no stage; typicality's reference bits/dim of
   the in-distribution model on its training images, kept in ``in_dist/typical_bpd.yaml`` for
   reruns with the same checkpoint).
5. Evaluation recomputed from ``scores.csv`` → ``report.md``, ``metrics.csv``,
   ROC curves, score histograms, each scale's share of log p, heatmaps.

The config is checked (:func:`check_experiment`) and every test set loaded before
anything is trained or written. A stage that starts from other stages' models
(``in_dist`` from ``general``; the Diff† stages from both) records in
``<stage>/parents.yaml`` which checkpoints it started from (their SHA-256 and
step). It is reused or resumed only while those are unchanged: when an earlier
stage has changed, or will train further in this run (say ``general_train.steps``
was raised), the run stops before training with :class:`StaleStageError`, which
lists the stage folders to delete so they are retrained from the current models.
A stage is likewise stale when its own settings changed since it was trained (say
``in_dist_train.lr``, or ``general_train.steps`` lowered below its checkpoint's step;
:func:`densead.train.resume_problems`), and so are the stages after it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from densead.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    OutlierConfig,
    TrainConfig,
    TrainRunConfig,
    save_config,
)
from densead.data.images import ImageSet, load_image_set
from densead.detectors.complexity import CODER_NAMES, CodedImages
from densead.detectors.glow import DETECTORS
from densead.evaluation import (
    MIN_RESAMPLES,
    Bootstrap,
    differences_markdown,
    markdown_tables,
    spearman,
    write_evaluation,
)
from densead.flows import Glow
from densead.io import atomic_write_text, check_output_dir, staged_heatmaps
from densead.scoring import (
    glow_outputs,
    read_scores_csv,
    save_heatmaps,
    typical_bits_per_dim,
    write_scores_csv,
)
from densead.train import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_glow,
    resolve_device,
    resume_problems,
    train_glow,
)
from densead.viz import plot_bars

__all__ = [
    "DISPLAY_NAMES",
    "IN_SET",
    "RESERVED_SET_NAMES",
    "StaleStageError",
    "check_experiment",
    "run_experiment",
    "train_experiment_models",
]

IN_SET = "in_dist_test"
GENERAL_SET = "general_test"
# Test-set names the experiment gives its own sets (the ``set`` column of scores.csv).
RESERVED_SET_NAMES = (IN_SET, GENERAL_SET)

# Beside a stage's checkpoint: the checkpoints it started from (see the module docstring).
PARENTS_NAME = "parents.yaml"
# Beside the in-distribution checkpoint: typicality's reference bits/dim, and what it is of.
TYPICAL_NAME = "typical_bpd.yaml"
# The training sections of ExperimentConfig, one per kind of stage.
TRAIN_KEYS = ("general_train", "in_dist_train", "outlier_train")

# Detector columns of scores.csv → names in the paper's tables.
DISPLAY_NAMES = {
    "raw": "raw",
    "last_scale": "last scale",
    "ratio": "Diff",
    "ratio_outlier": "Diff†",
    "complexity": "complexity (PNG)",
    "complexity_webp": "complexity (WebP)",
    "complexity_loco": "complexity (LOCO)",
    "typicality": "typicality",
}


class StaleStageError(ValueError):
    """Finished (or started) stages trained from models that have changed since."""


def _stage(cfg: ExperimentConfig, name: str) -> Path:
    return Path(cfg.output_dir) / name / CHECKPOINT_NAME


# --------------------------------------------------------------------------- config checks


def _data_configs(cfg: ExperimentConfig) -> Iterator[tuple[str, DataConfig]]:
    """Every image set of the experiment with its config key, mixed-in parts included."""

    def walk(key: str, dcfg: DataConfig) -> Iterator[tuple[str, DataConfig]]:
        yield key, dcfg
        for i, part in enumerate(dcfg.mix):
            yield from walk(f"{key}.mix[{i}]", part)

    tops = [("general", cfg.general), ("in_dist", cfg.in_dist), (IN_SET, cfg.in_dist_test)]
    tops += [(f"anomalies.{name}", dcfg) for name, dcfg in cfg.anomalies.items()]
    if cfg.general_test is not None:
        tops.append((GENERAL_SET, cfg.general_test))
    for key, dcfg in tops:
        yield from walk(key, dcfg)


def check_experiment(cfg: ExperimentConfig) -> None:
    """Raise :class:`~densead.config.ConfigError`, naming the key, for a config that would
    fail (or mislead) only after training: no anomaly sets, a reserved or unusable set name,
    a set whose channels differ from ``model.in_channels`` or whose size the Glow cannot
    take, scoring batch sizes out of range. Sets of size 0 (their own size) are checked when
    loaded (:func:`run_experiment`)."""
    m = cfg.model
    if m.in_channels not in (1, 3):
        raise ConfigError(f"model.in_channels must be 1 or 3 (greyscale or RGB images), got {m.in_channels}")
    if cfg.eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    if cfg.n_heatmaps < 0:
        raise ConfigError(f"n_heatmaps must be >= 0, got {cfg.n_heatmaps}")
    if cfg.bootstrap < 0 or 0 < cfg.bootstrap < MIN_RESAMPLES:
        raise ConfigError(
            f"bootstrap must be 0 (no intervals) or at least {MIN_RESAMPLES} resamples, got {cfg.bootstrap}"
        )
    for key in ("general_train", "in_dist_train"):
        if getattr(cfg, key).steps < 1:
            raise ConfigError(f"{key}.steps must be >= 1, got {getattr(cfg, key).steps}")
    for key in ("in_dist_train", "outlier_train"):
        if getattr(cfg, key).init_from:
            raise ConfigError(
                f"{key}.init_from is {getattr(cfg, key).init_from!r}, but the experiment sets it (the "
                "in-distribution model starts from the general one, each Diff† model from its plain "
                "counterpart); leave it empty"
            )
    if cfg.outlier_train.steps < 0:
        raise ConfigError(f"outlier_train.steps must be >= 0 (0: no Diff†), got {cfg.outlier_train.steps}")
    if not cfg.anomalies:
        raise ConfigError(
            "anomalies: no anomaly sets; name at least one (anomalies: {<name>: <data config>}), "
            "the positives every metric is computed on"
        )
    for name in cfg.anomalies:
        if name in RESERVED_SET_NAMES:
            raise ConfigError(
                f"anomalies.{name}: the name {name!r} is reserved for the experiment's own test sets "
                f"({', '.join(RESERVED_SET_NAMES)}); rename the anomaly set"
            )
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
            raise ConfigError(
                f"anomalies.{name!r}: an anomaly set name must be usable as a folder name (heatmaps/<name>) "
                "and a table cell: not empty, '.' or '..', no '/', '\\' or line break"
            )
    factor = 2**m.n_scales
    for key, dcfg in _data_configs(cfg):
        if dcfg.channels != m.in_channels:
            raise ConfigError(
                f"{key}.channels is {dcfg.channels} but model.in_channels is {m.in_channels}: every set "
                f"goes through the same models; set {key}.channels: {m.in_channels}"
            )
        if dcfg.size % factor:
            raise ConfigError(
                f"{key}.size is {dcfg.size}, not divisible by {factor}: the Glow halves height and "
                f"width at each of its model.n_scales={m.n_scales} scales"
            )
        for i, part in enumerate(dcfg.mix):
            if dcfg.size and part.size and part.size != dcfg.size:
                raise ConfigError(f"{key}.mix[{i}].size is {part.size} but {key}.size is {dcfg.size}")


def _needs_own_size(dcfg: DataConfig) -> bool:
    return dcfg.size == 0 or any(_needs_own_size(part) for part in dcfg.mix)


def _check_loaded(key: str, images: ImageSet, cfg: ExperimentConfig) -> None:
    """A loaded set's images fit the models (channels are checked by :func:`check_experiment`;
    the size of ``size: 0`` sets is known only here)."""
    factor = 2**cfg.model.n_scales
    _, c, h, w = images.images.shape
    if c != cfg.model.in_channels or h % factor or w % factor:
        raise ConfigError(
            f"{key}: images of {c}×{h}×{w} do not fit the models, which take {cfg.model.in_channels} "
            f"channels and height and width divisible by {factor} (2^model.n_scales); set {key}.size "
            "(0 keeps the images' own size) and resize"
        )


# --------------------------------------------------------------------------- training stages


@dataclass(frozen=True)
class _Stage:
    name: str
    run: TrainRunConfig
    parents: tuple[str, ...]  # stages whose checkpoints it starts from or compares against


def _stages(cfg: ExperimentConfig) -> list[_Stage]:
    root = Path(cfg.output_dir)

    def stage(
        name: str,
        data: DataConfig,
        tcfg: TrainConfig,
        parents: tuple[str, ...] = (),
        outlier: OutlierConfig | None = None,
    ) -> _Stage:
        return _Stage(name, TrainRunConfig(str(root / name), data, cfg.model, tcfg, outlier), parents)

    stages = [
        stage("general", cfg.general, cfg.general_train),
        stage(
            "in_dist",
            cfg.in_dist,
            replace(cfg.in_dist_train, init_from=str(_stage(cfg, "general"))),
            ("general",),
        ),
    ]
    if cfg.outlier_train.steps > 0:
        # Diff†: each model finetuned from itself with the other as reference, the other's data as outliers.
        ocfg = dict(weight=cfg.outlier_weight, temperature=cfg.outlier_temperature)
        data = {"in_dist": cfg.in_dist, "general": cfg.general}
        for own, other in (("in_dist", "general"), ("general", "in_dist")):
            tcfg = replace(cfg.outlier_train, init_from=str(_stage(cfg, own)))
            outlier = OutlierConfig(data[other], str(_stage(cfg, other)), **ocfg)
            stages.append(stage(f"{own}_outlier", data[own], tcfg, (own, other), outlier))
    return stages


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_record(path: Path) -> dict | None:
    """A YAML record the experiment keeps beside a checkpoint: None when there is none, ``{}``
    when it cannot be read (it then matches nothing: stale, or computed again)."""
    if not path.is_file():
        return None
    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_parents(stage_dir: Path) -> dict | None:
    return _read_record(stage_dir / PARENTS_NAME)


def _check_reuse(cfg: ExperimentConfig, stages: list[_Stage]) -> None:
    """Raise :class:`StaleStageError` when a stage that would be reused or resumed started from
    a checkpoint that has changed since, or that this run will train further."""
    root = Path(cfg.output_dir)
    state: dict[str, tuple[int, bool] | None] = {}  # stage → (step, finished) of its checkpoint
    will_train: set[str] = set()
    stale: dict[str, str] = {}
    digests: dict[str, str] = {}
    for st in stages:
        ckpt = root / st.name / CHECKPOINT_NAME
        state[st.name] = None
        if ckpt.is_file():
            done = load_checkpoint(ckpt, mmap=True)
            state[st.name] = (int(done["step"]), bool(done["finished"]))
            record = _read_parents(root / st.name)
            reasons = []
            changed = resume_problems(done, st.run)
            if changed:
                reasons.append(
                    f"its settings changed since it was trained ({st.name}/config.yaml has them): "
                    + "; ".join(changed)
                )
            for p in st.parents:
                p_ckpt = root / p / CHECKPOINT_NAME
                if p in will_train:
                    if p in stale:
                        reasons.append(f"{p} is retrained")
                    elif state[p] is None:
                        reasons.append(f"{p} is trained anew (it has no checkpoint)")
                    else:
                        steps = next(s for s in stages if s.name == p).run.train.steps
                        reasons.append(f"{p} trains further (from step {state[p][0]} to {steps})")
                elif record is None:  # a stage trained before the records existed
                    if p_ckpt.stat().st_mtime > ckpt.stat().st_mtime:
                        reasons.append(f"{p}'s checkpoint is newer than {st.name}'s")
                else:
                    digests[p] = digests.get(p) or _digest(p_ckpt)
                    rec = record.get(p) if isinstance(record.get(p), dict) else {}
                    if rec.get("sha256") != digests[p]:
                        was = f"step {rec['step']}" if "step" in rec else "unknown"
                        reasons.append(
                            f"{p}'s checkpoint changed since {st.name} started from it "
                            f"(then {was}, now step {state[p][0]})"
                        )
            if reasons:
                stale[st.name] = "; ".join(reasons)
        step_finished = state[st.name]
        if (
            st.name in stale
            or step_finished is None
            or not (step_finished[1] and step_finished[0] >= st.run.train.steps)
        ):
            will_train.add(st.name)
    if stale:
        lines = [f"  {name}: {why}" for name, why in stale.items()]
        folders = " ".join(str(root / name) for name in stale)
        raise StaleStageError(
            f"{root}: these finished or interrupted stages no longer fit this config (reusing them "
            "would report models trained with other settings, or from other versions of the stages "
            "before them):\n" + "\n".join(lines) + f"\nDelete their folders to retrain them with "
            f"this config: rm -r {folders}"
        )


def _train(cfg: ExperimentConfig, stages: list[_Stage], progress: bool) -> dict[str, Path]:
    root = Path(cfg.output_dir)
    ckpts = {}
    for st in stages:
        stage_dir = root / st.name
        if st.parents and (not (stage_dir / CHECKPOINT_NAME).is_file() or _read_parents(stage_dir) is None):
            # Starting (or adopting an unrecorded run): remember what it starts from.
            record = {
                p: {"sha256": _digest(ckpts[p]), "step": int(load_checkpoint(ckpts[p], mmap=True)["step"])}
                for p in st.parents
            }
            atomic_write_text(stage_dir / PARENTS_NAME, yaml.safe_dump(record, sort_keys=False))
        ckpts[st.name] = train_glow(st.run, resume=True, progress=progress)
    return ckpts


def train_experiment_models(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Path]:
    """Train (or reuse, or resume) every model the experiment needs; their checkpoints.

    Raises :class:`StaleStageError` before training anything when a stage would be reused
    although a stage it started from has changed (see the module docstring).
    """
    check_experiment(cfg)
    stages = _stages(cfg)
    _check_reuse(cfg, stages)
    return _train(cfg, stages, progress)


def _test_sets(cfg: ExperimentConfig) -> dict[str, ImageSet]:
    n_bins = cfg.model.n_bins
    sets = {IN_SET: load_image_set(cfg.in_dist_test, n_bins, IN_SET)}
    _check_loaded(IN_SET, sets[IN_SET], cfg)
    for name, dcfg in cfg.anomalies.items():
        sets[name] = load_image_set(dcfg, n_bins, name)
        _check_loaded(f"anomalies.{name}", sets[name], cfg)
    if cfg.general_test is not None:
        sets[GENERAL_SET] = load_image_set(cfg.general_test, n_bins, GENERAL_SET)
        _check_loaded(GENERAL_SET, sets[GENERAL_SET], cfg)
    return sets


# no_grad around the whole function: the glow_outputs generators below each enter and leave
# no_grad at their yields, interleaved, which otherwise leaves gradients off after scoring.
@torch.no_grad()
def _score_sets(
    cfg: ExperimentConfig,
    models: dict[str, Glow],
    sets: dict[str, ImageSet],
    device,
    progress: bool,
    typical_bpd: float,
) -> tuple[dict[str, list], dict[str, dict[str, torch.Tensor]]]:
    """Columns of scores.csv, and pixel maps of the first images of each set; ``typical_bpd``:
    the in-distribution model's mean bits/dim on its training images (``typicality``)."""
    cols: dict[str, list] = {"set": [], "index": [], "label": []}
    n_scales = cfg.model.n_scales
    for m in [*models, *CODER_NAMES]:  # log_prob_png, _webp, _loco: complexity's general distributions
        cols[f"log_prob_{m}"] = []
    for i in range(1, n_scales + 1):
        cols[f"scale{i}_in_dist"] = []
    for d in DISPLAY_NAMES:
        if d != "ratio_outlier" or "in_dist_outlier" in models:
            cols[d] = []
    heat: dict[str, dict[str, list]] = {}
    for set_name, images in sets.items():
        outs = {
            m: glow_outputs(model, images, cfg.eval_batch_size, device, progress)
            for m, model in models.items()
        }
        heat[set_name] = {d: [] for d in cols if d in DISPLAY_NAMES}
        n_maps = 0
        for batches in zip(*outs.values(), strict=True):
            sl = batches[0][0]
            o = {m: b[1] for m, b in zip(outs, batches, strict=True)}
            cols["set"] += [set_name] * (sl.stop - sl.start)
            cols["index"] += list(range(sl.start, sl.stop))
            cols["label"] += images.labels[sl].tolist()
            levels = CodedImages(images.images[sl])  # each coder codes the batch once
            for m in models:
                cols[f"log_prob_{m}"] += o[m].log_prob().double().tolist()
            for coder in CODER_NAMES:
                cols[f"log_prob_{coder}"] += levels.log_prob(coder).tolist()
            for i, v in enumerate(o["in_dist"].scale_log_probs().double().T, start=1):
                cols[f"scale{i}_in_dist"] += v.tolist()
            # every column a registered detector names; Diff†: the ratio of the outlier-trained pair
            pairs = {d: (DETECTORS[d], o["in_dist"], o["general"]) for d in DISPLAY_NAMES if d in DETECTORS}
            if "in_dist_outlier" in o:
                pairs["ratio_outlier"] = (DETECTORS["ratio"], o["in_dist_outlier"], o["general_outlier"])
            take = max(0, min(cfg.n_heatmaps - n_maps, sl.stop - sl.start))
            for col, (det, oi, og) in pairs.items():
                cols[col] += det.score_from(oi, og, levels, typical_bpd).double().tolist()
                if take and det.per_pixel:  # not a file coder's map: raw's, shifted per image
                    heat[set_name][col].append(det.map_from(oi, og, levels, typical_bpd)[:take].cpu())
            n_maps += take
        heat[set_name] = {d: torch.cat(v) for d, v in heat[set_name].items() if v}
    return cols, heat


def _report(
    cfg: ExperimentConfig,
    cols: dict[str, np.ndarray],
    models: list[str],
    wall: dict[str, str],
    shapes: dict[str, tuple[int, int, int]],
    typical_bpd: float,
) -> str:
    """The report; ``shapes``: ``(C, H, W)`` of each set's images (sets may differ in size:
    the Glow is fully convolutional), for the dimension counts of bits/dim and scale shares;
    ``typical_bpd``: the in-distribution model's mean bits/dim on its training images."""
    out_dir = Path(cfg.output_dir)
    anomaly_sets = list(cfg.anomalies)
    detectors = [d for d in DISPLAY_NAMES if d in cols]
    bootstrap = Bootstrap(cfg.bootstrap) if cfg.bootstrap else None
    rows, diffs = write_evaluation(
        out_dir, cols, IN_SET, anomaly_sets, detectors, DISPLAY_NAMES, bootstrap, "raw" if bootstrap else None
    )
    n_dims = {name: math.prod(shape) for name, shape in shapes.items()}

    def bpd(model: str, set_name: str) -> float:
        lp = cols[f"log_prob_{model}"][cols["set"] == set_name]
        return float(-lp.mean() / (n_dims[set_name] * math.log(2)))

    set_names = list(dict.fromkeys(cols["set"]))
    lines = [f"# Experiment report: {out_dir.name}", "", markdown_tables(rows, DISPLAY_NAMES, bootstrap), ""]
    if diffs:
        lines += [
            "## Each detector against raw likelihood",
            "",
            differences_markdown(diffs, bootstrap, DISPLAY_NAMES),
        ]
    lines += ["## Bits per dimension (noise-free evaluation)", ""]
    lines += ["| model | " + " | ".join(set_names) + " |", "|---|" + "---:|" * len(set_names)]
    for m in [*models, *CODER_NAMES]:  # png, webp, loco: complexity's general distributions
        lines.append(f"| {m} | " + " | ".join(f"{bpd(m, s):.3f}" for s in set_names) + " |")
    lines += [
        "",
        "png, webp: each image's PNG or lossless WebP file, the general distributions of complexity "
        "(PNG) and complexity (WebP); their bits include the files' headers (PNG: 63 bytes whatever the "
        "image, 7.9 bits/dim of an 8×8 greyscale image, 0.16 of a 32×32×3 one), which shift every image "
        "of a size alike. loco: the ideal code length of a per-pixel coder (LOCO-I's predictor, adaptive "
        "contexts; no header), whose pixel map is complexity (LOCO)'s.",
        "",
        f"typicality: |bits/dim of the in-distribution model − {typical_bpd:.3f}|, its mean on its own "
        "training images (Nalisnick et al. 2019, one image at a time).",
    ]
    lines += ["", "## Spearman correlation of log p: in-distribution vs general model", ""]
    lines += ["| set | Spearman ρ |", "|---|---:|"]
    for s in set_names:
        mask = cols["set"] == s
        lines.append(
            f"| {s} | {spearman(cols['log_prob_in_dist'][mask], cols['log_prob_general'][mask]):.3f} |"
        )
    # Each scale's discrete share: c_i minus the quantization term of the n_i
    # latent dimensions it factors out, so the shares are bits and sum to −log p.
    n_scales = cfg.model.n_scales
    lines += ["", "## Each scale's share of −log p (in-distribution model), bits/dim of the image", ""]
    lines += ["| set | " + " | ".join(f"scale {i}" for i in range(1, n_scales + 1)) + " | total |"]
    lines.append("|---|" + "---:|" * (n_scales + 1))
    shares = {}
    for s in set_names:
        mask = cols["set"] == s
        c, h, w = shapes[s]
        latent_dims = [math.prod(shape[1:]) for shape in Glow.latent_shapes_of(c, n_scales, h, w)]
        bits = np.array(
            [
                -(cols[f"scale{i}_in_dist"][mask].mean() - latent_dims[i - 1] * math.log(cfg.model.n_bins))
                / (n_dims[s] * math.log(2))
                for i in range(1, n_scales + 1)
            ]
        )
        shares[s] = bits / bits.sum()
        cells = [f"{b:.3f} ({100 * v:.0f}%)" for b, v in zip(bits, shares[s], strict=True)]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {bits.sum():.3f} |")
    plot_bars(
        out_dir / "scale_shares.png",
        {f"scale {i + 1}": float(v) for i, v in enumerate(shares[IN_SET])},
        title="each scale's share of -log p (in-dist test)",
        ylabel="fraction of -log p (bits)",
    )
    lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in wall.items()]
    lines += [
        "",
        f"Files: `scores.csv` (`tools/evaluate.py scores.csv --in-set {IN_SET}` recomputes the metrics"
        + (f"; `--bootstrap {cfg.bootstrap} --compare raw` the intervals" if diffs else "")
        + "), `metrics.csv`, "
        + ("`differences.csv`, " if diffs else "")
        + "`roc_*.png`, `hist_*.png`, `scale_shares.png`, `heatmaps/`.",
        "",
    ]
    return "\n".join(lines)


def _typical_bpd(cfg: ExperimentConfig, model: Glow, ckpt: Path, device, progress: bool) -> float:
    """Typicality's ``b̄``: ``model``'s mean bits/dim on the ``in_dist`` images
    (:func:`~densead.scoring.typical_bits_per_dim`). Kept in ``in_dist/typical_bpd.yaml`` with the
    SHA-256 of the checkpoint and of the images (as loaded: a data file rewritten in place is
    new images) and ``n_bins``, and read from there while all three are unchanged: a rerun that
    reuses the checkpoint loads the training set but does not score it again."""
    images = load_image_set(cfg.in_dist, cfg.model.n_bins, "in_dist")
    key = {
        "checkpoint_sha256": _digest(ckpt),
        "images_sha256": hashlib.sha256(images.images.numpy().tobytes()).hexdigest(),
        "images_shape": list(images.images.shape),
        "n_bins": cfg.model.n_bins,
    }
    path = ckpt.parent / TYPICAL_NAME
    record = _read_record(path) or {}  # none, or unreadable: computed again and (re)written
    if all(record.get(k) == v for k, v in key.items()):
        value = record.get("typical_bpd")
        if isinstance(value, float) and math.isfinite(value):
            return value
    value = typical_bits_per_dim(model, images, cfg.eval_batch_size, device, progress)
    record = {**key, "typical_bpd": value}
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))
    return value


def _replace_heatmaps(
    out_dir: Path, heat: Mapping[str, Mapping[str, Tensor]], sets: Mapping[str, ImageSet], n_bins: int
) -> None:
    """``heatmaps/<set>/`` written whole into a hidden staging folder, then put in place of the
    previous run's: no PNG of a set, image or detector this run does not show stays behind."""
    with staged_heatmaps(out_dir / "heatmaps") as folder:
        for set_name, maps in heat.items():
            n = next(iter(maps.values())).shape[0] if maps else 0
            shown = ImageSet(sets[set_name].images[:n], sets[set_name].labels[:n], set_name)
            stems = [f"{i:04d}" for i in range(n)]
            save_heatmaps(folder / set_name, shown, maps, stems, n_bins)


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> Path:
    """Train, score and evaluate; returns the report path (``<output_dir>/report.md``).

    Everything that can be checked is checked before anything is trained or written: the
    config (:func:`check_experiment`), the test sets (loaded, and their shapes checked), the
    size of training sets that keep their own size, and that reused stages are not stale
    (:class:`StaleStageError`).
    """
    import time

    check_experiment(cfg)
    devices = {key: resolve_device(getattr(cfg, key).device, f"{key}.device") for key in TRAIN_KEYS}
    check_output_dir(cfg.output_dir)
    sets = _test_sets(cfg)
    for key, dcfg in (("general", cfg.general), ("in_dist", cfg.in_dist)):
        if _needs_own_size(dcfg):
            _check_loaded(key, load_image_set(dcfg, cfg.model.n_bins, key), cfg)
    stages = _stages(cfg)
    _check_reuse(cfg, stages)

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "experiment.yaml")
    t0 = time.time()
    ckpts = _train(cfg, stages, progress)
    t1 = time.time()
    device = devices["in_dist_train"]  # scoring runs where the in-distribution model trained
    models = {name: load_glow(path, device)[0] for name, path in ckpts.items()}
    typical = _typical_bpd(cfg, models["in_dist"], Path(ckpts["in_dist"]), device, progress)
    cols, heat = _score_sets(cfg, models, sets, device, progress, typical)
    # report.md is written last: while the outputs below are being replaced, none is left
    # beside them from an earlier run.
    (out_dir / "report.md").unlink(missing_ok=True)
    write_scores_csv(out_dir / "scores.csv", cols)
    _replace_heatmaps(out_dir, heat, sets, cfg.model.n_bins)
    t2 = time.time()
    wall = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "training wall time": f"{t1 - t0:.0f} s (0 when all checkpoints were reused)",
        "scoring + report wall time": f"{t2 - t1:.0f} s",
    }
    shapes = {name: tuple(images.images.shape[1:]) for name, images in sets.items()}
    report = _report(cfg, read_scores_csv(out_dir / "scores.csv"), list(models), wall, shapes, typical)
    path = out_dir / "report.md"
    atomic_write_text(path, report)
    return path
