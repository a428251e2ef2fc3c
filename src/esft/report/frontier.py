"""Task skill at matched forgetting: each method's frontier over its learning rates.

A method trained on a task at learning rate ``lr`` gives one point ``(forgetting, task score)``,
where forgetting = the base model's general ability minus the trained model's (points; negative
when general ability rose). Raising the LR moves the point along a path that starts at the base
model itself (LR 0: forgetting 0, the base task score). The *frontier value* at a forgetting
budget ``b`` is the best task score reachable on that path without forgetting more than ``b``:

    max( scores of the points with forgetting <= b,
         the score linearly interpolated at forgetting = b on every path segment that crosses b )

Interpolating along a segment stands for an LR between the two measured ones. Because the path
starts at the base model, the value is defined for every ``b >= 0``, even when the smallest LR
already forgets more than ``b``. Every method gets the same number of LRs, so the upward bias of
taking a maximum over noisy points is shared.
"""

from __future__ import annotations

import math

Point = tuple[float, float]  # (forgetting in points, task score)


def _candidates(path: list[Point], budget: float) -> list[tuple[float, tuple[int, ...]]]:
    """(score, indices of the path points it depends on) for every way of staying within ``budget``."""
    out = [(s, (i,)) for i, (f, s) in enumerate(path) if f <= budget]
    for i in range(len(path) - 1):
        (f0, s0), (f1, s1) = path[i], path[i + 1]
        if min(f0, f1) < budget < max(f0, f1):  # the segment crosses the budget strictly inside
            out.append((s0 + (s1 - s0) * (budget - f0) / (f1 - f0), (i, i + 1)))
    return out


def frontier_value(path: list[Point], budget: float) -> float:
    """Best task score with forgetting <= ``budget`` along ``path`` (the base model first, then the
    LRs in increasing order). NaN when nothing on the path stays within the budget (only possible
    when the path does not start at forgetting <= budget)."""
    c = _candidates(path, budget)
    return max(s for s, _ in c) if c else math.nan


def frontier_support(path: list[Point], budgets: list[float]) -> set[int]:
    """Indices of the path points that the frontier values at ``budgets`` are made of: the chosen
    point, or both ends of the chosen segment (ties: all of them). These are the LRs worth more
    seeds: every other LR is dominated at every budget."""
    used: set[int] = set()
    for b in budgets:
        c = _candidates(path, b)
        if c:
            best = max(s for s, _ in c)
            used |= {i for s, idx in c if s >= best - 1e-12 for i in idx}
    return used


def path_for(base_task: float, points: dict[float, Point]) -> list[Point]:
    """The path: the base model (LR 0, no forgetting), then ``{lr: (forgetting, score)}`` by LR."""
    return [(0.0, base_task)] + [points[lr] for lr in sorted(points)]


def matched(results: list[dict], variant: str, task: str, base_task: float, base_general: float,
            budgets: list[float], lrs: list[float] | None = None) -> dict:
    """Frontier values of ``variant`` on ``task`` at each budget, per seed.

    ``results``: the report's result dicts. Each seed's path uses that seed's runs at ``lrs``
    (default: the LRs every seed ran; so a seed missing at some LR does not bend only its own
    path). Returns {"lrs": [...], "seeds": {seed: [value per budget]}, "points": {seed: {lr: point}}}.
    """
    runs = [r for r in results if r["variant"] == variant and r["task"] == task]
    by_seed: dict[int, dict[float, Point]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["lr"]] = (base_general - r["general"], r["task_score"])
    if lrs is None:
        common = set.intersection(*(set(p) for p in by_seed.values())) if by_seed else set()
        lrs = sorted(common)
    seeds = {s: [frontier_value(path_for(base_task, {lr: p[lr] for lr in lrs}), b) for b in budgets]
             for s, p in sorted(by_seed.items()) if all(lr in p for lr in lrs)}
    return {"lrs": sorted(lrs), "seeds": seeds,
            "points": {s: {lr: p[lr] for lr in sorted(p)} for s, p in sorted(by_seed.items())}}
