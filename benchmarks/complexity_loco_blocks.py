"""Why ``complexity_loco`` compares the coder and the Glow per block of the Glow's coarsest grid.

    python benchmarks/complexity_loco_blocks.py runs/camvid_glow/checkpoint.pt \\
        --root ../shared/data/camvid --split val

For every frame of a CamVid split, the ratio ``log p_loco − log p_in`` per model pixel (the
coder's per-pixel lengths against the Glow's pixel map, :mod:`densead.detectors.complexity`) is
averaged over blocks of 1, 2, 4, … up to ``2^L`` model pixels (block sums kept), beside raw
likelihood and the coder's length alone, and scored with the binned pixel metrics of
``tools/evaluate.py --pixel`` (void excluded). Frames are padded and shrunk as dense scoring does
(the checkpoint's downscale). Prints one table; ``complexity_loco``'s own map is the ``2^L`` row.
Choose with a validation split, report on the test split.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from densead.data.road import CamVid
from densead.data.transforms import to_model_input
from densead.dense import pad_to_multiple, shrink, trained_downscale
from densead.detectors.complexity import pixel_code_lengths
from densead.detectors.glow import block_mean
from densead.metrics import PixelMetrics
from densead.train import load_glow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an in-distribution road Glow (tools/train_road_glow.py)")
    p.add_argument("--root", required=True, help="the CamVid folder")
    p.add_argument("--split", default="val")
    p.add_argument("--held-out", nargs="+", default=["Pedestrian", "Bicyclist"])
    args = p.parse_args()
    model, _ = load_glow(args.checkpoint)
    model.eval()
    downscale = trained_downscale(args.checkpoint) or 1
    dataset = CamVid(args.root, args.split, held_out=args.held_out)
    unit = downscale * 2**model.n_scales
    blocks = [2**i for i in range(model.n_scales + 1)]
    rows = ["raw", "loco length", *(f"complexity per {b}×{b} block" for b in blocks)]
    metrics = {r: PixelMetrics() for r in rows}
    start = time.time()
    for i in range(len(dataset)):
        item = dataset[i]
        label = item["label"]
        h, w = label.shape
        levels = torch.from_numpy(shrink(pad_to_multiple(item["image"], unit), downscale))
        levels = levels.permute(2, 0, 1)[None].contiguous()
        with torch.no_grad():
            raw = -model(to_model_input(levels, model.n_bins, dequantize=False)).pixel_map()[0].double()
        length = pixel_code_lengths(levels)[0] * math.log(2)  # the coder's nats per model pixel
        maps = {"raw": raw, "loco length": length}
        for b in blocks:
            maps[f"complexity per {b}×{b} block"] = block_mean((raw - length)[None], b)[0]  # the detector's
        for name, m in maps.items():
            native = m.repeat_interleave(downscale, 0).repeat_interleave(downscale, 1)[:h, :w]
            metrics[name].update(native.float().numpy(), label)
    took = time.time() - start
    print(f"{len(dataset)} frames of CamVid {args.split}, downscale {downscale}, {took:.0f} s\n")
    print("| map | AUROC % | AP % | FPR95 % | AUROC − raw |")
    print("|---|---:|---:|---:|---:|")
    base = metrics["raw"].compute()["auroc"]
    for name, pm in metrics.items():
        r = pm.compute()
        print(
            f"| {name} | {100 * r['auroc']:.2f} | {100 * r['ap']:.2f} | {100 * r['fpr95']:.2f} "
            f"| {100 * (r['auroc'] - base):+.2f} |"
        )


if __name__ == "__main__":
    main()
