"""`esft serve`: an OpenAI-compatible HTTP API over one base model and many woven ESFT adapters.

    GET  /v1/models                    the base model and every loaded adapter, by name
    POST /v1/completions               {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "seed"}
    POST /v1/chat/completions          {"model", "messages", ...}
    POST   /admin/adapters             {"name", "path"}   (admin token; path must lie under the adapter root)
    DELETE /admin/adapters/{name}      (admin token)

The ``model`` field picks the adapter (the base model's own name picks no adapter). Chat messages
are formatted as that adapter was trained (the template recorded in its esft_adapter.json); the base
uses its tokenizer's chat template, or the reference template when it has none. Errors use the
OpenAI error body: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handlers' (string) annotations here

from .engine import Engine, GenParams, RequestError

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model: str = ""  # base checkpoint ('' = the shipped model)
    base_name: str = "base"  # the base model's name in /v1/models
    adapters: dict | None = None  # name -> directory, loaded at start-up
    adapter_root: str = "."  # adapters load only from directories under this one
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # if set, every /v1 call needs "Authorization: Bearer <key>"
    admin_token: str | None = None  # the admin endpoints refuse every call when unset
    max_batch: int = 16
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | dict | None = None  # spread the base over devices: auto, cpu, cuda:0, a JSON file {module: device}
    template: str = "auto"  # chat format: auto = each adapter's recorded one; reference/chat = that, or refuse the adapter


class AdapterPathError(ValueError):
    pass


def resolve_under(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative to ``root`` or absolute) if it lies inside ``root`` after resolving links; else refuse."""
    root_r = Path(root).resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root_r / p).resolve()
    if full != root_r and root_r not in full.parents:
        raise AdapterPathError(f"adapter path {str(path)!r} is outside the adapter root {str(root_r)!r}")
    if not full.is_dir():
        raise AdapterPathError(f"adapter path {str(path)!r} is not a directory")
    return full


