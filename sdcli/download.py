"""Model downloads, orchestrated: `sdcli download SPEC`, `--model NAME` and the default model on first use.

Imports no torch, and huggingface_hub and rich only inside the functions that need them, so the CLI can
resolve names instantly. What a name means (the alias registry, spec resolution) is `sdcli.model_specs`;
fetching the bytes (resumable `.part`, sha256 check before the final name, progress) is `sdcli.fetch`; the
weights directory, local lookup and the sha256 cache are `sdcli.weights`.

A file already under its final name is used without network access when it matches the expected sha256.
A lock file (`.<name>.lock`) keeps two processes (a cron job and a user) from appending to one `.part`;
it is removed when the download ends, however it ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from sdcli.errors import CheckpointError, DownloadError, SdcliError, UsageError, WeightsDirError
from sdcli.fetch import Reporter, fetch_hub, fetch_url, say
from sdcli.header import read_header
from sdcli.model_specs import (
    DEFAULT_MODEL,
    REGISTRY,
    SHA256_HEX,
    SUFFIX,
    DownloadSpec,
    RegistryEntry,
    dest_in,
    mask_credentials,
    resolve_spec,
)
from sdcli.weights import find_local_model, require_weights_dir, sha256_file

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "DownloadError",
    "DownloadSpec",
    "RegistryEntry",
    "download",
    "ensure_default_model",
    "is_offline",
    "resolve_model",
    "resolve_spec",
]


# --------------------------------------------------------------------------------------------------
# Offline mode


def is_offline(explicit: bool = False) -> bool:
    """Whether downloads are off: `--offline`, or `HF_HUB_OFFLINE` set to 1/true/yes/on."""
    return explicit or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------
# Downloads


def ensure_default_model(
    weights_dir: str | Path, *, offline: bool = False, token: str | None = None, progress: bool | None = None
) -> Path:
    """The default model's file (`sd15`), downloaded first (with a message on stderr) when absent.

    Offline (`offline` or `HF_HUB_OFFLINE=1`) with the file absent raises `DownloadError` telling to run
    `sdcli download sd15`.
    """
    entry = REGISTRY[DEFAULT_MODEL]
    directory = require_weights_dir(weights_dir)
    if not (directory / entry.filename).is_file() and not is_offline(offline):
        say(
            f"no --model given and the default model {entry.name} is not downloaded yet: fetching "
            f"{entry.repo_id}/{entry.filename} into {directory} (once; later runs use that file)"
        )
    return download(DEFAULT_MODEL, directory, token=token, progress=progress, offline=offline)


def resolve_model(
    name: str | None, weights_dir: str | Path, *, offline: bool = False, token: str | None = None
) -> Path:
    """The file `--model NAME` means: a path, a downloaded model's name, or something to download now.

    No NAME means the default model (downloaded on first use). A registry alias, `OWNER/REPO/FILE.safetensors`
    or a URL that is not here yet is downloaded, unless offline.
    """
    if name is None:
        return ensure_default_model(weights_dir, offline=offline, token=token)
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # "~" without a home directory: taken literally
        path = Path(name)
    if path.is_file():
        return path  # any suffix: loading refuses pickles with its own message
    if path.is_dir():
        raise UsageError(f"--model {name} is a folder: give a .safetensors file inside it")
    found = find_local_model(name, weights_dir)
    if found is not None:
        return found
    looks_local = path.is_absolute() or name.startswith((".", "~"))
    if name in REGISTRY or "://" in name or (not looks_local and name.count("/") >= 2 and name.endswith(SUFFIX)):
        return download(name, weights_dir, token=token, offline=offline)
    if not looks_local:
        require_weights_dir(weights_dir)  # where a name would have been looked up
    raise DownloadError(
        f"{name}: no such model file, and no downloaded model of that name in {Path(weights_dir)}; check the path, "
        "or see `sdcli models` and `sdcli download --list`"
    )


def download(
    spec: str,
    weights_dir: str | Path,
    *,
    token: str | None = None,
    progress: bool | None = None,
    offline: bool = False,
    sha256: str | None = None,
) -> Path:
    """Download SPEC (see `resolve_spec`) into the weights directory and return the file's path.

    A file already there is returned without network access when it matches the known sha256 (or when
    no sha256 is known: files only get their final name once complete). `token` (else `HF_TOKEN`, else
    the huggingface_hub login) goes to the hub only, never to other hosts or the hub's CDN. `progress`:
    None = a rich bar on stderr when stderr is a terminal, else one line per file; True/False force the
    bar/the line. `sha256` is an extra expected hash (as `URL#sha256=`). Nothing is written to stdout.

    Raises `UsageError` for a name we refuse, `WeightsDirError` for a folder that cannot be written (or no
    folder at all, see `weights.require_weights_dir`) and `DownloadError` (one line that says what to do) for
    offline mode, network, access, missing files, checksum mismatches and bodies that are not safetensors
    files. No message shows the password of a `https://user:password@host/` URL.
    """
    try:
        return _download(spec, weights_dir, token, progress, offline, sha256)
    except SdcliError as e:  # never echo a password written into a URL (user:password@host)
        masked = mask_credentials(str(e))
        if masked == str(e):
            raise
        raise type(e)(masked) from None


def _download(
    spec: str, weights_dir: str | Path, token: str | None, progress: bool | None, offline: bool, sha256: str | None
) -> Path:
    resolved = resolve_spec(spec)
    expected = _expected_sha256(resolved, sha256)
    directory = require_weights_dir(weights_dir).expanduser().resolve()
    if resolved.entry is not None and resolved.entry.kind == "lora":
        directory = directory / "loras"  # the default --lora-dir: usable by name in <lora:NAME:W> at once
    dest = dest_in(directory, resolved.filename)
    offline = is_offline(offline)
    if _have_verified(dest, expected, resolved, offline):
        return dest
    if offline:
        raise DownloadError(
            f"{resolved.filename} is not in {directory} and downloads are off (--offline or HF_HUB_OFFLINE=1): "
            f"run `sdcli download {resolved.spec}` while online, or pass --model with a .safetensors file you have "
            f"(a path, or the name of one put into {directory})"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsDirError(
            f"cannot create the weights folder {directory}: {e.strerror or e}; choose another with --weights-dir "
            "or SDCLI_WEIGHTS_DIR"
        ) from e
    with _lock(directory / f".{resolved.filename}.lock", resolved.filename):
        if dest.is_file() and _problem(dest, expected) is None:
            return dest  # another process finished it while we waited
        reporter = Reporter(resolved.filename, progress)
        try:
            if resolved.kind == "hub":
                fetch_hub(resolved, dest, expected, token, reporter)
            else:
                fetch_url(resolved, dest, expected, reporter)
        except BaseException:  # Ctrl-C included: end the progress line, then let it through
            reporter.finish(ok=False)
            raise
        reporter.finish(ok=True)
    return dest


def _expected_sha256(resolved: DownloadSpec, extra: str | None) -> str | None:
    if extra is not None:
        extra = extra.strip().lower()
        if not SHA256_HEX.fullmatch(extra):
            raise UsageError(f"--sha256 {extra!r}: expected 64 hex digits")
        if resolved.sha256 is not None and resolved.sha256 != extra:
            raise UsageError(
                f"the sha256 given ({extra[:12]}…) differs from {resolved.spec}'s ({resolved.sha256[:12]}…)"
            )
    return extra or resolved.sha256


def _have_verified(dest: Path, expected: str | None, resolved: DownloadSpec, offline: bool) -> bool:
    """Whether `dest` is there and sound (see `_problem`); one that is not is downloaded again (when online)."""
    if not dest.is_file():
        return False
    problem = _problem(dest, expected)
    if problem is None:
        return True
    if offline:
        raise DownloadError(f"{dest} {problem}: run `sdcli download {resolved.spec}` while online to replace it")
    say(f"{dest.name} {problem}; downloading it again (it is replaced once verified)")
    return False


def _problem(dest: Path, expected: str | None) -> str | None:
    """What is wrong with a file under its final name: not the expected sha256, or (none known) not a
    safetensors file, as a file kept by an older version could be. None when it is sound."""
    if expected is not None:
        return None if sha256_file(dest) == expected else "does not match its expected sha256"
    try:
        read_header(dest)
    except CheckpointError:
        return "is not a valid safetensors file"
    return None


@contextmanager
def _lock(lock_path: Path, name: str) -> Iterator[None]:
    """Hold `lock_path` (huggingface_hub's file lock), saying so when another process has it.

    The lock file is removed while still held, however the body ends (Ctrl-C included), so lock files do
    not pile up; filelock (recent versions) checks that the file it locked is still linked, so a process
    that was waiting for the removed file takes a fresh one.
    """
    from filelock import Timeout  # a dependency of huggingface_hub, whose lock raises it
    from huggingface_hub.utils import WeakFileLock

    with ExitStack() as stack:
        try:
            try:
                stack.enter_context(WeakFileLock(lock_path, timeout=0.05))
            except Timeout:
                say(f"another sdcli process is downloading {name}; waiting for it to finish")
                stack.enter_context(WeakFileLock(lock_path))
        except OSError as e:  # the first write into the folder: read-only, or not ours
            raise WeightsDirError(
                f"cannot write to the weights folder {lock_path.parent}: {e.strerror or e}; choose another with "
                "--weights-dir or SDCLI_WEIGHTS_DIR"
            ) from e
        try:
            yield
        finally:
            with suppress(OSError):  # a lock file left behind only costs a stray file
                lock_path.unlink(missing_ok=True)
