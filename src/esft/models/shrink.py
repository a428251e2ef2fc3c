"""A tiny config of any transformers model type, shrunk from its config class's defaults.

Every integer size field the class defines is replaced by a small value chosen by its name (hidden
size 64, 4 heads of 16, 8 experts of which 2 are active, intermediate sizes 32, 3 layers, a 512-token
vocabulary); everything else keeps its default, so the tiny model has the family's real structure
(router, shared experts, biases, dense first layers, attention kind). ``SHRINK_OVERRIDES`` adds
what a family's config validation needs beyond that (kept as data, one entry per model type).
"""

from __future__ import annotations

SIZES = {
    "hidden_size": 64, "vocab_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_hidden_layers": 3, "max_position_embeddings": 2048, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "qk_head_dim": 16,
    "num_experts": 8, "n_routed_experts": 8, "num_local_experts": 8, "moe_num_experts": 8, "num_routed_experts": 8,
    "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "top_k": 2,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
}
_SUBCONFIGS = ("text_config", "language_config", "llm_config", "thinker_config")
# Other sub-configs (vision, audio towers): one small layer, outputs as wide as the tiny text model.
TOWER_SIZES = {"depth": 1, "num_hidden_layers": 1, "num_layers": 1, "hidden_size": 32, "embed_dim": 32, "width": 32,
               "intermediate_size": 32, "num_heads": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "out_hidden_size": 64, "text_hidden_size": 64, "projection_dim": 64, "output_dim": 64, "head_dim": 16}

# Multi-head latent attention: as many key/value heads as query heads, and a head_dim that the rotary part
# (qk_rope_head_dim, times partial_rotary_factor where the family has one) fits.
_MLA = {"num_key_value_heads": 4, "head_dim": 8}
# DeepSeek sparse attention's indexer, shrunk like the attention (top-4 keys of the test's 7 tokens).
_DSA = {"index_head_dim": 16, "index_n_heads": 2, "index_topk": 4}

# Per model type: extra config values (applied after SIZES) that its validation or forward needs.
SHRINK_OVERRIDES: dict[str, dict] = {
    "axk1": _MLA,
    "axk2": {**_MLA, **_DSA},
    "deepseek_v32": {**_MLA, **_DSA},
    "glm4_moe_lite": _MLA,
    "glm_moe_dsa": {**_MLA, **_DSA},
    "mistral4": {**_MLA, "head_dim": 16},  # partial_rotary_factor 0.5: 16 * 0.5 = qk_rope_head_dim
    "mistral_large4": {"text_config": {**_MLA, **_DSA, "head_dim": 16}},
    "dots3_note": {"num_key_value_heads": 4},
    "glm5_next": {"num_key_value_heads": 4},
    "hunyuan_v1_moe": {"head_dim": 16},
    "zaya": {"num_experts_per_tok": 1},
    # multimodal rotary: head_dim 16 * partial 0.5 = 8 rotary dims, 4 frequencies split over (t, h, w)
    "glm4v_moe": {"text_config": {"head_dim": 16, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}}},
    # linear-attention / Mamba state sizes the name rule does not catch (their torch fallbacks take seconds
    # per forward at the defaults)
    "kimi_linear": {"linear_head_dim": 16, "linear_num_heads": 4},
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16},
    "lfm2_moe": {"layer_types": ["full_attention", "conv", "full_attention"]},
}


def _shrunk(defaults: dict) -> dict:
    out = {}
    for k, v in defaults.items():
        if isinstance(v, bool) or not isinstance(v, int) and not (k.endswith("token_id") and v is not None):
            continue
        if k in SIZES:
            out[k] = SIZES[k]
        elif "intermediate_size" in k or k.endswith("ffn_hidden_size"):
            out[k] = 32 if v else v
    return out


def shrunk_kwargs(model_type: str) -> dict:
    """Keyword arguments that make ``AutoConfig.for_model(model_type, **kw)`` tiny (sub-configs included)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    defaults = CONFIG_MAPPING[model_type]().to_dict()
    kw = _shrunk(defaults)
    over = SHRINK_OVERRIDES.get(model_type, {})
    for sub, d in defaults.items():
        if not isinstance(d, dict) or "model_type" not in d:
            continue
        if sub in _SUBCONFIGS:
            kw[sub] = _shrunk(d)
        else:
            kw[sub] = {k: TOWER_SIZES[k] for k, v in d.items() if k in TOWER_SIZES and isinstance(v, int)}
    for k, v in over.items():
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    kw.setdefault("tie_word_embeddings", False)
    return kw


def shrunk_config(model_type: str, **over):
    """A tiny config of ``model_type`` (see the module docstring); ``over`` wins over everything."""
    from transformers import AutoConfig

    kw = shrunk_kwargs(model_type)
    for k, v in over.items():
        if k in _SUBCONFIGS and isinstance(v, dict) and isinstance(kw.get(k), dict):
            kw[k] = {**kw[k], **v}
        else:
            kw[k] = v
    return AutoConfig.for_model(model_type, **kw)
