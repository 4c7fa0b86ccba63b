"""Why the feature density does not beat max-softmax on CamVid: density-model variants on cached features.

    OMP_NUM_THREADS=1 python experiments/camvid_feature_variants.py \\
        --segmenter runs/camvid_segmenter_long/checkpoint.pt --out runs/feature_variants

A research script for issue 6 (results: docs/results_camvid_features.md), not part of the
library. It taps the frozen segmenter once (train and test frames of the CamVid leave-classes-out
protocol at the segmenter's working scale, plus "general" frames: mosaics of 3×4 Tiny ImageNet
photos upsampled ×2), caches the features, and scores the test pixels with density models of
increasing strength, all through the library's pieces (extractor, mask rule, FeatureDensity,
PixelMetrics in exact mode):

* ``gauss``: one full-covariance Gaussian on the in-distribution positions (``−log p``);
* ``gauss_class_tied`` / ``gauss_class_full``: class-conditional Gaussians fitted with the
  ground-truth class of each training position (Mahalanobis to the nearest class mean with a
  tied covariance; ``−max_c log N(f; μ_c, Σ_c)``);
* ``gauss_ratio``: ``log p_general − log p_in`` with a Gaussian on each side — the feature-level
  analogue of the likelihood ratio that rescues Glow's image likelihoods;
* ``flow``: a :class:`~densead.detectors.feature_density.FeatureDensity` flow (``−log p``),
  ``flow_ratio`` the same ratio with a second flow on the general frames, and
  ``flow_classnorm``: ``μ_ĉ − log p`` with ``μ_ĉ`` the mean training log-likelihood of the
  positions the segmenter assigns to class ĉ (a per-class version of Blum et al.'s normalization);
* the segmenter's ``msp``, ``max_logit`` and ``entropy`` on the same grid;
* with ``--logit-floors``: ``flow_floor<c>`` on the logits, a flow over the floored
  log-posteriors ``max(log softmax(z), c)`` (the library's ``log_softmax_floor``), one per ``c``.

Every map lives on the tap's grid and is upsampled bilinearly to the frame, as in the detector.
``--fit-split val`` fits the densities on the val frames instead of the training frames (whose
features the segmenter has fitted, and which may therefore be more typical than any test frame's).
``--eval-split val`` scores the val frames instead of the test frames (for selecting a setting
without looking at the test split). The rows of the table in the docs were selected on the test
split (no separate validation then), so its best rows are optimistic.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from densead.data.road import INLIER
from densead.detectors.feature_density import (
    FeatureDensity,
    entropy_score,
    max_logit_score,
    msp_score,
    valid_feature_mask,
)
from densead.features import FrozenFeatureExtractor
from densead.metrics import PixelMetrics
from densead.segmenter import iter_eval_batches, load_scene_arrays, load_segmenter

TAPS = {"fuse": "fuse.1", "cls": "classifier", "layer3": "backbone.layer3.1.add"}


def extract(extractor: FrozenFeatureExtractor, batches) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for x in batches:
            for name, f in extractor(x).items():
                out.setdefault(name, []).append(f.half())
    return {name: torch.cat(v) for name, v in out.items()}


def general_frames(path: Path, n_frames: int, seed: int) -> np.ndarray:
    """``n_frames`` mosaics of 3×4 Tiny ImageNet photos upsampled ×2 (192×256), uint8."""
    images = np.load(path)["images"]
    pick = np.random.default_rng(seed).permutation(len(images))[: n_frames * 12]
    tiles = np.stack([cv2.resize(im, (64, 64), interpolation=cv2.INTER_CUBIC) for im in images[pick]])
    return tiles.reshape(n_frames, 3, 4, 64, 64, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n_frames, 192, 256, 3)


def vectors(f: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    v = f.permute(0, 2, 3, 1)
    return (v[mask] if mask is not None else v.reshape(-1, f.shape[1])).double()


def gaussian(x: torch.Tensor):
    mean = x.mean(0)
    cov = torch.cov(x.T) + 1e-6 * torch.eye(x.shape[1], dtype=x.dtype) * torch.cov(x.T).trace() / x.shape[1]
    prec, logdet = torch.linalg.inv(cov), torch.linalg.slogdet(cov)[1]
    return lambda z: -0.5 * (((z - mean) @ prec) * (z - mean)).sum(1) - 0.5 * logdet


def fit_flow(
    x: torch.Tensor,
    steps: int,
    hidden: int,
    pixels: int,
    lr: float,
    noise: float,
    seed: int,
    floor: float | None = None,
):
    torch.manual_seed(seed)
    density = FeatureDensity({"t": x.shape[1]}, 8, hidden, None if floor is None else {"t": floor})
    x = x.float()
    # Standardization statistics of what the flow models; the flow itself transforms raw vectors.
    u = density.inputs("t", x)  # (N, C): the softmax runs over dim 1 as for maps
    density.set_standardization("t", u.mean(0), u.std(0).clamp_min(1e-3 * float(u.std(0).mean())))
    opt = torch.optim.Adam(density.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        batch = x[torch.randint(len(x), (pixels,), generator=g)]
        loss = -density.vector_log_prob("t", batch, noise).mean() / x.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(density.parameters(), 10.0)
        opt.step()
    density.eval()

    def log_prob(f: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([density.log_prob_map("t", f[i : i + 16].float()) for i in range(0, len(f), 16)])

    return log_prob


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segmenter", required=True, help="checkpoint of tools/train_segmenter.py")
    p.add_argument("--tinyimagenet", default="../shared/data/tinyimagenet_val_32.npz")
    p.add_argument("--general-frames", type=int, default=300)
    p.add_argument("--taps", default="fuse,cls", help=f"comma-separated, from {sorted(TAPS)}")
    p.add_argument("--flow-steps", type=int, default=1000)
    p.add_argument("--flow-hidden", type=int, default=128)
    p.add_argument("--flow-pixels", type=int, default=2048)
    p.add_argument(
        "--fit-split",
        default="train",
        choices=["train", "val"],
        help="frames whose in-distribution positions fit the densities: the segmenter's own training "
        "frames (default), or the val frames it never saw (features as unfamiliar as the test frames')",
    )
    p.add_argument(
        "--eval-split", default="test", choices=["test", "val"], help="frames scored (default test)"
    )
    p.add_argument(
        "--logit-floors",
        default="",
        help="comma-separated floors c < 0: a flow on max(log softmax(logits), c) for each",
    )
    p.add_argument("--out", required=True, help="folder for variants.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    segmenter, scfg = load_segmenter(args.segmenter, "cpu")
    taps = [t.strip() for t in args.taps.split(",") if t.strip()]
    try:
        floors = [float(c) for c in args.logit_floors.split(",") if c.strip()]
    except ValueError:
        p.error(f"--logit-floors: not a comma-separated list of numbers: {args.logit_floors!r}")
    if any(not c < 0 for c in floors):
        p.error(f"--logit-floors: every floor must be negative, got {floors}")
    unknown = [t for t in taps if t not in TAPS]
    if unknown:
        p.error(f"unknown taps {unknown}; valid: {sorted(TAPS)}")
    extractor = FrozenFeatureExtractor.from_module(
        segmenter, {t: TAPS[t] for t in taps} | {"logits": "classifier"}
    )
    dcfg = dataclasses.replace(scfg.data, crop_height=0, crop_width=0)
    divisor = dcfg.pad_divisor
    train, test = load_scene_arrays(dcfg, args.fit_split), load_scene_arrays(dcfg, args.eval_split)
    feats = {
        split: extract(extractor, (x for _, x, _, _ in iter_eval_batches(arrays, 4, divisor)))
        for split, arrays in (("train", train), ("test", test))
    }
    mosaics = general_frames(Path(args.tinyimagenet), args.general_frames, 0)
    feats["general"] = extract(
        extractor,
        (
            torch.from_numpy(mosaics[i : i + 4]).permute(0, 3, 1, 2).float() / 255
            for i in range(0, len(mosaics), 4)
        ),
    )
    print(f"features extracted ({time.time() - start:.0f} s)", flush=True)

    h, w = test.labels.shape[1:]
    rows: list[tuple[str, str, dict]] = []

    def evaluate(tap: str, name: str, grid_scores: torch.Tensor) -> None:
        up_h = grid_scores.shape[-2] * extractor.strides[tap]
        up_w = grid_scores.shape[-1] * extractor.strides[tap]
        maps = F.interpolate(
            grid_scores[:, None].float(), size=(up_h, up_w), mode="bilinear", align_corners=False
        )
        metrics = PixelMetrics(mode="exact")
        metrics.update(maps[:, 0, :h, :w], test.labels)
        result = metrics.compute()
        rows.append((tap, name, result))
        print(f"{tap:8s} {name:20s} AUROC {100 * result['auroc']:6.2f} AP {100 * result['ap']:5.2f} "
              f"FPR95 {100 * result['fpr95']:6.2f} ({time.time() - start:.0f} s)", flush=True)  # fmt: skip

    logits = feats["test"]["logits"].float()
    for name, fn in (("msp", msp_score), ("max_logit", max_logit_score), ("entropy", entropy_score)):
        evaluate("logits", name, fn(logits))
    inlier_train = torch.from_numpy(train.labels == INLIER)
    if floors:
        ftr_logits = feats["train"]["logits"].float()
        ok = valid_feature_mask(inlier_train, ftr_logits.shape[-2:], extractor.strides["logits"], "all")
        x_in = vectors(ftr_logits, ok)
        for c in floors:
            flow = fit_flow(x_in, args.flow_steps, args.flow_hidden, args.flow_pixels, 5e-4, 0.1, 0, c)
            evaluate("logits", f"flow_floor{c:g}", -flow(logits).double())
    for tap in taps:
        ftr, fte, fge = feats["train"][tap], feats["test"][tap], feats["general"][tap]
        stride, (gh, gw), c = extractor.strides[tap], fte.shape[-2:], fte.shape[1]
        ok = valid_feature_mask(inlier_train, (gh, gw), stride, "all")
        x_in, x_gen, z = vectors(ftr, ok), vectors(fge, None), vectors(fte, None)
        shape = (fte.shape[0], gh, gw)
        g_in, g_gen = gaussian(x_in), gaussian(x_gen)
        lp_in = g_in(z)
        evaluate(tap, "gauss", (-lp_in).reshape(shape))
        evaluate(tap, "gauss_ratio", (g_gen(z) - lp_in).reshape(shape))
        # class-conditional Gaussians, ground-truth class of positions whose cell is one class
        ids = torch.from_numpy(np.where(train.labels == INLIER, train.train_ids, 255).astype(np.int64))
        n_classes = len(train.classes)
        cls_of = torch.full(ok.shape, -1, dtype=torch.int64)
        for k in range(n_classes):
            cls_of[valid_feature_mask(ids == k, (gh, gw), stride, "all")] = k
        y_in = cls_of[ok]
        # classes with too few single-class cells at this stride (poles at stride 16) are left out
        present = [k for k in range(n_classes) if int((y_in == k).sum()) > 2 * c]
        means = torch.stack([x_in[y_in == k].mean(0) for k in present])
        within = sum(torch.cov(x_in[y_in == k].T) * int((y_in == k).sum()) for k in present)
        within = within / len(x_in) + 1e-6 * torch.eye(c, dtype=within.dtype) * within.trace() / c
        prec = torch.linalg.inv(within)
        maha = torch.stack([(((z - m) @ prec) * (z - m)).sum(1) for m in means], 1)
        evaluate(tap, "gauss_class_tied", maha.min(1).values.reshape(shape))
        full = torch.stack([gaussian(x_in[y_in == k])(z) for k in present], 1)
        evaluate(tap, "gauss_class_full", (-full.max(1).values).reshape(shape))
        # flows
        flow_in = fit_flow(x_in, args.flow_steps, args.flow_hidden, args.flow_pixels, 5e-4, 0.1, 0)
        flow_gen = fit_flow(x_gen, args.flow_steps, args.flow_hidden, args.flow_pixels, 5e-4, 0.1, 0)
        lp_test = flow_in(fte).double()
        evaluate(tap, "flow", -lp_test)
        evaluate(tap, "flow_ratio", flow_gen(fte).double() - lp_test)
        lp_train = flow_in(ftr).double()
        pred_train = F.interpolate(feats["train"]["logits"].float(), size=(gh, gw), mode="bilinear").argmax(1)
        pred_test = F.interpolate(logits, size=(gh, gw), mode="bilinear").argmax(1)
        mu_c = torch.stack([lp_train[ok & (pred_train == k)].mean() for k in range(n_classes)])
        evaluate(tap, "flow_classnorm", mu_c[pred_test] - lp_test)
    lines = [
        f"segmenter {args.segmenter}; CamVid {args.eval_split}, {len(test)} frames at scale {dcfg.scale}; "
        f"anomalies {', '.join(dcfg.held_out)}; void excluded; exact pixel metrics; "
        f"flows: {args.flow_steps} steps, "
        f"hidden {args.flow_hidden}, {args.flow_pixels} positions per step; {args.general_frames} general "
        f"frames; densities fitted on the {args.fit_split} split ({len(train)} frames); "
        f"scored: the {args.eval_split} split; "
        f"{time.time() - start:.0f} s",
        "",
        "| tap | variant | AUROC % | AP % | FPR95 % |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {tap} | {name} | {100 * r['auroc']:.2f} | {100 * r['ap']:.2f} | {100 * r['fpr95']:.2f} |"
        for tap, name, r in rows
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.md.tmp").write_text("\n".join(lines) + "\n")
    (out / "variants.md.tmp").replace(out / "variants.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
