"""Scoring image sets with Glow detectors: per-image scores, CSV rows, heatmap overlays."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from densead import distributed as dist
from densead.data.images import ImageSet
from densead.data.transforms import to_model_input
from densead.detectors.glow import GlowDetector, GlowScorer
from densead.flows import Glow, GlowOutput, apply_fast_path, resolve_fast_path
from densead.io import atomic_write_text, not_a_file
from densead.train import resolve_device
from densead.viz import heatmap_overlay, save_png

__all__ = [
    "glow_outputs",
    "image_names",
    "check_levels",
    "iter_model_batches",
    "read_scores_csv",
    "save_heatmaps",
    "score_image_set",
    "typical_bits_per_dim",
    "write_scores_csv",
]

# Heatmaps of tiny images (8×8 digits, 32×32 CIFAR) are enlarged to at least this size.
MIN_HEATMAP_SIZE = 128


def iter_model_batches(
    images: ImageSet,
    n_bins: int,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "",
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[slice, Tensor]]:
    """Noise-free model inputs of an image set, batch by batch: ``(index slice, x)`` of ``dtype``
    (the model's). Levels must lie in ``0 … n_bins−1`` (:func:`~densead.data.images.load_image_set`
    requantizes to a model's ``n_bins``): others would leave ``[−0.5, 0.5)`` and score silently."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    check_levels(images, n_bins)
    n = len(images)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        sl = slice(start, min(start + batch_size, n))
        yield sl, to_model_input(images.images[sl].to(device), n_bins, dequantize=False).to(dtype)


def check_levels(images: ImageSet, n_bins: int) -> None:
    """A ValueError naming the set when its levels leave ``0 … n_bins−1`` (model input would leave
    ``[−0.5, 0.5)`` and score silently; :func:`~densead.data.images.load_image_set` requantizes)."""
    if len(images):
        low, top = int(images.images.min()), int(images.images.max())
        if low < 0 or top >= n_bins:
            raise ValueError(
                f"{images.name}: image levels span {low}…{top}, but the model takes 0…{n_bins - 1} "
                f"(n_bins {n_bins}); load_image_set(..., n_bins) requantizes images to it"
            )


def image_names(images: ImageSet) -> list[str]:
    """Per-image names: the set's own (file paths) or zero-padded indices."""
    return list(images.names) if images.names else [f"{i:05d}" for i in range(len(images))]


def score_image_set(
    scorer: GlowScorer,
    images: ImageSet,
    detectors: Sequence[GlowDetector],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
    heatmap_dir: str | Path | None = None,
    n_heatmaps: int = 0,
) -> dict[str, np.ndarray]:
    """``{detector name: (N,) float64 scores}`` over an image set.

    With ``heatmap_dir``, also writes one overlay PNG per image and detector
    (the detector's pixel map, from the same forward pass as the score) for the
    first ``n_heatmaps`` images (0: every image); not for ``complexity`` and ``complexity_webp``,
    whose map is ``raw``'s shifted by a constant per image (``complexity_loco``'s is per pixel).
    Under torchrun, every rank scores its shard and writes its images' PNGs;
    every rank returns all scores in input order.
    """
    device = resolve_device(str(device), "device")
    n_bins, dtype = scorer.model.n_bins, next(scorer.model.parameters()).dtype
    scorer.check_detectors(detectors)
    scorer.model.check_input(images.images[:1].to(dtype))
    check_levels(images, n_bins)  # the whole set, on every rank, before it is sharded
    names = image_names(images)
    # Under torchrun each rank scores a contiguous shard; scores are gathered in input order.
    mine = dist.shard_range(len(images))
    # Images of this shard (by their place in it) that get heat maps.
    n_maps = 0 if heatmap_dir is None else len(images) if n_heatmaps <= 0 else n_heatmaps
    n_maps = max(0, min(n_maps, mine.stop) - mine.start)
    names = names[mine]
    images = ImageSet(images.images[mine], images.labels[mine], images.name)
    if heatmap_dir is not None:  # made here, before the work; later writes never make it again
        Path(heatmap_dir).mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[np.ndarray]] = {d.name: [np.zeros(0)] for d in detectors}
    per_pixel = {d.name for d in detectors if d.per_pixel}  # heat maps; not a file coder's: raw's, shifted
    batches = iter_model_batches(images, n_bins, batch_size, device, progress, f"score {images.name}", dtype)
    for sl, x in batches:
        keep = min(sl.stop, n_maps) - sl.start  # images of this batch that get heat maps
        if keep <= 0 or heatmap_dir is None:
            results = {k: (v, None) for k, v in scorer.score(x, list(detectors)).items()}
        else:
            results = scorer.score_maps(x, list(detectors))
            part = ImageSet(images.images[sl][:keep], images.labels[sl][:keep], images.name)
            maps = {k: m[:keep] for k, (_, m) in results.items() if k in per_pixel}
            stems = [n.replace("/", "__") for n in names[sl][:keep]]
            save_heatmaps(heatmap_dir, part, maps, stems, n_bins)
        for name, (s, _) in results.items():
            parts[name].append(s.double().cpu().numpy())
    return {name: dist.gather_concat(np.concatenate(p)) for name, p in parts.items()}


