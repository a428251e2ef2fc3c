"""Weaving many adapters over one base (the expert overlay with preallocated slots): a batch mixing base, A and B
equals each alone on its merged model; loads write slots in place and never copy the base."""

import pytest
import torch

from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import AdapterError, merge_adapter, read_adapter, save_adapter
from esft.models.loading import load_model
from esft.overlay import ExpertOverlay
from esft.serving.loadmem import allocation_peak
from esft.serving.weave import Weaver, storage_bytes
from esft.training.experts import apply_esft
from conftest import make_adapter

SEL_A = {1: [2, 7], 2: [0, 11, 4]}
SEL_B = {1: [7, 3], 2: [5]}  # shares layer 1 expert 7 with A, with other weights




@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("weave")
    return {"A": make_adapter(tiny_dir, root / "A", SEL_A, 1), "B": make_adapter(tiny_dir, root / "B", SEL_B, 2)}


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


def _row_bytes(overlay) -> int:
    """Bytes of one expert's row of every fused parameter (weights and biases)."""
    return sum(p[0].numel() * p.element_size() for p in overlay.base.parameters())


def test_memory_is_base_plus_slots_from_start_up_and_unload_frees_the_slots(tiny_dir, adapters):
    model, tok = load_model(tiny_dir / "model")
    base_bytes = storage_bytes(model)
    w = Weaver(model.eval(), max_adapters=4, max_adapter_experts=5)
    overlays = [l.experts for l in w.layers.values()]
    assert all(isinstance(o, ExpertOverlay) and o.trained.gate_up_proj.shape[0] == 5 for o in overlays)
    slots = sum(5 * _row_bytes(o) for o in overlays)
    assert w.slot_bytes() == slots and storage_bytes(model) == base_bytes + slots
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    w.load("A", adapters["A"])
    w.load("B", adapters["B"])
    # the same storages as at start-up: nothing was reallocated, the rows were written in place
    assert storage_bytes(model) == base_bytes + slots
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    n_experts = sum(map(len, SEL_A.values())) + sum(map(len, SEL_B.values()))
    assert w.adapter_bytes() == n_experts * _row_bytes(overlays[0])
    assert w.slots()[2] == (5 - len(SEL_A[2]) - len(SEL_B[2]), 5)
    ids = torch.randint(3, len(tok), (2, 10), generator=torch.Generator().manual_seed(1))
    w.unload("A")
    assert w.slots()[2] == (5 - len(SEL_B[2]), 5) and storage_bytes(model) == base_bytes + slots
    w.set_rows(["B", None])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got[1], _alone(tiny_dir, None)(input_ids=ids[1:]).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[0], _alone(tiny_dir, adapters["B"])(input_ids=ids[:1]).logits[0],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match=r"no adapter named 'A' \(loaded: B\)"):
        w.set_rows(["A"])
    # A again, into the slots it left (and others): its answers are A's
    w.load("A", adapters["A"])
    w.set_rows(["A"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[:1]).logits[0],
                                   _alone(tiny_dir, adapters["A"])(input_ids=ids[:1]).logits[0], rtol=1e-5, atol=1e-5)


def test_peak_memory_during_a_load_stays_within_base_plus_slots(tiny_dir, adapters):
    """The model's storages are base + slots before, after and (no parameter is replaced) during a load; what a
    load allocates on top is the adapter's rows, layer by layer: far less than one layer's base experts, which
    any copy of the base would need (the earlier weave built a copy of every layer's experts per load)."""
    model, _ = load_model(tiny_dir / "model")
    w = Weaver(model.eval(), max_adapters=2, max_adapter_experts=4)
    held = storage_bytes(model)
    a = read_adapter(adapters["A"])  # the adapter file's own tensors are the input, read before
    peak = allocation_peak(lambda: w.load("A", a))
    assert w.names() == ["A"] and storage_bytes(model) == held
    overlay = next(iter(w.layers.values())).experts
    layer_experts = sum(p.numel() * p.element_size() for p in overlay.base.parameters())
    adapter_rows = max(map(len, SEL_A.values())) * _row_bytes(overlay)  # the largest layer of the adapter
    # measured: 2.9x the largest layer's rows (the fused rows, the stacked checkpoint tensors, index maps)
    assert 0 < peak <= 4 * adapter_rows < layer_experts, (peak, adapter_rows, layer_experts)
    # the measurement sees a copy of the base: the same window around one layer's clone is over the bound
    assert allocation_peak(lambda: [p.clone() for p in overlay.base.parameters()]) >= layer_experts > 4 * adapter_rows


