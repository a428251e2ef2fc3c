"""`esft serve --engine vllm` over HTTP: the server as users start it (the `esft` command of the project's
venv, which computes the base fingerprint and execs vLLM's OpenAI server in .venv-vllm), on a free port.

Checked: /v1/models lists the adapters; a completion named by `model` = adapter, and by `vllm_xargs`,
gives the tokens of the same request run offline through the plugin (run_engine.py), and its `model`
field names the adapter (streamed too); an unknown name is a 404 in vLLM's error format naming the base
and the adapters; the admin routes answer 401 without the token, load an adapter that then serves
(offline's tokens again) and unload it (then a 404).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from test_vllm_plugin import ENV, PROJECT_PY, PROMPTS, fixtures, run  # noqa: E402

TOKEN = "test-admin-token"
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body=None, token: str | None = None, raw: bool = False):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            data = r.read()
            return r.status, (data if raw else json.loads(data))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(port, model, prompt, **extra):
    return call(port, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                  "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
                                                  **extra})


@pytest.fixture(scope="module")
def server(tmp_root, tmp_path_factory):
    fx = fixtures("qwen3_moe", tmp_root)
    log_dir = tmp_path_factory.mktemp("http")
    port = free_port()
    esft_cli = Path(PROJECT_PY).parent / "esft"
    env = {**ENV, "ESFT_VLLM_PYTHON": sys.executable, "ESFT_ADMIN_TOKEN": TOKEN,
           "ESFT_VLLM_ARGS": "--enforce-eager --max-model-len 512 --seed 0"}
    env.pop("ESFT_API_KEY", None)
    log = open(log_dir / "server.log", "w")
    cmd = [str(esft_cli), "serve", "--engine", "vllm", "--model", fx["base"], "--adapter",
           f"a={fx['adapters']['a']}", "--adapter", f"b={fx['adapters']['b']}", "--adapter-root", str(fx["root"]),
           "--port", str(port), "--dtype", "float32", "--max-adapters", "4", "--max-adapter-experts", "6"]
    # its own process group: vLLM's engine-core process is its child, and the group ends with the test
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{(log_dir / 'server.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"server not up in 600 s:\n{(log_dir / 'server.log').read_text()[-4000:]}")
            time.sleep(2)
        yield {"port": port, "fx": fx, "log": log_dir / "server.log"}
    finally:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.fixture(scope="module")
def offline(server, tmp_path_factory):
    """The same requests, one at a time, through the plugin offline (vllm.LLM)."""
    fx = server["fx"]
    ad = fx["adapters"]
    steps = [{"load": n, "path": ad[n]} for n in ("a", "b", "c")]
    reqs = [(PROMPTS[0], "a"), (PROMPTS[1], "b"), (PROMPTS[2], "c"), (PROMPTS[0], None)]
    steps += [{"generate": [{"prompt": p, "adapter": a}], "max_tokens": MAX_TOKENS, "logprobs": None}
              for p, a in reqs]
    out = run({"model": fx["base"], "esft": {"max_adapters": 4, "max_adapter_experts": 6,
                                             "base_fingerprint": fx["fingerprint"]}, "steps": steps},
              tmp_path_factory.mktemp("offline"), "offline_http")
    assert "results" in out, out
    return {(p, a): r[0]["tokens"] for (p, a), r in zip(reqs, out["results"][3:])}


def test_models_lists_adapters(server):
    status, body = call(server["port"], "GET", "/v1/models")
    assert status == 200, body
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == "base" and set(ids[1:]) == {"a", "b"}, ids
    assert all(m["parent"] == "base" for m in body["data"][1:])


def test_completions_by_name_and_by_xargs_equal_offline(server, offline):
    port = server["port"]
    status, body = complete(port, "a", PROMPTS[0])
    assert status == 200, body
    assert body["model"] == "a"
    assert body["choices"][0]["token_ids"] == offline[(PROMPTS[0], "a")]
    status, body = complete(port, "base", PROMPTS[1], vllm_xargs={"esft_adapter": "b"})
    assert status == 200, body
    assert body["model"] == "b"
    assert body["choices"][0]["token_ids"] == offline[(PROMPTS[1], "b")]
    status, body = complete(port, "base", PROMPTS[0])
    assert status == 200, body
    assert body["model"] == "base" and body["choices"][0]["token_ids"] == offline[(PROMPTS[0], None)]
    assert offline[(PROMPTS[0], "a")] != offline[(PROMPTS[0], None)]  # else the check above proves little
    # streamed: every event names the adapter, and the tokens are the same
    status, raw = call(port, "POST", "/v1/completions", {"model": "a", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                                         "temperature": 0.0, "ignore_eos": True, "stream": True,
                                                         "return_token_ids": True}, raw=True)
    assert status == 200
    events = [json.loads(l[6:]) for l in raw.decode().splitlines() if l.startswith("data: {")]
    assert events and all(e["model"] == "a" for e in events)
    assert [t for e in events for t in (e["choices"][0].get("token_ids") or [])] == offline[(PROMPTS[0], "a")]


def test_unknown_name_is_404_naming_adapters(server):
    for body in ({"model": "nope"}, {"model": "base", "vllm_xargs": {"esft_adapter": "nope"}}):
        status, err = call(server["port"], "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, **body})
        assert status == 404, err
        e = err["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["type"] == "NotFoundError" and e["code"] == 404
        assert "`nope` does not exist" in e["message"] and "base, a, b" in e["message"], e


def test_admin_load_unload(server, offline):
    port, fx = server["port"], server["fx"]
    path = fx["adapters"]["c"]
    status, err = call(port, "POST", "/v1/esft/adapters", {"name": "c", "path": path})
    assert status == 401 and err["error"]["code"] == 401, err
    status, err = call(port, "POST", "/v1/esft/adapters", {"name": "c", "path": path}, token="wrong")
    assert status == 401, err
    status, body = call(port, "POST", "/v1/esft/adapters", {"name": "c", "path": path}, token=TOKEN)
    assert status == 200 and body["loaded"] == "c", body
    assert "c" in [m["id"] for m in call(port, "GET", "/v1/models")[1]["data"]]
    status, body = complete(port, "c", PROMPTS[2])
    assert status == 200 and body["model"] == "c", body
    assert body["choices"][0]["token_ids"] == offline[(PROMPTS[2], "c")]
    status, err = call(port, "DELETE", "/v1/esft/adapters/c")
    assert status == 401, err
    status, body = call(port, "DELETE", "/v1/esft/adapters/c", token=TOKEN)
    assert status == 200 and body["unloaded"] == "c", body
    status, err = complete(port, "c", PROMPTS[2])
    assert status == 404 and "base, a, b" in err["error"]["message"], err
    assert "c" not in [m["id"] for m in call(port, "GET", "/v1/models")[1]["data"]]
