"""`esft serve`: an OpenAI-compatible HTTP API over one base model and many woven ESFT adapters.

    GET  /v1/models                    the base model and every loaded adapter, by name
    POST /v1/completions               {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream",
                                        "stream_options", "seed", "n", "logprobs", "ignore_eos"}
    POST /v1/chat/completions          {"model", "messages", ..., "logprobs": bool, "top_logprobs"}
    GET  /health                       200 while the engine runs (never needs a key)
    GET  /metrics                      Prometheus text: queue, running requests, tokens/s, requests per model
    POST   /admin/adapters             {"name", "path"}   (admin token; path must lie under the adapter root)
    DELETE /admin/adapters/{name}      (admin token; "team/sql" as /admin/adapters/team/sql or team%2Fsql)

The ``model`` field picks the adapter (the base model's own name picks no adapter). Chat messages
are formatted as that adapter was trained (the template recorded in its esft_adapter.json); the base
uses its tokenizer's chat template, or the reference template when it has none. Errors use the
OpenAI error body: ``{"error": {"message", "type", "code"}}``; a body over the size limit gets 413, a
full queue 429 with Retry-After, a request past its time 504.

Request bodies are standard JSON with strict types (serving/schema.py): a value of the wrong JSON type,
out of range, NaN or Infinity is refused with 400 naming the field, never converted. Responses never
hold NaN or Infinity either (a log-probability of -inf is OpenAI's -9999.0).

Adapter names (``--adapter NAME=DIR``, the admin ``name``) are 1-64 characters: ASCII letters, digits,
'.', '_' and '-', starting with a letter or digit, optionally two such parts joined by one '/'
("sql", "team/sql-v2"); others are refused (400, or at start-up). The base model's name follows the
same rule.

One request's failure is its own: a request whose row fails while sampling, detokenising or matching
stop strings (e.g. NaN scores) gets a 500 naming the cause (or an error event, when streaming), and
the requests batched with it go on. Adapters with NaN or Inf values are refused at load.

Start-up: every setting is checked (:meth:`ServeConfig.check`, plus a trial bind of host:port) before
the model loads, and an adapter given at start-up that cannot be served stops the server before it
listens (:class:`StartupError`, a ValueError: `esft serve` prints it and exits with status 2).
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

from ..adapter.paths import resolve_adapter_dir
from .engine import SCHEDULERS, Engine, GenParams, Limits, QueueFull, RequestError
from .openai_format import Choices, metrics_text
from .schema import (BadBody, ChatRequest, CompletionRequest, LoadAdapter, check_name, openapi_bodies, parse_body,
                     validate)

log = logging.getLogger(__name__)
TEMPLATES = ("auto", "reference", "chat")
MAX_BATCH = 4096  # KV-cache slots; more would preallocate far past any sensible batch


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

    def check(self) -> None:
        """Refuse every bad setting before anything loads (ServeConfigError, a ValueError naming the flag).
        Whether host:port can be bound is tried in :func:`serve`, also before the model loads."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ServeConfigError(message)

        def count(value, flag: str, lo: int = 1, hi: int | None = None) -> None:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
            bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            need(ok, f"{flag} must be an integer {bounds}, got {value!r}")

        from ..models.loading import check_device, parse_device_map, resolve_dtype

        need(isinstance(self.host, str) and self.host.strip() != "", f"--host must be an address, got {self.host!r}")
        count(self.port, "--port", 1, 65535)
        count(self.max_batch, "--max-batch", 1, MAX_BATCH)
        count(self.max_body_bytes, "--max-body-bytes")
        count(self.max_adapters, "--max-adapters")
        if self.max_adapter_experts is not None:
            count(self.max_adapter_experts, "--max-adapter-experts")
        need(self.template in TEMPLATES, f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        need(self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, got "
                                           f"{self.scheduler!r}")
        for secret, flag in ((self.api_key, "the API key"), (self.admin_token, "the admin token")):
            need(secret is None or (isinstance(secret, str) and secret != ""), f"{flag} must be a non-empty string")
        try:
            (self.limits or Limits()).check()
            resolve_dtype(self.dtype, "cpu")  # the name only; "auto" is decided when loading
            check_device(self.device)  # e.g. cuda on a machine without a GPU
            parse_device_map(self.device_map)  # a JSON map file must exist and parse
            check_name(self.base_name, "--base-name")
        except ServeConfigError:
            raise
        except ValueError as e:
            raise ServeConfigError(str(e)) from None
        need(Path(self.adapter_root).is_dir(), f"--adapter-root {self.adapter_root!r} is not a directory")
        for name, path in (self.adapters or {}).items():
            try:
                check_name(name)
                if name == self.base_name:
                    raise ValueError(f"that is the base model's name (--base-name {self.base_name})")
                resolve_under(self.adapter_root, path)
            except ValueError as e:
                raise ServeConfigError(f"--adapter {name}={path}: {e}") from None


class ServeConfigError(ValueError):
    """A setting of `esft serve` that cannot work (found before the model loads)."""


class StartupError(ValueError):
    """An adapter given at start-up cannot be served: the server stops before it listens."""


class BodyTooLarge(ValueError):
    pass


def resolve_under(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative to ``root`` or absolute) if it lies inside ``root`` and no link inside it leads out
    of ``root`` (see esft.adapter.paths); else AdapterPathError."""
    return resolve_adapter_dir(path, root)


def build_app(engine: Engine, cfg: ServeConfig):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="esft serve", version="1")
    weaver = engine.weaver

    def openapi():  # FastAPI's schema, plus the request bodies the handlers read themselves
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = openapi_bodies(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                                max_tokens=engine.limits.max_tokens)
        return app.openapi_schema

    app.openapi = openapi

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

    async def body_of(request: Request, model):
        """The body, read and counted as it arrives (a body without Content-Length too), as a ``model``."""
        raw, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise BodyTooLarge(f"the request body is over {cfg.max_body_bytes} bytes, this server's limit "
                                   "(esft serve --max-body-bytes)")
            raw.append(chunk)
        return validate(model, parse_body(b"".join(raw)))

    def params_of(req, chat: bool) -> tuple[GenParams, int]:
        """Engine parameters of a validated request (types and ranges are checked already)."""
        stop = req.stop if req.stop is not None else []
        stop = [stop] if isinstance(stop, str) else list(stop)
        limit = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
        if chat:  # chat: logprobs true/false and top_logprobs 0..20; completions: logprobs 0..5 or null
            if req.top_logprobs is not None and not req.logprobs:
                raise RequestError("top_logprobs needs logprobs: true")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        default = min(engine.limits.default_max_tokens, engine.limits.max_tokens)
        p = GenParams(max_tokens=limit if limit is not None else default,
                      temperature=req.temperature if req.temperature is not None else 1.0,
                      top_p=req.top_p if req.top_p is not None else 1.0, stop=stop, seed=req.seed,
                      ignore_eos=bool(req.ignore_eos), logprobs=logprobs)
        p.check()
        return p, req.n if req.n is not None else 1

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
            body = await body_of(request, ChatRequest if chat else CompletionRequest)
            model = body.model
            try:
                adapter = adapter_of(model)
            except LookupError as e:
                return error(404, str(e), code="model_not_found")
            params, n = params_of(body, chat)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            if chat:
                ids = engine.encode_chat([m.model_dump() for m in body.messages], adapter)
            else:
                ids = engine.encode_completion(body.prompt if isinstance(body.prompt, str) else body.prompt[0])
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def listener_for(i):  # the engine thread hands each event to this request's queue on the event loop
                return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))

            reqs = submit_all(adapter, ids, params, n, listener_for)
        except BodyTooLarge as e:
            return error(413, str(e), code="request_too_large")
        except (BadBody, RequestError) as e:
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

        if body.stream:
            def data(obj) -> str:  # allow_nan=False: a NaN would be invalid JSON (refused, never sent)
                return f"data: {json.dumps(obj, allow_nan=False)}\n\n"

            async def sse():
                try:
                    for chunk in out.start():
                        yield data(chunk)
                    while not out.finished():
                        i, ev = await events.get()
                        if ev[0] == "error":
                            yield data({"error": {"message": ev[1], "type": "server_error", "code": str(ev[2])}})
                            break
                        chunk = out.add(i, ev, stream=True)
                        if chunk is not None:
                            yield data(chunk)
                    if out.finished() and include_usage:
                        yield data(out.usage_chunk())
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
            body = await body_of(request, LoadAdapter)
            name = body.name
            if name == cfg.base_name:
                raise RequestError(f"{name!r} is the base model's name")
            full = resolve_under(cfg.adapter_root, body.path)
            await asyncio.get_running_loop().run_in_executor(None, _load, engine, name, full, cfg.template)
        except BodyTooLarge as e:
            return error(413, str(e), code="request_too_large")
        except BadBody as e:
            return error(400, str(e))
        except (ValueError, OSError) as e:  # bad request, path outside the root, damaged or foreign adapter
            return error(400, f"adapter {name!r} refused: {e}")
        return {"loaded": name, "models": names()}

    # ':path': a name may hold one '/' ("team/sql"); the router matches the decoded path, so team%2Fsql works too
    @app.delete("/admin/adapters/{name:path}")
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

    from ..adapter.esft_lora import is_lora_adapter, materialize, read_lora_adapter

    if is_lora_adapter(path):  # ESFT-LoRA: served as its merged expert rows (base checked), like an ESFT adapter
        adapter = materialize(read_lora_adapter(path), engine.weaver.model, engine.weaver.fingerprint)
    else:
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
    """Check the settings, load the base model, weave the start-up adapters and start the engine. An adapter
    that cannot be served raises StartupError (nothing is served with a part of the adapters asked for)."""
    from ..embedded import embedded_model_dir
    from ..models.loading import load_model
    from .weave import Weaver

    cfg.check()

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
    try:
        for name, path in (cfg.adapters or {}).items():
            try:
                _load(engine, name, resolve_under(cfg.adapter_root, path), cfg.template)
            except (ValueError, OSError) as e:
                raise StartupError(f"--adapter {name}={path} cannot be served: {e}") from None
            log.info("loaded adapter %s from %s (template %s)", name, path, engine.formats[name].name)
    except BaseException:
        engine.close()
        raise
    return engine


def check_bindable(host: str, port: int) -> None:
    """Bind host:port once and let go, as uvicorn will bind it (SO_REUSEADDR): a port in use, a privileged
    port or an address not of this machine is then a one-line error before minutes of model loading."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError, ValueError) as e:  # unknown name, bad IDNA, NUL in the name
        raise ServeConfigError(f"--host {host!r} is not an address this machine can listen on ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ServeConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    cfg.check()  # all before the model loads: a typo costs a second, not a model load
    check_bindable(cfg.host, cfg.port)
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
