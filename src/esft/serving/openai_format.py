"""OpenAI response bodies from engine events (plain and streamed, n choices, logprobs) and /metrics text."""

from __future__ import annotations

import time


class Choices:
    """Collects the events of one HTTP request's ``n`` engine requests (choice i = engine request i)."""

    def __init__(self, tok, chat: bool, n: int, logprobs: int | None, rid: str, model: str, prompt_tokens: int):
        self.tok, self.chat, self.n, self.logprobs = tok, chat, n, logprobs
        self.rid, self.model, self.prompt_tokens = rid, model, prompt_tokens
        self.created = int(time.time())
        self.text = [[] for _ in range(n)]
        self.lps = [[] for _ in range(n)]  # the engine's (token, logprob, top) entries per choice
        self.offset = [0] * n  # completions' text_offset: characters of the token strings so far
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n

    def finished(self) -> bool:
        return all(f is not None for f in self.finish)

    def _object(self, stream: bool) -> str:
        return ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")

    def _body(self, choices: list, stream: bool) -> dict:
        return {"id": self.rid, "object": self._object(stream), "created": self.created, "model": self.model,
                "choices": choices}

    def start(self) -> list[dict]:
        """Streamed chat opens every choice with the assistant's role."""
        if not self.chat:
            return []
        return [self._body([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], True) for i in range(self.n)]

    def add(self, i: int, ev: tuple, stream: bool) -> dict | None:
        """A "text" or "done" event of choice ``i``; when streaming, the chunk to send (None: nothing)."""
        if ev[0] == "done":
            self.finish[i], self.tokens[i] = ev[1], ev[2]
            if not stream:
                return None
            return self._body([self._choice(i, None if self.chat else "", [], ev[1])], True)
        text, entries = ev[1], ev[2]
        self.text[i].append(text)
        self.lps[i].extend(entries)
        if not stream or (not text and not entries):
            return None
        return self._body([self._choice(i, text, entries, None)], True)

    def _choice(self, i: int, text: str | None, entries: list, finish: str | None) -> dict:
        lp = self._logprobs(i, entries) if self.logprobs is not None and (entries or finish is None) else None
        if self.chat:
            return {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": lp,
                    "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}

    def _token(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)

    def _logprobs(self, i: int, entries: list) -> dict:
        if self.chat:
            def one(t, lp):
                s = self._token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

            return {"content": [{**one(t, lp), "top_logprobs": [one(u, v) for u, v in top]} for t, lp, top in entries]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in entries:
            s = self._token(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._token(u): v for u, v in top})
            out["text_offset"].append(self.offset[i])
            self.offset[i] += len(s)
        return out

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def usage_chunk(self) -> dict:
        return {**self._body([], True), "usage": self.usage()}

    def response(self) -> dict:
        choices = []
        for i in range(self.n):
            self.offset[i] = 0
            lp = self._logprobs(i, self.lps[i]) if self.logprobs is not None else None
            text = "".join(self.text[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
        return {**self._body(choices, False), "usage": self.usage()}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(engine, base_name: str) -> str:
    """Prometheus text exposition (version 0.0.4) of the engine's gauges and counters."""
    st = engine.stats
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("esft_queue_length", "gauge", "Requests waiting for a slot.", [("", engine.queue_length())])
    metric("esft_running_requests", "gauge", "Requests holding a KV-cache slot.", [("", engine.running())])
    metric("esft_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [("", engine.tokens_per_second())])
    metric("esft_generation_tokens_total", "counter", "Tokens generated.", [("", st["tokens"])])
    metric("esft_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", st["prompt_tokens"])])
    metric("esft_engine_steps_total", "counter", "Engine steps (each: prefill chunk + one decode token).",
           [("", engine.steps)])
    metric("esft_kv_cache_bytes", "gauge", "Bytes held by the slot KV cache.", [("", engine.cache.nbytes())])
    metric("esft_requests_total", "counter", "Requests admitted, per model.",
           [(f'{{model="{_label(name or base_name)}"}}', v) for name, v in sorted(st["per_model"].items())])
    metric("esft_requests_finished_total", "counter", "Requests ended, per reason.",
           [(f'{{reason="{_label(r)}"}}', v) for r, v in sorted(st["finished"].items())])
    return "\n".join(lines) + "\n"
