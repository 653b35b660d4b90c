"""The safetensors header: tensor names, dtypes and shapes, read without the data and without torch.

Enough to detect a model's family (`sdcli models`) and to refuse a pickle, a text file, a truncated
download or a malformed header with a clear message before anything is loaded. The header is checked as
the safetensors format requires (and as safetensors' own loader does): every tensor's dtype is known, its
shape is a list of non-negative integers, its bytes are exactly dtype x shape, and the tensors' byte
ranges follow each other in order, from the start of the data to the end of the file, without gaps or
overlaps. So every `TensorInfo` returned points at bytes that are inside the file and belong to it alone.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcli.errors import CheckpointError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F32, F16, BF16, I64, ...
    shape: tuple[int, ...]
    start: int = 0  # byte offsets of the data in the file
    end: int = 0


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Read and check a .safetensors header (names, dtypes, shapes, offsets) without touching the tensor data.

    Raises `CheckpointError` (one line, naming the file and, for a bad entry, the tensor) for a pickle, a
    folder, an unreadable file, a truncated download or a header the safetensors format does not allow.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: '{path.suffix}' files are Python pickles, which can run arbitrary code when loaded, so "
            "sdcli never opens them; use the model's .safetensors file, or convert it once in a trusted "
            "environment (e.g. with safetensors.torch.save_file)"
        )
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: give a .safetensors file inside it")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file; check the path, or run 'sdcli download' to fetch one")
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            fits = header_len is not None and header_len <= min(MAX_HEADER_BYTES, size - 8)
            raw = f.read(header_len) if fits else None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e}); check its permissions") from None
    header = _parse(raw)
    if not isinstance(header, dict):
        # Only now, as the file is not a safetensors one: a header length may begin with any byte.
        if _is_pickle(head):
            raise CheckpointError(
                f"{path}: this is a pickle checkpoint despite its name; sdcli loads only .safetensors files"
            )
        if header_len is None:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        if not fits:
            raise CheckpointError(f"{path}: not a safetensors file (or the file is truncated); re-download it")
        reason = header if isinstance(header, str) else "the header is not a table of tensors"
        raise CheckpointError(f"{path}: not a safetensors file ({reason})")
    assert header_len is not None
    return _check_entries(path, header, data_start=8 + header_len, data_size=size - 8 - header_len)


def _parse(raw: bytes | None) -> Any:
    """The header's JSON value, or a string saying why it is not JSON."""
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "the header is not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"unreadable header: {e}"


def _is_pickle(head: bytes) -> bool:
    """Whether the first bytes are those of a pickle (protocol 2 and later: 0x80, protocol) or of torch's zip."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _check_entries(path: Path, header: dict[str, Any], data_start: int, data_size: int) -> dict[str, TensorInfo]:
    def bad(name: str, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: malformed safetensors header: tensor {name[:200]!r} {problem}; the file is damaged, "
            "re-download it"
        )

    metadata = header.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: malformed safetensors header: __metadata__ is not a table of strings")
    infos: dict[str, TensorInfo] = {}  # in the header's order
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(name, "is not a table of dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad(name, f"has an unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(_is_natural(n) for n in shape):
            raise bad(name, f"has a shape that is not a list of non-negative integers ({str(shape)[:60]})")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_natural(n) for n in offsets):
            raise bad(name, f"has data_offsets that are not two non-negative integers ({str(offsets)[:60]})")
        begin, end = offsets
        if end < begin:
            raise bad(name, f"ends before it begins (data_offsets [{begin}, {end}])")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or end - begin != bits // 8:
            raise bad(name, f"has {end - begin} bytes where {dtype} x {shape} needs {bits / 8:g}")
        infos[name] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
        ranges.append((begin, end, name))
    ranges.sort(key=lambda r: (r[0], r[1]))
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            where = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise bad(name, f"{where} (data_offsets [{begin}, {end}], expected to begin at {position})")
        position = end
    if position > data_size:
        name = ranges[-1][2]
        raise CheckpointError(
            f"{path}: the file is truncated ({data_start + data_size} bytes, tensor {name[:200]!r} ends past "
            "it); re-download it"
        )
    if position < data_size:
        raise CheckpointError(
            f"{path}: malformed safetensors file: {data_size - position} bytes after the last tensor; the file "
            "is damaged, re-download it"
        )
    return infos


def _is_natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
