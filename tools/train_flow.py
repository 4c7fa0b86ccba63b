"""Train one Glow from a YAML config.

    python tools/train_flow.py configs/cifar10_glow.yaml [--set train.steps=1000 ...] [--resume]

Writes <output_dir>/checkpoint.pt (state_dicts + resolved config, atomically,
every train.checkpoint_every steps) and <output_dir>/config.yaml.
"""

from __future__ import annotations

import argparse
import sys

from densead.config import TrainRunConfig, load_config
from densead.distributed import finish, is_main
from densead.train import train_glow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="training YAML file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--resume", action="store_true", help="continue <output_dir>/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cfg = load_config(TrainRunConfig, args.config, args.set)
    path = train_glow(cfg, resume=args.resume, progress=not args.no_progress)
    if is_main():
        print(f"checkpoint: {path.resolve()}")
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
