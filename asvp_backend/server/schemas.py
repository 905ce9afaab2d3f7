"""Request bodies Label Studio sends, parsed and checked before any handler uses them.

We parse bodies ourselves instead of letting FastAPI do it: FastAPI json-parses on the event loop, so a
60 MB /predict stalled /health for seconds. Every id and every string is checked here once, so a bad value
is a 400 or 422 with a message, never a 500 deep inside a handler.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import json
import re
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_ID = 2**31 - 1  # Label Studio's ids are 32-bit integer primary keys
PROJECT_HINT = "project must be a project id such as 3 or '3.1700000000'"
_PROJECT_TEXT = re.compile(r"([0-9]{1,10})(?:\.[0-9]{1,20})?")  # "<id>" or "<id>.<created_at timestamp>"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD]")  # how JSON writes U+D000-U+DFFF, surrogates included
SLICE = 2**20  # characters per C call in the work on whole bodies, so the event loop gets the GIL in between
INLINE_JSON_BYTES = 256 * 1024  # bodies above this are parsed in a worker thread, not on the event loop

Model = TypeVar("Model", bound=BaseModel)


class BadRequest(ValueError):
    """Turned into a 400 with the message; never carries a secret."""


def parse_project_id(value: Any) -> int:
    """Label Studio names a project as "<id>.<created_at timestamp>", webhooks send the project object,
    API users may send the bare id. Anything else (booleans, "²", 5,000 digits) is a 400."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, str):
        match = _PROJECT_TEXT.fullmatch(value)
        if match is None:
            raise BadRequest(PROJECT_HINT)
        value = int(match.group(1))
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(PROJECT_HINT)
    if not 1 <= value <= MAX_ID:
        raise BadRequest(f"project id must be between 1 and {MAX_ID}")
    return value


def check_tasks(tasks: list[Any]) -> list[dict[str, Any]]:
    """Each task needs an id Label Studio could have made (1 to 2^31-1, not a boolean) and a data object."""
    for index, task in enumerate(tasks):
        task_id = task.get("id") if isinstance(task, dict) else None
        valid_id = isinstance(task_id, int) and not isinstance(task_id, bool) and 1 <= task_id <= MAX_ID
        if not valid_id or not isinstance(task.get("data", {}), dict):
            raise BadRequest(f"tasks[{index}] needs an integer id between 1 and {MAX_ID} and a data object")
    return tasks


