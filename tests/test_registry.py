"""Every registry entry against a tiny model of its family, and the checkpoint names it claims."""

import pytest
import torch
from safetensors import safe_open

from conftest import build_tiny
from esft.models.registry import UnsupportedModelError, get_family, moe_layers
from esft.models.tiny import TINY_CONFIGS as FAMILIES
from esft.models.tiny import TINY_CONFIGS
from esft.training.experts import apply_esft, unwrap_esft

EXPECTED_MOE_LAYERS = {"deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "qwen2_moe": [0, 1, 2],
                       "qwen3_moe": [0, 1, 2], "mixtral": [0, 1, 2], "olmoe": [0, 1, 2]}


def test_every_family_has_a_tiny_config():
    assert set(FAMILIES) == set(TINY_CONFIGS) == set(EXPECTED_MOE_LAYERS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_layers_routers_and_experts(family):
    model = build_tiny(family)
    layers = moe_layers(model)
    assert [l.index for l in layers] == EXPECTED_MOE_LAYERS[family]
    cfg = model.config
    for l in layers:
        assert l.num_experts == l.router.weight.shape[0]
        assert l.top_k == cfg.num_experts_per_tok
        logits, weights, idx = l.router(torch.randn(5, cfg.hidden_size))
        assert logits.shape == (5, l.num_experts) and idx.shape == (5, l.top_k)
    assert bool(layers[0].shared) == bool(get_family(model).shared_attrs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expert_keys_match_the_checkpoint_that_transformers_writes(family, tmp_path):
    """Our per-expert adapter keys and tensors equal what save_pretrained writes for the merged model."""
    model = build_tiny(family)
    sel = {l.index: [1, 4] for l in moe_layers(model)}
    plan = apply_esft(model, {"experts": sel})
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn_like(p))  # make trained experts differ from the base
    ours = plan.adapter_state_dict()
    unwrap_esft(model)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert set(ours) <= keys, sorted(set(ours) - keys)[:5]
        for k, t in ours.items():
            torch.testing.assert_close(f.get_tensor(k), t, rtol=0, atol=0)
    assert len(ours) == 3 * 2 * len(sel)


def test_unknown_family_lists_supported():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="deepseek_v2.*mixtral.*qwen3_moe"):
        moe_layers(AutoModelForCausalLM.from_config(cfg))


def test_model_without_moe_layer_is_refused():
    model = build_tiny("deepseek_v2", num_layers=1)  # first_k_dense_replace=1: the only layer is dense
    with pytest.raises(UnsupportedModelError, match="no MoE layer"):
        moe_layers(model)
