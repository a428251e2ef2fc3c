"""Adaptation tasks (ESFT targets), weakly or not covered by the general domains."""

from __future__ import annotations

import json
import random

from .base import register

# --- intent + slot extraction into JSON -----------------------------------------------
TIMES = [f"{h}{m} {ap}" for h in range(1, 13) for m in ("", ":15", ":30", ":45") for ap in ("am", "pm")]
TIMES += ["noon", "midnight"]
DATES = ["today", "tonight", "tomorrow", "this weekend", "next week", "the day after tomorrow"]
DATES += [f"on {d}" for d in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")]
CITIES = ["paris", "london", "tokyo", "boston", "madrid", "cairo", "oslo", "lima", "berlin", "sydney",
          "toronto", "nairobi", "seoul", "dublin", "rome", "denver"]
ARTISTS = ["adele", "the beatles", "miles davis", "taylor swift", "queen", "bach"]
GENRES = ["jazz", "rock", "classical", "pop", "reggae"]
ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "office", "garage", "hallway", "basement"]
PEOPLE = ["anna", "john", "my boss", "mom", "david", "sara", "the landlord", "peter", "grace", "the team"]
EVENTS = ["call the bank", "buy milk", "pay rent", "water the plants", "book a dentist visit"]

# (intent, template, {slot name in output: value pool}); slots missing from a template are absent
INTENT_TEMPLATES = [
    ("alarm_set", "set an alarm for {time} {date}", {"time": TIMES, "date": DATES}),
    ("alarm_set", "wake me up at {time}", {"time": TIMES}),
    ("weather_query", "what is the weather in {place_name} {date}", {"place_name": CITIES, "date": DATES}),
    ("weather_query", "will it rain in {place_name}", {"place_name": CITIES}),
    ("play_music", "play some {music_genre} by {artist_name}", {"music_genre": GENRES, "artist_name": ARTISTS}),
    ("play_music", "put on {artist_name}", {"artist_name": ARTISTS}),
    ("play_music", "play {music_genre} music in the {house_place}", {"music_genre": GENRES, "house_place": ROOMS}),
    ("calendar_set", "remind me to {event_name} {date} at {time}",
     {"event_name": EVENTS, "date": DATES, "time": TIMES}),
    ("transport_taxi", "book a taxi to {place_name} at {time}", {"place_name": CITIES, "time": TIMES}),
    ("iot_lights_off", "turn off the lights in the {house_place}", {"house_place": ROOMS}),
    ("iot_lights_off", "switch off the {house_place} lights at {time}", {"house_place": ROOMS, "time": TIMES}),
    ("email_send", "send an email to {person} {date}", {"person": PEOPLE, "date": DATES}),
]


def intent_answer(intent: str, slots: dict) -> str:
    return json.dumps({"intent": intent, "slots": dict(sorted(slots.items()))}, separators=(",", ":"))


@register("intent_json", "adaptation", "intent_json",
          "Extract the intent and slots of an assistant command as JSON.")
def intent_json(rng: random.Random):
    intent, template, pools = rng.choice(INTENT_TEMPLATES)
    slots = {k: rng.choice(v) for k, v in pools.items()}
    prefix = rng.choice(["", "please ", "hey, ", "could you ", "i need you to "])
    return f"Extract intent and slots as JSON: {prefix}{template.format(**slots)}", intent_answer(intent, slots)


# --- translation into a synthetic language --------------------------------------------
LANG = "Veltish"
T_NOUNS = ["man", "woman", "dog", "cat", "king", "child", "bird", "fish", "tree", "house", "river", "horse",
           "ship", "stone", "friend", "wolf"]
T_ADJS = ["big", "small", "red", "old", "new", "good", "bad", "fast", "cold", "white", "black", "wise"]
T_VERBS = ["sees", "likes", "eats", "finds", "follows", "helps", "builds", "hears", "needs", "wants"]
T_DETS = ["the", "a", "this"]


def _make_lexicon(seed: int = 7919) -> dict[str, str]:
    """A fixed English -> Veltish word map (same on every machine: seeded stdlib Random)."""
    rng = random.Random(seed)
    cons, vows = "ptkmnlrsvzd", "aeiou"
    lex: dict[str, str] = {}
    used: set[str] = set()
    for w in sorted(set(T_NOUNS + T_ADJS + T_VERBS + T_DETS)):
        while True:
            n = 1 if w in T_DETS else rng.choice([2, 2, 3])
            cand = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(n))
            if cand not in used:
                break
        used.add(cand)
        lex[w] = cand
    return lex


LEXICON = _make_lexicon()


def _t_np(rng: random.Random):
    adj = rng.choice(T_ADJS) if rng.random() < 0.6 else None
    return rng.choice(T_DETS), adj, rng.choice(T_NOUNS)


def _en(np_) -> str:
    det, adj, noun = np_
    return " ".join(w for w in (det, adj, noun) if w)


def _velt(np_) -> str:  # noun, then adjective, then determiner
    det, adj, noun = np_
    return " ".join(LEXICON[w] for w in (noun, adj, det) if w)


