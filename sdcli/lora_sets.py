"""The LoRAs of a run: names resolved in the LoRA folder, files read once (again when replaced on disk), a patch
per set, and switching sets.

A job's LoRA set is a tuple of resolved `LoraRef`s. The model is loaded through the first set's patch;
when a later batch uses another set, only the weights either set changes (`old.keys | new.keys`) are read
again from the checkpoint through the new patch, so the checkpoint is never reloaded and no second copy
of the model is held.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path

from sdcli.errors import CheckpointError, UsageError
from sdcli.extra_networks import LoraRef, parse_prompt
from sdcli.families import detect
from sdcli.header import read_header
from sdcli.lora import LoadedLora, LoraPatch, load_lora, lora_patch

LoraSet = tuple[LoraRef, ...]
# Looked for by stem: safetensors first; the pickles only so that loading refuses them with a clear message.
SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def lora_hash(path: Path) -> str:
    """A1111's short LoRA hash ("addnet hash", as kohya-ss computes it): the first 12 hex digits of the
    sha256 of the file after its safetensors header, so editing the metadata keeps the hash. Computed once
    per version of the file (a file replaced on disk is hashed again)."""
    return _lora_hash(path, file_stamp(path))


def file_stamp(path: Path) -> tuple[int, int]:
    """(modification time in ns, size): what changes when a file is replaced or rewritten."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@cache
def _lora_hash(path: Path, stamp: tuple[int, int]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_size)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def infotext_name(ref: LoraRef) -> str:
    """The name A1111 records in "Lora hashes": as mentioned, without the ':' and ',' that would break the list."""
    return ref.name.replace(":", "").replace(",", "")


