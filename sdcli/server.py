"""`sdcli serve`: the model kept loaded behind AUTOMATIC1111's `/sdapi/v1` HTTP API.

This module is the HTTP side: routes, authentication, body caps, the request log, and starting and stopping
uvicorn. What a request makes is `sdcli.server_jobs`' job (the CLI's own jobs and run); one generation runs
at a time (`sdcli.server_queue`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from sdcli import __version__
from sdcli.errors import SdcliError
from sdcli.lora_sets import available_loras, lora_metadata
from sdcli.sampler_names import SAMPLERS
from sdcli.server_jobs import SCHEDULERS, ServerError, Service, Settings
from sdcli.server_models import ImagesResponse, Img2ImgRequest, OptionsRequest, Txt2ImgRequest
from sdcli.server_queue import QueueClosed, QueueFull
from sdcli.weights import short_hash

log = logging.getLogger("sdcli.server")


# ---------------------------------------------------------------------------------------------------------
# The application


def create_app(service: Service, log_json: bool = False) -> FastAPI:
    """The FastAPI application over a loaded `service`."""
    app = FastAPI(title="sdcli", version=__version__, description="AUTOMATIC1111-compatible API of sdcli")
    app.state.service = service
    settings = service.settings

    @app.exception_handler(ServerError)
    async def server_error(request: Request, error: ServerError) -> JSONResponse:
        return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=error.status)

    @app.exception_handler(SdcliError)
    async def sdcli_error(request: Request, error: SdcliError) -> JSONResponse:
        return JSONResponse({"error": type(error).__name__, "detail": str(error)}, status_code=422)

    async def queued(work: Callable[[], Any]) -> Any:
        try:
            future = service.queue.submit(work)
        except QueueFull:
            raise HTTPException(429, f"the queue is full ({settings.queue} waiting): try again later") from None
        except QueueClosed:
            raise HTTPException(503, "the server is stopping") from None
        try:
            return await asyncio.wrap_future(future)
        except QueueClosed:
            raise HTTPException(503, "the server is stopping: the job was cancelled") from None

    async def images(payload: Txt2ImgRequest, command: str) -> dict:
        plan = await run_in_threadpool(service.plan, payload, command)
        return await queued(lambda: service.generate(plan))

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
    async def txt2img(payload: Txt2ImgRequest) -> dict:
        return await images(payload, "txt2img")

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse)
    async def img2img(payload: Img2ImgRequest) -> dict:
        return await images(payload, "img2img")

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict]:  # not async: a hash not yet cached is computed (in a worker thread)
        current = service.models.selected
        return [
            {"title": service.models.title(p, p == current), "model_name": p.stem,
             "hash": short_hash(p) if p == current else None, "sha256": None, "filename": p.name, "config": None}
            for p in service.models.available()
        ]  # fmt: skip

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        """Nothing to do: sd-models reads the weights folder on each call (A1111 clients call this)."""

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict]:
        return [{"name": s.display_name, "aliases": [s.name], "options": {}} for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict]:
        return [{"name": k, "label": k.capitalize(), "aliases": None, "default_rho": -1, "need_inner_model": False}
                for k in SCHEDULERS]  # fmt: skip

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict]:  # not async: reads the files' headers
        folder = settings.lora_dir
        return [{"name": name, "alias": name, "path": path.relative_to(folder).as_posix(),
                 "metadata": lora_metadata(path)} for name, path in available_loras(folder).items()]  # fmt: skip

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict:  # not async: reads the files
        return service.embeddings_body()

    @app.post("/sdapi/v1/refresh-loras")
    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_folders() -> None:
        """Nothing to do: the LoRA and embeddings folders are searched anew for every request and listing."""

    @app.get("/sdapi/v1/options")
    def get_options() -> dict:
        return {
            "sd_model_checkpoint": service.models.title(service.models.selected),
            "CLIP_stop_at_last_layers": service.models.clip_skip,
        }

    @app.post("/sdapi/v1/options")
    async def set_options(options: OptionsRequest) -> None:
        unknown = sorted(options.model_extra or {})
        if unknown:
            raise ServerError(f"unsupported option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        path = service.models.find(options.sd_model_checkpoint) if options.sd_model_checkpoint else None
        clip_skip = options.CLIP_stop_at_last_layers

        def apply() -> None:
            if path is not None:
                service.models.ensure(path)
                service.models.selected = path
            if clip_skip is not None:
                service.models.clip_skip = clip_skip

        await queued(apply)

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict:  # not async: the preview is computed
        return service.progress_body(with_image=not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict:
        return {"interrupted": service.queue.interrupt()}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "busy": service.queue.busy, "waiting": service.queue.waiting}

    app.add_middleware(BodyLimit, limit=settings.max_body)

    @app.middleware("http")
    async def gate(request: Request, call_next) -> Response:
        started = time.monotonic()
        if request.url.path != "/health" and not _authorized(request, settings):
            response: Response = JSONResponse(
                {"detail": "not authenticated"}, status_code=401, headers={"WWW-Authenticate": 'Basic realm="sdcli"'}
            )
        else:
            try:
                response = await call_next(request)
            except Exception:  # logged here, answered 500 by Starlette; the server goes on
                _log_request(request, 500, time.monotonic() - started, log_json)
                raise
        _log_request(request, response.status_code, time.monotonic() - started, log_json)
        return response

    return app


def _authorized(request: Request, settings: Settings) -> bool:
    """HTTP basic (--api-auth) or a bearer token (--token); everything passes when neither is set."""
    if not settings.users and settings.token is None:
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and settings.token is not None:
        return secrets.compare_digest(credentials.strip().encode(), settings.token.encode())
    if scheme.lower() == "basic" and settings.users:
        try:
            user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            return False
        expected = settings.users.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())
    return False


def _log_request(request: Request, status: int, seconds: float, as_json: bool) -> None:
    client = request.client.host if request.client else "-"
    if as_json:
        record = {"client": client, "method": request.method, "path": request.url.path, "status": status,
                  "seconds": round(seconds, 3)}  # fmt: skip
        log.info(json.dumps(record))
    else:
        log.info(f"{client} {request.method} {request.url.path} {status} {seconds:.3f}s")


class BodyLimit:
    """Refuses (413) a request body larger than `limit` bytes, before the application reads it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(self.limit, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _too_large(self.limit, scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(limit: int, scope, receive, send) -> None:
    response = JSONResponse({"detail": f"the request body is larger than {limit} bytes (--max-body)"}, 413)
    await response(scope, receive, send)


def serve_forever(
    model: str | None,
    *,
    host: str,
    port: int,
    queue: int,
    users: dict[str, str],
    token: str | None,
    max_pixels: int,
    max_body: int,
    log_json: bool,
    device: str,
    dtype: str,
    weights_dir: Path | None,
    lora_dir: Path | None = None,
    embeddings_dir: Path | None = None,
) -> None:
    """Load the model, then serve until SIGINT/SIGTERM, which interrupts the job in flight, cancels those
    waiting (503), and lets the responses go out before the process exits."""
    from sdcli.devices import resolve_device, resolve_dtype
    from sdcli.download import resolve_model
    from sdcli.weights import weights_dir as find_weights_dir

    listener = _listen(host, port)  # before the model loads: a port in use is said at once
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = find_weights_dir(weights_dir)
    chosen = resolve_device(device)
    settings = Settings(
        model=resolve_model(model, folder), weights_dir=folder, device=chosen, dtype=resolve_dtype(dtype, chosen),
        queue=queue, users=users, token=token, max_pixels=max_pixels, max_body=max_body,
        lora_dir=Path(lora_dir).expanduser() if lora_dir else None,
        embeddings_dir=Path(embeddings_dir).expanduser() if embeddings_dir else None,
    )  # fmt: skip
    service = Service(settings)
    note = (lambda message: log.info(json.dumps({"message": message}))) if log_json else log.info
    note(f"loading {settings.model.name} on {chosen.type} ({str(settings.dtype).removeprefix('torch.')})")
    service.load()
    config = uvicorn.Config(create_app(service, log_json), host=host, port=port, access_log=False, log_level="warning")
    server = stopping_server(config, service)
    note(f"serving on http://{host}:{port} (AUTOMATIC1111 API at /sdapi/v1)")
    server.run(sockets=[listener])
    note("stopped")


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or SdcliError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        raise SdcliError(
            f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port or --host"
        ) from None
    return listener


def stopping_server(config, service: Service):
    """A uvicorn server whose exit signal also closes the generation queue (interrupt, cancel the rest)."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.queue.close(timeout=0)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal once stopped, so the process would die of it: exit 0 instead.
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server(config)
