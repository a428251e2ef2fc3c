"""General domains: the pretraining mix and the "general ability" held-out check."""

from __future__ import annotations

import random

from .base import register

# --- prose: a tiny grammar, rewritten into the past tense -----------------------------
ADJS = ["old", "small", "red", "quiet", "happy", "tall", "green", "lazy", "brave", "tiny", "young", "dark"]
NOUNS = ["dog", "cat", "girl", "boy", "farmer", "bird", "teacher", "fox", "child", "sailor", "baker", "horse"]
THINGS = ["ball", "box", "letter", "apple", "kite", "book", "hat", "lamp", "boat", "cup"]
PLACES = ["river", "garden", "school", "market", "bridge", "forest", "house", "station", "hill"]
PREPS = ["near", "behind", "under", "beside", "in"]
VERBS = {  # present -> past
    "sees": "saw", "finds": "found", "carries": "carried", "takes": "took", "paints": "painted",
    "drops": "dropped", "holds": "held", "buys": "bought", "throws": "threw", "hides": "hid",
}


def _np(rng: random.Random, nouns) -> str:
    det = rng.choice(["the", "a"])
    return f"{det} {rng.choice(ADJS)} {rng.choice(nouns)}" if rng.random() < 0.6 else f"{det} {rng.choice(nouns)}"


@register("prose_past_tense", "general", "exact_match",
          "Rewrite a grammar-generated English sentence in the past tense.")
def prose_past_tense(rng: random.Random):
    verb = rng.choice(sorted(VERBS))
    tail = f" {rng.choice(PREPS)} the {rng.choice(PLACES)}" if rng.random() < 0.7 else ""
    subj, obj = _np(rng, NOUNS), _np(rng, THINGS)
    return (f"Rewrite in the past tense: {subj} {verb} {obj}{tail}.",
            f"{subj} {VERBS[verb]} {obj}{tail}.")


# --- python code ----------------------------------------------------------------------
FUNC_NAMES = ["f", "g", "step", "shift", "scale", "bump", "calc", "apply"]
ARGS = ["x", "n", "value", "num"]
CODE_OPS = [("adds {k} to its argument", "+"), ("subtracts {k} from its argument", "-"),
            ("multiplies its argument by {k}", "*")]


@register("python_code", "general", "exact_match",
          "Write a one-line Python function that applies a constant to its argument.")
def python_code(rng: random.Random):
    name, arg = rng.choice(FUNC_NAMES), rng.choice(ARGS)
    words, op = rng.choice(CODE_OPS)
    k = rng.randint(1, 99)
    return (f"Write a Python function {name}({arg}) that {words.format(k=k)}.",
            f"def {name}({arg}):\n    return {arg} {op} {k}")


# --- arithmetic -----------------------------------------------------------------------
ARITH = [("+", lambda a, b: a + b, 999), ("-", lambda a, b: a - b, 999), ("*", lambda a, b: a * b, 99)]


@register("arithmetic", "general", "numeric", "One addition, subtraction or small multiplication.")
def arithmetic(rng: random.Random):
    sym, fn, hi = rng.choice(ARITH)
    a, b = rng.randint(0, hi), rng.randint(0, hi if sym != "*" else 12)
    return f"What is {a} {sym} {b}?", str(fn(a, b))


# --- list manipulation ----------------------------------------------------------------
LIST_OPS = [
    ("Sort the list in ascending order: {l}", lambda xs: str(sorted(xs))),
    ("Sort the list in descending order: {l}", lambda xs: str(sorted(xs, reverse=True))),
    ("Reverse the list: {l}", lambda xs: str(xs[::-1])),
    ("What is the largest number in {l}?", lambda xs: str(max(xs))),
    ("What is the smallest number in {l}?", lambda xs: str(min(xs))),
    ("How many items are in the list {l}?", lambda xs: str(len(xs))),
]


@register("list_ops", "general", "exact_match", "Sort, reverse, max, min or length of a short list.")
def list_ops(rng: random.Random):
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    template, fn = rng.choice(LIST_OPS)
    return template.format(l=str(xs)), fn(xs)


# --- key-value recall -----------------------------------------------------------------
KEYS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "candle", "mirror",
        "forest", "violet", "copper", "saddle", "harbor", "meadow"]


@register("kv_recall", "general", "exact_match", "Recall the value of one key from a list of pairs.")
def kv_recall(rng: random.Random):
    keys = rng.sample(KEYS, rng.randint(3, 6))
    vals = [rng.randint(0, 999) for _ in keys]
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, vals))
    i = rng.randrange(len(keys))
    return f"Remember: {pairs}. What is {keys[i]}?", str(vals[i])


# --- unit and day-of-week conversion --------------------------------------------------
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "ml", 1000)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _units(rng: random.Random):
    big, small, f = rng.choice(UNITS)
    v = rng.randint(1, 999)
    return f"Convert {v} {big} to {small}.", str(v * f)


def _weekday(rng: random.Random):
    d, k = rng.randrange(7), rng.randint(1, 100)
    return f"If today is {DAYS[d]}, what day is it in {k} days?", DAYS[(d + k) % 7]


@register("conversion", "general", "exact_match", "Unit conversion or day-of-week arithmetic.")
def conversion(rng: random.Random):
    return (_units if rng.random() < 0.7 else _weekday)(rng)
