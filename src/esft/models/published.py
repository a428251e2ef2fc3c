"""Configs of released MoE models, written from their published hyper-parameters.

For ``esft plan --model NAME`` (NAME: a key of ``PUBLISHED``): memory planning needs only the
shapes, so a transformers config built here stands in for the checkpoint's config.json (nothing
is downloaded). Layers, hidden and intermediate sizes, experts, top-k, shared experts, attention
(MLA) ranks and vocabulary follow the table "Published shapes of the DeepSeek MoE family" of the
method notes; the per-head sizes (qk_nope 128, qk_rope 64, v 128), which that table does not list,
are the released config.json values of all three. ``total_params`` is the published total, which
``tests/test_plan.py`` checks the meta-device model against (DeepSeek-V3's 671B excludes its
multi-token-prediction module, which transformers does not build either).

The other families (used by the recipes in ``examples/``) take the shape keys of each model's
released config.json (Qwen/Qwen3-30B-A3B, openai/gpt-oss-20b and -120b, zai-org/GLM-4.5-Air,
Qwen/Qwen3.5-35B-A3B on the Hugging Face Hub; read from copies of those values in public code, and
for Qwen3.5 transformers' own defaults, documented as that checkpoint's); keys that only affect
numerics (rope scaling, norms' epsilon, token ids) are left at transformers' defaults, which do not
change a parameter's shape. ``total_params`` is the model card's total, which the meta model
matches within 2% (``tests/test_recipes.py``). gpt-oss is planned in bf16 (the released checkpoints keep the experts in
MXFP4; esft trains a bf16 copy). GLM-4.5-Air's 106B and the meta model leave out its one MTP layer,
as for DeepSeek-V3. Qwen3.5-35B-A3B is released as a vision-language checkpoint (model_type
``qwen3_5_moe``, its language model under ``text_config``); esft trains the language model, which
is what is built here (``qwen3_5_moe_text``; the vision tower, about 0.45B frozen parameters with
transformers' default vision config, 1.3% of the total, is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

# Shared by the three releases: MLA per-head sizes, untied LM head.
_MLA_HEADS = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
                  tie_word_embeddings=False)


@dataclass(frozen=True)
class Published:
    name: str
    model_type: str  # transformers model_type: deepseek_v2 -> DeepseekV2Config, qwen3_moe -> Qwen3MoeConfig, ...
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
    Published("qwen3-30b-a3b", "qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, decoder_sparse_step=1, mlp_only_layers=[], num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, tie_word_embeddings=False),
        30.5e9, "Qwen3-30B-A3B: 30.5B total, 3.3B active; 48 layers, all MoE, 128 experts, top-8, no shared expert"),
    Published("gpt-oss-20b", "gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_local_experts=32,
        num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
        attention_bias=True, max_position_embeddings=131072, tie_word_embeddings=False),
        21e9, "gpt-oss-20b: 21B total, 3.6B active; 24 layers, all MoE, 32 experts, top-4 (bf16)"),
    Published("gpt-oss-120b", "gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_local_experts=128,
        num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
        attention_bias=True, max_position_embeddings=131072, tie_word_embeddings=False),
        117e9, "gpt-oss-120b: 117B total, 5.1B active; 36 layers, all MoE, 128 experts, top-4 (bf16)"),
    Published("glm-4.5-air", "glm4_moe", dict(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=46, first_k_dense_replace=1, n_routed_experts=128, n_shared_experts=1,
        num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, partial_rotary_factor=0.5,
        attention_bias=True, use_qk_norm=False, max_position_embeddings=131072, tie_word_embeddings=False),
        106e9, "GLM-4.5-Air: 106B total (without the MTP layer), 12B active; 1 dense + 45 MoE layers, "
        "128 routed experts, top-8, 1 shared"),
    Published("qwen3.5-35b-a3b", "qwen3_5_moe_text", dict(
        vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256,
        num_experts_per_tok=8, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=32, max_position_embeddings=262144,
        tie_word_embeddings=False),
        35e9, "Qwen3.5-35B-A3B (Qwen3.5-MoE; its language model): 35B total, 3B active; 40 layers (3 of 4 "
        "linear attention), 256 experts, top-8, 1 shared"),
]}


def published_config(name: str):
    """The transformers config (DeepseekV2Config, Qwen3MoeConfig, ...) of a published model by name."""
    from transformers import AutoConfig

    if name not in PUBLISHED:
        raise ValueError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED)}")
    p = PUBLISHED[name]
    return AutoConfig.for_model(p.model_type, **p.kwargs)
