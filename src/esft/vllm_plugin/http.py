"""The OpenAI server's side of the plugin: an ASGI middleware (vLLM's ``--middleware`` option).

- ``/v1/completions`` and ``/v1/chat/completions``: ``"model": NAME`` of a loaded adapter (as for LoRA), or
  ``"vllm_xargs": {"esft_adapter": NAME}`` with the base's name, picks the adapter; the request goes on to
  vLLM with the base's name and the adapter's key in ``vllm_xargs`` (its KV cache salt follows from the
  key, runner.py). An unknown adapter name: 404 in vLLM's error format, naming the served models.
- ``GET /v1/models``: vLLM's list plus the adapters.
- ``POST /v1/esft/adapters {"name", "path"}``, ``DELETE /v1/esft/adapters/NAME``, ``GET /v1/esft/adapters``,
  and vLLM's own ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` / ``/v1/unload_lora_adapter``
  for ESFT adapter directories: load and unload while serving, with ``Authorization: Bearer
  $ESFT_ADMIN_TOKEN`` (unset: these routes answer 403).

A model name that is neither the base's nor a loaded adapter's gets the 404 here, naming the base and
every adapter (vLLM's own 404 would name the base only). Answers to a request on an adapter carry the
adapter's name in their ``model`` field (vLLM writes the base's; the middleware rewrites it, in whole
JSON bodies and in each ``data:`` event of a stream).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from pathlib import Path

from .config import EXTRA_ARG

GENERATE = ("/v1/completions", "/v1/chat/completions")
ADMIN = "/v1/esft/adapters"


def error_body(message: str, status: int, typ: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": typ, "param": param, "code": status}}).encode()


class EsftMiddleware:
    def __init__(self, app):
        self.app = app
        self.names: dict[str, str] | None = None  # routable adapter name -> key
        self.lock = asyncio.Lock()

    # ---- plumbing --------------------------------------------------------------------------------------

    @staticmethod
    async def _body(receive) -> bytes:
        chunks = []
        while True:
            m = await receive()
            chunks.append(m.get("body", b""))
            if not m.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    async def _answer(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _rpc(self, scope, method: str, *args):
        r = (await scope["app"].state.engine_client.collective_rpc(method, args=args))[0]
        return r

    async def _adapters(self, scope) -> dict[str, str]:
        if self.names is None:
            async with self.lock:
                if self.names is None:
                    listing = await self._rpc(scope, "esft_adapters")
                    self.names = {n: a["key"] for n, a in listing["adapters"].items()}
        return self.names

    @staticmethod
    def _served(scope) -> list[str]:
        return [m.name for m in scope["app"].state.openai_serving_models.base_model_paths]

    # ---- dispatch --------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        if path.startswith(ADMIN) or path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return await self._admin(scope, receive, send, path, method)
        if method == "GET" and path == "/v1/models":
            return await self._models(scope, receive, send)
        if method == "POST" and path in GENERATE:
            return await self._generate(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _generate(self, scope, receive, send):
        raw = await self._body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # vLLM answers malformed JSON itself
        if isinstance(body, dict):
            names = await self._adapters(scope)
            served = self._served(scope)
            model = body.get("model")
            xargs = body.get("vllm_xargs")
            picked = xargs.get(EXTRA_ARG) if isinstance(xargs, dict) else None
            if isinstance(model, str) and model and model not in names and model not in served:
                listed = ", ".join(served + sorted(names))
                return await self._answer(send, 404, error_body(
                    f"The model `{model}` does not exist. Valid aliases: {listed}.", 404, "NotFoundError", "model"))
            if isinstance(model, str) and model in names:
                if picked is not None and picked != model:
                    return await self._answer(send, 400, error_body(
                        f"model {model!r} is an adapter, and vllm_xargs.{EXTRA_ARG} names another ({picked!r})",
                        400, "BadRequestError", EXTRA_ARG))
                picked = model
                body["model"] = served[0]
            if picked is not None:
                if not isinstance(picked, str) or picked not in names:
                    listed = ", ".join(served + sorted(names))
                    return await self._answer(send, 404, error_body(
                        f"The model `{picked}` does not exist. Valid aliases: {listed}.", 404, "NotFoundError",
                        "model" if picked == model else EXTRA_ARG))
                body["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}), EXTRA_ARG: names[picked]}
            raw = json.dumps(body).encode()
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        if isinstance(body, dict) and picked is not None:
            send = _renaming(send, picked)
        return await self.app({**scope, "headers": headers}, replay, send)

    async def _models(self, scope, receive, send):
        """vLLM's answer, with one card per adapter appended."""
        start, parts = {}, []

        async def keep(m):
            if m["type"] == "http.response.start":
                start.update(m)
            else:
                parts.append(m.get("body", b""))

        await self.app(scope, receive, keep)
        body = b"".join(parts)
        if start.get("status") == 200:
            d = json.loads(body)
            base = d["data"][0] if d.get("data") else {}
            for name in sorted(await self._adapters(scope)):
                d["data"].append({**base, "id": name, "root": name, "parent": base.get("id")})
            body = json.dumps(d).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _admin(self, scope, receive, send, path, method):
        token = os.environ.get("ESFT_ADMIN_TOKEN")
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        if not token:
            return await self._answer(send, 403, error_body(
                "adapter loading is disabled: set ESFT_ADMIN_TOKEN when starting the server", 403, "PermissionError"))
        if not hmac.compare_digest(auth, f"Bearer {token}"):
            return await self._answer(send, 401, error_body("admin routes need Authorization: Bearer "
                                                            "$ESFT_ADMIN_TOKEN", 401, "AuthenticationError"))
        names = await self._adapters(scope)
        raw = await self._body(receive)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return await self._answer(send, 400, error_body("body is not JSON", 400, "BadRequestError"))
        if not isinstance(body, dict):
            return await self._answer(send, 400, error_body("body must be a JSON object", 400, "BadRequestError"))
        if method == "GET" and path == ADMIN:
            return await self._answer(send, 200, json.dumps(await self._rpc(scope, "esft_adapters")).encode())
        if method == "POST" and path in (ADMIN, "/v1/load_lora_adapter"):
            name, where = (body.get("name"), body.get("path")) if path == ADMIN else (body.get("lora_name"),
                                                                                      body.get("lora_path"))
            if path != ADMIN and not (isinstance(where, str) and (Path(where) / "expert_cfg.json").is_file()):
                return await self.app(scope, _replay(raw), send)  # a LoRA adapter: vLLM's own route
            if not (isinstance(name, str) and name and isinstance(where, str) and where):
                return await self._answer(send, 400, error_body("give the adapter's name and path (strings)", 400,
                                                                "BadRequestError"))
            if name in self._served(scope):
                return await self._answer(send, 400, error_body(f"{name!r} is the base model's name", 400,
                                                                "BadRequestError"))
            async with self.lock:
                r = await self._rpc(scope, "esft_load", name, where, None)
                if "error" in r:
                    return await self._answer(send, r.get("status", 400), error_body(r["error"], r.get("status", 400),
                                                                                     "BadRequestError"))
                names[name] = r["key"]
            return await self._answer(send, 200, json.dumps({"loaded": name, "key": r["key"]}).encode())
        if (method == "DELETE" and path.startswith(ADMIN + "/")) or (method == "POST"
                                                                      and path == "/v1/unload_lora_adapter"):
            name = path[len(ADMIN) + 1:] if method == "DELETE" else body.get("lora_name")
            if path == "/v1/unload_lora_adapter" and name not in names:
                return await self.app(scope, _replay(raw), send)
            async with self.lock:
                names.pop(name, None)  # unroutable first; the worker frees it once its requests end
                r = await self._rpc(scope, "esft_unload", name)
            if "error" in r:
                return await self._answer(send, r.get("status", 404), error_body(r["error"], r.get("status", 404),
                                                                                 "NotFoundError"))
            return await self._answer(send, 200, json.dumps({"unloaded": name, "freed_now": r["freed"]}).encode())
        return await self._answer(send, 405, error_body(f"{method} {path} is not an adapter route", 405,
                                                        "MethodNotAllowed"))


