"""The HTTP API (FastAPI) over a VideoService: the same app runs under uvicorn and as a Ray Serve ingress.

OpenAI-style video endpoints (what SGLang Diffusion and TensorRT-LLM's server expose):
  POST   /v1/videos                  -> 202 {id, status: queued, ...}; 400 one-line error; 429 queue full
  GET    /v1/videos                  -> {data: [...]} newest first
  GET    /v1/videos/{id}?wait=S      -> status, step i of n, model, timings; `wait` long-polls up to S s
  GET    /v1/videos/{id}/content     -> the video file once completed (409 before)
  DELETE /v1/videos/{id}             -> cancel (200 dropped from the queue, 202 stops at the next step)
  GET    /health                     -> 200 ready, 503 loading / failed / draining
  GET    /metrics                    -> Prometheus text
Errors are `{"error": {"message": "<one line>", "type": "..."}}`, as OpenAI's API spells them.
"""
from __future__ import annotations

import os

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import CONTENT_TYPE
from .service import ServiceError, VideoService
from .video_request import VideoRequest, error_line

MAX_WAIT_SECONDS = 60.0
MEDIA_TYPES = {".mp4": "video/mp4", ".gif": "image/gif"}
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 429: "rate_limit_error",
               503: "server_unavailable_error"}


def error_response(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error")}},
                        status_code=status, headers=headers)


def _view(service: VideoService, record) -> dict:
    out = record.public()
    out["cancel_requested"] = record.status not in ("completed", "failed", "cancelled") and \
        service.cancel_requested(record.id)
    return out


def create_app(service: VideoService) -> FastAPI:
    """The API over `service` (started by the caller; the app never loads or stops anything itself)."""
    app = FastAPI(title="flowblend", summary="Blended two-model video generation over warm engines")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        service.metrics.rejected.labels("invalid").inc()
        return error_response(400, error_line(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path} (the API is "
                                               "/v1/videos, /health and /metrics)")

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError):
        return error_response(exc.status, str(exc), exc.retry_after)

    @app.post("/v1/videos", status_code=202)
    async def create_video(body: VideoRequest):
        return _view(service, service.submit(body))

    @app.get("/v1/videos")
    async def list_videos(limit: int = Query(100, ge=1, le=1000)):
        return {"object": "list", "data": [_view(service, r) for r in service.store.list(limit)]}

    @app.get("/v1/videos/{job_id}")
    async def get_video(job_id: str, wait: float = Query(0.0, ge=0.0, le=MAX_WAIT_SECONDS)):
        record = await service.wait(job_id, wait) if wait > 0 else service.get(job_id)
        return _view(service, record)

    @app.get("/v1/videos/{job_id}/content")
    async def get_content(job_id: str):
        path = service.video_path(job_id)
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=f"{job_id}{path.suffix}")

    @app.delete("/v1/videos/{job_id}")
    async def cancel_video(job_id: str):
        record, done_now = service.cancel(job_id)
        return JSONResponse(_view(service, record), status_code=200 if done_now else 202)

    @app.get("/health")
    async def health():
        s = service
        body = {"status": s.state, "stage": s.stage, "pair": s.config.pair, "backend": s.config.backend,
                "device": s.config.device, "pid": os.getpid(), "owner": s.store.owner}
        if s.error:
            body["error"] = s.error
        if s.pipeline is not None and s.pipeline.load_seconds:
            body["load_seconds"] = s.pipeline.load_seconds
        return JSONResponse(body, status_code=200 if s.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app
