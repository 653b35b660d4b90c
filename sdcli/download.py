"""Model downloads: the alias registry, spec resolution, verified resumable downloads, `--model NAME`.

Imports no torch, and huggingface_hub and rich only inside the functions that need them, so the CLI can
resolve names instantly. The weights directory, local lookup and the sha256 cache are `sdcli.weights`.

How a download stays safe:
- It streams into `<weights dir>/<name>.part` (huggingface_hub's `http_get`, which sends `Range` and retries
  transient failures itself); an interrupted run leaves the `.part`, and the next run resumes from it.
- When the bytes are all there, the `.part` is hashed and compared with the registry's sha256, else the
  hub's (the LFS sha256 the hub sends as `X-Linked-Etag`), else the one the user gave (`URL#sha256=HEX`);
  a mismatch deletes it. Only a verified file is renamed to its final name, so a file under the final
  name is always complete.
- We do not use `hf_hub_download(local_dir=...)`: in huggingface_hub 2.x its temporary files are unique
  per process and deleted on failure, so it cannot resume after an interruption, and it leaves its
  `.cache/huggingface/` folder in the weights directory. We use its metadata call and streaming function
  instead; no hub protocol is written here.
- A lock file (`.<name>.lock`) keeps two processes (a cron job and a user) from appending to one `.part`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urljoin, urlsplit

from sdcli.errors import SdcliError, UsageError
from sdcli.weights import SUFFIX, _remember_sha256, find_local_model, sha256_file

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

_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(SdcliError):
    """A download that failed (network, access, checksum, offline); the message says what to do."""


@dataclass(frozen=True)
class RegistryEntry:
    """A model known by a short name: one single-file checkpoint in a hub repository."""

    name: str
    repo_id: str
    filename: str
    family: str  # a name in sdcli.families.FAMILIES
    sha256: str | None  # of the whole file; None = trust the hub's LFS sha256
    description: str

    @property
    def url(self) -> str:
        """The file's address on huggingface.co, for people and `--list`."""
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"


# Names and hashes checked with the search tool (stored hub pages and public code), not guessed:
REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        # huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (runwayml's repository, moved there in
        # 2024): single files v1-5-pruned(-emaonly).{ckpt,safetensors}, no single-file fp16 (listed in
        # huggingface.co/pcuenq/stable-diffusion-v1-5/commit/6364162, "Duplicate from" it). The sha256 is
        # A1111's "Model hash [6ce0161689]" and appears with this URL in many independent download scripts.
        RegistryEntry(
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "v1-5-pruned-emaonly.safetensors",
            "sd1",
            "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
            "Stable Diffusion 1.5, EMA weights, fp32 (4.27 GB); the default model",
        ),
        # The same weights in fp16 (2.13 GB), kept by ComfyUI's organisation:
        # huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/tree/main lists
        # v1-5-pruned-emaonly-fp16.safetensors; sha256 (2,132,696,762 bytes) as published in several
        # model registries, one citing the hub's paths-info.
        RegistryEntry(
            "sd15-fp16",
            "Comfy-Org/stable-diffusion-v1-5-archive",
            "v1-5-pruned-emaonly-fp16.safetensors",
            "sd1",
            "e9476a13728cd75d8279f6ec8bad753a66a1957ca375a1464dc63b37db6e3916",
            "Stable Diffusion 1.5, EMA weights, fp16 (2.13 GB)",
        ),
        # huggingface.co/stable-diffusion-v1-5/stable-diffusion-inpainting has only the pickled
        # sd-v1-5-inpainting.ckpt as a single file (tree at 8a4288a), which we never load. The
        # safetensors conversion of that file is webui/stable-diffusion-inpainting (commit c510a60,
        # "safetensors - camenduru/converter"); its sha256 (4,265,203,873 bytes) is pinned by two
        # unrelated projects' model registries.
        RegistryEntry(
            "sd15-inpaint",
            "webui/stable-diffusion-inpainting",
            "sd-v1-5-inpainting.safetensors",
            "sd1-inpaint",
            "0ec8f8585b104417a8c34a9fbcc1e922a70b8c15490ec4553087f01c8cf33673",
            "Stable Diffusion 1.5 inpainting (RunwayML), fp32 (4.27 GB)",
        ),
    )
}
DEFAULT_MODEL = "sd15"


