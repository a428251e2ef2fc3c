"""`esft serve` on the shipped model with two woven adapters, driven by the official openai client."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from esft.adapter.fingerprint import model_fingerprint  # noqa: E402
from esft.adapter.io import merge_adapter, save_adapter  # noqa: E402
from esft.embedded import embedded_model_dir  # noqa: E402
from esft.eval.generate import generate  # noqa: E402
from esft.models.loading import load_model  # noqa: E402
from esft.serving.engine import GenParams  # noqa: E402
from esft.serving.server import BackgroundServer, ServeConfig, build_app, start_engine  # noqa: E402
from esft.training.experts import apply_esft  # noqa: E402

SELS = {"A": {1: [0, 5, 9], 2: [3]}, "B": {2: [3, 17], 3: [30]}}
QUESTIONS = ["What is 12 plus 7?", "Reverse the list [1, 2, 3].", "Translate: the red house"]


def _make_adapter(out, sel, seed, meta=None):
    model, _ = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": sel})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 2)  # strong enough to change greedy answers
    save_adapter(plan, out, fp, meta)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, sel) in enumerate(SELS.items()):
        _make_adapter(root / name, sel, i)
    cfg = ServeConfig(adapters={"a": "A", "b": "B"}, adapter_root=str(root), admin_token="adm1n", dtype="float32",
                      device="cpu", max_batch=8)
    engine = start_engine(cfg)
    with BackgroundServer(build_app(engine, cfg)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        yield {"client": client, "url": srv.url, "root": root, "engine": engine}
    engine.close()


def _alone(adapter_dir):
    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    if adapter_dir is not None:
        merge_adapter(model, adapter_dir)
    return model.eval(), tok


def _post(url, body, token=None, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_base_and_adapters(server):
    assert [m.id for m in server["client"].models.list().data] == ["base", "a", "b"]


def test_chat_greedy_equals_each_model_alone_and_streaming_equals_plain(server):
    client = server["client"]
    answers = {}
    for name, adir in (("base", None), ("a", server["root"] / "A"), ("b", server["root"] / "B")):
        model, tok = _alone(adir)
        want = generate(model, tok, QUESTIONS, max_new_tokens=16)
        got = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], temperature=0,
                                              max_tokens=16).choices[0].message.content.strip() for q in QUESTIONS]
        assert got == want, name
        answers[name] = got
        chunks = client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                temperature=0, max_tokens=16, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == want[0]
    assert answers["a"] != answers["base"] or answers["b"] != answers["base"]  # the adapters change answers


def test_completions_stop_length_and_sampling(server):
    client = server["client"]
    r = client.completions.create(model="a", prompt="User: Count to five.\n\nAssistant:", temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 5
    full = r.choices[0].text
    if len(full.strip()) > 2:
        stop = full.strip()[1:3]
        s = client.completions.create(model="a", prompt="User: Count to five.\n\nAssistant:", temperature=0,
                                      max_tokens=5, stop=[stop])
        assert stop not in s.choices[0].text and full.startswith(s.choices[0].text)
    same = [client.completions.create(model="b", prompt="User: hi\n\nAssistant:", temperature=1.0, top_p=0.9,
                                      max_tokens=8, seed=7).choices[0].text for _ in range(2)]
    assert same[0] == same[1]  # a seed makes sampling reproducible


def test_concurrent_mixed_requests_get_their_own_tokens(server):
    client = server["client"]
    jobs = [(m, q) for m in ("base", "a", "b") for q in QUESTIONS] * 2

    def ask(job):
        m, q = job
        return client.chat.completions.create(model=m, messages=[{"role": "user", "content": q}], temperature=0,
                                              max_tokens=12).choices[0].message.content

    solo = {job: ask(job) for job in dict.fromkeys(jobs)}
    before = server["engine"].stats["max_batch_seen"]
    with ThreadPoolExecutor(9) as ex:
        together = list(ex.map(ask, jobs))
    assert together == [solo[j] for j in jobs]
    assert server["engine"].stats["max_batch_seen"] >= max(before, 2)  # requests really shared batches


def test_bad_requests_get_clear_errors(server):
    client, url = server["client"], server["url"]
    with pytest.raises(openai.NotFoundError, match="available: base, a, b"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="a", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="a", prompt="word " * 5000, max_tokens=4)
    status, body = _post(url + "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {"model": "a", "messages": [{"role": "assistant", "content": "x"}]})
    assert status == 400 and "last message" in body["error"]["message"]
    for bad, why in (({"seed": 2**64}, "seed"), ({"max_tokens": 0}, "max_tokens"), ({"messages": ["hi"]}, "messages.0"),
                     ({"top_p": 0}, "top_p"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):
        req = {"model": "a", "messages": [{"role": "user", "content": "x"}], **bad}
        status, body = _post(url + "/v1/chat/completions", req)
        assert status == 400 and why in body["error"]["message"], (bad, body)
    status, body = _post(url + "/v1/completions", b'{"model": "a", "prompt": "x", "max_tokens": Infinity}')
    assert status == 400 and "Infinity is not a JSON number" in body["error"]["message"]
    # content as a list of text parts (what many clients send) and a vanishing temperature both work
    parts = [{"type": "text", "text": "What is 12 plus "}, {"type": "text", "text": "7?"}]
    r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": parts}], max_tokens=6,
                                       temperature=1e-30)
    want = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "What is 12 plus 7?"}],
                                          max_tokens=6, temperature=0)
    assert r.choices[0].message.content == want.choices[0].message.content


def test_admin_needs_token_stays_under_root_and_refuses_bad_adapters(server, tmp_path):
    url, client, root = server["url"], server["client"], server["root"]
    assert _post(url + "/admin/adapters", {"name": "c", "path": "A"})[0] == 401
    assert _post(url + "/admin/adapters", {"name": "c", "path": "A"}, token="wrong")[0] == 401
    status, body = _post(url + "/admin/adapters", {"name": "c", "path": "../"}, token="adm1n")
    assert status == 400 and "outside the adapter root" in body["error"]["message"]
    (root / "broken").mkdir()
    (root / "broken" / "expert_cfg.json").write_text("{}")
    status, body = _post(url + "/admin/adapters", {"name": "c", "path": "broken"}, token="adm1n")
    assert status == 400
    status, body = _post(url + "/admin/adapters", {"name": "c", "path": "A"}, token="adm1n")
    assert status == 200 and body["models"] == ["base", "a", "b", "c"]
    assert client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                          max_tokens=4).choices[0].message.content is not None
    assert _post(url + "/admin/adapters/c", b"", token="adm1n", method="DELETE")[0] == 200
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]


def test_api_key_is_enforced_when_set():
    from esft.serving.engine import Engine
    from esft.serving.weave import Weaver

    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    engine = Engine(model, tok, Weaver(model))
    try:
        with BackgroundServer(build_app(engine, ServeConfig(api_key="k3y"))) as srv:
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
            ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="k3y", max_retries=0).models.list()
            assert [m.id for m in ok.data] == ["base"]
    finally:
        engine.close()


def test_a_bad_start_up_adapter_stops_the_server_naming_it(server):
    """Serving part of what was asked for (with /health 200) hides the error: every refused adapter stops
    start-up, a missing or escaping path before the model loads, a damaged adapter right after."""
    from esft.serving.server import ServeConfigError, StartupError

    root = server["root"]
    (root / "broken_startup").mkdir(exist_ok=True)
    (root / "broken_startup" / "expert_cfg.json").write_text("{not json")
    for bad, error, why in ((("missing", "nope"), ServeConfigError, "not a directory"),
                            (("escape", "../.."), ServeConfigError, "outside the adapter root"),
                            (("broken", "broken_startup"), StartupError, "--adapter broken=broken_startup")):
        cfg = ServeConfig(adapters={"good": "A", bad[0]: bad[1]}, adapter_root=str(root), dtype="float32",
                          device="cpu")
        with pytest.raises(error, match=why):
            start_engine(cfg)


# ---------------------------------------------------------------- templates travel with adapters

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT_META = {"template": {"name": "chat", "chat_template": CHAT_TEMPLATE}}


def test_chat_requests_use_each_adapters_recorded_template(server):
    from esft.data.conversations import encode_reference
    from esft.eval.generate import PromptFormat

    url, client, root, engine = server["url"], server["client"], server["root"], server["engine"]
    _make_adapter(root / "C", SELS["A"], 5, CHAT_META)
    _make_adapter(root / "R", SELS["B"], 6, {"template": {"name": "reference", "chat_template": None}})
    for name, path in (("chatty", "C"), ("refy", "R")):
        assert _post(url + "/admin/adapters", {"name": name, "path": path}, token="adm1n")[0] == 200
    try:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
        tok = engine.tok
        assert not tok.chat_template  # the shipped tokenizer has none: the base keeps the reference template
        reference = encode_reference(msgs, tok)[0]
        assert engine.encode_chat(msgs) == reference and engine.encode_chat(msgs, "refy") == reference
        chat_ids = tok.apply_chat_template(msgs, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
        assert engine.encode_chat(msgs, "chatty") == list(chat_ids) != reference
        # end to end: the chat adapter's answer is its merged model's answer to the chat-formatted prompt
        model, tok = _alone(root / "C")
        want = generate(model, tok, QUESTIONS[:2], max_new_tokens=12, fmt=PromptFormat("chat", CHAT_TEMPLATE))
        got = [client.chat.completions.create(model="chatty", messages=[{"role": "user", "content": q}],
                                              temperature=0, max_tokens=12).choices[0].message.content.strip()
               for q in QUESTIONS[:2]]
        assert got == want
    finally:
        for name in ("chatty", "refy"):
            _post(url + f"/admin/adapters/{name}", b"", token="adm1n", method="DELETE")
    assert "chatty" not in engine.formats


def test_a_base_with_a_chat_template_uses_it():
    import copy

    from esft.serving.engine import Engine

    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE
    engine = Engine(model, tok)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        assert engine.base_format.name == "chat"
        assert engine.encode_chat(msgs) == list(tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False))
    finally:
        engine.close()


def test_an_explicit_template_that_conflicts_with_an_adapter_is_refused(server):
    from esft.serving.server import StartupError, _load

    root, engine = server["root"], server["engine"]
    _make_adapter(root / "C2", SELS["A"], 5, CHAT_META)
    with pytest.raises(ValueError, match=r"--template reference conflicts with adapter x .*C2\), which was trained "
                                         "with template 'chat'"):
        _load(engine, "x", root / "C2", template="reference")
    assert "x" not in engine.weaver.names()
    cfg = ServeConfig(adapters={"c": "C2", "a": "A"}, adapter_root=str(root), dtype="float32", device="cpu",
                      template="reference")
    with pytest.raises(StartupError, match="--adapter c=C2 cannot be served: .*conflicts with adapter c"):
        start_engine(cfg)
    other = start_engine(ServeConfig(adapters={"a": "A"}, adapter_root=str(root), dtype="float32", device="cpu",
                                     template="reference"))
    try:
        assert other.weaver.names() == ["a"] and other.formats["a"].name == "reference"
    finally:
        other.close()
    with pytest.raises(ValueError, match="base model's tokenizer has no chat template"):
        start_engine(ServeConfig(adapter_root=str(root), dtype="float32", device="cpu", template="chat"))


# ---------------------------------------------------------------- every EOS id of the generation config

def test_the_engine_stops_at_every_eos_id_of_the_generation_config(tiny_dir, tmp_path):
    import shutil

    from esft.data.conversations import prompt_text
    from esft.serving.engine import Engine

    model, tok = load_model(tiny_dir / "model")
    ids = [tok.bos_token_id] + tok.encode(prompt_text("Reverse: red cat"), add_special_tokens=False)
    free = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert free[2] not in free[:2] and tok.eos_token_id not in free[:3]
    d = tmp_path / "two_eos"  # the tiny checkpoint, its generation config listing [eos, the 3rd greedy token]
    shutil.copytree(tiny_dir / "model", d)
    gc = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gc, "eos_token_id": [tok.eos_token_id, free[2]]}))
    model, tok = load_model(d)
    engine = Engine(model, tok)
    try:
        req = engine.submit(None, ids, GenParams(max_tokens=6, temperature=0))
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(req.events.get(timeout=60))
        assert events[-1] == ("done", "stop", 2)
        assert "".join(e[1] for e in events if e[0] == "text") == tok.decode(free[:2], skip_special_tokens=True)
    finally:
        engine.close()


# ---------------------------------------------------------------- device maps

def test_serve_loads_the_base_through_a_device_map_and_refuses_disk_offload(tiny_dir, tmp_path):
    from esft.serving.engine import Engine

    model, tok = load_model(tiny_dir / "model")
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": {2: [0, 1]}})
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * p.std() * 2)
    save_adapter(plan, tmp_path / "ad", fp)
    modules = ["model.embed_tokens", "model.norm", "lm_head"] + [f"model.layers.{i}" for i in range(3)]
    (tmp_path / "cpu.json").write_text(json.dumps({m: "cpu" for m in modules}))

    def answers(engine: Engine):
        out = []
        for adapter in (None, "ad"):
            req = engine.submit(adapter, engine.encode_chat([{"role": "user", "content": "Reverse: red cat"}]),
                                GenParams(max_tokens=6, temperature=0))
            events = []
            while not events or events[-1][0] not in ("done", "error"):
                events.append(req.events.get(timeout=60))
            out.append(events)
        return out

    got = {}
    for key, dmap in (("memory", None), ("mapped", str(tmp_path / "cpu.json"))):
        engine = start_engine(ServeConfig(model=str(tiny_dir / "model"), adapters={"ad": "ad"},
                                          adapter_root=str(tmp_path), device="cpu", device_map=dmap))
        try:
            assert engine.weaver.names() == ["ad"]
            got[key] = answers(engine)
        finally:
            engine.close()
    assert got["mapped"] == got["memory"] and got["memory"][0] != got["memory"][1]
    (tmp_path / "disk.json").write_text(json.dumps({m: ("disk" if m == "model.layers.1" else "cpu") for m in modules}))
    with pytest.raises(ValueError, match=r"the device map leaves \d+ tensors on disk \(e.g. model.layers.1."):
        start_engine(ServeConfig(model=str(tiny_dir / "model"), device="cpu", device_map=str(tmp_path / "disk.json")))


def test_an_adapters_format_is_in_place_as_soon_as_it_is_routable_and_gone_if_its_load_fails(server, monkeypatch):
    from esft.serving.server import _load

    url, root, engine = server["url"], server["root"], server["engine"]
    _make_adapter(root / "C3", SELS["A"], 5, CHAT_META)
    weaver, write = engine.weaver, engine.weaver._write
    seen = []

    def watch(loaded, routed):  # weaver.load writes the slots; the name is routable once it returns
        seen.append(({n: engine.formats.get(n) for n in weaver.names()}, engine.formats.get("c3")))
        write(loaded, routed)

    monkeypatch.setattr(weaver, "_write", watch)
    _load(engine, "c3", root / "C3")
    try:
        routable, fmt = seen[-1]
        assert "c3" in weaver.names() and "c3" not in routable
        assert fmt is not None and fmt.name == "chat"
        assert all(f is not None for f in routable.values())

        # loading under a loaded name is refused and leaves its format alone
        with pytest.raises(ValueError, match="already loaded"):
            _load(engine, "c3", root / "A")
        assert engine.formats["c3"].name == "chat"
    finally:
        _post(url + "/admin/adapters/c3", b"", token="adm1n", method="DELETE")
    assert "c3" not in engine.formats

    def broken(loaded, routed):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(weaver, "_write", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        _load(engine, "c3", root / "C3")
    assert "c3" not in weaver.names() and "c3" not in engine.formats
    monkeypatch.setattr(weaver, "_write", write)
    _make_adapter(root / "other", SELS["A"], 5)  # a bad adapter: refused by the weaver, no format left behind
    meta = json.loads((root / "other" / "esft_adapter.json").read_text())
    meta["base_model"]["weights"] = "0" * 16
    (root / "other" / "esft_adapter.json").write_text(json.dumps(meta))
    status, body = _post(url + "/admin/adapters", {"name": "o", "path": "other"}, token="adm1n")
    assert status == 400 and "different base model" in json.dumps(body)
    assert "o" not in weaver.names() and "o" not in engine.formats
    # a name routable without a format (never set by the server) is refused, not given a guessed format
    with pytest.raises(KeyError, match="no adapter named 'ghost'"):
        engine.encode_chat([{"role": "user", "content": "hi"}], "ghost")


# ---------------------------------------------------------------- continuous batching

def test_continuous_batching_equals_greedy_generate_token_for_token(server):
    """Requests of two adapters and the base, more than the slots (rows are freed and reused), prompts
    prefilled in chunks of 8 tokens while other rows decode: each answer equals its merged model's greedy
    generate() of that prompt alone; the static scheduler gives the same answers."""
    from esft.eval.generate import PromptFormat, generate_ids
    from esft.serving.engine import Engine, Limits
    from esft.serving.weave import Weaver

    root = server["root"]
    dirs = {None: None, "a": root / "A", "b": root / "B"}
    questions = QUESTIONS + ["Sort the list [9, 4, 7, 1]."]
    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    prompts = [PromptFormat().encode(tok, q) for q in questions]
    jobs = [(name, p) for p in prompts for name in dirs]
    want = {}
    for name, adir in dirs.items():
        m, _ = _alone(adir)
        for p, w in zip(prompts, generate_ids(m, tok, prompts, max_new_tokens=12, batch_size=1)):
            want[(name, tuple(p))] = w
    weaver = Weaver(model)
    for name in ("a", "b"):
        weaver.load(name, dirs[name])
    got = {}
    for scheduler in ("continuous", "static"):
        engine = Engine(model, tok, weaver, max_batch=4, scheduler=scheduler, limits=Limits(prefill_chunk=8))
        try:
            reqs = [engine.submit(n, p, GenParams(max_tokens=12)) for n, p in jobs]
            got[scheduler] = []
            for r in reqs:
                events = [r.events.get(timeout=60)]
                while events[-1][0] == "text":
                    events.append(r.events.get(timeout=60))
                assert events[-1][0] == "done", events[-1]
                got[scheduler].append("".join(e[1] for e in events if e[0] == "text").strip())
            assert engine.stats["max_batch_seen"] == 4 and engine.running() == 0
        finally:
            engine.close()
    expected = [want[(n, tuple(p))] for n, p in jobs]
    assert got["continuous"] == expected
    assert got["static"] == expected
    assert len(set(expected)) > len(questions)  # the adapters really answer differently


# ---------------------------------------------------------------- API coverage

def _reference_logprobs(adapter_dir, prompt_ids, steps, k):
    """Greedy tokens of the merged model with each one's log-probability and the k most likely, recomputed
    from the whole sequence at every step (no cache): [(token text, logprob, [(text, logprob)] * k)]."""
    model, tok = _alone(adapter_dir)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(steps):
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            t = int(lp.argmax())
            if t == tok.eos_token_id:
                break
            top = lp.topk(k)
            out.append((tok.decode([t]), float(lp[t]), [(tok.decode([int(i)]), float(v))
                                                         for v, i in zip(top.values, top.indices)]))
            ids.append(t)
    return out


def test_logprobs_of_chat_and_completions_match_each_merged_model(server):
    client, engine, root = server["client"], server["engine"], server["root"]
    msgs = [{"role": "user", "content": QUESTIONS[1]}]
    for name, adir in (("base", None), ("a", root / "A"), ("b", root / "B")):
        want = _reference_logprobs(adir, engine.encode_chat(msgs, None if name == "base" else name), 6, 3)
        r = client.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=6, logprobs=True,
                                           top_logprobs=3)
        got = r.choices[0].logprobs.content
        assert [g.token for g in got] == [w[0] for w in want], name
        for g, w in zip(got, want):
            assert abs(g.logprob - w[1]) < 1e-4 and g.bytes == list(w[0].encode())
            assert [t.token for t in g.top_logprobs] == [t for t, _ in w[2]]
            assert all(abs(t.logprob - v) < 1e-4 for t, (_, v) in zip(g.top_logprobs, w[2]))
    prompt = "User: Count to five.\n\nAssistant:"
    want = _reference_logprobs(root / "A", engine.encode_completion(prompt), 4, 2)
    r = client.completions.create(model="a", prompt=prompt, temperature=0, max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [w[0] for w in want] and "".join(lp.tokens) == r.choices[0].text
    assert all(abs(a - w[1]) < 1e-4 for a, w in zip(lp.token_logprobs, want))
    assert [list(t) for t in lp.top_logprobs] == [[t for t, _ in w[2]] for w in want]
    assert lp.text_offset == [sum(len(w[0]) for w in want[:i]) for i in range(len(want))]
    chunks = list(client.completions.create(model="a", prompt=prompt, temperature=0, max_tokens=4, logprobs=2,
                                            stream=True))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens


def test_n_choices_usage_in_streams_and_ignore_eos(server):
    client = server["client"]
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    kw = dict(model="b", messages=msgs, temperature=1.0, max_tokens=8, n=3, seed=11, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 3 * 8
    assert r.usage.prompt_tokens == len(server["engine"].encode_chat(msgs, "b"))  # the prompt counts once
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert len({c.message.content for c in r.choices}) > 1  # seed, seed + 1, seed + 2: different samples
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for i, c in enumerate(r.choices):
        assert "".join(k.choices[0].delta.content or "" for k in chunks if k.choices and k.choices[0].index == i) \
            == c.message.content
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(k.usage is None for k in chunks[:-1])
    # ignore_eos (vLLM's extra body field): exactly max_tokens, where the model alone stops early
    short = client.completions.create(model="base", prompt="User: hi\n\nAssistant:", temperature=0, max_tokens=60)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 60
    full = client.completions.create(model="base", prompt="User: hi\n\nAssistant:", temperature=0, max_tokens=60,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 60
    with pytest.raises(openai.BadRequestError, match=r"n: must be <= 8"):
        client.chat.completions.create(model="b", messages=msgs, n=9)


def test_a_stop_string_spanning_tokens_ends_a_stream_before_it(server):
    client, tok = server["client"], server["engine"].tok
    prompt = "User: Translate: the red house and the blue car\n\nAssistant:"
    r = client.completions.create(model="a", prompt=prompt, temperature=0, max_tokens=24, logprobs=0)
    text, pieces = r.choices[0].text, r.choices[0].logprobs.tokens
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    # two characters either side of a token boundary, the first occurrence of that string being there
    cut = next(e for e in ends[1:-1] if e >= 2 and len(text) - e >= 2 and text.find(text[e - 2:e + 2]) == e - 2)
    stop = text[cut - 2:cut + 2]
    chunks = list(client.completions.create(model="a", prompt=prompt, temperature=0, max_tokens=24, stop=[stop],
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[: cut - 2]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert tok  # the stop string is not any single token's text
    assert all(stop not in p for p in pieces)


def test_health_metrics_and_the_api_key_guarding_docs(server):
    url = server["url"]
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}
    for name in ("a", "base"):
        server["client"].chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with urllib.request.urlopen(url + "/metrics") as r:
        text = r.read().decode()
    for line in ("esft_queue_length 0", "esft_running_requests ", "esft_generation_tokens_per_second ",
                 'esft_requests_total{model="a"} ', 'esft_requests_total{model="base"} ', "# TYPE esft_requests_total counter"):
        assert line in text, line
    from esft.serving.engine import Engine

    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    engine = Engine(model, tok)
    try:
        with BackgroundServer(build_app(engine, ServeConfig(api_key="k3y"))) as srv:
            for path in ("/docs", "/openapi.json", "/metrics", "/v1/models"):
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(srv.url + path)
                assert e.value.code == 401, path
                ok = urllib.request.Request(srv.url + path, headers={"Authorization": "Bearer k3y"})
                with urllib.request.urlopen(ok) as r:
                    assert r.status == 200
            with urllib.request.urlopen(srv.url + "/health") as r:  # probes need no key
                assert r.status == 200
    finally:
        engine.close()


# ---------------------------------------------------------------- bad input and safety

def test_oversized_bodies_full_queues_and_max_tokens_over_the_cap_are_refused():
    import threading

    from esft.serving.engine import Engine, Limits

    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    engine = Engine(model, tok, max_batch=1, limits=Limits(max_tokens=100, max_queue=1))
    try:
        with BackgroundServer(build_app(engine, ServeConfig(max_body_bytes=2000))) as srv:
            big = {"model": "base", "prompt": "x" * 3000}
            status, body = _post(srv.url + "/v1/completions", big)
            assert status == 413 and "at most 2000" in body["error"]["message"]
            status, body = _post(srv.url + "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 101})
            assert status == 400 and "cap of 100 tokens" in body["error"]["message"]
            results = []
            with engine.exclusive():  # the worker is held: the first request waits in the queue
                t = threading.Thread(target=lambda: results.append(_post(srv.url + "/v1/completions", {
                    "model": "base", "prompt": "hi", "max_tokens": 3})))
                t.start()
                while engine.queue_length() < 1:
                    t.join(0.01)
                req = urllib.request.Request(srv.url + "/v1/completions", method="POST",
                                             data=json.dumps({"model": "base", "prompt": "hi"}).encode(),
                                             headers={"Content-Type": "application/json"})
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(req)
                assert e.value.code == 429 and 1 <= int(e.value.headers["Retry-After"]) <= 60
                assert "--max-queue 1" in json.loads(e.value.read())["error"]["message"]
            t.join(60)
            assert results and results[0][0] == 200  # the queued one is served once the worker runs
    finally:
        engine.close()


def test_links_inside_an_adapter_that_lead_out_of_the_root_are_refused(server, tmp_path):
    import shutil

    url, root = server["url"], server["root"]
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"not yours")
    shutil.copytree(root / "A", root / "linky")
    target = next(p for p in (root / "linky").iterdir() if p.suffix == ".safetensors")
    target.unlink()
    target.symlink_to(outside)
    status, body = _post(url + "/admin/adapters", {"name": "l", "path": "linky"}, token="adm1n")
    assert status == 400 and "is a link to" in body["error"]["message"] and "outside the adapter root" in \
        body["error"]["message"]
    target.unlink()
    target.symlink_to(root / "A" / target.name)  # a link that stays inside the root is fine
    status, body = _post(url + "/admin/adapters", {"name": "l", "path": "linky"}, token="adm1n")
    assert status == 200
    assert _post(url + "/admin/adapters/l", b"", token="adm1n", method="DELETE")[0] == 200


def _open_and_drop(url, body, read_bytes, started=None):
    """POST ``body``, read the response's first bytes (0: none; wait until ``started()``), close the connection."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if read_bytes:
        conn.getresponse().read(read_bytes)
    else:
        import time

        deadline = time.monotonic() + 30
        while not started() and time.monotonic() < deadline:
            time.sleep(0.02)
    conn.sock.close()
    conn.close()


def test_a_client_that_goes_away_frees_its_row_and_the_batch_goes_on(server):
    import time
    from concurrent.futures import ThreadPoolExecutor

    url, client, engine = server["url"], server["client"], server["engine"]
    long = {"model": "a", "prompt": "User: hi\n\nAssistant:", "temperature": 0, "max_tokens": 480, "ignore_eos": True}
    for stream, read in ((True, 64), (False, 0)):  # mid-stream, and while waiting for a plain answer
        before = engine.stats["finished"]["cancelled"]
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(lambda: client.completions.create(model="b", prompt="User: hi\n\nAssistant:",
                                                                  max_tokens=40, extra_body={"ignore_eos": True}))
            admitted = engine.stats["per_model"]["a"]
            _open_and_drop(url, {**long, "stream": stream}, read, lambda: engine.stats["per_model"]["a"] > admitted)
            deadline = time.monotonic() + 30
            while engine.stats["finished"]["cancelled"] == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.stats["finished"]["cancelled"] == before + 1, stream
            assert other.result(timeout=60).usage.completion_tokens == 40
        deadline = time.monotonic() + 10
        while engine.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running() == 0
