"""esft eval: input layouts, generation against a hand-run greedy loop, metric wiring."""

import json

import pytest
import torch

from esft.eval.generate import generate
from esft.eval.run import EvalConfig, read_eval_file, run_eval
from esft.io import DataError
from esft.models.loading import load_model


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir / "model")


def test_batched_generation_equals_unbatched_greedy_loop(tiny):
    model, tok = tiny
    prompts = ["Reverse: red cat", "Reverse: one two three four", "Reverse: sun"]
    got = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for p, g in zip(prompts, got):  # independent: token-by-token argmax without cache or padding
        from esft.data.conversations import prompt_text

        ids = [tok.bos_token_id] + tok.encode(prompt_text(p), add_special_tokens=False)
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert g == tok.decode(new, skip_special_tokens=True).strip()


def test_reads_both_layouts(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps({"prompt": "q1", "answers": ["a", "b"]}) + "\n" +
                 json.dumps({"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "c"}]}) + "\n")
    user = lambda t: [{"role": "user", "content": t}]  # noqa: E731  (each prompt is a conversation)
    # one file holds one layout: the row that differs is named
    with pytest.raises(DataError, match="e.jsonl:2: this row is in the messages layout, while the source's first "
                                        "row is prompt_answers"):
        read_eval_file(str(p))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(p.read_text().splitlines()[0] + "\n")
    b.write_text(p.read_text().splitlines()[1] + "\n")
    assert read_eval_file([str(a), str(b)]) == ([user("q1"), user("q2")], [["a", "b"], ["c"]])
    p.write_text(json.dumps({"prompt": "q1"}) + "\n")
    with pytest.raises(DataError, match="e.jsonl: cannot tell the data layout from its columns \\['prompt'\\]"):
        read_eval_file(str(p))
    p.write_text(json.dumps({"prompt": "q1", "answers": []}) + "\n")
    with pytest.raises(DataError, match="e.jsonl:1: field 'answers': expected a non-empty list"):
        read_eval_file(str(p))


def test_run_eval_scores_predictions_and_writes_files(tiny, tmp_path):
    model, tok = tiny
    data = tmp_path / "d.jsonl"
    prompts = ["Reverse: red cat", "Reverse: sun moon"]
    preds = generate(model, tok, prompts, max_new_tokens=8)
    # one reference equals the model's own prediction, the other cannot match: exact match must be 50
    data.write_text(json.dumps({"prompt": prompts[0], "answers": [preds[0]]}) + "\n" +
                    json.dumps({"prompt": prompts[1], "answers": ["\u2603 never"]}) + "\n")
    s = run_eval(EvalConfig(data=str(data), max_new_tokens=8, out=str(tmp_path / "o")), model=model, tokenizer=tok)
    assert s["score"] == 50.0 and s["n"] == 2
    rows = [json.loads(l) for l in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [100.0, 0.0]
    with pytest.raises(ValueError, match="exactly one of task"):
        EvalConfig()


def test_generation_works_without_a_bos_token(tiny):
    import copy

    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.bos_token = None  # as Qwen-MoE tokenizers
    assert tok.bos_token_id is None
    assert len(generate(model, tok, ["Reverse: red cat"], max_new_tokens=3)) == 1


def test_judge_grades_through_an_openai_compatible_endpoint(monkeypatch):
    """A local stand-in endpoint: the official openai client talks to it; grades are parsed, unparsed ones counted."""
    import json as _json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from esft.eval.judge import JudgeConfig, judge, parse_grade

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            user = body["messages"][-1]["content"]
            cand = user.split("Candidate answer:\n", 1)[1].split("\n\nGrade", 1)[0]
            ref = user.split("- ", 1)[1].split("\n", 1)[0]
            text = "10" if cand == ref else ("I cannot tell" if cand == "???" else "Grade: 3")
            out = _json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    try:
        res = judge(["q1", "q2", "q3"], [["Paris"], ["4"], ["x"]], ["Paris", "5", "???"],
                    JudgeConfig(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-1", "JUDGE_KEY"))
    finally:
        server.shutdown()
    assert res.grades == [10, 3, None] and res.unparsed == 1
    assert res.score == pytest.approx(10 * (10 + 3) / 2)
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sekret"
    assert body["model"] == "judge-1" and body["temperature"] == 0
    assert parse_grade("7/10") == 7 and parse_grade("none") is None


def test_judge_needs_url_and_model():
    from esft.eval.run import EvalConfig

    with pytest.raises(ValueError, match="judge needs both"):
        EvalConfig(task="translate_synth", judge_url="http://localhost:1/v1")


# ---------------------------------------------------------------- prompts longer than the context

@pytest.fixture(scope="module")
def shipped():
    from esft.embedded import embedded_model_dir

    return load_model(embedded_model_dir(), dtype="float32", device="cpu")  # context: 512 positions


LONG = "Reverse: " + " ".join(["red cat sun moon"] * 200)  # ~ 800 tokens for the shipped tokenizer


def _eval_file(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "answers": a}) + "\n" for p, a in rows))
    return str(path)


def test_an_overlong_prompt_is_refused_by_default_before_any_generation(shipped, tmp_path, monkeypatch):
    from esft.eval.generate import PromptFormat

    model, tok = shipped
    data = _eval_file(tmp_path / "d.jsonl", [("Reverse: red cat", ["x"]), (LONG, ["y"]), (LONG, ["z"])])
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before refusing"))
    n = len(PromptFormat().encode(tok, LONG))
    assert n > 512
    with pytest.raises(DataError) as e:
        run_eval(EvalConfig(data=data, max_new_tokens=8), model=model, tokenizer=tok)
    msg = str(e.value)
    assert "2 of 3 prompts do not fit" in msg and f"{data}:2 has {n} prompt tokens" in msg
    assert "max_new_tokens 8 > context 512" in msg and "--overlong truncate" in msg
    with pytest.raises(DataError, match=r"translate_synth eval example 0 has \d+ prompt tokens \+ max_new_tokens 600"):
        run_eval(EvalConfig(task="translate_synth", n=2, max_new_tokens=600), model=model, tokenizer=tok)


def test_truncate_keeps_template_ends_and_the_last_tokens_and_skip_scores_the_rest(shipped, tmp_path):
    from esft.data.conversations import prompt_text
    from esft.eval.generate import encode_prompts

    model, tok = shipped
    short = "Reverse: red cat"
    want = generate(model, tok, [short], max_new_tokens=8)[0]
    assert want  # the in-context prompt alone
    enc = encode_prompts(tok, [short, LONG], context=512, max_new_tokens=8, overlong="truncate")
    assert enc.overlong == [1] and enc.ids[0] == [tok.bos_token_id] + tok.encode(prompt_text(short), add_special_tokens=False)
    ids = enc.ids[1]
    head = [tok.bos_token_id] + tok.encode("User: ", add_special_tokens=False)
    tail = tok.encode("\n\nAssistant:", add_special_tokens=False)
    body = tok.encode(LONG.strip(), add_special_tokens=False)
    assert len(ids) == 512 - 8 and ids[:len(head)] == head and ids[-len(tail):] == tail
    assert ids[len(head):-len(tail)] == body[-(504 - len(head) - len(tail)):]  # the end of the user text

    rows = [(short, [want]), (LONG, ["\u2603"]), ("Reverse: sun moon", ["\u2603 never"])]
    data = _eval_file(tmp_path / "d.jsonl", rows)
    s = run_eval(EvalConfig(data=data, max_new_tokens=8, overlong="truncate", batch_size=1, out=str(tmp_path / "t")),
                 model=model, tokenizer=tok)
    assert s["n"] == 3 and s["score"] == pytest.approx(100 / 3)
    assert s["overlong"] == {"count": 1, "of": 3, "action": "truncated", "context": 512, "max_new_tokens": 8,
                             "first": [f"{data}:2"]}
    preds = [json.loads(l) for l in (tmp_path / "t" / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["prediction"] == want and preds[1]["overlong"] == "truncated" and preds[1]["prediction"] is not None

    s = run_eval(EvalConfig(data=data, max_new_tokens=8, overlong="skip", out=str(tmp_path / "s")), model=model,
                 tokenizer=tok)
    assert s["n"] == 2 and s["score"] == 50.0 and s["overlong"]["action"] == "skipped"
    preds = [json.loads(l) for l in (tmp_path / "s" / "predictions.jsonl").read_text().splitlines()]
    assert [p.get("score") for p in preds] == [100.0, None, 0.0] and preds[1]["prediction"] is None
    assert s["overlong"]["count"] == 1 and preds[1]["overlong"] == "skipped"
    with pytest.raises(DataError, match="all 1 prompts are longer than the context"):
        run_eval(EvalConfig(data=_eval_file(tmp_path / "l.jsonl", [(LONG, ["y"])]), overlong="skip"), model=model,
                 tokenizer=tok)


def test_the_cli_eval_table_reports_overlong_prompts(tmp_path, capsys):
    from esft.cli import main

    data = _eval_file(tmp_path / "d.jsonl", [("Reverse: red cat", ["x"]), (LONG, ["y"])])
    assert main(["eval", "--data", data, "--max-new-tokens", "4"]) == 2
    assert f"{data}:2 has" in capsys.readouterr().err
    assert main(["eval", "--data", data, "--max-new-tokens", "4", "--overlong", "skip", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "over-long prompts" in out and "1 of 2, skipped" in out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["overlong"]["count"] == 1


# ---------------------------------------------------------------- templates recorded in adapters

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _adapter(tiny_dir, out, meta):
    from esft.adapter.fingerprint import model_fingerprint
    from esft.adapter.io import save_adapter
    from esft.training.experts import apply_esft

    model, _ = load_model(tiny_dir / "model")
    fp = model_fingerprint(model)
    save_adapter(apply_esft(model, {"experts": {1: [0, 1]}}), out, fp, meta)
    return str(out)


def test_recorded_templates_are_read_and_conflicts_refused(tiny_dir, tmp_path):
    from esft.eval.generate import PromptFormat, choose_format
    from esft.eval.run import adapter_format

    chat = _adapter(tiny_dir, tmp_path / "chat", {"template": {"name": "chat", "chat_template": CHAT_TEMPLATE}})
    old = _adapter(tiny_dir, tmp_path / "old", {"train_config": {"template": "chat"}})  # before templates travelled
    assert adapter_format(chat) == PromptFormat("chat", CHAT_TEMPLATE)
    assert adapter_format(old) == PromptFormat("chat", None)  # the tokenizer's own chat template
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "expert_cfg.json").write_text("{}")
    assert adapter_format(str(tmp_path / "ref")) == PromptFormat("reference")  # reference code: no metadata
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert adapter_format(str(tmp_path / "lora")) is None
    assert choose_format("auto", None) == PromptFormat("reference")
    assert choose_format("chat", None) == PromptFormat("chat")
    data = _eval_file(tmp_path / "d.jsonl", [("Reverse: red cat", ["x"])])
    with pytest.raises(ValueError, match=rf"--template reference conflicts with adapter {chat}, which was trained "
                                         "with template 'chat'"):
        run_eval(EvalConfig(model=str(tiny_dir / "model"), adapter=chat, data=data, template="reference"))
    with pytest.raises(ValueError, match="template must be auto, reference or chat"):
        EvalConfig(data=data, template="chatml")


def test_eval_prompts_a_chat_adapter_with_its_recorded_template_as_in_training(tiny_dir, tmp_path):
    import copy

    from esft.data.conversations import _chat_ids
    from esft.eval.generate import PromptFormat, encode_prompts, generate_ids

    chat = _adapter(tiny_dir, tmp_path / "chat", {"template": {"name": "chat", "chat_template": CHAT_TEMPLATE}})
    model, tok = load_model(tiny_dir / "model")
    assert not tok.chat_template  # the template comes from the adapter, not the tokenizer
    fmt = PromptFormat("chat", CHAT_TEMPLATE)
    trained = copy.deepcopy(tok)
    trained.chat_template = CHAT_TEMPLATE  # what training rendered with: the prefix before the assistant turn
    q = "Reverse: red cat"
    assert fmt.encode(tok, q) == _chat_ids(trained, [{"role": "user", "content": q}], generation_prompt=True)
    assert fmt.encode(tok, q)[0] == tok.bos_token_id

    data = _eval_file(tmp_path / "d.jsonl", [(q, ["x"]), ("Reverse: sun moon", ["y"])])
    s = run_eval(EvalConfig(model=str(tiny_dir / "model"), adapter=chat, data=data, max_new_tokens=6,
                            out=str(tmp_path / "o")))
    assert s["template"] == "chat" and s["model_kind"] == "esft"
    want = generate_ids(model, tok, [fmt.encode(tok, q), fmt.encode(tok, "Reverse: sun moon")], 6)  # adapter = base
    got = [json.loads(l)["prediction"] for l in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert got == want

    # left-truncation keeps the chat template's header and generation prompt
    enc = encode_prompts(tok, ["word " * 300], fmt, context=64, max_new_tokens=4, overlong="truncate")
    head, _, tail = fmt.parts(tok, "x")
    assert len(enc.ids[0]) == 60 and enc.ids[0][:len(head)] == head and enc.ids[0][-len(tail):] == tail


# ---------------------------------------------------------------- every EOS id of the generation config

def two_eos_checkpoint(tiny_dir, tmp_path):
    """A copy of the tiny checkpoint whose generation config lists [eos, X], X = the 3rd greedy token."""
    import shutil

    from esft.data.conversations import prompt_text

    model, tok = load_model(tiny_dir / "model")
    ids = [tok.bos_token_id] + tok.encode(prompt_text("Reverse: red cat"), add_special_tokens=False)
    free = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    x = free[2]
    assert x not in free[:2] and tok.eos_token_id not in free[:3]
    d = tmp_path / "two_eos"
    shutil.copytree(tiny_dir / "model", d)
    gc = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gc, "eos_token_id": [tok.eos_token_id, x]}))
    return d, free


def test_eval_generation_stops_at_every_eos_id_of_the_generation_config(tiny_dir, tmp_path):
    d, free = two_eos_checkpoint(tiny_dir, tmp_path)
    model, tok = load_model(d)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, free[2]]
    got = generate(model, tok, ["Reverse: red cat"], max_new_tokens=6)
    assert got == [tok.decode(free[:2], skip_special_tokens=True).strip()]


# ---------------------------------------------------------------- device maps

def test_eval_on_a_model_spread_by_a_device_map_equals_in_memory(tiny_dir, tmp_path):
    """CPU proxy of a multi-device map: layer 1 offloaded to disk (accelerate's hooks move it in per forward)."""
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": ("disk" if i == 1 else "cpu") for i in range(3)}}
    (tmp_path / "dm.json").write_text(json.dumps(dm))
    data = _eval_file(tmp_path / "d.jsonl", [("Reverse: red cat", ["x"]), ("Reverse: one two three", ["y"])])
    rows = {}
    for key, dmap in (("memory", None), ("spread", str(tmp_path / "dm.json"))):
        run_eval(EvalConfig(model=str(tiny_dir / "model"), data=data, max_new_tokens=6, device_map=dmap,
                            out=str(tmp_path / key)))
        rows[key] = (tmp_path / key / "predictions.jsonl").read_text()
    assert rows["spread"] == rows["memory"]


# ---------------------------------------------------------------- templates recorded in merged checkpoints

def test_a_merged_checkpoint_is_prompted_with_its_adapters_recorded_template(tiny_dir, tmp_path):
    from esft.adapter.merge import merge_checkpoint
    from esft.eval.generate import PromptFormat
    from esft.eval.run import eval_format, merged_format

    chat = _adapter(tiny_dir, tmp_path / "chat", {})
    meta_file = tmp_path / "chat" / "esft_adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["template"] = {"name": "chat", "chat_template": CHAT_TEMPLATE}  # as training a chat adapter records it
    meta_file.write_text(json.dumps(meta))
    merged = str(merge_checkpoint(tiny_dir / "model", chat, tmp_path / "merged").out)
    record = json.loads((tmp_path / "merged" / "esft_merge.json").read_text())
    assert record["template"] == {"name": "chat", "chat_template": CHAT_TEMPLATE}
    assert merged_format(merged) == PromptFormat("chat", CHAT_TEMPLATE)
    assert merged_format(str(tiny_dir / "model")) is None  # not a merge: unknown, auto = reference

    data = _eval_file(tmp_path / "d.jsonl", [("Reverse: red cat", ["x"])])
    assert eval_format(EvalConfig(model=merged, data=data)) == PromptFormat("chat", CHAT_TEMPLATE)
    assert eval_format(EvalConfig(model=merged, data=data, template="chat")) == PromptFormat("chat", CHAT_TEMPLATE)
    assert eval_format(EvalConfig(model=str(tiny_dir / "model"), data=data)) == PromptFormat("reference")
    with pytest.raises(ValueError, match=rf"--template reference conflicts with merged checkpoint {merged}, which was "
                                         "trained with template 'chat'"):
        run_eval(EvalConfig(model=merged, data=data, template="reference"))
    s = run_eval(EvalConfig(model=merged, data=data, max_new_tokens=4))
    assert s["template"] == "chat" and s["model_kind"] == "base"

    # merged before merges recorded the template: unknown, so auto is the reference template and nothing conflicts
    del record["template"]
    (tmp_path / "merged" / "esft_merge.json").write_text(json.dumps(record))
    assert eval_format(EvalConfig(model=merged, data=data, template="reference")) == PromptFormat("reference")
