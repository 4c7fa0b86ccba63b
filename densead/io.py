"""Atomic file output (write to a temporary name beside the target, then rename) and checkpoint input.

A crash or a bad input half-way never leaves a truncated file under the final
name; readers see either the old file or the complete new one. Checkpoints are
read back with ``weights_only=True`` by :func:`read_checkpoint`, whose errors name the file,
after :func:`check_archive` has checked the CRCs that ``torch.load`` does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from densead import distributed as dist

__all__ = [
    "HEATMAPS_RECORD",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_text",
    "check_archive",
    "check_heatmap_folder",
    "check_output_dir",
    "check_overwrite",
    "error_line",
    "load_error",
    "missing_folders",
    "not_a_file",
    "read_checkpoint",
    "require_file",
    "signals_deferred",
    "staged_heatmaps",
    "staging_folder",
    "state_dict_error",
    "swap_folders",
]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it; put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffix of ``path`` so libraries that choose the
    format from the extension (OpenCV, matplotlib, numpy) still work, and at most 40 characters
    of its stem, so any name the file system takes for ``path`` fits. ``make_parents``: create
    missing parent folders (off: a missing folder is an error, as for writes into a staging
    folder that must not come back once removed).
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.stem[:40]}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{path.suffix[:16]}", dir=path.parent)
    tmp_path = Path(tmp)
    try:  # from the moment it exists: a SIGTERM (SystemExit, densead.cli) anywhere removes it
        os.close(fd)
        # mkstemp makes the file private (0600); the result gets the mode any new file gets here.
        tmp_path.chmod(0o666 & ~_umask())
        yield tmp_path
        _fsync(tmp_path)  # the content is on disk before the name points at it (a crash or power
        os.replace(tmp_path, path)  # loss leaves the old file or the new one, never an empty one)
        _fsync(path.parent)  # and the rename itself
    finally:
        tmp_path.unlink(missing_ok=True)


def state_dict_error(err: Exception) -> str:
    """torch's ``load_state_dict`` error (a line per missing, unexpected or misshapen entry) in
    one line: its first problem, shortened, and how many more there are."""
    problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    problems = problems or [str(err).strip() or type(err).__name__]
    first = problems[0] if len(problems[0]) <= 240 else problems[0][:240] + "…"
    return first + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _torch_format(path: Path) -> str | None:
    """How ``path`` starts among the ways ``torch.save`` files do: ``"zip"`` (torch ≥ 1.6, the only
    format a checkpoint can be mapped from), ``"pickle"`` (before: a pickle's protocol byte), or
    None (neither)."""
    with path.open("rb") as f:
        head = f.read(4)
    return "zip" if head == b"PK\x03\x04" else "pickle" if head[:1] == b"\x80" else None


# How much of an archive member check_archive reads at a time.
_CRC_CHUNK = 1 << 20


def _tensor_record(name: str) -> bool:
    """Whether zip member ``name`` holds a tensor's bytes: ``torch.save`` writes each storage as
    ``<archive>/data/<key>``, beside ``<archive>/data.pkl`` and a few small records."""
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def error_line(err: BaseException) -> str:
    """An exception's message on one line for a message of ours: its first line, or its type's
    name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_error(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line for a message naming the file:
    the first line of torch's message, or, when the file holds pickled objects, that densead does
    not unpickle them (torch's own message goes on to advise ``weights_only=False``)."""
    if "weights_only" in str(err) or "Weights only" in str(err):
        return "it holds objects other than tensors and plain data, which densead does not unpickle"
    return error_line(err)


def check_archive(
    path: str | os.PathLike[str],
    what: str = "file",
    fix: str = "re-train or restore it",
    tensors: bool = True,
) -> None:
    """Before ``torch.load``: check the CRC-32 of every member of the zip archive that
    ``torch.save`` writes (torch ≥ 1.6), which ``torch.load`` does not, so a flipped bit is an
    error naming the file and the member instead of silently wrong weights.

    Members are read in 1 MiB chunks, never whole. A file that starts as a zip archive but has no
    readable directory (truncated) is an error too. Anything else (the pickle format) is left to
    ``torch.load`` and its errors, as are members without a CRC (0:
    ``torch.serialization.set_crc32_options(False)``).

    Args:
        path: the file.
        what: what it is, for the message (``"checkpoint"``, ``"weights file"``).
        fix: what to do about it, for the message.
        tensors: check the tensors' bytes too; off: only the pickle and the small records, for
            a mapped read that does not touch the weights (:func:`read_checkpoint`).

    Raises:
        ValueError: a member's bytes do not match its CRC, or its header is damaged (the message
            names the file and the member), or the archive has no readable directory.
    """
    path = Path(path)
    if _torch_format(path) != "zip":
        return
    try:
        archive = zipfile.ZipFile(path)
    except Exception as err:  # noqa: BLE001 - BadZipFile, OSError, ...: no readable directory
        reason = f"truncated or damaged: no readable zip directory, {error_line(err)}"
        raise ValueError(f"{path}: corrupt {what} ({reason}); {fix}") from None
    with archive:
        for info in archive.infolist():
            if info.external_attr & 0x10 and not info.is_dir():  # MS-DOS folder bit on a file
                # torch.save writes no folders, and torch.load reads such a member as uninitialized memory
                raise ValueError(f"{path}: corrupt {what} (member {info.filename!r} marked a folder); {fix}")
            if info.is_dir() or not info.CRC or (not tensors and _tensor_record(info.filename)):
                continue
            try:
                with archive.open(info) as member:
                    while member.read(_CRC_CHUNK):
                        pass
            except Exception as err:  # noqa: BLE001 - a damaged header (BadZipFile, EOFError, ...) too
                text = error_line(err)
                reason = (
                    f"CRC mismatch in member {info.filename!r}"
                    if isinstance(err, zipfile.BadZipFile) and "CRC" in text
                    else f"member {info.filename!r} unreadable: {text}"
                )
                raise ValueError(f"{path}: corrupt {what} ({reason}); {fix}") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder on a file system that cannot sync folders
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def not_a_file(path: str | os.PathLike[str], what: str) -> str:
    """Why ``path`` (no file) cannot be read as ``what``: a folder, or not found."""
    return f"{what} {path} is a folder, not a file" if Path(path).is_dir() else f"{what} not found: {path}"


def require_file(path: str | os.PathLike[str], key: str, what: str = "checkpoint") -> None:
    """Before any work: FileNotFoundError naming the config ``key`` when ``path`` is no file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {not_a_file(path, what)}")


def missing_folders(path: str | os.PathLike[str]) -> list[Path]:
    """The folders that creating folder ``path`` would make (missing ancestors included),
    deepest first; a name that exists as anything (a file, a dangling link) ends the list."""
    missing = []
    for folder in [Path(path), *Path(path).parents]:
        if os.path.lexists(folder):
            break
        missing.append(folder)
    return missing


def check_output_dir(
    path: str | os.PathLike[str], key: str = "output_dir", files: Sequence[str] = ()
) -> Path:
    """Before any work: a ValueError naming ``key`` when outputs cannot be written into the
    folder ``path`` (it is a file, something on its way is a file, the folder that would hold
    it is not writable, or one of the ``files`` it will write is there as a folder), instead of a
    lost model or score table at the end. Creates nothing: a run stopped before its first output
    leaves no empty folder."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():  # a file, or a link to nothing
        raise ValueError(f"{key}: {path} exists and is not a folder")
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{key}: {path / name} is a folder; the run writes a file there")
    missing = missing_folders(path)
    parent = missing[-1].parent if missing else path  # the nearest that exists
    if not parent.is_dir():
        raise ValueError(f"{key}: cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: cannot write into {parent} (permission denied)")
    return path


_STOPS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back until the block ends (main thread; elsewhere a no-op): for
    cleanups that a stop in their middle would leave half done. A signal that came meanwhile is
    raised again right after, to the handler it would have met."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # Handlers, not a signal mask: a process-directed signal goes to any thread that does not
    # block it (torch starts several), and the handler then runs in the main thread anyway.
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in _STOPS}
    try:
        yield
    finally:
        for s, handler in previous.items():  # None: one installed outside Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])


@contextlib.contextmanager
def staging_folder(parent: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden ``.partial-*`` folder made in ``parent``, for outputs written whole before they
    replace the previous ones (:func:`swap_folders`). Removed when the block ends, however it
    ends, with Ctrl-C and SIGTERM held back meanwhile, so no stop leaves part of it behind."""
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=parent))
    try:
        yield staging
    finally:
        with signals_deferred():
            shutil.rmtree(staging, ignore_errors=True)


def swap_folders(staging: Path, target: Path, names: Sequence[str]) -> None:
    """Put each folder ``staging/<name>`` in place of ``target/<name>``. The old one is renamed
    into ``staging/previous`` (removed with the staging folder), so none of its files stays
    beside the new ones; a name ``staging`` lacks leaves ``target`` without it."""
    retired = staging / "previous"
    retired.mkdir()
    with signals_deferred():  # no stop between the two renames: the old folder gone, the new not in
        for name in names:
            if os.path.lexists(target / name):
                os.replace(target / name, retired / name)
            if (staging / name).is_dir():
                os.replace(staging / name, target / name)


def check_overwrite(path: str | os.PathLike[str], overwrite: bool, resumable: bool = False) -> None:
    """Refuse to train over an existing model: raise FileExistsError naming ``path`` and the
    flags that go on (``--resume`` too, where the trainer can continue it) unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        resume = "continue it with --resume, " if resumable else ""
        raise FileExistsError(
            f"{path} exists: {resume}train anew over it with --overwrite, or set another output_dir"
        )


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(
    path: str | os.PathLike[str],
    keys: Sequence[str],
    kind: str = "",
    device: torch.device | str = "cpu",
    mmap: bool = False,
) -> dict:
    """Load a checkpoint dict with ``weights_only=True`` and check that it holds ``keys``.

    Args:
        path: the file.
        keys: entries the checkpoint must have.
        kind: what it should be (``"segmenter"``, ``"feature-flow"``; empty: a Glow), for the messages.
        device: ``map_location``.
        mmap: map the tensors from the file instead of reading them (CPU only), for reads of a
            few small entries (step, config, history): the paper-size Glow's checkpoint with its
            optimizer state is about 0.5 GB, and a reader that does not touch the weights then
            costs neither the time nor the memory of reading them
            (``benchmarks/checkpoint_read.py``). Drop the dict soon: its tensors keep the file
            mapped, and Windows cannot replace a mapped file. The CRC check
            (:func:`check_archive`) then skips the tensors' bytes too: a mapped read checks what
            it reads, and a whole read checks everything.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, corrupt (a CRC mismatch), not a dict, or a key is missing; the
            message names the file.
    """
    path = Path(path)
    label = f"{kind} checkpoint" if kind else "checkpoint"
    if not path.is_file():
        raise FileNotFoundError(not_a_file(path, label))
    form = _torch_format(path)
    if form is None:
        raise ValueError(
            f"{path}: not a readable {kind or 'densead'} checkpoint (not a file torch.save writes: "
            "neither a zip archive nor a pickle)"
        )
    mmap = mmap and form == "zip"  # the pickle format cannot be mapped: it is read whole
    check_archive(path, label, tensors=not mmap)
    try:
        ckpt = torch.load(path, map_location="cpu" if mmap else device, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(
            f"{path}: not a readable {kind or 'densead'} checkpoint ({load_error(err)})"
        ) from None
    for key in keys:
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise ValueError(f"{path}: not a densead {label} (missing {key!r})")
    return ckpt


# What a heat-map folder written by staged_heatmaps holds besides its PNGs: how they were made.
HEATMAPS_RECORD = "heatmaps.json"


def check_heatmap_folder(
    path: str | os.PathLike[str], key: str = "--heatmaps", outputs: Sequence[str | os.PathLike[str]] = ()
) -> Path:
    """Before any work: the heat maps can go to folder ``path`` — new, empty, or written by an
    earlier :func:`staged_heatmaps` (it holds :data:`HEATMAPS_RECORD` and PNGs, nothing else),
    since the new maps replace it whole; a folder of other files is refused, naming ``key`` and a
    file, rather than mixed or removed, as is one that is or holds the current folder or any of
    the run's other files (``outputs``: what it writes and what it reads). A link to a folder is
    followed: the folder it names is replaced, the link stays."""
    path = check_output_dir(path, key)
    folder = Path(os.path.realpath(path))
    for other, what in [(Path.cwd(), "the current folder"), *((Path(o), str(o)) for o in outputs)]:
        other = Path(os.path.realpath(other))
        if other == folder or folder in other.parents:
            raise ValueError(f"{key}: {path} is or holds {what}, which the heat maps would replace")
    if path.is_dir() and any(path.iterdir()):
        if not (path / HEATMAPS_RECORD).is_file():
            raise ValueError(
                f"{key}: {path} holds files that no heat-map run wrote (it has no {HEATMAPS_RECORD}): "
                "name a new or empty folder (one that an earlier run wrote is replaced whole)"
            )
        foreign = sorted(
            p.name
            for p in path.iterdir()
            if p.name != HEATMAPS_RECORD and not (p.suffix == ".png" and p.is_file() and not p.is_symlink())
        )
        if foreign:
            raise ValueError(
                f"{key}: {path} holds {foreign[0]!r}, which no heat-map run wrote ({len(foreign)} such "
                "entries); the new maps would replace the folder whole: move them, or name another folder"
            )
    return path


@contextlib.contextmanager
def staged_heatmaps(
    target: str | os.PathLike[str], record: Mapping[str, Any] | None = None
) -> Iterator[Path]:
    """The folder to write heat maps into (:func:`score_image_set`'s ``heatmap_dir``), hidden
    beside ``target`` and the same on every rank. When the block ends without an error, ``record``
    (if any) goes into it as :data:`HEATMAPS_RECORD` and it replaces ``target`` whole, so no PNG of
    an earlier run stays beside the new ones; on an error nothing of it stays. Check a folder of
    the user's with :func:`check_heatmap_folder` first."""
    target = Path(os.path.realpath(target))  # a link: the folder it names is replaced
    missing = missing_folders(target.parent)
    anchor = missing[-1].parent if missing else target.parent  # no folder is made before the end
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(staging_folder(anchor)) if dist.is_main() else None
        staging = Path(dist.broadcast_object(staging))
        if dist.is_main():
            (staging / target.name).mkdir()
        dist.barrier()
        yield staging / target.name
        dist.barrier()  # every rank's PNGs are written
        if dist.is_main():
            if record is not None:
                atomic_write_text(
                    staging / target.name / HEATMAPS_RECORD, json.dumps(dict(record), indent=2) + "\n"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            swap_folders(staging, target.parent, [target.name])
