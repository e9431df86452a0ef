"""A job as OpenAI's video object: what `GET /v1/videos/{id}` answers, valid for the OpenAI SDK's `Video` model.

The SDK's fields, with flowblend's mapping where the semantics differ:
  status    queued | in_progress | completed | failed; a cancelled job is `failed` with error code `cancelled`
            (the SDK has no such status; `job_status` keeps flowblend's own, `cancelled` included)
  error     {code, message}: code `cancelled`, `server_stopped` (retryable: submit again), `results_write_failed`
            (retryable: the results directory could not be written, a full or read-only disk) or `generation_failed`
  model     the pair's name (the server's one model); `step_model` is the model of the step that ran last
  seconds   (frames - 1) / FPS as a string (serve/video_request.py: frames = seconds x FPS + 1)
  size      "WIDTHxHEIGHT" as made (the SDK's type lists Sora's four sizes; it does not check responses)
  progress  whole percent of steps done; created_at / completed_at whole Unix seconds
flowblend's progress and timings follow as extra fields (the SDK keeps unknown fields).
"""
from __future__ import annotations

from .jobs import CANCELLED, COMPLETED, FAILED, FINAL, JobRecord
from .video_request import seconds_of


def error_object(record: JobRecord) -> dict | None:
    if record.status == CANCELLED:
        return {"code": "cancelled", "message": record.error or "cancelled"}
    if record.status == FAILED:
        return {"code": record.error_code or ("server_stopped" if record.retryable else "generation_failed"),
                "message": record.error or "failed"}
    return None


def video_object(record: JobRecord, pair: str, cancel_requested: bool = False) -> dict:
    """The record in the OpenAI SDK's `Video` shape, flowblend's fields after it."""
    request = record.request
    width, height, frames = request.get("width"), request.get("height"), request.get("frames")
    return {
        "id": record.id, "object": "video",
        "status": FAILED if record.status == CANCELLED else record.status,
        "created_at": int(record.created_at),
        "completed_at": int(record.finished_at) if record.finished_at is not None and record.status in FINAL else None,
        "expires_at": None,
        "error": error_object(record),
        "model": record.pair or pair,
        "progress": 100 if record.status == COMPLETED else (100 * record.step // record.steps if record.steps else 0),
        "prompt": request.get("prompt"),
        "remixed_from_video_id": record.remixed_from,
        "seconds": seconds_of(frames) if isinstance(frames, int) else "0",
        "size": f"{width}x{height}",
        # flowblend's own
        "job_status": record.status, "step": record.step, "steps": record.steps, "models": record.models,
        "step_model": record.model, "started_at": record.started_at, "finished_at": record.finished_at,
        "timings": record.timings, "retryable": record.retryable, "owner": record.owner,
        "request": request, "video": record.video, "thumbnail": record.thumbnail,
        "cancel_requested": cancel_requested and record.status not in FINAL,
    }
