"""Dense road Glow: masked loss, frame maps, dataset-level rescaling, written files, tools, resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
import torch
import yaml
from sklearn import metrics as skm

from densead.config import DataConfig, ModelConfig, TrainConfig, to_dict
from densead.data.road import CamVid, read_label
from densead.data.transforms import to_model_input
from densead.dense import (
    GeneralImagesConfig,
    RoadBatches,
    RoadDataConfig,
    RoadSource,
    RoadTrainConfig,
    masked_log_likelihood,
    masked_training_step,
    position_masks,
    road_log_likelihood,
    shrink,
    train_road_glow,
)
from densead.dense_scoring import (
    DenseRun,
    MapRescale,
    evaluate_dense,
    evaluate_dense_components,
    evaluate_dense_run,
    false_positives_by_class,
    frame_maps,
    score_road_dataset,
    write_dense_maps,
    write_frame_maps,
)
from densead.detectors import MIN_LOG_PROB, GlowScorer, get_detector
from densead.detectors.glow import SENTINEL_LIMIT
from densead.evaluation import Bootstrap
from densead.flows import Glow, GlowOutput
from densead.frame_scorers import GlowFrameScorer
from densead.io import atomic_torch_save
from densead.metrics import ComponentMetrics
from densead.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(in_channels=3, n_scales=2, n_steps=1, hidden=8)
ALL_DETECTORS = [get_detector(n) for n in ("raw", "ratio", "scale1", "scale2", "last_scale")]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_glow(seed: int, n_scales: int = 2) -> Glow:
    """A tiny Glow with every parameter perturbed (zero-initialized convs would hide neighbours)."""
    torch.manual_seed(seed)
    model = Glow(3, n_scales=n_scales, n_steps=1, hidden=8).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()(torch.rand(4, 3, 16, 16, dtype=torch.float64) - 0.5)  # ActNorm init
    return model.eval()


# --------------------------------------------------------------------------- the masked loss


def test_values_under_the_mask_change_neither_loss_nor_gradients() -> None:
    model = random_glow(0)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) - 0.5
    keep = torch.ones(2, 16, 16, dtype=torch.bool)
    keep[0, 3:9, 5:12] = False
    keep[1, 10:, :4] = False
    crazy = x.clone()
    crazy[~keep.unsqueeze(1).expand_as(x)] = 1e6
    crazy[0, 1, 4, 6] = float("nan")

    def loss_and_grads(inp: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        ll, dims = road_log_likelihood(model, inp, keep)
        loss = -ll.sum() / dims.sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads(x)
    loss_b, grads_b = loss_and_grads(crazy)
    assert torch.isfinite(loss_a) and torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    # Without greying out the input, the planted values reach kept positions through the 3x3
    # coupling convolutions: the test above would notice a missing fill.
    with torch.no_grad():
        leaked = masked_log_likelihood(model(torch.nan_to_num(crazy)), keep)[0]
        clean = masked_log_likelihood(model(x), keep)[0]
    assert not torch.allclose(leaked, clean)


def test_position_of_scale_i_with_any_masked_pixel_is_dropped() -> None:
    keep = torch.ones(1, 16, 16, dtype=torch.bool)
    keep[0, 5, 9] = False
    for i, m in enumerate(position_masks(keep, 3), start=1):
        expected = torch.ones(1, 16 >> i, 16 >> i, dtype=torch.bool)
        expected[0, 5 >> i, 9 >> i] = False
        assert torch.equal(m, expected), i
    # Brute force on a random mask: kept iff every covered pixel is kept.
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 16, 16, generator=g) > 0.1
    for i, m in enumerate(position_masks(keep, 3), start=1):
        f = 2**i
        brute = keep.view(2, 16 // f, f, 16 // f, f).all(dim=4).all(dim=2)
        assert torch.equal(m, brute), i


def test_masked_log_likelihood_sums_exactly_the_kept_terms() -> None:
    model = random_glow(2)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) - 0.5
    with torch.no_grad():
        out = model(x)
    everything = torch.ones(2, 16, 16, dtype=torch.bool)
    ll, dims = masked_log_likelihood(out, everything)
    assert torch.allclose(ll, out.log_prob(discrete=True), rtol=0, atol=1e-9)
    assert torch.equal(dims, torch.full((2,), 3.0 * 16 * 16, dtype=dims.dtype))

    keep = everything.clone()
    keep[0, 0, 0] = False  # drops one position per scale
    keep[1, 4:8, 4:8] = False  # drops a 4x4 block: 4 positions of scale 1, 1 of scale 2
    ll, dims = masked_log_likelihood(out, keep)
    c1, c2 = out.contributions
    expected0 = out.log_prob(discrete=True)[0] - c1[0, 0, 0] - c2[0, 0, 0] - out.dequantization_per_pixel
    expected1 = (
        out.log_prob(discrete=True)[1]
        - c1[1, 2:4, 2:4].sum()
        - c2[1, 1, 1]
        - 16 * out.dequantization_per_pixel
    )
    assert torch.allclose(ll, torch.stack([expected0, expected1]), rtol=0, atol=1e-9)
    assert dims.tolist() == [3.0 * 255, 3.0 * 240]


def test_masked_step_drops_non_finite_samples() -> None:
    model = Glow(3, n_scales=2, n_steps=1, hidden=8)
    model.train()(torch.rand(8, 3, 16, 16) - 0.5)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    x = torch.rand(8, 3, 16, 16) - 0.5
    keep = torch.ones(8, 16, 16, dtype=torch.bool)
    x[:2, :, 8:] = 1e30  # kept pixels whose log-likelihood overflows
    result = masked_training_step(model, opt, x, keep)
    assert not result.skipped and result.dropped == 2 and torch.isfinite(result.nll)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- frame maps


def test_frame_maps_sum_to_log_p() -> None:
    model, general = random_glow(3).float(), random_glow(4).float()
    scorer = GlowScorer(model, general)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    maps = frame_maps(scorer, [frame], ALL_DETECTORS)
    x = to_model_input(torch.from_numpy(frame).permute(2, 0, 1)[None], 256, dequantize=False)
    with torch.no_grad():
        out_in, out_g = model(x), general(x)
    lp_in, lp_g = out_in.log_prob(discrete=True).item(), out_g.log_prob(discrete=True).item()
    scales = out_in.scale_log_probs()[0].tolist()
    expected = {"raw": -lp_in, "ratio": lp_g - lp_in, "scale1": -scales[0], "scale2": -scales[1]}
    expected["last_scale"] = -scales[1]
    for name, value in expected.items():
        assert maps[name].shape == (1, 32, 48)
        assert maps[name].sum(dtype=np.float64) == pytest.approx(value, rel=1e-4, abs=1e-2), name

    # Shrunk 2x: spread back onto the native grid, the map still sums to -log p of the shrunk frame.
    small = to_model_input(torch.from_numpy(shrink(frame, 2)).permute(2, 0, 1)[None], 256, dequantize=False)
    with torch.no_grad():
        lp_small = model(small).log_prob(discrete=True).item()
    raw2 = frame_maps(scorer, [frame], [get_detector("raw")], downscale=2)["raw"]
    assert raw2.shape == (1, 32, 48)
    assert raw2.sum(dtype=np.float64) == pytest.approx(-lp_small, rel=1e-4)
    # A frame that is no multiple of 2^L comes back in its own shape.
    assert frame_maps(scorer, [frame[:30, :45]], ALL_DETECTORS[:1])["raw"].shape == (1, 30, 45)

    # complexity_loco's code length is per pixel: a road-frame map that sums to its score, at any shrink.
    from densead.detectors.complexity import code_length

    loco = get_detector("complexity_loco")
    smooth = np.repeat(np.repeat(frame[::8, ::8], 8, axis=0), 8, axis=1)  # cheaper for the coder: blocks
    for image, downscale in ((frame, 1), (smooth, 1), (frame, 2)):
        levels = torch.from_numpy(shrink(image, downscale)).permute(2, 0, 1)[None].contiguous()
        with torch.no_grad():
            lp = model(to_model_input(levels, 256, dequantize=False)).log_prob(discrete=True).item()
        expected = -float(code_length(levels, "loco")) * math.log(2) - lp
        got = frame_maps(scorer, [image], [loco], downscale=downscale)["complexity_loco"]
        assert got.shape == (1, 32, 48)
        assert got.sum(dtype=np.float64) == pytest.approx(expected, rel=1e-4, abs=1e-2)


@pytest.mark.parametrize("downscale", [1, 2, 3])
def test_a_non_finite_position_stays_a_sentinel_on_the_native_grid(
    tmp_path: Path, downscale: int, monkeypatch
) -> None:
    """A log-density without value is the sentinel on every native pixel it covers, whatever the
    shrink factor (spread evenly over downscale² pixels, it would pass for a real score), and the
    written run's range and maps come from the real scores only."""
    model = random_glow(3).float()
    forward = model.forward

    def one_bad_position(x: torch.Tensor) -> GlowOutput:
        out = forward(x)
        c0 = out.contributions[0].clone()
        c0[0, 1, 2] = -math.inf  # scale 1: a 2×2 block of model pixels
        return replace(out, contributions=(c0, *out.contributions[1:]))

    monkeypatch.setattr(model, "forward", one_bad_position)
    scorer = GlowFrameScorer(GlowScorer(model), [get_detector("raw")], downscale=downscale)
    frame = np.random.default_rng(0).integers(0, 256, (8 * downscale, 12 * downscale, 3), dtype=np.uint8)
    m = scorer.maps([frame])["raw"][0]
    block = np.zeros(m.shape, dtype=bool)
    block[2 * downscale : 4 * downscale, 4 * downscale : 6 * downscale] = True
    assert np.array_equal(np.abs(m) >= SENTINEL_LIMIT, block)
    assert np.all(m[block] == -MIN_LOG_PROB) and np.abs(m[~block]).max() < 1e3

    root = fake_camvid(tmp_path / "camvid", n=1)
    run = write_frame_maps(CamVid(root, "test"), scorer, tmp_path / "run", overlays=False, progress=False)
    lo, hi = run.rescale.bounds["raw"]
    assert hi < 1e3, "the sentinel set the rescale range: every real score would be written as 0"


