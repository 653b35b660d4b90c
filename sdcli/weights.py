"""The local side of model files: the weights directory, the models in it, and their sha256 hashes.

Imports no torch and no huggingface_hub, so the CLI can resolve names, directories and hashes instantly.
The alias registry lives in `sdcli.model_specs`, the downloads in `sdcli.download`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from sdcli.errors import WeightsDirError
from sdcli.model_specs import REGISTRY, SUFFIX

__all__ = [
    "SUFFIX",
    "find_local_model",
    "list_local_models",
    "require_weights_dir",
    "sha256_file",
    "short_hash",
    "weights_dir",
]

_PACKAGE_DIR = Path(__file__).resolve().parent  # tests point this elsewhere to fake a source checkout
# The weights folder when there is no home directory to put one in: never created, so it holds no models.
HOMELESS_WEIGHTS_DIR = Path("/nonexistent/sdcli/weights")


# --------------------------------------------------------------------------------------------------
# Directories


def weights_dir(explicit: str | Path | None = None) -> Path:
    """The weights directory: `--weights-dir`, else `$SDCLI_WEIGHTS_DIR`, else `weights/` of a source
    checkout (the folder above the `sdcli` package holds `pyproject.toml` and `weights/`), else a per-user
    data directory (`$XDG_DATA_HOME/sdcli/weights`, `~/.local/share/sdcli/weights`; macOS
    `~/Library/Application Support/sdcli/weights`; Windows `%LOCALAPPDATA%\\sdcli\\weights`).

    The result is absolute and does not depend on the working directory (cron starts in `$HOME`). The
    directory is not created here; `download` creates it. Without a home directory (HOME unset and no
    passwd entry, as in containers run with an arbitrary user id) the answer is `HOMELESS_WEIGHTS_DIR`,
    which holds no models; `require_weights_dir` refuses it with a clear message where a folder is needed.
    """
    if explicit:
        return _expand(explicit).resolve()
    env = os.environ.get("SDCLI_WEIGHTS_DIR")
    if env:
        return _expand(env).resolve()
    root = _PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "weights").is_dir():
        return (root / "weights").resolve()
    user = _user_dir("data")
    return HOMELESS_WEIGHTS_DIR if user is None else user / "weights"


def require_weights_dir(directory: str | Path) -> Path:
    """`directory`, unless it is the stand-in for a missing home directory: then `WeightsDirError` saying how
    to name a folder."""
    directory = Path(directory)
    if directory == HOMELESS_WEIGHTS_DIR:
        raise WeightsDirError(
            f"no weights folder: HOME is not set and user id {os.getuid() if hasattr(os, 'getuid') else '?'} has "
            "no home directory; set SDCLI_WEIGHTS_DIR or pass --weights-dir (or pass --model FILE)"
        )
    return directory


def _expand(path: str | Path) -> Path:
    """`path` with a leading `~` expanded; `WeightsDirError` when there is no home directory to expand it to."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        raise WeightsDirError(f"{path}: there is no home directory to expand '~' to; give the full path") from None


def _home() -> Path | None:
    """The user's home directory, or None (HOME unset and no passwd entry)."""
    try:
        return Path.home()
    except (RuntimeError, KeyError, OSError):
        return None


def _user_dir(kind: Literal["data", "cache"]) -> Path | None:
    """The per-user data or cache directory for sdcli, by each platform's convention; None without a home."""
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = Path(local) if local else _home()
        if base is None:
            return None
        base = (base if local else base / "AppData" / "Local") / "sdcli"
        return base if kind == "data" else base / "Cache"
    if sys.platform != "darwin":
        xdg = os.environ.get("XDG_DATA_HOME" if kind == "data" else "XDG_CACHE_HOME")
        if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
            return Path(xdg) / "sdcli"
    home = _home()
    if home is None:
        return None
    if sys.platform == "darwin":
        return home / "Library" / ("Application Support" if kind == "data" else "Caches") / "sdcli"
    return home / (".local/share" if kind == "data" else ".cache") / "sdcli"


# --------------------------------------------------------------------------------------------------
# Local models


def list_local_models(weights_dir: str | Path) -> list[Path]:
    """The `.safetensors` files directly in the weights directory, sorted by name (none if it is absent)."""
    directory = Path(weights_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.is_file() and not p.name.startswith("."))


def find_local_model(name: str, weights_dir: str | Path) -> Path | None:
    """Resolve `--model NAME` to a downloaded file, or None.

    NAME may be a registry alias (its file in the weights directory), a file stem or a file name in the
    weights directory, or a path to an existing `.safetensors` file.
    """
    directory = Path(weights_dir)
    entry = REGISTRY.get(name)
    candidates = [entry.filename] if entry is not None else []
    if "/" not in name and "\\" not in name and name not in ("", ".", ".."):
        candidates += [name, name + SUFFIX] if not name.endswith(SUFFIX) else [name]
    for candidate in candidates:
        path = directory / candidate
        if path.suffix == SUFFIX and path.is_file():
            return path.resolve()
    path = Path(name).expanduser()
    if path.suffix == SUFFIX and path.is_file():
        return path.resolve()
    return None


# --------------------------------------------------------------------------------------------------
# Hashes


def sha256_file(path: str | Path, cache: bool = True) -> str:
    """The file's sha256 (hex). With `cache`, remembered in a JSON file in the user cache directory
    (`$SDCLI_CACHE_DIR` overrides it) keyed by absolute path, size and mtime_ns, so that a multi-GB
    model is read once, not at every run."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    if cache:
        known = _read_hash_cache().get(key)
        if known is not None and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
            return str(known["sha256"])
    digest = _compute_sha256(path)
    if cache:
        _remember_sha256(path, digest)
    return digest


def short_hash(path: str | Path) -> str:
    """The first 10 hex digits of the sha256: AUTOMATIC1111's "Model hash"."""
    return sha256_file(path)[:10]


def _compute_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(1 << 23)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _hash_cache_path() -> Path | None:
    """Where the hash cache lives; None when there is nowhere to keep it (no home directory)."""
    base = os.environ.get("SDCLI_CACHE_DIR")
    try:
        folder = Path(base).expanduser() if base else _user_dir("cache")
    except RuntimeError:  # "~" without a home directory
        return None
    return None if folder is None else folder / "sha256.json"


def _read_hash_cache() -> dict[str, dict[str, Any]]:
    cache = _hash_cache_path()
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: the cache only saves time
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _remember_sha256(path: Path, digest: str) -> None:
    """Record a file's hash in the cache; entries of files that are gone are dropped."""
    path = path.resolve()
    stat = path.stat()
    files = {k: v for k, v in _read_hash_cache().items() if os.path.exists(k)}
    files[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    cache = _hash_cache_path()
    if cache is None:
        return
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1), encoding="utf-8")
        os.replace(tmp, cache)  # atomic, so a concurrent reader never sees half a file
    except OSError:
        tmp.unlink(missing_ok=True)
