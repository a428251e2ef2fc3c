"""The generation engine behind `esft serve`: one woven model, one worker thread, dynamic batching.

Requests wait in a queue; the worker takes up to ``max_batch`` of them (whatever adapters they
name), left-pads them into one batch, sets each row's adapter in the :class:`Weaver`, and decodes
them together with one KV cache whose rows are the requests' own caches. Every row has its own
sampling settings, random generator, stop strings and length limit, and its tokens go only to its
own request's queue. Requests arriving during a batch join the next one (dynamic batching).
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from ..eval.generate import PromptFormat, eos_ids
from ..models.loading import input_device


_entropy = random.SystemRandom()  # unseeded requests: fresh randomness, without touching torch's global RNG


class RequestError(ValueError):
    """Bad request values (the server answers 400 with this message)."""


@dataclass
class GenParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks: equal lengths across compared setups)

    def check(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 5:
            raise RequestError(f"temperature must be in [0, 5], got {self.temperature}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise RequestError("stop must be at most 4 non-empty strings")


@dataclass
class Request:
    """One generation. Its events are ("text", delta) ..., then ("done", finish_reason, n_tokens) or
    ("error", message); they go to ``listener`` if one is given (the server's event loop), else to ``events``."""

    adapter: str | None  # None = the base model
    prompt_ids: list[int]
    params: GenParams
    id: int = 0
    events: queue.Queue = field(default_factory=queue.Queue)
    listener: object = None  # callable(event), called from the engine thread
    cancelled: bool = False  # set when the client went away: the row stops at the next step

    def put(self, event: tuple) -> None:
        (self.listener or self.events.put)(event)


class Engine:
    def __init__(self, model, tokenizer, weaver=None, max_batch: int = 16, max_context: int | None = None,
                 base_format: PromptFormat | None = None):
        self.model, self.tok, self.weaver = model.eval(), tokenizer, weaver
        self.max_batch = max_batch
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.device = input_device(model)  # where inputs go, also on a model spread over devices (device_map)
        self.eos = set(eos_ids(model, tokenizer))  # tokenizer's EOS + every EOS id of the generation config
        # chat format of the base (its tokenizer's chat template, else the reference one) and of each adapter
        # (what it was trained with; the server fills this in as it loads adapters)
        self.base_format = base_format or PromptFormat("chat" if getattr(tokenizer, "chat_template", None)
                                                       else "reference")
        self.formats: dict[str, PromptFormat] = {}
        self.pending: queue.Queue[Request] = queue.Queue()
        self.lock = threading.Lock()  # adapters change only between batches
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self.stats = {"batches": 0, "requests": 0, "tokens": 0, "max_batch_seen": 0}
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

    def submit(self, adapter: str | None, prompt_ids: list[int], params: GenParams, listener=None) -> Request:
        params.check()
        if adapter is not None:
            if self.weaver is None:
                raise KeyError(f"no adapter named {adapter!r}: this engine serves a plain model")
            self.weaver.row(adapter)  # KeyError naming the loaded adapters
        if len(prompt_ids) >= self.max_context:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        params.max_tokens = min(params.max_tokens, self.max_context - len(prompt_ids))
        req = Request(adapter, prompt_ids, params, id=next(self._ids), listener=listener)
        self.pending.put(req)
        return req

    def close(self) -> None:
        self._stop.set()
        self.pending.put(None)  # wake the worker
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------- worker
    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self.pending.get()
            if first is None:
                continue
            batch = [first]
            deadline = time.monotonic() + 0.002  # a moment for concurrent requests to arrive together
            while len(batch) < self.max_batch:
                try:
                    r = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if r is not None:
                    batch.append(r)
            with self.lock:
                try:
                    self._run(batch)
                except Exception as e:  # noqa: BLE001 - every waiting request hears about it
                    for r in batch:
                        r.put(("error", f"generation failed: {e}"))

    @torch.no_grad()
    def _run(self, batch: list[Request]) -> None:
        if self.weaver is not None:  # an adapter unloaded while its requests waited: only those fail
            loaded = set(self.weaver.names())
            for r in batch:
                if r.adapter is not None and r.adapter not in loaded:
                    r.put(("error", f"model {r.adapter!r} was unloaded before the request ran"))
            batch = [r for r in batch if r.adapter is None or r.adapter in loaded]
            if not batch:
                return
        B = len(batch)
        self.stats["batches"] += 1
        self.stats["requests"] += B
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], B)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((B, width), pad, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        gens = [torch.Generator(device="cpu").manual_seed(r.params.seed if r.params.seed is not None
                                                          else _entropy.randrange(2**63)) for r in batch]
        if self.weaver is not None:
            self.weaver.set_rows([r.adapter for r in batch])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        streams = [_Stream(self.tok, r) for r in batch]
        last_pos = pos[:, -1]
        for _ in range(max(r.params.max_tokens for r in batch)):
            nxt = torch.tensor([_pick(logits[i], r.params, gens[i]) if not streams[i].done else pad
                                for i, r in enumerate(batch)], dtype=torch.long)
            for i, s in enumerate(streams):
                if not s.done:
                    if batch[i].cancelled:
                        s.finish("cancelled")
                    else:
                        s.push(int(nxt[i]), self.eos)
            if all(s.done for s in streams):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], 1)
            last_pos = last_pos + 1
            out = self.model(input_ids=nxt[:, None].to(self.device), attention_mask=mask,
                             position_ids=last_pos[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
        for s in streams:
            s.finish("length")
            self.stats["tokens"] += len(s.tokens)


def _pick(logits: torch.Tensor, p: GenParams, gen: torch.Generator) -> int:
    """Greedy, or temperature + nucleus (top-p) sampling with the request's own generator. logits: [V]."""
    if p.temperature < 1e-5:  # 0 = greedy; tinier temperatures would overflow the softmax
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / p.temperature, -1)
    if p.top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < p.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


class _Stream:
    """Incremental detokenisation of one row: emits text deltas, honours stop strings and every EOS id."""

    def __init__(self, tok, req: Request):
        self.tok, self.req = tok, req
        self.tokens: list[int] = []
        self.sent = 0
        self.done = False
        self.cut = False  # ended by a stop string: the text after it is never sent
        self.hold = max((len(s) for s in req.params.stop), default=1) - 1  # a stop string may still be forming

    def push(self, token: int, eos: set[int]) -> None:
        if token in eos and not self.req.params.ignore_eos:
            return self.finish("stop")
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        for s in self.req.params.stop:
            cut = text.find(s)
            if cut >= 0:
                self._emit(text[:cut])
                self.cut = True
                return self.finish("stop")
        if len(self.tokens) >= self.req.params.max_tokens:
            self._emit(text)
            return self.finish("length")
        if not text.endswith("\ufffd"):  # an incomplete multi-byte character waits for its next token
            self._emit(text[: len(text) - self.hold] if self.hold else text)

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            self.req.put(("text", text[self.sent:]))
            self.sent = len(text)

    def finish(self, reason: str) -> None:
        if self.done:
            return
        if not self.cut:
            self._emit(self.tok.decode(self.tokens, skip_special_tokens=True))
        self.done = True
        self.req.put(("done", reason, len(self.tokens)))
