"""Feature-density and combined maps in the dense pipeline: geometry, calibration, tools end to end."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_dense import fake_camvid, random_glow, save_tiny_checkpoint

from densead.combined_maps import Combination, CombinedFrameScorer, fit_inlier_stats, spread_frames
from densead.data.road import CAMVID_CLASSES, VOID, CamVid, pad_frame
from densead.dense import RoadDataConfig, RoadSource
from densead.dense_scoring import (
    MapRescale,
    detector_folder,
    evaluate_dense_run,
    frame_maps,
    score_road_dataset,
)
from densead.detectors import GlowScorer, get_detector
from densead.detectors.feature_density import (
    DenseFeatureDetector,
    FeatureDensity,
    FeatureFlowsRunConfig,
    FlowConfig,
    FlowTrainConfig,
    load_dense_detector,
    load_feature_density,
    train_feature_flows,
)
from densead.features import FrozenFeatureExtractor
from densead.frame_scorers import FeatureFrameScorer, GlowFrameScorer, StackedFrameScorer
from densead.segmenter import (
    SCENE_PROTOCOLS,
    SceneAugmentation,
    SceneDataConfig,
    SegmenterConfig,
    SegmenterRunConfig,
    SegmenterTrainConfig,
    build_segmenter,
    iter_eval_batches,
    load_scene_arrays,
    pad_to_multiple,
    scene_frames,
    train_segmenter,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_feature_detector(seed: int = 0) -> DenseFeatureDetector:
    """An untrained tiny segmenter (resnet18, 8-channel head) with perturbed, normalized flows."""
    torch.manual_seed(seed)
    segmenter = build_segmenter(SegmenterConfig(decoder_channels=8), num_classes=9).eval()
    taps = {"fuse": "fuse.1", "cls": "classifier", "logits": "classifier"}
    extractor = FrozenFeatureExtractor.from_module(segmenter, taps)
    density = FeatureDensity({n: extractor.channels[n] for n in ("fuse", "cls")}, n_steps=1, hidden=8)
    with torch.no_grad():
        for p in density.parameters():
            p.add_(0.05 * torch.randn_like(p))
    density.set_normalization({"fuse": -12.0, "cls": -20.0}, {"fuse": 3.0, "cls": 5.0})
    return DenseFeatureDetector(extractor, density)


# --------------------------------------------------------------------------- padding


def test_frames_are_mirror_padded_labels_void() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (2, 20, 30, 3), dtype=np.uint8)
    padded = pad_to_multiple(images, 16)
    assert padded.shape == (2, 32, 32, 3)
    assert np.array_equal(padded[:, :20, :30], images)
    assert np.array_equal(padded[:, 20:32, :30], images[:, 19:7:-1])  # rows mirrored about the edge
    assert np.array_equal(padded[:, :20, 30:32], images[:, :, 29:27:-1])
    assert padded.min() > 0  # no black band
    labels = rng.integers(0, 9, (2, 20, 30), dtype=np.uint8)
    plabels = pad_to_multiple(labels, 16, VOID)
    assert (plabels[:, 20:] == VOID).all() and (plabels[:, :, 30:] == VOID).all()
    assert np.array_equal(plabels[:, :20, :30], labels)
    assert np.array_equal(pad_to_multiple(images[:, :16, :16], 16), images[:, :16, :16])


@pytest.mark.parametrize("crop", [(24, 32), (0, 0)])
def test_training_augmentation_pads_image_mirrored_and_masks_void(crop: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(1, 256, (20, 30, 3), dtype=np.uint8)
    mask = rng.integers(0, 9, (20, 30), dtype=np.uint8)
    other = rng.integers(0, 3, (20, 30), dtype=np.uint8)
    cfg = SceneDataConfig(crop_height=crop[0], crop_width=crop[1], color_jitter=0.0, pad_divisor=16)
    # Both settings pad the 20×30 frame to 32 columns; crops pad the rows to 24, the divisor to 32.
    rows = crop[0] or 32
    expected_image, (expected_mask, expected_other) = pad_frame(image, [mask, other], rows, 32)
    assert np.array_equal(expected_image[20:rows, :30], image[19 : 39 - rows : -1])
    flips = 0
    for seed in range(6):
        out = SceneAugmentation(cfg, seed)(image=image, mask=mask, masks=[other])
        again = SceneAugmentation(cfg, seed)(image=image, mask=mask, masks=[other])
        assert all(np.array_equal(out[k], again[k]) for k in ("image", "mask"))  # seeded
        flipped = not np.array_equal(out["image"], expected_image)
        flips += flipped
        f = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
        assert np.array_equal(out["image"], f(expected_image))
        assert np.array_equal(out["mask"], f(expected_mask))
        assert np.array_equal(out["masks"][0], f(expected_other))
        assert (f(out["mask"])[20:] == VOID).all() and (f(out["mask"])[:, 30:] == VOID).all()
        assert (f(out["masks"][0])[:, 30:] == VOID).all()
    assert 0 < flips < 6


# --------------------------------------------------------------------------- feature maps


def test_feature_maps_are_the_detectors_maps_in_training_geometry(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=3)  # 22×30 frames
    detector = tiny_feature_detector()
    scorer = FeatureFrameScorer(detector, scale=0.5, pad_divisor=32)
    frames = [CamVid(root, "test")[i]["image"] for i in range(3)]

    # The input is exactly what the flows run evaluated on: load_scene_arrays + iter_eval_batches.
    arrays = load_scene_arrays(SceneDataConfig(root=str(root), scale=0.5), "test")
    _, x_train, _, _ = next(iter_eval_batches(arrays, 3, 32))
    x = scorer.model_input(frames)
    assert x.shape == (3, 3, 32, 32) and torch.equal(x, x_train)

    # By hand: resize (area), mirror-pad, score, cut the padding, resize back bilinearly.
    small = np.stack([cv2.resize(f, (15, 11), interpolation=cv2.INTER_AREA) for f in frames])
    padded = np.pad(small, [(0, 0), (0, 21), (0, 17), (0, 0)], mode="symmetric")
    assert np.array_equal(padded[:, 11:22, :15], small[:, ::-1])
    expected, _ = detector.score_maps(torch.from_numpy(padded).permute(0, 3, 1, 2).float() / 255.0)
    maps = scorer.maps(frames)
    assert list(maps) == list(detector.names)
    for name, m in maps.items():
        assert m.shape == (3, 22, 30) and m.dtype == np.float32, name
        by_hand = F.interpolate(
            expected[name][:, None, :11, :15], size=(22, 30), mode="bilinear", align_corners=False
        )[:, 0]
        np.testing.assert_allclose(m, by_hand.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
    # The padding is cut before resizing back: stretching the padded map would differ.
    stretched = F.interpolate(
        expected["density_cls"][:, None], size=(22, 30), mode="bilinear", align_corners=False
    )[:, 0]
    assert not np.allclose(maps["density_cls"], stretched.numpy(), atol=1e-3)

    # At scale 1 on a frame of a whole number of 32s there is nothing to resize, pad or cut.
    big = np.random.default_rng(0).integers(0, 256, (2, 64, 32, 3), dtype=np.uint8)
    direct, _ = detector.score_maps(torch.from_numpy(big).permute(0, 3, 1, 2).float() / 255.0)
    one = FeatureFrameScorer(detector, 1.0, 32, names=["msp", "density_fuse"]).maps(list(big))
    assert list(one) == ["msp", "density_fuse"]
    assert np.array_equal(one["msp"], direct["msp"].numpy())
    with pytest.raises(ValueError, match=r"unknown feature detector\(s\) \['ratio'\]; valid: density_fuse"):
        FeatureFrameScorer(detector, 1.0, 32, names=["ratio"])


# --------------------------------------------------------------------------- combinations


class PixelScorer:
    """A fake producer whose maps depend on each pixel alone, so label masking is exact."""

    names = ("red", "bright", "flat")

    def maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack(images).astype(np.float32)
        red, bright = x[..., 0] / 255.0, (x.sum(-1) / 100.0) ** 2
        return {"red": red, "bright": bright, "flat": np.ones_like(red)}

    def describe(self) -> dict[str, Any]:
        return {}


class Frames:
    """A road dataset held in memory."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
        self.items = [
            {"name": f"m{i}", "image": im, "label": lab}
            for i, (im, lab) in enumerate(zip(images, labels, strict=True))
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def test_combination_is_the_mean_of_inlier_standardized_components(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=3, split="train")
    camvid = CamVid(root, "train")
    items = [camvid[i] for i in range(3)]
    images, labels = [it["image"] for it in items], [it["label"] for it in items]
    stats = fit_inlier_stats(PixelScorer(), Frames(images, labels), ["red", "bright"], batch_size=2)
    # By hand: all inlier pixels of all frames pooled, population std.
    maps = PixelScorer().maps(images)
    inlier = np.stack(labels) == 0
    assert 0 < inlier.sum() < inlier.size and stats.frames == ("m0", "m1", "m2")
    for name in ("red", "bright"):
        values = maps[name][inlier].astype(np.float64)
        assert stats.count[name] == values.size
        assert stats.mean[name] == pytest.approx(values.mean(), rel=1e-12)
        assert stats.std[name] == pytest.approx(values.std(), rel=1e-9)
    # Values planted on anomaly and void pixels change nothing.
    wild = [
        np.where((lab != 0)[..., None], 255, im).astype(np.uint8)
        for im, lab in zip(images, labels, strict=True)
    ]
    assert not np.array_equal(np.stack(wild), np.stack(images))
    assert fit_inlier_stats(PixelScorer(), Frames(wild, labels), ["red", "bright"]) == stats
    # ... but the same values on inlier pixels do.
    assert (
        fit_inlier_stats(PixelScorer(), Frames(wild, [np.zeros_like(lab) for lab in labels]), ["red"])
        != stats
    )

    combo = Combination.parse("red+bright")
    assert combo.name == "combo:red+bright" and Combination.parse("combo:red+bright") == combo
    scorer = CombinedFrameScorer(PixelScorer(), [combo], stats, keep=["bright"])
    out = scorer.maps(images[:2])
    assert list(out) == list(scorer.names) == ["bright", "combo:red+bright"]
    z_red = (maps["red"][:2].astype(np.float64) - stats.mean["red"]) / stats.std["red"]
    z_bright = (maps["bright"][:2].astype(np.float64) - stats.mean["bright"]) / stats.std["bright"]
    np.testing.assert_allclose(out["combo:red+bright"], (z_red + z_bright) / 2, rtol=1e-5, atol=1e-5)
    # Standardized on inliers, the combination has mean 0 over them.
    assert abs(float(scorer.combine(maps, combo)[inlier].mean())) < 1e-4
    # A component's sentinel is the combination's, "+1e12" before "−1e12", not averaged in.
    marked = {name: m[:1].astype(np.float64) for name, m in maps.items()}
    marked["red"][0, 0, :3] = (1e12, -1e12, 1e12)
    marked["bright"][0, 0, :3] = (-1e12, -1e12, 0.0)
    combined = scorer.combine(marked, combo)
    assert combined.dtype == np.float32
    np.testing.assert_array_equal(combined[0, 0, :3], np.array([1e12, -1e12, 1e12], dtype=np.float32))
    assert np.abs(combined[0, 1:]).max() < 1e3

    with pytest.raises(
        ValueError, match=r"combo:red\+blue: unknown component 'blue'; valid: red, bright, flat"
    ):
        CombinedFrameScorer(PixelScorer(), [Combination.parse("red+blue")], stats)
    with pytest.raises(ValueError, match="'flat' is constant"):
        fit_inlier_stats(PixelScorer(), Frames(images, labels), ["flat"])
    with pytest.raises(ValueError, match="two or more"):
        Combination.parse("red")
    with pytest.raises(ValueError, match="no label"):
        fit_inlier_stats(PixelScorer(), Frames(images, [None] * 3), ["red"])


def test_spread_frames_covers_the_split(tmp_path: Path) -> None:
    dataset = CamVid(fake_camvid(tmp_path / "camvid", n=5, split="train"), "train")
    assert spread_frames(dataset, 3).names == ["f0", "f2", "f4"]
    assert dataset.names == ["f0", "f1", "f2", "f3", "f4"]  # the original is untouched
    assert spread_frames(dataset, 0) is dataset


def _relabel(root: Path, split: str, value: int) -> None:
    """Overwrite every label of ``split`` with one CamVid class id."""
    for path in (root / f"{split}annot").glob("*.png"):
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert cv2.imwrite(str(path), np.full_like(label, value))


def test_road_combination_calibrates_on_the_train_split_only(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=3, split="test")
    fake_camvid(root, n=4, split="train")
    ckpt, general = save_tiny_checkpoint(tmp_path / "in.pt", 11), save_tiny_checkpoint(tmp_path / "g.pt", 12)
    source = RoadSource("camvid", str(root), "test")

    def score(out: str, **kwargs: Any) -> dict[str, Any]:
        kw = {"general": general, "combine": ["raw+ratio"], "progress": False, **kwargs}
        score_road_dataset(source, ckpt, tmp_path / out, ["raw"], **kw)
        return json.loads((tmp_path / out / "run.json").read_text())

    run = score("a", calibration_frames=3)
    assert run["detectors"] == ["raw", "combo:raw+ratio"] and run["combine"] == {
        "combo:raw+ratio": ["raw", "ratio"]
    }
    assert run["calibration"]["frames"] == ["f0", "f2", "f3"]  # spread over the 4 train frames
    assert run["calibration_source"]["split"] == "train" and run["downscale"] == 1
    assert not (tmp_path / "a" / "maps" / "ratio").exists()  # a component, not asked for

    # The written combination is the standardized mean of frame_maps, rescaled like any map.
    mean, std = run["calibration"]["mean"], run["calibration"]["std"]
    glow = GlowScorer(random_glow(11).float(), random_glow(12).float())
    rescale = MapRescale.load(tmp_path / "a" / "rescale.json")
    for i, name in enumerate(run["frames"]):
        m = frame_maps(glow, [CamVid(root, "test")[i]["image"]], [get_detector("raw"), get_detector("ratio")])
        combo = (
            (m["raw"][0] - mean["raw"]) / std["raw"] + (m["ratio"][0] - mean["ratio"]) / std["ratio"]
        ) / 2
        written = np.load(tmp_path / "a" / "maps" / "combo-raw+ratio" / f"{name}.npy")
        assert np.abs(written.astype(np.float64) - rescale.apply("combo:raw+ratio", combo)).max() <= 1e-3
    # Folder names hold no ':' (Windows); a run written with the former combo:<a>+<b> folders
    # still evaluates, to the same numbers.
    for folder in ("maps", "overlays"):
        assert sorted(p.name for p in (tmp_path / "a" / folder).iterdir()) == ["combo-raw+ratio", "raw"]
    rows = evaluate_dense_run(tmp_path / "a")
    assert [r.detector for r in rows] == ["raw", "combo:raw+ratio"]
    (tmp_path / "a" / "maps" / "combo-raw+ratio").rename(tmp_path / "a" / "maps" / "combo:raw+ratio")
    assert evaluate_dense_run(tmp_path / "a") == rows
    # Test labels never reach the constants; train labels do.
    _relabel(root, "test", 9)  # every test pixel a Pedestrian (anomaly)
    assert score("b", calibration_frames=3)["calibration"] == run["calibration"]
    _relabel(root, "train", 9)  # every train pixel an anomaly: nothing left to calibrate on
    with pytest.raises(ValueError, match="no finite inlier pixel"):
        score("c", calibration_frames=3)


def test_road_scoring_errors_name_the_problem(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=2, split="test")
    ckpt = save_tiny_checkpoint(tmp_path / "in.pt", 11)
    source = RoadSource("camvid", str(root), "test")
    cases = [
        ({"combine": ["raw+bogus"]}, "unknown detector 'bogus'; valid: Glow detectors raw, ratio"),
        (
            {"combine": ["raw+last_scale"], "calibration": source},
            r"calibration set camvid_test holds 2 frame\(s\) of the set under test camvid_test \(e.g. f0\)",
        ),
        (
            {"detectors": ["density_cls"]},
            r"density_mean, density_min, msp, max_logit, entropy, energy, sml \(need feature_flows",
        ),
        ({"detectors": ["raw"], "checkpoint": None}, r"\['raw'\] need a Glow checkpoint"),
    ]
    for kwargs, message in cases:
        kw = {"checkpoint": ckpt, "detectors": ["raw"], "progress": False, **kwargs}
        with pytest.raises(ValueError, match=message):
            score_road_dataset(source, kw.pop("checkpoint"), tmp_path / "out", kw.pop("detectors"), **kw)
        assert not (tmp_path / "out").exists()


def test_stacked_scorer_mixes_producers() -> None:
    glow = GlowFrameScorer(GlowScorer(random_glow(1).float()), [get_detector("raw")])
    stacked = StackedFrameScorer([glow, PixelScorer()], ["red", "raw"])
    frame = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    maps = stacked.maps([frame])
    assert list(maps) == ["red", "raw"] and maps["raw"].shape == (1, 16, 24)
    assert np.array_equal(maps["raw"], glow.maps([frame])["raw"])
    with pytest.raises(ValueError, match=r"\['raw'\] come from more than one"):
        StackedFrameScorer([glow, glow])


# --------------------------------------------------------------------------- the tools


def run_tool(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if ok and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_tools_feature_glow_and_combined_maps(tmp_path: Path, shared_data: Path) -> None:
    """Tiny segmenter and flows trained for two steps, a random Glow, 2 CamVid test frames scored."""
    camvid = shared_data / "camvid"
    data = SceneDataConfig(root=str(camvid), scale=0.25, max_frames=3, crop_height=64, crop_width=96)
    seg_cfg = SegmenterRunConfig(
        str(tmp_path / "seg"),
        data,
        SegmenterConfig(decoder_channels=8),
        SegmenterTrainConfig(steps=2, batch_size=2, log_every=1, num_threads=1),
    )
    seg_path, _ = train_segmenter(seg_cfg, progress=False)
    flows_cfg = FeatureFlowsRunConfig(
        output_dir=str(tmp_path / "flows"),
        segmenter=str(seg_path),
        taps={"fuse": "fuse.1", "cls": "classifier"},
        data=SceneDataConfig(root=str(camvid), scale=0.25, max_frames=3, crop_height=0, crop_width=0),
        flow=FlowConfig(n_steps=1, hidden=8),
        train=FlowTrainConfig(steps=2, batch_size=2, max_pixels=64, log_every=1, num_threads=1),
    )
    flows = train_feature_flows(flows_cfg, progress=False)
    glow, general = save_tiny_checkpoint(tmp_path / "glow.pt", 3), save_tiny_checkpoint(tmp_path / "g.pt", 4)
    common = [
        "--road",
        "camvid",
        "--root",
        str(camvid),
        "--split",
        "test",
        "--max-frames",
        "2",
        "--no-progress",
    ]

    out = tmp_path / "scores"
    run_tool(
        "tools/score_images.py", *common, "--feature-flows", str(flows), "--checkpoint", str(glow),
        "--general", str(general), "--downscale", "4", "--detector", "density_cls,msp,ratio",
        "--combine", "density_cls+ratio,density_mean+last_scale", "--calibration-frames", "2",
        "--out", str(out),
    )  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    combos = ["combo:density_cls+ratio", "combo:density_mean+last_scale"]
    assert run["detectors"] == ["density_cls", "msp", "ratio", *combos]
    assert run["feature_scale"] == 0.25 and run["downscale"] == 4
    assert run["training_frames_scored"] == 0
    train_names, test_names = CamVid(camvid, "train").names, CamVid(camvid, "test").names
    assert len(run["calibration"]["frames"]) == 2 and set(run["calibration"]["frames"]) <= set(train_names)
    assert not set(run["calibration"]["frames"]) & set(test_names)
    assert set(run["calibration"]["mean"]) == {"density_cls", "ratio", "density_mean", "last_scale"}
    for det in run["detectors"]:
        m = np.load(out / "maps" / detector_folder(det) / f"{run['frames'][0]}.npy")
        assert m.dtype == np.float16 and m.shape == (360, 480) and 0 <= m.min() <= m.max() <= 1, det
        assert (out / "overlays" / detector_folder(det) / f"{run['frames'][0]}.png").stat().st_size > 0, det

    proc = run_tool("tools/evaluate.py", "--pixel", str(out), "--out", str(tmp_path / "eval"),
                    "--mode", "exact", "--by-class", "--components", "--min-segment-size", "20",
                    "--min-instance-size", "10", "--no-progress")  # fmt: skip
    assert "| combo:density_cls+ratio |" in proc.stdout
    with (tmp_path / "eval" / "pixel_metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["detector"] for r in rows] == run["detectors"]
    assert all(0 <= float(r["auroc"]) <= 1 and int(r["n_anomaly"]) > 0 for r in rows)
    # --by-class: the classes' flagged pixels add up to each detector's FPR95 (exact mode).
    with (tmp_path / "eval" / "pixel_fp_by_class.csv").open() as f:
        by_class = list(csv.DictReader(f))
    assert "inlier pixels flagged at 95 % TPR, per class" in proc.stdout
    for r in rows:
        sub = [c for c in by_class if c["detector"] == r["detector"]]
        assert {c["class_name"] for c in sub} <= set(CAMVID_CLASSES) - {
            "Pedestrian",
            "Bicyclist",
            "Unlabelled",
        }
        flagged, inliers = sum(int(c["n_flagged"]) for c in sub), sum(int(c["n_inlier"]) for c in sub)
        assert inliers == int(r["n_pixels"]) - int(r["n_anomaly"])
        assert flagged / inliers == pytest.approx(float(r["fpr95"]), abs=1e-12), r["detector"]
    # --components: every detector, the same anomaly instances (labels and size limit are shared)
    with (tmp_path / "eval" / "component_metrics.csv").open() as f:
        components = list(csv.DictReader(f))
    assert [c["detector"] for c in components] == run["detectors"]
    assert len({c["n_instances"] for c in components}) == 1 and int(components[0]["n_instances"]) > 0
    for c in components:
        assert 0 < float(c["pixel_f1"]) <= 1 and 0 <= float(c["siou"]) <= 1 and 0 <= float(c["f1_mean"]) <= 1
        assert 0 <= float(c["threshold"]) <= 1 and int(c["min_segment_size"]) == 20, c
    assert "components (" in proc.stdout and "| mean F1 |" in proc.stdout

    # Feature detectors alone need no Glow; a Glow detector without --checkpoint is a usage error.
    density, _ = load_feature_density(flows)
    assert density.names == ("fuse", "cls")
    only = tmp_path / "only"
    run_tool("tools/score_images.py", *common, "--feature-flows", str(flows), "--detector", "entropy,sml",
             "--no-overlays", "--out", str(only))  # fmt: skip
    assert json.loads((only / "run.json").read_text())["detectors"] == ["entropy", "sml"]
    assert not (only / "overlays").exists()
    # A flows checkpoint from before the sml statistics scores everything else; sml is refused by name.
    ckpt = torch.load(flows, map_location="cpu", weights_only=True)
    assert ckpt["max_logit_stats"]["count"].shape == (9,)
    wrong = {k: v[:8] for k, v in ckpt["max_logit_stats"].items()}  # statistics of another segmenter
    torch.save({**ckpt, "max_logit_stats": wrong}, tmp_path / "wrong_flows.pt")
    with pytest.raises(
        ValueError, match=r"wrong_flows.pt: max_logit_stats holds 8 classes, segmenter .* has 9"
    ):
        load_dense_detector(tmp_path / "wrong_flows.pt")
    del ckpt["max_logit_stats"]
    torch.save(ckpt, tmp_path / "old_flows.pt")
    old_detector, _ = load_dense_detector(tmp_path / "old_flows.pt")
    assert old_detector.names == tuple(n for n in load_dense_detector(flows)[0].names if n != "sml")
    proc = run_tool("tools/score_images.py", *common, "--feature-flows", str(tmp_path / "old_flows.pt"),
                    "--detector", "entropy,sml", "--out", str(tmp_path / "old"), ok=False)  # fmt: skip
    assert (
        proc.returncode == 2 and "unknown detector 'sml' (sml needs the max-logit statistics" in proc.stderr
    )
    assert not (tmp_path / "old").exists()
    # --protocol sequences: Seq05VD frames under test, calibration on the training drives.
    seq = tmp_path / "seq"
    run_tool("tools/score_images.py", *common, "--protocol", "sequences", "--feature-flows", str(flows),
             "--detector", "entropy", "--combine", "density_cls+msp", "--calibration-frames", "2",
             "--no-overlays", "--out", str(seq))  # fmt: skip
    run = json.loads((seq / "run.json").read_text())
    assert run["set_name"] == "camvid_sequences_test" and run["source"]["protocol"] == "sequences"
    assert len(run["frames"]) == 2 and all(f.startswith("Seq05VD_") for f in run["frames"])
    assert run["calibration_source"]["protocol"] == "sequences"
    assert {f.split("_")[0] for f in run["calibration"]["frames"]} <= {"0006R0", "0016E5"}
    assert run["training_frames_scored"] == 0
    # Frames the flows were trained on (their config's train role: the first 3 train frames)
    # can be scored, with a warning and the count in run.json.
    seen = tmp_path / "seen"
    args = [a if a != "test" else "train" for a in common]
    proc = run_tool("tools/score_images.py", *args, "--feature-flows", str(flows), "--detector", "entropy",
                    "--no-overlays", "--out", str(seen))  # fmt: skip
    first = CamVid(camvid, "train").names[0]
    assert f"2 of the 2 frames of camvid_train (e.g. {first}) are training frames of the feature flows" in (
        proc.stderr
    )
    assert json.loads((seen / "run.json").read_text())["training_frames_scored"] == 2
    proc = run_tool("tools/score_images.py", *common, "--feature-flows", str(flows), "--detector",
                    "entropy,last_scale", "--out", str(tmp_path / "bad"), ok=False)  # fmt: skip
    assert proc.returncode == 2 and re.search(r"\['last_scale'\] need a Glow checkpoint", proc.stderr)
    assert not (tmp_path / "bad").exists()
    # The research script of docs/results_camvid_features.md runs on such a flows folder.
    proc = run_tool(
        "experiments/camvid_density_resolution.py", str(flows.parent), "--set", "data.max_frames=2"
    )
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|", proc.stdout, flags=re.M))
    assert list(rows) == ["density_cls", "density_cls_full", "msp", "msp_grid", "entropy"]
    assert all(0 <= float(v) <= 100 for v in rows.values())


def test_sequence_protocol_holds_out_whole_drives(shared_data: Path) -> None:
    """``data.protocol: sequences`` on the real CamVid: train on 0006R0 + 0016E5 (train and val
    files), select on 0001TP (train and test files), test on Seq05VD; no frame in two roles, every
    frame of the three split files in exactly one role; ``splits`` keeps CamVid's own files."""
    root = str(shared_data / "camvid")
    standard = {role: scene_frames(SceneDataConfig(root=root), role) for role in ("train", "val", "test")}
    assert {role: len(f) for role, f in standard.items()} == {"train": 367, "val": 101, "test": 233}
    cfg = SceneDataConfig(root=root, protocol="sequences")
    roles = {
        role: [ds.frames[i].name for ds, i in scene_frames(cfg, role)]
        for role in SCENE_PROTOCOLS["sequences"]
    }
    drives = {role: {name.split("_")[0] for name in names} for role, names in roles.items()}
    assert drives == {"train": {"0006R0", "0016E5"}, "val": {"0001TP"}, "test": {"Seq05VD"}}
    everything = [ds.frames[i].name for frames in standard.values() for ds, i in frames]
    assert sorted(n for names in roles.values() for n in names) == sorted(everything)
    assert {role: len(names) for role, names in roles.items()} == {"train": 406, "val": 124, "test": 171}
    arrays = load_scene_arrays(
        SceneDataConfig(root=root, protocol="sequences", max_frames=2, scale=0.25), "val"
    )
    assert arrays.names == tuple(roles["val"][:2]) and arrays.images.shape == (2, 90, 120, 3)


def test_road_sources_under_the_sequence_protocol(tmp_path: Path, shared_data: Path) -> None:
    """The dense pipeline's sources take the protocol too; calibration frames that overlap the
    frames under test are refused whatever the protocols (0001TP is in CamVid's train and test)."""
    root = str(shared_data / "camvid")
    source = RoadSource("camvid", root, "val", protocol="sequences")
    assert source.name == "camvid_sequences_val" and RoadSource("camvid", root, "val").name == "camvid_val"
    dataset = source.open()
    assert len(dataset) == 124 and {n.split("_")[0] for n in dataset.names} == {"0001TP"}
    assert RoadSource("camvid", root, "val", protocol="splits").name == "camvid_val"
    assert RoadSource("folder", root, "val", protocol="sequences").name == "folder"
    # the road Glow's training data (densead.dense) takes it too
    road = RoadDataConfig(root=root, split="train", protocol="sequences").source()
    assert road.name == "camvid_sequences_train" and len(road.open()) == 406
    ckpt = save_tiny_checkpoint(tmp_path / "in.pt", 11)
    for calibration, n in (
        (RoadSource("camvid", root, "train"), 62),
        (RoadSource("camvid", root, "test"), 62),
    ):
        with pytest.raises(
            ValueError, match=rf"{calibration.name} holds {n} frame\(s\) of the set under test "
        ):
            score_road_dataset(source, ckpt, tmp_path / "out", ["raw"], combine=["raw+last_scale"],
                               calibration=calibration, progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown CamVid sequences split 'holdout'; valid: train, val, test"):
        RoadSource("camvid", root, "holdout", protocol="sequences").open()
    with pytest.raises(ValueError, match="unknown CamVid protocol 'drives'; valid: splits, sequences"):
        CamVid(root, "test", protocol="drives")


def test_unknown_protocol_or_missing_drives_is_an_error(tmp_path: Path) -> None:
    root = fake_camvid(tmp_path / "camvid", n=2)  # frames f0, f1: no CamVid drive names
    with pytest.raises(ValueError, match="data.protocol: unknown 'drives'"):
        scene_frames(SceneDataConfig(root=str(root), protocol="drives"), "test")
    with pytest.raises(ValueError, match=r"camvid: no frames of drives Seq05VD in split\(s\) test"):
        scene_frames(SceneDataConfig(root=str(root), protocol="sequences"), "test")
    with pytest.raises(ValueError, match="unknown CamVid sequences split 'holdout'"):
        scene_frames(SceneDataConfig(root=str(root), protocol="sequences"), "holdout")