@register("translate_synth", "adaptation", "chrf",
          f"Translate an English sentence into {LANG}: own lexicon, SOV order, adjective after noun.")
def translate_synth(rng: random.Random):
    subj, obj, verb = _t_np(rng), _t_np(rng), rng.choice(T_VERBS)
    return (f"Translate to {LANG}: {_en(subj)} {verb} {_en(obj)}.",
            f"{_velt(subj)} {_velt(obj)} {LEXICON[verb]}.")


# --- multi-step arithmetic word problems ----------------------------------------------
NAMES = [("Tom", "he"), ("Mia", "she"), ("Ravi", "he"), ("Lena", "she"), ("Omar", "he"), ("Yuki", "she")]
ITEMS = ["apple", "marble", "pencil", "card", "cookie", "sticker", "shell", "coin"]


def _wp_buy(rng):
    (name, pr), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 12)
    d = rng.randint(1, a + b * c)
    return (f"{name} has {a} {item}s. {pr.capitalize()} buys {b} bags with {c} {item}s each and gives away {d}. "
            f"How many {item}s does {pr} have now?", a + b * c - d)


def _wp_shop(rng):
    item = rng.choice(ITEMS)
    b, c, d = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 50)
    a = rng.randint(b + c, b + c + 100)
    return (f"A shop has {a} {item}s. It sells {b} in the morning and {c} in the afternoon, then receives {d} more. "
            f"How many {item}s does it have now?", a - b - c + d)


def _wp_pages(rng):
    name, _ = rng.choice(NAMES)
    a, b, c = rng.randint(3, 40), rng.randint(2, 14), rng.randint(1, 60)
    return (f"{name} reads {a} pages a day for {b} days, then reads {c} more pages. "
            f"How many pages does {name} read in total?", a * b + c)


def _wp_share(rng):
    item = rng.choice(ITEMS)
    n, k = rng.randint(2, 9), rng.randint(2, 15)
    e = rng.randint(1, k)
    return (f"{n} friends share {n * k} {item}s equally, and each friend then loses {e}. "
            f"How many {item}s does each friend have left?", k - e)


def _wp_change(rng):
    name, pr = rng.choice(NAMES)
    p, q = rng.randint(2, 25), rng.randint(2, 8)
    m = (p * q // 10 + rng.randint(1, 10)) * 10
    return (f"A ticket costs {p} dollars. {name} buys {q} tickets and pays with {m} dollars. "
            f"How much change does {pr} get?", m - p * q)


WORD_PROBLEMS = [_wp_buy, _wp_shop, _wp_pages, _wp_share, _wp_change]


@register("word_problems", "adaptation", "numeric", "Two- or three-step arithmetic word problems; answer a number.")
def word_problems(rng: random.Random):
    prompt, answer = rng.choice(WORD_PROBLEMS)(rng)
    return prompt, str(answer)


# --- structured verdict from a case description ---------------------------------------
# offence -> (article, description templates); theft above 1000 dollars falls under article 13
OFFENCES = {
    "theft": (12, ["took a {thing} worth {v} dollars from a shop without paying",
                   "stole a {thing} worth {v} dollars from a neighbor"]),
    "fraud": (15, ["forged a receipt for a {thing} worth {v} dollars",
                   "sold a fake {thing} for {v} dollars to a customer"]),
    "assault": (21, ["hit a stranger during an argument about a {thing}",
                     "pushed a guard who asked about a {thing}"]),
    "trespass": (7, ["entered a closed factory at night to look for a {thing}",
                     "climbed into a private garden to fetch a {thing}"]),
    "vandalism": (9, ["broke the windows of a bus stop and damaged a {thing}",
                      "painted over a public {thing} worth {v} dollars"]),
}
CASE_THINGS = ["bicycle", "phone", "watch", "painting", "laptop", "statue", "camera"]
DEFENDANTS = ["Mr. Hale", "Ms. Ortiz", "Mr. Chen", "Ms. Novak", "Mr. Adeyemi", "Ms. Berg"]
STRONG = ["a witness saw it", "a camera recorded it", "the defendant confessed", "fingerprints were found"]
WEAK = ["no witness came forward", "the defendant had a confirmed alibi", "the only evidence was a rumor"]


@register("verdict_json", "adaptation", "json_match",
          "Give a JSON verdict and article number for a templated case description.")
def verdict_json(rng: random.Random):
    offence = rng.choice(sorted(OFFENCES))
    article, templates = OFFENCES[offence]
    v = rng.choice([50, 120, 300, 800, 1500, 2500, 4000])
    desc = rng.choice(templates).format(thing=rng.choice(CASE_THINGS), v=v)
    if offence == "theft" and v > 1000:
        article = 13
    strong = rng.random() < 0.6
    evidence = rng.choice(STRONG if strong else WEAK)
    prompt = f"Case: {rng.choice(DEFENDANTS)} {desc}. Evidence: {evidence}. Give the verdict as JSON."
    return prompt, json.dumps({"verdict": "guilty" if strong else "not guilty", "article": article},
                              separators=(",", ":"))
