"""Weaving many adapters over one base: a batch mixing base, A and B equals each alone on its merged model."""

import pytest
import torch

from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import AdapterError, merge_adapter, save_adapter
from esft.models.loading import load_model
from esft.serving.weave import Weaver, storage_bytes
from esft.training.experts import apply_esft

SEL_A = {1: [2, 7], 2: [0, 11, 4]}
SEL_B = {1: [7, 3], 2: [5]}  # shares layer 1 expert 7 with A, with other weights


def _adapter(tiny_dir, out, sel, seed):
    model, _ = load_model(tiny_dir / "model")
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": sel})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # a visible change in every selected expert
    save_adapter(plan, out, fp)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("weave")
    return {"A": _adapter(tiny_dir, root / "A", SEL_A, 1), "B": _adapter(tiny_dir, root / "B", SEL_B, 2)}


def _alone(tiny_dir, adapter_dir):
    model, _ = load_model(tiny_dir / "model")
    if adapter_dir is not None:
        merge_adapter(model, adapter_dir)
    return model.eval()


def test_mixed_batch_matches_each_request_alone_on_its_merged_model(tiny_dir, adapters):
    model, tok = load_model(tiny_dir / "model")
    w = Weaver(model.eval())
    w.load("A", adapters["A"])
    w.load("B", adapters["B"])
    names = [None, "A", "B", "A", None, "B"]
    ids = torch.randint(3, len(tok), (len(names), 16), generator=torch.Generator().manual_seed(5))
    w.set_rows(names)
    with torch.no_grad():
        woven = model(input_ids=ids).logits
    refs = {n: _alone(tiny_dir, adapters[n] if n else None) for n in (None, "A", "B")}
    with torch.no_grad():
        for r, n in enumerate(names):
            torch.testing.assert_close(woven[r], refs[n](input_ids=ids[r:r + 1]).logits[0], rtol=1e-5, atol=1e-5)
        # the adapters really differ from the base and from each other on these inputs
        assert not torch.allclose(woven[1], woven[0], atol=1e-3) and not torch.allclose(woven[1], woven[2], atol=1e-3)

    # greedy generation with a KV cache: row for row the same tokens as each alone
    w.set_rows(names)
    gen = model.generate(input_ids=ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    for r, n in enumerate(names):
        alone = refs[n].generate(input_ids=ids[r:r + 1, :6], max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert gen[r].tolist() == alone[0].tolist()


def test_memory_is_base_plus_changed_experts_and_unload_restores(tiny_dir, adapters):
    model, tok = load_model(tiny_dir / "model")
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    w = Weaver(model.eval())
    w.load("A", adapters["A"])
    w.load("B", adapters["B"])
    layer = next(iter(w.layers.values())).experts.base
    per_expert = (layer.gate_up_proj[0].numel() + layer.down_proj[0].numel()) * layer.gate_up_proj.element_size()
    n_experts = sum(map(len, SEL_A.values())) + sum(map(len, SEL_B.values()))
    # the base experts are views into the woven tensors: held once
    assert storage_bytes(model) == base_bytes + n_experts * per_expert == base_bytes + w.adapter_bytes()
    # and the weaver keeps no second copy of the adapters: its tensors are views of the woven rows
    for experts in w.adapters.values():
        for (layer, _), (gu, down) in experts.items():
            woven = w.layers[layer].experts.all
            assert gu.untyped_storage().data_ptr() == woven.gate_up_proj.untyped_storage().data_ptr()
            assert down.untyped_storage().data_ptr() == woven.down_proj.untyped_storage().data_ptr()
    ids = torch.randint(3, len(tok), (2, 10), generator=torch.Generator().manual_seed(1))
    w.unload("A")
    assert storage_bytes(model) == base_bytes + sum(map(len, SEL_B.values())) * per_expert
    w.set_rows(["B", None])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[1], _alone(tiny_dir, None)(input_ids=ids[1:]).logits[0],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=ids).logits[0],
                                   _alone(tiny_dir, adapters["B"])(input_ids=ids[:1]).logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match=r"no adapter named 'A' \(loaded: B\)"):
        w.set_rows(["A"])
    w.unload("B")  # nothing woven any more: the base gets its own storage back
    assert storage_bytes(model) == base_bytes


