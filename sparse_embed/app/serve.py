"""The HTTP service: identify and enrol faces over HTTP, a web page, statistics and metrics.

    python -m sparse_embed.app serve --gallery=gallery --host=127.0.0.1 --port=8080

The one module that imports FastAPI and uvicorn. `create_app` builds the
application over a `LiveGallery` (`sparse_embed.app.live`), the gallery's
model and MTCNN; `run_server` serves it with uvicorn on a socket already
bound (`make_server` gives the server itself, to stop it from another
thread). Endpoints (documented with examples on the App page, docs/app.md):

    GET    /                      the web page (upload a photo, see the names; enrol a name)
    GET    /health                {"status": "ok", ...}
    POST   /identify              multipart field `image` -> {"faces": [...]} (the report's face entries)
    POST   /people/{name}/faces   multipart field `image` (one face) -> 201, enrolled
    DELETE /people/{name}         the person and every embedding of theirs
    GET    /people                the people and their embedding counts
    GET    /stats                 gallery, model, index, requests, latency percentiles, faces
    GET    /metrics               the same counters in the Prometheus text format

Writes need `Authorization: Bearer <token>` (the token of
SPARSE_EMBED_APP_TOKEN or `--token_file`, compared in constant time); with no
token configured the service is read-only. `/identify` is open unless
`protect_identify`. Every error is a JSON body `{"error": "<message>"}` with
its 4xx status (500 only for a fault of the server).
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from sparse_embed.app.embedder import Detector, Embedder, find_faces
from sparse_embed.app.gallery import Gallery
from sparse_embed.app.identify import UNKNOWN, Settings, identify_faces
from sparse_embed.app.live import (
    LiveGallery,
    RequestError,
    RequestStats,
    SerialDetector,
    SerialEmbedder,
    decode_upload,
    index_stats,
)
from sparse_embed.errors import SparseEmbedError

log = logging.getLogger(__name__)

IMAGE_FIELD = "image"
MIB = 1 << 20
# What a multipart request may carry beyond the file itself (boundaries, part headers).
FORM_OVERHEAD = 64 << 10
MAX_NAME_LENGTH = 100
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The Server-Timing metric of every answer: the milliseconds from the request's arrival to its answer.
SERVER_TIMING_METRIC = "app"
# The stored record of an enrolled upload (a person's `images` in the manifest).
UPLOAD_RECORD = "upload:{filename}"


@dataclass(frozen=True)
class ServiceConfig:
    """How the service answers.

    Attributes:
        token: The bearer token writes need; None: the service is read-only.
        protect_identify: Whether `/identify` needs the token too.
        max_upload_mb: The largest image file accepted, in MiB.
        max_megapixels: The largest image accepted, in millions of pixels (checked on the
            file's header, before decoding).
        settings: How faces are matched (as `identify`'s flags).
    """

    token: str | None = field(default=None, repr=False)
    protect_identify: bool = False
    max_upload_mb: float = 10.0
    max_megapixels: float = 50.0
    settings: Settings = Settings()

    @property
    def max_upload_bytes(self) -> int:
        """The largest image file accepted, in bytes."""
        return int(self.max_upload_mb * MIB)

    @property
    def max_pixels(self) -> int:
        """The largest image accepted, in pixels."""
        return int(self.max_megapixels * 1e6)


class _UploadTooLarge(Exception):
    """The request body passed the service's limit while it was being read."""


class _Observe:
    """ASGI middleware: bounds the request body and records every request in the statistics.

    The body is counted as it arrives (and a declared Content-Length over the
    limit is refused at once), so an oversize upload is stopped before it is
    spooled; the handler reading it turns the overflow into a 413. Every
    answer carries a `Server-Timing: app;dur=<ms>` header (W3C Server Timing):
    the time from the request's arrival to its answer's start.

    Args:
        app: The wrapped application.
        stats: Where requests are recorded.
        limit: The largest request body, in bytes.
    """

    def __init__(self, app: Any, stats: RequestStats, limit: int) -> None:
        self.app = app
        self.stats = stats
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        declared = dict(scope.get("headers") or []).get(b"content-length")
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                raise _UploadTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _UploadTooLarge
            return message

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The time the service took, for a client to tell it from the network's and its own.
                timing = f"{SERVER_TIMING_METRIC};dur={(time.perf_counter() - start) * 1e3:.3f}"
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"server-timing", timing.encode())]}
            await send(message)

        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            # The route template, not the path: one label per endpoint whatever the names.
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.stats.record(scope["method"], endpoint, status, time.perf_counter() - start)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise RequestError(422, "a person's name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise RequestError(422, f"a person's name has at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if not name.isprintable():
        raise RequestError(422, "a person's name must not contain control characters")
    if name == UNKNOWN:
        raise RequestError(422, f"{UNKNOWN!r} is what the service calls a face it does not know: "
                                "choose another name")
    return name


def _face_record(face: Any) -> dict[str, Any]:
    return {"box": [round(v, 2) for v in face.box], "landmarks": face.landmarks.round(2).tolist(),
            "confidence": round(face.confidence, 6)}


def _page() -> str:
    return (resources.files("sparse_embed.app") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(live: LiveGallery, embedder: Embedder, detector: Detector | None, config: ServiceConfig,
               stats: RequestStats | None = None) -> FastAPI:
    """The service's application.

    Args:
        live: The gallery it answers from and changes.
        embedder: The gallery's model.
        detector: MTCNN, or None when every upload is an aligned face crop (`--aligned`).
        config: Token, limits and matching settings.
        stats: Where requests are counted; None: a new `RequestStats`.

    Returns:
        The FastAPI application (ASGI).
    """
    stats = stats or RequestStats()
    model_lock = threading.Lock()
    embedder = SerialEmbedder(embedder, model_lock)
    detector = None if detector is None else SerialDetector(detector, model_lock)
    page = _page()
    app = FastAPI(title="sparse-embed face identification", docs_url=None, redoc_url=None)
    app.add_middleware(_Observe, stats=stats, limit=config.max_upload_bytes + FORM_OVERHEAD)

    # Errors: always {"error": message}, with the status that says whose fault it is.

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(e.status, str(e), headers)

    @app.exception_handler(SparseEmbedError)
    async def _user_error(request: Request, e: SparseEmbedError) -> JSONResponse:
        return _error(422, str(e))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 404 and message == "Not Found":
            message = f"no endpoint {request.url.path}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(e.status_code, message, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _fault(request: Request, e: Exception) -> JSONResponse:
        log.exception("fault answering %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); the server's log has the details")

    def authorize(request: Request) -> None:
        if config.token is None:
            raise RequestError(403, "this service is read-only: start it with SPARSE_EMBED_APP_TOKEN or "
                                    "--token_file to allow changes")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise RequestError(401, "missing bearer token: send the header 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode(), config.token.encode()):
            raise RequestError(401, "wrong token")

    async def upload(request: Request) -> tuple[bytes, str]:
        """The bytes and file name of the form's `image` file."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError(415, f"send the image as multipart/form-data, in a file field named "
                                    f"{IMAGE_FIELD!r}")
        too_large = RequestError(413, f"the upload is larger than the limit of {config.max_upload_mb:g} MiB")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except _UploadTooLarge:
            raise too_large from None
        except HTTPException as e:
            raise RequestError(400, f"the form does not parse ({e.detail})") from None
        try:
            part = form.get(IMAGE_FIELD)
            if part is None or isinstance(part, str):
                raise RequestError(422, f"the form has no file field {IMAGE_FIELD!r}")
            data = await part.read()
            filename = part.filename or "image"
        finally:
            await form.close()
        if len(data) > config.max_upload_bytes:
            raise too_large
        return data, filename

    # Reading --------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> dict[str, Any]:
        snapshot = live.current()
        return {"status": "ok", "state": snapshot.state, "people": len(snapshot.gallery.people)}

    def identify_upload(data: bytes) -> list[dict[str, Any]]:
        image = decode_upload(data, config.max_pixels)
        faces = identify_faces(image, live.current().gallery, embedder, detector, config.settings)
        named = sum(face["name"] != UNKNOWN for face in faces)
        stats.count_faces("named", named)
        stats.count_faces("unknown", len(faces) - named)
        return faces

    @app.post("/identify")
    async def identify(request: Request) -> dict[str, Any]:
        if config.protect_identify:
            authorize(request)
        data, _ = await upload(request)
        return {"faces": await run_in_threadpool(identify_upload, data)}

    @app.get("/people")
    def people() -> dict[str, Any]:
        counts = live.current().gallery.counts()
        return {"people": [{"name": name, "embeddings": n} for name, n in counts.items()],
                "count": len(counts)}

    @app.get("/stats")
    def statistics() -> dict[str, Any]:
        snapshot = live.current()
        gallery = snapshot.gallery
        calibration = gallery.calibration
        return {
            "gallery": {"state": snapshot.state, "people": len(gallery.people),
                        "embeddings": int(len(gallery.rows)), "person_means": gallery.means is not None,
                        "threshold": gallery.threshold,
                        "calibration": None if calibration is None else calibration.summary()},
            "model": asdict(gallery.model),
            "index": index_stats(gallery),
            "limits": {"max_upload_mb": config.max_upload_mb, "max_megapixels": config.max_megapixels,
                       "protect_identify": config.protect_identify, "writable": config.token is not None},
            **stats.summary(),
        }

    @app.get("/metrics")
    def metrics() -> Response:
        gallery = live.current().gallery
        gauges = [("gallery_people", "People enrolled in the gallery.", len(gallery.people)),
                  ("gallery_embeddings", "Embeddings in the gallery's index.", len(gallery.rows)),
                  ("gallery_threshold", "The score a face needs to be named.", gallery.threshold),
                  ("uptime_seconds", "Seconds since the service started.", stats.uptime_s)]
        return Response(stats.prometheus(gauges), media_type=PROMETHEUS_TYPE)

    # Writing --------------------------------------------------------------------

    def enrol_upload(name: str, data: bytes, filename: str) -> dict[str, Any]:
        image = decode_upload(data, config.max_pixels)
        faces = find_faces(image, detector, embedder.width, embedder.height)
        if not faces:
            raise RequestError(422, "no face found in the image: enrol a photograph that shows the face")
        if len(faces) > 1:
            raise RequestError(422, f"{len(faces)} faces in the image, one expected: crop it to the person")
        # Embedded before the writer's lock is taken: writers wait on each other only for the save.
        embedding = embedder.embed([faces[0].crop])

        def edit(gallery: Gallery) -> tuple[bool, int]:
            new = name not in gallery.people
            gallery.enroll(name, embedding, [UPLOAD_RECORD.format(filename=filename)])
            return new, gallery.counts()[name]

        new, count = live.change(edit)
        stats.count_faces("enrolled")
        return {"name": name, "new_person": new, "embeddings": count, "face": _face_record(faces[0])}

    @app.post("/people/{name}/faces", status_code=201)
    async def enrol(name: str, request: Request) -> JSONResponse:
        authorize(request)
        name = _check_name(name)
        data, filename = await upload(request)
        return JSONResponse(await run_in_threadpool(enrol_upload, name, data, filename), status_code=201)

    @app.delete("/people/{name}")
    def remove(name: str, request: Request) -> dict[str, Any]:
        authorize(request)

        def edit(gallery: Gallery) -> int:
            if name not in gallery.people:
                raise RequestError(404, f"no person {name!r} in the gallery")
            return gallery.remove(name)

        return {"name": name, "removed": live.change(edit)}

    return app


def make_server(app: FastAPI, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server of `app`; `server.run(sockets=[sock])` serves it until `should_exit` is set.

    Args:
        app: From `create_app`.
        log_level: uvicorn's log level.
    """
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level))


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serves `app` with uvicorn on a bound socket until interrupted.

    Args:
        app: From `create_app`.
        sock: A socket bound to the address to serve (`sparse_embed.app.live.listen`).
    """
    make_server(app).run(sockets=[sock])
