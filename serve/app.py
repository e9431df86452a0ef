"""The HTTP API (FastAPI) over a VideoService: the same app runs under uvicorn and as a Ray Serve ingress.

OpenAI's video API, as the official `openai` SDK calls it (`client.videos.*`; serve/video_object.py maps a job
onto its `Video` object), plus flowblend's progress:
  POST   /v1/videos                  -> 202 Video (JSON or multipart/form-data); 400 one line; 413; 429 queue full
  GET    /v1/videos?limit&after&order -> {data, first_id, last_id, has_more}, newest first unless order=asc
  GET    /v1/videos/{id}?wait=S      -> Video; `wait` long-polls up to S s
  GET    /v1/videos/{id}/content?variant=video|thumbnail -> the mp4, or its first frame as PNG (409 before done)
  POST   /v1/videos/{id}/remix       -> 202 Video: the same request with a new prompt
  DELETE /v1/videos/{id}             -> {id, deleted: true, object: "video.deleted"}: gone for every reader
  POST   /v1/videos/{id}/cancel      -> flowblend: cancel, keep the record (200 dropped, 202 stops at its next step)
  GET    /                           -> a page for people (serve/page.html); GET /v1/limits what it shows
  GET    /health                     -> 200 ready; 503 loading / unavailable / failed / draining, with the reason
  GET    /metrics                    -> Prometheus text
Refusals before any route (serve/guard.py): 400 Host, 403 a foreign Origin, 415 a body not JSON or multipart,
401 key, 413 body cap, 408 a body slower than --body-timeout (headers: --header-timeout, serve/deadline.py).
Errors are `{"error": {"message": "<one line>", "type": "...", "code": ...}}`, as OpenAI's API spells them.
Every GET route answers HEAD too. File I/O runs on worker threads, never on the event loop.
"""
from __future__ import annotations

import asyncio
import os
from importlib import resources

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import RequestGuard, allowed_hosts, error_response
from .intake import BodyError, read_video_request
from .metrics import CONTENT_TYPE
from .records import fd_path
from .results import THUMBNAIL
from .service import ServiceError, VideoService
from .video_object import video_object
from .video_request import error_line
from .warm import WARMUP_PROMPT

MAX_WAIT_SECONDS = 60.0
POLL_AFTER_MS = 250  # told to the SDK's poll helper (header openai-poll-after-ms): toy jobs take about a second
MEDIA_TYPES = {".mp4": "video/mp4", ".gif": "image/gif", ".png": "image/png"}
UNSUPPORTED = {"/v1/videos/edits": "editing a video", "/v1/videos/extensions": "extending a video",
               "/v1/videos/characters": "characters"}