def test_bad_adapters_are_refused_and_the_rest_keep_serving(tiny_dir, adapters, tmp_path):
    model, _ = load_model(tiny_dir / "model")
    w = Weaver(model.eval())
    w.load("A", adapters["A"])
    with pytest.raises(ValueError, match="already loaded"):
        w.load("A", adapters["B"])
    other, _ = load_model(tiny_dir / "model")
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # another base model
    fp = model_fingerprint(other)
    plan = apply_esft(other, {"experts": {1: [0]}})
    save_adapter(plan, tmp_path / "foreign", fp)
    with pytest.raises(AdapterError, match="different base model"):
        w.load("foreign", tmp_path / "foreign")
    plan = apply_esft(_alone(tiny_dir, None), {"experts": {1: [0]}, "non_expert_modules": True})
    save_adapter(plan, tmp_path / "dense", model_fingerprint(_alone(tiny_dir, None)))
    with pytest.raises(AdapterError, match="only routed-expert adapters can share one base model"):
        w.load("dense", tmp_path / "dense")
    assert w.names() == ["A"]


def test_engine_fails_only_the_requests_of_an_unloaded_adapter(tiny_dir, adapters):
    from esft.serving.engine import Engine, GenParams, Request

    model, tok = load_model(tiny_dir / "model")
    w = Weaver(model.eval())
    w.load("A", adapters["A"])
    engine = Engine(model, tok, w)
    try:
        ok = Request(None, [1, 5, 6, 7], GenParams(max_tokens=3, temperature=0, ignore_eos=True))
        gone = Request("B", [1, 5, 6, 7], GenParams(max_tokens=3, temperature=0))  # never loaded / unloaded
        with engine.lock:
            engine._run([ok, gone])
        events = [ok.events.get() for _ in range(ok.events.qsize())]
        assert events[-1][0] == "done" and events[-1][2] == 3
        kind, msg = gone.events.get_nowait()
        assert kind == "error" and "'B' was unloaded" in msg
        # a request whose client went away stops at the next step, its neighbours do not
        quit_ = Request(None, [1, 5, 6, 7], GenParams(max_tokens=5, temperature=0, ignore_eos=True))
        quit_.cancelled = True
        other = Request(None, [1, 5, 6, 7], GenParams(max_tokens=5, temperature=0, ignore_eos=True))
        with engine.lock:
            engine._run([quit_, other])
        last = [quit_.events.get() for _ in range(quit_.events.qsize())][-1]
        assert last[:2] == ("done", "cancelled") and last[2] == 0
        assert [other.events.get() for _ in range(other.events.qsize())][-1] == ("done", "length", 5)
    finally:
        engine.close()


def test_a_failed_rebuild_leaves_the_loaded_set_working(tiny_dir, adapters, monkeypatch):
    from esft.serving.weave import WovenExperts

    model, tok = load_model(tiny_dir / "model")
    w = Weaver(model.eval())
    w.load("A", adapters["A"])
    ids = torch.randint(3, len(tok), (1, 8), generator=torch.Generator().manual_seed(3))
    w.set_rows(["A"])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    calls = {"n": 0}
    real = WovenExperts.build

    def flaky(self, experts, table):  # the second layer runs out of memory
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real(self, experts, table)

    monkeypatch.setattr(WovenExperts, "build", flaky)
    with pytest.raises(MemoryError):
        w.load("B", adapters["B"])
    calls["n"] = 0
    with pytest.raises(MemoryError):
        w.unload("A")
    assert w.names() == ["A"]
    w.set_rows(["A"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
