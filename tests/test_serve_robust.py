"""`esft serve` under bad input: one bad request fails only itself, request bodies are strictly typed, adapters
are checked (names, non-finite weights), start-up refuses what cannot work, responses are always valid JSON.
All on the tiny random model (no download)."""

import json
import math
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from esft.models.loading import load_model  # noqa: E402
from esft.serving.engine import Engine, GenParams, Limits, RequestError  # noqa: E402
from esft.serving.server import (BackgroundServer, ServeConfig, ServeConfigError, StartupError,  # noqa: E402
                                 build_app, check_bindable, serve, start_engine)
from conftest import make_adapter  # noqa: E402

SEL_A = {1: [2, 7], 2: [0, 11]}
SEL_P = {1: [0, 1, 3, 4, 5, 6], 2: [1, 2, 3, 4, 5, 6]}  # many experts: every prompt routes through some
PROMPTS = ["the cat sat on the mat", "one two three four", "hello world, this is a longer prompt than the others",
           "x"]




def _strict_json(raw: bytes):
    """Standard JSON only: NaN / Infinity (which Python's json writes and reads by default) fail."""
    def refuse(name):
        raise AssertionError(f"{name} in a response")
    return json.loads(raw, parse_constant=refuse)


def _call(url, body=None, token=None, method="POST"):
    """(status, content type, raw body); ``body`` as bytes is sent as it is."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def _post(url, body, token=None, method="POST"):
    status, _, raw = _call(url, body, token, method)
    return status, _strict_json(raw)


def _sse(raw: bytes) -> list:
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" or "error" in events[-1], events[-3:]
    return [_strict_json(e.encode()) for e in events if e != "[DONE]"]


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    make_adapter(tiny_dir, root / "A", SEL_A, 1)
    make_adapter(tiny_dir, root / "P", SEL_P, 2)
    cfg = ServeConfig(model=str(tiny_dir / "model"), adapters={"a": "A"}, adapter_root=str(root), admin_token="adm1n",
                      device="cpu", dtype="float32", max_batch=16, max_adapter_experts=12,
                      limits=Limits(max_tokens=64))
    engine = start_engine(cfg)
    with BackgroundServer(build_app(engine, cfg)) as s:
        yield {"url": s.url, "root": root, "engine": engine, "cfg": cfg, "tiny": tiny_dir}
    engine.close()


def _poison(engine, name):
    """Write NaN into every slot of a loaded adapter (as a damaged adapter, or a bug, would leave them)."""
    weaver = engine.weaver
    with engine.exclusive():
        for layer, slots in weaver.adapters[name].slots.items():
            weaver.layers[layer].experts.trained.gate_up_proj.data[slots] = float("nan")


def _together(engine, jobs, fn):
    """Run fn(job) for every job (a request body) in threads, admitted together: the worker is held until
    every row (n per request) waits in the queue."""
    rows = sum(job.get("n", 1) for job in jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        with engine.exclusive():
            futures = [pool.submit(fn, j) for j in jobs]
            deadline = time.monotonic() + 60
            while engine.queue_length() < rows and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.queue_length() == rows
        return [f.result(timeout=120) for f in futures]


# ---------------------------------------------------------------- 1. one bad request fails only itself

GOOD = [{"model": m, "prompt": p, "max_tokens": 8, "temperature": t, "seed": 5, "top_p": 0.9}
        for m in ("base", "a") for p in PROMPTS for t in (0, 1.0)]


def test_a_request_through_a_nan_adapter_fails_alone_and_leaves_nothing_behind(srv):
    url, engine = srv["url"], srv["engine"]
    solo = [_post(url + "/v1/completions", body) for body in GOOD]
    assert all(s == 200 for s, _ in solo)
    want = [b["choices"][0]["text"] for _, b in solo]
    assert _post(url + "/admin/adapters", {"name": "p", "path": "P"}, token="adm1n")[0] == 200
    try:
        _poison(engine, "p")
        bad = [{"model": "p", "prompt": PROMPTS[0], "max_tokens": 8},
               {"model": "p", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 1.0, "stream": True},
               {"model": "p", "prompt": PROMPTS[1], "max_tokens": 8, "n": 3, "logprobs": 2}]
        jobs = bad[:1] + GOOD[:6] + bad[1:] + GOOD[6:]
        got = _together(engine, jobs, lambda body: _call(url + "/v1/completions", body))
        for body, (status, ctype, raw) in zip(jobs, got):
            if body["model"] != "p":
                continue
            if body.get("stream"):  # the 200 went out before the first token: the error is the last event
                assert status == 200 and "text/event-stream" in ctype
                err = _sse(raw)[-1]["error"]
            else:
                assert status == 500
                err = _strict_json(raw)["error"]
            assert "not finite" in err["message"] and "adapter 'p'" in err["message"], err
        good = [_strict_json(raw)["choices"][0]["text"] for body, (s, _, raw) in zip(jobs, got) if body["model"] != "p"]
        assert good == want
        assert engine.thread.is_alive()
        # the slots the poisoned rows used are reused now: nothing of theirs may reach these requests
        again = _together(engine, GOOD, lambda body: _post(url + "/v1/completions", body))
        assert [b["choices"][0]["text"] for _, b in again] == want
    finally:
        _call(url + "/admin/adapters/p", b"", token="adm1n", method="DELETE")


def test_a_finished_nan_request_does_not_poison_its_slot_for_the_next(srv):
    """max_batch 2: a long NaN request in slot 0 ends; then a short and a long good request share a batch,
    the short one in slot 0 attending (masked) over positions the NaN request wrote."""
    engine = srv["engine"]
    model, tok = load_model(srv["tiny"] / "model")
    from esft.serving.weave import Weaver

    weaver = Weaver(model, max_adapter_experts=6)
    weaver.load("p", srv["root"] / "P")
    small = Engine(model, tok, weaver, max_batch=2)
    try:
        def run(adapter, prompt, n=6):
            req = small.submit(adapter, small.encode_completion(prompt), GenParams(max_tokens=n, ignore_eos=True))
            events = [req.events.get(timeout=60)]
            while events[-1][0] == "text":
                events.append(req.events.get(timeout=60))
            return events

        short, long = PROMPTS[3], PROMPTS[2] + " " + PROMPTS[2]
        alone = [run(None, short), run(None, long)]
        _poison(small, "p")
        last = run("p", long * 2)[-1]
        assert last[0] == "error" and last[2] == 500 and "not finite" in last[1]  # it held slot 0
        with small.exclusive():
            reqs = [small.submit(None, small.encode_completion(p), GenParams(max_tokens=6, ignore_eos=True))
                    for p in (short, long)]
        for r, want in zip(reqs, alone):
            events = [r.events.get(timeout=60)]
            while events[-1][0] == "text":
                events.append(r.events.get(timeout=60))
            assert events == want
    finally:
        small.close()
    assert engine.thread.is_alive()


@pytest.mark.parametrize("stage", ["sampling", "detokenising", "stop strings", "flushing"])
def test_any_failure_in_one_rows_sampling_or_text_ends_only_that_row(srv, monkeypatch, stage):
    """The kind, not the example: whatever raises in one row's own work (sampler, detokeniser, stop-string
    matching, the final flush) ends that row's request with a 500 naming it; the others are unchanged."""
    import esft.serving.engine as eng
    from esft.serving.textstream import TextStream

    model, tok = load_model(srv["tiny"] / "model")
    engine = Engine(model, tok, None, max_batch=8)
    try:
        good = [(p, GenParams(max_tokens=6, temperature=t, seed=3, stop=["zq"])) for p in PROMPTS for t in (0, 1.0)]

        def run_all(jobs):
            with engine.exclusive():
                reqs = [engine.submit(None, engine.encode_completion(p), params) for p, params in jobs]
            out = []
            for r in reqs:
                events = [r.events.get(timeout=60)]
                while events[-1][0] == "text":
                    events.append(r.events.get(timeout=60))
                out.append(events)
            return out

        want = run_all(good)
        marker = "BOOM"  # only the bad row has this stop string; it never occurs in the text
        pick, add, first_stop, flush = eng._pick, TextStream.add, TextStream._first_stop, TextStream.flush

        def bad_pick(logits, p, gen):
            if marker in p.stop:
                raise ZeroDivisionError("sampler bug")
            return pick(logits, p, gen)

        def boom(orig):
            def f(self, *a):
                if marker in self.stop:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "text bug")
                return orig(self, *a)
            return f

        if stage == "sampling":
            monkeypatch.setattr(eng, "_pick", bad_pick)
        elif stage == "detokenising":
            monkeypatch.setattr(TextStream, "add", boom(add))
        elif stage == "stop strings":
            monkeypatch.setattr(TextStream, "_first_stop", boom(first_stop))
        else:
            monkeypatch.setattr(TextStream, "flush", boom(flush))
        bad = (PROMPTS[1], GenParams(max_tokens=3, temperature=1.0, seed=9, stop=[marker], ignore_eos=True))
        got = run_all(good[:3] + [bad] + good[3:])
        assert got[:3] + got[4:] == want
        assert got[3][-1][0] == "error" and got[3][-1][2] == 500, got[3]
        assert ("sampler bug" if stage == "sampling" else "text bug") in got[3][-1][1]
        assert engine.thread.is_alive() and engine.running() == 0
    finally:
        engine.close()


