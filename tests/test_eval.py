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
    assert read_eval_file(str(p)) == (["q1", "q2"], [["a", "b"], ["c"]])
    p.write_text(json.dumps({"prompt": "q1"}) + "\n")
    with pytest.raises(DataError, match="e.jsonl:1: 'answers' must be a non-empty list"):
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
