"""The serving engine without HTTP: continuous batching against greedy generate(), fairness, slots, text streams."""

import pytest

from esft.embedded import embedded_model_dir
from esft.eval.generate import PromptFormat
from esft.models.loading import load_model
from esft.serving.engine import Engine, GenParams, Limits
from esft.serving.textstream import TextStream

QUESTIONS = ["What is 12 plus 7?", "Reverse the list [1, 2, 3].", "Translate: the red house",
             "Sort the list [9, 4, 7, 1]."]


@pytest.fixture(scope="module")
def base():
    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    return model.eval(), tok


def _collect(req, timeout=120):
    events = []
    while not events or events[-1][0] not in ("done", "error"):
        events.append(req.events.get(timeout=timeout))
    return events


def _answer(events):
    assert events[-1][0] == "done", events[-1]
    return "".join(e[1] for e in events if e[0] == "text")


def test_a_short_request_finishes_in_its_own_decode_time_while_long_ones_run(base):
    model, tok = base
    prompt = PromptFormat().encode(tok, QUESTIONS[0])
    steps = {}
    for scheduler in ("continuous", "static"):
        engine = Engine(model, tok, None, max_batch=4, scheduler=scheduler)
        try:
            longs = [engine.submit(None, prompt, GenParams(max_tokens=60, ignore_eos=True)) for _ in range(2)]
            for r in longs:  # both long ones are decoding
                assert r.events.get(timeout=60)[0] == "text"
            short = engine.submit(None, prompt, GenParams(max_tokens=6, ignore_eos=True))
            events = _collect(short)
            assert events[-1] == ("done", "length", 6)
            steps[scheduler] = short.finished_step - short.submitted_step
            if scheduler == "continuous":
                assert all(r.finished_step == -1 for r in longs)  # still decoding when the short one ended
            for r in longs:
                assert _collect(r)[-1] == ("done", "length", 60)
        finally:
            engine.close()
    # continuous: admitted at the next step, then 6 tokens (the first from its prefill step)
    assert steps["continuous"] <= 6 + 1, steps
    # static: it waited for the long batch to finish first
    assert steps["static"] >= 50, steps


def test_a_timed_out_or_cancelled_request_frees_its_slot_and_the_rest_go_on(base):
    model, tok = base
    prompt = PromptFormat().encode(tok, QUESTIONS[1])
    engine = Engine(model, tok, None, max_batch=2, limits=Limits(timeout_s=0.3))
    try:
        slow = engine.submit(None, prompt, GenParams(max_tokens=400, ignore_eos=True))
        gone = engine.submit(None, prompt, GenParams(max_tokens=400, ignore_eos=True))
        assert gone.events.get(timeout=60)[0] == "text"
        gone.cancelled = True
        assert _collect(gone)[-1] == ("done", "cancelled", 0)
        ok = engine.submit(None, prompt, GenParams(max_tokens=3, ignore_eos=True))  # takes the freed slot
        assert _collect(ok)[-1] == ("done", "length", 3)
        last = _collect(slow)[-1]
        assert last[0] == "error" and last[2] == 504 and "timed out" in last[1]
        assert engine.running() == 0 and engine.queue_length() == 0
    finally:
        engine.close()


def test_limits_are_enforced_at_submit(base):
    from esft.serving.engine import QueueFull, RequestError

    model, tok = base
    engine = Engine(model, tok, None, max_batch=1, limits=Limits(max_tokens=50, max_prompt_tokens=20, max_queue=1))
    try:
        with pytest.raises(RequestError, match="above this server's cap of 50 tokens"):
            engine.submit(None, [1, 2, 3], GenParams(max_tokens=51))
        with pytest.raises(RequestError, match="at most 20"):
            engine.submit(None, list(range(3, 24)), GenParams(max_tokens=5))
        with engine.exclusive():  # the worker is held: the first request stays queued
            engine.submit(None, [0, 5, 6], GenParams(max_tokens=2))
            with pytest.raises(QueueFull, match="1 requests are waiting") as e:
                engine.submit(None, [0, 5, 6], GenParams(max_tokens=2))
            assert 1 <= e.value.retry_after <= 60
    finally:
        engine.close()
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Limits(prefill_chunk=0).check()


# ---------------------------------------------------------------- text streams

class _CountingTok:
    """The shipped tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_incremental_detokenisation_equals_one_decode_and_reads_a_bounded_window(base):
    _, tok = base
    text = "Ünïcödé text: 日本語 and emoji 🙂, then plain words " * 30
    ids = tok.encode(text, add_special_tokens=False)
    counting = _CountingTok(tok)
    s = TextStream(counting)
    out = "".join(s.add(t)[0] for t in ids) + s.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 300 and max(counting.sizes) <= 8  # never the whole text: linear in its length


def test_a_stop_string_spanning_tokens_is_cut_and_never_sent(base):
    _, tok = base
    text = "The answer is forty two, said the oracle."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    # a stop string that begins in one token's text and ends in a later one's
    k = next(i for i in range(1, len(ids)) if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i - 1]) >= 2)
    stop = pieces[k - 1][-2:] + pieces[k][len(pieces[k - 1]):][:2]
    assert stop in text and not any(stop in tok.decode([t]) for t in ids)
    s = TextStream(tok, ["zzz", stop])
    sent, stopped = [], False
    for t in ids:
        piece, stopped = s.add(t)
        sent.append(piece)
        if stopped:
            break
    assert stopped and "".join(sent) == text[: text.index(stop)]
    assert not any(stop in "".join(sent[: i + 1]) for i in range(len(sent)))
