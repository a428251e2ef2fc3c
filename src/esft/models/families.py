"""The per-family facts that a model's structure does not say, as data.

Everything else (where the MoE blocks, routers, experts and shared experts are; which expert tensors
exist, biases included; how the checkpoint names them) is read from the model itself
(``discovery.py``, ``layout.py``). A model type of the installed transformers is supported when it has
an entry here without ``unsupported`` and its structure is found; ``esft families`` lists them all.
``tests/test_families.py`` checks every entry's ``gate`` against its router's own routing weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Notes:
    """gate: how router logits become ESFT-Gate's gate values (see ``routers.py``); outputs: the router's
    return layout; experts: "sparse" (forward(hidden, ids, weights), id E skipped) or "dense_bmm" (Llama 4:
    every token through every expert, rows grouped by expert); unsupported: why not, when not."""

    gate: str = "softmax"
    outputs: str = "logits_weights_ids"
    experts: str = "sparse"
    examples: str = ""
    unsupported: str | None = None
    # why ``esft merge`` cannot read the base-model fingerprint from this family's shards (it then merges
    # without that check, saying so in esft_merge.json, as for version-1 fingerprints)
    no_shard_check: str | None = None


_S, _N = "softmax", "sigmoid_topk_norm"

NOTES: dict[str, Notes] = {
    "aria": Notes(_S, examples="Aria (vision-language; text-only ESFT)"),
    "axk1": Notes(_N, examples="A.X K1"),
    "axk2": Notes(_N, examples="A.X K2"),
    "cohere2_moe": Notes(_S, examples="Command A MoE"),
    "deepseek_v2": Notes(_S, examples="DeepSeek-V2, V2-Lite (the paper's model)"),
    "deepseek_v3": Notes(_N, examples="DeepSeek-V3, R1"),
    "deepseek_v32": Notes(_N, examples="DeepSeek-V3.2"),
    "deepseek_v4": Notes("weights", examples="DeepSeek-V4 (hash-routed first layers included)"),
    "ernie4_5_moe": Notes(_S, examples="ERNIE-4.5-21B-A3B, 300B-A47B"),
    "exaone_moe": Notes(_N, examples="EXAONE MoE"),
    "flex_olmo": Notes(_S, examples="FlexOlmo"),
    "flint": Notes(_N, examples="Flint"),
    "glm4_moe": Notes(_N, examples="GLM-4.5, GLM-4.5-Air, GLM-4.6"),
    "glm4_moe_lite": Notes(_N, examples="GLM-4.7-Flash"),
    "glm4v_moe": Notes(_N, examples="GLM-4.5V (vision-language; text-only ESFT)"),
    "glm_moe_dsa": Notes(_N, examples="GLM-5"),
    "gpt_oss": Notes(_S, examples="gpt-oss-20b, gpt-oss-120b (bf16 weights; MXFP4 checkpoints need dequantizing)"),
    "granitemoe": Notes(_S, examples="Granite 3.0 MoE"),
    "granitemoe_swa": Notes(_S, examples="Granite MoE (sliding window)"),
    "granitemoehybrid": Notes(_S, examples="Granite 4.0 hybrid"),
    "granitemoeshared": Notes(_S, examples="Granite MoE with shared experts"),
    "hy_v3": Notes(_N, examples="Hunyuan V3"),
    "hy_v4": Notes(_N, examples="Hunyuan V4"),
    "inkling2": Notes(_N, examples="Inkling 2 (multimodal; text-only ESFT)"),
    "jamba": Notes(_S, examples="Jamba 1.5 Mini / Large"),
    "kimi_linear": Notes(_N, examples="Kimi Linear",
                         no_shard_check="its checkpoint stores q/k/v conv1d weights apart, stacked on loading"),
    "kolibri1": Notes("sigmoid", examples="Kolibri 1"),
    "laguna": Notes(_N, examples="Laguna"),
    "lfm2_moe": Notes(_N, examples="LFM2-8B-A1B"),  # sigmoid, renormalised over the top-k (norm_topk_prob)
    "llama4": Notes("sigmoid", outputs="scores_logits", experts="dense_bmm", examples="Llama 4 Scout, Maverick (text model)"),
    "mellum": Notes(_S, examples="Mellum"),
    "mimo_v2_flash": Notes(_N, examples="MiMo-V2-Flash"),
    "minimax": Notes(_S, examples="MiniMax-Text-01"),
    "minimax_m2": Notes(_N, examples="MiniMax-M2"),
    "minimax_m3_vl": Notes(_N, examples="MiniMax-M3-VL (vision-language; text-only ESFT)",
                           no_shard_check="its checkpoint stores the shared experts' gate and up projections apart, "
                                          "concatenated on loading"),
    "mistral4": Notes(_S, examples="Mistral 4"),
    "mistral_large4": Notes(_S, examples="Mistral Large 4 (vision-language; text-only ESFT)",
                            no_shard_check="its vision encoder's checkpoint keys are not the reverse renamings of its "
                                           "parameter names (e.g. vision_encoder.transformer.layers.N.attention.k_proj)"),
    "mixtral": Notes(_S, examples="Mixtral 8x7B, 8x22B"),
    "olmoe": Notes(_S, examples="OLMoE"),
    "qwen2_moe": Notes(_S, examples="Qwen1.5-MoE, Qwen2-57B-A14B"),
    "qwen3_5_moe": Notes(_S, examples="Qwen3.5-MoE"),
    "qwen3_moe": Notes(_S, examples="Qwen3-30B-A3B, 235B-A22B"),
    "qwen3_next": Notes(_S, examples="Qwen3-Next-80B-A3B"),
    "qwen3_vl_moe": Notes(_S, examples="Qwen3-VL-30B-A3B (vision-language; text-only ESFT)",
                          unsupported="untested: its adapter rows differ from what save_pretrained writes for the "
                                      "merged model in esft's family test (fused checkpoint layout not yet understood)"),
    "qwen4_exp": Notes(_S, examples="Qwen4 (experimental)"),
    "solar_open": Notes(_N, examples="Solar Open"),
    # Not supported, with the reason.
    "longcat_flash": Notes(unsupported="zero-computation experts: ids >= the routed experts mean identity experts, "
                                       "so the sentinel id ESFT uses to skip frozen experts would run an identity "
                                       "expert, and gate_up_proj has more rows than down_proj"),
    "phimoe": Notes(unsupported="sparsemixer routing: the routing weights are not a function of the router logits "
                                "that ESFT-Gate could score (checked: no softmax/sigmoid form matches)"),
    "diffusion_gemma": Notes(unsupported="a diffusion language model: no causal-LM class to train with next-token loss"),
    "openai_privacy_filter": Notes(unsupported="a token-classification model, not a causal language model"),
    "qwen3_omni_moe": Notes(unsupported="an omni (thinker + talker) model with no causal-LM or image-text-to-text "
                                        "class; its thinker's text MoE is not wired up"),
    "inkling": Notes(unsupported="no top-level config class is registered for this model type in transformers"),
    "step3p7": Notes(unsupported="its MoE blocks are built only for config.mlp_layer_types entries of 'sparse'; "
                                 "the tiny config has none and esft has no test for it"),
}
