"""Metrics for the synthetic tasks, computed locally. Each returns a score in 0..100.

A reference may be a string or a list of acceptable strings (a row's ``answers`` field);
for per-example metrics a prediction is right if it matches any of them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, Sequence

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _refs(r) -> list[str]:
    return [str(x) for x in r] if isinstance(r, (list, tuple)) else [str(r)]


def normalize(s: str) -> str:
    """Strip and collapse runs of whitespace."""
    return " ".join(str(s).split())


def _per_example(match: Callable[[str, str], bool]):
    def metric(predictions: Sequence[str], references: Sequence) -> float:
        hits = sum(any(match(str(p), r) for r in _refs(ref)) for p, ref in zip(predictions, references))
        return 100.0 * hits / len(predictions)

    return metric


def exact_match(pred: str, ref: str) -> bool:
    return normalize(pred) == normalize(ref)


def parse_json_object(s: str):
    """The JSON object in ``s`` (whole string, else its outermost {...} span); None if unparsable."""
    s = str(s).strip()
    for cand in (s, s[s.find("{"): s.rfind("}") + 1] if "{" in s else ""):
        if not cand:
            continue
        try:
            obj = json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def intent_match(pred: str, ref: str) -> bool:
    """As in the ESFT paper: right only if the intent AND the whole slots dict are equal."""
    p, r = parse_json_object(pred), parse_json_object(ref)
    if p is None or r is None:
        return False
    return p.get("intent") == r.get("intent") and p.get("slots") == r.get("slots")


def json_match(pred: str, ref: str) -> bool:
    """The parsed prediction equals the parsed reference as a dict (key order ignored)."""
    p, r = parse_json_object(pred), parse_json_object(ref)
    return p is not None and p == r


def last_number(s: str) -> float | None:
    found = _NUM.findall(str(s))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(pred: str, ref: str, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """The last number in the prediction equals the reference's last number within tolerance."""
    p, r = last_number(pred), last_number(ref)
    return p is not None and r is not None and math.isclose(p, r, rel_tol=rel_tol, abs_tol=abs_tol)


def chrf(predictions: Sequence[str], references: Sequence) -> float:
    """Corpus chrF (sacrebleu defaults), 0..100; the first reference of each example is used."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the chrF metric needs sacrebleu (a core dependency): pip install sacrebleu==2.6.0") from e
    refs = [_refs(r)[0] for r in references]
    return float(CHRF().corpus_score([str(p) for p in predictions], [refs]).score)


METRICS: dict[str, Callable[[Sequence[str], Sequence], float]] = {
    "exact_match": _per_example(exact_match),
    "intent_json": _per_example(intent_match),
    "json_match": _per_example(json_match),
    "numeric": _per_example(numeric_match),
    "chrf": chrf,
}
