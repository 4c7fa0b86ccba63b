"""Train one per-pixel flow per tapped layer of a frozen segmenter (Blum et al., embedding density).

    python tools/train_feature_flows.py configs/camvid_feature_flows.yaml [--set train.steps=100 ...]

Needs the segmenter checkpoint named in the config (tools/train_segmenter.py). Writes
<output_dir>/feature_flows.pt (flow state_dicts + normalization constants + resolved config,
atomically) and <output_dir>/config.yaml. An existing checkpoint is replaced only with
--overwrite.
"""

from __future__ import annotations

import argparse
import sys

from densead.cli import tool_errors
from densead.config import load_config
from densead.detectors.feature_density import FeatureFlowsRunConfig, train_feature_flows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="feature-flow YAML file (see configs/camvid_feature_flows.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--quiet", action="store_true", help="no per-step log")
    parser.add_argument("--overwrite", action="store_true", help="train anew over an existing checkpoint")
    args = parser.parse_args(argv)
    with tool_errors(parser):
        cfg = load_config(FeatureFlowsRunConfig, args.config, args.set)
        path = train_feature_flows(cfg, progress=not args.quiet, overwrite=args.overwrite)
    print(f"checkpoint: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
