"""Train one Glow from a YAML config.

    python tools/train_flow.py configs/cifar10_glow.yaml [--set train.steps=1000 ...] [--resume]

Writes <output_dir>/checkpoint.pt (state_dicts + resolved config, atomically,
every train.checkpoint_every steps) and <output_dir>/config.yaml. An existing
checkpoint is continued with --resume (only under the settings it was trained
with; train.steps may grow, and where it runs, logs and saves may change),
replaced with --overwrite, and otherwise refused. Errors of the config or the
data end the tool with one line naming the key or file (exit status 2).
"""

from __future__ import annotations

import sys

from densead.cli import quiet_interrupt, tool_errors, training_args

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead.config import TrainRunConfig, load_config
    from densead.distributed import finish, is_main
    from densead.train import load_checkpoint, train_glow


def main(argv: list[str] | None = None) -> int:
    parser, args = training_args(__doc__, "training YAML file (see configs/)", argv, resume=True)
    with tool_errors(parser):
        cfg = load_config(TrainRunConfig, args.config, args.set)
        path = train_glow(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if is_main():
        history = load_checkpoint(path, mmap=True)["history"]
        if history:  # [step, bits/dim, outlier loss] of the last logged training batch
            step, bpd, outlier = history[-1]
            extra = f", outlier loss {outlier:.1f}" if cfg.outlier is not None else ""
            print(f"step {step}: {bpd:.3f} bits/dim on its training batch{extra}")
        print(f"checkpoint: {path.resolve()}")
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
