"""Deterministic splits, JSONL writing and scoring for the synthetic multi-domain suite.

Splits are disjoint by construction: every prompt is assigned to one split by a hash of
(task, prompt) that does not depend on the seed, so an eval prompt can never turn up in a
train file, whatever seeds or sizes were used. Within valid and eval, prompts are unique.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from . import adaptation, general  # noqa: F401  (registers the tasks)
from .base import TASKS, get_task, task_names
from .metrics import METRICS

SPLITS = ("train", "valid", "eval")
# share of the prompt space (by hash, out of 1000) that belongs to each split
_BUCKETS = {"eval": range(0, 100), "valid": range(100, 200), "train": range(200, 1000)}


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def split_of(task: str, prompt: str) -> str:
    """The split a prompt belongs to (fixed for a task, independent of the seed)."""
    b = _digest("split", task, prompt) % 1000
    return next(s for s, r in _BUCKETS.items() if b in r)


def generate_split(task: str, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``task`` for ``split``; same arguments -> same list.

    Train may repeat a prompt (the pretraining mix can be larger than a task's prompt space);
    valid and eval do not, and a ValueError says so when the space is too small for ``n``.
    """
    t = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_digest("rng", task, split, seed))
    unique = split != "train"
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    tries, max_tries = 0, 1000 + 100 * n
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"task {task!r}: found only {len(out)} distinct {split} examples of the {n} asked "
                             f"for after {max_tries} draws; its prompt space is too small for that size")
        prompt, answer = t.generate(rng)
        if split_of(task, prompt) != split or (unique and prompt in seen):
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


def to_row(prompt: str, answer: str, with_answers: bool = False) -> dict:
    row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    if with_answers:
        row["answers"] = [answer]
    return row


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_suite(out_dir: str | os.PathLike, n_train: int, n_valid: int, n_eval: int, seed: int = 0,
                tasks: Sequence[str] | None = None) -> dict[str, dict[str, Path]]:
    """Write ``out_dir/<task>/{train,valid,eval}.jsonl`` (eval rows carry ``answers``) and
    ``out_dir/suite.json`` (sizes, seed, each task's kind and metric). Returns task -> split -> path."""
    out_dir = Path(out_dir)
    names = list(tasks) if tasks is not None else list(TASKS)
    for name in names:
        get_task(name)  # fail before writing anything
    sizes = {"train": n_train, "valid": n_valid, "eval": n_eval}
    paths: dict[str, dict[str, Path]] = {}
    for name in names:
        paths[name] = {}
        for split, n in sizes.items():
            rows = [to_row(p, a, with_answers=split == "eval") for p, a in generate_split(name, split, n, seed)]
            path = out_dir / name / f"{split}.jsonl"
            _write_jsonl(rows, path)
            paths[name][split] = path
    meta = {"seed": seed, "sizes": sizes,
            "tasks": {n: {"kind": TASKS[n].kind, "metric": TASKS[n].metric, "description": TASKS[n].description}
                      for n in names}}
    (out_dir / "suite.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def score(task_name: str, predictions: Sequence[str], references: Sequence) -> float:
    """The task's metric, 0..100. A reference may be a string or a list of acceptable answers."""
    t = get_task(task_name)
    if len(predictions) != len(references):
        raise ValueError(f"{task_name}: {len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError(f"{task_name}: nothing to score")
    return float(METRICS[t.metric](list(predictions), list(references)))


def general_ability(scores: Mapping[str, float]) -> float:
    """Mean of the general tasks' held-out scores (``scores``: task -> score from ``score``)."""
    general_tasks = task_names("general")
    missing = [n for n in general_tasks if n not in scores]
    if missing:
        raise ValueError(f"general_ability needs a score for every general task; missing: {', '.join(missing)}")
    return sum(float(scores[n]) for n in general_tasks) / len(general_tasks)
