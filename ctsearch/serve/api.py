"""The HTTP API and web page of ``ctsearch serve`` (FastAPI), over a :class:`SearchService`.

Routes (docs/serve.md has curl examples):

    GET  /                      the web page (static files, no network access needed)
    GET  /api/health            {"status": "ok"}
    GET  /api/info              model, dimensions, slices, volumes, shards
    GET  /api/patients          patients and their examinations, to choose a query
    GET  /api/volumes/{id}      the volume's indexed slices with z, for the slider
    GET  /api/search            ?query=VOLUME:SLICE&k=5[&patient=P|&exclude_patient=P][&one_per=series|study]
    POST /api/search            the same with a NIfTI / DICOM / zipped DICOM series as the body (&slice=N)
    GET|POST /api/crossexam     ?query=...&per_exam=5
    GET|POST /api/explain       ?query=...&hit=VOLUME:SLICE[&masks=1000] -> PNG
    GET  /api/thumbnail         ?volume_id=V&slice=N (or ?query=V:N)&window=wide|narrow|liver|L,W[&size=256] -> PNG
    POST /api/thumbnail         the uploaded query's slice (&slice=N) -> PNG

Errors are ``{"error": "one line"}`` with a 4xx status (5xx: "internal error", details only in
the server log). With a token configured every ``/api/`` route needs ``Authorization: Bearer
TOKEN`` (401 otherwise); the page's static files carry no patient data and ask for the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from importlib import resources

# At module level: FastAPI resolves the (string) annotations of the routes in this namespace.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctsearch.errors import CTSearchInputError
from ctsearch.serve.service import Query, SearchService, ServeError, as_serve_error

# A child of Ray Serve's logger: under Serve its lines land in the replica's log file.
log = logging.getLogger("ray.serve.ctsearch")
STATIC_FILES = ("index.html", "app.js", "style.css")
# The page may load nothing from anywhere but this server.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def token_digest(token: str) -> str:
    """sha256 of the bearer token: what the server keeps (the token itself never enters Ray)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def build_app(service: SearchService, token_sha256: str | None = None):
    """A FastAPI app serving ``service``; with ``token_sha256`` every /api/ route needs the bearer token."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(_warm(service))
        yield
        service.close()
        task.cancel()

    app = FastAPI(title="ctsearch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    static = {
        name: resources.files("ctsearch.serve").joinpath("static", name).read_bytes() for name in STATIC_FILES
    }
    types = {
        "html": "text/html; charset=utf-8",
        "js": "text/javascript; charset=utf-8",
        "css": "text/css; charset=utf-8",
    }

    def error(status: int, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="ctsearch"'} if status == 401 else None
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if (
            token_sha256
            and path.startswith("/api/")
            and not _authorised(request.headers.get("authorization"), token_sha256)
        ):
            response = error(401, "missing or wrong bearer token (send Authorization: Bearer TOKEN)")
        else:
            try:
                response = await call_next(request)
            except Exception:  # noqa: BLE001 - anything unexpected is a 500 without a traceback for the client
                log.exception("internal error on %s %s", request.method, path)
                response = error(500, "internal error (details are in the server log)")
        if path == "/" or path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        # Path only: query strings hold patient and volume ids.
        log.info(
            "%s %s %d %.1f ms",
            request.method,
            path,
            response.status_code,
            1000 * (time.perf_counter() - start),
        )
        return response

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return error(e.status, e.message)

    @app.exception_handler(CTSearchInputError)
    async def _input_error(request: Request, e: CTSearchInputError):
        se = as_serve_error(e)
        return error(se.status, se.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return error(400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error(e.status_code, e.detail if isinstance(e.detail, str) else "bad request")

    def page(name: str) -> Response:
        return Response(static[name], media_type=types[name.rsplit(".", 1)[1]])

    @app.get("/")
    async def index_page():
        return page("index.html")

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in static:
            raise ServeError(404, f"no static file {name!r}")
        return page(name)

    @app.get("/api/health")
    async def health():
        return {"status": "ok"}

    @app.get("/api/info")
    async def info():
        return await service.info()

    @app.get("/api/patients")
    async def patients():
        return await service.patients()

    @app.get("/api/volumes/{volume_id:path}")
    async def volume(volume_id: str):
        return {"volume_id": volume_id, "slices": await service.volume_slices(volume_id)}

    async def query_of(request: Request) -> Query:
        p = request.query_params
        upload = await _body(request, service.max_upload_bytes) if request.method == "POST" else None
        return Query.parse(p.get("query"), _int(p, "slice", None), upload)

    @app.api_route("/api/search", methods=["GET", "POST"])
    async def search(request: Request):
        p = request.query_params
        q = await query_of(request)
        return await service.search(
            q,
            k=_int(p, "k", 5),
            patient=p.get("patient") or None,
            exclude_patient=p.get("exclude_patient") or None,
            one_per=p.get("one_per") or None,
        )

    @app.api_route("/api/crossexam", methods=["GET", "POST"])
    async def crossexam(request: Request):
        q = await query_of(request)
        return await service.cross_exam(q, per_exam=_int(request.query_params, "per_exam", 5))

    @app.api_route("/api/explain", methods=["GET", "POST"])
    async def explain(request: Request):
        p = request.query_params
        q = await query_of(request)
        if not p.get("hit"):
            raise ServeError(
                400, "missing hit=volume_id:slice_index (the retrieved slice to explain with the query)"
            )
        png = await service.explain(q, p["hit"], masks=_int(p, "masks", 1000), seed=_int(p, "seed", 0))
        return Response(png, media_type="image/png")

    @app.api_route("/api/thumbnail", methods=["GET", "POST"])
    async def thumbnail(request: Request):
        p = request.query_params
        size = _int(p, "size", 256)
        if request.method == "POST" or p.get("query"):
            png = await service.query_thumbnail(await query_of(request), p.get("window"), size)
        else:
            vid, s = p.get("volume_id"), _int(p, "slice", None)
            if not vid or s is None:
                raise ServeError(400, "thumbnail needs volume_id=V and slice=N (or POST an uploaded file)")
            png = await service.thumbnail(vid, s, p.get("window"), size)
        return Response(png, media_type="image/png")

    return app


async def _warm(service: SearchService) -> None:
    try:
        await service.warm()
    except Exception:  # noqa: BLE001 - a cache warm-up must never take the replica down
        log.exception("warming the DICOM slice order failed; hits will read it on demand")


def _authorised(header: str | None, token_sha256: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    return hmac.compare_digest(token_digest(value.strip()), token_sha256)


def _int(params, name: str, default: int | None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ServeError(400, f"{name} must be an integer, got {raw[:40]!r}") from None


async def _body(request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"upload is {declared} bytes, over the server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"upload is over the server's limit of {limit} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise ServeError(400, "empty upload: POST the file as the request body (curl --data-binary @FILE)")
    return data