def test_a_listener_that_raises_cancels_its_request_and_not_the_engine(srv):
    model, tok = load_model(srv["tiny"] / "model")
    engine = Engine(model, tok, None, max_batch=4)
    try:
        def gone(event):
            raise RuntimeError("Event loop is closed")

        dead = engine.submit(None, engine.encode_completion(PROMPTS[0]), GenParams(max_tokens=20, ignore_eos=True),
                             listener=gone)
        ok = engine.submit(None, engine.encode_completion(PROMPTS[1]), GenParams(max_tokens=5, ignore_eos=True))
        events = [ok.events.get(timeout=60)]
        while events[-1][0] == "text":
            events.append(ok.events.get(timeout=60))
        assert events[-1] == ("done", "length", 5) and dead.cancelled and engine.thread.is_alive()
    finally:
        engine.close()


def test_the_reported_example_top_p_1e_46_fails_alone_among_ten_concurrent_requests(srv):
    """The issue's own case: it used to pass the (0, 1] check, be 0 in float32 and fail all 11 with 500."""
    url = srv["url"]
    good = GOOD[:10]
    want = [_post(url + "/v1/completions", body)[1]["choices"][0]["text"] for body in good]
    bad = {"model": "a", "prompt": "x", "max_tokens": 8, "temperature": 1.0, "top_p": 1e-46}
    with ThreadPoolExecutor(11) as pool:
        got = list(pool.map(lambda body: _post(url + "/v1/completions", body), good[:5] + [bad] + good[5:]))
    assert got[5][0] == 400 and "top_p" in got[5][1]["error"]["message"]
    assert [b["choices"][0]["text"] for s, b in got[:5] + got[6:]] == want


