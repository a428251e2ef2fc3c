"""`esft serve`: an OpenAI-compatible HTTP API over one base model and many woven ESFT adapters.

    GET  /v1/models                    the base model and every loaded adapter, by name
    POST /v1/completions               {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream",
                                        "stream_options", "seed", "n", "logprobs", "ignore_eos"}
    POST /v1/chat/completions          {"model", "messages", ..., "logprobs": bool, "top_logprobs"}
    GET  /health                       200 while the engine runs (never needs a key)
    GET  /metrics                      Prometheus text: queue, running requests, tokens/s, requests per model
    POST   /admin/adapters             {"name", "path"}   (admin token; path must lie under the adapter root)
    DELETE /admin/adapters/{name}      (admin token)

The ``model`` field picks the adapter (the base model's own name picks no adapter). Chat messages
are formatted as that adapter was trained (the template recorded in its esft_adapter.json); the base
uses its tokenizer's chat template, or the reference template when it has none. Errors use the
OpenAI error body: ``{"error": {"message", "type", "code"}}``; a body over the size limit gets 413, a
full queue 429 with Retry-After, a request past its time 504.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handlers' (string) annotations here

from .engine import Engine, GenParams, Limits, QueueFull, RequestError
from .openai_format import Choices, metrics_text

log = logging.getLogger(__name__)
MAX_N = 8  # choices per request: each is its own row in the batch


@dataclass
class ServeConfig:
    model: str = ""  # base checkpoint ('' = the shipped model)
    base_name: str = "base"  # the base model's name in /v1/models
    adapters: dict | None = None  # name -> directory, loaded at start-up
    adapter_root: str = "."  # adapters load only from directories under this one
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # if set, every call but /health and /admin needs "Authorization: Bearer <key>"
    admin_token: str | None = None  # the admin endpoints refuse every call when unset
    max_batch: int = 16
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | dict | None = None  # spread the base over devices: auto, cpu, cuda:0, a JSON file {module: device}
    template: str = "auto"  # chat format: auto = each adapter's recorded one; reference/chat = that, or refuse the adapter
    scheduler: str = "continuous"  # or "static": a batch runs to its longest request before the next is admitted
    limits: Limits | None = None  # max_tokens cap, prompt length, queue length, timeout, prefill chunk
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_adapters: int = 64  # adapters loaded at once (rows of each layer's overlay table)
    max_adapter_experts: int | None = None  # preallocated adapter expert slots per MoE layer (None: E // 4, >= 4)


class AdapterPathError(ValueError):
    pass


class BodyTooLarge(ValueError):
    pass


def resolve_under(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative to ``root`` or absolute) if it lies inside ``root`` after resolving links, and no
    link inside it leads out of ``root`` (reading it must not read files elsewhere); else refuse."""
    root_r = Path(root).resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root_r / p).resolve()
    if full != root_r and root_r not in full.parents:
        raise AdapterPathError(f"adapter path {str(path)!r} is outside the adapter root {str(root_r)!r}")
    if not full.is_dir():
        raise AdapterPathError(f"adapter path {str(path)!r} is not a directory")
    for here, dirs, files in os.walk(full):  # links are listed, never followed
        for name in dirs + files:
            entry = Path(here) / name
            if entry.is_symlink():
                target = entry.resolve()
                if target != root_r and root_r not in target.parents:
                    raise AdapterPathError(f"{entry.relative_to(full)} in adapter path {str(path)!r} is a link to "
                                           f"{str(target)!r}, outside the adapter root {str(root_r)!r}")
    return full