def invalid_body(where: tuple[str | int, ...], message: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own validation errors."""
    return RequestValidationError([{"loc": ("body", *where), "msg": message, "type": "value_error"}])


async def read_body(request: Request) -> bytearray:
    """The body, gathered chunk by chunk: Starlette's request.body() joins a 60 MB body in one call on the
    event loop."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; a large one is parsed in a worker thread so /health keeps answering."""
    raw = await read_body(request)
    if len(raw) > INLINE_JSON_BYTES:
        return await run_in_threadpool(_parse_large_json, raw)
    return parse_json_object(raw)


def _parse_large_json(raw: bytearray) -> dict[str, Any]:
    with gc_paused():
        return parse_json_object(raw)


def parse_json_object(raw: bytes | bytearray) -> dict[str, Any]:
    """The body as a JSON object. Strict UTF-8 (json.loads would let encoded surrogates through), and no
    lone UTF-16 surrogate in any string: one made /setup fail with a 500 when the state was written.

    Large bodies are parsed in a worker thread, and every step here leaves the GIL to the event loop
    (serving /health) often: decoding and searching go slice by slice, and the object hook is a Python
    function on purpose. One C call over a 60 MB body would stall /health for 50 to 3,000 ms."""
    text = decode_utf8(raw)
    try:
        data = json.loads(text, object_pairs_hook=_object_from_pairs)
    except json.JSONDecodeError as exc:
        raise invalid_body((), f"not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise invalid_body((), "JSON nested too deeply") from None
    except ValueError as exc:  # an integer literal over Python's 4,300-digit limit, which json.loads refuses
        raise BadRequest(f"not acceptable JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise invalid_body((), "must be a JSON object")
    if _has_surrogate_escape(text):  # escapes are the only way left to write a surrogate
        where = find_lone_surrogate(data)
        if where is not None:
            raise invalid_body(where, "contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")
    return data


def decode_utf8(raw: bytes | bytearray) -> str:
    """Strict UTF-8, one slice at a time (see parse_json_object)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    parts = []
    for start in range(0, len(view), SLICE):
        try:
            parts.append(decoder.decode(view[start : start + SLICE], final=start + SLICE >= len(view)))
        except UnicodeDecodeError as exc:
            raise invalid_body((), f"not valid UTF-8 (byte {start + exc.start})") from None
    return "".join(parts)


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


def _has_surrogate_escape(text: str) -> bool:
    return any(_SURROGATE_ESCAPE.search(text, start, start + SLICE + 2) for start in range(0, len(text), SLICE))


def find_lone_surrogate(data: Any) -> tuple[str | int, ...] | None:
    """Where the first string (or key) holding a lone surrogate is, as a path; None when there is none."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return (*where, key[:40].encode("utf-8", "backslashreplace").decode("ascii"))
                stack.append(((*where, key[:40]), item))
        elif isinstance(value, list):
            stack.extend(((*where, index), item) for index, item in enumerate(value))
    return None


def validate_body(model: type[Model], data: dict[str, Any]) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def take_tasks(data: dict[str, Any]) -> list[Any]:
    """Take the task list out of a /predict body before pydantic sees the rest: validating (and so copying)
    every nested task dict is what cost 11.7 s and 3 GB for a 63 MB body."""
    tasks = data.pop("tasks", None)
    if tasks is None:
        raise invalid_body(("tasks",), "Field required")
    if not isinstance(tasks, list):
        raise invalid_body(("tasks",), "Input should be a valid list")
    return tasks


def release_gradually(items: list[Any]) -> None:
    """Free a large parsed list one item at a time: dropping it whole frees a million objects in one C call
    that holds the GIL (and stalls /health) for a quarter of a second."""
    while items:
        items.pop()


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large body is parsed and handled. Parsed JSON has no
    reference cycles, yet its million containers trigger full collections over the growing document, each
    holding the GIL for up to half a second. Nested pauses (concurrent large requests) are counted."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


# `project` is Any in every model: pydantic's lax int would turn `true` into project 1; parse_project_id
# decides instead.


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    project: Any
    label_config: str = Field(alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(default=None, repr=False)
    extra_params: Any = Field(default=None, repr=False)  # see parse_extra_params


def parse_extra_params(value: Any) -> dict[str, Any] | None:
    """The model's "Extra params" as an object. Label Studio's Connect and Edit forms send the box's text as a
    string, "" when empty; its REST API sends an object, or nothing. A text that is not a JSON object is a
    400: the user typed something meant for us that we cannot read."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise BadRequest('extra_params must be a JSON object such as {"key": "value"} (it is not JSON)') from None
    if value is None or isinstance(value, dict):
        return value
    raise BadRequest(f"extra_params must be a JSON object, not {type(value).__name__}")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # `tasks` is taken out before validation (take_tasks) and checked by check_tasks
    project: Any = None
    label_config: str | None = None
    params: dict[str, Any] | None = Field(default=None, repr=False)  # may carry image-host passwords


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    action: str
    project: Any = None


_PREDICT_TASKS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": MAX_ID}, "data": {"type": "object"}},
        "required": ["id"],
    },
}


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its own body (to check limits first), so FastAPI cannot describe
    it: without this, /docs showed no body and the schema-driven fuzzing (tests/unit/test_fuzz_api.py) sent
    none. /predict's `tasks` are taken out before validation (take_tasks), so they are added here."""
    schema = model.model_json_schema(by_alias=True)
    if model is PredictRequest:
        schema["properties"]["tasks"] = _PREDICT_TASKS
        schema["required"] = [*schema.get("required", []), "tasks"]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
