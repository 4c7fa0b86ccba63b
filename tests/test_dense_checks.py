"""Up-front checks of the dense pipeline: segmenter, feature flows and road Glow runs refuse bad
input (config ranges, splits, frames, labels, mismatched checkpoints) before they spend time training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from test_dense import TINY, fake_camvid

import densead.detectors.feature_density as fd
import densead.segmenter as seg
from densead.config import ConfigError, DataConfig, TrainConfig, load_config, to_dict
from densead.dense import GeneralImagesConfig, RoadDataConfig, RoadSource, RoadTrainConfig, train_road_glow
from densead.dense_scoring import score_road_dataset
from densead.detectors.feature_density import (
    FeatureFlowsRunConfig,
    FlowConfig,
    FlowTrainConfig,
    evaluate_run,
    load_dense_detector,
    train_feature_flows,
)
from densead.io import atomic_torch_save
from densead.segmenter import (
    SceneDataConfig,
    SegmenterConfig,
    SegmenterRunConfig,
    SegmenterTrainConfig,
    build_segmenter,
    load_scene_arrays,
    load_segmenter,
    train_segmenter,
)
from densead.train import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def camvid(root: Path, n: int = 2) -> Path:
    """Train and test splits of ``n`` random 22×30 frames (inliers, Pedestrians, void)."""
    for split in ("train", "test"):
        fake_camvid(root, n, split)
    return root


def save_segmenter(path: Path, root: Path, seed: int) -> Path:
    """An untrained tiny segmenter, saved as train_segmenter does."""
    torch.manual_seed(seed)
    cfg = SegmenterRunConfig(
        str(path.parent), SceneDataConfig(root=str(root), scale=1.0), SegmenterConfig(decoder_channels=8)
    )
    model = build_segmenter(cfg.model, 9)
    atomic_torch_save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


def flows_config(tmp_path: Path, root: Path, segmenter: Path, **changes: object) -> FeatureFlowsRunConfig:
    cfg = FeatureFlowsRunConfig(
        output_dir=str(tmp_path / "flows"),
        segmenter=str(segmenter),
        taps={"fuse": "fuse.1"},
        data=SceneDataConfig(root=str(root), scale=1.0, crop_height=0, crop_width=0, color_jitter=0.0),
        flow=FlowConfig(n_steps=1, hidden=8),
        train=FlowTrainConfig(steps=1, batch_size=2, max_pixels=32, log_every=1),
        eval=fd.DenseEvalConfig(metrics_mode="exact"),
    )
    return replace(cfg, **changes)


def segmenter_config(tmp_path: Path, root: Path, **train: object) -> SegmenterRunConfig:
    return SegmenterRunConfig(
        str(tmp_path / "seg"),
        SceneDataConfig(root=str(root), scale=1.0, crop_height=16, crop_width=16),
        SegmenterConfig(decoder_channels=8),
        SegmenterTrainConfig(**{"steps": 1, "batch_size": 2, "log_every": 1, **train}),
    )


def no_training(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    """Make ``module.name`` (a first step of training) fail loudly: a check must come before it."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started before the check")

    monkeypatch.setattr(module, name, boom)


# --------------------------------------------------------------------------- 1. segmenter fingerprint


def test_flows_refuse_a_segmenter_with_other_weights(tmp_path: Path) -> None:
    root = camvid(tmp_path / "camvid")
    seg_a = save_segmenter(tmp_path / "a" / "checkpoint.pt", root, seed=1)
    seg_b = save_segmenter(tmp_path / "b" / "checkpoint.pt", root, seed=2)
    flows = train_feature_flows(flows_config(tmp_path, root, seg_a), progress=False)
    assert isinstance(torch.load(flows, weights_only=True)["segmenter_sha256"], str)
    load_dense_detector(flows)  # the segmenter it was trained on

    # --set segmenter=OTHER: same architecture, other weights.
    other = flows_config(tmp_path, root, seg_b)
    with pytest.raises(
        ValueError, match=r"feature_flows\.pt: the flows were trained on .*a/checkpoint\.pt"
    ) as e:
        load_dense_detector(flows, other)
    assert "b/checkpoint.pt holds other weights" in str(e.value)

    # The file at the recorded path replaced by another segmenter.
    seg_a.write_bytes(seg_b.read_bytes())
    with pytest.raises(ValueError, match="holds other weights"):
        load_dense_detector(flows)

    # Old checkpoints, without the fingerprint, still load (nothing to check against).
    ckpt = torch.load(flows, weights_only=True)
    del ckpt["segmenter_sha256"]
    torch.save(ckpt, tmp_path / "old.pt")
    detector, _ = load_dense_detector(tmp_path / "old.pt")
    assert detector.density.names == ("fuse",)