@dataclass(frozen=True)
class DownloadSpec:
    """What `sdcli download SPEC` names, resolved: where to fetch it and the local file name."""

    spec: str  # as the user wrote it (used in messages: "run `sdcli download SPEC`")
    kind: Literal["hub", "url"]
    filename: str  # the local file name in the weights directory, validated
    repo_id: str | None = None
    path_in_repo: str | None = None
    revision: str = "main"
    url: str | None = None
    sha256: str | None = None
    entry: RegistryEntry | None = None

    @property
    def source(self) -> str:
        """Where the file comes from, for messages."""
        if self.kind == "hub":
            return f"{self.repo_id}/{self.path_in_repo}"
        return str(self.url)


# --------------------------------------------------------------------------------------------------
# Offline mode


def is_offline(explicit: bool = False) -> bool:
    """Whether downloads are off: `--offline`, or `HF_HUB_OFFLINE` set to 1/true/yes/on."""
    return explicit or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------
# Names


def resolve_spec(spec: str) -> DownloadSpec:
    """Resolve a registry alias, `REPO_ID/PATH/IN/REPO.safetensors` or an `https://` (`http://`) URL.

    A URL may end with `#sha256=HEX` to have the file verified. A huggingface.co `/resolve/` or `/blob/`
    URL is treated as the hub file it names (so a gated one gets the token). Anything that is not a
    `.safetensors` file is refused (we never unpickle), and so is any remote name that could place a file
    outside the weights directory. Raises `UsageError` with what to write instead.
    """
    spec = spec.strip()
    entry = REGISTRY.get(spec)
    if entry is not None:
        return DownloadSpec(
            spec, "hub", entry.filename, entry.repo_id, entry.filename, sha256=entry.sha256, entry=entry
        )
    if re.match(r"https?://", spec, re.IGNORECASE):
        return _resolve_url(spec)
    if "/" in spec or "\\" in spec:
        parts = _path_parts(spec, spec)
        if len(parts) < 3:
            raise UsageError(f"{spec!r}: a hub file is written REPO_OWNER/REPO_NAME/PATH/TO/FILE{SUFFIX}")
        repo_id = "/".join(parts[:2])
        _check_repo_id(repo_id, spec)
        return DownloadSpec(spec, "hub", _local_name(parts[-1], spec), repo_id, "/".join(parts[2:]))
    known = ", ".join(REGISTRY)
    raise UsageError(
        f"unknown model {spec!r}: use a name from `sdcli download --list` ({known}), "
        f"REPO_ID/FILE{SUFFIX} or an https:// URL"
    )


def _resolve_url(spec: str) -> DownloadSpec:
    url, _, fragment = spec.partition("#")
    sha256 = None
    if fragment:
        match = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
        if match is None:
            raise UsageError(f"{spec!r}: the only URL fragment understood is #sha256=<64 hex digits>")
        sha256 = match.group(1).lower()
    parsed = urlsplit(url)
    if not parsed.hostname:
        raise UsageError(f"{spec!r}: not a URL with a host")
    if not parsed.path.strip("/"):
        raise UsageError(f"{spec!r}: the URL does not name a file")
    parts = _path_parts(parsed.path.lstrip("/"), spec)
    hub = _hub_file_in_url(parsed.scheme, parsed.netloc, parts)
    if hub is not None:
        repo_id, revision, path = hub
        _check_repo_id(repo_id, spec)
        name = _local_name(path.rsplit("/", 1)[-1], spec)
        return DownloadSpec(spec, "hub", name, repo_id, path, revision=revision, sha256=sha256)
    return DownloadSpec(spec, "url", _local_name(parts[-1], spec), url=url, sha256=sha256)