def available_loras(directory: Path) -> dict[str, Path]:
    """The LoRAs prompts can name from `directory`, by name: for each stem the .safetensors file `<lora:stem:...>`
    finds (the shallowest, as LoraLibrary.find; a folder so named is no file and is left out, as there)."""
    found_files = (path for path in directory.rglob("*" + SUFFIXES[0]) if path.is_file())
    files = sorted(found_files, key=lambda p: (len(p.parts), str(p)))
    found: dict[str, Path] = {}
    for path in files:
        found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def lora_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's safetensors metadata (kohya-ss's training settings, ...); empty if it has none or is damaged."""
    from safetensors import safe_open

    try:
        read_header(path)  # checked first: a damaged file is skipped, not half-read
    except CheckpointError:
        return {}
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


class LoraLibrary:
    """LoRA files for one checkpoint: found by name in `directory`, read once, merged into patches per set."""

    def __init__(self, directory: Path, checkpoint: Path, *, ignore_unknown: bool = False) -> None:
        self.directory = directory
        self.ignore_unknown = ignore_unknown
        self._shapes = {key: info.shape for key, info in read_header(checkpoint).items()}
        self._family = detect(self._shapes)
        self._files: dict[Path, tuple[tuple[int, int], LoadedLora]] = {}  # by path: (its stamp when read, its LoRA)
        self._patches: dict[LoraSet, LoraPatch] = {}

    def find(self, name: str) -> Path:
        """The file called NAME (plus a LoRA suffix) in the LoRA folder or below it; UsageError if there is none."""
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise UsageError(f"LoRA name {name!r} is not a file name: prompts name LoRAs by their file's stem")
        candidates = {suffix: [] for suffix in SUFFIXES}
        if self.directory.is_dir():
            for folder, _, files in sorted(os.walk(self.directory)):
                for suffix in SUFFIXES:
                    if name + suffix in files:
                        candidates[suffix].append(Path(folder) / (name + suffix))
        for suffix in SUFFIXES:
            if candidates[suffix]:
                return min(candidates[suffix], key=lambda p: (len(p.parts), str(p)))  # the shallowest first
        raise UsageError(
            f"LoRA '{name}' not found: no {name}.safetensors in {self.directory}; put it there or point --lora-dir "
            "at its folder"
        )

    def resolve(self, prompt: str, options: Sequence[LoraRef] = ()) -> tuple[str, LoraSet]:
        """The prompt to record (`prompt` with a tag appended for each LoRA given as an option, so the image's
        parameters name every LoRA) and the job's LoRA set: the prompt's tags, then `options`, with files.

        Raises UsageError for a bad tag, a name not in the folder or a LoRA given twice.
        """
        _, tagged = parse_prompt(prompt)
        refs = [LoraRef(r.name, r.te, r.unet, self.find(r.name)) for r in tagged] + list(options)
        seen: dict[Path, str] = {}
        for ref in refs:
            key = ref.path.resolve()
            if key in seen:
                raise UsageError(f"LoRA '{ref.name}' is asked for twice ({seen[key]} and {ref.tag()}): give it once")
            seen[key] = ref.tag()
        recorded = " ".join([prompt, *(ref.tag() for ref in options)]) if options else prompt
        return recorded, tuple(refs)

    def load(self, path: Path) -> LoadedLora:
        if path not in self._files:
            lora = load_lora(path)  # first: it says in one line what is wrong with a missing or bad file
            self._files[path] = (file_stamp(path), lora)
        return self._files[path][1]

    def forget_changed(self, loras: LoraSet) -> bool:
        """Forget the files of `loras` replaced on disk since they were read, and the patches made from them, so
        that they are read again; whether any was."""
        changed = set()
        for ref in loras:
            if ref.path in self._files:
                try:
                    stamp = file_stamp(ref.path)
                except OSError:
                    stamp = None  # gone: reading it again says so
                if stamp != self._files[ref.path][0]:
                    changed.add(ref.path)
        for path in changed:
            del self._files[path]
        self._patches = {key: patch for key, patch in self._patches.items() if not changed & {r.path for r in key}}
        return bool(changed)

    def keep_only(self, loras: LoraSet) -> None:
        """Forget the files and patches `loras` does not use (a long-running server would otherwise keep every
        LoRA it was ever asked for in memory)."""
        used = {ref.path for ref in loras}
        self._files = {path: lora for path, lora in self._files.items() if path in used}
        self._patches = {key: patch for key, patch in self._patches.items() if key == loras}

    def patch(self, loras: LoraSet) -> LoraPatch | None:
        """The loading patch merging `loras` into this checkpoint (None for no LoRA); LoraError if one does not fit."""
        if not loras:
            return None
        if loras not in self._patches:
            weighted = [(self.load(ref.path), ref.te, ref.unet) for ref in loras]
            self._patches[loras] = lora_patch(weighted, self._family, self._shapes, ignore_unknown=self.ignore_unknown)
        return self._patches[loras]


class ActiveLoras:
    """Which LoRA set a loaded model's weights hold now, and the switch to another set."""

    def __init__(self, library: LoraLibrary, model, loras: LoraSet) -> None:
        self.library, self.model, self.loras = library, model, loras
        self.keys = _changed_keys(library.patch(loras))  # the weights the set changed when they were read

    def use(self, loras: LoraSet) -> None:
        """Make the model's weights those of `loras`: the weights either set changes are read again from the
        checkpoint through the new set's patch (a weight no set changes is never touched). A LoRA file replaced
        on disk since it was read is read again, even for the same set, as A1111 reloads a newer file."""
        if not self.library.forget_changed(loras) and loras == self.loras:
            return
        from sdcli.checkpoint import reload_weights

        new = self.library.patch(loras)
        reload_weights(self.model, self.keys | _changed_keys(new), new)
        self.loras, self.keys = loras, _changed_keys(new)


def _changed_keys(patch: LoraPatch | None) -> frozenset[str]:
    return patch.keys if patch else frozenset()


def check_recorded_hashes(loras: LoraSet, recorded: Mapping[str, str], warn: Callable[[str], None]) -> None:
    """Warn where a LoRA found by name is not the file an image was made with (its "Lora hashes" differ)."""
    for ref in loras:
        expected = recorded.get(infotext_name(ref))
        if expected and ref.path is not None and lora_hash(ref.path) != expected:
            warn(f"{ref.path.name} is not the LoRA the image was made with (hash {expected}): results will differ")


def parse_lora_hashes(text: str | None) -> dict[str, str]:
    """A1111's "Lora hashes" value ("name: hash, name: hash") as a dict; pairs that do not parse are skipped."""
    pairs = (item.rpartition(":") for item in (text or "").split(","))
    return {name.strip(): value.strip() for name, colon, value in pairs if colon and name.strip()}
