"""Configs: YAML ↔ frozen dataclasses, errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from densead.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    TrainRunConfig,
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
    if name == "camvid_segmenter.yaml":
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
