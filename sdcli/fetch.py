"""Getting a resolved model file onto disk: a verified, resumable download, and its progress on stderr.

Imports no torch, and huggingface_hub, httpx2 and rich only inside the functions that need them.

How a download stays safe:
- It streams into `<weights dir>/<name>.part` (huggingface_hub's `http_get`, which sends `Range` and retries
  transient failures itself); an interrupted run leaves the `.part`, and the next run resumes from it.
- When the bytes are all there, the `.part` is hashed and compared with the registry's sha256, else the
  hub's (the LFS sha256 the hub sends as `X-Linked-Etag`), else the one the user gave (`URL#sha256=HEX`);
  a mismatch deletes it. Its safetensors header is then read and checked (`sdcli.header`), so an error
  page or a pickle served under a model's name is deleted too, hash or no hash. Only a verified file is
  renamed to its final name, so a file under the final name is always complete. A `.part` that received
  nothing (an error status) is removed; any other is kept for resuming.
- We do not use `hf_hub_download(local_dir=...)`: in huggingface_hub 2.x its temporary files are unique
  per process and deleted on failure, so it cannot resume after an interruption, and it leaves its
  `.cache/huggingface/` folder in the weights directory. We use its metadata call and streaming function
  instead; no hub protocol is written here.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from sdcli.errors import CheckpointError, DownloadError
from sdcli.header import read_header
from sdcli.model_specs import SHA256_HEX, DownloadSpec, hub_endpoint
from sdcli.weights import _remember_sha256, sha256_file

__all__ = ["Reporter", "fetch_hub", "fetch_url", "say"]


# --------------------------------------------------------------------------------------------------
# Fetching


def fetch_hub(resolved: DownloadSpec, dest: Path, expected: str | None, token: str | None, reporter: Reporter) -> None:
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from sdcli import __version__

    endpoint = hub_endpoint()
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
    hub_sha = meta.etag.lower() if meta.etag and SHA256_HEX.fullmatch(meta.etag.lower()) else None
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


def fetch_url(resolved: DownloadSpec, dest: Path, expected: str | None, reporter: Reporter) -> None:
    from sdcli import __version__

    assert resolved.url is not None
    headers = {"user-agent": f"sdcli/{__version__}"}  # never the hub token: this host is not the hub
    if resolved.credentials is not None:  # from https://user:password@host/..., kept out of the URL and messages
        headers["authorization"] = "Basic " + base64.b64encode(resolved.credentials.encode()).decode()
    _stream_verify_rename(resolved, resolved.url, dest, headers, None, expected, reporter)


def _stream_verify_rename(
    resolved: DownloadSpec,
    url: str,
    dest: Path,
    headers: dict[str, str],
    size: int | None,
    expected: str | None,
    reporter: Reporter,
) -> None:
    """Stream `url` into `dest.part` (resuming), check its sha256 and that it is a safetensors file, then
    rename it to `dest`."""
    part = dest.with_name(dest.name + ".part")
    resume = part.stat().st_size if part.is_file() else 0
    if size is not None and resume > size:  # not a prefix of this file: start again
        part.unlink()
        resume = 0
    try:
        _stream(resolved, url, part, dest, headers, size, resume, reporter)
    finally:
        if part.is_file() and part.stat().st_size == 0:  # nothing arrived (an error status): nothing to resume
            part.unlink()
    reporter.start(total=part.stat().st_size, initial=part.stat().st_size)  # when http_get had nothing to fetch
    reporter.verifying()
    actual = sha256_file(part, cache=False)
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{dest.name} from {resolved.source} has sha256 {actual[:12]}…, expected {expected[:12]}…; the file "
            f"was deleted: run `sdcli download {resolved.spec}` again, and report it if it happens twice"
        )
    try:
        read_header(part)  # an error page or a pickle must not get a model's name, whatever its hash
    except CheckpointError as e:
        part.unlink(missing_ok=True)
        reason = str(e).removeprefix(f"{part}: ")
        raise DownloadError(
            f"what {resolved.source} sent is not a safetensors file ({reason}) and was deleted: check the "
            "address, or download the file by hand and pass it to --model"
        ) from None
    os.replace(part, dest)
    _remember_sha256(dest, actual)


def _stream(
    resolved: DownloadSpec,
    url: str,
    part: Path,
    dest: Path,
    headers: dict[str, str],
    size: int | None,
    resume: int,
    reporter: Reporter,
) -> None:
    """Append the bytes after `resume` to `part` (huggingface_hub's http_get retries transient failures)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    try:
        with open(part, "ab") as f:  # append: bytes already there are kept, http_get asks for the rest
            http_get(
                url,
                f,
                resume_size=resume,
                headers=headers,
                expected_size=size,
                displayed_filename=dest.name,
                tqdm_class=reporter,  # type: ignore[arg-type]  # called like a tqdm class, see Reporter
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
    page = f"{hub_endpoint() or 'https://huggingface.co'}/{resolved.repo_id}"
    hub = resolved.kind == "hub"
    if isinstance(error, OfflineModeIsEnabled):
        return DownloadError(
            f"downloads are off (HF_HUB_OFFLINE=1): run `sdcli download {resolved.spec}` with HF_HUB_OFFLINE unset, "
            f"or pass --model with a .safetensors file you have (a path, or the name of one put into {dest.parent})"
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
            f"cannot reach {host}: check the connection and run `sdcli download {resolved.spec}` once online; or use "
            f"a .safetensors file you have: pass --model FILE, or put it into {dest.parent} and pass --model NAME"
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


def say(message: str) -> None:
    sys.stderr.write(f"sdcli: {message}\n")
    sys.stderr.flush()


def _human_size(n: int | float | None) -> str:
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class Reporter:
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

    def __call__(self, *, total: int | None = None, initial: int = 0, **_: Any) -> Reporter:
        self.start(total=total, initial=initial)
        return self

    def __enter__(self) -> Reporter:
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
