"""Selection against the reference code's loop, and the reference file layouts."""

import json
import random

import pytest

from esft.io import DataError
from esft.selection.run import run_select
from esft.selection.select import SelectConfig, read_expert_config, select_experts, select_top_p


def reference_loop(l_score: dict, top_p: float) -> list[int]:
    """Transcription of the reference generate_expert_config.py selection (stable sort by score)."""
    ranked = sorted([(int(k), v) for k, v in l_score.items()], key=lambda x: x[1], reverse=True)
    selected, current = [], 0
    for expert, score in ranked:
        if current >= top_p:
            break
        selected.append(expert)
        current += score
    return selected


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_top_p_equals_reference_loop(seed, p):
    rng = random.Random(seed)
    row = {e: rng.random() ** 4 for e in range(64)}
    total = sum(row.values())
    row = {e: round(v / total, 4) for e, v in row.items()}  # reference summaries are rounded to 4 digits
    # with distinct scores the order is unambiguous and both must agree exactly
    if len(set(row.values())) == len(row):
        assert select_top_p(row, p) == reference_loop(row, p)
    chosen = select_top_p(row, p)
    assert sum(row[e] for e in chosen[:-1]) < p <= sum(row[e] for e in chosen) + 1e-12 or len(chosen) == 64


def test_reads_reference_summary_and_writes_reference_cfg(tmp_path):
    summary = {"token_scores": {"1": {"0": 0.05, "1": 0.4, "2": 0.3, "3": 0.25}, "2": {"0": 0.7, "1": 0.1, "2": 0.1, "3": 0.1}},
               "gate_scores": {"1": {"0": 0.3, "1": 0.01, "2": 0.02, "3": 0.02}, "2": {"0": 0.01, "1": 0.2, "2": 0.1, "3": 0.05}}}
    src = tmp_path / "summary.json"
    src.write_text(json.dumps(summary))
    out = tmp_path / "expert_cfg.json"
    run_select(str(src), SelectConfig(score_function="token", top_p=0.5), str(out))
    cfg = json.loads(out.read_text())
    assert cfg["experts"] == {"1": [1, 2], "2": [0]}
    assert cfg["shared_experts"] is False and cfg["non_expert_modules"] is False
    run_select(str(src), SelectConfig(score_function="gate", top_p=0.1, train_shared_experts=True), str(out))
    cfg = json.loads(out.read_text())
    assert cfg["experts"] == {"1": [0], "2": [1]} and cfg["shared_experts"] is True
    assert read_expert_config(out)["experts"] == {1: [0], 2: [1]}


def test_other_budgets():
    scores = {1: {0: 0.1, 1: 0.5, 2: 0.4}, 3: {0: 0.8, 1: 0.15, 2: 0.05}}
    assert select_experts(scores, SelectConfig(budget="top_k", top_k=2)) == {1: [1, 2], 3: [0, 1]}
    assert select_experts(scores, SelectConfig(budget="global", global_experts=3)) == {1: [1, 2], 3: [0]}
    rnd = select_experts(scores, SelectConfig(budget="random", seed=3), reference={1: [1, 2], 3: [0]})
    assert [len(rnd[1]), len(rnd[3])] == [2, 1] and len(set(rnd[1])) == 2


def test_bad_scores_file(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"token_scores": {"1": {"0": 0.5}}')
    with pytest.raises(DataError, match="s.json:1: malformed JSON"):
        run_select(str(p), SelectConfig())
    p.write_text('{"gate_scores": {}}')
    with pytest.raises(DataError, match="no 'token_scores'"):
        run_select(str(p), SelectConfig())
    with pytest.raises(ValueError, match="top_p must be in"):
        SelectConfig(top_p=1.5)


def test_accepts_profile_lists_as_well_as_summary_dicts():
    as_dict = {1: {0: 0.1, 1: 0.5, 2: 0.4}}
    as_list = {1: [0.1, 0.5, 0.4]}
    cfg = SelectConfig(top_p=0.6)
    assert select_experts(as_list, cfg) == select_experts(as_dict, cfg) == {1: [1, 2]}
