"""Request bodies as clients send them: JSON (curl, httpx) or multipart/form-data (the OpenAI SDK, always).

The OpenAI SDK's `videos.create` sends every field as a form field (and `input_reference` as a file
part) even without a file. JSON keeps its types, checked strictly by `VideoRequest`; a form field is
text by nature, so each is parsed into its field's type first, with the same one-line refusals.
"""
from __future__ import annotations

import json
import types
import typing

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from flowblend.errors import FlowblendError

from .video_request import VideoRequest

FORM_TYPES = ("multipart/form-data",)  # url-encoded forms are refused (415) by serve/guard.py: a cross-site form
MAX_JSON_DEPTH = 32  # a request is one flat object: deeper nesting is refused before json.loads recurses


class BodyError(FlowblendError):
    """A body that is not a request at all (not JSON, not a form, a file part): 400 with this line."""


def _field_type(name: str) -> type | None:
    """int, float or str for a VideoRequest field (None: an unknown field, left for the model to refuse)."""
    field = VideoRequest.model_fields.get(name)
    if field is None:
        return None
    annotation = field.annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _parse_form_value(name: str, text: str):
    kind = _field_type(name)
    if kind is int:
        try:
            return int(text.strip())
        except ValueError:
            raise BodyError(f"{name} must be a whole number, got {text!r}") from None
    if kind is float:
        try:
            return float(text.strip())
        except ValueError:
            raise BodyError(f"{name} must be a number, got {text!r}") from None
    return text


def _validated(data) -> VideoRequest:
    if not isinstance(data, dict):
        raise BodyError(f"the body must be a JSON object with a prompt, got {type(data).__name__}")
    try:
        return VideoRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, brackets inside strings not counted; linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


async def read_video_request(request: Request) -> VideoRequest:
    """The body of a POST as a VideoRequest; BodyError or RequestValidationError (a one-line 400) if it is not."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES:
        form = await request.form(max_files=1, max_fields=64)
        data = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile) or name == "input_reference":
                raise BodyError(f"{name}: this server generates from text only (no reference image or video); "
                                "drop input_reference")
            if name in data:
                raise BodyError(f"field {name!r} is given twice")
            data[name] = _parse_form_value(name, value)
        return _validated(data)
    raw = await request.body()
    if _depth(raw) > MAX_JSON_DEPTH:
        raise BodyError(f"the body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels: a request is one "
                        "JSON object of a prompt and a few values")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BodyError("the body nests too deep to parse: a request is one flat JSON object") from None
    except ValueError as exc:
        raise BodyError(f"the body is not valid JSON ({exc.args[0].split(':')[0] if exc.args else exc}); send JSON "
                        "or multipart/form-data") from None
    return _validated(data)
