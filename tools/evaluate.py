"""Evaluate per-image scores: AUROC, AP and FPR at 95% TPR for every detector × anomaly set.

    python tools/evaluate.py in_dist.csv svhn.csv --in-set in_dist --out eval/

Reads one or more score CSVs (tools/score_images.py, or an experiment's
scores.csv), prints the tables (paper Table 4 style) and writes metrics.csv,
metrics.md, ROC curves and score histograms to --out. Anomalies are the
positive class; higher score = more anomalous.

The CSVs need a 'set' column and the same columns (in any order); a set must be in one file
only (two files with the same set are refused, not merged). The score columns (--detectors;
by default every column but set, index, name, label, log_prob_* and *_in_dist) must hold a
finite number in every row: a text column such as notes is refused unless --detectors leaves
it out. Anomaly sets default to every set but --in-set and general_test. Nothing is written
unless all of this holds.

--bootstrap N adds a percentile interval to every number (N stratified resamples of each
in-distribution + anomaly set pair, the same resamples for every detector; --confidence,
--seed); --compare DETECTOR adds each detector's difference to that one with a paired interval
(differences.csv and a section of metrics.md), the way to tell whether one detector beats
another on these images:

    python tools/evaluate.py runs/cifar10/scores.csv --in-set in_dist_test --bootstrap 1000 \\
        --compare ratio --out eval/

Pixel mode: the dense maps of one or more road runs (tools/score_images.py --road) against
their datasets' labels, void pixels excluded, streamed through densead.metrics.PixelMetrics:

    python tools/evaluate.py --pixel runs/camvid_scores [more runs ...] --out eval/

prints one AUROC / AP / FPR95 table per road set and writes pixel_metrics.csv and
pixel_metrics.md to --out. --by-class adds, for sets with semantic labels (CamVid, Cityscapes),
which in-distribution classes each detector's false alarms at 95 % TPR come from
(pixel_fp_by_class.csv and .md). --components adds SegmentMeIfYouCan's component-level
metrics (component_metrics.csv and .md): maps thresholded at their best pixel F1, then sIoU per
anomaly instance, PPV per predicted segment and the component F1 averaged over thresholds
0.25-0.75; --min-segment-size / --min-instance-size (pixels of the maps; 500 / 100 as the
benchmark's RoadAnomaly21 track, 50 / 10 as RoadObstacle21). --bootstrap N / --compare DETECTOR
as above, resampling whole frames (pixels of one frame are not independent draws; frames are
drawn within their group: with anomaly and inlier pixels, with only one of the two, or with
neither, each group keeping its size): intervals in pixel_metrics.csv/.md, paired differences in
pixel_differences.csv. With --components, intervals of sIoU, PPV and mean F1 too (frames with
and without anomaly instances drawn apart; each detector kept at its threshold, so they cover
the frames' sampling at that threshold, not its choice), paired differences in
component_differences.csv. Its flags: evaluate.py --pixel --help.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from densead.cli import error_message, quiet_interrupt, tool_errors

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead.dense_scoring import (
        component_metrics_markdown,
        evaluate_dense,
        false_positives_markdown,
        pixel_metrics_markdown,
        run_detectors,
        write_component_metrics,
        write_false_positives,
        write_pixel_metrics,
    )
    from densead.evaluation import (
        MIN_RESAMPLES,
        Bootstrap,
        differences_markdown,
        markdown_tables,
        write_evaluation,
    )
    from densead.experiment import DISPLAY_NAMES
    from densead.scoring import read_scores_csv

# Columns of score CSVs that are not detector scores (an experiment's scores.csv
# also holds each model's log p and the in-distribution model's per-scale terms).
NON_SCORE_COLUMNS = ("set", "index", "name", "label")


# What is_score_column accepts, for messages.
SCORE_COLUMNS = "every column except set, index, name, label, log_prob_* and *_in_dist"


def is_score_column(name: str) -> bool:
    return (
        name not in NON_SCORE_COLUMNS and not name.startswith("log_prob_") and not name.endswith("_in_dist")
    )


def add_bootstrap_flags(p: argparse.ArgumentParser, differences_file: str, extra: str = "") -> None:
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help=f"percentile intervals from N paired, stratified resamples, N >= {MIN_RESAMPLES} (default 0: "
        f"none; 1000 is usual){extra}",
    )
    p.add_argument("--confidence", type=float, help="with --bootstrap: the interval's level (default 0.95)")
    p.add_argument("--seed", type=int, help="with --bootstrap: seed of the resamples (default 0)")
    p.add_argument(
        "--compare",
        metavar="DETECTOR",
        help=f"with --bootstrap: each detector minus this one, with paired intervals ({differences_file})",
    )


def bootstrap_of(p: argparse.ArgumentParser, args: argparse.Namespace) -> Bootstrap | None:
    """The --bootstrap flags, checked (usage errors naming the flag)."""
    if args.bootstrap < 0:
        p.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if 0 < args.bootstrap < MIN_RESAMPLES:
        p.error(
            f"--bootstrap {args.bootstrap}: at least {MIN_RESAMPLES} resamples (fewer leave an interval's "
            "tails to a handful of them; 1000 is usual)"
        )
    if not args.bootstrap:
        given = [f for f in ("confidence", "seed", "compare") if getattr(args, f) is not None]
        if given:
            p.error(f"--{given[0]} needs --bootstrap N (it sets up the bootstrap's intervals)")
        return None
    confidence = 0.95 if args.confidence is None else args.confidence
    seed = 0 if args.seed is None else args.seed
    if not 0.0 < confidence < 1.0:
        p.error(f"--confidence must be in (0, 1), got {confidence}")
    if seed < 0:
        p.error(f"--seed must be >= 0, got {seed}")
    return Bootstrap(args.bootstrap, confidence, seed)


def pixel_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="evaluate.py --pixel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pixel", nargs="+", required=True, metavar="RUN_DIR", help="dense scoring run folder(s)")
    p.add_argument("--detectors", nargs="*", help="detectors (default: every map of each run)")
    p.add_argument("--mode", default="binned", choices=["binned", "exact"], help="PixelMetrics mode")
    p.add_argument("--out", required=True, help="folder for pixel_metrics.csv and pixel_metrics.md")
    p.add_argument(
        "--by-class",
        action="store_true",
        help="also: which in-distribution classes the false alarms at 95%% TPR come from "
        "(sets with semantic labels; pixel_fp_by_class.csv/.md)",
    )
    p.add_argument(
        "--components",
        action="store_true",
        help="also: SegmentMeIfYouCan component metrics (sIoU, PPV, mean F1; component_metrics.csv/.md; with "
        "--bootstrap their intervals over frames, each detector at its threshold)",
    )
    p.add_argument("--min-segment-size", type=int, default=500, help="--components: predicted segments, px")
    p.add_argument("--min-instance-size", type=int, default=100, help="--components: anomaly instances, px")
    add_bootstrap_flags(
        p,
        "pixel_differences.csv; with --components also component_differences.csv",
        "; resamples whole frames, from exact histograms of the float16 maps, which --mode binned "
        "does not bound: memory grows with the frames (6 bytes per distinct value of a frame's map "
        "and class; CamVid's 233 test frames: 14 MB per map)",
    )
    p.add_argument("--no-progress", action="store_true")
    if "-h" in argv or "--help" in argv:  # before --pixel asks for its runs
        p.print_help()
        return 0
    args = p.parse_args(argv)
    with tool_errors(p):  # input errors: one line, exit status 2; SIGTERM runs the cleanups (densead.cli)
        for flag in ("min_segment_size", "min_instance_size"):
            if getattr(args, flag) < 0:
                p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            p.error(f"--out {args.out} exists and is not a folder")
        bootstrap = bootstrap_of(p, args)
        sizes = (args.min_segment_size, args.min_instance_size) if args.components else None
        asked = " ".join(
            f for f, on in (("--by-class", args.by_class), ("--components", args.components)) if on
        )
        if args.compare:  # before any pass over the maps
            for run_dir in args.pixel:
                try:
                    have = args.detectors or run_detectors(run_dir)
                except (ValueError, FileNotFoundError) as err:
                    p.error(f"{run_dir}: {error_message(err)}")
                if args.compare not in have:
                    listed = ", ".join(have)
                    p.error(f"--compare {args.compare!r} is not among the detectors of {run_dir}: {listed}")
        tables = []
        for run_dir in args.pixel:
            try:  # one pass over the maps for every table (and one more for the components)
                tables.append(
                    evaluate_dense(
                        run_dir,
                        args.detectors,
                        args.mode,
                        args.by_class,
                        sizes,
                        progress=not args.no_progress,
                        bootstrap=bootstrap,
                        baseline=args.compare,
                    )
                )
            except (ValueError, FileNotFoundError, KeyError) as err:  # a bad run: usage error, no output
                p.error(f"{asked + ': ' if asked else ''}{run_dir}: {error_message(err)}")
        # Runs of one set (two checkpoints on camvid_test) keep apart: their set is named with the run.
        set_names = [
            next((r.set_name for r in run.pixel + run.by_class + run.components), None) for run in tables
        ]
        repeated = {s for s in set_names if set_names.count(s) > 1}
        rows, by_class, components, differences, component_differences = [], [], [], [], []
        for run_dir, set_name, run in zip(args.pixel, set_names, tables, strict=True):
            if set_name in repeated:
                run = run.renamed(f"{set_name} [{run_dir}]")
            rows += run.pixel
            by_class += run.by_class
            components += run.components
            differences += run.differences
            component_differences += run.component_differences
        write_pixel_metrics(args.out, rows, differences, bootstrap)
        print(pixel_metrics_markdown(rows, bootstrap))
        if differences:
            print(differences_markdown(differences, bootstrap, decimals=2))
        if args.by_class:
            write_false_positives(args.out, by_class)
            print(false_positives_markdown(by_class))
        if args.components:
            write_component_metrics(args.out, components, component_differences, bootstrap)
            print(component_metrics_markdown(components, component_differences, bootstrap))
        written = "pixel_metrics.csv, pixel_metrics.md" + (", pixel_differences.csv" if differences else "")
        written += ", pixel_fp_by_class.csv/.md" if args.by_class else ""
        written += ", component_metrics.csv/.md" if args.components else ""
        written += ", component_differences.csv" if component_differences else ""
        print(f"{written} -> {Path(args.out).resolve()}")
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--pixel" or a.startswith("--pixel=") for a in argv):
        return pixel_main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", nargs="+", help="score CSV file(s) with a 'set' column, each set in one file")
    p.add_argument("--in-set", required=True, help="the in-distribution set (negatives)")
    p.add_argument(
        "--anomaly-sets",
        nargs="*",
        help="anomaly sets (default: every set except --in-set and general_test, the general model's "
        "test set of run_experiment.py)",
    )
    p.add_argument(
        "--detectors",
        nargs="*",
        help=f"score columns (default: {SCORE_COLUMNS}); each must hold a finite number in every row",
    )
    p.add_argument("--out", required=True, help="folder for metrics.csv, metrics.md and plots")
    add_bootstrap_flags(p, "differences.csv")
    args = p.parse_args(argv)
    for key in ("detectors", "anomaly_sets"):  # each once: a repeat would repeat rows and plots
        if getattr(args, key):
            setattr(args, key, list(dict.fromkeys(getattr(args, key))))
    with tool_errors(p):  # input errors: one line, exit status 2; SIGTERM runs the cleanups (densead.cli)
        # Everything is checked before anything is written.
        bootstrap = bootstrap_of(p, args)
        try:
            cols = read_scores_csv(args.scores, score_columns=args.detectors or is_score_column)
        except (FileNotFoundError, ValueError) as err:
            hint = ""
            if not args.detectors and "score column" in str(err):
                hint = f" (without --detectors, {SCORE_COLUMNS} is a score column)"
            p.error(f"{err}{hint}")
        files = ", ".join(args.scores)
        if "set" not in cols:
            p.error(f"{files}: no 'set' column (columns: {', '.join(cols)})")
        sets = list(dict.fromkeys(cols["set"].tolist()))
        if args.in_set not in sets:
            p.error(f"--in-set {args.in_set!r} not among the sets in the scores: {sets}")
        if args.anomaly_sets:
            unknown = [s for s in args.anomaly_sets if s not in sets]
            if unknown:
                p.error(f"--anomaly-sets {unknown} not among the sets in the scores: {sets}")
            if args.in_set in args.anomaly_sets:
                p.error(
                    f"--anomaly-sets lists the --in-set {args.in_set!r}: its images cannot be both classes"
                )
            anomaly_sets = args.anomaly_sets
        else:
            anomaly_sets = [s for s in sets if s != args.in_set and s != "general_test"]
            if not anomaly_sets:
                p.error(
                    f"no anomaly sets in {files}: its sets are {sets}, with --in-set {args.in_set!r} "
                    "(general_test is used only if named in --anomaly-sets)"
                )
        detectors = args.detectors or [c for c in cols if is_score_column(c)]
        if not detectors:
            p.error(f"{files}: no score columns (columns: {', '.join(cols)})")
        if args.compare and args.compare not in detectors:
            p.error(f"--compare {args.compare!r} is not among the detectors: {', '.join(detectors)}")
        rows, diffs = write_evaluation(
            args.out, cols, args.in_set, anomaly_sets, detectors, DISPLAY_NAMES, bootstrap, args.compare
        )
        print(markdown_tables(rows, DISPLAY_NAMES, bootstrap))
        if diffs:
            print(differences_markdown(diffs, bootstrap, DISPLAY_NAMES))
        written = "metrics.csv, metrics.md" + (", differences.csv" if diffs else "")
        print(f"{written}, ROC curves and histograms -> {Path(args.out).resolve()}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
