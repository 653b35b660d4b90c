"""Textual-inversion embeddings: `.safetensors` files whose vectors stand for a word of the prompt.

A word of the prompt equal to a file's stem in the embeddings folder (AUTOMATIC1111's rule), or written
`embedding:stem` (ComfyUI's), is replaced by the file's vectors. The folder is `--embeddings-dir`, by
default `embeddings/` inside the weights folder (`sdcli.weights.weights_dir`).

File layouts read: A1111's `emb_params` (n, D) or its `string_to_param` table saved as safetensors (one
tensor), any file holding a single tensor, and SDXL's `clip_l` / `clip_g` pair (one tensor per text
encoder; the SDXL refiner takes `clip_g`). Pickles (`.pt`, `.bin`) are refused as pickle checkpoints are.
A1111 records each embedding used as `name: first 12 hex digits of the file's sha256` under `TI hashes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcli.errors import CheckpointError
from sdcli.families import SDXL_REFINER_BIGG_PREFIX
from sdcli.header import PICKLE_SUFFIXES, read_header
from sdcli.prompt_chunks import EMBEDDING_PREFIX
from sdcli.weights import sha256_file, weights_dir

SUFFIX = ".safetensors"
SDXL_KEYS = ("clip_l", "clip_g")  # kohya's / A1111's SDXL layout, in SDXL's encoder order
# The SDXL refiner's bigG alone takes an SDXL file's clip_g, as in A1111.
REFINER_KEYS = ("clip_g",)


def default_embeddings_dir() -> Path:
    """`embeddings/` inside the weights folder."""
    return weights_dir() / "embeddings"


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its name (the file stem) and one (n, D) float32 tensor per text encoder."""

    name: str
    path: Path
    vectors: tuple[torch.Tensor, ...]

    @property
    def short_hash(self) -> str:
        """A1111's TI hash: the first 12 hex digits of the file's sha256."""
        return sha256_file(self.path)[:12]


def _encoder_width(spec) -> int:
    config = spec.config
    return getattr(config, "hidden_size", None) or config.width


def load_embedding(path: Path, family) -> Embedding:
    """Read an embedding file for `family`'s text encoders. Raises CheckpointError naming the file."""
    read_header(path)  # refuses pickles and damaged files with a one-line message
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    count = len(family.text_encoders)
    if all(key in tensors for key in SDXL_KEYS):
        refiner = [spec.prefix for spec in family.text_encoders] == [SDXL_REFINER_BIGG_PREFIX]
        keys = SDXL_KEYS if count == len(SDXL_KEYS) else REFINER_KEYS if refiner else None
        if keys is None:
            raise CheckpointError(f"{path}: an SDXL embedding (clip_l and clip_g), which this model cannot use")
        chosen = [tensors[key] for key in keys]
    else:
        single = tensors.get("emb_params")
        if single is None and len(tensors) == 1:
            single = next(iter(tensors.values()))  # string_to_param.* or a bare tensor
        if single is None:
            raise CheckpointError(
                f"{path}: not a textual-inversion embedding (expected 'emb_params', one tensor, or 'clip_l' and "
                f"'clip_g'; found {', '.join(sorted(tensors)[:5])})"
            )
        if count != 1:
            raise CheckpointError(f"{path}: an embedding for one text encoder; this model needs 'clip_l' and 'clip_g'")
        chosen = [single]
    vectors = []
    for spec, tensor in zip(family.text_encoders, chosen, strict=True):
        if tensor.ndim == 0 or tensor.numel() == 0:
            raise CheckpointError(f"{path}: holds no vectors (a tensor of shape {tuple(tensor.shape)}); re-save it")
        tensor = tensor.float().reshape(-1, tensor.shape[-1])  # one vector may be saved as (D,)
        width = _encoder_width(spec)
        if tensor.shape[-1] != width:
            raise CheckpointError(
                f"{path}: vectors of width {tensor.shape[-1]}, but this model's text encoder takes {width}: the "
                "embedding was made for another model family"
            )
        vectors.append(tensor)
    return Embedding(path.stem, path, tuple(vectors))


def _named(text: str, name: str) -> bool:
    """Whether `name` appears in `text` as a word or as `embedding:name` (case-insensitive, as CLIP reads)."""
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text, re.IGNORECASE) is not None


class EmbeddingLibrary:
    """The embeddings of one folder, read when a prompt names them."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_embeddings_dir()
        files = sorted(self.directory.iterdir()) if self.directory.is_dir() else []
        usable = [p for p in files if p.is_file() and p.suffix.lower() in {SUFFIX, *PICKLE_SUFFIXES}]
        # A .safetensors file wins over a pickle of the same name.
        self.files = {p.stem: p for p in sorted(usable, key=lambda p: p.suffix.lower() == SUFFIX)}
        self._loaded: dict[tuple[str, str], Embedding] = {}

    def used_in(self, texts: Iterable[str], family) -> dict[str, Embedding]:
        """The embeddings the texts name, loaded for `family`. Raises CheckpointError for a bad file."""
        joined = "\n".join(texts)
        found = {}
        for name, path in self.files.items():
            if _named(joined, name):
                key = (name, family.name)
                if key not in self._loaded:
                    self._loaded[key] = load_embedding(path, family)
                found[name] = self._loaded[key]
        return found

    def missing(self, text: str) -> list[str]:
        """Names written `embedding:name` in `text` that have no file here."""
        pattern = re.escape(EMBEDDING_PREFIX) + r"([\w.\-]+)"
        return [name for name in re.findall(pattern, text, re.IGNORECASE) if name not in self.files]

    def hashes(self, texts: Iterable[str], family) -> str | None:
        """A1111's `TI hashes` value for the embeddings the texts use: "name: hash, ...", None when none."""
        used = self.used_in(texts, family)
        return ", ".join(f"{name}: {e.short_hash}" for name, e in used.items()) or None