def test_dataset_level_rescaling_keeps_the_order_across_frames() -> None:
    low = np.linspace(-3.0, 1.0, 100).reshape(10, 10)  # a frame of low scores
    high = np.linspace(5.0, 6.0, 100).reshape(10, 10)  # a frame of high scores
    rescale = MapRescale.fit({"raw": (-3.0, 6.0)})
    a, b = rescale.apply("raw", low), rescale.apply("raw", high)
    assert a.dtype == b.dtype == np.float16
    assert a.min() == 0 and b.max() == 1 and a.max() < b.min()
    both_raw, both = np.concatenate([low.ravel(), high.ravel()]), np.concatenate([a.ravel(), b.ravel()])
    assert np.all(np.diff(both[np.argsort(both_raw)].astype(np.float64)) >= 0)
    # Fixed bounds from another set: scores outside clip, order otherwise kept.
    clipped = MapRescale.fit({"raw": (0.0, 1.0)}).apply("raw", high)
    assert np.all(clipped == 1)


# --------------------------------------------------------------------------- written files


H, W = 22, 30  # not multiples of 4: padding and cropping are exercised


def fake_camvid(root: Path, n: int = 3, split: str = "test") -> Path:
    """A CamVid layout with ``n`` random frames holding inliers, Pedestrians (9) and void (11)."""
    rng = np.random.default_rng(7)
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    # Label files named unlike their images, so an error message can be told to name the right one.
    lines = [f"/SegNet/CamVid/{split}/f{i}.png /SegNet/CamVid/{split}annot/f{i}_L.png" for i in range(n)]
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    for i in range(n):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        image = np.clip(image.astype(int) + 60 * i - 60, 0, 255).astype(np.uint8)  # frames differ
        label = rng.integers(0, 9, (H, W), dtype=np.uint8)
        label[2:6, 3:9] = 9
        label[-3:, :] = 11
        assert cv2.imwrite(str(root / split / f"f{i}.png"), image)
        assert cv2.imwrite(str(root / f"{split}annot" / f"f{i}_L.png"), label)
    return root


