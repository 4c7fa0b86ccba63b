"""densead.viz: overlays, atomic PNG writing, and the three plots."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from densead import viz
from densead.viz import heatmap_overlay, plot_bars, plot_roc_curves, plot_score_histograms, save_png


def colormap_rgb(level: int, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """The RGB colour a colormap gives to one uint8 level."""
    bgr = cv2.applyColorMap(np.full((1, 1), level, np.uint8), colormap)
    return bgr[0, 0, ::-1]


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------
# heatmap_overlay
# ---------------------------------------------------------------------------


def test_overlay_shape_dtype_and_alpha_extremes() -> None:
    image = random_image((40, 60, 3))
    scores = np.random.default_rng(1).normal(size=(40, 60))
    out = heatmap_overlay(image, scores)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    np.testing.assert_array_equal(heatmap_overlay(image, scores, alpha=0.0), image)
    # alpha = 1 is the pure colour map; the lowest score gets level 0, the highest 255.
    ramp = np.tile(np.linspace(0.0, 1.0, 60), (40, 1))
    heat = heatmap_overlay(image, ramp, alpha=1.0, vmin=0.0, vmax=1.0)
    np.testing.assert_array_equal(heat[:, 0], np.tile(colormap_rgb(0), (40, 1)))
    np.testing.assert_array_equal(heat[:, -1], np.tile(colormap_rgb(255), (40, 1)))
    # Half and half is the rounded mean of the two.
    half = heatmap_overlay(image, ramp, alpha=0.5, vmin=0.0, vmax=1.0).astype(int)
    assert np.abs(half - (image.astype(int) + heat.astype(int)) / 2).max() <= 0.5 + 1e-9


def test_overlay_grey_image_and_torch_scores() -> None:
    grey = random_image((20, 30))
    out = heatmap_overlay(grey, torch.rand(20, 30), alpha=0.0)
    assert out.shape == (20, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_overlay_resizes_score_map_bilinearly() -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    small = np.array([[0.0, 1.0], [0.0, 1.0]])  # left low, right high
    out = heatmap_overlay(image, small, alpha=1.0, vmin=0.0, vmax=1.0)
    assert out.shape == (20, 40, 3)
    np.testing.assert_array_equal(out[:, 0], np.tile(colormap_rgb(0), (20, 1)))
    np.testing.assert_array_equal(out[:, -1], np.tile(colormap_rgb(255), (20, 1)))
    # Bilinear: the middle column is an intermediate colour, neither end.
    levels = [tuple(colormap_rgb(v)) for v in range(256)]
    mid_level = levels.index(tuple(out[10, 20]))
    assert 64 < mid_level < 192


def test_overlay_non_finite_scores_shown_as_vmax() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    scores = np.tile(np.linspace(0.0, 1.0, 10), (10, 1))
    scores[2, 3], scores[5, 5], scores[7, 1] = np.nan, np.inf, -np.inf
    out = heatmap_overlay(image, scores, alpha=1.0)
    top = colormap_rgb(255)
    for r, c in [(2, 3), (5, 5), (7, 1)]:
        np.testing.assert_array_equal(out[r, c], top)
    # Non-finite values did not break the default range of the rest.
    np.testing.assert_array_equal(out[0, 0], colormap_rgb(0))
    # And with a small map that is resized, a nan does not spread nan (black) around.
    small = np.array([[0.0, np.nan], [0.5, 1.0]])
    big = heatmap_overlay(np.zeros((8, 8), np.uint8), small, alpha=1.0, vmin=0.0, vmax=1.0)
    np.testing.assert_array_equal(big[0, -1], top)


def test_overlay_default_range_is_robust_to_extremes() -> None:
    image = np.zeros((50, 50, 3), np.uint8)
    scores = np.tile(np.linspace(0.0, 1.0, 50), (50, 1))
    scores[0, 0] = 1e9  # one absurd pixel must not squash everything else into one colour
    out = heatmap_overlay(image, scores, alpha=1.0)
    assert len({tuple(p) for p in out.reshape(-1, 3)}) > 30
    # Explicit limits are used as given: everything above vmax saturates.
    sat = heatmap_overlay(image, scores, alpha=1.0, vmin=0.0, vmax=0.5)
    np.testing.assert_array_equal(sat[:, -1], np.tile(colormap_rgb(255), (50, 1)))


def test_overlay_constant_map_with_few_outliers() -> None:
    # p1 == p99 (most pixels equal): fall back to min/max so the outliers still show.
    scores = np.zeros((20, 20))
    scores[0, :2] = 5.0
    scores[1, :1] = 2.5
    out = heatmap_overlay(np.zeros((20, 20, 3), np.uint8), scores, alpha=1.0)
    np.testing.assert_array_equal(out[0, 0], colormap_rgb(255))
    np.testing.assert_array_equal(out[1, 0], colormap_rgb(128))  # halfway between min and max
    np.testing.assert_array_equal(out[10, 10], colormap_rgb(0))


def test_overlay_errors_name_shapes() -> None:
    image = random_image((10, 12, 3))
    with pytest.raises(ValueError, match=r"\(10, 12, 4\)"):
        heatmap_overlay(random_image((10, 12, 4)), np.zeros((10, 12)))
    with pytest.raises(ValueError, match=r"uint8.*float64"):
        heatmap_overlay(image.astype(np.float64), np.zeros((10, 12)))
    with pytest.raises(ValueError, match=r"score_map.*\(1, 10, 12\).*\(10, 12, 3\)"):
        heatmap_overlay(image, np.zeros((1, 10, 12)))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        heatmap_overlay(image, np.zeros((10, 12)), alpha=1.5)
    with pytest.raises(ValueError, match=r"vmin <= vmax"):
        heatmap_overlay(image, np.zeros((10, 12)), vmin=2.0, vmax=1.0)


# ---------------------------------------------------------------------------
# save_png
# ---------------------------------------------------------------------------


def test_save_png_round_trip_in_rgb_order(tmp_path: Path) -> None:
    red = np.zeros((7, 9, 3), np.uint8)
    red[..., 0] = 255  # pure red in RGB
    path = tmp_path / "sub" / "red.png"  # parent folder created on the fly
    save_png(path, red)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.shape == (7, 9, 3)
    assert (back[..., 2] == 255).all() and (back[..., :2] == 0).all()  # OpenCV reads BGR
    image = random_image((31, 17, 3), seed=3)
    save_png(path, image)  # overwrite
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), image)
    grey = random_image((5, 6), seed=4)
    save_png(tmp_path / "grey.png", grey)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "grey.png"), cv2.IMREAD_UNCHANGED), grey)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["grey.png", "red.png", "sub"]


def test_save_png_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.png"
    save_png(path, random_image((4, 4, 3)))
    old = path.read_bytes()

    def half_write_then_fail(filename: str, img: np.ndarray, *args: object) -> bool:
        Path(filename).write_bytes(b"\x89PNG truncated")  # a partial file under the temp name
        return False

    monkeypatch.setattr(viz.cv2, "imwrite", half_write_then_fail)
    with pytest.raises(OSError, match=r"out\.png"):
        save_png(path, random_image((4, 4, 3), seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert path.read_bytes() == old  # the previous file is untouched

    def raise_cv2_error(filename: str, img: np.ndarray, *args: object) -> bool:
        raise cv2.error("simulated encoder failure")

    monkeypatch.setattr(viz.cv2, "imwrite", raise_cv2_error)
    with pytest.raises(OSError, match=r"new\.png.*simulated encoder failure"):
        save_png(tmp_path / "new.png", random_image((4, 4, 3)))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_png_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"float32 shape \(4, 4, 3\)"):
        save_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        save_png(tmp_path / "a.png", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\.png path.*a\.jpg"):
        save_png(tmp_path / "a.jpg", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def roc_inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1], 100)
    return {
        "perfect": (labels + 0.1 * rng.random(200), labels),
        "noisy": (labels + rng.normal(size=200), labels),
    }


def assert_png(path: Path, min_size: tuple[int, int] = (100, 100)) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1]
    assert img.std() > 5  # something was drawn, not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    return img


def test_plots_write_png_files(tmp_path: Path) -> None:
    plot_roc_curves(tmp_path / "roc" / "roc.png", roc_inputs(), title="ROC")
    assert assert_png(tmp_path / "roc" / "roc.png").shape[:2] == (500, 500)
    rng = np.random.default_rng(8)
    groups = {"in-dist test": rng.normal(size=500), "SVHN": torch.randn(300) + 2}
    plot_score_histograms(tmp_path / "hist" / "h.png", groups, title="scores", bins=30)
    assert_png(tmp_path / "hist" / "h.png")
    shares = {"scale 1": 0.6, "scale 2": 0.3, "scale 3": 0.1}
    plot_bars(tmp_path / "bars" / "b.png", shares, title="share", ylabel="fraction")
    assert_png(tmp_path / "bars" / "b.png")


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Replace the atomic saver by one that keeps the figure for inspection."""
    figures: list[Figure] = []
    monkeypatch.setattr(viz, "_save_figure", lambda fig, path: figures.append(fig))
    return figures


