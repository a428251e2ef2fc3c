"""Task dataclass and the registry of synthetic tasks (name -> Task)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

KINDS = ("general", "adaptation")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "general" (pretraining / general ability) or "adaptation" (ESFT target)
    generate: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)
    metric: str  # a key of esft.tasks.metrics.METRICS
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


TASKS: dict[str, Task] = {}


def register(name: str, kind: str, metric: str, description: str = ""):
    """Decorator: register ``fn(rng) -> (prompt, answer)`` as a task."""

    def deco(fn):
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        from .metrics import METRICS

        if metric not in METRICS:
            raise ValueError(f"task {name!r}: unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        TASKS[name] = Task(name, kind, fn, metric, description)
        return fn

    return deco


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}") from None


def task_names(kind: str | None = None) -> list[str]:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    return [n for n, t in TASKS.items() if kind is None or t.kind == kind]