def test_written_maps_float16_in_unit_interval_and_order_kept(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid")
    dataset = CamVid(root, "test")
    scorer = GlowScorer(random_glow(5).float(), random_glow(6).float())
    dets = [get_detector(n) for n in ("raw", "ratio", "last_scale")]
    run = write_dense_maps(dataset, scorer, dets, tmp_path / "out", progress=False)
    raw_all, written_all = [], []
    for i, name in enumerate(run.names):
        raw = frame_maps(scorer, [dataset[i]["image"]], dets)
        for det in ("raw", "ratio", "last_scale"):
            m = np.load(run.map_path(det, name))
            assert m.dtype == np.float16 and m.shape == (H, W), det
            assert m.min() >= 0 and m.max() <= 1, det
            assert run.overlay_path(det, name).stat().st_size > 0
        raw_all.append(raw["raw"][0].ravel())
        written_all.append(np.load(run.map_path("raw", name)).ravel())
    raw_all, written_all = np.concatenate(raw_all), np.concatenate(written_all)
    assert written_all.min() == 0 and written_all.max() == 1  # calibrated on this very set
    ordered = written_all[np.argsort(raw_all, kind="stable")].astype(np.float64)
    assert np.all(np.diff(ordered) >= 0), "rescaling broke the order of pixels across frames"
    with (tmp_path / "out" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["f0", "f1", "f2"]
    label = dataset[0]["label"]
    assert float(rows[0]["anomaly_fraction"]) == pytest.approx((label == 1).sum() / (label != 255).sum())
    assert float(rows[0]["raw_max"]) == pytest.approx(float(raw_all[: H * W].max()), rel=1e-6)
    assert set(json.loads((tmp_path / "out" / "run.json").read_text())["frames"]) == {"f0", "f1", "f2"}
    assert not list((tmp_path / "out").glob(".*")), "staging or temporary files left behind"


def save_tiny_checkpoint(path: Path, seed: int) -> Path:
    model = random_glow(seed).float()
    atomic_torch_save({"model": model.state_dict(), "model_config": to_dict(TINY)}, path)
    return path


@pytest.mark.parametrize("fault", ["label_size", "missing_label", "broken_image"])
def test_bad_frame_names_the_file_and_writes_nothing(tmp_path: Path, fault: str) -> None:
    root = fake_camvid(tmp_path / "camvid", n=3)
    bad = {
        "label_size": root / "testannot" / "f1_L.png",
        "missing_label": root / "testannot" / "f1_L.png",
        "broken_image": root / "test" / "f1.png",
    }[fault]
    if fault == "label_size":
        assert cv2.imwrite(str(bad), np.zeros((H + 2, W), np.uint8))
    elif fault == "missing_label":
        bad.unlink()
    else:
        bad.write_bytes(b"\x89PNG broken")
    ckpt = save_tiny_checkpoint(tmp_path / "model.pt", 8)
    source = RoadSource("camvid", str(root), "test")
    for rescale in (None, MapRescale.fit({"raw": (-10.0, 10.0)})):  # two passes, then one pass
        out = tmp_path / "out"
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(bad.name)):
            score_road_dataset(source, ckpt, out, ["raw"], rescale=rescale, progress=False)
        assert not out.exists()
    # A pre-existing output folder keeps only what it had: no maps, no summary, no temp files.
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(bad.name)):
        rescale = MapRescale.fit({"raw": (-10.0, 10.0)})
        score_road_dataset(source, ckpt, out, ["raw"], rescale=rescale, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_false_alarms_by_class_need_semantic_labels(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=2)
    ckpt = save_tiny_checkpoint(tmp_path / "model.pt", 8)
    score_road_dataset(
        RoadSource("folder", str(root / "test")), ckpt, tmp_path / "f", ["raw"], progress=False
    )
    with pytest.raises(ValueError, match=r"folder \(ImageFolderFrames\) has no semantic labels"):
        false_positives_by_class(tmp_path / "f")
    score_road_dataset(RoadSource("camvid", str(root), "test"), ckpt, tmp_path / "c", ["raw"], progress=False)
    rows = false_positives_by_class(tmp_path / "c")
    assert {r.class_name for r in rows} <= set(CamVid.semantic_classes[:9]) and sum(
        r.share for r in rows
    ) == (pytest.approx(1.0))


def test_component_metrics_of_a_run_threshold_its_maps_at_the_best_pixel_f1(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=3)
    ckpt = save_tiny_checkpoint(tmp_path / "model.pt", 8)
    score_road_dataset(RoadSource("camvid", str(root), "test"), ckpt, tmp_path / "c", ["raw"], progress=False)
    (row,) = evaluate_dense_components(tmp_path / "c", min_segment_size=0, min_instance_size=0)
    assert (row.set_name, row.detector, row.n_instances) == (
        "camvid_test",
        "raw",
        3,
    )  # a pedestrian per frame
    # the threshold: the best pixel F1 over the written maps, from scikit-learn's PR curve
    dataset = CamVid(root, "test")
    scores, labels = [], []
    frames = ComponentMetrics(row.threshold, min_segment_size=0, min_instance_size=0)
    for name, frame in zip(dataset.names, dataset.frames, strict=True):
        label, _ = dataset.map_label(read_label(frame.label))
        m = np.load(tmp_path / "c" / "maps" / "raw" / f"{name}.npy")
        scores.append(m[label != 255].astype(np.float64))
        labels.append(label[label != 255])
        frames.update(m, label)
    out = frames.compute()  # the components were scored at that threshold
    assert (row.siou, row.ppv, row.f1_mean, row.n_segments) == (
        out["siou"],
        out["ppv"],
        out["f1_mean"],
        out["n_segments"],
    )
    precision, recall, thresholds = skm.precision_recall_curve(np.concatenate(labels), np.concatenate(scores))
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    assert row.pixel_f1 == pytest.approx(f1.max(), abs=1e-12)
    assert row.threshold == thresholds[np.flatnonzero(f1 == f1.max()).max()]
    with pytest.raises(ValueError, match="no anomaly component of at least 25 pixels"):
        evaluate_dense_components(tmp_path / "c", min_segment_size=0, min_instance_size=25)  # 4×6 = 24 px


# --------------------------------------------------------------------------- training and tools


def tiny_train_config(out: Path, steps: int, general: bool = False) -> RoadTrainConfig:
    data = RoadDataConfig(
        root=str(REPO.parent / "shared" / "data" / "camvid"),
        max_frames=3,
        downscale=4,
        crop_height=16,
        crop_width=24,
    )
    photos = GeneralImagesConfig(
        DataConfig(
            source="npz", path=str(REPO.parent / "shared" / "data" / "tinyimagenet_val_32.npz"), stop=64
        )
    )
    tcfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, log_every=1, checkpoint_every=100)
    return RoadTrainConfig(str(out), data, TINY, tcfg, photos if general else None)


