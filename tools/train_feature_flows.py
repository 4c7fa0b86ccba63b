"""Train one per-pixel flow per tapped layer of a frozen segmenter (Blum et al., embedding density).

    python tools/train_feature_flows.py configs/camvid_feature_flows.yaml [--set train.steps=100 ...]

Needs the segmenter checkpoint named in the config (tools/train_segmenter.py). Writes
<output_dir>/feature_flows.pt (flow state_dicts + normalization constants + resolved config,
atomically) and <output_dir>/config.yaml. An existing checkpoint is replaced only with
--overwrite.
"""

from __future__ import annotations

import sys

from densead.cli import quiet_interrupt, tool_errors, training_args

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead.config import load_config
    from densead.detectors.feature_density import FeatureFlowsRunConfig, train_feature_flows


def main(argv: list[str] | None = None) -> int:
    config_help = "feature-flow YAML file (see configs/camvid_feature_flows.yaml)"
    parser, args = training_args(__doc__, config_help, argv, log="steps")
    with tool_errors(parser):
        cfg = load_config(FeatureFlowsRunConfig, args.config, args.set)
        path = train_feature_flows(cfg, progress=not args.quiet, overwrite=args.overwrite)
    print(f"checkpoint: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
