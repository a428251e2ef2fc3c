"""Trainable-parameter shares (esft.report.shares) against counts computed independently from the configs."""

import pytest
from transformers import AutoConfig

from esft.embedded import embedded_model_dir
from esft.models.published import published_config
from esft.report.shares import REFERENCE_COUNTS, esft_trainable, lora_trainable, meta_model, total_params


def _lora_by_hand(c, r):
    """r x (in + out) per attention projection the LoRA baseline targets; r x E x (in + out) per fused expert
    tensor (PEFT's parameter LoRA keeps one rank-r pair per expert), over the MoE layers."""
    h, heads = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank:
        q = (h + c.q_lora_rank) + (c.q_lora_rank + heads * qk)
    else:
        q = h + heads * qk
    attn = q + (h + c.kv_lora_rank + c.qk_rope_head_dim) + (c.kv_lora_rank + heads * (c.qk_nope_head_dim + c.v_head_dim)) \
        + (heads * c.v_head_dim + h)
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    i, e = c.moe_intermediate_size, c.n_routed_experts
    experts = e * ((h + 2 * i) + (i + h))
    return r * (c.num_hidden_layers * attn + moe_layers * experts)


@pytest.mark.parametrize("name", ["shipped", "deepseek-v2-lite"])
def test_lora_and_esft_counts_equal_hand_counts(name):
    c = AutoConfig.from_pretrained(embedded_model_dir()) if name == "shipped" else published_config(name)
    for r in (1, 2, 8):
        assert lora_trainable(c, r) == _lora_by_hand(c, r)
    model = meta_model(c)
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    counts = {layer: 1 + layer % 3 for layer in range(c.first_k_dense_replace, c.num_hidden_layers)}
    assert esft_trainable(model, counts) == per_expert * sum(counts.values())


def test_paper_share_from_reference_counts():
    model = meta_model(published_config("deepseek-v2-lite"))
    total = total_params(model)
    assert total == pytest.approx(15.7e9, rel=0.01)  # the published total
    intent = dict(enumerate(REFERENCE_COUNTS["intent"], start=1))
    assert sum(intent.values()) == 124  # the method notes: 124 of 26 x 64 experts
    assert esft_trainable(model, intent) == 124 * 3 * 2048 * 1408


def test_non_moe_layer_is_refused():
    model = meta_model(published_config("deepseek-v2-lite"))
    with pytest.raises(ValueError, match=r"layers \[0\] are not MoE layers"):
        esft_trainable(model, {0: 2})


def test_wrapping_for_lora_prints_no_deprecation_notice():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing`; that notice used to land in every LoRA
    run's log. The wrap silences only that one."""
    import warnings

    c = AutoConfig.from_pretrained(embedded_model_dir())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora_trainable(c, 8)
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