def build_app(engine: Engine, cfg: ServeConfig):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="esft serve", version="1")
    weaver = engine.weaver

    def error(status: int, message: str, typ: str = "invalid_request_error", code: str | None = None):
        return JSONResponse({"error": {"message": message, "type": typ, "code": code}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc):
        return error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc):
        return error(exc.status_code, str(exc.detail), code=str(exc.status_code))

    def authorized(request: Request, secret: str | None) -> bool:
        got = request.headers.get("authorization", "")
        return secret is not None and hmac.compare_digest(got.encode(), f"Bearer {secret}".encode())

    @app.middleware("http")
    async def _api_key(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1") and not authorized(request, cfg.api_key):
            return error(401, "missing or wrong API key", "authentication_error", "invalid_api_key")
        return await call_next(request)

    def names() -> list[str]:
        return [cfg.base_name] + weaver.names()

    def adapter_of(model: str):
        if model == cfg.base_name:
            return None
        if model not in weaver.names():
            raise LookupError(f"model {model!r} does not exist; available: {', '.join(names())}")
        return model

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "esft",
                                            "parent": None if n == cfg.base_name else cfg.base_name}
                                           for n in names()]}

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def params_of(body: dict) -> GenParams:
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        try:
            p = GenParams(max_tokens=int(limit) if limit is not None else 64,
                          temperature=float(body["temperature"]) if body.get("temperature") is not None else 1.0,
                          top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
                          stop=[str(s) for s in stop], seed=body.get("seed"))
        except (TypeError, ValueError, OverflowError) as e:
            raise RequestError(f"bad parameter value ({e})") from None
        p.check()
        return p

    async def handle(request: Request, chat: bool):
        try:
            body = await body_of(request)
            model = body.get("model")
            if not isinstance(model, str):
                raise RequestError("'model' (a string) is required")
            try:
                adapter = adapter_of(model)
            except LookupError as e:
                return error(404, str(e), code="model_not_found")
            params = params_of(body)
            if chat:
                msgs = body.get("messages")
                if not isinstance(msgs, list):
                    raise RequestError("'messages' (a list) is required")
                ids = engine.encode_chat(msgs, adapter)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise RequestError("'prompt' must be one string")
                ids = engine.encode_completion(prompt)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            # the engine thread hands each event to this request's own queue on the event loop
            req = engine.submit(adapter, ids, params, listener=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except RequestError as e:
            return error(400, str(e))
        except KeyError as e:  # adapter unloaded between lookup and submit
            return error(404, str(e.args[0]), code="model_not_found")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        async def next_event():
            return await events.get()

        def choice(text: str | None, finish: str | None, stream: bool):
            if chat:
                key = "delta" if stream else "message"
                msg = {} if text is None else ({"role": "assistant", "content": text} if not stream else {"content": text})
                return {"index": 0, key: msg, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if body.get("stream"):
            async def sse():
                try:
                    if chat:
                        first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                    while True:
                        ev = await next_event()
                        if ev[0] == "error":
                            yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                            break
                        done = ev[0] == "done"
                        chunk = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                                 "model": model, "choices": [choice(None if done and chat else ("" if done else ev[1]),
                                                                    ev[1] if done else None, True)]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        if done:
                            break
                    yield "data: [DONE]\n\n"
                finally:  # the stream ended or the client went away: stop generating for it
                    req.cancelled = True

            return StreamingResponse(sse(), media_type="text/event-stream")

        parts = []
        while True:
            try:
                ev = await next_event()
            except asyncio.CancelledError:
                req.cancelled = True
                raise
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "error":
                return error(500, ev[1], "server_error")
            else:
                finish, n = ev[1], ev[2]
                break
        return {"id": rid, "object": obj, "created": created, "model": model,
                "choices": [choice("".join(parts), finish, False)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/admin/adapters")
    async def load_adapter(request: Request):
        if not authorized(request, cfg.admin_token):
            return error(401, "the admin endpoints need 'Authorization: Bearer <admin token>'", "authentication_error")
        name = None
        try:
            body = await body_of(request)
            name, path = body.get("name"), body.get("path")
            if not isinstance(name, str) or not name or name == cfg.base_name or not isinstance(path, str):
                raise RequestError(f"give a 'name' (not {cfg.base_name!r}) and a 'path'")
            full = resolve_under(cfg.adapter_root, path)
            await asyncio.get_running_loop().run_in_executor(None, _load, engine, name, full, cfg.template)
        except (ValueError, OSError) as e:  # bad request, path outside the root, damaged or foreign adapter
            return error(400, f"adapter {name!r} refused: {e}")
        return {"loaded": name, "models": names()}

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        if not authorized(request, cfg.admin_token):
            return error(401, "the admin endpoints need 'Authorization: Bearer <admin token>'", "authentication_error")
        def unload():
            with engine.lock:  # waits for the running batch, off the event loop
                weaver.unload(name)
                engine.formats.pop(name, None)

        try:
            await asyncio.get_running_loop().run_in_executor(None, unload)
        except KeyError as e:
            return error(404, str(e.args[0]), code="model_not_found")
        return {"unloaded": name, "models": names()}

    return app


def _load(engine: Engine, name: str, path: Path, template: str = "auto") -> None:
    """Read and check the adapter (and its chat format) outside the lock; swap it in between batches."""
    from ..adapter.io import read_adapter
    from ..eval.generate import choose_format, recorded_format

    adapter = read_adapter(path)
    fmt = choose_format(template, recorded_format(adapter.meta), f"adapter {name} ({path})")
    if fmt.name == "chat":
        fmt.template_for(engine.tok)  # refuse now, not at its first request, if there is no chat template
    with engine.lock:
        if name in engine.weaver.names():
            raise ValueError(f"an adapter named {name!r} is already loaded")
        # the format is in place before the name becomes routable (weaver.load), and gone if the load fails
        engine.formats[name] = fmt
        try:
            engine.weaver.load(name, adapter)
        except BaseException:
            engine.formats.pop(name, None)
            raise


def base_format(template: str, tokenizer):
    """The base model's chat format: auto = its tokenizer's chat template, or the reference template when
    it has none (as esft serve always did); an explicit choice must be usable."""
    from ..eval.generate import PromptFormat

    if template == "auto":
        return None  # the engine's default
    fmt = PromptFormat(template)
    if fmt.name == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--template chat, but the base model's tokenizer has no chat template")
    return fmt


def start_engine(cfg: ServeConfig) -> Engine:
    """Load the base model, weave the start-up adapters (a bad one is logged and skipped), start the engine."""
    from ..embedded import embedded_model_dir
    from ..models.loading import load_model
    from .weave import Weaver

    model, tok = load_model(cfg.model or embedded_model_dir(), dtype=cfg.dtype, device=cfg.device,
                            device_map=cfg.device_map)
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:  # weaving builds each layer's experts from the base's own tensors: they must be in memory
        raise ValueError(f"esft serve needs every weight on a device, but the device map leaves {len(offloaded)} "
                         f"tensors on disk (e.g. {offloaded[0]}); map every module to a GPU or cpu")
    engine = Engine(model, tok, Weaver(model.eval()), max_batch=cfg.max_batch,
                    base_format=base_format(cfg.template, tok))
    for name, path in (cfg.adapters or {}).items():
        if name == cfg.base_name:
            log.error("adapter %s refused: that is the base model's name", name)
            continue
        try:
            _load(engine, name, resolve_under(cfg.adapter_root, path), cfg.template)
            log.info("loaded adapter %s from %s (template %s)", name, path, engine.formats[name].name)
        except (ValueError, OSError) as e:
            log.error("adapter %s (%s) refused: %s", name, path, e)
    return engine


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    engine = start_engine(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines%s", cfg.host,
                    "" if cfg.api_key else " WITHOUT an API key")
    try:
        uvicorn.run(build_app(engine, cfg), host=cfg.host, port=cfg.port, log_level="info")
    finally:
        engine.close()


class BackgroundServer:
    """Run an app with uvicorn in a thread (tests, benchmarks): ``with BackgroundServer(app) as s: s.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.host = host
        self.thread = None
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
        import threading

        self.thread = threading.Thread(target=self.server.run, name="esft-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
