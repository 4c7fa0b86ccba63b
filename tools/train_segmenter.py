"""Train the segmenter whose frozen features the per-pixel flows model (CamVid, held-out classes ignored).

    python tools/train_segmenter.py configs/camvid_segmenter.yaml [--set train.steps=100 ...]

Writes <output_dir>/checkpoint.pt (state_dict + resolved config + test mIoU, atomically),
<output_dir>/config.yaml and <output_dir>/metrics.yaml, and prints the mIoU over the
in-distribution classes on the evaluation split. An existing checkpoint is replaced only
with --overwrite.
"""

from __future__ import annotations

import sys

from densead.cli import quiet_interrupt, tool_errors, training_args

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead.config import load_config
    from densead.segmenter import SegmenterRunConfig, train_segmenter


def main(argv: list[str] | None = None) -> int:
    config_help = "segmenter YAML file (see configs/camvid_segmenter.yaml)"
    parser, args = training_args(__doc__, config_help, argv, log="steps")
    with tool_errors(parser):
        cfg = load_config(SegmenterRunConfig, args.config, args.set)
        path, metrics = train_segmenter(cfg, progress=not args.quiet, overwrite=args.overwrite)
    n_classes = len(metrics["iou"])
    print(f"{metrics['split']} mIoU over {n_classes} in-distribution classes: {100 * metrics['miou']:.1f}%")
    for name, iou in metrics["iou"].items():
        print(f"  {name:12s} {100 * iou:5.1f}")
    print(f"checkpoint: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
