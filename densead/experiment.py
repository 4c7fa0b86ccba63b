"""An image-level experiment of Schirrmeister et al. (2020), end to end and resumable.

Stages, each reused when finished and resumed when interrupted:

1. ``general``: Glow on the general distribution.
2. ``in_dist``: Glow on the in-distribution data, finetuned from ``general``.
3. Diff† (when ``outlier_train.steps > 0``): ``in_dist_outlier`` finetunes
   ``in_dist`` with the outlier loss on general samples (reference: frozen
   ``general``); ``general_outlier`` finetunes ``general`` with in-distribution
   samples as its outliers (reference: frozen ``in_dist``).
4. Scoring of every test set with every model → ``scores.csv``.
5. Evaluation recomputed from ``scores.csv`` → ``report.md``, ``metrics.csv``,
   ROC curves, score histograms, each scale's share of log p, heatmaps.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from densead.config import ExperimentConfig, OutlierConfig, TrainConfig, TrainRunConfig, save_config
from densead.data.images import ImageSet, load_image_set
from densead.detectors.glow import DETECTORS
from densead.evaluation import markdown_tables, spearman, write_evaluation
from densead.flows import Glow
from densead.io import atomic_write_text
from densead.scoring import glow_outputs, read_scores_csv, save_heatmaps, write_scores_csv
from densead.train import CHECKPOINT_NAME, load_glow, resolve_device, train_glow
from densead.viz import plot_bars

__all__ = ["DISPLAY_NAMES", "IN_SET", "run_experiment", "train_experiment_models"]

IN_SET = "in_dist_test"
GENERAL_SET = "general_test"

# Detector columns of scores.csv → names in the paper's tables.
DISPLAY_NAMES = {"raw": "raw", "last_scale": "last scale", "ratio": "Diff", "ratio_outlier": "Diff†"}


def _stage(cfg: ExperimentConfig, name: str) -> Path:
    return Path(cfg.output_dir) / name / CHECKPOINT_NAME


def train_experiment_models(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Path]:
    """Train (or reuse, or resume) every model the experiment needs; their checkpoints."""
    root = Path(cfg.output_dir)
    ckpts = {}

    def run(name: str, data, tcfg: TrainConfig, outlier: OutlierConfig | None = None) -> None:
        run_cfg = TrainRunConfig(str(root / name), data, cfg.model, tcfg, outlier)
        ckpts[name] = train_glow(run_cfg, resume=True, progress=progress)

    run("general", cfg.general, cfg.general_train)
    run("in_dist", cfg.in_dist, replace(cfg.in_dist_train, init_from=str(_stage(cfg, "general"))))
    if cfg.outlier_train.steps > 0:
        ocfg = dict(weight=cfg.outlier_weight, temperature=cfg.outlier_temperature)
        run(
            "in_dist_outlier",
            cfg.in_dist,
            replace(cfg.outlier_train, init_from=str(_stage(cfg, "in_dist"))),
            OutlierConfig(cfg.general, str(_stage(cfg, "general")), **ocfg),
        )
        run(
            "general_outlier",
            cfg.general,
            replace(cfg.outlier_train, init_from=str(_stage(cfg, "general"))),
            OutlierConfig(cfg.in_dist, str(_stage(cfg, "in_dist")), **ocfg),
        )
    return ckpts


def _test_sets(cfg: ExperimentConfig) -> dict[str, ImageSet]:
    n_bins = cfg.model.n_bins
    sets = {IN_SET: load_image_set(cfg.in_dist_test, n_bins, IN_SET)}
    for name, dcfg in cfg.anomalies.items():
        if name in (IN_SET, GENERAL_SET):
            raise ValueError(f"anomaly set name {name!r} is reserved")
        sets[name] = load_image_set(dcfg, n_bins, name)
    if cfg.general_test is not None:
        sets[GENERAL_SET] = load_image_set(cfg.general_test, n_bins, GENERAL_SET)
    return sets


def _score_sets(
    cfg: ExperimentConfig, models: dict[str, Glow], sets: dict[str, ImageSet], device, progress: bool
) -> tuple[dict[str, list], dict[str, dict[str, torch.Tensor]]]:
    """Columns of scores.csv, and pixel maps of the first images of each set."""
    cols: dict[str, list] = {"set": [], "index": [], "label": []}
    n_scales = cfg.model.n_scales
    for m in models:
        cols[f"log_prob_{m}"] = []
    for i in range(1, n_scales + 1):
        cols[f"scale{i}_in_dist"] = []
    for d in DISPLAY_NAMES:
        if d != "ratio_outlier" or "in_dist_outlier" in models:
            cols[d] = []
    heat: dict[str, dict[str, list]] = {}
    raw, last, ratio = DETECTORS["raw"], DETECTORS["last_scale"], DETECTORS["ratio"]
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
            for m in models:
                cols[f"log_prob_{m}"] += o[m].log_prob().double().tolist()
            for i, v in enumerate(o["in_dist"].scale_log_probs().double().T, start=1):
                cols[f"scale{i}_in_dist"] += v.tolist()
            pairs = {
                "raw": (raw, o["in_dist"], None),
                "last_scale": (last, o["in_dist"], None),
                "ratio": (ratio, o["in_dist"], o["general"]),
            }
            if "in_dist_outlier" in o:
                pairs["ratio_outlier"] = (ratio, o["in_dist_outlier"], o["general_outlier"])
            take = max(0, min(cfg.n_heatmaps - n_maps, sl.stop - sl.start))
            for col, (det, oi, og) in pairs.items():
                cols[col] += det.score_from(oi, og).double().tolist()
                if take:
                    heat[set_name][col].append(det.map_from(oi, og)[:take].cpu())
            n_maps += take
        heat[set_name] = {d: torch.cat(v) for d, v in heat[set_name].items() if v}
    return cols, heat


def _report(
    cfg: ExperimentConfig, cols: dict[str, np.ndarray], models: list[str], wall: dict[str, str]
) -> str:
    out_dir = Path(cfg.output_dir)
    anomaly_sets = list(cfg.anomalies)
    detectors = [d for d in DISPLAY_NAMES if d in cols]
    rows = write_evaluation(out_dir, cols, IN_SET, anomaly_sets, detectors, DISPLAY_NAMES)
    c, h, w = cfg.model.in_channels, cfg.in_dist_test.size, cfg.in_dist_test.size
    n_dims = c * h * w

    def bpd(model: str, set_name: str) -> float:
        lp = cols[f"log_prob_{model}"][cols["set"] == set_name]
        return float(-lp.mean() / (n_dims * math.log(2)))

    set_names = list(dict.fromkeys(cols["set"]))
    lines = [f"# Experiment report: {out_dir.name}", "", markdown_tables(rows, DISPLAY_NAMES), ""]
    lines += ["## Bits per dimension (noise-free evaluation)", ""]
    lines += ["| model | " + " | ".join(set_names) + " |", "|---|" + "---:|" * len(set_names)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{bpd(m, s):.3f}" for s in set_names) + " |")
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
    latent_dims = [
        math.prod(shape[1:]) for shape in Glow.latent_shapes_of(cfg.model.in_channels, n_scales, h, w)
    ]
    lines += ["", "## Each scale's share of −log p (in-distribution model), bits/dim of the image", ""]
    lines += ["| set | " + " | ".join(f"scale {i}" for i in range(1, n_scales + 1)) + " | total |"]
    lines.append("|---|" + "---:|" * (n_scales + 1))
    shares = {}
    for s in set_names:
        mask = cols["set"] == s
        bits = np.array(
            [
                -(cols[f"scale{i}_in_dist"][mask].mean() - latent_dims[i - 1] * math.log(cfg.model.n_bins))
                / (n_dims * math.log(2))
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
        "Files: `scores.csv` (every number above is recomputed from it by `tools/evaluate.py`),",
        "`metrics.csv`, `roc_*.png`, `hist_*.png`, `scale_shares.png`, `heatmaps/`.",
        "",
    ]
    return "\n".join(lines)


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> Path:
    """Train, score and evaluate; returns the report path (``<output_dir>/report.md``)."""
    import time

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "experiment.yaml")
    t0 = time.time()
    ckpts = train_experiment_models(cfg, progress)
    t1 = time.time()
    device = resolve_device(cfg.in_dist_train.device)
    models = {name: load_glow(path, device)[0] for name, path in ckpts.items()}
    sets = _test_sets(cfg)
    cols, heat = _score_sets(cfg, models, sets, device, progress)
    write_scores_csv(out_dir / "scores.csv", cols)
    for set_name, maps in heat.items():
        n = next(iter(maps.values())).shape[0] if maps else 0
        shown = ImageSet(sets[set_name].images[:n], sets[set_name].labels[:n], set_name)
        save_heatmaps(
            out_dir / "heatmaps" / set_name, shown, maps, [f"{i:04d}" for i in range(n)], cfg.model.n_bins
        )
    t2 = time.time()
    wall = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "training wall time": f"{t1 - t0:.0f} s (0 when all checkpoints were reused)",
        "scoring + report wall time": f"{t2 - t1:.0f} s",
    }
    report = _report(cfg, read_scores_csv(out_dir / "scores.csv"), list(models), wall)
    path = out_dir / "report.md"
    atomic_write_text(path, report)
    return path
