"""Evaluate per-image scores: AUROC, AP and FPR at 95% TPR for every detector × anomaly set.

    python tools/evaluate.py in_dist.csv svhn.csv --in-set in_dist --out eval/

Reads one or more score CSVs (tools/score_images.py, or an experiment's
scores.csv), prints the tables (paper Table 4 style) and writes metrics.csv,
metrics.md, ROC curves and score histograms to --out. Anomalies are the
positive class; higher score = more anomalous.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from densead.evaluation import markdown_tables, write_evaluation
from densead.experiment import DISPLAY_NAMES
from densead.scoring import read_scores_csv

# Columns of score CSVs that are not detector scores (an experiment's scores.csv
# also holds each model's log p and the in-distribution model's per-scale terms).
NON_SCORE_COLUMNS = ("set", "index", "name", "label")


def is_score_column(name: str) -> bool:
    return (
        name not in NON_SCORE_COLUMNS and not name.startswith("log_prob_") and not name.endswith("_in_dist")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", nargs="+", help="score CSV file(s) with a 'set' column")
    p.add_argument("--in-set", required=True, help="the in-distribution set (negatives)")
    p.add_argument("--anomaly-sets", nargs="*", help="anomaly sets (default: every other set)")
    p.add_argument("--detectors", nargs="*", help="score columns (default: every detector column)")
    p.add_argument("--out", required=True, help="folder for metrics.csv, metrics.md and plots")
    args = p.parse_args(argv)
    cols = read_scores_csv(args.scores)
    sets = list(dict.fromkeys(cols["set"])) if "set" in cols else []
    if args.in_set not in sets:
        p.error(f"--in-set {args.in_set!r} not among the sets in the scores: {sets}")
    anomaly_sets = args.anomaly_sets or [s for s in sets if s != args.in_set and s != "general_test"]
    detectors = args.detectors or [c for c in cols if is_score_column(c)]
    rows = write_evaluation(args.out, cols, args.in_set, anomaly_sets, detectors, DISPLAY_NAMES)
    print(markdown_tables(rows, DISPLAY_NAMES))
    print(f"metrics.csv, metrics.md, ROC curves and histograms -> {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
