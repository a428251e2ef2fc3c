"""Configs of the released DeepSeek MoE models, written from their published hyper-parameters.

For ``esft plan --model deepseek-v2-lite|deepseek-v2|deepseek-v3``: memory planning needs only the
shapes, so a transformers config built here stands in for the checkpoint's config.json (nothing
is downloaded). Layers, hidden and intermediate sizes, experts, top-k, shared experts, attention
(MLA) ranks and vocabulary follow the table "Published shapes of the DeepSeek MoE family" of the
method notes; the per-head sizes (qk_nope 128, qk_rope 64, v 128), which that table does not list,
are the released config.json values of all three. ``total_params`` is the published total, which
``tests/test_plan.py`` checks the meta-device model against (DeepSeek-V3's 671B excludes its
multi-token-prediction module, which transformers does not build either).
"""

from __future__ import annotations

from dataclasses import dataclass

# Shared by the three releases: MLA per-head sizes, untied LM head.
_MLA_HEADS = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
                  tie_word_embeddings=False)


@dataclass(frozen=True)
class Published:
    name: str
    model_type: str  # transformers model_type: deepseek_v2 -> DeepseekV2Config, deepseek_v3 -> DeepseekV3Config
    kwargs: dict
    total_params: float  # published total parameter count
    doc: str


PUBLISHED: dict[str, Published] = {p.name: p for p in [
    Published("deepseek-v2-lite", "deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=6,
        n_shared_experts=2, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        max_position_embeddings=163840, **_MLA_HEADS),
        15.7e9, "DeepSeek-V2-Lite (the ESFT paper's model): 15.7B total, 2.4B active"),
    Published("deepseek-v2", "deepseek_v2", dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, first_k_dense_replace=1, n_routed_experts=160, num_experts_per_tok=6,
        n_shared_experts=2, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
        norm_topk_prob=False, max_position_embeddings=163840, **_MLA_HEADS),
        236e9, "DeepSeek-V2: 236B total, 21B active"),
    Published("deepseek-v3", "deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8,
        n_shared_experts=1, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=163840, **_MLA_HEADS),
        671e9, "DeepSeek-V3 / R1: 671B total (without the MTP module), 37B active"),
]}


def published_config(name: str):
    """The transformers config (DeepseekV2Config / DeepseekV3Config) of a published model by name."""
    from transformers import AutoConfig

    if name not in PUBLISHED:
        raise ValueError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED)}")
    p = PUBLISHED[name]
    return AutoConfig.for_model(p.model_type, **p.kwargs)
