"""Optional LLM judge for free-form answers, through any OpenAI-compatible chat endpoint.

Never required and off unless a URL is given: every suite task has a local metric. The judge
sees the question, the reference answer(s) and the model's answer, and replies with one
integer 0-10; the task's judge score is the mean of the parsed grades x 10 (0-100, like the
local metrics). Replies without a grade are counted and left out of the mean, never guessed.

A judge that fails (refuses the connection, never answers, answers with an HTTP error) costs at most
``timeout`` seconds x (1 + ``retries``) attempts per example, and after ``give_up_after`` examples in a
row have failed the rest are not sent. Failures never raise: each one is recorded per example (its
error), so the local metric's results are always kept.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

RUBRIC = (
    "You grade answers. Compare the candidate answer with the reference answer(s) for the question. "
    "Reply with a single integer from 0 (wrong or unrelated) to 10 (fully correct and equivalent to a reference), "
    "and nothing else."
)


@dataclass
class JudgeConfig:
    url: str  # base URL of the endpoint, e.g. http://localhost:8000/v1
    model: str  # the judge model's name on that endpoint
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (the key never goes in a config)
    timeout: float = 30.0  # seconds to connect, and to wait for the reply, per attempt
    retries: int = 1  # further attempts after a timeout, refused connection, HTTP 429 or 5xx (0 = none)
    give_up_after: int = 3  # this many examples failed in a row: the judge is down, do not send the rest

    def __post_init__(self):
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ValueError(f"--judge-timeout must be a number of seconds > 0, got {self.timeout!r}")
        for name, v, low in (("--judge-retries", self.retries, 0), ("give_up_after", self.give_up_after, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


@dataclass
class JudgeResult:
    score: float | None  # mean grade x 10 over the parsed replies; None if none parsed
    grades: list[int | None]  # per example, None where the reply had no grade or the judge failed
    unparsed: int  # replies without a grade
    errors: list[str | None] = field(default_factory=list)  # per example: why no reply came, None where one did

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors)


def parse_grade(text: str) -> int | None:
    m = re.search(r"\b(10|[0-9])\b", text or "")
    return int(m.group(1)) if m else None


def judge(prompts: list[str], references: list[list[str]], predictions: list[str], cfg: JudgeConfig,
          progress=None) -> JudgeResult:
    from openai import APIError, OpenAI

    # max_retries is the client's own retry loop (with its short backoff); the default of 2 with a 60 s
    # timeout made a silent judge cost 3 minutes per example
    client = OpenAI(base_url=cfg.url, api_key=os.environ.get(cfg.api_key_env) or "none", timeout=cfg.timeout,
                    max_retries=cfg.retries)
    grades: list[int | None] = []
    errors: list[str | None] = []
    in_a_row = 0  # examples failed in a row
    for p, refs, y in zip(prompts, references, predictions):
        if in_a_row >= cfg.give_up_after:
            grades.append(None)
            errors.append(f"not sent: the judge failed on the {in_a_row} examples before this one")
            continue
        refs = [refs] if isinstance(refs, str) else refs
        user = f"Question:\n{p}\n\nReference answer(s):\n" + "\n".join(f"- {r}" for r in refs) + \
               f"\n\nCandidate answer:\n{y}\n\nGrade (0-10):"
        error = None
        try:
            reply = client.chat.completions.create(
                model=cfg.model, temperature=0, max_tokens=4,
                messages=[{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}])
            text = reply.choices[0].message.content
        except APIError as e:  # refused, timed out, HTTP error, after the retries
            error = describe_error(e, cfg)
        except (AttributeError, IndexError, TypeError):  # a 200 reply that is no chat completion (a proxy's page)
            error = f"the reply from {cfg.url} is not a chat completion: {str(reply)[:100]!r}"
        grades.append(None if error else parse_grade(text))
        errors.append(error)
        in_a_row = in_a_row + 1 if error else 0
        if progress is not None:
            progress(1)
    parsed = [g for g in grades if g is not None]
    replied = sum(e is None for e in errors)
    return JudgeResult(score=10.0 * sum(parsed) / len(parsed) if parsed else None, grades=grades,
                       unparsed=replied - len(parsed), errors=errors)


def describe_error(e: Exception, cfg: JudgeConfig) -> str:
    """One line saying why the judge gave no reply (the client's own message is only "Connection error.")."""
    from openai import APIConnectionError, APIStatusError, APITimeoutError

    attempts = f"{1 + cfg.retries} attempt(s)"
    if isinstance(e, APITimeoutError):
        return f"no reply from {cfg.url} within --judge-timeout {cfg.timeout:g} s ({attempts})"
    if isinstance(e, APIConnectionError):
        return f"cannot reach {cfg.url}: {e.__cause__ or e} ({attempts})"
    if isinstance(e, APIStatusError):
        return f"HTTP {e.status_code} from {cfg.url}: {str(e.message)[:200]}"
    return f"{type(e).__name__}: {str(e)[:200]}"
