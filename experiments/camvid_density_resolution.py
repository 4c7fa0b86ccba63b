"""Does the logit density lose to max-softmax because of its coarse grid? Evaluate it at every pixel.

    OMP_NUM_THREADS=1 python experiments/camvid_density_resolution.py runs/mseq_ff [--split test]

A research script for issue 6 (result: docs/results_camvid_features.md, "Correction"), not part of
the library. The feature flows are 1×1 maps, so the flow of the ``cls`` tap (the segmenter's
logits) can be applied to any logit vector. The detector evaluates it on the logits' own grid
(stride 4) and upsamples the normalized score bilinearly (``density_cls``); MSP is computed from
logits that are first upsampled to the working scale. This script adds ``density_cls_full``: the
same flow and normalization applied to the bilinearly upsampled logits at every working-scale
pixel, and ``msp_grid``: MSP computed on the stride-4 grid and upsampled, the converse. All maps
are scored with exact pixel metrics on the run's evaluation frames (void excluded).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from densead.config import load_config
from densead.detectors.feature_density import (
    CHECKPOINT_NAME,
    LOGITS_TAP,
    MIN_LOG_PROB,
    FeatureFlowsRunConfig,
    load_dense_detector,
)
from densead.metrics import PixelMetrics
from densead.segmenter import iter_eval_batches, load_scene_arrays

NAMES = ("density_cls", "density_cls_full", "msp", "msp_grid", "entropy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", help="feature-flows run folder (config.yaml + feature_flows.pt), with a 'cls' tap"
    )
    parser.add_argument("--split", default="test", help="eval split / protocol role (default test)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = load_config(FeatureFlowsRunConfig, run / "config.yaml", [f"eval.split={args.split}", *args.set])
    if "cls" not in cfg.taps:
        raise SystemExit(
            f"{run / 'config.yaml'}: no 'cls' tap (the segmenter's logits) among {list(cfg.taps)}"
        )
    detector, _ = load_dense_detector(run / CHECKPOINT_NAME, cfg, torch.device("cpu"))
    arrays = load_scene_arrays(cfg.data, args.split)
    metrics = {n: PixelMetrics(mode="exact") for n in NAMES}
    start = time.time()
    with torch.no_grad():
        for _, x, labels, _ in iter_eval_batches(arrays, cfg.eval.batch_size, cfg.data.pad_divisor):
            h, w = labels.shape[1:]
            maps, logits = detector.score_maps(x)
            lp = detector.density.log_prob_map("cls", logits.float())
            lp = torch.nan_to_num(lp, nan=MIN_LOG_PROB, posinf=-MIN_LOG_PROB, neginf=MIN_LOG_PROB)
            full = detector.density.normalized_scores(
                dict.fromkeys(detector.density.names, lp), cfg.normalization
            )
            grid_logits = detector.extractor(x)[LOGITS_TAP].float()
            msp_grid = 1 - grid_logits.softmax(1).amax(1, keepdim=True)
            out = {
                "density_cls": maps["density_cls"],
                "density_cls_full": full["cls"],
                "msp": maps["msp"],
                "msp_grid": F.interpolate(msp_grid, size=x.shape[-2:], mode="bilinear", align_corners=False)[
                    :, 0
                ],
                "entropy": maps["entropy"],
            }
            for name in NAMES:
                metrics[name].update(out[name][:, :h, :w].float(), torch.from_numpy(labels))
    print(f"{run}, {args.split}: {len(arrays)} frames, {time.time() - start:.0f} s")
    print("| map | AUROC % | AP % | FPR95 % |\n|---|---:|---:|---:|")
    for name in NAMES:
        r = metrics[name].compute()
        print(f"| {name} | {100 * r['auroc']:.2f} | {100 * r['ap']:.2f} | {100 * r['fpr95']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
