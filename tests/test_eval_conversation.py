"""esft eval prompts with the whole conversation (system message, earlier turns), rendered as training renders it."""

import copy
import json

import pytest

from esft.data.conversations import IGNORE, encode_reference, load_examples
from esft.eval.generate import PromptFormat, encode_prompts
from esft.eval.run import EvalConfig, read_eval_rows, run_eval
from esft.models.loading import load_model

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")

S, U, A = "system", "user", "assistant"


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


# conversations of different shapes; the reference is always the last assistant turn
CONVERSATIONS = [
    [msg(S, "Answer in lower case."), msg(U, "Reverse: red cat"), msg(A, "cat red"), msg(U, "Reverse: one two"),
     msg(A, "two one")],
    [msg(U, "Count: a b"), msg(A, "2", mask=1), msg(S, "Be brief."), msg(U, "Count: a b c"), msg(A, "3")],
    [msg(S, "First rule."), msg(S, "Second rule."), msg(U, "Reverse: sun"), msg(A, "sun")],
    [msg(U, "Reverse: up down"), msg(S, "Reply now."), msg(A, "down up")],  # a system message right before it
    [msg(U, "Reverse: a b"), msg(A, "b a"), msg(U, "Reverse: c d"), msg(A, "d c"), msg(U, "Reverse: e f"),
     msg(A, "f e"), msg(U, "and the last?")],  # a trailing user turn has no answer: the reference is "f e"
]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir / "model")


def answer_start(labels):
    """Where training's last learnt span (the last assistant answer) begins, from its labels alone."""
    i = len(labels)
    while i > 0 and labels[i - 1] != IGNORE:
        i -= 1
    return i


def training_prefixes(path, tok, template):
    """Training's ids (load_examples, the code path `esft train` uses) up to where the last answer starts."""
    return [ex.input_ids[:answer_start(ex.labels)] for ex in load_examples(str(path), tok, template)]