# ---------------------------------------------------------------- top_p and other numbers at the edge

@pytest.mark.parametrize("top_p", [1e-46, 5e-324, 1e-39, 0.0, -0.0, -1e-30, 1.0000001, 2])
def test_top_p_values_float32_cannot_hold_are_refused(srv, top_p):
    status, body = _post(srv["url"] + "/v1/completions", {"model": "base", "prompt": "x", "top_p": top_p})
    assert status == 400 and "top_p" in body["error"]["message"], body
    with pytest.raises(RequestError, match="top_p"):
        GenParams(top_p=top_p).check()


@pytest.mark.parametrize("top_p", [torch.finfo(torch.float32).tiny, 1e-30, 1e-8])
def test_the_smallest_top_p_accepted_keeps_the_likeliest_token(srv, top_p):
    url = srv["url"]
    for prompt in PROMPTS[:2]:
        greedy = _post(url + "/v1/completions", {"model": "a", "prompt": prompt, "max_tokens": 6, "temperature": 0})
        tiny = _post(url + "/v1/completions", {"model": "a", "prompt": prompt, "max_tokens": 6, "temperature": 1.5,
                                               "top_p": top_p, "seed": 1})
        assert tiny[0] == 200 and tiny[1]["choices"][0]["text"] == greedy[1]["choices"][0]["text"]


def test_the_sampler_keeps_a_token_whatever_top_p_it_is_given():
    from esft.serving.engine import _pick

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for top_p in (0.0, 1e-46, 1e-300, 1e-40):  # below what the edge accepts: the sampler copes anyway
        assert _pick(logits, GenParams(temperature=1.0, top_p=top_p), torch.Generator().manual_seed(1)) == \
            int(logits.argmax())


# ---------------------------------------------------------------- 2. strict types, named fields

