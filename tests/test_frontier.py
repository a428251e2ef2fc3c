"""Matched-forgetting frontier: exact values by hand, and parity with a brute-force computation."""

import math
import random

import pytest

from esft.report.config import ReportConfig
from esft.report.frontier import frontier_support, frontier_value, matched, with_base


def brute_force(points, budget, n=4000):
    """Independent computation: the Pareto set by pairwise dominance checks, then a walk along its
    chain in small steps, keeping the best score within the budget."""
    def dominated(p):
        return any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)

    chain = sorted(set(p for p in points if not dominated(p)))
    best = max((s for f, s in chain if f <= budget), default=math.nan)
    for (f0, s0), (f1, s1) in zip(chain, chain[1:]):
        for k in range(n + 1):
            f, s = f0 + (f1 - f0) * k / n, s0 + (s1 - s0) * k / n
            if f <= budget + 1e-12:
                best = max(best, s)
    return best


def test_values_by_hand():
    # base (0, 20) -> lr1 (0.5, 30) -> lr2 (3, 50) -> lr3 (10, 70)
    path = [(0.0, 20.0), (0.5, 30.0), (3.0, 50.0), (10.0, 70.0)]
    assert frontier_value(path, 0.5) == 30.0  # a measured point exactly on the budget
    assert frontier_value(path, 1.0) == pytest.approx(30 + 20 * 0.5 / 2.5)  # 34: between lr1 and lr2
    assert frontier_value(path, 5.0) == pytest.approx(50 + 20 * 2 / 7)
    assert frontier_value(path, 100.0) == 70.0
    assert frontier_support(path, [1.0]) == {1, 2}
    assert frontier_support(path, [0.5, 100.0]) == {1, 2, 3}  # 0.5: point 1, then towards point 2


def test_dominated_points_change_nothing():
    # lr2 forgets more than lr1 and scores less: it is not on the frontier
    path = [(0.0, 42.0), (0.25, 1.5), (1.6, 62.0), (5.0, 7.0)]
    assert frontier_value(path, 1.0) == pytest.approx(42 + 20 * 1.0 / 1.6)
    assert frontier_support(path, [1.0, 2.0, 5.0]) == {0, 2}


def test_a_later_lr_that_forgets_less_counts():
    # noise can make a larger LR forget less than a smaller one; the frontier takes the best within budget
    path = [(0.0, 10.0), (4.0, 60.0), (0.8, 40.0)]
    assert frontier_value(path, 0.8) == 40.0
    assert frontier_value(path, 1.0) == pytest.approx(40 + 20 * 0.2 / 3.2)  # 41.25, on the segment between the LRs
    assert frontier_value(path, 2.0) == pytest.approx(40 + 20 * 1.2 / 3.2)
    # negative forgetting (general ability rose) is within every budget
    assert frontier_value([(0.0, 10.0), (-2.0, 15.0)], 0.0) == 15.0


def test_without_the_base_point_an_unreachable_budget_is_nan():
    assert math.isnan(frontier_value([(3.0, 50.0), (6.0, 60.0)], 1.0))


def test_parity_with_brute_force_on_random_paths():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        path = [(0.0, rng.uniform(0, 50))] + [(rng.uniform(-2, 15), rng.uniform(0, 100)) for _ in range(n)]
        for b in (0.0, 1.0, 2.0, 5.0, rng.uniform(0, 12)):
            assert frontier_value(path, b) == pytest.approx(brute_force(path, b), abs=0.05), (path, b)


def test_support_points_reproduce_the_values():
    rng = random.Random(1)
    for _ in range(200):
        path = [(0.0, rng.uniform(0, 50))] + [(rng.uniform(-1, 15), rng.uniform(0, 100)) for _ in range(5)]
        budgets = [1.0, 2.0, 5.0]
        sub = [path[i] for i in sorted(frontier_support(path, budgets))]
        for b in budgets:  # the LRs that get more seeds alone give the same values
            assert frontier_value(sub, b) == pytest.approx(frontier_value(path, b)), (path, b)


