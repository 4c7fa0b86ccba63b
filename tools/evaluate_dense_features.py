"""Pixel-level evaluation of the feature-density detectors and the segmenter's own baselines.

    python tools/evaluate_dense_features.py configs/camvid_feature_flows.yaml [--set ...] [--heatmaps DIR]

Loads the flows from <output_dir>/feature_flows.pt (or --checkpoint) and the segmenter named in
the config, scores the split eval.split with every detector — each tapped layer, the mean and min
ensembles, max softmax, max logit, entropy — prints AUROC / AP / FPR95 and writes
<output_dir>/eval_<split>/metrics.csv and metrics.md. --heatmaps DIR writes one PNG per frame
(labels + overlays of eval.heatmap_detectors) for the first --n-heatmaps frames, and heatmaps.json;
DIR is new, empty, or one an earlier --heatmaps run wrote (replaced whole once the tables are written).
The config's data.scale and data.pad_divisor must be those the flows were trained with, and the
segmenter must hold the weights they were trained on (checked against the checkpoint's fingerprint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from densead.cli import quiet_interrupt, tool_errors

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead.config import load_config
    from densead.detectors.feature_density import (
        CHECKPOINT_NAME,
        FeatureFlowsRunConfig,
        evaluate_run,
        markdown_table,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="the feature-flow YAML file the flows were trained with")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--checkpoint", help=f"flows checkpoint (default: <output_dir>/{CHECKPOINT_NAME})")
    parser.add_argument("--heatmaps", metavar="DIR", help="write heat-map PNGs here")
    parser.add_argument("--n-heatmaps", type=int, default=8, help="frames with heat maps (default 8)")
    args = parser.parse_args(argv)
    with tool_errors(parser):
        cfg = load_config(FeatureFlowsRunConfig, args.config, args.set)
        rows, seg = evaluate_run(cfg, args.checkpoint, args.heatmaps, args.n_heatmaps)
    print(f"segmenter mIoU {100 * seg['miou']:.1f}% on {cfg.eval.split} ({seg['seconds']:.0f} s)")
    print(markdown_table(rows), end="")
    print(f"tables: {(Path(cfg.output_dir) / f'eval_{cfg.eval.split}').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