def test_a_moved_run_finds_its_segmenter_by_flag_with_its_weights_checked(tmp_path: Path) -> None:
    root = camvid(tmp_path / "camvid")
    seg_a = save_segmenter(tmp_path / "a" / "checkpoint.pt", root, seed=1)
    seg_b = save_segmenter(tmp_path / "b" / "checkpoint.pt", root, seed=2)
    flows = train_feature_flows(flows_config(tmp_path, root, seg_a), progress=False)
    moved = tmp_path / "moved" / "checkpoint.pt"
    moved.parent.mkdir()
    seg_a.rename(moved)  # the run moved: the stored path is gone
    with pytest.raises(
        FileNotFoundError, match=r"feature_flows\.pt: its segmenter .*a/checkpoint\.pt is not found"
    ):
        load_dense_detector(flows)
    detector, cfg = load_dense_detector(flows, segmenter=moved)
    assert cfg.segmenter == str(moved) and detector.density.names == ("fuse",)
    with pytest.raises(ValueError, match="holds other weights"):
        load_dense_detector(flows, segmenter=seg_b)


def test_flows_trained_from_relative_paths_find_their_files_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = camvid(tmp_path / "camvid")
    seg = save_segmenter(tmp_path / "a" / "checkpoint.pt", root, seed=1)
    monkeypatch.chdir(tmp_path)
    flows = train_feature_flows(
        flows_config(tmp_path, Path("camvid"), Path("a/checkpoint.pt")), progress=False
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    detector, cfg = load_dense_detector(flows)  # its segmenter, named from where it was trained
    assert cfg.segmenter == str(seg) and cfg.data.root == str(root)
    source = RoadSource("camvid", str(root), "train")  # the frames the flows were trained on
    with pytest.warns(UserWarning, match="2 of the 2 frames of camvid_train .* are training frames"):
        score_road_dataset(source, None, tmp_path / "s", ["entropy"], feature_flows=flows, progress=False)
    # A checkpoint of densead before it stored them absolute: the relative root cannot be found
    # from here, which is said, not passed over.
    ckpt = torch.load(flows, weights_only=True)
    ckpt["config"]["data"]["root"] = "camvid"
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.warns(
        UserWarning, match=r"cannot tell which frames of camvid_train .*: their training frames: .*camvid"
    ):
        score_road_dataset(
            source, None, tmp_path / "o", ["entropy"], feature_flows=tmp_path / "old.pt", progress=False
        )
    assert json.loads((tmp_path / "o" / "run.json").read_text())["training_frames_scored"] is None


# --------------------------------------------------------------------------- 2. road Glow resume


def road_config(out: Path, root: Path, steps: int, **data: object) -> RoadTrainConfig:
    dcfg = RoadDataConfig(root=str(root), crop_height=16, crop_width=16, **data)
    return RoadTrainConfig(str(out), dcfg, TINY, TrainConfig(steps=steps, batch_size=2, log_every=1))


def test_resume_refuses_another_data_protocol(tmp_path: Path) -> None:
    root = camvid(tmp_path / "camvid")
    out = tmp_path / "glow"
    train_road_glow(road_config(out, root, 1), progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    changed = road_config(out, root, 2, held_out=("Pedestrian",), void=("Unlabelled", "Bicyclist"))
    with pytest.raises(ValueError, match=r"cannot resume.*data\.held_out.*data\.void") as e:
        train_road_glow(changed, resume=True, progress=False)
    assert "'Bicyclist'" in str(e.value) and str(out / "checkpoint.pt") in str(e.value)
    with pytest.raises(ValueError, match=r"data\.split \('train' in the checkpoint, 'test' now\)"):
        train_road_glow(road_config(out, root, 2, split="test"), resume=True, progress=False)
    # Other settings of the recipe are refused too (a model of two recipes), after the protocol.
    cropped = replace(road_config(out, root, 2), data=replace(road_config(out, root, 2).data, crop_width=8))
    with pytest.raises(ValueError, match=r"other settings: data\.crop_width \(16 in the checkpoint, 8 now\)"):
        train_road_glow(cropped, resume=True, progress=False)
    with pytest.raises(FileExistsError, match=r"--resume.*--overwrite"):
        train_road_glow(road_config(out, root, 2), progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing continued
    # More steps may (and where it runs, logs and saves).
    resumed = road_config(out, root, 2)
    resumed = replace(resumed, train=replace(resumed.train, device="cpu", log_every=2, checkpoint_every=1))
    load = load_checkpoint(train_road_glow(resumed, resume=True, progress=False))
    assert load["step"] == 2 and load["finished"]


def test_road_resume_compares_data_files_as_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = camvid(tmp_path / "camvid")
    photos = tmp_path / "photos.npz"
    np.savez(photos, images=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "glow"
    first = road_config(out, root, 1)
    first = replace(first, general_images=GeneralImagesConfig(DataConfig(source="npz", path=str(photos))))
    train_road_glow(first, progress=False)

    # The same photos and frames spelled relative to another working directory, and download: resumed.
    monkeypatch.chdir(tmp_path)
    same = replace(
        road_config(out, Path("camvid"), 2),
        general_images=GeneralImagesConfig(DataConfig(source="npz", path="photos.npz", download=True)),
    )
    assert load_checkpoint(train_road_glow(same, resume=True, progress=False))["step"] == 2
    # Other photos are another protocol (they train the general model), named leaf by leaf.
    other = tmp_path / "other.npz"
    other.write_bytes(photos.read_bytes())
    elsewhere = replace(same, general_images=GeneralImagesConfig(DataConfig(source="npz", path=str(other))))
    with pytest.raises(
        ValueError,
        match=r"another data protocol: general_images\.data\.path \('/.*/photos\.npz' in the checkpoint",
    ):
        train_road_glow(
            replace(elsewhere, train=replace(elsewhere.train, steps=3)), resume=True, progress=False
        )
    # Frames moved (the stored folder is gone): resumed from the new place.
    root.rename(tmp_path / "moved")
    moved = replace(same, data=replace(same.data, root=str(tmp_path / "moved")))
    assert (
        load_checkpoint(train_road_glow(replace(moved, train=replace(moved.train, steps=3)), resume=True))[
            "step"
        ]
        == 3
    )


# --------------------------------------------------------------------------- 3. checks before training


def test_segmenter_training_checks_split_output_and_frames_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = camvid(tmp_path / "camvid")
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"output_dir": str(tmp_path / "s"), "train": {"eval_split": "tst"}})
    )
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.eval_split: unknown split 'tst'; valid: train"):
        load_config(SegmenterRunConfig, tmp_path / "c.yaml")

    no_training(monkeypatch, seg, "epoch_batches")
    (tmp_path / "afile").write_text("x")
    cfg = replace(segmenter_config(tmp_path, root), output_dir=str(tmp_path / "afile"))
    with pytest.raises(ValueError, match=r"output_dir: .*afile exists and is not a folder"):
        train_segmenter(cfg, progress=False)

    # A test frame of another size: named with its size, before training.
    odd = root / "test" / "f1.png"
    cv2.imwrite(str(odd), np.zeros((20, 30, 3), np.uint8))
    cv2.imwrite(str(root / "testannot" / "f1_L.png"), np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match=r"f1\.png: frame is 30x20 \(WxH\) but .*f0\.png is 30x22 \(WxH\)"):
        train_segmenter(segmenter_config(tmp_path, root), progress=False)


def test_padding_that_is_not_a_multiple_of_the_segmenters_stride_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames padded to a multiple of the deepest level's stride map it onto whole cells; any other
    padding is refused, naming the key, the stride and the segmenter, when a segmenter or flows
    train (evaluation then refuses padding other than the training one)."""
    for out_indices, stride in (((1, 2, 3, 4), 32), ((1, 2, 3), 16)):
        model = build_segmenter(SegmenterConfig(out_indices=out_indices, decoder_channels=8), 9)
        assert model.stride == stride
        deepest = model.backbone(torch.zeros(1, 3, 3 * stride, 2 * stride))[-1]
        assert deepest.shape[-2:] == (3, 2), "the stride the check uses is the deepest level's"
        seg.check_pad_divisor(stride, model, "m")
        seg.check_pad_divisor(3 * stride, model, "m")
        with pytest.raises(
            ValueError, match=rf"data\.pad_divisor: {stride // 2} is not a multiple of .* m \({stride}\)"
        ):
            seg.check_pad_divisor(stride // 2, model, "m")

    root = camvid(tmp_path / "camvid")
    no_training(monkeypatch, seg, "epoch_batches")
    cfg = segmenter_config(tmp_path, root)
    with pytest.raises(
        ValueError,
        match=r"data\.pad_divisor: 16 is not a multiple of the largest stride of model\.backbone resnet18 at "
        r"out_indices \[1, 2, 3, 4\] \(32\)",
    ):
        train_segmenter(replace(cfg, data=replace(cfg.data, pad_divisor=16)), progress=False)
    segmenter = save_segmenter(tmp_path / "s" / "checkpoint.pt", root, seed=1)
    flows = flows_config(tmp_path, root, segmenter)
    no_training(monkeypatch, fd, "segmenter_fingerprint")
    with pytest.raises(
        ValueError, match=r"data\.pad_divisor: 48 is not a multiple of .*segmenter .*checkpoint\.pt \(32\)"
    ):
        train_feature_flows(replace(flows, data=replace(flows.data, pad_divisor=48)), progress=False)


def test_segmenter_checkpoint_is_written_before_the_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = camvid(tmp_path / "camvid")
    no_training(monkeypatch, seg, "evaluate_segmenter")
    with pytest.raises(AssertionError):
        train_segmenter(segmenter_config(tmp_path, root), progress=False)
    model, cfg = load_segmenter(tmp_path / "seg" / "checkpoint.pt")
    assert model.num_classes == 9 and cfg.train.steps == 1


# --------------------------------------------------------------------------- 4. config ranges


@pytest.mark.parametrize(
    ("cls", "key", "value", "message"),
    [
        (SegmenterRunConfig, "data.pad_divisor", 0, "must be >= 1, got 0"),
        (SegmenterRunConfig, "data.scale", 0, "must be > 0, got 0"),
        (SegmenterRunConfig, "train.batch_size", 0, "must be >= 1, got 0"),
        (SegmenterRunConfig, "train.log_every", 0, "must be >= 1, got 0"),
        (SegmenterRunConfig, "model.out_indices", [], "needs at least one backbone level"),
        (
            SegmenterRunConfig,
            "data.held_out",
            [c for c in seg.CAMVID_CLASSES if c != "Unlabelled"],
            "every CamVid class is held out or void",
        ),
        (FeatureFlowsRunConfig, "data.crop_width", 0, "is 0 and crop_height 160: both > 0 .* or both 0"),
        (
            FeatureFlowsRunConfig,
            "log_softmax_floor",
            {"fuse": -4},
            "tap 'fuse' reads 'fuse.1', not the logits",
        ),
        (FeatureFlowsRunConfig, "train.batch_size", 0, "must be >= 1, got 0"),
        (FeatureFlowsRunConfig, "train.log_every", 0, "must be >= 1, got 0"),
        (FeatureFlowsRunConfig, "data.pad_divisor", 0, "must be >= 1, got 0"),
        (FeatureFlowsRunConfig, "flow.n_steps", 0, "must be >= 1, got 0"),
        (RoadTrainConfig, "train.log_every", 0, "must be >= 1, got 0"),
        (RoadTrainConfig, "train.checkpoint_every", 0, "must be >= 1, got 0"),
        (RoadTrainConfig, "data.downscale", 0, "must be >= 1, got 0"),
    ],
)
def test_config_ranges_name_file_and_key(
    tmp_path: Path, cls: type, key: str, value: object, message: str
) -> None:
    base = {"output_dir": str(tmp_path / "out")}
    if cls is FeatureFlowsRunConfig:
        base.update(segmenter="seg.pt", taps={"fuse": "fuse.1"})
    if cls is RoadTrainConfig:
        base.update(data={"root": str(tmp_path)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=rf"c\.yaml: {key}: {message}"):
        load_config(
            cls, tmp_path / "c.yaml", [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"]
        )


def test_scale_jitter_of_whole_frames_is_a_config_error(tmp_path: Path) -> None:
    """Whole frames rescaled each by its own factor differ in size: no batch (np.stack) on step 1."""
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {"output_dir": str(tmp_path / "out"), "segmenter": "seg.pt", "taps": {"fuse": "fuse.1"}}
        )
    )
    whole = ["data.crop_height=0", "data.crop_width=0"]
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.scale_jitter: 0\.2 needs random crops"):
        load_config(FeatureFlowsRunConfig, tmp_path / "c.yaml", [*whole, "data.scale_jitter=0.2"])
    assert load_config(FeatureFlowsRunConfig, tmp_path / "c.yaml", whole).data.scale_jitter == 0


def test_out_of_range_backbone_level_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"model\.out_indices: levels \[7\] do not exist: resnet18 has .* 0\.\.4"
    ):
        build_segmenter(SegmenterConfig(out_indices=(1, 7), decoder_channels=8), 9)


# --------------------------------------------------------------------------- 5. logits node


def test_a_missing_segmenter_is_named_by_its_key_and_leaves_no_folder(tmp_path: Path) -> None:
    root = camvid(tmp_path / "camvid")
    with pytest.raises(FileNotFoundError, match=r"^segmenter: segmenter checkpoint not found: .*nothing\.pt"):
        train_feature_flows(flows_config(tmp_path, root, tmp_path / "nothing.pt"), progress=False)
    assert not (tmp_path / "flows").exists()


def test_bad_logits_node_is_refused_before_flow_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = camvid(tmp_path / "camvid")
    segmenter = save_segmenter(tmp_path / "s" / "checkpoint.pt", root, seed=1)
    no_training(monkeypatch, fd, "fit_standardization")
    with pytest.raises(ValueError, match=r"logits_node: 'classifer' is not a feature map of segmenter .*s/"):
        train_feature_flows(flows_config(tmp_path, root, segmenter, logits_node="classifer"), progress=False)
    with pytest.raises(
        ValueError, match=r"logits_node: 'fuse.1' has 8 channels, but segmenter .* has 9 classes"
    ):
        train_feature_flows(flows_config(tmp_path, root, segmenter, logits_node="fuse.1"), progress=False)
    assert not (tmp_path / "flows" / "feature_flows.pt").exists()


# --------------------------------------------------------------------------- 6. evaluation geometry


def test_evaluation_refuses_another_scale_or_padding(tmp_path: Path) -> None:
    root = camvid(tmp_path / "camvid")
    segmenter = save_segmenter(tmp_path / "s" / "checkpoint.pt", root, seed=1)
    cfg = flows_config(tmp_path, root, segmenter)
    flows = train_feature_flows(cfg, progress=False)
    rows, _ = evaluate_run(cfg)
    assert rows
    for key, value, trained in (("scale", 0.5, 1.0), ("pad_divisor", 16, 32)):
        other = replace(cfg, data=replace(cfg.data, **{key: value}))
        pattern = rf"data\.{key}: the config says {value}, but the flows of .*{flows.name} were trained at "
        pattern += rf"{key} {trained}"
        with pytest.raises(ValueError, match=pattern):
            evaluate_run(other)
    # another protocol: its splits hold frames the flows (and the segmenter) were trained on
    other = replace(cfg, data=replace(cfg.data, protocol="sequences"))
    with pytest.raises(
        ValueError, match=r"data\.protocol: the config says sequences, but the flows .* under splits"
    ):
        evaluate_run(other)
    with pytest.raises(
        ValueError, match=r"segmenter trained under data\.protocol=splits, but the flows config says"
    ):
        train_feature_flows(replace(other, output_dir=str(tmp_path / "f2")), progress=False)
    # a tap (or the logits) read from another node than the flows were trained on
    for change, what in (
        ({"taps": {"fuse": "fuse.0"}}, "fuse is 'fuse.0'"),
        ({"logits_node": "x"}, "logits_node"),
    ):
        with pytest.raises(ValueError, match=rf"the flows were trained on other nodes: {what}"):
            evaluate_run(replace(cfg, **change))


# --------------------------------------------------------------------------- 7. label ids


@pytest.mark.parametrize("bad", [259, 12])
def test_label_ids_outside_camvid_are_errors_naming_the_file(tmp_path: Path, bad: int) -> None:
    root = camvid(tmp_path / "camvid")
    path = root / "testannot" / "f1_L.png"
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint16)
    label[0, 0] = bad  # 259 would wrap to 3 (Road) as uint8; 12 would become void
    assert cv2.imwrite(str(path), label if bad > 255 else label.astype(np.uint8))
    with pytest.raises(ValueError, match=rf"label .*f1_L\.png holds ids {bad}, outside CamVid's 0\.\.11"):
        load_scene_arrays(SceneDataConfig(root=str(root), scale=0.5), "test")


# --------------------------------------------------------------------------- 8. foreign checkpoints


def test_load_segmenter_says_what_the_file_is_not(tmp_path: Path) -> None:
    glow = {"model": {}, "model_config": to_dict(TINY), "config": {"output_dir": "x", "general_images": None}}
    atomic_torch_save(glow, tmp_path / "glow.pt")
    with pytest.raises(ValueError, match=r"glow\.pt: not a segmenter checkpoint \(it is a Glow checkpoint"):
        load_segmenter(tmp_path / "glow.pt")
    atomic_torch_save({"model": {}, "config": {"output_dir": "x", "taps": {}}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a segmenter checkpoint \(its config does not fit"):
        load_segmenter(tmp_path / "other.pt")
