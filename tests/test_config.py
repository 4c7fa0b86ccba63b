"""Configs: YAML ↔ frozen dataclasses, errors that name the key and the file."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from densead.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OutlierConfig,
    TrainConfig,
    TrainRunConfig,
    checkpoint_config,
    config_changes,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_section_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "output_dir: x\ndata:\n  source: npz\n  sise: 32\n")
    with pytest.raises(ConfigError, match=rf"{path}.*data.*'sise'"):
        load_config(TrainRunConfig, path)


def test_mistyped_value_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "output_dir: x\ndata: {}\ntrain:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 'many'"):
        load_config(TrainRunConfig, path)
    path = write(tmp_path, "output_dir: x\ndata: {download: 1}\n")
    with pytest.raises(ConfigError, match=r"data\.download: expected true or false"):
        load_config(TrainRunConfig, path)


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {}\n")
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        load_config(TrainRunConfig, path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(TrainRunConfig, tmp_path / "nope.yaml")
    path = write(tmp_path, "output_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainRunConfig, path)


def test_overrides_and_types(tmp_path: Path) -> None:
    path = write(tmp_path, "output_dir: x\ndata: {classes: [1, 2]}\n")
    cfg = load_config(TrainRunConfig, path, ["train.lr=1", "data.augment=translate", "model.n_steps=4"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.classes == (1, 2) and cfg.data.augment == "translate" and cfg.model.n_steps == 4
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainRunConfig, path, ["train.lr"])
    with pytest.raises(ConfigError, match="'nonsense'"):
        load_config(TrainRunConfig, path, ["train.nonsense=3"])


def test_resolved_config_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(
        TrainRunConfig,
        {"output_dir": "o", "data": {"source": "npz", "mix": [{"source": "sklearn_digits"}]}},
    )
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(TrainRunConfig, tmp_path / "resolved.yaml")
    assert again == cfg
    assert isinstance(again.data.mix[0], DataConfig)
    assert to_dict(again)["data"]["mix"][0]["source"] == "sklearn_digits"


def _config_class(name: str) -> type:
    """The dataclass each shipped config is for (the tool that reads it)."""
    if name.startswith("camvid_glow"):
        from densead.dense import RoadTrainConfig

        return RoadTrainConfig
    if name.startswith("camvid_segmenter"):
        from densead.segmenter import SegmenterRunConfig

        return SegmenterRunConfig
    if name.startswith("camvid_feature_flows"):
        from densead.detectors.feature_density import FeatureFlowsRunConfig

        return FeatureFlowsRunConfig
    return TrainRunConfig


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(_config_class(path.name), path)
    assert cfg.output_dir


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_experiment_configs_load(path: Path) -> None:
    cfg = load_config(ExperimentConfig, path)
    assert cfg.anomalies


def test_yaml_reads_exponent_floats_and_only_true_false_as_booleans(tmp_path: Path) -> None:
    # PyYAML's YAML 1.1 reads 5e-4 as a string and on/off as booleans; a config writer means
    # a float and the documented values of train.fast.
    path = write(tmp_path, "output_dir: x\ndata: {}\ntrain:\n  lr: 5e-4\n  fast: off\n  amp: true\n")
    cfg = load_config(TrainRunConfig, path, ["train.weight_decay=1E-5", "train.max_grad_norm=1e2"])
    assert (cfg.train.lr, cfg.train.fast, cfg.train.amp) == (5e-4, "off", True)
    assert (cfg.train.weight_decay, cfg.train.max_grad_norm) == (1e-5, 100.0)
    assert load_config(TrainRunConfig, path, ["train.fast=on"]).train.fast == "on"
    assert load_config(TrainRunConfig, path, ["data.path=0006R0"]).data.path == "0006R0"
    with pytest.raises(ConfigError, match=r"train\.amp: expected true or false, got 'yes'"):
        load_config(TrainRunConfig, path, ["train.amp=yes"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 1000.0"):
        load_config(TrainRunConfig, path, ["train.steps=1e3"])
    # no YAML 1.1 octal, base 60 or dates: 010 is ten, 1:30 and 2024-01-01 are text
    assert load_config(TrainRunConfig, path, ["train.steps=010"]).train.steps == 10
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got '1:30'"):
        load_config(TrainRunConfig, path, ["train.steps=1:30"])
    assert load_config(TrainRunConfig, path, ["data.path=2024-01-01"]).data.path == "2024-01-01"
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1': the value is not valid YAML: line 1"):
        load_config(TrainRunConfig, path, ["train.lr=[1"])


def test_a_key_given_twice_is_an_error_and_saved_configs_read_back_as_written(tmp_path: Path) -> None:
    twice = write(tmp_path, "output_dir: x\ndata: {}\ntrain:\n  lr: 0.5\ntrain:\n  steps: 3\n")
    with pytest.raises(
        ConfigError, match=r"run\.yaml: not valid YAML: line 5, column 1: duplicate key 'train'"
    ):
        load_config(TrainRunConfig, twice)
    # strings that look like numbers stay strings through save_config and load_config
    path = write(tmp_path, "output_dir: '1e5'\ndata: {path: '010'}\n")
    cfg = load_config(TrainRunConfig, path)
    assert (cfg.output_dir, cfg.data.path) == ("1e5", "010")
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(TrainRunConfig, tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.warmup_steps=-3", r"train\.warmup_steps: must be >= 0, got -3"),
        ("train.steps=-5", r"train\.steps: must be >= 0, got -5"),
        ("train.batch_size=0", r"train\.batch_size: must be >= 1, got 0"),
        ("train.lr=-1", r"train\.lr: must be > 0, got -1"),
        ("train.checkpoint_every=0", r"train\.checkpoint_every: must be >= 1, got 0"),
        ("train.log_every=0", r"train\.log_every: must be >= 1, got 0"),
        ("train.device=tpu", r"train\.device: unknown device 'tpu'"),
        ("train.optimizer=lbfgs", r"train\.optimizer: unknown 'lbfgs'; valid: adamax, adam, sgd"),
        ("model.n_bins=512", r"model\.n_bins: must be 2 \.\.\. 256 .*got 512"),
        ("model.n_bins=0", r"model\.n_bins: must be 2 \.\.\. 256 .*got 0"),
        ("model.hidden=0", r"model\.hidden: must be >= 1, got 0"),
        ("model.kernel_size=-1", r"model\.kernel_size: must be >= 1, got -1"),
        ("model.kernel_size=2", r"model\.kernel_size: must be odd, got 2"),
        ("train.lr=.inf", r"train\.lr: must be a finite number, got inf"),  # NaN, inf pass any comparison
        ("train.max_grad_norm=.nan", r"train\.max_grad_norm: must be a finite number, got nan"),
        ("outlier={data: {}, reference: r.pt, temperature: 0}", r"outlier\.temperature: must be > 0, got 0"),
        ("outlier={data: {}, reference: r.pt, weight: -1}", r"outlier\.weight: must be >= 0, got -1"),
        ("outlier={data: {}, reference: r.pt, batch_size: -4}", r"outlier\.batch_size: must be >= 0, got -4"),
    ],
)
def test_values_out_of_range_name_the_key_and_file(tmp_path: Path, override: str, message: str) -> None:
    path = write(tmp_path, "output_dir: x\ndata: {}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_config(TrainRunConfig, path, [override])


def test_range_errors_name_the_experiments_own_keys() -> None:
    data = to_dict(load_config(ExperimentConfig, REPO / "configs/experiments/digits_demo.yaml"))
    data["general_train"]["warmup_steps"] = -1
    with pytest.raises(ConfigError, match=r"^exp.yaml: general_train\.warmup_steps: must be >= 0, got -1"):
        from_dict(ExperimentConfig, data, "exp.yaml")
    data["general_train"]["warmup_steps"] = 0
    for key, value, message in (
        ("outlier_temperature", 0.0, "must be > 0"),
        ("outlier_weight", -1.0, "must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=rf"^exp.yaml: {key}: {message}, got {value}"):
            from_dict(ExperimentConfig, {**data, key: value}, "exp.yaml")
    data["outlier_train"]["steps"] = 0  # a stage that is not trained: valid
    assert from_dict(ExperimentConfig, data, "exp.yaml").outlier_train.steps == 0


def test_config_changes_names_each_changed_key_and_skips_what_may_change(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    data.write_bytes(b"")
    mixed = DataConfig(source="npz", path=str(data), mix=(DataConfig(source="sklearn_digits", stop=10),))
    run = TrainRunConfig(str(tmp_path / "a"), mixed, ModelConfig(), TrainConfig(lr=1e-3))
    stored = to_dict(run)
    assert config_changes(stored, to_dict(run)) == []
    other = replace(
        run,
        output_dir=str(tmp_path / "b"),  # may change: where it writes, logs, saves, how far it goes
        data=replace(mixed, download=True, path=str(Path(os.path.relpath(data)))),  # same file
        train=replace(run.train, steps=5, log_every=1, checkpoint_every=1, device="cpu", fast="off"),
    )
    assert config_changes(stored, to_dict(other)) == []
    changed = replace(
        run,
        data=replace(mixed, mix=(DataConfig(source="sklearn_digits", stop=20),)),
        train=replace(run.train, lr=2e-3, seed=3),
    )
    assert [str(c) for c in config_changes(stored, to_dict(changed))] == [
        "data.mix[0].stop (10 in the checkpoint, 20 now)",
        "train.lr (0.001 in the checkpoint, 0.002 now)",
        "train.seed (0 in the checkpoint, 3 now)",
    ]
    # Another existing file is another dataset; a stored file that is gone has moved.
    elsewhere = tmp_path / "other.npz"
    elsewhere.write_bytes(b"")
    moved = to_dict(replace(run, data=replace(mixed, path=str(elsewhere))))
    assert [str(c) for c in config_changes(stored, moved)] == [
        f"data.path ({str(data)!r} in the checkpoint, {str(elsewhere)!r} now)"
    ]
    data.unlink()
    assert config_changes(stored, moved) == []
    # A stored relative path (densead before checkpoint_config) that is not there from here
    # meant the folder that training ran in: it cannot be checked, so it does not match.
    relative = {**stored, "data": {**stored["data"], "path": "somewhere/data.npz"}}
    assert [c.key for c in config_changes(relative, moved)] == ["data.path"]
    # A key only one side has (another densead version's fields) is not compared.
    older = {**stored, "train": {k: v for k, v in stored["train"].items() if k != "optimizer"}}
    assert config_changes(older, to_dict(replace(run, train=replace(run.train, optimizer="adam")))) == []
    # A section added or removed is named, not printed whole.
    outlier = OutlierConfig(DataConfig(source="sklearn_digits"), str(tmp_path / "g.pt"))
    (added,) = config_changes(stored, to_dict(replace(run, outlier=outlier)))
    assert str(added) == "outlier (None in the checkpoint, a section now)"


def test_checkpoint_config_names_files_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = DataConfig(source="npz", path="d/in.npz", mix=(DataConfig(source="npz", path="d/mix.npz"),))
    outlier = OutlierConfig(DataConfig(source="sklearn_digits"), "runs/general/checkpoint.pt")
    run = TrainRunConfig("runs/a", data, ModelConfig(), TrainConfig(init_from="runs/g.pt"), outlier)
    plain = checkpoint_config(run)
    assert plain["data"]["path"] == str(tmp_path / "d/in.npz")
    assert plain["data"]["mix"][0]["path"] == str(tmp_path / "d/mix.npz")
    assert plain["train"]["init_from"] == str(tmp_path / "runs/g.pt")
    assert plain["outlier"]["reference"] == str(tmp_path / "runs/general/checkpoint.pt")
    assert plain["outlier"]["data"]["path"] == ""  # no file named: nothing to resolve
    assert plain["output_dir"] == "runs/a" and plain["model"] == to_dict(run)["model"]
