"""Choosing the task-relevant experts of each layer from a scores summary.

Budgets:

- ``top_p`` (the paper's, and the default): per layer, take experts in descending score while
  the running sum of the taken ones is below p (the reference code's loop exactly).
- ``top_k``: a fixed number of experts per layer.
- ``global``: one budget of experts over all layers, filled with the best (layer, expert) pairs
  by score, each layer's scores first normalised to sum to 1 so layers compare.

Ties are broken by lower expert id, so selection is deterministic.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from ..io import DataError

SCORE_FUNCTIONS = ("token", "gate")


@dataclass
class SelectConfig:
    score_function: str = "token"  # "token" (ESFT-Token) or "gate" (ESFT-Gate)
    budget: str = "top_p"  # "top_p" | "top_k" | "global" | "random"
    top_p: float = 0.2
    top_k: int = 4
    global_experts: int = 0
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False
    seed: int = 0  # only for budget="random" (same per-layer counts as a reference selection)

    def __post_init__(self):
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}")
        if self.budget not in ("top_p", "top_k", "global", "random"):
            raise ValueError(f"budget must be top_p, top_k, global or random, got {self.budget!r}")
        if self.budget == "top_p" and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.budget == "top_k" and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.budget == "global" and self.global_experts < 1:
            raise ValueError("budget='global' needs global_experts >= 1")


def read_scores(path: str | os.PathLike, score_function: str) -> dict[int, dict[int, float]]:
    """Read ``{"<fn>_scores": {"<layer>": {"<expert>": score}}}`` (reference summary layout)."""
    try:
        with open(path) as f:
            summary = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    key = f"{score_function}_scores"
    if key not in summary:
        raise DataError(f"{path}: no {key!r} field (found {sorted(summary)})")
    try:
        return {int(l): {int(e): float(s) for e, s in row.items()} for l, row in summary[key].items()}
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: {key} must map layer -> expert -> number ({e})") from None


def _ranked(row: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))


def select_top_p(row: dict[int, float], p: float) -> list[int]:
    chosen, acc = [], 0.0
    for expert, score in _ranked(row):
        if acc >= p:
            break
        chosen.append(expert)
        acc += score
    return chosen


def select_experts(scores: dict[int, dict[int, float]], cfg: SelectConfig,
                   reference: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Layer -> selected expert ids, in selection order (best first).

    ``scores``: layer -> {expert: score} (a summary file) or layer -> [score per expert] (a profile).
    """
    scores = {l: (dict(enumerate(row)) if isinstance(row, (list, tuple)) else row) for l, row in scores.items()}
    if cfg.budget == "top_p":
        return {l: select_top_p(row, cfg.top_p) for l, row in sorted(scores.items())}
    if cfg.budget == "top_k":
        return {l: [e for e, _ in _ranked(row)[: cfg.top_k]] for l, row in sorted(scores.items())}
    if cfg.budget == "random":
        # Paper Table 4's control: as many experts per layer as the reference selection, chosen at random.
        if reference is None:
            raise ValueError("budget='random' needs a reference selection for its per-layer counts")
        rng = random.Random(cfg.seed)
        return {l: rng.sample(sorted(scores[l]), len(reference.get(l, []))) for l in sorted(scores)}
    pairs = []
    for l, row in scores.items():
        total = sum(row.values()) or 1.0
        pairs += [(s / total, l, e) for e, s in row.items()]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    out: dict[int, list[int]] = {l: [] for l in sorted(scores)}
    for _, l, e in pairs[: cfg.global_experts]:
        out[l].append(e)
    return out


def expert_config(selected: dict[int, list[int]], cfg: SelectConfig) -> dict:
    """The reference ``expert_cfg.json`` layout (plus a record of how it was chosen)."""
    return {
        "experts": {str(l): list(map(int, es)) for l, es in selected.items()},
        "shared_experts": bool(cfg.train_shared_experts),
        "non_expert_modules": bool(cfg.train_non_expert_modules),
        "selection": {
            "score_function": cfg.score_function,
            "budget": cfg.budget,
            "top_p": cfg.top_p if cfg.budget == "top_p" else None,
            "top_k": cfg.top_k if cfg.budget == "top_k" else None,
            "global_experts": cfg.global_experts if cfg.budget == "global" else None,
        },
    }


def read_expert_config(path: str | os.PathLike) -> dict:
    """Read and check an ``expert_cfg.json``; returns it with int layer keys under ``experts``."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: expert config not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(cfg.get("experts"), dict):
        raise DataError(f"{path}: missing 'experts' mapping of layer -> [expert ids]")
    try:
        experts = {int(l): [int(e) for e in es] for l, es in cfg["experts"].items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'experts' must map layer -> list of int expert ids ({e})") from None
    for l, es in experts.items():
        if len(set(es)) != len(es):
            raise DataError(f"{path}: layer {l} lists an expert twice: {es}")
    return {**cfg, "experts": experts,
            "shared_experts": bool(cfg.get("shared_experts", False)),
            "non_expert_modules": bool(cfg.get("non_expert_modules", False))}
