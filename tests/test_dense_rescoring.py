"""Rescoring into the folder of a previous run replaces that run as a whole (densead.dense_scoring)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import densead.dense_scoring as dense_scoring
from densead.data.road import RoadDataset, RoadFrame
from densead.dense_scoring import MapRescale, write_frame_maps

H, W = 12, 16


class FakeScorer:
    """Maps that are a detector-specific multiple of the frame's grey level; raises on call ``fail_on``."""

    def __init__(
        self, names: Sequence[str], fail_on: int | None = None, error: type[BaseException] = RuntimeError
    ):
        self.names = tuple(names)
        self.fail_on, self.error, self.calls = fail_on, error, 0

    def maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.error(f"scorer broke on call {self.calls}")
        grey = np.stack([im.astype(np.float32).mean(axis=-1) for im in images])
        return {name: (k + 1) * grey for k, name in enumerate(self.names)}

    def describe(self) -> dict[str, Any]:
        return {"scorer": "fake"}


def frames(root: Path, n: int) -> RoadDataset:
    """``n`` random unlabelled frames f0, f1, ... (the first ``n`` of one fixed set)."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    index = []
    for i in range(n):
        path = root / f"f{i}.png"
        if not path.exists():
            assert cv2.imwrite(str(path), rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        index.append(RoadFrame(f"f{i}", path, None))
    return RoadDataset(root, index)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_under(folder)}


def score(tmp_path: Path, n: int, detectors: Sequence[str], **kwargs: Any) -> dense_scoring.DenseRun:
    return write_frame_maps(frames(tmp_path / "frames", n), FakeScorer(detectors), tmp_path / "out", **kwargs)


def expected_files(names: Sequence[str], detectors: Sequence[str], overlays: bool = True) -> list[str]:
    files = [f"maps/{d}/{n}.npy" for d in detectors for n in names]
    if overlays:
        files += [f"overlays/{d}/{n}.png" for d in detectors for n in names]
    return sorted(files + ["rescale.json", "run.json", "summary.csv"])


def test_rescoring_fewer_frames_removes_the_dropped_frames_maps_and_overlays(tmp_path: Path) -> None:
    score(tmp_path, 3, ["a", "b"], progress=False)
    out = tmp_path / "out"
    assert files_under(out) == expected_files(["f0", "f1", "f2"], ["a", "b"])
    run = score(tmp_path, 2, ["a", "b"], progress=False)
    assert files_under(out) == expected_files(["f0", "f1"], ["a", "b"])
    assert run.names == ("f0", "f1")
    assert json.loads((out / "run.json").read_text())["frames"] == ["f0", "f1"]
    assert (out / "summary.csv").read_text().count("\n") == 3  # header and two frames
    assert not list(out.glob(".partial-*"))


def test_rescoring_other_detectors_removes_the_old_detectors_maps_and_overlays(tmp_path: Path) -> None:
    score(tmp_path, 2, ["a", "b"], progress=False)
    run = score(tmp_path, 2, ["c"], progress=False)
    out = tmp_path / "out"
    assert files_under(out) == expected_files(["f0", "f1"], ["c"])
    assert run.detectors == ("c",) and set(run.rescale.bounds) == {"c"}
    assert json.loads((out / "rescale.json").read_text()).keys() == {"c"}


def test_rescoring_without_overlays_removes_the_old_overlays(tmp_path: Path) -> None:
    score(tmp_path, 2, ["a"], progress=False)
    out = tmp_path / "out"
    assert (out / "overlays" / "a" / "f0.png").is_file()
    score(tmp_path, 2, ["a"], overlays=False, progress=False)
    assert files_under(out) == expected_files(["f0", "f1"], ["a"], overlays=False)
    assert not (out / "overlays").exists()


def test_files_of_the_user_in_out_dir_survive_a_rescoring(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "notes" / "todo.md").write_text("also mine")
    (out / "pixel_metrics.csv").write_text("kept")
    score(tmp_path, 3, ["a", "b"], progress=False)
    score(tmp_path, 1, ["b"], overlays=False, progress=False)
    assert files_under(out) == sorted(
        expected_files(["f0"], ["b"], overlays=False) + ["notes.txt", "notes/todo.md", "pixel_metrics.csv"]
    )
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "notes" / "todo.md").read_text() == "also mine"
    assert (out / "pixel_metrics.csv").read_text() == "kept"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_midway_leaves_the_previous_run_intact(tmp_path: Path, error: type[BaseException]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    score(tmp_path, 3, ["a", "b"], progress=False)
    before = snapshot(out)
    fixed = MapRescale.fit({"a": (0.0, 255.0), "c": (0.0, 255.0)})  # one pass: call 2 is frame f1
    scorer = FakeScorer(["a", "c"], fail_on=2, error=error)
    with pytest.raises(error, match="scorer broke on call 2"):
        write_frame_maps(frames(tmp_path / "frames", 2), scorer, out, rescale=fixed, progress=False)
    assert snapshot(out) == before
    assert json.loads((out / "run.json").read_text())["frames"] == ["f0", "f1", "f2"]
    assert not list(out.glob(".partial-*"))


def test_a_failure_after_the_swap_leaves_no_old_run_json(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    score(tmp_path, 3, ["a", "b"], progress=False)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(dense_scoring, "write_scores_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        score(tmp_path, 2, ["a"], overlays=False, progress=False)
    # The new maps are in place, but nothing of the old run claims them (or is left beside them).
    assert files_under(out) == ["maps/a/f0.npy", "maps/a/f1.npy", "notes.txt"]
    assert not list(out.glob(".partial-*"))
