"""A local stand-in for the Hugging Face hub and its CDN, for download tests without internet.

Two HTTP servers on 127.0.0.1, each on a random port:
- `hub` answers `HEAD/GET /{owner}/{repo}/resolve/{revision}/{path}` the way huggingface.co does for an LFS
  file, as huggingface_hub 2.4's `get_hf_file_metadata` reads it: a 302 whose headers carry
  `X-Repo-Commit`, `X-Linked-Etag` (the sha256), `X-Linked-Size` and a `Location` on another origin (the
  CDN); errors carry `X-Error-Code` (`RepoNotFound` with 401 for an unknown repository, as the hub does
  for anonymous callers; `GatedRepo` with 401/403; `EntryNotFound` with 404).
- `cdn` serves the blobs at `/blobs/{sha256}` and plain files at `/files/{name}`, with `Range: bytes=N-`
  (206 + `Content-Range`, 416 past the end), like S3/CloudFront or any file server.

Knobs for failure tests: `cut_at` + `cuts` (the next `cuts` GETs on the CDN stop sending at absolute byte
`cut_at` and close the connection), `corrupt` (blobs served with a flipped byte), `gated` (repo -> token).
Every request is recorded in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_safetensors(n_floats: int = 65536, seed: int = 0) -> bytes:
    """A valid .safetensors file (one F32 tensor) of about 4 * n_floats bytes, written without torch."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}})
    header_bytes = header.encode() + b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    body = hashlib.shake_256(f"sdcli-{seed}".encode()).digest(4 * n_floats)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + body


@dataclass
class Request:
    """One request as a server saw it."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass
class FakeHub:
    """The two servers and what they serve; `start()` before use, `stop()` after."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    plain: dict[str, bytes] = field(default_factory=dict)
    gated: dict[str, str] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    cut_at: int | None = None
    cuts: int = 0
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, ThreadingHTTPServer] = {}

    # -- content --------------------------------------------------------------------------------
    def add_file(self, repo_id: str, path: str, data: bytes) -> str:
        """Serve `data` as `repo_id/path` on the hub; returns its sha256."""
        self.repos.setdefault(repo_id, {})[path] = data
        return hashlib.sha256(data).hexdigest()

    def add_plain(self, name: str, data: bytes) -> str:
        """Serve `data` at `{cdn_url}/files/{name}`; returns that URL."""
        self.plain[name] = data
        return f"{self.cdn_url}/files/{name}"

    def _blob(self, sha: str) -> bytes | None:
        for files in self.repos.values():
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        return None

    def seen(self, server: str, method: str | None = None) -> list[Request]:
        """The recorded requests to one server (and method)."""
        return [r for r in self.requests if r.server == server and (method is None or r.method == method)]

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers[role] = server
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()

    def _url(self, role: str) -> str:
        host, port = self._servers[role].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hub_url(self) -> str:
        return self._url("hub")

    @property
    def cdn_url(self) -> str:
        return self._url("cdn")


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so a cut connection cannot poison a pooled one.
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass  # keep test output clean

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._answer()

        def do_GET(self) -> None:  # noqa: N802
            self._answer()

        def _answer(self) -> None:
            with hub._lock:
                hub.requests.append(
                    Request(role, self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                )
            if role == "hub":
                self._hub()
            else:
                self._cdn()

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _hub(self) -> None:
            parts = unquote(urlsplit(self.path).path).lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                self._send(404, {}, b"Not Found")
                return
            repo_id, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
            files = hub.repos.get(repo_id)
            if files is None:
                self._send(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                return
            token = hub.gated.get(repo_id)
            auth = self.headers.get("Authorization")
            if token is not None and auth != f"Bearer {token}":
                status = 403 if auth else 401
                self._send(status, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted"})
                return
            data = files.get(filename)
            if data is None:
                self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                return
            sha = hashlib.sha256(data).hexdigest()
            self._send(
                302,
                {
                    "X-Repo-Commit": COMMIT,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": '"0000000000000000000000000000000000000000"',  # the pointer file's git sha1
                    "Location": f"{hub.cdn_url}/blobs/{sha}",
                },
            )

        def _cdn(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith("/blobs/"):
                sha = path.removeprefix("/blobs/")
                data = hub._blob(sha)
                if data is not None and sha in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
            else:
                data = hub.plain.get(unquote(path.removeprefix("/files/")))
            if data is None:
                self._send(404, {}, b"Not Found")
                return
            start, status, headers = 0, 200, {"Accept-Ranges": "bytes"}
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                if start >= len(data):
                    self._send(416, {"Content-Range": f"bytes */{len(data)}"})
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            with hub._lock:
                cut_at = hub.cut_at if self.command == "GET" and hub.cuts > 0 else None
                if cut_at is not None:
                    hub.cuts -= 1
            if cut_at is None:
                self._send(status, headers, body)
                return
            # Announce the whole body, send only up to byte `cut_at` of the file, then hang up.
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: max(0, cut_at - start)])
            self.wfile.flush()
            self.close_connection = True

    return Handler
