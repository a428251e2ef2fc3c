"""The generation engine behind `esft serve`: one woven model, one worker thread, continuous batching.

Requests wait in a bounded queue. At every engine step the worker

1. ends the rows whose client went away, whose time ran out or whose adapter was unloaded,
2. admits waiting requests into free slots of the KV cache (:class:`~.kvcache.SlotCache`),
3. prefills up to ``prefill_chunk`` prompt tokens of the admitted requests (a long prompt over
   several steps), keeping only the last position's logits,
4. decodes one token for every row whose prompt is in the cache, whatever adapters they name,
5. retires the finished rows: their slots are free for the next step's admissions.

So a request joins the running batch at the next step and leaves when it is done; a short request
arriving while long ones decode waits one step, not for the batch. ``scheduler="static"`` keeps
the earlier behaviour for comparison: a batch is admitted only when the previous one has finished.
Every row has its own sampling settings, random generator, stop strings and length limit, and its
tokens go only to its own request's events. A failure while sampling, detokenising or matching stop
strings for one row (e.g. non-finite scores from a damaged adapter) ends that row's request with an
error event and nothing else: the other rows of the step go on. Only a failure of the shared forward
pass ends every row in it. A retired row's KV-cache slot is zeroed, so nothing a request left there
(NaN keys of a broken adapter included) reaches the next request through a masked position.
"""

from __future__ import annotations

import collections
import itertools
import math
import queue
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..eval.generate import PromptFormat, eos_ids
from ..models.loading import input_device
from .kvcache import SlotCache
from .textstream import TextStream

_entropy = random.SystemRandom()  # unseeded requests: fresh randomness, without touching torch's global RNG
SCHEDULERS = ("continuous", "static")
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs; completions' logprobs go to 5, as OpenAI's
MAX_SEED = 2**63  # seeds are torch.Generator seeds: [0, 2**63)
MAX_TEMPERATURE = 5.0
# top_p is compared in float32: a smaller value rounds to 0 (or a subnormal) there and keeps no token
MIN_TOP_P = float(torch.finfo(torch.float32).tiny)
# OpenAI's log-probability for a token the distribution gives no mass (-inf): JSON has no infinities
LOGPROB_FLOOR = -9999.0


class RequestError(ValueError):
    """Bad request values (the server answers 400 with this message)."""