COMPLETION = {"model": "base", "prompt": "hello", "max_tokens": 2}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
WRONG = {  # field -> values of the wrong JSON type (or out of range); no coercion of any of them
    "model": [5, None, True, [], {}],
    "max_tokens": ["5", 5.5, 5.0, True, 0, -3, [5]],
    "temperature": ["1", True, [1], {}, -0.5, 5.5],
    "top_p": ["0.5", True, [0.5]],
    "stream": ["false", "true", 0, 1, [], {}],
    "stream_options": ["yes", 1, [], {"include_usage": "yes"}, {"include_usage": 1}],
    "seed": ["1", 1.5, 1.0, True, -1, 2**63, 2**70],
    "n": ["2", 2.0, True, 0, 9],
    "ignore_eos": ["true", 1, 0, "no"],
    "stop": [5, [1], ["a", None], "", ["a", ""], ["a"] * 5, {"a": 1}, True],
}
WRONG_COMPLETION = {"prompt": [5, None, ["a", "b"], [], {"x": 1}, True, [1]], "logprobs": [True, "1", 1.0, 6, -1]}
WRONG_CHAT = {
    "messages": ["hi", [], {}, None, [{"role": "user"}], [{"role": "robot", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": 1, "content": "x"}],
                 [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}],
                 [{"role": "user", "content": [{"type": "text", "text": 5}]}], ["hi"]],
    "logprobs": [1, "true", 0], "top_logprobs": [True, 1.5, "2", 21, -1], "max_completion_tokens": ["3", 0, 2.0],
}


def _cases():
    for field, values in WRONG.items():
        for v in values:
            yield "/v1/completions", COMPLETION, field, v
            yield "/v1/chat/completions", CHAT, field, v
    for field, values in WRONG_COMPLETION.items():
        for v in values:
            yield "/v1/completions", COMPLETION, field, v
    for field, values in WRONG_CHAT.items():
        for v in values:
            yield "/v1/chat/completions", CHAT, field, v


def test_every_field_of_the_wrong_type_is_refused_with_400_naming_it(srv):
    url = srv["url"]
    for path, base, field, value in _cases():
        status, ctype, raw = _call(url + path, {**base, field: value})
        assert status == 400 and "json" in ctype, (path, field, value, status)
        message = _strict_json(raw)["error"]["message"]
        assert message.startswith("invalid request: " + field), (path, field, value, message)


def test_stream_false_as_a_string_no_longer_streams(srv):
    status, ctype, raw = _call(srv["url"] + "/v1/completions", {**COMPLETION, "stream": "false"})
    assert status == 400 and "event-stream" not in ctype
    assert "stream: Input should be a valid boolean" in _strict_json(raw)["error"]["message"]
    status, ctype, _ = _call(srv["url"] + "/v1/completions", {**COMPLETION, "stream": False})
    assert status == 200 and "json" in ctype


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "max_tokens", "seed", "n"])
def test_nan_and_infinite_numbers_are_refused_anywhere(srv, literal, field):
    raw = json.dumps({**COMPLETION, field: 12345}).replace("12345", literal).encode()
    status, body = _post(srv["url"] + "/v1/completions", raw)
    assert status == 400 and "not valid JSON" in body["error"]["message"], body


@pytest.mark.parametrize("raw", [b'{"model": "base", "prompt": "\\ud800"}', b'[' * 5000 + b']' * 5000,
                                 b'{"model": "base", "prompt": "x", "max_tokens": ' + b'9' * 5000 + b'}',
                                 b'\xff\xfe', b'', b'"just a string"', b'{"model": "base", "prompt": "x",}'])
def test_bodies_that_are_not_standard_json_objects_get_400(srv, raw):
    for path in ("/v1/completions", "/v1/chat/completions", "/admin/adapters"):
        status, body = _post(srv["url"] + path, raw, token="adm1n")
        assert status == 400, (path, raw[:40], body)


def test_unknown_fields_are_ignored_and_integers_are_numbers(srv):
    status, body = _post(srv["url"] + "/v1/completions", {**COMPLETION, "user": "me", "frequency_penalty": 0,
                                                          "temperature": 1, "top_p": 1, "stream": None, "n": None})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")


# ---------------------------------------------------------------- 3. adapter names and non-finite adapters

