"""Optional LLM judge for free-form answers, through any OpenAI-compatible chat endpoint.

Never required and off unless a URL is given: every suite task has a local metric. The judge
sees the question, the reference answer(s) and the model's answer, and replies with one
integer 0-10; the task's judge score is the mean of the parsed grades x 10 (0-100, like the
local metrics). Replies without a grade are counted and left out of the mean, never guessed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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
    timeout: float = 60.0


@dataclass
class JudgeResult:
    score: float | None  # mean grade x 10 over the parsed replies; None if none parsed
    grades: list[int | None]  # per example, None where the reply had no grade
    unparsed: int


def parse_grade(text: str) -> int | None:
    m = re.search(r"\b(10|[0-9])\b", text or "")
    return int(m.group(1)) if m else None


def judge(prompts: list[str], references: list[list[str]], predictions: list[str], cfg: JudgeConfig,
          progress=None) -> JudgeResult:
    from openai import OpenAI

    client = OpenAI(base_url=cfg.url, api_key=os.environ.get(cfg.api_key_env) or "none", timeout=cfg.timeout)
    grades: list[int | None] = []
    for p, refs, y in zip(prompts, references, predictions):
        refs = [refs] if isinstance(refs, str) else refs
        user = f"Question:\n{p}\n\nReference answer(s):\n" + "\n".join(f"- {r}" for r in refs) + \
               f"\n\nCandidate answer:\n{y}\n\nGrade (0-10):"
        reply = client.chat.completions.create(
            model=cfg.model, temperature=0, max_tokens=4,
            messages=[{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}])
        grades.append(parse_grade(reply.choices[0].message.content))
        if progress is not None:
            progress(1)
    parsed = [g for g in grades if g is not None]
    return JudgeResult(score=10.0 * sum(parsed) / len(parsed) if parsed else None, grades=grades,
                       unparsed=len(grades) - len(parsed))
