"""Task skill at matched forgetting: each method's frontier over its learning rates.

A method trained on a task at learning rate ``lr`` gives one point ``(forgetting, task score)``,
where forgetting = the base model's general ability minus the trained model's (points; negative
when general ability rose). The base model itself is one more point: LR 0, forgetting 0, the base
task score. The method's *frontier* is the Pareto front of its points: those that no other point
beats on both axes, sorted by forgetting (so their scores rise), joined by straight lines.

The *frontier value* at a forgetting budget ``b`` is the frontier's height at ``b``: the score of
the last frontier point with forgetting <= ``b``, interpolated linearly towards the next frontier
point (which forgets more than ``b``). Interpolation stands for an LR between the two measured
ones, so the value is an estimate that more LRs refine (a new front point can lower it as well
as raise it). Because the base model is a point, the value is defined for every ``b >= 0``. The
order of the LRs does not matter, so a larger LR that happens to forget less (noise) is handled,
and a dominated point never changes any value. Every method gets the same number of LRs, so the
upward bias of taking the best of noisy points is shared.
"""

from __future__ import annotations

import math

Point = tuple[float, float]  # (forgetting in points, task score)


def pareto(points: list[Point]) -> list[int]:
    """Indices of the non-dominated points, by increasing forgetting (scores strictly rising).

    A point is dominated when another forgets no more and scores at least as much, one of them
    strictly; of identical points the first is kept. Points with a non-finite coordinate (a
    failed evaluation) are never on the front."""
    finite = [i for i, (f, s) in enumerate(points) if math.isfinite(f) and math.isfinite(s)]
    order = sorted(finite, key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _bracket(points: list[Point], budget: float) -> tuple[int, int | None] | None:
    """(last frontier point within the budget, the next frontier point or None); None if none is within."""
    front = pareto(points)
    within = [i for i in front if points[i][0] <= budget]
    if not within:
        return None
    k = front.index(within[-1])
    return within[-1], (front[k + 1] if k + 1 < len(front) else None)


def frontier_value(points: list[Point], budget: float) -> float:
    """The frontier's height at forgetting = ``budget`` (see the module docstring). NaN when no
    point forgets <= ``budget`` (impossible once the base model's point is included)."""
    br = _bracket(points, budget)
    if br is None:
        return math.nan
    (f0, s0), nxt = points[br[0]], br[1]
    if nxt is None:
        return s0
    f1, s1 = points[nxt]
    return s0 + (s1 - s0) * (budget - f0) / (f1 - f0)


def frontier_support(points: list[Point], budgets: list[float]) -> set[int]:
    """Indices of the points the values at ``budgets`` are made of (the two frontier points around
    each budget). These are the LRs worth more seeds: dropping any other point changes no value."""
    used: set[int] = set()
    for b in budgets:
        br = _bracket(points, b)
        if br is not None:
            used |= {i for i in br if i is not None}
    return used


def with_base(base_task: float, points: dict[float, Point]) -> list[Point]:
    """The base model's point (LR 0, no forgetting) first, then ``{lr: (forgetting, score)}`` by LR."""
    return [(0.0, base_task)] + [points[lr] for lr in sorted(points)]


def matched(results: list[dict], variant: str, task: str, base_task: float, base_general: float,
            budgets: list[float], lrs: list[float] | None = None, seeds: list[int] = ()) -> dict:
    """Frontier values of ``variant`` on ``task`` at each budget, per seed.

    ``results``: the report's result dicts. Each seed's front uses that seed's runs at ``lrs``
    (default: the LRs every seed ran; so a seed missing at some LR does not bend only its own
    front). ``seeds``: seeds to report even without a run on this task; with ``lrs`` empty (no run
    of seed 0's grid beat the base model within the budgets) their front is the base point alone.
    Returns {"lrs": [...], "seeds": {seed: [value per budget]}, "points": {seed: {lr: point}}}.
    """
    runs = [r for r in results if r["variant"] == variant and r["task"] == task]
    by_seed: dict[int, dict[float, Point]] = {s: {} for s in seeds}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["lr"]] = (base_general - r["general"], r["task_score"])
    if lrs is None:
        ran = [set(p) for p in by_seed.values() if p]
        common = set.intersection(*ran) if ran else set()
        lrs = sorted(common)
    seeds = {s: [frontier_value(with_base(base_task, {lr: p[lr] for lr in lrs}), b) for b in budgets]
             for s, p in sorted(by_seed.items()) if all(lr in p for lr in lrs)}
    return {"lrs": sorted(lrs), "seeds": seeds,
            "points": {s: {lr: p[lr] for lr in sorted(p)} for s, p in sorted(by_seed.items())}}