def test_roc_plot_content(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = capture_figures(monkeypatch)
    plot_roc_curves("unused.png", roc_inputs(), title="my title")
    (ax,) = figures[0].axes
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == "perfect (AUROC 1.000)"
    assert texts[1].startswith("noisy (AUROC 0.") and texts[2] == "chance"
    assert ax.get_title() == "my title"
    fpr, tpr = ax.lines[0].get_data()
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    np.testing.assert_array_equal(ax.lines[-1].get_xydata(), [[0, 0], [1, 1]])  # the diagonal


def test_histogram_content(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = capture_figures(monkeypatch)
    a = np.array([0.0, 1.0, 1.0, 2.0, np.nan, np.inf])
    b = np.array([5.0, 6.0, 6.0, 10.0])
    plot_score_histograms("unused.png", {"a": a, "b": b}, bins=10)
    (ax,) = figures[0].axes
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["a (n=4, 2 non-finite left out)", "b (n=4)"]
    # Shared edges over the finite values of both groups: 0 .. 10 in 10 bins, each a density.
    filled = [p for p in ax.patches if p.get_fill()]
    for patch in filled:
        xy = patch.get_xy()
        assert xy[:, 0].min() == pytest.approx(0.0) and xy[:, 0].max() == pytest.approx(10.0)
        heights = xy[1:-1:2, 1][:10]
        assert np.sum(heights * 1.0) == pytest.approx(1.0)  # area 1 with unit-wide bins


def test_bars_content(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = capture_figures(monkeypatch)
    values = {"s1": 0.5, "s2": -0.25, "s3": 0.75}
    plot_bars("unused.png", values, title="t", ylabel="share of log p")
    (ax,) = figures[0].axes
    assert [r.get_height() for r in ax.patches] == list(values.values())
    assert [t.get_text() for t in ax.get_xticklabels()] == list(values)
    assert ax.get_ylabel() == "share of log p"


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"at least one curve"):
        plot_roc_curves(tmp_path / "r.png", {})
    with pytest.raises(ValueError, match=r"both classes"):
        plot_roc_curves(tmp_path / "r.png", {"x": (np.arange(3.0), np.zeros(3))})
    with pytest.raises(ValueError, match=r"group 'empty' has no finite score"):
        plot_score_histograms(tmp_path / "h.png", {"ok": np.ones(3), "empty": np.array([np.nan])})
    with pytest.raises(ValueError, match=r"at least one value"):
        plot_bars(tmp_path / "b.png", {})
    assert list(tmp_path.iterdir()) == []


def test_plots_leave_global_backend_and_pyplot_alone(tmp_path: Path) -> None:
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any non-Agg backend: plotting must not switch it
    pyplot = sys.modules.get("matplotlib.pyplot")  # loaded by get_backend() on some versions
    try:
        figs_before = pyplot.get_fignums() if pyplot is not None else []
        plot_roc_curves(tmp_path / "r.png", roc_inputs())
        plot_bars(tmp_path / "b.png", {"a": 1.0})
        assert matplotlib.get_backend() == "svg"
        if pyplot is not None:
            assert pyplot.get_fignums() == figs_before  # no figure left registered in pyplot
        assert cv2.imread(str(tmp_path / "r.png")) is not None  # still a real PNG
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize(
    "values",
    [
        1e8 + np.array([0.0, 1.5e-8, 3e-8]),  # 3 distinct floats: no 50 bins between them
        np.array([-1e308, 0.0, 1e308]),  # a range beyond the largest float
    ],
)
def test_histograms_of_ranges_numpy_cannot_bin(monkeypatch: pytest.MonkeyPatch, values: np.ndarray) -> None:
    figures = capture_figures(monkeypatch)
    plot_score_histograms("unused.png", {"in": values[:2], "out": values[1:]}, bins=50)
    (ax,) = figures[0].axes
    for patch in (p for p in ax.patches if p.get_fill()):
        xs = patch.get_xy()[:, 0]
        assert xs.min() == values.min() and xs.max() == values.max()  # every value in a bin