def build_app(engine: Engine, cfg: ServeConfig):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="esft serve", version="1")
    weaver = engine.weaver

    def error(status: int, message: str, typ: str = "invalid_request_error", code: str | None = None, headers=None):
        return JSONResponse({"error": {"message": message, "type": typ, "code": code}}, status_code=status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc):
        return error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc):
        return error(exc.status_code, str(exc.detail), code=str(exc.status_code))

    def authorized(request: Request, secret: str | None) -> bool:
        got = request.headers.get("authorization", "")
        return secret is not None and hmac.compare_digest(got.encode(), f"Bearer {secret}".encode())

    def refusal(scope) -> tuple[int, str, str, str] | None:
        """(status, message, type, code) when a request is refused before its handler runs, else None."""
        path, headers = scope["path"], dict(scope["headers"])
        # the key guards the API, its docs (/docs, /openapi.json) and /metrics; /health is for probes, and the
        # admin endpoints have their own token
        if cfg.api_key and path != "/health" and not path.startswith("/admin"):
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, f"Bearer {cfg.api_key}".encode()):
                return 401, "missing or wrong API key", "authentication_error", "invalid_api_key"
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > cfg.max_body_bytes:
            return (413, f"the request body has {int(size)} bytes; this server accepts at most {cfg.max_body_bytes} "
                    "(esft serve --max-body-bytes)", "invalid_request_error", "request_too_large")
        return None

    class Guard:
        """Plain ASGI middleware (not BaseHTTPMiddleware, which hides a client's disconnect from handlers)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            why = refusal(scope) if scope["type"] == "http" else None
            if why is None:
                return await self.inner(scope, receive, send)
            await error(why[0], why[1], why[2], why[3])(scope, receive, send)

    app.add_middleware(Guard)

    def names() -> list[str]:
        return [cfg.base_name] + (weaver.names() if weaver is not None else [])

    def adapter_of(model: str):
        if model == cfg.base_name:
            return None
        if model not in names():
            raise LookupError(f"model {model!r} does not exist; available: {', '.join(names())}")
        return model

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "esft",
                                            "parent": None if n == cfg.base_name else cfg.base_name}
                                           for n in names()]}

    @app.get("/health")
    async def health():
        if not engine.thread.is_alive():
            return error(503, "the generation engine has stopped", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(engine, cfg.base_name), media_type="text/plain; version=0.0.4")

    async def body_of(request: Request) -> dict:
        raw, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a body without Content-Length too
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise BodyTooLarge(f"the request body is over {cfg.max_body_bytes} bytes, this server's limit "
                                   "(esft serve --max-body-bytes)")
            raw.append(chunk)
        try:
            body = json.loads(b"".join(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def params_of(body: dict, chat: bool) -> tuple[GenParams, int]:
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        n = body.get("n", 1) if body.get("n") is not None else 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise RequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {ignore_eos!r}")
        if chat:  # chat: logprobs true/false and top_logprobs 0..20; completions: logprobs 0..5 or null
            want, top = body.get("logprobs") or False, body.get("top_logprobs")
            if not isinstance(want, bool) or (top is not None and (isinstance(top, bool) or not isinstance(top, int))):
                raise RequestError("logprobs must be true or false and top_logprobs an integer")
            if top is not None and not want:
                raise RequestError("top_logprobs needs logprobs: true")
            logprobs = (top or 0) if want else None
        else:
            logprobs = body.get("logprobs")
            if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                         or not 0 <= logprobs <= 5):
                raise RequestError(f"logprobs must be an integer in [0, 5], got {logprobs!r}")
        try:
            default = min(engine.limits.default_max_tokens, engine.limits.max_tokens)
            p = GenParams(max_tokens=int(limit) if limit is not None else default,
                          temperature=float(body["temperature"]) if body.get("temperature") is not None else 1.0,
                          top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
                          stop=[str(s) for s in stop], seed=body.get("seed"), ignore_eos=ignore_eos,
                          logprobs=logprobs)
        except (TypeError, ValueError, OverflowError) as e:
            raise RequestError(f"bad parameter value ({e})") from None
        p.check()
        return p, n

    def submit_all(adapter, ids, params: GenParams, n: int, listener_for) -> list:
        """n rows for one request (seeded ones: seed, seed + 1, ...); all or none are queued."""
        reqs = []
        try:
            for i in range(n):
                p = GenParams(**{**vars(params), "stop": list(params.stop)})
                if p.seed is not None:
                    p.seed = (p.seed + i) % 2**63
                reqs.append(engine.submit(adapter, ids, p, listener=listener_for(i)))
        except BaseException:
            for r in reqs:
                r.cancelled = True
            raise
        return reqs

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
            params, n = params_of(body, chat)
            opts = body.get("stream_options") or {}
            if not isinstance(opts, dict):
                raise RequestError("stream_options must be an object")
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

            def listener_for(i):  # the engine thread hands each event to this request's queue on the event loop
                return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))

            reqs = submit_all(adapter, ids, params, n, listener_for)
        except BodyTooLarge as e:
            return error(413, str(e), code="request_too_large")
        except RequestError as e:
            return error(400, str(e))
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": str(e.retry_after)})
        except KeyError as e:  # adapter unloaded between lookup and submit
            return error(404, str(e.args[0]), code="model_not_found")
        out = Choices(engine.tok, chat, n, params.logprobs, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                      model, len(ids))

        def cancel():
            for r in reqs:
                r.cancelled = True

        if body.get("stream"):
            async def sse():
                try:
                    for chunk in out.start():
                        yield f"data: {json.dumps(chunk)}\n\n"
                    while not out.finished():
                        i, ev = await events.get()
                        if ev[0] == "error":
                            yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                            break
                        chunk = out.add(i, ev, stream=True)
                        if chunk is not None:
                            yield f"data: {json.dumps(chunk)}\n\n"
                    if out.finished() and opts.get("include_usage"):
                        yield f"data: {json.dumps(out.usage_chunk())}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the stream ended or the client went away: stop generating for it
                    cancel()

            return StreamingResponse(sse(), media_type="text/event-stream")

        try:
            checked = loop.time()
            while not out.finished():
                try:
                    i, ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    i = None
                if loop.time() - checked >= 0.5:  # twice a second, events or not
                    checked = loop.time()
                    if await request.is_disconnected():  # nobody will read the answer: free the rows
                        cancel()
                        return error(499, "the client closed the request", code="client_closed")
                if i is None:
                    continue
                if ev[0] == "error":
                    cancel()
                    return error(ev[2], ev[1], "timeout" if ev[2] == 504 else "server_error")
                out.add(i, ev, stream=False)
        except asyncio.CancelledError:
            cancel()
            raise
        return out.response()

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
        except BodyTooLarge as e:
            return error(413, str(e), code="request_too_large")
        except (ValueError, OSError) as e:  # bad request, path outside the root, damaged or foreign adapter
            return error(400, f"adapter {name!r} refused: {e}")
        return {"loaded": name, "models": names()}

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        if not authorized(request, cfg.admin_token):
            return error(401, "the admin endpoints need 'Authorization: Bearer <admin token>'", "authentication_error")
        def unload():
            with engine.exclusive():  # between two engine steps, off the event loop
                weaver.unload(name)
                engine.formats.pop(name, None)

        try:
            await asyncio.get_running_loop().run_in_executor(None, unload)
        except KeyError as e:
            return error(404, str(e.args[0]), code="model_not_found")
        return {"unloaded": name, "models": names()}

    return app


def _load(engine: Engine, name: str, path: Path, template: str = "auto") -> None:
    """Read and check the adapter (and its chat format) outside the lock; swap it in between engine steps."""
    from ..adapter.io import read_adapter
    from ..eval.generate import choose_format, recorded_format

    adapter = read_adapter(path)
    fmt = choose_format(template, recorded_format(adapter.meta), f"adapter {name} ({path})")
    if fmt.name == "chat":
        fmt.template_for(engine.tok)  # refuse now, not at its first request, if there is no chat template
    with engine.exclusive():
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
    if offloaded:  # the overlay runs the base's own expert tensors and writes slots beside them: all in memory
        raise ValueError(f"esft serve needs every weight on a device, but the device map leaves {len(offloaded)} "
                         f"tensors on disk (e.g. {offloaded[0]}); map every module to a GPU or cpu")
    weaver = Weaver(model.eval(), max_adapters=cfg.max_adapters, max_adapter_experts=cfg.max_adapter_experts)
    per_layer = {total for _, total in weaver.slots().values()}
    log.info("adapter slots: %s per MoE layer, %.1f MiB preallocated (--max-adapter-experts), up to %d adapters",
             "/".join(map(str, sorted(per_layer))), weaver.slot_bytes() / 2**20, cfg.max_adapters)
    engine = Engine(model, tok, weaver, max_batch=cfg.max_batch,
                    base_format=base_format(cfg.template, tok), scheduler=cfg.scheduler, limits=cfg.limits)
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