def test_bad_adapters_are_refused_and_the_rest_keep_serving(tiny_dir, adapters, tmp_path):
    model, _ = load_model(tiny_dir / "model")
    w = Weaver(model.eval(), max_adapters=2, max_adapter_experts=4)
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
    # A holds 3 of layer 2's 4 slots; a second A needs 3 more
    with pytest.raises(AdapterError, match=r"layer 2 needs 3 adapter expert slots, 1 of 4 are free "
                                           r"\(esft serve --max-adapter-experts"):
        w.load("A2", adapters["A"])
    w.load("B", adapters["B"])
    with pytest.raises(AdapterError, match=r"2 adapters are loaded already.*--max-adapters"):
        w.load("C", adapters["B"])
    assert w.names() == ["A", "B"] and w.slots() == {1: (0, 4), 2: (0, 4)}
    with pytest.raises(ValueError, match="max_adapter_experts must be >= 1"):
        Weaver(_alone(tiny_dir, None), max_adapter_experts=0)


def _events(req, timeout=60):
    out = []
    while not out or out[-1][0] not in ("done", "error"):
        out.append(req.events.get(timeout=timeout))
    return out


def test_engine_fails_only_the_requests_of_an_unloaded_adapter(tiny_dir, adapters):
    from esft.serving.engine import Engine, GenParams

    model, tok = load_model(tiny_dir / "model")
    w = Weaver(model.eval(), max_adapters=2, max_adapter_experts=4)
    w.load("A", adapters["A"])
    engine = Engine(model, tok, w, max_batch=4)
    prompt = [1, 5, 6, 7]
    try:
        # queued: A is unloaded before the engine's next step (it cannot step while we hold it)
        with engine.exclusive():
            ok = engine.submit(None, prompt, GenParams(max_tokens=3, ignore_eos=True))
            gone = engine.submit("A", prompt, GenParams(max_tokens=3, ignore_eos=True))
            w.unload("A")
        assert _events(ok)[-1] == ("done", "length", 3)
        last = _events(gone)[-1]
        assert last[0] == "error" and "'A' was unloaded" in last[1] and last[2] == 404
        # running: A's request is mid-generation when A goes; the base request beside it goes on
        w.load("A", adapters["A"])
        long_a = engine.submit("A", prompt, GenParams(max_tokens=200, ignore_eos=True))
        long_base = engine.submit(None, prompt, GenParams(max_tokens=200, ignore_eos=True))
        assert long_a.events.get(timeout=60)[0] == "text"  # it has started
        with engine.exclusive():
            w.unload("A")
        events = _events(long_a)
        assert events[-1][0] == "error" and "'A' was unloaded" in events[-1][1]
        assert len(events) < 200  # it ended early
        assert _events(long_base)[-1] == ("done", "length", 200)
        # a request whose client went away ends at the next step, its neighbour does not
        with engine.exclusive():
            quit_ = engine.submit(None, prompt, GenParams(max_tokens=5, ignore_eos=True))
            other = engine.submit(None, prompt, GenParams(max_tokens=5, ignore_eos=True))
            quit_.cancelled = True
        assert _events(quit_) == [("done", "cancelled", 0)]
        assert _events(other)[-1] == ("done", "length", 5)
    finally:
        engine.close()


def test_a_failed_load_leaves_the_loaded_set_working(tiny_dir, adapters, monkeypatch):
    model, tok = load_model(tiny_dir / "model")
    w = Weaver(model.eval(), max_adapters=2, max_adapter_experts=4)
    w.load("A", adapters["A"])
    ids = torch.randint(3, len(tok), (1, 8), generator=torch.Generator().manual_seed(3))
    w.set_rows(["A"])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    calls = {"n": 0}
    real = ExpertOverlay.write

    def flaky(self, slots, rows):  # the second layer runs out of memory
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real(self, slots, rows)

    monkeypatch.setattr(ExpertOverlay, "write", flaky)
    free = w.slots()
    with pytest.raises(MemoryError):
        w.load("B", adapters["B"])
    assert w.names() == ["A"] and w.slots() == free
    assert all(int(l.experts.table[2].max()) == -1 for l in w.layers.values())  # B's row points nowhere
    w.set_rows(["A"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    monkeypatch.setattr(ExpertOverlay, "write", real)
    w.load("B", adapters["B"])  # the slots it half-wrote are free and reused
    w.set_rows(["B"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[0],
                                   _alone(tiny_dir, adapters["B"])(input_ids=ids).logits[0], rtol=1e-5, atol=1e-5)