def create_app(service: VideoService) -> FastAPI:
    """The API over `service` (started by the caller; the app never loads or stops anything itself)."""
    c = service.config
    docs = {} if c.api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="flowblend", summary="Blended two-model video generation over warm engines", **docs)
    app.state.service = service
    app.add_middleware(RequestGuard, api_key=c.api_key, hosts=allowed_hosts(c.host, c.allowed_hosts),
                       max_body_bytes=c.max_body_bytes, body_timeout=c.body_timeout)
    pair = service.family.name

    def view(record) -> dict:
        return video_object(record, pair, service.cancel_requested(record.id))

    def get(path: str, **kwargs):
        """A GET route that answers HEAD too (the HEAD one kept out of the OpenAPI schema)."""
        def register(fn):
            app.head(path, include_in_schema=False, **{k: v for k, v in kwargs.items() if k != "include_in_schema"})(fn)
            return app.get(path, **kwargs)(fn)
        return register

    def off_loop(fn, *args):
        return asyncio.to_thread(fn, *args)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        service.metrics.rejected.labels("invalid").inc()
        return error_response(400, error_line(list(exc.errors())))

    @app.exception_handler(BodyError)
    async def bad_body(request: Request, exc: BodyError):
        service.metrics.rejected.labels("invalid").inc()
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path} (the API is "
                                               "/v1/videos, /health and /metrics)")

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError):
        return error_response(exc.status, str(exc), exc.retry_after)

    @get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("flowblend.serve").joinpath("page.html").read_text())

    @get("/v1/limits", include_in_schema=False)
    async def limits():
        """What the page shows beside the prompt: this server's warm size, default plan and steps, and limits."""
        d = service.default_spec.request
        return {"pair": pair, "size": f"{d.width}x{d.height}", "frames": d.frames, "steps": d.steps,
                "plan": d.plan.spec, "max_steps": c.max_steps, "dynamic_shapes": c.dynamic_shapes,
                "example_prompt": WARMUP_PROMPT}

    for path, what in UNSUPPORTED.items():
        def unsupported(what=what):
            raise ServiceError(400, f"{what} is not supported by this server: it generates videos from text "
                                    "(POST /v1/videos, or /v1/videos/{id}/remix for a new prompt)")
        app.add_api_route(path, unsupported, methods=["POST"], include_in_schema=False)
        app.add_api_route(path + "/{character_id}", unsupported, methods=["GET"], include_in_schema=False)

    @app.post("/v1/videos", status_code=202)
    async def create_video(request: Request):
        body = await read_video_request(request)
        return view(await off_loop(service.submit, body))

    @get("/v1/videos")
    async def list_videos(limit: int = Query(20, ge=1, le=100), after: str | None = Query(None, max_length=64),
                          order: str = Query("desc", pattern="^(asc|desc)$")):
        records, more = await off_loop(service.store.page, limit, after, order == "desc")
        data = [view(r) for r in records]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @get("/v1/videos/{job_id}")
    async def get_video(job_id: str, wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_SECONDS)):
        record = await service.wait(job_id, wait) if wait > 0 else await off_loop(service.get, job_id)
        return JSONResponse(view(record), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})

    @get("/v1/videos/{job_id}/content")
    async def get_content(job_id: str, variant: str = Query("video")):
        if variant not in ("video", "thumbnail"):
            raise ServiceError(400, f"variant {variant!r}: this server makes 'video' (the mp4) and 'thumbnail' (its "
                                    "first frame)")
        fd, name = await off_loop(service.open_file, job_id, THUMBNAIL if variant == "thumbnail" else None)
        suffix = os.path.splitext(name)[1]  # the checked file itself, served through its descriptor, closed after
        return FileResponse(fd_path(fd, str(service.store.folder(job_id) / name)), stat_result=os.fstat(fd),
                            media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
                            filename=f"{job_id}{suffix}", background=BackgroundTask(os.close, fd))

    @app.post("/v1/videos/{job_id}/remix", status_code=202)
    async def remix_video(job_id: str, request: Request):
        body = await read_video_request(request)
        extra = sorted(body.model_fields_set - {"prompt"})
        if extra:
            raise BodyError(f"remix takes only a prompt (every other value is the remixed job's); drop "
                            f"{', '.join(extra)}, or POST /v1/videos for a new request")
        return view(await off_loop(service.remix, job_id, body.prompt))

    @app.delete("/v1/videos/{job_id}")
    async def delete_video(job_id: str):
        await off_loop(service.delete, job_id)
        return {"id": job_id, "deleted": True, "object": "video.deleted"}

    @app.post("/v1/videos/{job_id}/cancel")
    async def cancel_video(job_id: str):
        record, done_now = await off_loop(service.cancel, job_id)
        return JSONResponse(view(record), status_code=200 if done_now else 202)

    @get("/health")
    async def health():
        s = service
        body = {"status": s.state, "stage": s.stage, "pair": c.pair, "backend": c.engine.backend, "device": c.engine.device,
                "pid": os.getpid(), "owner": s.store.owner}
        if s.reason:
            body["error"] = s.reason
        if s.pipeline is not None and s.pipeline.load_seconds:
            body["load_seconds"] = s.pipeline.load_seconds
        return JSONResponse(body, status_code=200 if s.state == "ready" else 503)

    @get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app
