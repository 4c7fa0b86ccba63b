"""Checkpoint integrity: a flipped byte in a checkpoint's tensors is an error naming the file and the
zip member (``torch.load`` does not check the archive's CRCs and would return the wrong weights)."""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from densead.config import ModelConfig, to_dict
from densead.features import load_state_dict_file
from densead.io import atomic_torch_save, read_checkpoint
from densead.train import build_glow, load_checkpoint

TINY = ModelConfig(in_channels=1, n_scales=2, n_steps=2, hidden=16, n_bins=17)
# Members of the zip archive torch.save writes, named <archive>/...
TENSOR = r"[^/]+/data/\d+"  # a tensor's storage
PICKLE = r"[^/]+/data\.pkl"  # the rest: step, history, config, and the tensors' records


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_glow_state() -> dict[str, torch.Tensor]:
    """A tiny Glow's state_dict with every parameter perturbed (not the zeros of a fresh model)."""
    model = build_glow(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.state_dict()


def write_checkpoint(path: Path) -> dict:
    """A checkpoint as training writes one (atomic_torch_save of weights, config, step, history)."""
    ckpt = {
        "model": tiny_glow_state(),
        "step": 3,
        "finished": True,
        "history": [[0, 3.5, 0.0]],
        "model_config": to_dict(TINY),
    }
    atomic_torch_save(ckpt, path)
    return ckpt


def member_data(raw: bytes, info: zipfile.ZipInfo) -> int:
    """Where member ``info``'s stored bytes start: after its local header (30 bytes, the name, and
    the extra field, which torch.save pads to align the data and the central directory omits)."""
    assert raw[info.header_offset : info.header_offset + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    assert info.compress_type == zipfile.ZIP_STORED
    assert zlib.crc32(raw[start : start + info.file_size]) == info.CRC  # these are the member's bytes
    return start


def member(path: Path, pattern: str) -> zipfile.ZipInfo:
    """The largest member whose name matches ``pattern`` (``<archive>/...``, where the archive is
    named after the temporary file that atomic_torch_save wrote)."""
    with zipfile.ZipFile(path) as archive:
        matches = [info for info in archive.infolist() if re.fullmatch(pattern, info.filename)]
    return max(matches, key=lambda info: info.file_size)


def flip_byte(path: Path, pattern: str = TENSOR) -> str:
    """Invert one byte in the middle of the data of the largest member matching ``pattern``
    (default: the largest tensor), not in any header; returns the member's name."""
    info = member(path, pattern)
    raw = bytearray(path.read_bytes())
    raw[member_data(raw, info) + info.file_size // 2] ^= 0xFF
    path.write_bytes(raw)
    return info.filename


def corrupt_error(path: Path, what: str, name: str, fix: str) -> str:
    crc = rf"\(CRC mismatch in member '{re.escape(name)}'\)"
    return rf"^{re.escape(str(path))}: corrupt {what} {crc}; {fix}$"


def test_a_flipped_byte_in_a_tensor_is_an_error_naming_the_file_and_the_member(tmp_path: Path) -> None:
    path = tmp_path / "run" / "checkpoint.pt"
    original = write_checkpoint(path)
    name = flip_byte(path)
    with pytest.raises(ValueError, match=corrupt_error(path, "checkpoint", name, "re-train or restore it")):
        load_checkpoint(path)
    # the kind of checkpoint is named as in read_checkpoint's other messages
    with pytest.raises(
        ValueError, match=corrupt_error(path, "feature-flow checkpoint", name, "re-train or restore it")
    ):
        read_checkpoint(path, ("model",), "feature-flow")
    # torch.load alone reads the corrupt file without a word: the weights differ from those saved
    raw = torch.load(path, weights_only=True)
    assert not all(torch.equal(raw["model"][k], v) for k, v in original["model"].items())


def test_an_intact_checkpoint_loads_equal_to_what_was_saved(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    original = write_checkpoint(path)
    for mmap in (False, True):
        ckpt = load_checkpoint(path, mmap=mmap)
        assert ckpt.keys() == original.keys()
        assert ckpt["model"].keys() == original["model"].keys()
        assert all(torch.equal(ckpt["model"][k], v) for k, v in original["model"].items())
        assert {k: v for k, v in ckpt.items() if k != "model"} == {
            k: v for k, v in original.items() if k != "model"
        }


def test_a_mapped_read_checks_the_records_it_reads_and_not_the_weights(tmp_path: Path) -> None:
    """A mapped read (step, config, history) does not read the tensors' bytes, so it neither pays
    for their CRCs nor fails on them; a whole read of the same file does."""
    path = tmp_path / "checkpoint.pt"
    original = write_checkpoint(path)
    name = flip_byte(path)  # a tensor's bytes
    mapped = load_checkpoint(path, mmap=True)
    assert (mapped["step"], mapped["history"]) == (original["step"], original["history"])
    del mapped  # its tensors keep the file mapped
    with pytest.raises(ValueError, match=corrupt_error(path, "checkpoint", name, "re-train or restore it")):
        load_checkpoint(path)

    write_checkpoint(path)
    name = flip_byte(path, PICKLE)
    with pytest.raises(ValueError, match=corrupt_error(path, "checkpoint", name, "re-train or restore it")):
        load_checkpoint(path, mmap=True)


def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 9 // 10])
    for mmap in (False, True):
        with pytest.raises(ValueError, match=r"checkpoint\.pt: corrupt checkpoint \(truncated") as err:
            load_checkpoint(path, mmap=mmap)
        assert "\n" not in str(err.value)


def test_the_features_reader_refuses_a_corrupt_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    state = tiny_glow_state()
    atomic_torch_save(state, path)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())

    name = flip_byte(path)
    with pytest.raises(ValueError, match=corrupt_error(path, "weights file", name, "restore it")) as err:
        load_state_dict_file(path)
    assert "\n" not in str(err.value)
    # a whole model pickled, not a state_dict: one line too (torch's message runs to six)
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(
        ValueError, match=r"backbone\.pt: not a readable weights file \(it holds objects"
    ) as err:
        load_state_dict_file(path)
    assert "\n" not in str(err.value)


def test_files_without_crcs_are_left_to_torch(tmp_path: Path) -> None:
    """The pickle format has no CRCs, and torch.save can be told to write none (0): both load."""
    original = write_checkpoint(tmp_path / "checkpoint.pt")
    legacy = tmp_path / "legacy.pt"
    torch.save(original, legacy, _use_new_zipfile_serialization=False)
    no_crc = tmp_path / "no_crc.pt"
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(original, no_crc)
    finally:
        torch.serialization.set_crc32_options(before)
    with zipfile.ZipFile(no_crc) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    for path in (legacy, no_crc):
        ckpt = load_checkpoint(path)
        assert all(torch.equal(ckpt["model"][k], v) for k, v in original["model"].items())


def test_a_member_marked_a_folder_is_refused(tmp_path: Path) -> None:
    """The MS-DOS folder bit on a tensor's entry in the zip directory: torch.load would hand back
    uninitialized memory for that tensor (no CRC covers the directory)."""
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path)
    name = member(path, TENSOR).filename.encode()
    raw = bytearray(path.read_bytes())
    entry = raw.index(b"PK\x01\x02")  # the first entry of the central directory
    while (
        struct.unpack_from("<H", raw, entry + 28)[0] != len(name)
        or raw[entry + 46 : entry + 46 + len(name)] != name
    ):
        entry = raw.index(b"PK\x01\x02", entry + 1)
    raw[entry + 38] |= 0x10  # external attributes, low byte: the MS-DOS folder bit
    path.write_bytes(raw)
    with pytest.raises(
        ValueError, match=r"checkpoint\.pt: corrupt checkpoint \(member '.*' marked a folder\)"
    ):
        load_checkpoint(path)