def test_resume_equals_uninterrupted(tmp_path: Path, shared_data: Path) -> None:
    straight = train_road_glow(tiny_train_config(tmp_path / "a", 4, general=True), progress=False)
    train_road_glow(tiny_train_config(tmp_path / "b", 2, general=True), progress=False)
    resumed = train_road_glow(tiny_train_config(tmp_path / "b", 4, general=True), resume=True, progress=False)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 4 and b["finished"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"] == b["history"] and len(a["history"]) == 4
    assert b["config"]["data"]["held_out"] == ["Pedestrian", "Bicyclist"]


def test_road_training_takes_the_fast_path(tmp_path: Path, shared_data: Path, compile_spy: list) -> None:
    """``train.fast`` in the road-scene loop: compiled (aot_eager) once after ActNorm's init, with
    fused steps and recomputation: the same losses as the plain path up to rounding."""
    losses = {}
    for mode in ("off", "fused,compile,recompute"):
        cfg = tiny_train_config(tmp_path / mode.replace(",", "_"), 3, general=True)
        cfg = replace(cfg, train=replace(cfg.train, fast=mode))
        losses[mode] = seen = []
        train_road_glow(cfg, progress=False, on_step=lambda step, r, seen=seen: seen.append(float(r.nll)))
    assert compile_spy == [False]
    assert losses["off"] == pytest.approx(losses["fused,compile,recompute"], rel=1e-4)


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    frames = [torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8) for _ in range(3)]
    keeps = [torch.rand(40, 56) > 0.2 for _ in range(3)]
    one, two = (RoadBatches(frames, keeps, (16, 24), 4, seed=3) for _ in range(2))
    x1, k1 = one.batch(7)
    two.batch(0)
    x2, k2 = two.batch(7)
    assert torch.equal(x1, x2) and torch.equal(k1, k2)
    assert not torch.equal(x1, one.batch(8)[0])


