"""The synthetic multi-domain task suite: determinism, disjoint splits, valid rows, metrics."""

import json

import pytest

from esft.data.conversations import validate_messages
from esft.io import read_jsonl
from esft.tasks import (METRICS, TASKS, general_ability, generate_split, get_task, score, task_names,
                        write_suite)
from esft.tasks.adaptation import LEXICON, T_VERBS


def _read_bytes(paths):
    return {(t, s): p.read_bytes() for t, d in paths.items() for s, p in d.items()}


def test_registry_has_enough_tasks_of_each_kind():
    assert len(task_names("general")) >= 6
    assert len(task_names("adaptation")) >= 3
    for t in TASKS.values():
        assert t.metric in METRICS and t.description


def test_write_suite_is_deterministic(tmp_path):
    a = write_suite(tmp_path / "a", 40, 10, 10, seed=0)
    b = write_suite(tmp_path / "b", 40, 10, 10, seed=0)
    c = write_suite(tmp_path / "c", 40, 10, 10, seed=1)
    assert set(a) == set(TASKS)
    assert _read_bytes(a) == _read_bytes(b)
    for key, data in _read_bytes(a).items():
        assert data != _read_bytes(c)[key], key
    meta = json.loads((tmp_path / "a" / "suite.json").read_text())
    assert meta["seed"] == 0 and set(meta["tasks"]) == set(TASKS)


def test_rows_are_valid_conversations_and_eval_carries_answers(tmp_path):
    paths = write_suite(tmp_path, 30, 5, 20, seed=3)
    for splits in paths.values():
        for split, path in splits.items():
            rows = read_jsonl(path)
            assert len(rows) == {"train": 30, "valid": 5, "eval": 20}[split]
            for row in rows:
                msgs = validate_messages(row, f"{path}:{row['_line']}")
                assert [m["role"] for m in msgs] == ["user", "assistant"]
                assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
                assert len(msgs[0]["content"].split()) < 60
                if split == "eval":
                    assert row["answers"] == [msgs[1]["content"]]
                else:
                    assert "answers" not in row


@pytest.mark.parametrize("task", list(TASKS))
def test_eval_prompts_never_in_train_or_valid(task):
    train = {p for p, _ in generate_split(task, "train", 2000, seed=0)}
    valid = {p for p, _ in generate_split(task, "valid", 200, seed=0)}
    for seed in (0, 1):
        ev = [p for p, _ in generate_split(task, "eval", 200, seed=seed)]
        assert len(set(ev)) == len(ev)  # unique within eval
        assert not set(ev) & train and not set(ev) & valid
    assert not valid & train


def test_generated_answers_score_perfectly():
    for task in TASKS:
        ex = generate_split(task, "eval", 30, seed=5)
        assert score(task, [a for _, a in ex], [[a] for _, a in ex]) == pytest.approx(100.0), task
    assert general_ability({t: 50.0 for t in task_names("general")}) == 50.0
    with pytest.raises(ValueError, match="missing"):
        general_ability({})


def test_unknown_task_lists_available_tasks():
    for call in (lambda: get_task("nope"), lambda: generate_split("nope", "train", 1),
                 lambda: score("nope", ["a"], ["a"])):
        with pytest.raises(ValueError) as e:
            call()
        assert "nope" in str(e.value) and all(t in str(e.value) for t in TASKS)
    with pytest.raises(ValueError, match="split"):
        generate_split("arithmetic", "test", 1)


def test_exact_match():
    assert score("kv_recall", ["42", " 42 ", "41", "4 2"], ["42", "42", "42", "42"]) == 50.0
    assert score("list_ops", ["[1, 2, 3]"], [["[1,2,3]", "[1, 2, 3]"]]) == 100.0


def test_intent_json_metric():
    ref = '{"intent": "alarm_set", "slots": {"time": "7 am", "date": "tomorrow"}}'
    reordered = '{"slots": {"date": "tomorrow", "time": "7 am"}, "intent": "alarm_set"}'
    wrong_slot = '{"intent": "alarm_set", "slots": {"time": "8 am", "date": "tomorrow"}}'
    extra_slot = '{"intent": "alarm_set", "slots": {"time": "7 am", "date": "tomorrow", "x": "y"}}'
    wrong_intent = '{"intent": "calendar_set", "slots": {"time": "7 am", "date": "tomorrow"}}'
    assert score("intent_json", [reordered], [ref]) == 100.0
    assert score("intent_json", [ref], [ref]) == 100.0
    for bad in (wrong_slot, extra_slot, wrong_intent, "alarm_set 7 am tomorrow", '{"intent": "alarm_set"', "[1]"):
        assert score("intent_json", [bad], [ref]) == 0.0, bad
    assert score("intent_json", [reordered, wrong_slot, "not json", ref], [ref] * 4) == 50.0


def test_verdict_json_metric():
    ref = '{"verdict": "guilty", "article": 12}'
    assert score("verdict_json", ['{"article": 12, "verdict": "guilty"}'], [ref]) == 100.0
    assert score("verdict_json", ['{"verdict": "guilty", "article": 13}'], [ref]) == 0.0
    assert score("verdict_json", ["guilty, article 12"], [ref]) == 0.0


def test_numeric_metric():
    assert score("word_problems", ["the answer is 42"], ["42"]) == 100.0
    assert score("word_problems", ["42.0000001", "1,234", "-3", "41", "no idea", "42 then 7"],
                 ["42", "1234", "-3", "42", "42", "42"]) == pytest.approx(50.0)
    assert score("arithmetic", ["The result: 15."], ["15"]) == 100.0


def test_chrf_metric():
    refs = ["pato kaso so kitino do zalovu.", "vesu lami ra."]
    assert score("translate_synth", refs, refs) == pytest.approx(100.0)
    assert score("translate_synth", ["xxxx yyyy qqqq.", "bbbb ffff."], refs) < 10.0
    half = score("translate_synth", ["pato kaso so", "vesu lami ra."], refs)
    assert 10.0 < half < 100.0


def test_translation_uses_lexicon_and_sov_order():
    assert len(set(LEXICON.values())) == len(LEXICON)
    for prompt, answer in generate_split("translate_synth", "train", 50, seed=0):
        english = prompt.split(": ", 1)[1].rstrip(".").split()
        v = next(i for i, w in enumerate(english) if w in T_VERBS)
        subj, obj = english[:v], english[v + 1:]
        # "det [adj] noun" becomes "noun [adj] det"; subject, object, then the verb
        assert answer == " ".join(LEXICON[w] for w in subj[::-1] + obj[::-1] + [english[v]]) + "."