def typical_bits_per_dim(
    model: Glow,
    images: ImageSet,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> float:
    """``model``'s mean bits/dim over ``images``, noise-free: ``b̄`` of the ``typicality`` detector,
    from the images the model was trained on (its typical set's entropy estimate, Nalisnick et
    al. 2019). A non-finite bits/dim is an error naming the set. Under torchrun each rank scores
    its shard and every rank returns the mean of all."""
    device = torch.device(device)
    mine = dist.shard_range(len(images))
    shard = ImageSet(images.images[mine], images.labels[mine], images.name)
    total, count, bad = 0.0, 0, 0
    for _, out in glow_outputs(model, shard, batch_size, device, progress):
        bpd = out.bits_per_dim().double()
        finite = torch.isfinite(bpd)
        total += float(bpd[finite].sum())
        count, bad = count + int(finite.sum()), bad + int((~finite).sum())
    sums = dist.all_reduce_sum(torch.tensor([total, count, bad], dtype=torch.float64, device=device))
    total, count, bad = sums.tolist()  # decided on every rank alike: none raises alone
    if bad:
        raise ValueError(f"{images.name}: the model's bits/dim is not finite on {int(bad)} of its images")
    return total / count


def glow_outputs(
    model: Glow,
    images: ImageSet,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    fast: str = "auto",
) -> Iterator[tuple[slice, GlowOutput]]:
    """Noise-free Glow outputs of an image set, batch by batch.

    ``fast`` switches the speed levers on ``model`` in place, as in
    :class:`~densead.detectors.glow.GlowScorer` (``auto``: fused and
    channels_last on CUDA, nothing on CPU, never compile).
    """
    model.eval()
    apply_fast_path(model, resolve_fast_path(fast, device, allow_compile=False))
    dtype = next(model.parameters()).dtype
    for sl, x in iter_model_batches(
        images, model.n_bins, batch_size, device, progress, f"eval {images.name}", dtype
    ):
        with torch.no_grad():
            out = model(x)
        # Yield outside no_grad: a generator suspended inside it would leave the caller's
        # gradients off (and interleaved generators restore each other's modes).
        yield sl, out


def save_heatmaps(
    out_dir: str | Path,
    images: ImageSet,
    maps: Mapping[str, Tensor],
    names: Sequence[str],
    n_bins: int = 256,
) -> list[Path]:
    """One PNG per image and detector: the image beside its map overlaid (enlarged if tiny).

    Args:
        out_dir: folder for the PNGs (``<name>_<detector>.png``).
        images: the scored images (uint8, levels ``0 … n_bins−1``).
        maps: ``{detector: (N, H, W)}`` pixel maps for the first N images.
        names: file-name stem per image.
        n_bins: quantization levels of ``images`` (to show them as 8-bit).
    """
    out_dir = Path(out_dir)
    # Its own folder only: a staging folder removed meanwhile (a torchrun rank stopped) stays gone.
    out_dir.mkdir(exist_ok=True)
    written = []
    levels = n_bins - 1
    for det, m in maps.items():
        m = m.float().cpu().numpy()
        for i, stem in enumerate(names[: len(m)]):
            img = images.images[i].permute(1, 2, 0).numpy().astype(np.float64)
            img = np.clip(img * 255.0 / levels, 0, 255).astype(np.uint8)
            if img.shape[2] == 1:
                img = np.repeat(img, 3, axis=2)
            factor = max(1, -(-MIN_HEATMAP_SIZE // img.shape[0]))
            big = cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
            heat = cv2.resize(m[i], (big.shape[1], big.shape[0]), interpolation=cv2.INTER_NEAREST)
            panel = np.concatenate([big, heatmap_overlay(big, heat, alpha=0.6)], axis=1)
            path = out_dir / f"{stem}_{det}.png"
            save_png(path, panel, make_parents=False)
            written.append(path)
    return written


def write_scores_csv(path: str | Path, columns: Mapping[str, Sequence]) -> None:
    """Write equal-length columns as CSV (atomically); floats with full precision."""
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"score columns differ in length: {lengths}")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(list(columns))
    for row in zip(*columns.values(), strict=True):
        writer.writerow([repr(float(v)) if isinstance(v, float | np.floating) else v for v in row])
    atomic_write_text(path, buf.getvalue())


# Columns of score CSVs that hold text even when every value looks like a number (set "1", image "007").
TEXT_COLUMNS = ("set", "name")


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, row)`` of one scores file; every row as long as the header."""
    if not path.is_file():
        raise FileNotFoundError(not_a_file(path, "scores file"))
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty scores file")
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise ValueError(f"{path}: column(s) {repeated} appear more than once in the header")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(row)} fields, but the header has {len(header)} "
                    f"({', '.join(header)})"
                )
            rows.append((reader.line_num, row))
    return header, rows


def read_scores_csv(
    paths: str | Path | Sequence[str | Path], score_columns: Callable[[str], bool] | Collection[str] = ()
) -> dict[str, np.ndarray]:
    """Columns of one or more score CSVs, rows in file order.

    The files must have the same columns, in any order (they are aligned by name),
    and rows of equal length. With a ``set`` column, no set may appear in two files
    (its rows would be silently merged). ``set`` and ``name`` stay text; any other
    column becomes float64 if every cell is a number, else stays text.

    Args:
        paths: the CSV file(s).
        score_columns: the columns that hold scores (names, or a test on a column name):
            each of them must be present, and every cell a finite number.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the message names the file (and line, column, set and cell)
            of a malformed file, a column that differs between files, a set in
            two files, or a score cell that is not a finite number.
    """
    paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no scores files given")
    tables = [(p, *_read_csv_rows(p)) for p in paths]
    first, header, _ = tables[0]
    for p, h, _ in tables[1:]:
        if set(h) != set(header):
            missing, extra = [c for c in header if c not in h], [c for c in h if c not in header]
            raise ValueError(
                f"{p}: columns differ from those of {first}: missing {missing}, extra {extra} "
                f"(columns of {first}: {', '.join(header)})"
            )
    if "set" in header:
        where: dict[str, Path] = {}
        for p, h, rows in tables:
            j = h.index("set")
            for name in dict.fromkeys(r[j] for _, r in rows):
                if name in where:
                    raise ValueError(
                        f"set {name!r} is in both {where[name]} and {p}; give each set in one file only"
                    )
                where[name] = p
    is_score = score_columns if callable(score_columns) else set(score_columns).__contains__
    if not callable(score_columns):
        absent = [c for c in score_columns if c not in header]
        if absent:
            raise ValueError(f"{first}: no score column(s) {absent} (columns: {', '.join(header)})")
        text = [c for c in score_columns if c in TEXT_COLUMNS]
        if text:
            raise ValueError(f"{first}: column(s) {text} hold set and image names, not scores")
    records = [(p, line, dict(zip(h, r, strict=True))) for p, h, rows in tables for line, r in rows]
    cols: dict[str, np.ndarray] = {}
    for name in header:
        cells = [rec[name] for _, _, rec in records]
        if name in TEXT_COLUMNS:
            cols[name] = np.asarray(cells, dtype=str)
            continue
        if is_score(name):
            for p, line, rec in records:
                if not _is_finite_number(rec[name]):
                    of_set = f" (set {rec['set']!r})" if "set" in rec else ""
                    cell = f"holds {rec[name]!r}" if rec[name].strip() else "is empty"
                    raise ValueError(
                        f"{p}, line {line}{of_set}: score column {name!r} {cell}, not a finite number"
                    )
        try:
            cols[name] = np.asarray([float(v) for v in cells], dtype=np.float64)
        except ValueError:
            cols[name] = np.asarray(cells, dtype=str)
    return cols


def _is_finite_number(cell: str) -> bool:
    try:
        return bool(np.isfinite(float(cell)))
    except ValueError:
        return False