def test_crops_larger_than_a_frame_pad_it_mirrored_and_dropped() -> None:
    frame = torch.randint(1, 256, (3, 10, 14), dtype=torch.uint8)
    keep = torch.ones(10, 14, dtype=torch.bool)
    batches = RoadBatches([frame], [keep], (16, 24), 2, seed=0, hflip=False, n_bins=256)
    images, keeps = batches._road(torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 24) and keeps.shape == (2, 16, 24)
    for img, k in zip(images, keeps, strict=True):
        assert torch.equal(img[:, :10, :14], frame) and k[:10, :14].all()
        assert not k[10:].any() and not k[:, 14:].any()  # padding never enters the loss
        assert torch.equal(img[:, 10:16, :14], frame[:, 4:10].flip(1))  # mirrored, no black band
        assert torch.equal(img[:, :10, 14:24], frame[:, :, 4:14].flip(2))


def test_bad_crop_size_is_an_error(tmp_path: Path) -> None:
    cfg = tiny_train_config(tmp_path / "x", 1)
    bad = RoadTrainConfig(cfg.output_dir, RoadDataConfig(root=cfg.data.root, crop_height=18), TINY)
    with pytest.raises(ValueError, match="multiples of 2\\^n_scales = 4"):
        train_road_glow(bad, progress=False)
    assert not (tmp_path / "x").exists()


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_tools_smoke_train_score_evaluate(tmp_path: Path, shared_data: Path) -> None:
    cfg = to_dict(tiny_train_config(tmp_path / "glow", 2, general=True))
    (tmp_path / "glow.yaml").write_text(yaml.safe_dump(cfg))
    run_tool("tools/train_road_glow.py", str(tmp_path / "glow.yaml"), "--no-progress")
    ckpt = tmp_path / "glow" / "checkpoint.pt"
    out = tmp_path / "scores"
    run_tool(
        "tools/score_images.py", "--road", "camvid", "--root", str(shared_data / "camvid"), "--split", "test",
        "--max-frames", "2", "--checkpoint", str(ckpt), "--general", str(ckpt),
        "--detector", "raw,ratio,scale1,last_scale", "--out", str(out), "--no-progress",
    )  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert run["downscale"] == 4 and len(run["frames"]) == 2  # downscale taken from the checkpoint
    m = np.load(out / "maps" / "raw" / f"{run['frames'][0]}.npy")
    assert m.dtype == np.float16 and m.shape == (360, 480)
    proc = run_tool(
        "tools/evaluate.py", "--pixel", str(out), "--out", str(tmp_path / "eval"), "--no-progress"
    )
    assert "camvid_test" in proc.stdout and "| last_scale |" in proc.stdout
    with (tmp_path / "eval" / "pixel_metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["detector"] for r in rows] == ["raw", "ratio", "scale1", "last_scale"]
    assert all(0 <= float(r["auroc"]) <= 1 and int(r["n_anomaly"]) > 0 for r in rows)


def road_checkpoint(path: Path, seed: int, held_out: list[str], downscale: int = 1) -> Path:
    """A tiny road Glow checkpoint that records the protocol it was trained with."""
    model = random_glow(seed).float()
    data = {"held_out": held_out, "void": ["Unlabelled"], "downscale": downscale}
    ckpt = {"model": model.state_dict(), "model_config": to_dict(TINY), "config": {"data": data}}
    atomic_torch_save(ckpt, path)
    return path


def test_a_road_glow_scores_only_the_protocol_it_was_trained_with(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=1)
    people = road_checkpoint(tmp_path / "people.pt", 1, ["Pedestrian", "Bicyclist"])
    source = RoadSource("camvid", str(root), "test")
    fixed = MapRescale.fit({"raw": (-10.0, 10.0), "ratio": (-10.0, 10.0)})
    score_road_dataset(
        source, people, tmp_path / "ok", ["raw"], rescale=fixed, overlays=False, progress=False
    )
    cars = replace(source, held_out=("Car",))
    with pytest.raises(ValueError, match=r"people\.pt: trained with held_out=\['Pedestrian', 'Bicyclist'\]"):
        score_road_dataset(cars, people, tmp_path / "cars", ["raw"], rescale=fixed, progress=False)
    general_cars = road_checkpoint(tmp_path / "general_cars.pt", 2, ["Car"])
    with pytest.raises(ValueError, match=r"general_cars\.pt: trained with held_out=\['Car'\]"):
        score_road_dataset(
            source, people, tmp_path / "g", ["ratio"], general_cars, rescale=fixed, progress=False
        )
    general_2x = road_checkpoint(tmp_path / "general_2x.pt", 3, ["Pedestrian", "Bicyclist"], downscale=2)
    with pytest.raises(
        ValueError, match=r"general_2x\.pt: trained on frames shrunk 2x, but .*people\.pt on 1x"
    ):
        score_road_dataset(
            source, people, tmp_path / "g", ["ratio"], general_2x, rescale=fixed, progress=False
        )
    assert not any((tmp_path / d).exists() for d in ("cars", "g"))


def scored_run(tmp_path: Path) -> tuple[Path, Path, DenseRun]:
    """Two fake CamVid test frames scored with a tiny Glow's raw maps (fixed rescaling: one pass)."""
    root = fake_camvid(tmp_path / "camvid", n=2)
    ckpt = save_tiny_checkpoint(tmp_path / "model.pt", 4)
    fixed = MapRescale.fit({"raw": (-10.0, 10.0)})
    source = RoadSource("camvid", str(root), "test")
    return (
        root,
        ckpt,
        score_road_dataset(source, ckpt, tmp_path / "run", ["raw"], rescale=fixed, progress=False),
    )


@pytest.mark.parametrize("fault", ["truncated", "nan", "float32", "negative", "objects"])
def test_a_map_not_as_dense_scoring_writes_it_is_named(tmp_path: Path, fault: str) -> None:
    root, ckpt, run = scored_run(tmp_path)
    path = run.map_path("raw", "f1")
    m = np.load(path)
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif fault == "nan":
        m[0, :2] = np.nan
        np.save(path, m)
    elif fault == "float32":
        np.save(path, m.astype(np.float32))
    elif fault == "negative":
        m[0, 0] = -0.5
        np.save(path, m)
    else:
        np.save(path, np.array([object()] * 3), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: "):
        evaluate_dense_run(tmp_path / "run")


def test_frames_that_would_write_one_map_file_and_bad_outputs_are_refused_before_scoring(
    tmp_path: Path,
) -> None:
    root = tmp_path / "frames"
    (root / "a").mkdir(parents=True)
    image = np.zeros((H, W, 3), np.uint8)
    assert cv2.imwrite(str(root / "a" / "b.png"), image) and cv2.imwrite(str(root / "a__b.png"), image)
    ckpt = save_tiny_checkpoint(tmp_path / "model.pt", 4)
    source = RoadSource("folder", str(root))
    with pytest.raises(ValueError, match=r"frames 'a/b' and 'a__b' would both be written as a__b\.npy"):
        score_road_dataset(source, ckpt, tmp_path / "out", ["raw"], progress=False)
    assert not (tmp_path / "out").exists()
    (root / "a__b.png").unlink()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"output folder: .*file exists and is not a folder"):
        score_road_dataset(source, ckpt, tmp_path / "file", ["raw"], progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        score_road_dataset(source, ckpt, tmp_path / "out", ["raw"], batch_size=0, progress=False)
    fixed = MapRescale.fit({"ratio": (0.0, 1.0)})
    with pytest.raises(ValueError, match=r"rescale has no bounds for detector\(s\) \['raw'\] \(has: ratio\)"):
        score_road_dataset(source, ckpt, tmp_path / "out", ["raw"], rescale=fixed, progress=False)
    assert not (tmp_path / "out").exists()


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_tool_{name}", Path(__file__).parents[1] / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pixel_tools_report_bad_runs_and_paths_as_usage_errors(tmp_path: Path, capsys) -> None:
    evaluate, score_images = load_tool("evaluate"), load_tool("score_images")
    root, ckpt, run = scored_run(tmp_path)
    assert evaluate.main([f"--pixel={tmp_path / 'run'}", "--out", str(tmp_path / "ok")]) == 0
    assert evaluate.main(["--pixel", "--help"]) == 0
    assert "RUN_DIR" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    bad_map = run.map_path("raw", "f1")
    bad_map.write_bytes(bad_map.read_bytes()[:100])
    for args, expected in [
        (["--pixel", str(tmp_path / "run"), "--out", str(tmp_path / "file")], "exists and is not a folder"),
        (["--pixel", str(tmp_path / "run"), "--out", str(tmp_path / "e")], re.escape(str(bad_map))),
        (["--pixel", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")], "run.json not found"),
        (
            ["--pixel", str(tmp_path / "run"), "--detectors", "foo", "--out", str(tmp_path / "e")],
            "no maps for",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(args)
        assert exit_.value.code == 2 and re.search(expected, capsys.readouterr().err), args
    assert not (tmp_path / "e").exists()
    for args, expected in [
        (["--root", str(tmp_path / "nowhere"), "--checkpoint", str(ckpt)], "does not exist"),
        (["--root", str(root), "--checkpoint", str(tmp_path / "nope.pt")], "checkpoint not found"),
        (["--root", str(root), "--checkpoint", str(ckpt), "--segmenter", "s.pt"], "give both"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            score_images.main(["--road", "camvid", "--split", "test", "--out", str(tmp_path / "s"), *args])
        assert exit_.value.code == 2 and re.search(expected, capsys.readouterr().err), args


def test_runs_of_one_set_keep_apart_in_the_pixel_tables(tmp_path: Path) -> None:
    evaluate = load_tool("evaluate")
    root = fake_camvid(tmp_path / "camvid", n=2)
    source = RoadSource("camvid", str(root), "test")
    fixed = MapRescale.fit({"raw": (-10.0, 10.0)})
    for seed, run in ((4, "a"), (5, "b")):  # two checkpoints scored on one set
        ckpt = save_tiny_checkpoint(tmp_path / f"{run}.pt", seed)
        score_road_dataset(
            source, ckpt, tmp_path / run, ["raw"], rescale=fixed, overlays=False, progress=False
        )
    out = tmp_path / "eval"
    assert evaluate.main(["--pixel", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    with (out / "pixel_metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["set_name"] for r in rows] == [f"camvid_test [{tmp_path / run}]" for run in ("a", "b")]
    assert evaluate.main(["--pixel", str(tmp_path / "a"), "--out", str(tmp_path / "one")]) == 0
    with (tmp_path / "one" / "pixel_metrics.csv").open() as f:
        assert [r["set_name"] for r in csv.DictReader(f)] == ["camvid_test"]  # one run: the set's own name


def bootstrap_evaluation(tmp_path: Path) -> tuple[Path, list[str]]:
    """A road run of raw and last_scale maps over 5 fake CamVid frames, each with a pedestrian, and
    evaluate.py's arguments for it with --bootstrap 100 (no --compare): its output folder and them."""
    root = fake_camvid(tmp_path / "camvid", n=5)
    ckpt = save_tiny_checkpoint(tmp_path / "in.pt", 4)
    source = RoadSource("camvid", str(root), "test")
    score_road_dataset(source, ckpt, tmp_path / "run", ["raw", "last_scale"], overlays=False, progress=False)
    out = tmp_path / "eval"
    return out, ["--pixel", str(tmp_path / "run"), "--out", str(out), "--no-progress", "--bootstrap", "100"]


def test_pixel_bootstrap_intervals_and_paired_differences_over_frames(tmp_path: Path, capsys) -> None:
    """evaluate.py --pixel --bootstrap: intervals from resampled frames next to each number, each
    detector minus the --compare one with its paired interval; the same flags give the same numbers,
    and a later evaluation without --compare removes pixel_differences.csv."""
    evaluate = load_tool("evaluate")
    out, args = bootstrap_evaluation(tmp_path)
    assert evaluate.main([*args, "--compare", "raw"]) == 0
    printed = capsys.readouterr().out
    assert "95% bootstrap interval, 100 resamples over frames" in printed and "detector − raw" in printed
    with (out / "pixel_metrics.csv").open() as f:
        rows = {r["detector"]: r for r in csv.DictReader(f)}
    for r in rows.values():
        for m in ("auroc", "ap", "fpr95"):
            assert 0 <= float(r[f"{m}_lo"]) <= float(r[f"{m}_hi"]) <= 1, (r["detector"], m)
    with (out / "pixel_differences.csv").open() as f:
        diffs = list(csv.DictReader(f))
    assert [(d["detector"], d["baseline"], d["set_name"], d["metric"]) for d in diffs] == [
        ("last_scale", "raw", "camvid_test", m) for m in ("auroc", "ap", "fpr95")
    ]
    gap = float(rows["last_scale"]["auroc"]) - float(rows["raw"]["auroc"])
    assert float(diffs[0]["difference"]) == pytest.approx(gap)
    first = (out / "pixel_metrics.csv").read_text()
    assert evaluate.main(args) == 0
    assert (out / "pixel_metrics.csv").read_text() == first and not (out / "pixel_differences.csv").exists()
    assert evaluate.main(args[:-2]) == 0
    assert "auroc_lo" not in (out / "pixel_metrics.csv").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([*args[:-2], "--compare", "raw"])
    assert exit_.value.code == 2 and "--compare needs --bootstrap N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([*args, "--compare", "nope"])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2 and f"--compare 'nope' is not among the detectors of {tmp_path / 'run'}" in err
    )
    assert "raw, last_scale" in err


def test_component_bootstrap_intervals_and_paired_differences(tmp_path: Path, capsys) -> None:
    """evaluate.py --pixel --components --bootstrap: sIoU, PPV and mean F1 with intervals from
    resampled frames at each detector's threshold, each detector minus the --compare one in
    component_differences.csv; the same flags give the same numbers, and without --compare the file
    is removed."""
    evaluate = load_tool("evaluate")
    out, args = bootstrap_evaluation(tmp_path)
    args += ["--components", "--min-segment-size", "0", "--min-instance-size", "0"]
    assert evaluate.main([*args, "--compare", "raw"]) == 0
    printed = capsys.readouterr().out
    assert "95% bootstrap interval, 100 resamples over frames at each threshold" in printed
    assert "**sIoU %, detector − raw**" in printed and "**mean F1 %, detector − raw**" in printed
    with (out / "component_metrics.csv").open() as f:
        rows = {r["detector"]: r for r in csv.DictReader(f)}
    (plain,) = evaluate_dense_components(tmp_path / "run", ["raw"], min_segment_size=0, min_instance_size=0)
    assert float(rows["raw"]["siou"]) == plain.siou and rows["raw"]["n_instances"] == "5"
    assert math.isnan(plain.siou_lo) and not plain.has_interval
    # raw alone gets the intervals it got beside last_scale: the draws depend on the frames only
    (alone,) = evaluate_dense_components(tmp_path / "run", ["raw"], 0, 0, bootstrap=Bootstrap(100))
    assert [repr(getattr(alone, f"{m}_{e}")) for m in ("siou", "ppv", "f1_mean") for e in ("lo", "hi")] == [
        rows["raw"][f"{m}_{e}"] for m in ("siou", "ppv", "f1_mean") for e in ("lo", "hi")
    ]
    for r in rows.values():
        for m in ("siou", "ppv", "f1_mean"):
            assert 0 <= float(r[f"{m}_lo"]) <= float(r[f"{m}_hi"]) <= 1, (r["detector"], m)
    assert float(rows["raw"]["siou_lo"]) < float(rows["raw"]["siou_hi"])  # five frames that differ
    with (out / "component_differences.csv").open() as f:
        diffs = list(csv.DictReader(f))
    assert [(d["detector"], d["baseline"], d["set_name"], d["metric"]) for d in diffs] == [
        ("last_scale", "raw", "camvid_test", m) for m in ("siou", "ppv", "f1_mean")
    ]
    for d in diffs:
        gap = float(rows["last_scale"][d["metric"]]) - float(rows["raw"][d["metric"]])
        assert float(d["difference"]) == pytest.approx(gap) and float(d["lo"]) <= float(d["hi"])
    only = evaluate_dense(
        tmp_path / "run", None, None, components=(0, 0), bootstrap=Bootstrap(100), baseline="raw"
    )
    assert not only.pixel and not only.differences  # no pixel metrics asked, none resampled
    assert [(d.metric, d.lo) for d in only.component_differences] == [
        (d["metric"], float(d["lo"])) for d in diffs
    ]
    first = (out / "component_metrics.csv").read_text()
    assert evaluate.main(args) == 0
    assert (out / "component_metrics.csv").read_text() == first
    assert not (out / "component_differences.csv").exists()
    assert evaluate.main([a for a in args if a not in ("--bootstrap", "100")]) == 0
    assert "siou_lo" not in (out / "component_metrics.csv").read_text()
    assert "[" not in (out / "component_metrics.md").read_text().split("|---|")[-1]


def test_frame_maps_refuse_whole_image_detectors() -> None:
    scorer = GlowScorer(random_glow(3).float())
    frame = np.zeros((32, 48, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\['complexity'\] score whole images"):
        frame_maps(scorer, [frame], [get_detector("raw"), get_detector("complexity")])
    with pytest.raises(ValueError, match=r"\['complexity', 'typicality'\] score whole images"):
        GlowFrameScorer(scorer, [get_detector("complexity"), get_detector("typicality")])
