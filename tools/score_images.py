"""Score images with Glow detectors: a CSV of per-image scores, optional heatmap PNGs.

    python tools/score_images.py --checkpoint runs/cifar10/checkpoint.pt \\
        --general runs/tinyimagenet/checkpoint.pt --detector raw,ratio,last_scale \\
        --input ../shared/data/cifar10_test.npz --out scores.csv --heatmaps heatmaps/

Input: an .npz file (``images`` uint8 N×H×W[×C]), an image folder, or a
torchvision set (``--dataset svhn --root data/ --split test [--download]``).
Scores: higher = more anomalous. Detectors: raw, ratio (Diff), last_scale (4x4),
scale<i>, ratio_scale<i>, ratio_last_scale, complexity and complexity_webp (a PNG or lossless
WebP coder as the general distribution, Serrà et al. 2020: no --general, image scores only, no
heatmap), complexity_loco (the same with a per-pixel coder, LOCO-I's predictor: heatmaps and road
maps too), typicality (|bits/dim − their mean on the model's training images|, Nalisnick et al.
2019: --typical-set or --typical-bpd; image scores only). --heatmaps DIR: <image
name>_<detector>.png per image (the first --n-heatmaps) and heatmaps.json saying how they were
made; DIR is new, empty, or one an earlier --heatmaps run wrote, replaced whole once the scores
are written (under torchrun too).

Road mode: dense maps of road frames instead of image scores; --out is a folder.

    python tools/score_images.py --road camvid --root ../shared/data/camvid --split test \\
        --checkpoint runs/camvid_glow/checkpoint.pt --general runs/camvid_glow_general/checkpoint.pt \\
        --detector raw,ratio,scale1,scale2,last_scale --out runs/camvid_scores

writes maps/<detector>/<frame>.npy (float16 in [0, 1], dataset-level min-max), overlays/<detector>/
<frame>.png, summary.csv, rescale.json and run.json (see densead/dense_scoring.py). --road takes
camvid, cityscapes, fishyscapes_laf, smiyc, lostandfound, road_anomaly or folder (any image folder).

Feature-density detectors (density_<tap>, density_mean, density_min, msp, max_logit, entropy,
energy, sml) come from --feature-flows (a checkpoint of tools/train_feature_flows.py; frames are
resized and padded as that run saw them). --detector may mix them with Glow detectors; --checkpoint
is needed only for Glow detectors. --combine adds combo:<a>+<b> maps (folders maps/combo-<a>+<b>):
the mean of the components after standardizing each on the inlier pixels of --calibration-frames
frames of --calibration-split (never the split under test; see densead/combined_maps.py):

    python tools/score_images.py --road camvid --root ../shared/data/camvid --split test \\
        --feature-flows runs/camvid_feature_flows/feature_flows.pt \\
        --checkpoint runs/camvid_glow/checkpoint.pt --general runs/camvid_glow_general/checkpoint.pt \\
        --detector density_cls,msp,ratio,last_scale \\
        --combine density_cls+ratio,density_cls+last_scale --out runs/camvid_combined_scores

Then: python tools/evaluate.py --pixel runs/camvid_combined_scores --out runs/camvid_combined_eval

--protocol sequences (CamVid) makes --split and --calibration-split roles of whole held-out drives
(train 0006R0 + 0016E5, val 0001TP, test Seq05VD), as data.protocol in the segmenter and flow
configs; calibration frames that are also frames under test are refused under any protocol, and
scoring frames the feature flows were trained on warns (run.json: training_frames_scored).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from densead.cli import quiet_interrupt, tool_errors

with quiet_interrupt():  # Ctrl-C while torch loads: one line, no traceback
    from densead import distributed as dist
    from densead.config import DataConfig
    from densead.data.images import load_image_set
    from densead.data.road import ROAD_DATASETS
    from densead.dense import RoadSource
    from densead.dense_scoring import MapRescale, score_road_dataset
    from densead.detectors import GlowScorer, get_detector
    from densead.io import check_heatmap_folder, check_output_dir, staged_heatmaps
    from densead.scoring import image_names, score_image_set, typical_bits_per_dim, write_scores_csv
    from densead.train import load_glow, resolve_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="in-distribution Glow checkpoint (road mode: for Glow detectors)")
    p.add_argument("--general", help="general-distribution Glow checkpoint (ratio detectors)")
    p.add_argument("--detector", default="raw", help="comma-separated detector names")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="an .npz file or an image folder")
    src.add_argument("--dataset", choices=["cifar10", "cifar100", "svhn", "mnist", "fashion_mnist"])
    src.add_argument("--road", choices=sorted(ROAD_DATASETS), help="road mode: dense maps of this dataset")
    p.add_argument("--root", default="data", help="torchvision root for --dataset; dataset folder for --road")
    p.add_argument("--split", default="test")
    p.add_argument("--download", action="store_true", help="let torchvision download --dataset")
    p.add_argument("--classes", default="", help="keep only these labels, e.g. 0,1")
    p.add_argument("--size", type=int, default=0, help="pad/resize images to size×size (0: keep)")
    p.add_argument("--resize", default="pad", choices=["pad", "resize", "none"])
    p.add_argument("--set-name", default="", help="value of the CSV's 'set' column")
    p.add_argument("--out", required=True, help="CSV file to write (road mode: output folder)")
    p.add_argument(
        "--heatmaps",
        help="folder for one overlay PNG per image and detector and heatmaps.json: new, empty, or one an "
        "earlier --heatmaps run wrote (replaced whole once the scores are written)",
    )
    p.add_argument(
        "--n-heatmaps", type=int, default=0, help="heat maps of the first N images only (0: every image)"
    )
    p.add_argument("--batch-size", type=int, help="images per batch (default 256; road mode: frames, 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    typ = p.add_argument_group("typicality (images only)").add_mutually_exclusive_group()
    typ.add_argument(
        "--typical-set",
        help="an .npz file or image folder of the --checkpoint model's training images (shaped by --size and "
        "--resize): their mean bits/dim is typicality's reference",
    )
    typ.add_argument("--typical-bpd", type=float, help="that mean bits/dim, known (e.g. from an experiment)")
    road = p.add_argument_group("road mode (--road)")
    road.add_argument("--held-out", help="CamVid classes labelled anomaly (default: Pedestrian,Bicyclist)")
    road.add_argument("--void", help="CamVid classes labelled void (default: Unlabelled)")
    road.add_argument(
        "--protocol",
        help="what --split names (CamVid: splits, the default, or sequences: train 0006R0+0016E5, "
        "val 0001TP, test Seq05VD)",
    )
    road.add_argument("--downscale", type=int, help="shrink frames by this factor (default: as trained)")
    road.add_argument("--max-frames", type=int, default=0, help="only the first N frames (0: all)")
    road.add_argument("--rescale-from", help="rescale.json of another run (default: calibrate on this set)")
    road.add_argument("--no-overlays", action="store_true", help="write maps and summary only")
    road.add_argument(
        "--feature-flows", help="feature-density checkpoint (density_*, msp, max_logit, entropy, energy, sml)"
    )
    road.add_argument(
        "--segmenter",
        help="the segmenter of --feature-flows, where it is not at the path stored with them "
        "(a moved run; its weights are checked against the flows')",
    )
    road.add_argument(
        "--combine", default="", help="combinations, e.g. density_cls+ratio,density_mean+last_scale"
    )
    road.add_argument(
        "--calibration-split", default="train", help="split whose inlier pixels standardize --combine"
    )
    road.add_argument("--calibration-frames", type=int, default=64, help="frames spread over it (0: all)")
    args = p.parse_args(argv)
    with tool_errors(p):  # input errors: one line, exit status 2; SIGTERM runs the cleanups (densead.cli)
        for flag, least in (
            ("batch_size", 1),
            ("size", 0),
            ("max_frames", 0),
            ("calibration_frames", 0),
            ("n_heatmaps", 0),
        ):
            value = getattr(args, flag)
            if value is not None and value < least:
                p.error(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
        if not [name for name in args.detector.split(",") if name.strip()]:
            p.error(f"--detector names no detector: {args.detector!r}")
        if args.road:
            for flag in ("typical_set", "typical_bpd"):
                if getattr(args, flag) is not None:
                    flag = flag.replace("_", "-")
                    p.error(f"--{flag} is for image scoring (typicality scores whole images)")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                p.error("road mode runs in one process; torchrun is supported for image scoring")
            return _road_main(p, args)
        if not args.checkpoint:
            p.error("--checkpoint is required (except in road mode with feature detectors only)")
        for flag in ("feature_flows", "combine", "segmenter"):
            if getattr(args, flag):
                p.error(f"--{flag.replace('_', '-')} is for road mode (--road)")
        if args.batch_size is None:
            args.batch_size = 256

        try:
            detectors = [get_detector(name.strip()) for name in args.detector.split(",") if name.strip()]
        except ValueError as err:
            p.error(f"--detector: {err}")
        try:
            classes = tuple(int(c) for c in args.classes.split(",") if c.strip())
        except ValueError:
            p.error(f"--classes must be comma-separated integer labels, got {args.classes!r}")
        if any(d.needs_general for d in detectors) and not args.general:
            p.error(f"detector(s) {[d.name for d in detectors if d.needs_general]} need --general")
        typical_wanted = any(d.typical for d in detectors)
        if typical_wanted and args.typical_set is None and args.typical_bpd is None:
            p.error(
                "detector 'typicality' needs --typical-set (the model's training images) or --typical-bpd"
            )
        if not typical_wanted and (args.typical_set is not None or args.typical_bpd is not None):
            p.error("--typical-set / --typical-bpd are for --detector typicality")
        if args.typical_bpd is not None and not math.isfinite(args.typical_bpd):
            p.error(f"--typical-bpd must be a finite number, got {args.typical_bpd}")

        device = dist.init_from_env(resolve_device(args.device, "--device"))
        model, mcfg = load_glow(args.checkpoint, device)
        general = load_glow(args.general, device)[0] if args.general else None
        try:  # the general model must see the data as the in-distribution one does
            scorer = GlowScorer(model, general)
        except ValueError as err:
            p.error(f"--general {args.general} does not fit --checkpoint {args.checkpoint}: {err}")
        try:  # scales that exist (in both models, for scale-wise ratios); typicality's flags: above
            scorer.check_detectors([d for d in detectors if not d.typical])
        except ValueError as err:
            with_general = f" with --general {args.general}" if args.general else ""
            p.error(f"--checkpoint {args.checkpoint}{with_general}: {err}")
        if Path(args.out).is_dir():  # outputs checked before the scoring, not after it
            raise ValueError(f"--out: {args.out} is a folder; image scores go into a CSV file")
        check_output_dir(Path(args.out).parent, "--out")
        if args.heatmaps:
            ours = [args.out, args.checkpoint, args.general, args.input, args.typical_set]
            ours += [args.root] if args.dataset else []
            check_heatmap_folder(args.heatmaps, outputs=[p for p in ours if p])  # never replaced by maps
        typical = _image_source(p, "--typical-set", args.typical_set) if args.typical_set else None
        if args.input:
            source, path = _image_source(p, "input", args.input)
            set_name = args.set_name or path.stem
        else:
            source, path, set_name = args.dataset, Path(args.root), args.set_name or args.dataset
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
        if typical is not None:
            kind, typical_path = typical
            tcfg = replace(dcfg, source=kind, path=str(typical_path), classes=())
            train_images = load_image_set(tcfg, mcfg.n_bins, "--typical-set")
            progress = not args.no_progress and dist.is_main()
            scorer.typical_bpd = typical_bits_per_dim(model, train_images, args.batch_size, device, progress)
            if dist.is_main():
                n = len(train_images)
                print(f"typicality: mean bits/dim {scorer.typical_bpd:.4f} on {n} images of {typical_path}")
        elif args.typical_bpd is not None:
            scorer.typical_bpd = args.typical_bpd
        record = {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "general": str(Path(args.general).resolve()) if args.general else None,
            "input": str(path.resolve()),
            "set": set_name,
            "detectors": [d.name for d in detectors if d.per_pixel],  # a file coder's: no heat map
            "images": len(images),
            "images_shown": min(len(images), args.n_heatmaps or len(images)),
            "typical_bpd": scorer.typical_bpd,
            "files": "<image name>_<detector>.png",
        }
        # Heat maps go to a hidden folder that replaces --heatmaps only once the scores are written.
        staged = staged_heatmaps(args.heatmaps, record) if args.heatmaps else contextlib.nullcontext()
        with staged as heatmap_dir:
            scores = score_image_set(
                scorer,
                images,
                detectors,
                args.batch_size,
                device,
                progress=not args.no_progress,
                heatmap_dir=heatmap_dir,
                n_heatmaps=args.n_heatmaps,
            )
            columns = {
                "set": [set_name] * len(images),
                "index": list(range(len(images))),
                "name": image_names(images),
                "label": images.labels.tolist(),
            }
            if dist.is_main():  # under torchrun every rank holds all scores; one writes them
                write_scores_csv(args.out, columns | scores)
        if dist.is_main():
            print(f"{len(images)} images scored with {', '.join(scores)} -> {Path(args.out).resolve()}")
            if args.heatmaps:
                print(f"heatmaps -> {Path(args.heatmaps).resolve()}")
        dist.finish()
        return 0


def _image_source(p: argparse.ArgumentParser, what: str, value: str) -> tuple[str, Path]:
    """``(source, path)`` of an .npz file or image folder given as ``what``; a usage error if it
    is not there."""
    path = Path(value)
    if not path.exists():
        p.error(f"{what} not found: {path}")
    return ("npz" if path.is_file() else "folder"), path


def _names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(n.strip() for n in value.split(",") if n.strip())


def _road_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.heatmaps:
        p.error("--heatmaps is for images; road mode writes overlays into <--out>/overlays")
    if args.n_heatmaps:
        p.error("--n-heatmaps is for images (with --heatmaps); road mode writes an overlay per frame")
    if args.segmenter and not args.feature_flows:
        p.error("--segmenter is the segmenter of --feature-flows; give both")
    detectors = [name.strip() for name in args.detector.split(",") if name.strip()]
    held_out, void = _names(args.held_out), _names(args.void)
    source = RoadSource(args.road, args.root, args.split, held_out, void, args.max_frames, args.protocol)
    calibration = RoadSource(args.road, args.root, args.calibration_split, held_out, void, 0, args.protocol)
    # Bad names and missing or unreadable files end the tool as one line (tool_errors).
    run = score_road_dataset(
        source,
        args.checkpoint,
        args.out,
        detectors,
        general=args.general,
        downscale=args.downscale,
        rescale=MapRescale.load(args.rescale_from) if args.rescale_from else None,
        overlays=not args.no_overlays,
        batch_size=args.batch_size or 1,
        device=args.device,
        progress=not args.no_progress,
        feature_flows=args.feature_flows,
        segmenter=args.segmenter,
        combine=[c for c in args.combine.split(",") if c.strip()],
        calibration=calibration,
        calibration_frames=args.calibration_frames,
    )
    dets = ", ".join(run.detectors)
    print(f"{len(run.names)} frames of {source.name} scored with {dets} -> {run.out_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