def test_names_with_a_slash_load_serve_and_unload_encoded_or_not(srv):
    url = srv["url"]
    for name, delete_as in (("team/sql", "team/sql"), ("team/sql", "team%2Fsql"), ("Org.x/v2_b-1", "Org.x%2Fv2_b-1"),
                            ("sql.v2", "sql.v2")):
        status, body = _post(url + "/admin/adapters", {"name": name, "path": "A"}, token="adm1n")
        assert status == 200 and name in body["models"], body
        status, body = _post(url + "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2})
        assert status == 200 and body["model"] == name
        status, body = _post(url + f"/admin/adapters/{delete_as}", b"", token="adm1n", method="DELETE")
        assert status == 200 and name not in body["models"], (name, delete_as, body)


@pytest.mark.parametrize("name", ["a\nb", "sql\n", "a b", "../x", "x/../y", "team/sql/x", "/sql", "sql/", ".hidden",
                                  "-x", "x" * 65, "é", "a%2Fb", "a:b", "", "tab\t", "a\x00b"])
def test_other_names_are_refused_by_admin_and_at_start_up(srv, name):
    status, body = _post(srv["url"] + "/admin/adapters", {"name": name, "path": "A"}, token="adm1n")
    assert status == 400 and body["error"]["message"].startswith("invalid request: name: must be 1-64 characters")
    with pytest.raises(ServeConfigError, match="is not allowed"):
        ServeConfig(adapters={name: "A"}, adapter_root=str(srv["root"])).check()


def test_the_base_models_name_follows_the_rule_and_cannot_be_an_adapters(srv):
    status, body = _post(srv["url"] + "/admin/adapters", {"name": "base", "path": "A"}, token="adm1n")
    assert status == 400 and "base model's name" in body["error"]["message"]
    with pytest.raises(ServeConfigError, match="base model's name"):
        ServeConfig(adapters={"base": "A"}, adapter_root=str(srv["root"])).check()
    with pytest.raises(ServeConfigError, match="--base-name 'my base' is not allowed"):
        ServeConfig(base_name="my base").check()
    ServeConfig(base_name="deepseek-ai/DeepSeek-V2-Lite").check()


def _damaged_copy(src, dst, value, which=0):
    """A copy of adapter ``src`` whose ``which``-th tensor (sorted by key) holds ``value`` once."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    tensors = load_file(f)
    key = sorted(tensors)[which]
    tensors[key].view(-1)[3] = value
    save_file(tensors, f, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_adapters_with_non_finite_values_are_refused_naming_adapter_and_tensor(srv, value, tmp_path):
    root, url = srv["root"], srv["url"]
    d = root / f"bad_{value}"
    key = _damaged_copy(root / "A", d, value, which=1)
    status, body = _post(url + "/admin/adapters", {"name": "broken", "path": d.name}, token="adm1n")
    message = body["error"]["message"]
    assert status == 400 and "adapter 'broken'" in message and key in message and "non-finite" in message, message
    assert "broken" not in srv["engine"].weaver.names()
    cfg = ServeConfig(model=str(srv["tiny"] / "model"), adapters={"ok": "A", "broken": d.name},
                      adapter_root=str(root), device="cpu", dtype="float32")
    with pytest.raises(StartupError, match=f"--adapter broken={d.name} cannot be served: .*{key}"):
        start_engine(cfg)


def test_values_that_overflow_the_models_dtype_are_refused_too(srv):
    """Finite in the adapter's float32, infinite in a float16 model's slots."""
    from esft.serving.weave import Weaver

    root = srv["root"]
    key = _damaged_copy(root / "A", root / "A_big", 1e6, which=0)
    model, _ = load_model(srv["tiny"] / "model", dtype="float16", device="cpu")
    weaver = Weaver(model)
    with pytest.raises(ValueError, match=r"adapter 'big': layer \d .* in torch.float16 holds 1 non-finite"):
        weaver.load("big", root / "A_big", allow_other_base=True)
    assert weaver.names() == [] and key


# ---------------------------------------------------------------- 4. start-up refuses what cannot work, early

BAD_SETTINGS = [
    (dict(port=99999), "--port must be an integer in [1, 65535], got 99999"), (dict(port=0), "--port"),
    (dict(port=-1), "--port"), (dict(port=True), "--port"), (dict(port="8000"), "--port"),
    (dict(max_batch=0), "--max-batch"), (dict(max_batch=10**6), "--max-batch"), (dict(max_batch=2.0), "--max-batch"),
    (dict(host=""), "--host"), (dict(host=None), "--host"), (dict(max_body_bytes=0), "--max-body-bytes"),
    (dict(max_adapters=0), "--max-adapters"), (dict(max_adapter_experts=0), "--max-adapter-experts"),
    (dict(dtype="float8"), "dtype must be"), (dict(device="tpu"), "device must be"),
    (dict(template="x"), "--template"), (dict(scheduler="x"), "--scheduler"),
    (dict(limits=Limits(max_tokens=0)), "max_tokens must be >= 1"),
    (dict(limits=Limits(timeout_s=float("nan"))), "timeout_s"), (dict(adapter_root="/no/such/dir"), "--adapter-root"),
    (dict(device_map="/no/such/map.json"), "not found"), (dict(api_key=""), "API key"),
]


@pytest.mark.parametrize("over,why", BAD_SETTINGS)
def test_bad_settings_are_refused_before_the_model_loads(monkeypatch, over, why):
    import esft.models.loading as loading
    import uvicorn

    def never(*a, **k):
        raise AssertionError("got past the checks")

    monkeypatch.setattr(loading, "load_model", never)
    monkeypatch.setattr(uvicorn, "run", never)
    with pytest.raises(ServeConfigError, match=__import__("re").escape(why)):
        serve(ServeConfig(**over))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_cli_error(capsys):
    from esft.cli import main

    assert main(["serve", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "esft serve: error:" in err and "no CUDA GPU" in err


def test_the_cli_exits_2_on_a_bad_port_and_on_a_bad_start_up_adapter_before_listening(srv, monkeypatch, capsys):
    import uvicorn

    from esft.cli import main

    def never(*a, **k):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", never)
    assert main(["serve", "--port", "99999"]) == 2
    assert "--port must be an integer in [1, 65535], got 99999" in capsys.readouterr().err
    root = srv["root"]
    (root / "cli_broken").mkdir(exist_ok=True)
    (root / "cli_broken" / "expert_cfg.json").write_text("{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--model", str(srv["tiny"] / "model"), "--adapter-root", str(root), "--device", "cpu",
            "--port", str(port), "--adapter", "good=A", "--adapter", "bad=cli_broken"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "esft serve: error: --adapter bad=cli_broken cannot be served" in err
    assert main(args[:-2] + ["--adapter", "bad name=A"]) == 2
    assert "adapter name 'bad name' is not allowed" in capsys.readouterr().err


def test_a_port_in_use_or_a_foreign_address_is_refused_before_the_model_loads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServeConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_bindable("127.0.0.1", port)
    with pytest.raises(ServeConfigError, match="cannot listen on 203.0.113.7"):  # a documentation address
        check_bindable("203.0.113.7", port)
    check_bindable("127.0.0.1", port)  # free again


# ---------------------------------------------------------------- 6. no NaN or Infinity in any response

def test_log_probabilities_of_impossible_tokens_are_finite(srv, monkeypatch):
    """A model that gives most tokens no mass at all (-inf scores, e.g. a masked vocabulary): their
    log-probabilities are -inf, which JSON cannot carry; OpenAI writes -9999.0."""
    url, engine = srv["url"], srv["engine"]
    forward = engine._forward

    def masked(*a, **k):
        logits = forward(*a, **k)
        logits[..., 6:] = float("-inf")  # 6 tokens keep their mass
        return logits

    monkeypatch.setattr(engine, "_forward", masked)
    for stream in (False, True):
        for path, body in (("/v1/completions", {**COMPLETION, "logprobs": 5, "max_tokens": 3}),
                           ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 12, "max_tokens": 3})):
            status, _, raw = _call(url + path, {**body, "stream": stream, "ignore_eos": True})
            assert status == 200
            chunks = _sse(raw) if stream else [_strict_json(raw)]
            values = []
            for c in chunks:
                for ch in c["choices"]:
                    lp = ch.get("logprobs")
                    if lp and "content" in lp:
                        values += [t["logprob"] for e in lp["content"] for t in [e] + e["top_logprobs"]]
                    elif lp:
                        values += lp["token_logprobs"] + [v for d in lp["top_logprobs"] for v in d.values()]
            assert values and all(math.isfinite(v) for v in values)
            if "chat" in path:
                assert -9999.0 in values  # 12 asked for, 6 possible


def test_logprob_values_are_finite_for_any_scores():
    from esft.serving.engine import _logprobs

    scores = torch.tensor([0.0, float("-inf"), 3.0, float("-inf"), -1e30])
    token, lp, top = _logprobs(scores, 1, 5)
    assert lp == -9999.0 and all(math.isfinite(v) for _, v in top) and len(top) == 5
    assert len(_logprobs(scores, 0, 40)[2]) == 5  # more asked than the vocabulary has: all of it
