"""Train a dense road Glow (masked loss on random crops) from a YAML config.

    python tools/train_road_glow.py configs/camvid_glow_general.yaml   # general distribution
    python tools/train_road_glow.py configs/camvid_glow.yaml           # in-distribution (finetuned)
    python tools/train_road_glow.py configs/camvid_glow.yaml --set train.steps=40000 --resume

Writes <output_dir>/checkpoint.pt (state_dicts + resolved config, atomically, every
train.checkpoint_every steps) and <output_dir>/config.yaml. Pixels of data.held_out classes and
data.void classes never enter the loss (see densead/dense.py). --resume refuses a checkpoint trained
under other data keys that define the frames or the inlier/anomaly/void labels (dataset, root, split,
held_out, void, max_frames, protocol, downscale), and one of other settings (train.steps may grow; where
it runs, logs and saves may change). An existing checkpoint is replaced only with --overwrite.
"""

from __future__ import annotations

import sys

from densead.cli import quiet_interrupt, tool_errors, training_args

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead.config import load_config
    from densead.dense import RoadTrainConfig, train_road_glow


def main(argv: list[str] | None = None) -> int:
    config_help = "road training YAML file (see configs/camvid_glow.yaml)"
    parser, args = training_args(__doc__, config_help, argv, resume=True)
    with tool_errors(parser):
        cfg = load_config(RoadTrainConfig, args.config, args.set)
        path = train_road_glow(
            cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite
        )
    print(f"checkpoint: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
