"""The comparison as data: which variants exist, and the list of runs a report needs.

A *variant* is a row of the paper's tables (FFT, LoRA, ESFT-Token, a random-experts control,
...). A *run* is one variant trained on one task with one seed and one learning rate. Runs
are keyed by everything that changes their result, so a run needed by two tables (the LR
sweep's winner on seed 0 is also the main table's seed 0) is trained once, and a rerun of the
report skips every run whose result is already on disk.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # TrainConfig.method: esft | full | lora | esft-lora
    lr_of: str  # which learning rate it uses: esft | full | lora | esft_lora
    score_function: str | None = None  # esft variants: token | gate
    top_p: float | None = None
    random: bool = False  # same per-layer counts as the scored selection, experts drawn at random (Table 4)
    shared: bool = False  # also train the shared experts (Table 3)
    non_expert: bool = False  # also train attention, norms, embeddings, routers, head (Table 3)
    rank: int | None = None  # LoRA rank (lora, esft-lora; alpha = 2 x rank); None: TrainConfig's 8 (alpha 16)
    router_stage: bool = False  # experts scored after the router-first stage (Router Lens / CEFT)


MAIN = [
    Variant("FFT", "full", "full"),
    Variant("LoRA", "lora", "lora"),
    Variant("ESFT-Token", "esft", "esft", "token", 0.2),
    Variant("ESFT-Gate", "esft", "esft", "gate", 0.1),
]
ABLATIONS = [
    Variant("Random (Token counts)", "esft", "esft", "token", 0.2, random=True),
    Variant("Random (Gate counts)", "esft", "esft", "gate", 0.1, random=True),
    Variant("ESFT-Token + shared", "esft", "esft", "token", 0.2, shared=True),
    Variant("ESFT-Token + non-expert", "esft", "esft", "token", 0.2, non_expert=True),
]
SWEPT = {"esft": "ESFT-Token", "full": "FFT", "lora": "LoRA"}  # the variant each LR family is swept on

# Front methods: each is trained at every LR of its own grid (seed 0), then with more seeds at the LRs on its
# front, and gets a row in the matched-forgetting headline. An id names the method in `methods=[...]`, in the
# report's state (lr, sweep, frontier_lrs) and nowhere in a run's key, which is built from the variant's name:
# the paper's three keep their ids (= their LR families) and variant names, so their ledger entries stay valid.
DEFAULT_METHODS = ["full", "lora", "esft"]
EXTENDED_METHODS = ["full", "lora", "lora-r2", "lora-r1", "esft", "esft-shared", "esft-router", "esft-lora-r8",
                    "esft-lora-r32", "esft-lora-r8-p0.5"]
ROUTER_FIRST = Variant("ESFT-Token (router-first)", "esft", "esft", "token", 0.2, router_stage=True)
_RANKED = re.compile(r"(esft-lora|lora)-r([1-9][0-9]*)(?:-p([0-9.]+))?")  # -p: ESFT-LoRA on ESFT-Token's top p
_RANKED_NAME = re.compile(r"(ESFT-LoRA|LoRA) r=([1-9][0-9]*)(?: p=([0-9.]+))?")
GRIDS = {"esft": "sweep_esft", "full": "sweep_full", "lora": "sweep_lora", "esft_lora": "sweep_esft_lora"}


def _ranked_variant(kind: str, rank: int, p: str | None = None) -> Variant:
    """LoRA r=N, or ESFT-LoRA r=N on ESFT-Token's selection at p (default 0.2, unnamed: the ledger's keys)."""
    if kind == "lora":
        if p is not None:
            raise ValueError(f"lora-r{rank}-p{p}: a p applies to esft-lora only (LoRA adapts every expert)")
        return Variant(f"LoRA r={rank}", "lora", "lora", rank=rank)
    top_p = 0.2
    if p is not None:
        try:
            top_p = float(p)
        except ValueError:
            top_p = -1.0
        if not 0 < top_p <= 1:
            raise ValueError(f"esft-lora-r{rank}-p{p}: p must be a number in (0, 1], e.g. esft-lora-r8-p0.5")
    return Variant(f"ESFT-LoRA r={rank}" + ("" if top_p == 0.2 else f" p={top_p:g}"), "esft-lora", "esft_lora",
                   "token", top_p, rank=rank)


def canonical_method(mid: str) -> str:
    """A front method's id as the report keeps it: 'lora-r8' is the paper's LoRA baseline, 'lora'."""
    return "lora" if mid == "lora-r8" else mid


def front_variant(mid: str) -> Variant:
    """The variant a front method trains. Ids: full, lora (r=8), esft (ESFT-Token), esft-shared (+ shared
    experts), esft-router (router-first selection), lora-r<N>, esft-lora-r<N>, esft-lora-r<N>-p<P>."""
    mid = canonical_method(mid)
    fixed = {"full": MAIN[0], "lora": MAIN[1], "esft": MAIN[2], "esft-shared": ABLATIONS[2], "esft-router": ROUTER_FIRST}
    if mid in fixed:
        return fixed[mid]
    m = _RANKED.fullmatch(mid) if isinstance(mid, str) else None
    if m:
        return _ranked_variant(m.group(1), int(m.group(2)), m.group(3))
    raise ValueError(f"unknown report method {mid!r}; known: full, lora, esft, esft-shared, esft-router, lora-r<N> "
                     "(LoRA of rank N), esft-lora-r<N> (LoRA of rank N on ESFT-Token's experts), esft-lora-r<N>-p<P> "
                     "(on ESFT-Token's experts at top_p P), e.g. "
                     + ", ".join(EXTENDED_METHODS))


def method_grid(mid: str) -> str:
    """The LR grid family of a front method: esft, full, lora or esft_lora (ReportConfig's ``GRIDS[family]``)."""
    return front_variant(mid).lr_of


def p_variant(p: float) -> Variant:
    return Variant(f"ESFT-Token p={p:g}", "esft", "esft", "token", p)


def variant_by_name(name: str, p_values: list[float] = ()) -> Variant:
    for v in MAIN + ABLATIONS + [ROUTER_FIRST] + [p_variant(p) for p in p_values]:
        if v.name == name:
            return v
    m = _RANKED_NAME.fullmatch(name)
    if m:
        return _ranked_variant("lora" if m.group(1) == "LoRA" else "esft-lora", int(m.group(2)), m.group(3))
    raise KeyError(name)


@dataclass(frozen=True)
class Run:
    task: str
    variant: str
    lr: float
    seed: int

    @property
    def slug(self) -> str:
        """The variant's name as a file name: 'ESFT-Token + shared' -> 'ESFT-Token_plus_shared'."""
        s = self.variant.replace(" + ", "_plus_").replace(" ", "_").replace("=", "")
        return s.replace("(", "").replace(")", "")

    @property
    def key(self) -> str:
        return f"{self.task}/{self.slug}/lr{self.lr:g}/seed{self.seed}"

    def as_dict(self) -> dict:
        return {**asdict(self), "key": self.key}


def sweep_runs(tasks: list[str], lrs: dict[str, list[float]]) -> list[Run]:
    """Seed 0 of each front method (``lrs``: method id -> its grid; the paper's three ids are their LR
    families), at each candidate LR, on every task."""
    return [Run(t, front_variant(m).name, lr, 0) for m, grid in lrs.items() for lr in grid for t in tasks]


def frontier_seed_runs(support: dict[tuple[str, str], list[float]], seeds: int) -> list[Run]:
    """Seeds 1.. of each front method at the LRs on its frontier per task (``support``: (method id, task) ->
    LRs, from seed 0's grid); seed 0 is already in the grid."""
    return [Run(t, front_variant(m).name, lr, s) for (m, t), lrs in support.items() for lr in lrs
            for s in range(1, seeds)]


def report_runs(tasks: list[str], seeds: int, lr: dict[str, float], ablations: bool,
                p_values: list[float]) -> list[Run]:
    """Every run of the report after the learning rates are fixed (``lr``: family -> LR)."""
    variants = MAIN + (ABLATIONS if ablations else [])
    runs = [Run(t, v.name, lr[v.lr_of], s) for v in variants for t in tasks for s in range(seeds)]
    runs += [Run(t, p_variant(p).name, lr["esft"], 0) for p in p_values for t in tasks]
    return runs


def choose_lr(valid_loss: dict[float, dict[str, float]]) -> tuple[float, dict[float, float]]:
    """Pick one LR per method from ``{lr: {task: best validation loss}}``.

    Tasks' losses are on different scales, so each LR is scored by its mean over tasks of
    ``loss / best loss of any LR on that task`` (1.0 = best on every task); lowest wins.
    Runs whose loss is missing or not finite count as infinitely bad.
    """
    import math

    tasks = sorted({t for row in valid_loss.values() for t in row})
    best = {t: min((row.get(t, math.inf) for row in valid_loss.values()), default=math.inf) for t in tasks}
    rel = {}
    for lr, row in valid_loss.items():
        vals = [row.get(t) for t in tasks]
        rel[lr] = (sum((v / best[t]) if v is not None and math.isfinite(v) and best[t] > 0 else math.inf
                       for v, t in zip(vals, tasks)) / len(tasks)) if tasks else math.inf
    return min(rel, key=lambda k: (rel[k], k)), rel