def write(path, rows):
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("template", ["reference", "chat"])
def test_eval_prompt_ids_equal_trainings_ids_up_to_the_last_answer(tiny, tmp_path, template, monkeypatch):
    model, tok = tiny
    trained = copy.deepcopy(tok)
    if template == "chat":
        trained.chat_template = CHAT_TEMPLATE  # what training renders with: the tokenizer's template
    train_rows = [c[:max(i for i, m in enumerate(c) if m["role"] == A) + 1] for c in CONVERSATIONS]
    want = training_prefixes(write(tmp_path / "train.jsonl", train_rows), trained, template)

    data = write(tmp_path / "eval.jsonl", CONVERSATIONS)
    convs, refs, _ = read_eval_rows(str(data))
    assert refs == [["two one"], ["3"], ["sun"], ["down up"], ["f e"]]
    fmt = PromptFormat(template, CHAT_TEMPLATE if template == "chat" else None)
    assert encode_prompts(tok, convs, fmt).ids == want

    # what the model actually receives in run_eval: the same ids (left padding removed)
    seen = []
    generate = model.generate

    def spy(input_ids, attention_mask, **kw):
        seen.extend([t for t, a in zip(r, m) if a] for r, m in zip(input_ids.tolist(), attention_mask.tolist()))
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(model, "generate", spy)
    s = run_eval(EvalConfig(data=str(data), template=template, max_new_tokens=3, batch_size=2,
                            out=str(tmp_path / "o")), model=model, tokenizer=trained)
    assert seen == want and s["n"] == 5 and s["template"] == template

    # the system message and earlier turns are in the prompt: more than the last user turn alone
    assert want[0] != fmt.encode(tok, "Reverse: one two") and len(want[0]) > len(fmt.encode(tok, "Reverse: one two"))
    assert "Answer in lower case." in tok.decode(want[0])
    rows = [json.loads(l) for l in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "Reverse: one two" and rows[0]["messages"][0] == msg(S, "Answer in lower case.")
    assert rows[3]["prompt"] == "Reverse: up down"  # the last user turn, though a system message follows it


def test_a_one_turn_prompt_has_no_messages_column_and_prompts_as_before(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "d1.jsonl").write_text(json.dumps({"prompt": "Reverse: red cat", "answers": ["x"]}) + "\n")
    (tmp_path / "d2.jsonl").write_text(json.dumps({"messages": [msg(U, "Reverse: sun"), msg(A, "sun")],
                                                   "answers": ["sun", "Sun"]}) + "\n")
    data = tmp_path / "d*.jsonl"  # a glob: one file per layout
    convs, refs, _ = read_eval_rows(str(data))
    assert refs == [["x"], ["sun", "Sun"]]  # a row's "answers" stands in for its last assistant turn
    assert encode_prompts(tok, convs).ids == [encode_reference([msg(U, "Reverse: red cat")], tok)[0],
                                             encode_reference([msg(U, "Reverse: sun")], tok)[0]]
    run_eval(EvalConfig(data=str(data), max_new_tokens=2, out=str(tmp_path / "o")), model=model, tokenizer=tok)
    rows = [json.loads(l) for l in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert all("messages" not in r for r in rows)


def test_suite_tasks_still_prompt_with_their_user_turn(tiny):
    from esft.eval.generate import generate
    from esft.tasks import generate_split

    model, tok = tiny
    s = run_eval(EvalConfig(task="translate_synth", n=2, max_new_tokens=3), model=model, tokenizer=tok)
    prompts = [p for p, _ in generate_split("translate_synth", "eval", 2, 0)]
    assert s["n"] == 2 and s["metric"] == "chrf"
    assert generate(model, tok, prompts, max_new_tokens=3)  # the same single-turn prompts as always


def test_rows_without_a_question_or_answer_name_the_line(tmp_path):
    from esft.io import DataError

    p = tmp_path / "e.jsonl"
    for rows, match in (([msg(U, "q")], "e.jsonl:1: conversation has no assistant turn"),
                        ([msg(S, "s"), msg(A, "a")], "e.jsonl:1: needs a user turn before the last assistant"),
                        ([msg("bot", "x"), msg(U, "q"), msg(A, "a")], "e.jsonl:1: field 'messages\\[0\\].role': unknown role 'bot'")):
        write(p, [rows])
        with pytest.raises(DataError, match=match):
            read_eval_rows(str(p))
    p.write_text(json.dumps({"messages": [msg(U, "q"), msg(A, "a")], "answers": "a"}) + "\n")
    with pytest.raises(DataError, match="e.jsonl:1: field 'answers': expected a non-empty list"):
        read_eval_rows(str(p))


# ---------------------------------------------------------------- over-long conversations

@pytest.fixture(scope="module")
def shipped_tok():
    from transformers import AutoTokenizer

    from esft.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


def test_truncating_a_conversation_drops_the_oldest_turns_first_and_keeps_the_system_message(shipped_tok):
    tok = shipped_tok
    long_turn = "Summarize: " + " ".join(["blue fish green tree"] * 150)  # ~ 600 tokens
    conv = [msg(S, "Be terse."), msg(U, long_turn), msg(A, "a summary"), msg(U, "Reverse: one two"),
            msg(A, "two one"), msg(U, "Reverse: red cat")]
    enc = encode_prompts(tok, [conv], context=300, max_new_tokens=8, overlong="truncate")
    assert enc.overlong == [0] and enc.lengths[0] > 300
    # the long first exchange went; the system message, the later exchange and the question stayed, untouched
    assert enc.ids[0] == encode_reference([conv[0], *conv[3:]], tok)[0]

    # when the last user turn alone is too long: its start goes, the system message and template ends stay
    conv = [msg(S, "Be terse."), msg(U, "Reverse: a b"), msg(A, "b a"), msg(U, long_turn)]
    enc = encode_prompts(tok, [conv], context=300, max_new_tokens=8, overlong="truncate")
    ids = enc.ids[0]
    head = [tok.bos_token_id] + tok.encode("User: Be terse.\n", add_special_tokens=False)
    tail = tok.encode("\n\nAssistant:", add_special_tokens=False)
    body = tok.encode(long_turn, add_special_tokens=False)
    assert len(ids) == 292 and ids[:len(head)] == head and ids[-len(tail):] == tail
    assert ids[len(head):-len(tail)] == body[-(292 - len(head) - len(tail)):]

    with pytest.raises(ValueError, match="leaves no room for the user text of example 0 next to its template "
                                         "and system message"):
        encode_prompts(tok, [[msg(S, long_turn), msg(U, "q")]], context=300, max_new_tokens=8, overlong="truncate")


def test_truncating_a_chat_conversation_keeps_whole_exchanges(tiny):
    _, tok = tiny
    fmt = PromptFormat("chat", CHAT_TEMPLATE)
    conv = [msg(S, "sys"), msg(U, "word " * 80), msg(A, "x"), msg(U, "Reverse: red cat")]
    enc = encode_prompts(tok, [conv], fmt, context=64, max_new_tokens=4, overlong="truncate")
    assert enc.overlong == [0]
    assert enc.ids[0] == fmt.encode_chat(tok, [conv[0], conv[3]])  # user + assistant dropped together
    assert "<system> sys" in tok.decode(enc.ids[0]) and tok.decode(enc.ids[0]).endswith("<assistant>")


def test_a_conversation_the_chat_template_refuses_names_the_example(tiny):
    from esft.io import DataError

    _, tok = tiny
    strict = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(DataError, match=r"d.jsonl:3: the conversation does not fit the chat template \(no system role"):
        encode_prompts(tok, [[msg(S, "s"), msg(U, "q")]], PromptFormat("chat", strict), sources=["d.jsonl:3"])
