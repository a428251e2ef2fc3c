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
import math
import os
import random
import re
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
    """Read ``{"<fn>_scores": {"<layer>": {"<expert>": score}}}`` (reference summary layout).

    Every score must be a finite, non-negative JSON number: a NaN makes the top-p running sum NaN, which
    never reaches p, so selection would take every expert of the layer.
    """
    summary = load_json(path, "scores file")
    if not isinstance(summary, dict):
        raise DataError(f"{path}: a scores file is a JSON object, got {show(summary)}")
    key = f"{score_function}_scores"
    if key not in summary:
        raise DataError(f"{path}: no {key!r} field (found {sorted(summary)})")
    table = summary[key]
    if not isinstance(table, dict):
        raise DataError(f"{path}: {key!r} must map layer -> expert -> score, got {show(table)}")
    out: dict[int, dict[int, float]] = {}
    for l, row in table.items():
        layer = index_key(path, f"{key!r}: layer", l)
        if not isinstance(row, dict):
            raise DataError(f"{path}: {key!r} layer {l}: must map expert -> score, got {show(row)}")
        out[layer] = {}
        for e, s in row.items():
            expert = index_key(path, f"{key!r} layer {l}: expert", e)
            if not is_number(s):
                raise DataError(f"{path}: {key!r} layer {l} expert {e}: a score must be a JSON number, got {show(s)}")
            if not math.isfinite(s) or s < 0:
                raise DataError(f"{path}: {key!r} layer {l} expert {e}: score {s} is not a finite non-negative number "
                                "(profiled from non-finite weights?); fix the file or profile again")
            out[layer][expert] = float(s)
    return out


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


def expert_config(selected: dict[int, list[int]], cfg: SelectConfig, router_stage: dict | None = None) -> dict:
    """The reference ``expert_cfg.json`` layout (plus a record of how it was chosen). ``router_stage``: the
    scores' router-first stage record (``meta.router_stage`` of `esft profile --router-stage-steps`), kept
    under ``selection`` (the reference code reads only the top-level fields)."""
    out = {
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
    if router_stage is not None:
        out["selection"]["router_stage"] = router_stage
    return out


def read_router_stage(path: str | os.PathLike) -> dict | None:
    """The router-first stage record of a scores summary (``meta.router_stage``), None if it has none."""
    summary = load_json(path, "scores file")
    meta = summary.get("meta") if isinstance(summary, dict) else None
    if not isinstance(meta, dict) or meta.get("router_stage") is None:
        return None
    if not isinstance(meta["router_stage"], dict):
        raise DataError(f"{path}: 'meta.router_stage' must be a JSON object, got {show(meta['router_stage'])}")
    return meta["router_stage"]


# The reference code's expert_cfg.json has experts, shared_experts and non_expert_modules; `esft select` adds
# "selection" (how the experts were chosen). Any other field is refused: a misspelt "shared_expert" would
# otherwise be silently ignored and train something else than asked.
EXPERT_CFG_FIELDS = ("experts", "shared_experts", "non_expert_modules", "selection")


def read_expert_config(path: str | os.PathLike) -> dict:
    """Read and check an ``expert_cfg.json``; returns it with int layer keys under ``experts``.

    Types are strict (a wrong type names the field and the file): layer keys are decimal integer
    strings, expert ids JSON integers >= 0 (not strings, floats or booleans), listed once per layer;
    shared_experts / non_expert_modules are JSON true / false. (Python's truthiness would read
    ``"false"`` as true, and ``"45"`` iterates as experts 4 and 5.)
    """
    cfg = load_json(path, "expert config")
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: an expert config is a JSON object, got {show(cfg)}")
    unknown = sorted(set(cfg) - set(EXPERT_CFG_FIELDS))
    if unknown:
        raise DataError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))}; an expert config has "
                        f"{', '.join(map(repr, EXPERT_CFG_FIELDS))}")
    if not isinstance(cfg.get("experts"), dict):
        got = f", got {show(cfg['experts'])}" if "experts" in cfg else ""
        raise DataError(f"{path}: missing 'experts' mapping of layer -> [expert ids]{got}")
    experts: dict[int, list[int]] = {}
    for l, es in cfg["experts"].items():
        layer = index_key(path, "'experts': layer", l)
        if not isinstance(es, list):
            raise DataError(f"{path}: 'experts' layer {l}: must be a list of expert ids, got {show(es)}")
        for e in es:
            if type(e) is not int:  # not bool (a subclass of int), float or str
                raise DataError(f"{path}: 'experts' layer {l}: expert ids must be JSON integers, got {show(e)}")
            if e < 0:
                raise DataError(f"{path}: 'experts' layer {l}: expert id {e} is negative")
        if len(set(es)) != len(es):
            raise DataError(f"{path}: layer {l} lists an expert twice: {es}")
        experts[layer] = list(es)
    for name in ("shared_experts", "non_expert_modules"):
        if name in cfg and not isinstance(cfg[name], bool):
            raise DataError(f"{path}: {name!r} must be JSON true or false, got {show(cfg[name])}")
    if "selection" in cfg and not isinstance(cfg["selection"], dict):
        raise DataError(f"{path}: 'selection' must be a JSON object, got {show(cfg['selection'])}")
    return {**cfg, "experts": experts,
            "shared_experts": cfg.get("shared_experts", False),
            "non_expert_modules": cfg.get("non_expert_modules", False)}


# ---------------------------------------------------------------------------------------------------------
# strict JSON reading, shared with adapter/io.py (esft_adapter.json)

_INDEX = re.compile(r"0|[1-9][0-9]*")  # ASCII digits, no sign, no leading zero: "01" and "1" cannot both name layer 1


def load_json(path: str | os.PathLike, what: str):
    """Parse a JSON file; DataError naming the file if it is missing, malformed, or repeats a key in one object
    (json.load would silently keep the last one)."""
    def no_repeats(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise DataError(f"{path}: key {k!r} appears twice in one JSON object")
            out[k] = v
        return out

    try:
        with open(path) as f:
            return json.load(f, object_pairs_hook=no_repeats)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def index_key(path, where: str, key: str) -> int:
    """A layer or expert index written as a JSON object key: a decimal integer string such as "5"."""
    if not _INDEX.fullmatch(key):
        raise DataError(f"{path}: {where} keys must be decimal integers such as \"5\", got {key!r}")
    return int(key)


def is_number(v) -> bool:
    """A JSON number (int or float), not a boolean."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_JSON_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "an array"),
               (dict, "an object"))  # bool first: it is a subclass of int


def show(v) -> str:
    """A JSON value and its JSON type, for messages: '"false" (a string)'."""
    if v is None:
        return "null"
    kind = next((name for t, name in _JSON_KINDS if isinstance(v, t)), type(v).__name__)
    text = str(v) if isinstance(v, float) and not math.isfinite(v) else json.dumps(v)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({kind})"