def _path_parts(path: str, spec: str) -> list[str]:
    """Split a remote path (percent-decoded) into parts, refusing `.`, `..`, empty parts and backslashes,
    so that nothing the remote side names can climb out of the weights directory."""
    decoded = unquote(path)
    if "\\" in decoded or "\0" in decoded:
        raise UsageError(f"{spec!r}: refused, the path contains a backslash or NUL")
    parts = decoded.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"{spec!r}: refused, the path has '..', '.' or an empty part (path traversal)")
    return parts


def _local_name(name: str, spec: str) -> str:
    """Validate the basename a file will have in the weights directory."""
    if not name.endswith(SUFFIX):
        raise UsageError(
            f"{spec!r}: only {SUFFIX} files can be downloaded (.ckpt/.pt/.bin are pickles, which can run "
            f"code when loaded); look for a {SUFFIX} version of the model"
        )
    if name.startswith(".") or name == SUFFIX or ":" in name or any(ord(c) < 32 for c in name):
        raise UsageError(f"{spec!r}: refused, {name!r} is not a plain file name")
    return name


def _check_repo_id(repo_id: str, spec: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{spec!r}: {repo_id!r} is not a hub repository id ({e})") from e


def _hub_file_in_url(scheme: str, netloc: str, parts: list[str]) -> tuple[str, str, str] | None:
    """(repo_id, revision, path) when a URL is a model file's page or download link on the hub."""
    hosts = {"huggingface.co", "hf.co"}
    endpoint = _hub_endpoint()
    if endpoint:
        hosts.add(urlsplit(endpoint).netloc.lower())
    if netloc.lower() not in hosts or len(parts) < 5 or parts[2] not in ("resolve", "blob"):
        return None
    return f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])


