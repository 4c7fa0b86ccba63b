"""How much the float16 map files cost: pixel metrics of float32 maps vs the written float16 ones.

    python benchmarks/dense_float16_effect.py runs/camvid_glow_scores --detectors raw ratio last_scale

Recomputes each frame's maps in float32 with densead.dense_scoring.frame_maps (same checkpoints,
downscale and dataset as the run, from its run.json), streams them through the same binned
PixelMetrics as tools/evaluate.py --pixel, and prints both tables side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from densead.dense import RoadSource
from densead.dense_scoring import evaluate_dense_run, frame_maps
from densead.detectors import GlowScorer, get_detector
from densead.metrics import PixelMetrics
from densead.train import load_glow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a dense scoring run (tools/score_images.py --road)")
    p.add_argument("--detectors", nargs="+", default=["raw", "ratio", "last_scale"])
    args = p.parse_args()
    run = json.loads((Path(args.run_dir) / "run.json").read_text())
    src = {k: tuple(v) if isinstance(v, list) else v for k, v in run["source"].items()}
    dataset = RoadSource(**src).open()
    model, _ = load_glow(run["checkpoint"])
    general = load_glow(run["general"])[0] if run.get("general") else None
    scorer, dets = GlowScorer(model, general), [get_detector(n) for n in args.detectors]
    metrics = {n: PixelMetrics() for n in args.detectors}
    start = time.time()
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            maps = frame_maps(scorer, [item["image"]], dets, downscale=run["downscale"])
            for n in args.detectors:
                metrics[n].update(maps[n][0], item["label"])
    files = {r.detector: r for r in evaluate_dense_run(args.run_dir, args.detectors)}
    print(f"{len(dataset)} frames, {time.time() - start:.0f} s\n")
    print("| detector | float16 files AUROC / AP / FPR95 | float32 maps AUROC / AP / FPR95 |")
    print("|---|---|---|")
    for n, pm in metrics.items():
        r, f = pm.compute(), files[n]
        print(
            f"| {n} | {f.auroc:.4f} / {f.ap:.4f} / {f.fpr95:.4f} "
            f"| {r['auroc']:.4f} / {r['ap']:.4f} / {r['fpr95']:.4f} |"
        )


if __name__ == "__main__":
    main()
