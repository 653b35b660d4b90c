"""sdcli.header: which files are safetensors checkpoints, checked against safetensors' own loader."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdcli.errors import CheckpointError
from sdcli.header import read_header

TENSORS = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def write(path: Path, header: object, data: bytes = bytes(8), header_len: int | None = None) -> Path:
    """A file in the safetensors layout: 8-byte header length, JSON header (padded with spaces), data."""
    text = json.dumps(header).encode()
    if header_len is not None:
        assert header_len >= len(text)
        text += b" " * (header_len - len(text))  # the format allows trailing spaces in the header
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_header_lengths_with_every_low_byte_are_read(tmp_path):
    # 512 + b: the first byte of the file is b; 0x280 begins 0x80 0x02, what a protocol-2 pickle begins with.
    # 0x4B50 begins "PK", the first two bytes of a zip.
    for header_len in [*range(512, 768), 0x4B50]:
        path = write(tmp_path / "m.safetensors", TENSORS, header_len=header_len)
        assert load_file(path)["a"].shape == (2,)  # safetensors agrees the file is valid
        infos = read_header(path)
        assert infos["a"].shape == (2,) and infos["a"].end - infos["a"].start == 8, header_len


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_under_a_safetensors_name_are_refused_as_pickles(tmp_path, protocol):
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": {"w": [0.0] * 100}}, protocol=protocol))
    with pytest.raises(CheckpointError, match="this is a pickle checkpoint despite its name"):
        read_header(path)


def test_torch_zip_under_a_safetensors_name_is_refused_as_a_pickle(tmp_path):
    path = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.zeros(3)}, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(CheckpointError, match="pickle"):
        read_header(path)


def f32(name: str, begin: int, end: int, shape: list | None = None) -> dict:
    return {name: {"dtype": "F32", "shape": [(end - begin) // 4] if shape is None else shape,
                   "data_offsets": [begin, end]}}  # fmt: skip


MALFORMED = {
    "overlapping": ({**f32("a", 0, 8), **f32("b", 4, 12)}, 12, r"'b' overlaps the tensor before it"),
    "gap": ({**f32("a", 0, 4), **f32("b", 8, 12)}, 12, r"'b' leaves a gap before it"),
    "not at 0": (f32("a", 4, 8), 8, r"'a' leaves a gap"),
    "reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, r"'a' ends before it begins"),
    "negative": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, r"'a' has data_offsets"),
    "float": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, 8, r"'a' has data_offsets"),
    "short": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, r"'a' has data_offsets"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8, r"'a' has data_offsets"),
    "string offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, 8, r"'a' has data_off"),
    "int16 over f32 bytes": ({"a": {"dtype": "I16", "shape": [2], "data_offsets": [0, 8]}}, 8, r"'a' has 8 bytes"),
    "shape too large": (f32("a", 0, 8, [3]), 8, r"'a' has 8 bytes where F32 x \[3\] needs 12"),
    "shape overflow": (f32("a", 0, 8, [2**40, 2**40]), 8, r"'a' has 8 bytes"),
    "negative shape": (f32("a", 0, 8, [-2]), 8, r"'a' has a shape that is not"),
    "bool shape": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, r"'a' has a shape"),
    "shape not a list": (f32("a", 0, 8, 2), 8, r"'a' has a shape"),  # type: ignore[arg-type]
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, r"'a' has an unknown dtype"),
    "no dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, r"'a' has an unknown dtype"),
    "entry not a table": ({"a": [0, 8]}, 8, r"'a' is not a table"),
    "bad metadata": ({"__metadata__": {"x": 1}, **f32("a", 0, 8)}, 8, r"__metadata__ is not a table of strings"),
    "bytes after the data": (f32("a", 0, 8), 12, r"4 bytes after the last tensor"),
    "truncated": ({**f32("a", 0, 8), **f32("b", 8, 16)}, 12, r"truncated .*'b' ends past it"),
    "header is a list": ([1, 2], 0, r"not a safetensors file \(the header is not a table of tensors\)"),
    "header not json": (None, 0, r"not a safetensors file \(unreadable header"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_headers_are_one_line_errors_and_safetensors_refuses_them_too(tmp_path, case):
    header, data_size, message = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(struct.pack("<Q", 8) + b"{'a': 1}")
    else:
        write(path, header, bytes(data_size))

    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(CheckpointError, match=message) as err:
        read_header(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_valid_corner_cases_are_read_as_safetensors_reads_them(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "scalar": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "empty": {"dtype": "F16", "shape": [0, 3], "data_offsets": [4, 4]},
        "ints": {"dtype": "I16", "shape": [2], "data_offsets": [4, 8]},
        "later": {"dtype": "U8", "shape": [1, 2], "data_offsets": [8, 10]},
    }
    path = write(tmp_path / "m.safetensors", header, bytes(10), header_len=400)
    reference = load_file(path)
    infos = read_header(path)

    assert list(infos) == ["scalar", "empty", "ints", "later"]  # the header's order
    assert {k: tuple(v.shape) for k, v in reference.items()} == {k: v.shape for k, v in infos.items()}
    # The data begins after the 8-byte length and the 400-byte header.
    assert [(v.start, v.end) for v in infos.values()] == [(408, 412), (412, 412), (412, 416), (416, 418)]
    assert read_header(write(tmp_path / "none.safetensors", {}, b"")) == {}


def test_an_unreadable_file_is_a_checkpoint_error(tmp_path, monkeypatch):
    path = write(tmp_path / "m.safetensors", TENSORS)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(CheckpointError, match=r"cannot read the file \(Permission denied\)"):
        read_header(path)


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a folder: give a \.safetensors file inside it"):
        read_header(tmp_path)


def test_cli_reports_overlapping_offsets_before_generating(tmp_path):
    path = write(tmp_path / "bad.safetensors", {**f32("a", 0, 8), **f32("b", 4, 12)}, bytes(12))
    result = run_cli("txt2img", "x", "-m", path, "--steps", 1, "-W", 64, "-H", 64, "-o", tmp_path / "o.png")

    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "'b' overlaps the tensor before it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.png").exists()