def _dest_in(directory: Path, filename: str) -> Path:
    """`directory/filename`, checked to be directly inside `directory` (the last line of defence)."""
    dest = (directory / filename).resolve()
    if dest.parent != directory.resolve() or dest.name != filename:
        raise UsageError(f"refused to write {filename!r}: it would land outside {directory}")
    return dest


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
    directory = Path(weights_dir)
    if not (directory / entry.filename).is_file() and not is_offline(offline):
        _say(
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
    path = Path(name).expanduser()
    if path.is_file():
        return path  # any suffix: loading refuses pickles with its own message
    found = find_local_model(name, weights_dir)
    if found is not None:
        return found
    if name in REGISTRY or "://" in name or (name.count("/") >= 2 and name.endswith(SUFFIX)):
        return download(name, weights_dir, token=token, offline=offline)
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

    Raises `UsageError` for a name we refuse and `DownloadError` (one line that says what to do) for
    offline mode, network, access, missing files and checksum mismatches.
    """
    resolved = resolve_spec(spec)
    expected = _expected_sha256(resolved, sha256)
    directory = Path(weights_dir).expanduser().resolve()
    dest = _dest_in(directory, resolved.filename)
    offline = is_offline(offline)
    if _have_verified(dest, expected, resolved, offline):
        return dest
    if offline:
        raise DownloadError(
            f"{resolved.filename} is not in {directory} and downloads are off (--offline or HF_HUB_OFFLINE=1): "
            f"run `sdcli download {resolved.spec}` while online, or pass --model with a file you have"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"cannot create the weights directory {directory}: {e.strerror}; choose another with --weights-dir "
            "or SDCLI_WEIGHTS_DIR"
        ) from e
    with _lock(directory / f".{resolved.filename}.lock", resolved.filename):
        if dest.is_file() and (expected is None or sha256_file(dest) == expected):
            return dest  # another process finished it while we waited
        reporter = _Reporter(resolved.filename, progress)
        try:
            if resolved.kind == "hub":
                _fetch_hub(resolved, dest, expected, token, reporter)
            else:
                _fetch_url(resolved, dest, expected, reporter)
        except BaseException:  # Ctrl-C included: end the progress line, then let it through
            reporter.finish(ok=False)
            raise
        reporter.finish(ok=True)
    return dest


def _expected_sha256(resolved: DownloadSpec, extra: str | None) -> str | None:
    if extra is not None:
        extra = extra.strip().lower()
        if not _SHA256.fullmatch(extra):
            raise UsageError(f"--sha256 {extra!r}: expected 64 hex digits")
        if resolved.sha256 is not None and resolved.sha256 != extra:
            raise UsageError(
                f"the sha256 given ({extra[:12]}…) differs from {resolved.spec}'s ({resolved.sha256[:12]}…)"
            )
    return extra or resolved.sha256


def _have_verified(dest: Path, expected: str | None, resolved: DownloadSpec, offline: bool) -> bool:
    """Whether `dest` exists and matches the expected hash; a mismatch is re-downloaded (when online)."""
    if not dest.is_file():
        return False
    if expected is None or sha256_file(dest) == expected:
        return True
    if offline:
        raise DownloadError(
            f"{dest} does not match the sha256 expected for {resolved.spec}: run `sdcli download {resolved.spec}` "
            "while online to replace it"
        )
    _say(f"{dest.name} does not match its expected sha256; downloading it again (it is replaced once verified)")
    return False


@contextmanager
def _lock(lock_path: Path, name: str) -> Iterator[None]:
    """Hold `lock_path` (huggingface_hub's file lock), saying so when another process has it."""
    from filelock import Timeout  # a dependency of huggingface_hub, whose lock raises it
    from huggingface_hub.utils import WeakFileLock

    with ExitStack() as stack:
        try:
            stack.enter_context(WeakFileLock(lock_path, timeout=0.05))
        except Timeout:
            _say(f"another sdcli process is downloading {name}; waiting for it to finish")
            stack.enter_context(WeakFileLock(lock_path))
        yield


def _hub_endpoint() -> str | None:
    """`HF_ENDPOINT` read now (huggingface_hub reads it once, at import), passed explicitly to each call."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return endpoint or None


def _fetch_hub(
    resolved: DownloadSpec, dest: Path, expected: str | None, token: str | None, reporter: _Reporter
) -> None:
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from sdcli import __version__

    endpoint = _hub_endpoint()
    token = token or os.environ.get("HF_TOKEN") or None
    assert resolved.repo_id is not None and resolved.path_in_repo is not None
    url = hf_hub_url(resolved.repo_id, resolved.path_in_repo, revision=resolved.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(
            url, token=token, endpoint=endpoint, library_name="sdcli", library_version=__version__
        )
    except (OSError, httpx2.RequestError) as e:  # huggingface_hub's errors are OSErrors
        raise _friendly_error(e, resolved, url, dest, during_transfer=False) from e
    if meta.commit_hash is None:
        raise DownloadError(
            f"{urlsplit(url).netloc} did not answer like the Hugging Face hub (no X-Repo-Commit header): "
            "check HF_ENDPOINT and any proxy"
        )
    hub_sha = meta.etag.lower() if meta.etag and _SHA256.fullmatch(meta.etag.lower()) else None
    if expected is not None and hub_sha is not None and hub_sha != expected:
        raise DownloadError(
            f"{resolved.source} on the hub has sha256 {hub_sha[:12]}…, not the expected {expected[:12]}… "
            "(the file changed upstream): download it by its REPO_ID/FILE name to take the new one"
        )
    location = urljoin(url, meta.location)
    headers = build_hf_headers(token=token, library_name="sdcli", library_version=__version__)
    if _origin(location) != _origin(url):
        headers.pop("authorization", None)  # a signed CDN link needs no token, and must not receive one
    _stream_verify_rename(resolved, location, dest, headers, meta.size, expected or hub_sha, reporter)


def _fetch_url(resolved: DownloadSpec, dest: Path, expected: str | None, reporter: _Reporter) -> None:
    from sdcli import __version__

    assert resolved.url is not None
    headers = {"user-agent": f"sdcli/{__version__}"}  # never the hub token: this host is not the hub
    _stream_verify_rename(resolved, resolved.url, dest, headers, None, expected, reporter)


def _stream_verify_rename(
    resolved: DownloadSpec,
    url: str,
    dest: Path,
    headers: dict[str, str],
    size: int | None,
    expected: str | None,
    reporter: _Reporter,
) -> None:
    """Stream `url` into `dest.part` (resuming), check its sha256, then rename it to `dest`."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    part = dest.with_name(dest.name + ".part")
    resume = part.stat().st_size if part.is_file() else 0
    if size is not None and resume > size:  # not a prefix of this file: start again
        part.unlink()
        resume = 0
    try:
        with open(part, "ab") as f:  # append: bytes already there are kept, http_get asks for the rest
            http_get(
                url,
                f,
                resume_size=resume,
                headers=headers,
                expected_size=size,
                displayed_filename=dest.name,
                tqdm_class=reporter,  # type: ignore[arg-type]  # called like a tqdm class, see _Reporter
            )
    except HfHubHTTPError as e:
        if not (e.response.status_code == 416 and resume > 0):
            raise _friendly_error(e, resolved, url, dest, during_transfer=True) from e
        if _range_total(e) != resume:  # the .part is not a prefix of what the server has now
            part.unlink()
            raise DownloadError(
                f"the partial {part.name} did not match {resolved.source} and was deleted: run "
                f"`sdcli download {resolved.spec}` again"
            ) from e
        # 416 for `bytes=<size>-`: the .part was already complete (a run killed before the rename)
    except (OSError, httpx2.RequestError) as e:
        raise _friendly_error(e, resolved, url, dest, during_transfer=True) from e
    reporter.start(total=part.stat().st_size, initial=part.stat().st_size)  # when http_get had nothing to fetch
    reporter.verifying()
    actual = sha256_file(part, cache=False)
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{dest.name} from {resolved.source} has sha256 {actual[:12]}…, expected {expected[:12]}…; the file "
            f"was deleted: run `sdcli download {resolved.spec}` again, and report it if it happens twice"
        )
    os.replace(part, dest)
    _remember_sha256(dest, actual)


def _range_total(error: Any) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", error.response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlsplit(url)
    return parsed.scheme.lower(), (parsed.hostname or "").lower(), parsed.port


def _friendly_error(
    error: Exception, resolved: DownloadSpec, url: str, dest: Path, *, during_transfer: bool
) -> DownloadError:
    """Turn an OSError (huggingface_hub's HTTP errors are OSErrors) or an httpx error into a one-line
    `DownloadError` that says what to do."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    host = urlsplit(url).netloc
    name = resolved.source
    page = f"{_hub_endpoint() or 'https://huggingface.co'}/{resolved.repo_id}"
    hub = resolved.kind == "hub"
    if isinstance(error, OfflineModeIsEnabled):
        return DownloadError(
            f"downloads are off (HF_HUB_OFFLINE=1): run `sdcli download {resolved.spec}` with HF_HUB_OFFLINE unset"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        if isinstance(error, GatedRepoError) or (hub and status == 403):
            return DownloadError(
                f"{resolved.repo_id} is gated or private (HTTP {status}): accept the licence on {page} and set "
                "HF_TOKEN or pass --token"
            )
        if isinstance(error, RepositoryNotFoundError) or (hub and status == 401):
            return DownloadError(
                f"{resolved.repo_id} was not found, or is gated or private (HTTP {status}): check the name "
                "(`sdcli download --list`); for a gated or private model accept its licence and set HF_TOKEN or "
                "pass --token"
            )
        if isinstance(error, (EntryNotFoundError, RevisionNotFoundError)) or status == 404:
            hint = "`sdcli download --list` shows the known models" if hub else "check the URL"
            return DownloadError(f"{name} not found (HTTP 404): check the name; {hint}")
        if status in (401, 403):
            return DownloadError(
                f"{url} refused access (HTTP {status}): sdcli sends no credentials to other hosts; download it by "
                f"hand into {dest.parent}"
            )
        return DownloadError(f"{host} answered HTTP {status} for {name}: try again later (a rerun resumes)")
    if isinstance(error, httpx2.TransportError):
        if during_transfer and not isinstance(error, httpx2.ConnectError):
            return DownloadError(
                f"the download of {dest.name} from {host} was interrupted ({type(error).__name__}): run the same "
                "command again to resume it"
            )
        return DownloadError(
            f"cannot reach {host}: check the connection, or use --offline with a file already downloaded"
        )
    if isinstance(error, httpx2.RequestError):  # too many redirects, undecodable response
        return DownloadError(f"the request to {host} for {name} failed ({type(error).__name__}: {error})")
    if error.errno is None and "Consistency check failed" in str(error):
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        return DownloadError(
            f"{dest.name} from {host} did not have the size announced; the partial file was deleted: run "
            f"`sdcli download {resolved.spec}` again"
        )
    return DownloadError(
        f"cannot write {dest.name} in {dest.parent}: {getattr(error, 'strerror', None) or error}; free some space "
        "or choose another --weights-dir"
    )


# --------------------------------------------------------------------------------------------------
# Progress on stderr


def _say(message: str) -> None:
    sys.stderr.write(f"sdcli: {message}\n")
    sys.stderr.flush()


def _human_size(n: int | float | None) -> str:
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class _Reporter:
    """Shows one file's download on stderr: a rich bar (bytes, speed, ETA) or a single line.

    huggingface_hub's `http_get` takes a tqdm *class*: it calls it with `total=`, `initial=`, `desc=`...,
    enters the result as a context manager and calls `.update(n)`; on a retry it reuses the same object.
    An instance of this class plays that part, so the bar outlives http_get's retries and we decide when
    it ends.
    """

    def __init__(self, name: str, progress: bool | None) -> None:
        self.name = name
        self.rich = sys.stderr.isatty() if progress is None else progress
        self._bar: Any = None
        self._task: Any = None
        self._line_open = False
        self._started = False

    def __call__(self, *, total: int | None = None, initial: int = 0, **_: Any) -> _Reporter:
        self.start(total=total, initial=initial)
        return self

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: float | None = 1) -> None:
        """Advance by `n` bytes (negative when http_get restarts a download the server would not resume)."""
        if self._bar is not None:
            self._bar.advance(self._task, n or 0)

    def start(self, *, total: int | None, initial: int = 0) -> None:
        """Begin showing the download (once; later calls do nothing)."""
        if self._started:
            return
        self._started = True
        if self.rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(self.name, total=total, completed=initial)
            self._bar.start()
        else:
            resumed = f", resuming at {_human_size(initial)}" if initial else ""
            sys.stderr.write(f"sdcli: downloading {self.name} ({_human_size(total)}{resumed}) ... ")
            sys.stderr.flush()
            self._line_open = True

    def verifying(self) -> None:
        """The bytes are in; the sha256 is being checked."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.name} (verifying sha256)")

    def finish(self, ok: bool) -> None:
        """Stop the bar, or end the line with 'done' or 'failed'."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.name} ({'verified' if ok else 'failed'})")
            self._bar.stop()
            self._bar = None
        if self._line_open:
            sys.stderr.write("done\n" if ok else "failed\n")
            sys.stderr.flush()
            self._line_open = False
