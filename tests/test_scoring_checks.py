"""Bad input to image scoring and evaluation: clear errors naming what is at fault, nothing written.

The tools run in this process (their ``main``), on tiny Glows and hand-made CSVs, to stay fast.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from densead.config import ModelConfig, to_dict
from densead.data.images import ImageSet
from densead.detectors import GlowScorer, get_detector
from densead.flows import Glow
from densead.io import check_heatmap_folder, staged_heatmaps
from densead.scoring import iter_model_batches, read_scores_csv, score_image_set
from densead.train import build_glow

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def score_images() -> ModuleType:
    return load_tool("score_images")


@pytest.fixture(scope="module")
def evaluate() -> ModuleType:
    return load_tool("evaluate")


def usage_error(tool: ModuleType, args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The tool's stderr, after checking that it stopped with a usage error."""
    with pytest.raises(SystemExit) as exc:
        tool.main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def tiny_glow(**kw: int) -> Glow:
    torch.manual_seed(0)
    model = build_glow(ModelConfig(**{"in_channels": 3, "n_scales": 2, "n_steps": 1, "hidden": 8, **kw}))
    model.train()(torch.rand(4, model.in_channels, 8, 8) - 0.5)  # ActNorm's data init
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints of tiny Glows: ``in`` and ``general`` fit each other; the others differ in one way."""
    root = tmp_path_factory.mktemp("models")
    variants = {"in": {}, "general": {}, "bins16": {"n_bins": 16}, "grey": {"in_channels": 1}}
    variants["scales3"] = {"n_scales": 3}
    paths = {}
    for name, kw in variants.items():
        cfg = ModelConfig(**{"in_channels": 3, "n_scales": 2, "n_steps": 1, "hidden": 8, **kw})
        paths[name] = root / f"{name}.pt"
        torch.save({"model": tiny_glow(**kw).state_dict(), "model_config": to_dict(cfg)}, paths[name])
    rng = np.random.default_rng(0)
    paths["images"] = root / "images.npz"
    np.savez(paths["images"], images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    return paths


def score_args(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    base = ["--checkpoint", str(models["in"]), "--input", str(models["images"]), "--out", str(out)]
    return [*base, "--device", "cpu", "--no-progress", *extra]


# ---- 1. the general model must fit the in-distribution model ------------------------------------


def test_glow_scorer_refuses_a_general_model_of_another_data_format() -> None:
    with pytest.raises(ValueError, match=r"n_bins \(16\) differs from the in-distribution model's \(256\)"):
        GlowScorer(tiny_glow(), tiny_glow(n_bins=16))
    with pytest.raises(ValueError, match=r"in_channels \(1\) differs from the in-distribution model's \(3\)"):
        GlowScorer(tiny_glow(), tiny_glow(in_channels=1))


def test_scale_wise_ratios_need_models_with_the_same_scales() -> None:
    scorer = GlowScorer(tiny_glow(), tiny_glow(n_scales=3))
    x = torch.rand(2, 3, 8, 8) - 0.5
    for name in ("ratio_last_scale", "ratio_scale1"):
        with pytest.raises(
            ValueError, match=rf"'{name}'.*general model has 3 scales.*in-distribution model 2"
        ):
            scorer.check_detectors([get_detector(name)])
        with pytest.raises(ValueError, match="3 scales"):
            scorer.score(x, [get_detector(name)])
    # the whole log-likelihoods compare across depths; single-model scale detectors are unaffected
    scores = scorer.score(x, [get_detector(n) for n in ("ratio", "last_scale", "scale2")])
    assert all(torch.isfinite(s).all() for s in scores.values())


@pytest.mark.parametrize(
    ("general", "detector", "what"),
    [
        ("bins16", "ratio", "n_bins (16) differs"),
        ("grey", "ratio", "in_channels (1) differs"),
        ("scales3", "ratio_last_scale", "general model has 3 scales"),
        ("scales3", "ratio_scale2", "general model has 3 scales"),
    ],
)
def test_score_images_names_both_checkpoints_when_the_general_model_does_not_fit(
    score_images: ModuleType,
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    general: str,
    detector: str,
    what: str,
) -> None:
    out = tmp_path / "scores.csv"
    args = score_args(models, out, "--general", str(models[general]), "--detector", detector)
    args += ["--heatmaps", str(tmp_path / "heat")]
    err = usage_error(score_images, args, capsys)
    assert what in err and str(models["in"]) in err and str(models[general]) in err
    assert not out.exists() and not (tmp_path / "heat").exists()


def test_score_images_ratio_of_models_with_different_scales_still_runs(
    score_images: ModuleType, models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    args = score_args(models, out, "--general", str(models["scales3"]), "--detector", "raw,ratio")
    assert score_images.main(args) == 0
    assert set(read_scores_csv(out)) == {"set", "index", "name", "label", "raw", "ratio"}


# ---- 2. canonical scale detector names ----------------------------------------------------------


@pytest.mark.parametrize("name", ["scale01", "ratio_scale01", "scale0", "ratio_scale0", "scale001"])
def test_scale_detectors_need_canonical_names(name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown detector '{name}'"):
        get_detector(name)


def test_canonical_scale_detector_names_still_work() -> None:
    assert get_detector("scale10").scale == 10 and not get_detector("scale10").needs_general
    assert get_detector("ratio_scale2").scale == 2 and get_detector("ratio_scale2").needs_general


# ---- 3. empty detector lists and numeric flags --------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--detector", ","], "--detector names no detector"),
        (["--detector", " "], "--detector names no detector"),
        (["--detector", "scale01"], "unknown detector 'scale01'"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
        (["--size", "-1"], "--size must be >= 0, got -1"),
        (["--max-frames", "-1"], "--max-frames must be >= 0, got -1"),
        (["--calibration-frames", "-2"], "--calibration-frames must be >= 0, got -2"),
        (["--classes", "a"], "--classes must be comma-separated integer labels, got 'a'"),
    ],
)
def test_score_images_usage_errors_write_nothing(
    score_images: ModuleType,
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "scores.csv"
    err = usage_error(
        score_images, score_args(models, out, "--heatmaps", str(tmp_path / "h"), *extra), capsys
    )
    assert message in err
    assert not out.exists() and not (tmp_path / "h").exists()


def test_road_mode_checks_the_numeric_flags_too(
    score_images: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "road"
    args = ["--road", "folder", "--root", str(tmp_path), "--out", str(out), "--batch-size", "0"]
    assert "--batch-size must be >= 1, got 0" in usage_error(score_images, args, capsys)
    assert "--detector names no detector" in usage_error(
        score_images, [*args[:-2], "--detector", ","], capsys
    )
    assert not out.exists()


def test_model_batches_refuse_a_batch_size_below_one() -> None:
    images = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "x")
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"batch size must be >= 1, got {bad}"):
            next(iter_model_batches(images, 256, bad, torch.device("cpu")))


def test_model_batches_refuse_levels_beyond_the_models_bins() -> None:
    # 0…255 levels into a 32-bin model would leave [−0.5, 0.5) and score silently.
    images = ImageSet(
        torch.full((2, 3, 8, 8), 200, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), "mine"
    )
    with pytest.raises(
        ValueError, match=r"mine: image levels span 200…200, but the model takes 0…31 \(n_bins 32\)"
    ):
        next(iter_model_batches(images, 32, 4, torch.device("cpu")))
    with pytest.raises(ValueError, match="mine: image levels span"):
        score_image_set(GlowScorer(tiny_glow(n_bins=32)), images, [get_detector("raw")])
    assert next(iter_model_batches(images, 256, 4, torch.device("cpu")))[1].max() < 0.5


def test_every_rank_checks_the_levels_of_the_whole_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under torchrun a rank whose shard is clean must refuse too, not wait for the one that raised.
    import densead.scoring

    levels = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    levels[3] = 200  # in the last rank's shard only
    images = ImageSet(levels, torch.zeros(4, dtype=torch.long), "mine")
    monkeypatch.setattr(densead.scoring.dist, "shard_range", lambda n: slice(0, n // 2))  # rank 0 of 2
    with pytest.raises(ValueError, match=r"mine: image levels span 0…200"):
        score_image_set(GlowScorer(tiny_glow(n_bins=32)), images, [get_detector("raw")])


def test_a_float64_model_scores_its_own_dtype_and_a_missing_device_is_named() -> None:
    images = ImageSet(
        torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
        torch.zeros(5, dtype=torch.long),
        "set",
    )
    detectors = [get_detector("raw"), get_detector("last_scale")]
    single = score_image_set(GlowScorer(tiny_glow()), images, detectors, batch_size=2)
    double = score_image_set(GlowScorer(tiny_glow().double()), images, detectors, batch_size=2)
    for name in ("raw", "last_scale"):
        np.testing.assert_allclose(double[name], single[name], rtol=1e-5)
    with pytest.raises(ValueError, match=r"device: 'cuda:99', but this machine's CUDA devices"):
        score_image_set(GlowScorer(tiny_glow()), images, detectors, device="cuda:99")
    with pytest.raises(
        ValueError, match=r"device: 'gpu' is not a device; use auto, cpu, cuda or cuda:<index>"
    ):
        score_image_set(GlowScorer(tiny_glow()), images, detectors, device="gpu")


# ---- 4.-6. evaluate.py: sets, CSV contents, the help ----------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


HEADER = ["set", "index", "name", "label", "raw", "ratio"]


def scores_rows(set_name: str, n: int = 6, shift: float = 0.0) -> list[list]:
    return [[set_name, i, f"{i:05d}", -1, 100.0 + i + shift, float(i) + shift] for i in range(n)]


def eval_error(
    evaluate: ModuleType, capsys: pytest.CaptureFixture[str], out: Path, files: list[Path], *extra: str
) -> str:
    err = usage_error(evaluate, [*map(str, files), "--out", str(out), *extra], capsys)
    assert not out.exists(), "nothing may be written before the input is validated"
    return err


def test_evaluate_needs_anomaly_sets(evaluate: ModuleType, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    only_in = write_csv(tmp_path / "in.csv", HEADER, scores_rows("cif16") + scores_rows("general_test"))
    err = eval_error(evaluate, capsys, out, [only_in], "--in-set", "cif16")
    assert "no anomaly sets" in err and "'cif16', 'general_test'" in err and "in.csv" in err
    other = write_csv(tmp_path / "other.csv", HEADER, scores_rows("svhn", shift=50))
    err = eval_error(evaluate, capsys, out, [only_in, other], "--in-set", "cif16", "--anomaly-sets", "cif16")
    assert "--anomaly-sets lists the --in-set 'cif16'" in err
    err = eval_error(evaluate, capsys, out, [only_in, other], "--in-set", "cif16", "--anomaly-sets", "nope")
    assert "--anomaly-sets ['nope'] not among the sets" in err and "'svhn'" in err


def test_evaluate_refuses_a_set_in_two_files(evaluate: ModuleType, tmp_path: Path, capsys) -> None:
    a = write_csv(tmp_path / "a.csv", HEADER, scores_rows("cif16") + scores_rows("svhn", shift=50))
    b = write_csv(tmp_path / "b.csv", HEADER, scores_rows("svhn", shift=60))
    err = eval_error(evaluate, capsys, tmp_path / "eval", [a, b], "--in-set", "cif16")
    assert "set 'svhn' is in both" in err and str(a) in err and str(b) in err
    err = eval_error(evaluate, capsys, tmp_path / "eval", [a, a], "--in-set", "cif16")
    assert "set 'cif16' is in both" in err


def test_read_scores_csv_errors_name_file_line_and_column(tmp_path: Path) -> None:
    rows = scores_rows("cif16")
    short = write_csv(tmp_path / "short.csv", HEADER, [*rows[:2], rows[2][:3], *rows[3:]])
    with pytest.raises(ValueError, match=r"short\.csv, line 4: 3 fields, but the header has 6"):
        read_scores_csv(short)
    bad = [list(r) for r in rows]
    bad[1][4], bad[3][5] = "oops", ""
    bad_csv = write_csv(tmp_path / "bad.csv", HEADER, bad)
    with pytest.raises(
        ValueError, match=r"bad\.csv, line 3 \(set 'cif16'\): score column 'raw' holds 'oops'"
    ):
        read_scores_csv(bad_csv, score_columns=["raw", "ratio"])
    with pytest.raises(ValueError, match=r"bad\.csv, line 5 \(set 'cif16'\): score column 'ratio' is empty"):
        read_scores_csv(bad_csv, score_columns=["ratio"])
    for value in ("nan", "inf", "-inf"):
        bad = [list(r) for r in rows]
        bad[4][4] = value
        f = write_csv(tmp_path / "nonfinite.csv", HEADER, bad)
        with pytest.raises(
            ValueError, match=rf"nonfinite\.csv, line 6 \(set 'cif16'\): .*'raw' holds '{value}'"
        ):
            read_scores_csv(f, score_columns=lambda c: c == "raw")
    # not asked for as scores: text columns stay text, as before
    assert read_scores_csv(bad_csv)["raw"].dtype.kind == "U"


def test_evaluate_names_file_column_and_set_of_bad_scores(
    evaluate: ModuleType, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "eval"
    good = write_csv(tmp_path / "good.csv", HEADER, scores_rows("cif16"))
    bad = scores_rows("svhn", shift=50)
    bad[2][5] = "nan"
    nan_csv = write_csv(tmp_path / "nan.csv", HEADER, bad)
    err = eval_error(evaluate, capsys, out, [good, nan_csv], "--in-set", "cif16")
    assert "nan.csv, line 4 (set 'svhn'): score column 'ratio' holds 'nan'" in err
    # the bad column is not asked for: evaluated without it
    assert (
        evaluate.main([str(good), str(nan_csv), "--in-set", "cif16", "--detectors", "raw", "--out", str(out)])
        == 0
    )
    assert [r["detector"] for r in csv.DictReader((out / "metrics.csv").open())] == ["raw"]


def test_evaluate_text_column_is_refused_unless_left_out(
    evaluate: ModuleType, tmp_path: Path, capsys
) -> None:
    rows = [[*r, "looks odd"] for r in scores_rows("cif16") + scores_rows("svhn", shift=50)]
    noted = write_csv(tmp_path / "noted.csv", [*HEADER, "note"], rows)
    out = tmp_path / "eval"
    err = eval_error(evaluate, capsys, out, [noted], "--in-set", "cif16")
    assert "noted.csv, line 2 (set 'cif16'): score column 'note' holds 'looks odd'" in err
    assert "without --detectors" in err
    assert (
        evaluate.main([str(noted), "--in-set", "cif16", "--detectors", "raw", "ratio", "--out", str(out)])
        == 0
    )


def test_evaluate_without_a_set_column(evaluate: ModuleType, tmp_path: Path, capsys) -> None:
    no_set = write_csv(tmp_path / "noset.csv", HEADER[1:], [r[1:] for r in scores_rows("cif16")])
    err = eval_error(evaluate, capsys, tmp_path / "eval", [no_set], "--in-set", "cif16")
    assert "noset.csv: no 'set' column (columns: index, name, label, raw, ratio)" in err


def test_set_and_name_columns_stay_text(evaluate: ModuleType, tmp_path: Path) -> None:
    a = write_csv(tmp_path / "a.csv", HEADER, scores_rows("1"))
    b = write_csv(tmp_path / "b.csv", HEADER, scores_rows("2", shift=50))
    cols = read_scores_csv([a, b])
    assert cols["set"].tolist()[:1] == ["1"] and cols["name"].tolist()[:2] == ["00000", "00001"]
    out = tmp_path / "eval"
    assert evaluate.main([str(a), str(b), "--in-set", "1", "--out", str(out)]) == 0
    metrics = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["anomaly_set"] for r in metrics} == {"2"} and float(metrics[0]["auroc"]) == 1.0


def test_set_names_with_commas_and_quotes_keep_their_csv_columns(
    evaluate: ModuleType, tmp_path: Path, capsys
) -> None:
    odd = 'svhn, test "b"'  # a legal --set-name; score_images.py writes it quoted
    scores = write_csv(tmp_path / "s.csv", HEADER, scores_rows("cif16") + scores_rows(odd, shift=50))
    out = tmp_path / "eval"
    args = [str(scores), "--in-set", "cif16", "--bootstrap", "100", "--compare", "raw", "--out", str(out)]
    assert evaluate.main(args) == 0
    for name in ("metrics.csv", "differences.csv"):
        rows = list(csv.reader((out / name).open()))
        assert {len(r) for r in rows} == {len(rows[0])}, name
        assert {r[rows[0].index("anomaly_set")] for r in rows[1:]} == {odd}, name
    # a text column asked for as scores is named, not a float conversion error
    err = eval_error(evaluate, capsys, tmp_path / "e2", [scores], "--in-set", "cif16", "--detectors", "set")
    assert "s.csv: column(s) ['set'] hold set and image names, not scores" in err
    # a detector named twice is evaluated once; one whose name is a path writes nothing
    args = [str(scores), "--in-set", "cif16", "--detectors", "raw", "raw", "--out", str(tmp_path / "e3")]
    assert evaluate.main(args) == 0
    assert [r["detector"] for r in csv.DictReader((tmp_path / "e3" / "metrics.csv").open())] == ["raw"]
    pathy = write_csv(tmp_path / "p.csv", [*HEADER, "../up"], [[*r, 1.0 * r[1]] for r in scores_rows("a")])
    write_csv(tmp_path / "q.csv", [*HEADER, "../up"], [[*r, 5.0 + r[1]] for r in scores_rows("b")])
    err = eval_error(evaluate, capsys, tmp_path / "e4", [pathy, tmp_path / "q.csv"], "--in-set", "a")
    assert "detector name(s) ['../up'] hold a path separator" in err


def test_columns_in_another_order_are_aligned_by_name(tmp_path: Path) -> None:
    a = write_csv(tmp_path / "a.csv", HEADER, scores_rows("cif16"))
    order = [5, 3, 0, 4, 2, 1]
    b = write_csv(
        tmp_path / "b.csv",
        [HEADER[i] for i in order],
        [[r[i] for i in order] for r in scores_rows("x", 3, 50)],
    )
    cols = read_scores_csv([a, b])
    assert list(cols) == HEADER
    assert cols["set"].tolist() == ["cif16"] * 6 + ["x"] * 3
    assert cols["raw"].tolist()[6:] == [150.0, 151.0, 152.0] and cols["ratio"].tolist()[6:] == [
        50.0,
        51.0,
        52.0,
    ]
    c = write_csv(tmp_path / "c.csv", [*HEADER[:-1], "other"], scores_rows("y"))
    with pytest.raises(
        ValueError,
        match=r"c\.csv: columns differ from those of .*a\.csv: missing \['ratio'\], extra \['other'\]",
    ):
        read_scores_csv([a, c])


def test_evaluate_help_says_general_test_is_left_out(evaluate: ModuleType, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: every set except --in-set and general_test" in help_text
    rows = scores_rows("cif16") + scores_rows("general_test", shift=20) + scores_rows("svhn", shift=50)
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [str(write_csv(tmp_path / "s.csv", HEADER, rows)), "--in-set", "cif16", "--out", str(out)]
        )
        == 0
    )
    assert {r["anomaly_set"] for r in csv.DictReader((out / "metrics.csv").open())} == {"svhn"}


def test_evaluate_bootstrap_intervals_and_paired_differences(
    evaluate: ModuleType, tmp_path: Path, capsys
) -> None:
    rng = np.random.default_rng(0)
    rows = [["cif16", i, f"{i:05d}", -1, rng.normal(), rng.normal()] for i in range(60)]
    rows += [["svhn", i, f"{i:05d}", -1, rng.normal(1), rng.normal(0.2)] for i in range(30)]
    scores = write_csv(tmp_path / "s.csv", HEADER, rows)
    out = tmp_path / "eval"
    base = [str(scores), "--in-set", "cif16", "--out", str(out)]
    for extra, message in (
        (["--compare", "raw"], "--compare needs --bootstrap N"),
        (["--seed", "3"], "--seed needs --bootstrap N"),
        (["--confidence", "0.9"], "--confidence needs --bootstrap N"),
        (
            ["--bootstrap", "200", "--compare", "nope"],
            "--compare 'nope' is not among the detectors: raw, ratio",
        ),
        (["--bootstrap", "-1"], "--bootstrap must be >= 0, got -1"),
        (["--bootstrap", "20"], "--bootstrap 20: at least 100 resamples"),
        (["--bootstrap", "200", "--confidence", "1.5"], "--confidence must be in (0, 1), got 1.5"),
        (["--bootstrap", "200", "--seed", "-2"], "--seed must be >= 0, got -2"),
    ):
        assert message in eval_error(evaluate, capsys, out, [], *base[:3], *extra, "--out", str(out))
    assert evaluate.main([*base, "--bootstrap", "200", "--compare", "raw"]) == 0
    printed = capsys.readouterr().out
    assert "95% bootstrap interval, 200 resamples" in printed and "detector − raw" in printed
    metrics = list(csv.DictReader((out / "metrics.csv").open()))
    for r in metrics:
        for m in ("auroc", "ap", "fpr95"):
            assert float(r[f"{m}_lo"]) <= float(r[m]) <= float(r[f"{m}_hi"]), (r["detector"], m)
    diffs = list(csv.DictReader((out / "differences.csv").open()))
    assert list(diffs[0]) == ["detector", "baseline", "anomaly_set", "metric", "difference", "lo", "hi"]
    assert [(d["detector"], d["baseline"], d["metric"]) for d in diffs] == [
        ("ratio", "raw", m) for m in ("auroc", "ap", "fpr95")
    ]
    by = {r["detector"]: float(r["auroc"]) for r in metrics}
    assert float(diffs[0]["difference"]) == pytest.approx(by["ratio"] - by["raw"])
    # The same flags give the same intervals; without --compare the differences go, without
    # --bootstrap the interval columns.
    first = (out / "metrics.csv").read_text()
    assert evaluate.main([*base, "--bootstrap", "200"]) == 0
    assert (out / "metrics.csv").read_text() == first and not (out / "differences.csv").exists()
    assert evaluate.main(base) == 0
    assert "auroc_lo" not in (out / "metrics.csv").read_text() and "[" not in (out / "metrics.md").read_text()


def test_a_missing_dataset_or_cuda_device_is_a_usage_error_not_a_traceback(
    models: dict[str, Path], score_images: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.csv"
    base = ["--checkpoint", str(models["in"]), "--out", str(out), "--no-progress"]
    err = usage_error(score_images, [*base, "--dataset", "svhn", "--root", str(tmp_path / "svhn")], capsys)
    assert "torchvision svhn (test) under" in err and "--download" in err and "Traceback" not in err
    err = usage_error(score_images, [*score_args(models, out)[:-3], "--device", "cuda:99"], capsys)
    assert "--device: 'cuda:99', but this machine's CUDA devices" in err
    err = usage_error(score_images, score_args(models, out, "--n-heatmaps", "-1"), capsys)
    assert "--n-heatmaps must be >= 0, got -1" in err
    assert not out.exists() and not (tmp_path / "svhn").exists()


def test_outputs_that_cannot_be_written_stop_the_tool_before_scoring(
    models: dict[str, Path],
    score_images: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import densead.scoring

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored before the outputs were checked")

    monkeypatch.setattr(densead.scoring, "score_image_set", no_scoring)
    monkeypatch.setattr(score_images, "score_image_set", no_scoring)
    (tmp_path / "afile").write_text("")
    err = usage_error(score_images, score_args(models, tmp_path), capsys)  # --out is a folder
    assert f"--out: {tmp_path} is a folder; image scores go into a CSV file" in err
    err = usage_error(score_images, score_args(models, tmp_path / "afile" / "s.csv"), capsys)
    assert "--out: " in err and "afile exists and is not a folder" in err  # the folder it goes in
    err = usage_error(
        score_images, score_args(models, tmp_path / "s.csv", "--heatmaps", str(tmp_path / "afile")), capsys
    )
    assert "--heatmaps: " in err and "afile exists and is not a folder" in err
    # Road mode: a file as --out, one line (no usage block), before the frames are read.
    road = ["--road", "folder", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "afile")]
    err = usage_error(score_images, [*road, "--checkpoint", str(models["in"])], capsys)
    assert err.count("\n") == 1 and "output folder: " in err and "afile exists and is not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_heat_map_folders_are_replaced_whole_and_only_when_a_run_wrote_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a" / "heat"
    assert check_heatmap_folder(target) == target  # new: fine, and nothing is made yet
    assert not (tmp_path / "a").exists()
    with staged_heatmaps(target, {"run": 1}) as folder:
        (folder / "x_raw.png").write_bytes(b"1")
        assert not (tmp_path / "a").exists()  # nothing in place before the block ends
    assert sorted(p.name for p in target.iterdir()) == ["heatmaps.json", "x_raw.png"]
    check_heatmap_folder(target)  # an earlier run's folder: replaced whole
    with pytest.raises(RuntimeError, match="stop"), staged_heatmaps(target, {"run": 2}) as folder:
        (folder / "y_raw.png").write_bytes(b"2")
        raise RuntimeError("stop")
    assert sorted(p.name for p in target.iterdir()) == ["heatmaps.json", "x_raw.png"]  # untouched
    with staged_heatmaps(target, {"run": 3}) as folder:
        (folder / "z_raw.png").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["heatmaps.json", "z_raw.png"]
    assert '"run": 3' in (target / "heatmaps.json").read_text()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["heat"]  # no staging folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nor one of the first run
    (target / "heatmaps.json").unlink()
    with pytest.raises(ValueError, match=r"--heatmaps: .*heat holds files that no heat-map run wrote"):
        check_heatmap_folder(target)
    with pytest.raises(ValueError, match=r"a is or holds .*a/tables, which the heat maps would replace"):
        check_heatmap_folder(tmp_path / "a", outputs=[tmp_path / "a" / "tables"])
    monkeypatch.chdir(target)
    for here in (".", str(tmp_path / "a")):
        with pytest.raises(ValueError, match="is or holds the current folder"):
            check_heatmap_folder(here, "heatmap_dir")


def test_an_earlier_heat_map_folder_holding_other_files_or_the_runs_inputs_is_refused(
    score_images: ModuleType, models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """The new maps replace the folder whole: an input or checkpoint someone kept in it would be
    deleted with the old maps."""
    heat = tmp_path / "hm"
    with staged_heatmaps(heat, {"run": 1}) as folder:
        (folder / "x_raw.png").write_bytes(b"1")
    (heat / "data.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"hm holds 'data\.npz', which no heat-map run wrote \(1 such"):
        check_heatmap_folder(heat)
    (heat / "data.npz").unlink()
    check_heatmap_folder(heat)  # PNGs and the record only: replaced whole
    with pytest.raises(
        ValueError, match=r"hm is or holds .*hm/x_raw\.png, which the heat maps would replace"
    ):
        check_heatmap_folder(heat, outputs=[heat / "x_raw.png"])  # the tool passes its inputs too
    # A link to a folder: the folder it names gets the new maps, the link stays a link.
    link = tmp_path / "link"
    link.symlink_to(heat)
    with staged_heatmaps(link, {"run": 2}) as folder:
        (folder / "y_raw.png").write_bytes(b"2")
    assert link.is_symlink() and sorted(p.name for p in heat.iterdir()) == ["heatmaps.json", "y_raw.png"]
    # The tool: its input kept in an earlier heat-map folder is named, and stays.
    kept = heat / "images.npz"
    shutil.copy(models["images"], kept)
    args = score_args(models, tmp_path / "s.csv", "--heatmaps", str(heat))
    args[args.index("--input") + 1] = str(kept)
    err = usage_error(score_images, args, capsys)
    assert (
        "--heatmaps: " in err and "images.npz" in err and kept.is_file() and not (tmp_path / "s.csv").exists()
    )


def test_atomic_writes_take_any_name_the_file_system_takes(tmp_path: Path) -> None:
    from densead.io import atomic_write_text

    path = tmp_path / ("s" * 250 + ".csv")  # 254 characters: the temporary name must not be longer
    atomic_write_text(path, "set,raw\n")
    assert path.read_text() == "set,raw\n" and [p.name for p in tmp_path.iterdir()] == [path.name]
