"""Run an image-level experiment end to end: train every model, score, evaluate, report.

    python tools/run_experiment.py configs/experiments/digits_demo.yaml [--set key=value ...]

Killed at any point, the same command resumes where it stopped. The config and the test
sets are checked before anything is trained or written; a stage is reused only while the
stages it was trained from are unchanged (otherwise the error lists the folders to delete).
"""

from __future__ import annotations

import argparse
import sys

from densead.cli import quiet_interrupt, tool_errors

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead.config import ConfigError, ExperimentConfig, load_config
    from densead.experiment import run_experiment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="experiment YAML file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    with tool_errors(parser):  # config errors, stale stages, data files: they name themselves
        cfg = load_config(ExperimentConfig, args.config, args.set)
        try:
            report = run_experiment(cfg, progress=not args.no_progress)
        except ConfigError as err:  # a key of the experiment's config (check_experiment): name the file
            raise ConfigError(f"{args.config}: {err}") from None
    print(report.read_text())
    print(f"Report, scores, plots and heatmaps in {report.parent.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