class RowError(RuntimeError):
    """One row cannot go on (its request ends with this message and HTTP status; the batch goes on)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class QueueFull(RuntimeError):
    """Too many requests wait already (the server answers 429 with ``retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Limits:
    """What one request may ask for and how much may wait; every field is a CLI flag of `esft serve`."""

    max_tokens: int = 4096  # a request asking for more is refused (400 naming this cap)
    default_max_tokens: int = 256  # when a request gives no max_tokens
    max_prompt_tokens: int | None = None  # None: the context - 1
    max_queue: int = 256  # requests waiting for a slot; one more is refused (429, Retry-After)
    timeout_s: float = 600.0  # from submission to the last token; then the request ends with an error
    prefill_chunk: int = 256  # prompt tokens prefilled per engine step: longer prompts take several steps

    def check(self) -> None:
        for name in ("max_tokens", "default_max_tokens", "max_queue", "prefill_chunk"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (an integer), got {getattr(self, name)!r}")
        if self.max_prompt_tokens is not None and (not _is_int(self.max_prompt_tokens) or self.max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be >= 1 (an integer), got {self.max_prompt_tokens!r}")
        if not _is_number(self.timeout_s) or not self.timeout_s > 0:  # NaN fails too
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass
class GenParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks: equal lengths across compared setups)
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely

    def check(self) -> None:
        """The bounds the HTTP schema (serving/schema.py) also checks, for callers of the engine itself. The
        comparisons are written so that NaN fails them."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise RequestError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise RequestError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        # float32's smallest normal: a smaller top_p is 0 (or subnormal) where the sampler compares it
        if not _is_number(self.top_p) or not MIN_TOP_P <= self.top_p <= 1:
            raise RequestError(f"top_p must be in [{MIN_TOP_P!r}, 1], got {self.top_p!r}")
        if (not isinstance(self.stop, list) or len(self.stop) > 4
                or any(not isinstance(s, str) or not s for s in self.stop)):
            raise RequestError("stop must be at most 4 non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return _is_int(x) or isinstance(x, float)


@dataclass
class Request:
    """One generation. Its events are ("text", delta, logprobs) ..., then ("done", finish_reason, n_tokens)
    or ("error", message, http_status); they go to ``listener`` if one is given (the server's event loop),
    else to ``events``. ``logprobs`` lists (token id, log-probability, [(id, logprob) of the top k])."""

    adapter: str | None  # None = the base model
    prompt_ids: list[int]
    params: GenParams
    id: int = 0
    events: queue.Queue = field(default_factory=queue.Queue)
    listener: object = None  # callable(event), called from the engine thread
    cancelled: bool = False  # set when the client went away: the row is freed at the next step
    deadline: float = math.inf  # time.monotonic() after which it ends with a timeout error
    submitted_step: int = 0  # engine steps done when it was submitted / when it ended (fairness checks)
    finished_step: int = -1

    def put(self, event: tuple) -> None:
        try:
            (self.listener or self.events.put)(event)
        except Exception:  # noqa: BLE001 - e.g. the server's event loop is closed: nobody reads this request
            self.cancelled = True  # any more; it must not take the engine thread down with it


@dataclass
class _Row:
    """A request holding a KV-cache slot."""

    req: Request
    slot: int
    gen: torch.Generator
    stream: TextStream
    prefilled: int = 0  # prompt tokens in the cache
    next_token: int | None = None  # sampled, not yet fed to the model
    n_tokens: int = 0
    done: bool = False

    @property
    def pos(self) -> int:  # cache positions filled: the prompt, then every fed token
        return self.prefilled + max(0, self.n_tokens - (self.next_token is not None))


class Engine:
    def __init__(self, model, tokenizer, weaver=None, max_batch: int = 16, max_context: int | None = None,
                 base_format: PromptFormat | None = None, scheduler: str = "continuous",
                 limits: Limits | None = None):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tok, self.weaver = model.eval(), tokenizer, weaver
        self.max_batch, self.scheduler = max_batch, scheduler
        self.limits = limits or Limits()
        self.limits.check()
        self.max_context = max_context or _context(model)
        _use_masked_attention(model)
        self.device = input_device(model)  # where inputs go, also on a model spread over devices (device_map)
        self.eos = set(eos_ids(model, tokenizer))  # tokenizer's EOS + every EOS id of the generation config
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        # chat format of the base (its tokenizer's chat template, else the reference one) and of each adapter
        # (what it was trained with; the server fills this in as it loads adapters)
        self.base_format = base_format or PromptFormat("chat" if getattr(tokenizer, "chat_template", None)
                                                       else "reference")
        self.formats: dict[str, PromptFormat] = {}
        self.cache = SlotCache(max_batch, self.max_context + self.limits.prefill_chunk)
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[_Row] = []
        self._queued = 0  # submitted, not yet admitted (pending + waiting); guarded by _count_lock
        self._count_lock = threading.Lock()
        self.lock = threading.Lock()  # held for each engine step; adapters change only between steps
        self._exclusive = threading.Lock()
        self._want_lock = threading.Event()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self.steps = 0
        self.stats = {"batches": 0, "requests": 0, "tokens": 0, "prompt_tokens": 0, "max_batch_seen": 0,
                      "per_model": collections.Counter(), "finished": collections.Counter()}
        self.recent = collections.deque(maxlen=4096)  # (time, tokens generated in that step): tokens/s
        self._durations = collections.deque(maxlen=64)  # seconds of recent requests: Retry-After
        self.thread = threading.Thread(target=self._loop, name="esft-engine", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------- requests
    def encode_completion(self, prompt: str) -> list[int]:
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + self.tok.encode(prompt, add_special_tokens=False)

    def encode_chat(self, messages: list[dict], adapter: str | None = None) -> list[int]:
        """Chat messages -> prompt ids in the format ``adapter`` (None = the base) was trained with;
        content as a string or a list of text parts."""
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}] must be an object with role system, user or assistant")
            c = m.get("content")
            if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                           and isinstance(p.get("text"), str) for p in c):
                c = "".join(p["text"] for p in c)
            if not isinstance(c, str):
                raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
            clean.append({"role": m["role"], "content": c})
        if not clean or clean[-1]["role"] != "user":
            raise RequestError("the last message must have role 'user'")
        if adapter is None:
            fmt = self.base_format
        elif adapter in self.formats:
            fmt = self.formats[adapter]
        else:  # never guess a format: the server sets it before an adapter is routable, removes it on unload
            raise KeyError(f"no adapter named {adapter!r} (loaded: {', '.join(self.formats) or 'none'})")
        if fmt.name == "reference":
            return fmt.encode_chat(self.tok, clean)
        from jinja2 import TemplateError  # chat templates are rendered with jinja2 anyway

        try:
            return fmt.encode_chat(self.tok, clean)
        except (ValueError, TemplateError) as e:  # e.g. a template that wants alternating roles
            raise RequestError(f"the messages do not fit the chat template: {e}") from None

    def max_prompt_tokens(self) -> int:
        return min(self.limits.max_prompt_tokens or self.max_context - 1, self.max_context - 1)

    def submit(self, adapter: str | None, prompt_ids: list[int], params: GenParams, listener=None) -> Request:
        """Queue a request (RequestError: bad values; KeyError: unknown adapter; QueueFull: no room)."""
        params.check()
        if params.max_tokens > self.limits.max_tokens:
            raise RequestError(f"max_tokens {params.max_tokens} is above this server's cap of "
                               f"{self.limits.max_tokens} tokens (esft serve --max-tokens-cap)")
        if adapter is not None:
            if self.weaver is None:
                raise KeyError(f"no adapter named {adapter!r}: this engine serves a plain model")
            self.weaver.row(adapter)  # KeyError naming the loaded adapters
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        if len(prompt_ids) > self.max_prompt_tokens():
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this server accepts at most "
                               f"{self.max_prompt_tokens()} (esft serve --max-prompt-tokens)")
        # the context bounds the answer too: it ends with finish_reason "length" where the context ends
        params.max_tokens = min(params.max_tokens, self.max_context - len(prompt_ids))
        with self._count_lock:
            if self._queued >= self.limits.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting already (esft serve --max-queue "
                                f"{self.limits.max_queue}); retry later", self.retry_after())
            self._queued += 1
        req = Request(adapter, prompt_ids, params, id=next(self._ids), listener=listener,
                      deadline=time.monotonic() + self.limits.timeout_s, submitted_step=self.steps)
        self.pending.put(req)
        return req

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue's share of recent request durations, 1..60."""
        per_request = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        return int(min(60, max(1, math.ceil(self._queued * per_request / self.max_batch))))

    def queue_length(self) -> int:
        return self._queued

    def running(self) -> int:
        return sum(not row.done for row in tuple(self.rows))

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in tuple(self.recent) if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    @contextmanager
    def exclusive(self):
        """Hold the engine between two steps (loading, unloading adapters); the worker yields to it."""
        with self._exclusive:
            self._want_lock.set()
            with self.lock:
                self._want_lock.clear()
                yield

    def close(self) -> None:
        self._stop.set()
        self.pending.put(None)  # wake the worker
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------- worker
    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self.rows and not self.waiting
            try:
                r = self.pending.get(timeout=None if idle else 0)
                if idle and r is not None:  # a moment for concurrent requests to arrive together
                    time.sleep(0.002)
                while True:
                    if r is not None:
                        self.waiting.append(r)
                    r = self.pending.get_nowait()
            except queue.Empty:
                pass
            while self._want_lock.is_set():  # an admin call waits for the lock: let it in
                time.sleep(0.0005)
            with self.lock:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - the shared forward failed: every row in flight hears
                    for row in self.rows:
                        if not row.done:
                            self._end(row.req, ("error", f"generation failed: {e}", 500))
                        self.cache.clear(row.slot)
                    self.rows = []

    def _end(self, req: Request, event: tuple) -> None:
        req.finished_step = self.steps
        self.stats["finished"][event[1] if event[0] == "done" else "error"] += 1
        self._durations.append(time.monotonic() - (req.deadline - self.limits.timeout_s))
        req.put(event)

    def _unqueue(self, n: int = 1) -> None:
        with self._count_lock:
            self._queued -= n

    @torch.no_grad()
    def _step(self) -> None:
        now = time.monotonic()
        loaded = set(self.weaver.names()) if self.weaver is not None else set()
        for r in list(self.waiting):  # requests that will never run
            why = _gone(r, now, loaded)
            if why:
                self.waiting.remove(r)
                self._unqueue()
                self._end(r, why)
        for row in self.rows:
            why = _gone(row.req, now, loaded)
            if why:
                row.done = True
                self._end(row.req, why)
        self._retire()
        self._admit()
        if not self.rows:
            return
        self.steps += 1
        tokens = self._prefill()
        tokens += self._decode()
        self.recent.append((time.monotonic(), tokens))
        self._retire()

    def _retire(self) -> None:
        """Drop the finished rows; zero their slots (see the module docstring)."""
        for row in self.rows:
            if row.done:
                self.cache.clear(row.slot)
        self.rows = [row for row in self.rows if not row.done]

    def _admit(self) -> None:
        if self.scheduler == "static" and self.rows:
            return  # static batching: the running batch finishes first
        free = sorted(set(range(self.max_batch)) - {row.slot for row in self.rows})
        admitted = 0
        while free and self.waiting:
            req = self.waiting.popleft()
            admitted += 1
            try:  # a request whose settings cannot make a row ends alone
                seed = req.params.seed if req.params.seed is not None else _entropy.randrange(MAX_SEED)
                row = _Row(req, free[0], torch.Generator(device="cpu").manual_seed(seed),
                           TextStream(self.tok, req.params.stop))
            except Exception as e:  # noqa: BLE001
                self._end(req, ("error", f"the request could not start: {e}", 500))
                continue
            self.rows.append(row)
            free.pop(0)
            self.stats["per_model"][req.adapter or ""] += 1
            self.stats["prompt_tokens"] += len(req.prompt_ids)
        if admitted:
            self._unqueue(admitted)
            self.stats["requests"] += admitted
            self.stats["batches"] += self.scheduler == "static"
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.rows))
        self.rows.sort(key=lambda row: row.slot)  # slots 0..B-1 in order: the cache hands out views

    def _forward(self, rows: list[_Row], ids: torch.Tensor, starts: list[int], keep) -> torch.Tensor:
        """One forward of ``ids`` [B, T] (row b's tokens at positions starts[b]...); logits [B, k, V] of the
        positions ``keep`` (an int: the last ones; a tensor: those indices), as float32 on the CPU."""
        self.cache.plan([row.slot for row in rows], starts, ids.shape[1])
        if self.weaver is not None:
            self.weaver.set_rows([row.req.adapter for row in rows])
        pos = torch.tensor(starts)[:, None] + torch.arange(ids.shape[1])
        dtype = next(self.model.parameters()).dtype
        out = self.model(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                         attention_mask=self.cache.mask(dtype if dtype.is_floating_point else torch.float32,
                                                        self.device),
                         past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        return out.logits.float().cpu()

    def _prefill(self) -> int:
        """Feed the next prompt chunk of rows not yet prefilled; sample the first token of those completed."""
        todo = [row for row in self.rows if row.prefilled < len(row.req.prompt_ids)]
        if not todo:
            return 0
        budget = math.inf if self.scheduler == "static" else self.limits.prefill_chunk
        plan = []
        for row in todo:  # first come, first served; the last one may get only part of its prompt
            n = int(min(len(row.req.prompt_ids) - row.prefilled, budget))
            if n < 1:
                break
            plan.append((row, n))
            budget -= n
        width = max(n for _, n in plan)
        ids = torch.full((len(plan), width), self.pad, dtype=torch.long)  # right-padded: padding lands past
        for b, (row, n) in enumerate(plan):  # each row's length, where the mask hides it
            ids[b, :n] = torch.tensor(row.req.prompt_ids[row.prefilled:row.prefilled + n])
        last = sorted({n - 1 for _, n in plan})  # only these positions' logits are computed
        logits = self._forward([row for row, _ in plan], ids, [row.prefilled for row, _ in plan],
                               torch.tensor(last))
        for b, (row, n) in enumerate(plan):
            row.prefilled += n
            if row.prefilled == len(row.req.prompt_ids):
                self._take(row, logits[b, last.index(n - 1)])
        return sum(n for _, n in plan)

    def _decode(self) -> int:
        rows = [row for row in self.rows if not row.done and row.next_token is not None]
        if not rows:
            return 0
        ids = torch.tensor([[row.next_token] for row in rows])
        logits = self._forward(rows, ids, [row.pos for row in rows], 1)
        for b, row in enumerate(rows):
            row.next_token = None
            self._take(row, logits[b, -1])
        return len(rows)

    def _take(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample row's next token from ``logits`` [V] and hand it to its stream; end the row if it is done.
        Any failure here belongs to this row alone: its request ends with an error, the step goes on."""
        try:
            self._sample(row, logits)
        except Exception as e:  # noqa: BLE001
            status = e.status if isinstance(e, RowError) else 500
            message = str(e) if isinstance(e, RowError) else f"generation failed for this request: {e!r}"
            row.done, row.next_token = True, None
            self._end(row.req, ("error", message, status))

    def _sample(self, row: _Row, logits: torch.Tensor) -> None:
        p, req = row.req.params, row.req
        # -inf alone is a token without mass (fine); NaN, +inf or nothing finite cannot be sampled from
        if not bool(torch.isfinite(logits).all()) and (
                torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all()):
            who = f"adapter {req.adapter!r}" if req.adapter is not None else "the base model"
            raise RowError(f"the model's scores for the next token are not finite (NaN or Inf) for this request; "
                           f"{who} may hold damaged weights")
        token = _pick(logits, p, row.gen)
        if token in self.eos and not p.ignore_eos:
            return self._finish(row, "stop")
        row.n_tokens += 1
        self.stats["tokens"] += 1
        lp = [_logprobs(logits, token, p.logprobs)] if p.logprobs is not None else []
        text, stopped = row.stream.add(token)
        if text or lp:
            req.put(("text", text, lp))
        if stopped:
            return self._finish(row, "stop")
        if row.n_tokens >= p.max_tokens:
            return self._finish(row, "length")
        row.next_token = token

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.stream.flush() if not row.stream.stopped else ""
        if rest:
            row.req.put(("text", rest, []))
        row.done = True
        self._end(row.req, ("done", reason, row.n_tokens))


def _gone(req: Request, now: float, loaded: set) -> tuple | None:
    """Why ``req`` must end before its next step (as its last event), or None."""
    if req.cancelled:
        return ("done", "cancelled", 0)
    if now > req.deadline:
        return ("error", "the request timed out (esft serve --request-timeout)", 504)
    if req.adapter is not None and req.adapter not in loaded:
        return ("error", f"model {req.adapter!r} was unloaded before the request finished", 404)
    return None


def _context(model) -> int:
    """Positions a sequence may use: the model's context, or its sliding window if attention is windowed
    (the slot cache's mask is fully causal, which equals windowed attention only within the window)."""
    cfg = model.config
    ctx = int(getattr(cfg, "max_position_embeddings", 2048))
    window = getattr(cfg, "sliding_window", None)
    windowed = getattr(cfg, "use_sliding_window", True) and window and (
        "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"]))
    return min(ctx, int(window)) if windowed else ctx


def _use_masked_attention(model) -> None:
    """The slot cache hands attention an explicit 4D mask: eager and sdpa take it, flash kernels do not."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        model.set_attn_implementation("sdpa")


def _pick(logits: torch.Tensor, p: GenParams, gen: torch.Generator) -> int:
    """Greedy, or temperature + nucleus (top-p) sampling with the request's own generator. logits: [V]."""
    if p.temperature < 1e-5:  # 0 = greedy; tinier temperatures would overflow the softmax
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, -1)
    if p.top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < p.top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True  # and never less than the likeliest token, however small top_p is
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _logprobs(logits: torch.Tensor, token: int, k: int) -> tuple:
    """(token, its log-probability, [(id, logprob) of the k most likely]) under the model's distribution
    (temperature 1, before top-p), as OpenAI and vLLM report it. logits: [V]."""
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(min(k, lp.numel())) if k else None
    return token, _finite(lp[token]), ([] if top is None else
                                       [(int(i), _finite(v)) for v, i in zip(top.values, top.indices)])


def _finite(logprob: torch.Tensor) -> float:
    """A log-probability JSON can carry: -inf (no mass) is OpenAI's -9999.0; the rest is finite already
    (non-finite scores end the row before this)."""
    v = float(logprob)
    return v if math.isfinite(v) else LOGPROB_FLOOR
