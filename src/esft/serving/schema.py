"""What `esft serve` accepts in request bodies: strict JSON types and ranges, checked before anything runs.

A value of the wrong JSON type is refused (400, naming the field), never converted: ``"stream": "false"``,
``"max_tokens": "5"``, ``5.5`` or ``true`` are errors, not a stream or 5 tokens. The only widening is an
integer where a number is expected (``"temperature": 1``), as JSON has one number type. Bodies are parsed
by :func:`parse_body`, which also refuses what Python's json accepts beyond JSON (NaN, Infinity, numbers
that overflow to inf) and strings holding lone surrogate escapes (no tokenizer can encode them). Fields
that no model here declares are ignored, as OpenAI-compatible servers commonly do (clients send their
own extras, e.g. ``user``).

The same models give the OpenAPI schema of ``/openapi.json`` (:func:`openapi_bodies`), which the fuzz test
(tests/test_serve_fuzz.py) generates requests from.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, MIN_TOP_P  # the engine's own bounds

MAX_N = 8  # choices per request: each is its own row in the batch
MAX_STOP = 4

# Adapter (and base) model names: what a client puts in "model", an admin in the DELETE URL, /metrics in a
# label. One or two parts joined by '/' (as Hugging Face names are written: "team/sql"); each part starts
# with an ASCII letter or digit and goes on with letters, digits, '.', '_' or '-'; 64 characters at most.
# So no spaces, control characters, '%', '..' parts or empty parts that URLs, logs and labels would mangle.
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
NAME_PATTERN = f"^{NAME_RE}$"  # the same, anchored, for the OpenAPI schema
MAX_NAME = 64
NAME_RULE = ("1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit, optionally "
             "two such parts joined by one '/' (e.g. sql, team/sql-v2)")


class BadBody(ValueError):
    """A body that is not what the endpoint accepts (the server answers 400 with this message)."""


def check_name(name, what: str = "adapter name") -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not re.fullmatch(NAME_RE, name):
        raise BadBody(f"{what} {name!r} is not allowed: use {NAME_RULE}")
    return name


class _Strict(BaseModel):
    # strict: no str -> bool/number, float -> int or bool -> int conversion; NaN/inf refused for floats
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


NonEmpty = Annotated[str, Field(min_length=1)]
Stop = Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=MAX_STOP)], None]


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Generation(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(ge=MIN_TOP_P, le=1)] | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: Annotated[int, Field(ge=0, lt=MAX_SEED)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    ignore_eos: bool | None = None  # vLLM's extra field: generate exactly max_tokens


class CompletionRequest(_Generation):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]  # one prompt (a list of one too)
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]


class ChatRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class LoadAdapter(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME)]
    path: Annotated[str, Field(min_length=1)]


_FIELDS = {n for m in (StreamOptions, CompletionRequest, TextPart, Message, ChatRequest, LoadAdapter)
           for n in m.model_fields}


def _reject_constant(name: str):
    raise BadBody(f"the body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # e.g. 1e400: valid JSON, but no finite float
        raise BadBody(f"the body is not valid JSON here: the number {text[:40]} is out of range")
    return x


def parse_body(raw: bytes) -> dict:
    """A JSON object from ``raw`` as standard JSON (RFC 8259) reads it, else BadBody."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
        # strings must be real Unicode: "\ud800" parses, but encoding it (as a tokenizer must) fails
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except BadBody:
        raise
    except UnicodeEncodeError:
        raise BadBody("the body holds a string with a lone surrogate escape (e.g. \\ud800), which is no "
                      "character") from None
    except RecursionError:
        raise BadBody("the body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of more digits than Python reads
        raise BadBody(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadBody("the body must be a JSON object")
    return body


def validate(model: type[_Strict], body: dict) -> _Strict:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise BadBody(describe(e)) from None


def describe(e: ValidationError) -> str:
    """'field: what is wrong (got value)' for the first few fields; a union's alternatives share one line."""
    lines: dict[str, list[str]] = {}
    got = {}
    for err in e.errors():
        path = []
        for part in err["loc"]:  # stop at a union member's tag ('str', 'list[str]', ...): not a field
            if not (isinstance(part, int) or part in _FIELDS):
                break
            path.append(str(part))
        where = ".".join(path) or "body"
        msgs = lines.setdefault(where, [])
        msg = _message(err)
        if msg not in msgs:
            msgs.append(msg)
        got.setdefault(where, err.get("input"))
    parts = []
    for where, msgs in list(lines.items())[:3]:
        value = "" if msgs == ["missing (required)"] else f" (got {_short(got[where])})"
        parts.append(f"{where}: {', or '.join(msgs)}{value}")
    return "invalid request: " + "; ".join(parts)


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}
_NOTES = {("top_p", "ge"): " (top_p is applied in float32, where smaller values vanish)"}


def _message(err: dict) -> str:
    field = next((p for p in reversed(err["loc"]) if p in _FIELDS), "")
    if err["type"] == "missing":
        return "missing (required)"
    if field == "name" and err["type"] in ("string_pattern_mismatch", "string_too_long"):
        return f"must be {NAME_RULE}"
    if err["type"] in _BOUNDS:  # pydantic writes bounds as long decimals (0.0000...0117549...): use repr
        key, op = _BOUNDS[err["type"]]
        return f"must be {op} {err['ctx'][key]!r}{_NOTES.get((field, key), '')}"
    return err["msg"]


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


BODIES = {("/v1/completions", "post"): CompletionRequest, ("/v1/chat/completions", "post"): ChatRequest,
          ("/admin/adapters", "post"): LoadAdapter}


def openapi_bodies(schema: dict, max_tokens: int | None = None) -> dict:
    """Add the request bodies (read by hand, not by FastAPI, to count their size as they arrive) to the
    OpenAPI ``schema`` FastAPI made: the models' JSON Schemas as components, referenced by each operation.
    ``max_tokens``: this server's cap (--max-tokens-cap), the most max_tokens may ask for."""
    from pydantic.json_schema import models_json_schema

    refs, defs = models_json_schema([(m, "validation") for m in BODIES.values()],
                                    ref_template="#/components/schemas/{model}")
    defs = defs.get("$defs", {})
    for model in (CompletionRequest, ChatRequest):
        for field in ("max_tokens", "max_completion_tokens"):
            prop = defs[model.__name__]["properties"].get(field)
            if prop is not None and max_tokens is not None:
                next(alt for alt in prop["anyOf"] if alt.get("type") == "integer")["maximum"] = max_tokens
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
    for (path, method), m in BODIES.items():
        schema["paths"][path][method]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": refs[(m, "validation")]}}}
    return schema
