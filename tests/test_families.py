"""Every supported model type of the installed transformers, on a tiny random config shrunk from its
config class's defaults: structure found, gate kind matches the router, profiling equals a naive
recomputation, adapter tensors equal what save_pretrained writes for the merged model, merged equals
attached, and a training step leaves every unselected parameter bit-identical."""

import pytest
import torch
from safetensors import safe_open

from esft.models.catalog import family_status
from esft.models.registry import (FAMILIES, UnsupportedModelError, get_family, model_class, moe_layers,
                                  router_scores)
from esft.models.routers import detect_gate
from esft.models.tiny import spread_routers, tiny_config
from esft.profiling.profiler import profile_routing
from esft.training.experts import apply_esft, unwrap_esft

TYPES = sorted(FAMILIES)


def _tiny(model_type, seed=0):
    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    model = model_class(cfg).from_config(cfg)
    spread_routers(model)
    return model.eval()


def _ids(model, b=2, t=7):
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(1))


def _capture(model, ids):
    """Each MoE layer's router outputs for one forward of ``ids``."""
    seen, handles = {}, []
    for l in moe_layers(model):
        handles.append(l.router.register_forward_hook(lambda m, i, o, k=l.index: seen.setdefault(k, o)))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_the_named_model_types_are_supported_and_every_refusal_says_why():
    status = {s.model_type: s for s in family_status()}
    supported = {t for t, s in status.items() if s.supported}
    assert {"gpt_oss", "glm4_moe", "qwen3_next", "qwen3_5_moe", "llama4", "deepseek_v4"} <= supported
    assert all(s.reason for s in status.values() if not s.supported)


def test_at_least_40_model_types_are_supported_and_each_is_in_the_family_test():
    supported = {s.model_type for s in family_status() if s.supported}
    assert len(supported) >= 40, sorted(supported)
    assert supported == set(TYPES)  # every supported type is a parameter of test_family below: none skipped


@pytest.mark.parametrize("model_type", TYPES)
def test_family(model_type, tmp_path):
    model = _tiny(model_type)
    family = get_family(model)
    layers = moe_layers(model)
    ids = _ids(model)

    # the family's gate kind is what its routers actually compute
    outs = _capture(model, ids)
    assert set(outs) == {l.index for l in layers}
    if family.router_outputs == "logits_weights_ids" and family.gate != "weights":
        for o in outs.values():
            assert detect_gate(o[0], o[1], o[2]) == family.gate

    # profiling = a naive recomputation from the router outputs (one sequence per row, no padding)
    prof = profile_routing(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    for l in layers:
        g, idx = router_scores(family, l.router, outs[l.index], l.top_k)
        B, T = ids.shape
        tok, gate = torch.zeros(l.num_experts, dtype=torch.float64), torch.zeros(l.num_experts, dtype=torch.float64)
        for n in range(B * T):
            for k in range(idx.shape[1]):
                tok[idx[n, k]] += 1.0 / (T * idx.shape[1] * B)
                gate[idx[n, k]] += float(g[n, k]) / (T * B)
        torch.testing.assert_close(torch.tensor(prof.token_scores[l.index], dtype=torch.float64), tok)
        torch.testing.assert_close(torch.tensor(prof.gate_scores[l.index], dtype=torch.float64), gate)

    # train two experts per layer one step: every other parameter stays bit-identical
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sel = {l.index: [1, l.num_experts - 1] for l in layers}
    plan = apply_esft(model, {"experts": sel})
    model.train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    with torch.no_grad():
        for p in plan.parameters():
            assert p.grad is not None
            p.add_(torch.randn_like(p))  # a large step, so that trained experts surely differ
    model.eval()
    with torch.no_grad():
        attached = model(input_ids=ids, use_cache=False).logits
    ours = plan.adapter_state_dict()
    unwrap_esft(model)
    fused = {l.index: dict(l.experts.named_parameters(recurse=False)) for l in moe_layers(model)}
    for n, p in model.named_parameters():
        layer = next((l for l in layers if n.startswith(l.experts_prefix + ".")), None)
        if layer is None:
            assert torch.equal(p, before[n]), n
            continue
        keep = [e for e in range(layer.num_experts) if e not in sel[layer.index]]
        assert torch.equal(p[keep], before[n][keep]), n
        assert not torch.equal(p[sel[layer.index]], before[n][sel[layer.index]]), n
    assert fused  # the merged model is the plain model again

    # merged logits equal base + attached adapter
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, attached, rtol=1e-5, atol=1e-5)

    # the adapter's tensors are what save_pretrained writes for the merged model (rows of fused keys)
    model.save_pretrained(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    written = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            written.update({k: st.get_tensor(k) for k in st.keys() if k in ours})
    assert set(ours) == set(written), sorted(set(ours) ^ set(written))[:5]
    for l in layers:
        for t in l.layout().tensors:
            for e in sel[l.index]:
                k = t.key(e)
                want = written[k] if t.per_expert else written[k][e]
                got = ours[k] if t.per_expert else ours[k][sel[l.index].index(e)]
                assert torch.equal(got, want), k


def test_unsupported_type_with_fused_experts_names_its_reason():
    with pytest.raises(UnsupportedModelError, match="not supported: zero-computation experts"):
        tiny_config("longcat_flash")


def test_model_type_without_family_entry_is_refused():
    with pytest.raises(UnsupportedModelError, match="'llama' is not a supported MoE family"):
        tiny_config("llama")


def test_families_command_lists_supported_types_and_reasons(capsys):
    import json

    from esft.cli import main

    assert main(["families", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert main(["families", "--supported", "--json"]) == 0
    supported = json.loads(capsys.readouterr().out)
    assert {r["model_type"] for r in supported} == {r["model_type"] for r in every if r["supported"]}
    assert len(supported) >= 40 and all(r["supported"] for r in supported)
    assert {"gpt_oss", "glm4_moe", "qwen3_next", "qwen3_5_moe", "llama4", "deepseek_v4"} <= {r["model_type"] for r in supported}
    refused = [r for r in every if not r["supported"]]
    assert refused and all(r["reason"] for r in refused)  # every unsupported type says why
