"""run_experiment: the config checked before training, per-set dimensions in the report, no stale reuse."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_tools import DIGITS, tiny_experiment

import densead.experiment as experiment
from densead.config import ConfigError, ExperimentConfig, TrainConfig, from_dict
from densead.data.images import load_image_set
from densead.data.transforms import to_model_input
from densead.detectors.complexity import code_length
from densead.experiment import StaleStageError, check_experiment, run_experiment
from densead.flows import Glow
from densead.scoring import read_scores_csv
from densead.train import load_checkpoint, load_glow

REPO = Path(__file__).resolve().parents[1]


def tiny(out: Path, **changes) -> dict:
    """test_tools' tiny experiment without Diff†, one heatmap, a log line every step."""
    cfg = tiny_experiment(out)
    train = {**cfg["general_train"], "log_every": 1}
    cfg.update(general_train=train, in_dist_train=train, outlier_train={**train, "steps": 0}, n_heatmaps=1)
    cfg.update(changes)
    return cfg


def config(data: dict) -> ExperimentConfig:
    return from_dict(ExperimentConfig, data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny experiment (general and in_dist, two steps each); tests work on copies."""
    out = tmp_path_factory.mktemp("exp") / "run"
    run_experiment(config(tiny(out)), progress=False)
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)  # copy2: modification times kept
    return out


def content(path: Path) -> bytes:
    return path.read_bytes()


# --------------------------------------------------------------------------- check_experiment


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"anomalies": {}}, r"anomalies: no anomaly sets"),
        ({"anomalies": {"in_dist_test": DIGITS}}, r"anomalies\.in_dist_test: .*reserved"),
        ({"anomalies": {"general_test": DIGITS}}, r"anomalies\.general_test: .*reserved"),
        ({"anomalies": {"a/b": DIGITS}}, r"anomalies\.'a/b': .*folder name"),
        ({"anomalies": {"..": DIGITS}}, r"anomalies\.'\.\.': .*folder name"),
        ({"anomalies": {"digit_0": {**DIGITS, "channels": 3}}}, r"anomalies\.digit_0\.channels is 3 .*is 1"),
        ({"in_dist": {**DIGITS, "channels": 3}}, r"^in_dist\.channels is 3"),
        ({"in_dist_test": {**DIGITS, "channels": 3}}, r"^in_dist_test\.channels is 3"),
        ({"general_test": {**DIGITS, "channels": 3}}, r"^general_test\.channels is 3"),
        ({"general": {**DIGITS, "mix": [{**DIGITS, "channels": 3}]}}, r"^general\.mix\[0\]\.channels is 3"),
        ({"anomalies": {"digit_0": {**DIGITS, "size": 10}}}, r"anomalies\.digit_0\.size is 10, not div"),
        ({"eval_batch_size": 0}, r"^eval_batch_size must be >= 1, got 0"),
        ({"n_heatmaps": -1}, r"^n_heatmaps must be >= 0, got -1"),
        ({"bootstrap": -5}, r"^bootstrap must be 0 \(no intervals\) or at least 100 resamples, got -5"),
        ({"bootstrap": 20}, r"^bootstrap must be 0 \(no intervals\) or at least 100 resamples, got 20"),
        ({"in_dist_train": {"init_from": "x.pt"}}, r"^in_dist_train\.init_from is 'x\.pt', but the"),
        ({"outlier_train": {"init_from": "x.pt"}}, r"^outlier_train\.init_from is 'x\.pt', but the"),
    ],
)  # fmt: skip
def test_check_experiment_names_the_key(change: dict, message: str, tmp_path: Path) -> None:
    cfg = config(tiny(tmp_path / "out", **change))
    with pytest.raises(ConfigError, match=message):
        check_experiment(cfg)
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_check_experiment_accepts_the_demo_and_its_own_size_sets(tmp_path: Path) -> None:
    demo = yaml.safe_load((REPO / "configs/experiments/digits_demo.yaml").read_text())
    check_experiment(config(demo))
    check_experiment(config(tiny(tmp_path, in_dist_test={**DIGITS, "size": 0})))


def test_own_size_set_the_glow_cannot_take_fails_before_training(tmp_path: Path) -> None:
    np.savez(tmp_path / "odd.npz", images=np.zeros((3, 10, 10), np.uint8))
    odd = {"source": "npz", "path": str(tmp_path / "odd.npz"), "channels": 1, "size": 0}
    cfg = config(tiny(tmp_path / "out", anomalies={"odd": odd}))
    with pytest.raises(
        ConfigError, match=r"anomalies\.odd: images of 1×10×10 .*divisible by 4.*anomalies\.odd\.size"
    ):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_tool_reports_config_errors_and_leaves_an_earlier_run_alone(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    before = {p: content(p) for p in out.rglob("*") if p.is_file()}
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny(out)))
    proc = subprocess.run(
        [sys.executable, "tools/run_experiment.py", str(cfg_path), "--no-progress", "--set", "anomalies={}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "exp.yaml" in proc.stderr and "anomalies: no anomaly sets" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: content(p) for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- the report


def test_report_uses_each_sets_own_dimensions(tmp_path: Path) -> None:
    """in_dist_test of its own size (8×8), digit_0 enlarged to 16×16: the Glow takes both."""
    out = tmp_path / "run"
    big = {**DIGITS, "classes": [0], "start": 1500, "size": 16, "resize": "resize"}
    cfg = config(
        tiny(
            out,
            in_dist_test={**DIGITS, "exclude_classes": [0], "start": 1700, "size": 0},
            anomalies={"digit_0": big},
        )
    )
    report = run_experiment(cfg, progress=False).read_text()
    assert torch.is_grad_enabled()  # scoring leaves autograd as it found it (training may follow)
    model, _ = load_glow(out / "in_dist" / "checkpoint.pt")
    expected, png_bits, loco_bits, complexity, complexity_loco, typicality = {}, {}, {}, {}, {}, {}
    with torch.no_grad():  # typicality's reference: mean bits/dim on the in-distribution training images
        train = load_image_set(cfg.in_dist, 17).images
        typical = float(model(to_model_input(train, 17, dequantize=False)).bits_per_dim().double().mean())
    assert f"|bits/dim of the in-distribution model − {typical:.3f}|" in report
    for name, dcfg in (("in_dist_test", cfg.in_dist_test), ("digit_0", cfg.anomalies["digit_0"])):
        images = load_image_set(dcfg, 17)
        with torch.no_grad():
            o = model(to_model_input(images.images, 17, dequantize=False))
        scale_bits = -(
            o.scale_log_probs().double().mean(0)
            - torch.tensor(
                [
                    math.prod(s[1:]) * math.log(17)
                    for s in Glow.latent_shapes_of(1, 2, *images.images.shape[2:])
                ],
                dtype=torch.float64,
            )
        ) / (o.n_dims * math.log(2))
        expected[name] = (float(o.bits_per_dim().double().mean()), scale_bits.tolist())
        png_bits[name] = float(code_length(images.images).mean()) / o.n_dims
        # complexity = log p_png − log p_in, from the PNG files' lengths and the model's log p
        complexity[name] = (-code_length(images.images) * math.log(2) - o.log_prob().double()).numpy()
        loco = code_length(images.images, "loco")  # the per-pixel coder's: its map's sum
        loco_bits[name] = float(loco.mean()) / o.n_dims
        complexity_loco[name] = (-loco * math.log(2) - o.log_prob().double()).numpy()
        typicality[name] = (o.bits_per_dim().double() - typical).abs().numpy()
    assert expected["digit_0"][0] < 2 * expected["in_dist_test"][0]  # same order: per dimension
    header = re.search(r"^\| model \| (.*) \|$", report, re.M).group(1).split(" | ")
    rows = {m: re.search(rf"^\| {m} \| (.*) \|$", report, re.M).group(1) for m in ("in_dist", "png", "loco")}
    bpd, bpd_png, bpd_loco = (dict(zip(header, map(float, rows[m].split(" | ")), strict=True)) for m in rows)
    cols = read_scores_csv(out / "scores.csv")
    for name, (bits, scales) in expected.items():
        assert bpd[name] == pytest.approx(bits, abs=1e-3), name
        assert bpd_png[name] == pytest.approx(png_bits[name], abs=1e-3), name
        assert bpd_loco[name] == pytest.approx(loco_bits[name], abs=1e-3), name
        np.testing.assert_allclose(cols["complexity"][cols["set"] == name], complexity[name], rtol=1e-5)
        got = cols["complexity_loco"][cols["set"] == name]
        np.testing.assert_allclose(got, complexity_loco[name], rtol=1e-5, atol=1e-4)  # float32 scores
        np.testing.assert_allclose(cols["typicality"][cols["set"] == name], typicality[name], atol=1e-5)
        row = re.search(rf"^\| {name} \| (.*) \|$", report.split("share of")[1], re.M).group(1)
        cells = row.split(" | ")
        assert [float(c.split(" ")[0]) for c in cells[:-1]] == pytest.approx(scales, abs=1e-3), name
        assert float(cells[-1]) == pytest.approx(bits, abs=2e-3), name
        assert "nan" not in row and "inf" not in row


def test_typicality_reference_is_kept_beside_the_checkpoint_and_recomputed_when_it_changes(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun that reuses the in-distribution checkpoint reads b̄ from in_dist/typical_bpd.yaml
    (no scoring of the training set); a record of another checkpoint, data or n_bins, or an
    unreadable one, is computed again, to the same value, and rewritten."""
    out = copy_of(finished, tmp_path)
    cfg = config(tiny(out))
    path = out / "in_dist" / experiment.TYPICAL_NAME
    record = yaml.safe_load(path.read_text())
    model, _ = load_glow(out / "in_dist" / "checkpoint.pt")
    with torch.no_grad():
        images = load_image_set(cfg.in_dist, 17).images
        typical = float(model(to_model_input(images, 17, dequantize=False)).bits_per_dim().double().mean())
    assert record["typical_bpd"] == pytest.approx(typical, abs=1e-6)
    assert record["images_shape"] == list(images.shape) and record["n_bins"] == 17
    calls = []
    real = experiment.typical_bits_per_dim

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "typical_bits_per_dim", counting)
    first = (out / "scores.csv").read_bytes()
    run_experiment(cfg, progress=False)
    assert not calls and (out / "scores.csv").read_bytes() == first  # read, not recomputed
    for change in ({"checkpoint_sha256": "0" * 64}, {"images_sha256": "0" * 64}, {"n_bins": 256}, None):
        path.write_text(yaml.safe_dump({**record, **change}) if change else "typical_bpd: [")
        run_experiment(cfg, progress=False)
        assert len(calls) == 1, change
        assert yaml.safe_load(path.read_text()) == record  # rewritten, the same value
        assert (out / "scores.csv").read_bytes() == first
        calls.clear()


