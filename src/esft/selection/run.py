"""`esft select`: scores summary -> expert_cfg.json (+ a per-layer summary table)."""

from __future__ import annotations

from pathlib import Path

from ..io import write_json_atomic
from .select import SelectConfig, expert_config, read_expert_config, read_router_stage, read_scores, select_experts


def run_select(scores_path: str, cfg: SelectConfig, out: str | None = None, reference_cfg: str | None = None) -> dict:
    scores = read_scores(scores_path, cfg.score_function)
    reference = read_expert_config(reference_cfg)["experts"] if reference_cfg else None
    selected = select_experts(scores, cfg, reference)
    result = expert_config(selected, cfg, read_router_stage(scores_path))
    if out:
        write_json_atomic(Path(out), result)
    return result
