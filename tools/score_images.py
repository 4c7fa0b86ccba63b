"""Score images with Glow detectors: a CSV of per-image scores, optional heatmap PNGs.

    python tools/score_images.py --checkpoint runs/cifar10/checkpoint.pt \\
        --general runs/tinyimagenet/checkpoint.pt --detector raw,ratio,last_scale \\
        --input ../shared/data/cifar10_test.npz --out scores.csv --heatmaps heatmaps/

Input: an .npz file (``images`` uint8 N×H×W[×C]), an image folder, or a
torchvision set (``--dataset svhn --root data/ --split test [--download]``).
Scores: higher = more anomalous. Detectors: raw, ratio (Diff), last_scale (4x4),
scale<i>, ratio_scale<i>, ratio_last_scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from densead.config import DataConfig
from densead.data.images import load_image_set
from densead.detectors import GlowScorer, get_detector
from densead.scoring import image_names, score_image_set, write_scores_csv
from densead.train import load_glow, resolve_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="in-distribution Glow checkpoint")
    p.add_argument("--general", help="general-distribution Glow checkpoint (ratio detectors)")
    p.add_argument("--detector", default="raw", help="comma-separated detector names")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="an .npz file or an image folder")
    src.add_argument("--dataset", choices=["cifar10", "cifar100", "svhn", "mnist", "fashion_mnist"])
    p.add_argument("--root", default="data", help="torchvision root for --dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--download", action="store_true", help="let torchvision download --dataset")
    p.add_argument("--classes", default="", help="keep only these labels, e.g. 0,1")
    p.add_argument("--size", type=int, default=0, help="pad/resize images to size×size (0: keep)")
    p.add_argument("--resize", default="pad", choices=["pad", "resize", "none"])
    p.add_argument("--set-name", default="", help="value of the CSV's 'set' column")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--heatmaps", help="folder for one overlay PNG per image and detector")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    model, mcfg = load_glow(args.checkpoint, device)
    general = load_glow(args.general, device)[0] if args.general else None
    detectors = [get_detector(name.strip()) for name in args.detector.split(",") if name.strip()]
    if any(d.needs_general for d in detectors) and general is None:
        p.error(f"detector(s) {[d.name for d in detectors if d.needs_general]} need --general")
    if args.input:
        path = Path(args.input)
        if not path.exists():
            p.error(f"input not found: {path}")
        source = "npz" if path.is_file() else "folder"
        set_name = args.set_name or path.stem
    else:
        source, path, set_name = args.dataset, Path(args.root), args.set_name or args.dataset
    classes = tuple(int(c) for c in args.classes.split(",") if c.strip())
    dcfg = DataConfig(
        source=source,
        path=str(path),
        split=args.split,
        download=args.download,
        classes=classes,
        channels=mcfg.in_channels,
        size=args.size,
        resize=args.resize,
    )
    images = load_image_set(dcfg, mcfg.n_bins, set_name)
    scores = score_image_set(
        GlowScorer(model, general),
        images,
        detectors,
        args.batch_size,
        device,
        progress=not args.no_progress,
        heatmap_dir=args.heatmaps,
    )
    columns = {
        "set": [set_name] * len(images),
        "index": list(range(len(images))),
        "name": image_names(images),
        "label": images.labels.tolist(),
    }
    write_scores_csv(args.out, columns | scores)
    print(f"{len(images)} images scored with {', '.join(scores)} -> {Path(args.out).resolve()}")
    if args.heatmaps:
        print(f"heatmaps -> {Path(args.heatmaps).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
