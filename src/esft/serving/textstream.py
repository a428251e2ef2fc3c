"""Incremental detokenisation and stop strings for one request, in time linear in its length.

Decoding the whole answer again at every token, and searching all of it for the stop strings, is
quadratic. Here each new token is decoded together with only the few tokens before it (a token's text
can depend on its left neighbour: byte-level pieces of one character, a tokenizer's leading-space
rule), and stop strings are searched only in the text not yet sent: text is sent only once no stop
string can start inside it, so every later match starts in the unsent tail.
"""

from __future__ import annotations

_MAX_PENDING = 6  # tokens an incomplete multi-byte character may wait for before it is sent as it is


class TextStream:
    """``add(token)`` -> (text that may be sent now, stopped); ``flush()`` -> the held-back rest."""

    def __init__(self, tokenizer, stop: list[str] | tuple = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded last time: the context for the next token's text
        self.read = 0  # ids[:read] are in the text
        self.unsent = ""  # decoded, but possibly the start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            raise RuntimeError("the stream already ended at a stop string")
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") and len(self.ids) - self.read < _MAX_PENDING:
            return "", False  # an incomplete character: wait for the bytes of the next token
        self.prefix, self.read = self.read, len(self.ids)
        text = self.unsent + now[len(before):]
        cut = self._first_stop(text)
        if cut >= 0:
            self.unsent, self.stopped = "", True
            return text[:cut], True
        hold = self._held(text)
        self.unsent = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def _first_stop(self, text: str) -> int:
        return min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string (it may still complete)."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end (EOS, length): the held-back text, and an incomplete character as it decodes."""
        text = self.unsent
        if self.read < len(self.ids):
            text += self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        self.unsent, self.read = "", len(self.ids)
        cut = self._first_stop(text)
        return text[:cut] if cut >= 0 else text