def _replay(raw: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return receive


def _rename(obj: bytes, name: str) -> bytes:
    """One JSON document with its top-level ``model`` set to ``name`` (anything else: unchanged)."""
    try:
        d = json.loads(obj)
    except ValueError:
        return obj
    if not isinstance(d, dict) or "model" not in d:
        return obj
    d["model"] = name
    return json.dumps(d).encode()


def _renaming(send, name: str):
    """``send`` for an answer on adapter ``name``: its ``model`` field says ``name`` instead of the base's.

    A 200 JSON answer is held until complete (its length changes); a stream (text/event-stream) is passed
    on as it comes, each complete ``data: {...}`` line rewritten (a line split across sends waits for its
    end); anything else (errors) unchanged."""
    mode, start, parts, rest = None, None, [], b""

    async def renaming_send(m):
        nonlocal mode, start, rest
        if m["type"] == "http.response.start":
            ctype = dict(m.get("headers", [])).get(b"content-type", b"")
            mode = ("stream" if ctype.startswith(b"text/event-stream") else
                    "json" if m.get("status") == 200 and b"json" in ctype else "pass")
            if mode == "json":
                start = m
                return None
            return await send(m)
        if m["type"] != "http.response.body" or mode == "pass":
            return await send(m)
        more = m.get("more_body", False)
        if mode == "stream":
            lines = (rest + m.get("body", b"")).split(b"\n")
            rest = lines.pop() if more else b""
            out = b"\n".join(b"data: " + _rename(l[6:], name) if l.startswith(b"data: {") else l for l in lines)
            return await send({**m, "body": out + b"\n" if more and lines else out})
        parts.append(m.get("body", b""))
        if more:
            return None
        body = _rename(b"".join(parts), name)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        return await send({"type": "http.response.body", "body": body, "more_body": False})

    return renaming_send
