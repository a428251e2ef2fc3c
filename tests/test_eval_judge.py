"""The LLM judge fails per example, within its timeout and retries, and never costs the local results."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from esft.eval.judge import JudgeConfig, judge


def silent_socket():
    """A port that accepts connections (the kernel completes them) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused
    return port


class Server:
    """A local OpenAI-compatible stand-in: ``reply(question) -> (status, text)``, or None to never answer."""

    def __init__(self, reply):
        self.hits = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                outer.hits.append(user)
                answer = reply(user)
                if answer is None:
                    outer.release.wait(10)  # hold the request unanswered
                    return
                status, text = answer
                out = text if isinstance(text, bytes) else json.dumps(  # bytes: a raw body, not a chat completion
                    {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if out[:1] == b"{" else "text/html")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


QS = [f"q{i}" for i in range(5)]
REFS = [[f"r{i}"] for i in range(5)]
PREDS = [f"p{i}" for i in range(5)]


def test_a_judge_that_never_answers_costs_timeout_per_attempt_and_is_given_up(tmp_path):
    s = silent_socket()
    url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    try:
        t0 = time.monotonic()
        res = judge(QS, REFS, PREDS, JudgeConfig(url, "j", timeout=0.3, retries=0))
        took = time.monotonic() - t0
    finally:
        s.close()
    assert took < 5  # 3 examples x 0.3 s, then the rest are not sent (before: 3 attempts x 60 s per example)
    assert res.grades == [None] * 5 and res.score is None and res.failed == 5 and res.unparsed == 0
    assert res.errors[:3] == [f"no reply from {url} within --judge-timeout 0.3 s (1 attempt(s))"] * 3
    assert res.errors[3:] == ["not sent: the judge failed on the 3 examples before this one"] * 2


def test_retries_are_counted_and_a_recovered_judge_is_used_again():
    flaky = {"q1"}  # q1's requests hang; the others are graded

    server = Server(lambda user: None if user.split("\n")[1] in flaky else (200, "7"))
    try:
        res = judge(QS[:3], REFS[:3], PREDS[:3], JudgeConfig(server.url, "j", timeout=0.3, retries=1))
    finally:
        server.close()
    assert sum("q1" in h for h in server.hits) == 2  # one attempt + one retry
    assert res.grades == [7, None, 7] and res.failed == 1 and res.score == 70.0
    assert res.errors[0] is None and "2 attempt(s)" in res.errors[1] and res.errors[2] is None


def test_http_errors_odd_replies_and_refused_connections_are_recorded_per_example():
    replies = {"q0": (500, "boom"), "q1": (200, "I cannot tell"), "q2": (200, b"<html>proxy login</html>"),
               "q3": (200, "9")}
    server = Server(lambda user: replies[user.split("\n")[1]])
    try:
        res = judge(QS[:4], REFS[:4], PREDS[:4], JudgeConfig(server.url, "j", timeout=2, retries=0))
    finally:
        server.close()
    assert res.grades == [None, None, None, 9] and res.failed == 2 and res.unparsed == 1 and res.score == 90.0
    assert res.errors[0].startswith(f"HTTP 500 from {server.url}: ") and res.errors[1] is None
    assert res.errors[2].startswith(f"the reply from {server.url} is not a chat completion: ")

    port = refused_port()
    res = judge(QS[:2], REFS[:2], PREDS[:2], JudgeConfig(f"http://127.0.0.1:{port}/v1", "j", timeout=2, retries=0))
    assert res.failed == 2 and all(f"cannot reach http://127.0.0.1:{port}/v1" in e for e in res.errors)
    assert all("refused" in e.lower() for e in res.errors)


def test_judge_options_are_checked():
    for kw, says in (({"timeout": 0}, "--judge-timeout"), ({"timeout": float("inf")}, "--judge-timeout"),
                     ({"retries": -1}, "--judge-retries"), ({"give_up_after": 0}, "give_up_after")):
        with pytest.raises(ValueError, match=says):
            JudgeConfig("http://127.0.0.1:9/v1", "j", **kw)


# ---------------------------------------------------------------- through esft eval

def data_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Reverse: {w}", "answers": [w]}) + "\n" for w in ("a b", "c", "d")))
    return p


def test_cli_with_a_refused_judge_writes_the_local_results_and_each_failure(tiny_dir, tmp_path, capsys):
    from esft.cli import main

    port = refused_port()
    out = tmp_path / "o"
    rc = main(["eval", "--model", str(tiny_dir / "model"), "--data", str(data_file(tmp_path)), "--max-new-tokens",
               "2", "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "j", "--judge-retries", "0",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err
    assert "esft eval: warning: the judge failed on 3 of 3 examples" in captured.err
    assert "judge score" in captured.out and "judged)" in captured.out  # "3 of 3 not judged", maybe wrapped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and isinstance(summary["score"], float) and summary["judge_score"] is None
    assert summary["judge_failures"]["count"] == 3 and summary["judge_failures"]["of"] == 3
    assert summary["judge_failures"]["first"][0]["example"].endswith("d.jsonl:1")
    assert summary["config"]["judge_retries"] == 0 and summary["config"]["judge_timeout"] == 30.0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all("cannot reach" in r["judge_error"] and r["judge_grade"] is None and "score" in r for r in rows)


def test_run_eval_with_a_silent_judge_ends_within_its_timeout(tiny_dir, tmp_path):
    from esft.eval.run import EvalConfig, run_eval

    s = silent_socket()
    try:
        t0 = time.monotonic()
        summary = run_eval(EvalConfig(model=str(tiny_dir / "model"), data=str(data_file(tmp_path)), max_new_tokens=2,
                                      judge_url=f"http://127.0.0.1:{s.getsockname()[1]}/v1", judge_model="j",
                                      judge_timeout=0.3, judge_retries=0, out=str(tmp_path / "o")))
        took = time.monotonic() - t0
    finally:
        s.close()
    assert took < 30 and summary["judge_failures"]["count"] == 3
    written = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert written["judge_failures"] == summary["judge_failures"] and written["n"] == 3