def test_outputs_replaced_without_a_report_from_an_earlier_run(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(finished, tmp_path)
    assert (out / "report.md").is_file()

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(experiment, "write_evaluation", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_experiment(config(tiny(out)), progress=False)
    assert (out / "scores.csv").is_file() and not (out / "report.md").exists()


# --------------------------------------------------------------------------- reuse of stages


def test_raising_general_steps_refuses_the_stale_in_dist_model(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    general = out / "general" / "checkpoint.pt"
    before = content(general)
    longer = tiny(out)
    longer["general_train"] = {**longer["general_train"], "steps": 3}
    with pytest.raises(StaleStageError, match=r"in_dist: general trains further \(from step 2 to 3\)") as err:
        run_experiment(config(longer), progress=False)
    assert f"rm -r {out / 'in_dist'}" in str(err.value)
    assert content(general) == before  # refused before training anything

    # As the error says: delete the stale stage; the rerun continues general and retrains in_dist.
    shutil.rmtree(out / "in_dist")
    run_experiment(config(longer), progress=False)
    assert load_checkpoint(general)["step"] == 3
    record = yaml.safe_load((out / "in_dist" / "parents.yaml").read_text())
    assert record["general"]["step"] == 3
    # A rerun of the same config reuses everything.
    in_dist = content(out / "in_dist" / "checkpoint.pt")
    run_experiment(config(longer), progress=False)
    assert content(out / "in_dist" / "checkpoint.pt") == in_dist


def test_a_changed_parent_checkpoint_makes_its_children_stale(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    record_path = out / "in_dist" / "parents.yaml"
    record = yaml.safe_load(record_path.read_text())
    record["general"]["sha256"] = "0" * 64  # as if general/checkpoint.pt had been replaced since
    record_path.write_text(yaml.safe_dump(record))
    with pytest.raises(StaleStageError, match=r"in_dist: general's checkpoint changed since in_dist started"):
        train_stages(out)

    # Runs from before the records: reused while the parent is older than the child ...
    record_path.unlink()
    train_stages(out)
    assert yaml.safe_load(record_path.read_text())["general"]["step"] == 2
    # ... refused when the parent was written after the child.
    record_path.unlink()
    child = (out / "in_dist" / "checkpoint.pt").stat().st_mtime
    os.utime(out / "general" / "checkpoint.pt", (child + 10, child + 10))
    with pytest.raises(StaleStageError, match=r"in_dist: general's checkpoint is newer than in_dist's"):
        train_stages(out)


def test_a_stage_whose_own_settings_changed_is_stale_and_so_are_those_after_it(
    finished: Path, tmp_path: Path
) -> None:
    out = copy_of(finished, tmp_path)
    before = {p: content(p) for p in out.glob("*/checkpoint.pt")}
    other_lr = tiny(out)
    lr = other_lr["in_dist_train"].get("lr", TrainConfig().lr)
    other_lr["in_dist_train"] = {**other_lr["in_dist_train"], "lr": 2 * lr}
    with pytest.raises(StaleStageError, match=r"in_dist: its settings changed since it was trained") as err:
        run_experiment(config(other_lr), progress=False)
    assert f"train.lr ({lr!r} in the checkpoint, {2 * lr!r} now)" in str(err.value)
    assert "general:" not in str(err.value) and f"rm -r {out / 'in_dist'}" in str(err.value)
    fewer = tiny(out)
    fewer["general_train"] = {**fewer["general_train"], "steps": 1}
    with pytest.raises(StaleStageError) as err:
        run_experiment(config(fewer), progress=False)
    assert "general: its settings changed" in str(err.value)
    assert "train.steps (1 now, but the checkpoint is at step 2)" in str(err.value)
    assert "in_dist: general is retrained" in str(err.value)
    assert {p: content(p) for p in out.glob("*/checkpoint.pt")} == before  # refused before training


def train_stages(out: Path) -> dict[str, Path]:
    return experiment.train_experiment_models(config(tiny(out)), progress=False)


def test_heatmaps_of_a_rerun_replace_the_previous_ones_whole(tmp_path: Path) -> None:
    from densead.data.images import ImageSet
    from densead.experiment import _replace_heatmaps

    old = tmp_path / "heatmaps"
    for stale in ("renamed_set/0000_raw.png", "digit_0/0003_raw.png"):  # a set and images no longer shown
        (old / stale).parent.mkdir(parents=True, exist_ok=True)
        (old / stale).write_bytes(b"old")
    images = ImageSet(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), "digit_0")
    heat = {"digit_0": {"raw": torch.rand(1, 8, 8), "ratio": torch.rand(1, 8, 8)}}
    _replace_heatmaps(tmp_path, heat, {"digit_0": images}, n_bins=17)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["heatmaps/digit_0/0000_ratio.png", "heatmaps/digit_0/0000_raw.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmaps"]  # no staging folder left