def test_matched_uses_the_lrs_every_seed_ran():
    base_general, base_task = 40.0, 10.0
    results = [  # seed 0 on three LRs, seed 1 only on the two frontier LRs
        {"variant": "M", "task": "t", "seed": 0, "lr": 1e-3, "general": 39.5, "task_score": 30.0},
        {"variant": "M", "task": "t", "seed": 0, "lr": 2e-3, "general": 37.0, "task_score": 50.0},
        {"variant": "M", "task": "t", "seed": 0, "lr": 5e-3, "general": 20.0, "task_score": 90.0},
        {"variant": "M", "task": "t", "seed": 1, "lr": 1e-3, "general": 39.0, "task_score": 34.0},
        {"variant": "M", "task": "t", "seed": 1, "lr": 2e-3, "general": 38.0, "task_score": 44.0},
        {"variant": "other", "task": "t", "seed": 0, "lr": 1e-3, "general": 0.0, "task_score": 100.0},
    ]
    m = matched(results, "M", "t", base_task, base_general, [1.0, 2.0, 5.0])
    assert m["lrs"] == [1e-3, 2e-3]
    seed0 = with_base(base_task, {1e-3: (0.5, 30.0), 2e-3: (3.0, 50.0)})
    seed1 = with_base(base_task, {1e-3: (1.0, 34.0), 2e-3: (2.0, 44.0)})
    assert m["seeds"][0] == [frontier_value(seed0, b) for b in (1.0, 2.0, 5.0)]
    assert m["seeds"][1] == [frontier_value(seed1, b) for b in (1.0, 2.0, 5.0)] == [34.0, 44.0, 44.0]
    assert m["seeds"][0][0] == pytest.approx(34.0)


def test_report_config_modes():
    cfg = ReportConfig(tasks=["translate_synth"])
    assert cfg.sweep and not cfg.ablations and cfg.p_sweep == [] and len(cfg.sweep_esft) >= 5
    ext = ReportConfig(tasks=["translate_synth"], extended=True)
    assert ext.ablations and ext.p_sweep == [0.05, 0.1, 0.3, 0.5]
    assert ReportConfig(tasks=["translate_synth"], extended=True, ablations=False).ablations is False
    assert ReportConfig(tasks=["translate_synth"], quick=True).ablations
    with pytest.raises(ValueError, match="budgets"):
        ReportConfig(tasks=["translate_synth"], budgets=[-1.0])
    with pytest.raises(ValueError, match="at least one forgetting budget"):
        ReportConfig(tasks=["translate_synth"], budgets=[])
    # another model's report and run cache never land on the default model's
    assert (cfg.report, cfg.work_dir) == ("docs/report.md", "runs/report")
    v2 = ReportConfig(tasks=["translate_synth"], model="v2lite")
    assert (v2.report, v2.work_dir) == ("docs/report_v2lite.md", "runs/report_v2lite")
    own = ReportConfig(tasks=["translate_synth"], model="/ckpt/DeepSeek V2 Lite/", report="r.md")
    assert (own.report, own.work_dir) == ("r.md", "runs/report_DeepSeek_V2_Lite")


def test_failed_evaluations_are_not_on_the_front():
    path = [(0.0, 10.0), (math.nan, 50.0), (1.0, 30.0), (2.0, 40.0)]
    assert frontier_value(path, 1.5) == pytest.approx(35.0)
    assert 1 not in frontier_support(path, [1.0, 1.5])


def test_a_base_only_front_still_counts_every_seed():
    """No run of seed 0's grid beats the base model within the budgets, so no LR gets more seeds: every seed's
    value there is the base's, and the seeds stay in the method's average over tasks."""
    base_general, base_task = 40.0, 10.0
    results = [{"variant": "M", "task": "t", "seed": 0, "lr": 1e-3, "general": 30.0, "task_score": 12.0}]
    m = matched(results, "M", "t", base_task, base_general, [1.0, 2.0], lrs=[], seeds=[0, 1, 2])
    assert m["seeds"] == {0: [10.0, 10.0], 1: [10.0, 10.0], 2: [10.0, 10.0]}
    # a seed that lacks a run at one of the front's LRs is still left out
    m = matched(results, "M", "t", base_task, base_general, [1.0], lrs=[1e-3], seeds=[0, 1])
    assert list(m["seeds"]) == [0]
