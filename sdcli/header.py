"""The safetensors header: tensor names, dtypes and shapes, read without the data and without torch.

Enough to detect a model's family (`sdcli models`) and to refuse a pickle, a text file or a truncated
download with a clear message before anything is loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sdcli.errors import CheckpointError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F32, F16, BF16, I64, ...
    shape: tuple[int, ...]
    start: int = 0  # byte offsets of the data in the file
    end: int = 0


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Read a .safetensors header (names, dtypes, shapes) without touching the tensor data.

    Refuses pickle files and checks that every tensor's bytes lie inside the file, so a truncated
    download is reported here rather than as a crash halfway through loading.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: '{path.suffix}' files are Python pickles, which can run arbitrary code when loaded, so "
            "sdcli never opens them; use the model's .safetensors file, or convert it once in a trusted "
            "environment (e.g. with safetensors.torch.save_file)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file; check the path, or run 'sdcli download' to fetch one")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: this is a pickle checkpoint despite its name; sdcli loads only .safetensors files"
            )
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (or the file is truncated); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a table of tensors)")
    data_size = size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            start = 8 + header_len
            infos[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), start + begin, start + end)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file (bad header entry for '{name}')") from None
        if end > data_size:
            raise CheckpointError(
                f"{path}: the file is truncated ({size} bytes, tensor '{name}' ends past it); re-download it"
            )
    return infos
