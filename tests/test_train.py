"""Training: outlier-loss numerics, exact resume, checkpoints, finetuning, bad input."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densead.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OutlierConfig,
    TrainConfig,
    TrainRunConfig,
    load_config,
    to_dict,
)
from densead.flows import Glow
from densead.train import (
    check_output,
    load_checkpoint,
    load_glow,
    outlier_loss,
    resume_changes,
    train_glow,
    training_step,
)

DIGITS = DataConfig(
    source="sklearn_digits", channels=1, size=8, exclude_classes=(0,), stop=600, augment="translate"
)
TINY = ModelConfig(in_channels=1, n_scales=2, n_steps=2, hidden=16, n_bins=17)


def run_cfg(out: Path, steps: int, **train) -> TrainRunConfig:
    train = {"log_every": 1, **train}
    tcfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3, checkpoint_every=100, **train)
    return TrainRunConfig(str(out), DIGITS, TINY, tcfg)


def test_outlier_loss_formula() -> None:
    lp, ref = torch.tensor([-5000.0, -3000.0, -1e9]), torch.tensor([-4000.0, -4000.0, -4000.0])
    expected = -6000.0 * F.logsigmoid((ref - lp) / 1000.0)
    assert torch.allclose(outlier_loss(lp, ref, 6000.0, 1000.0), expected)
    # the trained model liking the outlier more than the reference costs more
    loss = outlier_loss(lp, ref, 6000.0, 1000.0)
    assert loss[1] > loss[0] > loss[2] >= 0


def _model_and_opt() -> tuple[Glow, torch.optim.Optimizer]:
    model = Glow(1, n_scales=2, n_steps=2, hidden=16)
    model.train()(torch.rand(32, 1, 8, 8) - 0.5)
    return model, torch.optim.Adamax(model.parameters(), lr=1e-3)


def test_non_finite_samples_are_dropped_and_training_stays_finite() -> None:
    model, opt = _model_and_opt()
    x = torch.rand(8, 1, 8, 8) - 0.5
    x[:2] = 1e30  # log p = −inf (overflow) for two of eight samples
    with torch.no_grad():
        assert not torch.isfinite(model(x).log_prob()).all()
    before = [p.detach().clone() for p in model.parameters()]
    result = training_step(model, opt, x)
    assert not result.skipped and result.dropped == 2
    assert torch.isfinite(result.nll)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_batch_is_skipped_when_most_samples_are_non_finite() -> None:
    model, opt = _model_and_opt()
    x = torch.rand(8, 1, 8, 8) - 0.5
    x[:7] = 1e30
    before = [p.detach().clone() for p in model.parameters()]
    result = training_step(model, opt, x)
    assert result.skipped and result.dropped == 7
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_outlier_batch_with_minus_inf_trains_without_nan() -> None:
    model, opt = _model_and_opt()
    reference, _ = _model_and_opt()
    ocfg = OutlierConfig(DIGITS, "unused")
    x = torch.rand(8, 1, 8, 8) - 0.5
    x_out = torch.rand(8, 1, 8, 8) - 0.5
    x_out[:3] = 1e30
    result = training_step(model, opt, x, x_out, reference, ocfg)
    assert not result.skipped and result.dropped == 3
    assert torch.isfinite(result.outlier) and result.outlier > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("overflows", ["model", "reference"])
def test_an_outlier_only_one_model_gives_minus_inf_is_dropped_not_the_batch(overflows: str) -> None:
    # Under the trained model its loss saturates at 0 (finite) but its gradient is not finite;
    # under the reference its loss is infinite but its gradient finite (saturated). Either way it
    # is dropped like any sample without a finite likelihood, and the step goes on with the rest.
    torch.manual_seed(0)
    model, opt = _model_and_opt()
    reference, _ = _model_and_opt()
    sharp = model if overflows == "model" else reference
    with torch.no_grad():  # sharper coupling scales, so a far input overflows this model only
        for name, p in sharp.named_parameters():
            if "net.4" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.rand(8, 1, 8, 8) - 0.5
    x_out = torch.rand(8, 1, 8, 8) - 0.5
    x_out[0] *= 1e4
    with torch.no_grad():
        assert not torch.isfinite(sharp(x_out[:1]).log_prob()).any()
        other = reference if sharp is model else model
        assert torch.isfinite(other(x_out).log_prob()).all()
    before = [p.detach().clone() for p in model.parameters()]
    result = training_step(model, opt, x, x_out, reference, OutlierConfig(DIGITS, "unused"))
    assert not result.skipped and result.dropped == 1
    assert torch.isfinite(result.outlier) and result.outlier > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("log_every", [1, 4])  # 4: the 3-step run's last entry is off the grid
def test_resume_equals_uninterrupted_training(tmp_path: Path, log_every: int) -> None:
    straight = train_glow(run_cfg(tmp_path / "a", 6, log_every=log_every), progress=False)
    train_glow(run_cfg(tmp_path / "b", 3, log_every=log_every), progress=False)
    resumed = train_glow(run_cfg(tmp_path / "b", 6, log_every=log_every), resume=True, progress=False)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 6 and b["finished"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"] == b["history"]


def test_checkpoint_is_state_dict_plus_resolved_config(tmp_path: Path) -> None:
    path = train_glow(run_cfg(tmp_path / "run", 2), progress=False)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["data"]["source"] == "sklearn_digits" and ckpt["model_config"]["n_bins"] == 17
    assert (tmp_path / "run" / "config.yaml").is_file()
    model, cfg = load_glow(path)
    assert cfg == TINY and not model.training
    assert all(bool(m.initialized) for m in model.modules() if hasattr(m, "initialized"))
    assert not list(tmp_path.joinpath("run").glob(".*tmp*")), "temporary files left behind"


def test_finetune_and_outlier_training_end_to_end(tmp_path: Path) -> None:
    general = train_glow(run_cfg(tmp_path / "general", 2), progress=False)
    finetuned = train_glow(run_cfg(tmp_path / "in", 2, init_from=str(general)), progress=False)
    outlier_data = DataConfig(source="sklearn_digits", channels=1, size=8, classes=(0,))
    cfg = TrainRunConfig(
        str(tmp_path / "in_outlier"),
        DIGITS,
        TINY,
        TrainConfig(steps=2, batch_size=16, init_from=str(finetuned)),
        OutlierConfig(outlier_data, str(general)),
    )
    ckpt = load_checkpoint(train_glow(cfg, progress=False))
    assert ckpt["step"] == 2 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
    )
    assert ckpt["history"][-1][2] > 0  # the outlier term was computed


def test_bad_inputs(tmp_path: Path) -> None:
    rgb_model = TrainRunConfig(str(tmp_path / "x"), DIGITS, ModelConfig(in_channels=3, n_scales=2, n_steps=1))
    with pytest.raises(ValueError, match=r"data: images have 1 channels but model.in_channels is 3"):
        train_glow(rgb_model, progress=False)
    with pytest.raises(FileNotFoundError, match=r"^train\.init_from: checkpoint not found: .*missing\.pt"):
        train_glow(run_cfg(tmp_path / "y", 1, init_from=str(tmp_path / "missing.pt")), progress=False)
    outlier = OutlierConfig(DIGITS, str(tmp_path / "nogeneral.pt"))
    with pytest.raises(
        FileNotFoundError, match=r"^outlier\.reference: checkpoint not found: .*nogeneral\.pt"
    ):
        train_glow(replace(run_cfg(tmp_path / "y", 1), outlier=outlier), progress=False)
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_glow(tmp_path / "garbage.pt")
    other = train_glow(
        TrainRunConfig(
            str(tmp_path / "other"), DIGITS, ModelConfig(1, 2, 1, 8, n_bins=17), TrainConfig(steps=1)
        ),
        progress=False,
    )
    with pytest.raises(ValueError, match="differs"):
        train_glow(run_cfg(tmp_path / "z", 1, init_from=str(other)), progress=False)


def test_a_run_needs_at_least_one_step_and_writes_nothing_otherwise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.steps must be >= 1 to train, got 0"):
        train_glow(run_cfg(tmp_path / "run", 0), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_before_its_first_checkpoint_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_glow(run_cfg(out, 2), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wider = TrainRunConfig(str(out), DIGITS, replace(TINY, hidden=32), run_cfg(out, 4).train)

    def stop(step: int, result: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_glow(wider, on_step=stop, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # config.yaml still fits checkpoint.pt
    train_glow(load_config(TrainRunConfig, out / "config.yaml"), resume=True, progress=False)


def test_an_existing_checkpoint_is_kept_unless_resumed_or_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = train_glow(run_cfg(out, 2), progress=False)
    before = path.read_bytes()
    with pytest.raises(
        FileExistsError, match=r"run/checkpoint\.pt exists: continue it with --resume, train anew"
    ):
        train_glow(run_cfg(out, 3), progress=False)
    assert path.read_bytes() == before
    train_glow(run_cfg(out, 1, seed=5), progress=False, overwrite=True)
    fresh = load_checkpoint(path)
    assert fresh["step"] == 1 and fresh["config"]["train"]["seed"] == 5


def test_resume_refuses_other_settings_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = train_glow(run_cfg(out, 2), progress=False)
    before = path.read_bytes()
    with pytest.raises(
        ValueError, match=r"cannot resume.*train\.lr \(0\.001 in the checkpoint, 0\.002 now\)"
    ) as e:
        train_glow(
            replace(run_cfg(out, 4), train=replace(run_cfg(out, 4).train, lr=2e-3)),
            resume=True,
            progress=False,
        )
    assert str(path) in str(e.value) and "train.init_from=" in str(e.value)
    for changed, message in [
        (run_cfg(out, 4, seed=1), r"train\.seed \(0 in the checkpoint, 1 now\)"),
        (run_cfg(out, 4, amp=True), r"train\.amp \(False in the checkpoint, True now\)"),
        (
            replace(run_cfg(out, 4), data=replace(DIGITS, stop=500)),
            r"data\.stop \(600 in the checkpoint, 500 now\)",
        ),
        (run_cfg(out, 1), r"train\.steps \(1 now, but the checkpoint is at step 2\)"),  # a finished run
        (
            replace(run_cfg(out, 4), model=replace(TINY, hidden=32)),
            r"it is another model: model\.hidden \(16 in the checkpoint, 32 now\)",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            train_glow(changed, resume=True, progress=False)
    assert path.read_bytes() == before
    # Where it writes and runs, how often it logs and saves, and how far it goes may change.
    moved = tmp_path / "moved"
    out.rename(moved)
    cfg = run_cfg(moved, 3, device="cpu", fast="off", lr_reference_batch=32)  # unused: lr_scaling none
    # Settings as they act: the same classes in another order, and a path and split the
    # scikit-learn data does not read.
    data = replace(DIGITS, exclude_classes=(0, 0), path=str(tmp_path / "unread"), split="test")
    cfg = replace(cfg, data=data, train=replace(cfg.train, log_every=2, checkpoint_every=1))
    assert load_checkpoint(train_glow(cfg, resume=True, progress=False))["step"] == 3


def test_an_outlier_batch_size_of_zero_is_the_training_batch_size() -> None:
    outlier = OutlierConfig(DIGITS, "general.pt")
    cfg = TrainRunConfig("run", DIGITS, TINY, TrainConfig(batch_size=16), outlier)
    done = {"config": to_dict(cfg), "step": 0}
    assert resume_changes(done, replace(cfg, outlier=replace(outlier, batch_size=16))) == []
    (change,) = resume_changes(done, replace(cfg, outlier=replace(outlier, batch_size=8)))
    assert str(change) == "outlier.batch_size (16 in the checkpoint, 8 now)"


def test_outputs_get_the_mode_of_any_new_file(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        path = train_glow(run_cfg(tmp_path / "run", 1), progress=False)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone makes 0600
    assert stat.S_IMODE((path.parent / "config.yaml").stat().st_mode) == 0o644


def test_a_checkpoint_holding_objects_is_refused_without_advice_to_unpickle_it(tmp_path: Path) -> None:
    path = tmp_path / "objects.pt"
    torch.save({"model": Path("x"), "model_config": {}}, path)
    with pytest.raises(ValueError, match=r"objects\.pt: not a readable densead checkpoint") as err:
        load_glow(path)
    assert "weights_only=False" not in str(err.value) and "objects other than tensors" in str(err.value)


def test_small_entries_read_mapped_equal_a_whole_read_in_any_checkpoint_format(tmp_path: Path) -> None:
    cfg = run_cfg(tmp_path / "run", 2)
    path = train_glow(cfg, progress=False)
    whole, mapped = load_checkpoint(path), load_checkpoint(path, mmap=True)
    assert mapped["step"] == whole["step"] == 2 and mapped["history"] == whole["history"]
    assert mapped["config"] == whole["config"] and mapped["model_config"] == whole["model_config"]
    assert all(torch.equal(mapped["model"][k], v) for k, v in whole["model"].items())
    # What a resume keeps from its check holds no tensors, so no mapping outlives the check.
    assert check_output(path, cfg, resume=True, overwrite=False) == {"step": 2, "finished": True}

    legacy = tmp_path / "legacy.pt"  # the pre-zip format, which cannot be mapped, is read whole
    torch.save(whole, legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint(legacy, mmap=True)["history"] == whole["history"]

    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    torch.save({"model": Path("x"), "model_config": {}}, tmp_path / "objects.pt")
    with pytest.raises(
        ValueError, match=r"cut\.pt: corrupt checkpoint \(truncated or damaged: no readable zip"
    ):
        load_checkpoint(tmp_path / "cut.pt", mmap=True)
    with pytest.raises(
        ValueError, match=r"objects\.pt: not a readable densead checkpoint \(.*objects other than"
    ):
        load_checkpoint(tmp_path / "objects.pt", mmap=True)


def test_a_resume_from_another_folder_compares_the_data_files_not_their_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    for folder, seed in (("first", 0), ("second", 1)):  # two different image sets, one name
        (tmp_path / folder / "data").mkdir(parents=True)
        images = np.random.default_rng(seed).integers(0, 256, (64, 8, 8), dtype=np.uint8)
        np.savez(tmp_path / folder / "data" / "set.npz", images=images)
    data = DataConfig(source="npz", path="data/set.npz", channels=1, size=8)

    def cfg(steps: int, path: str = "data/set.npz") -> TrainRunConfig:
        tcfg = TrainConfig(steps=steps, batch_size=16, log_every=1, checkpoint_every=100)
        return TrainRunConfig(str(tmp_path / "run"), replace(data, path=path), TINY, tcfg)

    monkeypatch.chdir(tmp_path / "first")
    train_glow(cfg(2), progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["data"]["path"] == str(
        tmp_path / "first" / "data" / "set.npz"
    )
    monkeypatch.chdir(tmp_path / "second")  # the same spelling names another file here
    with pytest.raises(ValueError, match=r"cannot resume: it was trained with other settings: data\.path"):
        train_glow(cfg(3), resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    # The same file spelled from here resumes.
    resumed = train_glow(cfg(3, path="../first/data/set.npz"), resume=True, progress=False)
    assert load_checkpoint(resumed)["step"] == 3


def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path: Path) -> None:
    ckpt = load_checkpoint(train_glow(run_cfg(tmp_path / "run", 1), progress=False))
    ckpt["model_config"]["hidden"] *= 2  # every coupling net's shapes now differ
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(ValueError) as err:
        load_glow(tmp_path / "odd.pt")
    message = str(err.value)
    assert "\n" not in message and "weights do not fit the stored model config: size mismatch for" in message
    assert re.search(r"\(and \d+ more\)$", message), message
