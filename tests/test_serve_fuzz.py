"""Property-based fuzzing of `esft serve`'s HTTP API: no request, whether its schema allows it or not, gets a 5xx,
and every JSON answer is standard JSON (no NaN / Infinity).

Two generators, both bounded (examples per run, and every request short: the server caps max_tokens at 4):
schemathesis draws requests for every operation of the served /openapi.json, valid ones and ones that break
the schema; hypothesis takes valid bodies and puts arbitrary JSON into some fields (wrong types, huge
numbers, lone surrogates, deep nesting), with model names that exist so that the requests reach the engine.
Runs are derandomised (the same examples every time); ESFT_FUZZ_EXAMPLES=N runs N per test instead of the
default, ESFT_FUZZ_RANDOM=1 draws new ones.
"""

import json
import os
import urllib.error
import urllib.request

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from esft.adapter.fingerprint import model_fingerprint  # noqa: E402
from esft.adapter.io import save_adapter  # noqa: E402
from esft.models.loading import load_model  # noqa: E402
from esft.serving.engine import Limits  # noqa: E402
from esft.serving.server import BackgroundServer, ServeConfig, build_app, start_engine  # noqa: E402
from esft.training.experts import apply_esft  # noqa: E402

EXAMPLES = int(os.environ.get("ESFT_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(deadline=None, database=None, derandomize=not os.environ.get("ESFT_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck), print_blob=True)
ADMIN = {"Authorization": "Bearer adm1n"}


@pytest.fixture(scope="module")
def api(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model, _ = load_model(tiny_dir / "model")
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": {1: [2, 7], 2: [0, 11]}})
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    save_adapter(plan, root / "A", fp)
    cfg = ServeConfig(model=str(tiny_dir / "model"), adapters={"a": "A"}, adapter_root=str(root), admin_token="adm1n",
                      device="cpu", dtype="float32", max_batch=8, max_body_bytes=1 << 16,
                      limits=Limits(max_tokens=4, default_max_tokens=2, timeout_s=60))
    engine = start_engine(cfg)
    with BackgroundServer(build_app(engine, cfg)) as srv:
        yield {"url": srv.url, "engine": engine}
    engine.close()


def _strict(raw: bytes):
    def refuse(name):
        raise AssertionError(f"{name} in a response")
    return json.loads(raw, parse_constant=refuse)


def _check_answer(status: int, ctype: str, raw: bytes, what) -> None:
    assert status < 500, (what, status, raw[:500])
    if "json" in ctype:
        _strict(raw)
    elif "event-stream" in ctype:  # every (complete) event of a stream is standard JSON too
        for event in raw.decode().split("\n\n")[:-1]:
            if event != "data: [DONE]":
                _strict(event.removeprefix("data: ").encode())


def _keep_adapter(api) -> None:
    """A generated DELETE may unload 'a': load it again, so later requests still reach an adapter."""
    if "a" not in api["engine"].weaver.names():
        req = urllib.request.Request(api["url"] + "/admin/adapters", data=json.dumps({"name": "a", "path": "A"}).encode(),
                                     headers={**ADMIN, "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200


def test_schemathesis_no_5xx_for_requests_the_schema_allows_or_forbids(api):
    from schemathesis import GenerationMode

    with urllib.request.urlopen(api["url"] + "/openapi.json") as r:  # the schema the server serves
        schema = schemathesis.openapi.from_dict(json.loads(r.read()))
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @settings(FUZZ, max_examples=EXAMPLES or 400)
    @given(case=cases, model=st.sampled_from([None, "base", "a"]))
    def check(case, model):
        if model and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = model  # a name that exists: the request reaches the engine
        response = case.call(base_url=api["url"], headers=ADMIN, timeout=60)
        _check_answer(response.status_code, response.headers.get("content-type", [""])[0], response.content,
                      (case.method, case.formatted_path, case.body))
        _keep_adapter(api)

    check()


# arbitrary JSON: what a field may be sent as, by mistake or on purpose. Strings mix ASCII (control characters
# too), any character, and lone surrogates, which JSON's \ud800 escapes can carry and no tokenizer encodes.
CHARS = (st.characters(codec="ascii") | st.characters()
         | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]))
TEXT = st.lists(CHARS, max_size=20).map("".join)  # st.text() would leave the surrogates out
LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**80)
          | st.floats(allow_nan=False, allow_infinity=False) | TEXT
          | st.sampled_from(["", "false", "5", "base", "a", "user", "text"]))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)
COMPLETION = {"model": "a", "prompt": "hello there", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "seed": 1,
              "n": 2, "stop": ["x"], "stream": False, "logprobs": 2, "ignore_eos": True,
              "stream_options": {"include_usage": True}}
CHAT = {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3,
        "temperature": 1.0, "top_p": 0.5, "seed": 2, "n": 1, "stop": "y", "stream": True, "logprobs": True,
        "top_logprobs": 3, "ignore_eos": False, "max_completion_tokens": 2}


TEXT_FIELDS = {"/v1/completions": ["prompt", "stop", "model"], "/v1/chat/completions": ["messages", "stop", "model"],
               "/admin/adapters": ["name", "path"]}


@st.composite
def mutated(draw):
    """A valid body with either one string field holding arbitrary text, or 1-3 fields replaced by arbitrary
    JSON or dropped (one change at a time reaches further: two bad fields stop at the first)."""
    path, base = draw(st.sampled_from([("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT),
                                       ("/admin/adapters", {"name": "fuzzed", "path": "A"})]))
    body = dict(base)
    if draw(st.booleans()):
        field, text = draw(st.sampled_from(TEXT_FIELDS[path])), draw(TEXT)
        body[field] = [{"role": "user", "content": text}] if field == "messages" else text
    else:
        for field in draw(st.lists(st.sampled_from(sorted(base) + ["extra"]), min_size=1, max_size=3, unique=True)):
            if draw(st.booleans()):
                body[field] = draw(JSON)
            else:
                body.pop(field, None)
    if path != "/admin/adapters" and draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return path, body


def test_hypothesis_no_5xx_for_valid_bodies_with_arbitrary_fields(api):
    @settings(FUZZ, max_examples=EXAMPLES or 400)
    @given(job=mutated())
    def check(job):
        path, body = job
        req = urllib.request.Request(api["url"] + path, data=json.dumps(body).encode(), method="POST",
                                     headers={**ADMIN, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, ctype, raw = r.status, r.headers.get("content-type", ""), r.read()
        except urllib.error.HTTPError as e:
            status, ctype, raw = e.code, e.headers.get("content-type", ""), e.read()
        _check_answer(status, ctype, raw, (path, body))
        if path == "/admin/adapters" and status == 200:  # keep the slots free for the next loads
            name = json.loads(raw)["loaded"]
            urllib.request.urlopen(urllib.request.Request(api["url"] + "/admin/adapters/" + name, method="DELETE",
                                                          headers=ADMIN), timeout=60).read()

    check()
    assert api["engine"].thread.is_alive()
