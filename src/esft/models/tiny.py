"""Tiny random MoE checkpoints and a toy task, for tests and the quickstart.

``make_tiny_checkpoint`` writes a normal Hugging Face checkpoint directory (config, safetensors,
a byte-level BPE tokenizer trained with the ``tokenizers`` library) that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load offline. Its weights are random: it shows
the pipeline works, not that ESFT helps (that is what the shipped pretrained model is for).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}

# Small configs per family; shared with the tests so every registry entry is exercised.
TINY_CONFIGS: dict[str, dict] = {
    "deepseek_v2": dict(moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy", n_group=1, topk_group=1,
                        routed_scaling_factor=1.0, norm_topk_prob=False, num_key_value_heads=4),
    "deepseek_v3": dict(moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        num_key_value_heads=4),
    "qwen2_moe": dict(moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4, head_dim=16, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48),
    "olmoe": dict(num_experts=16, num_experts_per_tok=4, intermediate_size=32),
}


def tiny_config(family: str = "deepseek_v2", vocab_size: int = 512, num_layers: int = 3, hidden: int = 64, **over):
    """A tiny config of model type ``family``: the hand-written ones above, else shrunk from the config
    class's defaults (models/shrink.py) for every supported model type."""
    from transformers import AutoConfig

    from .registry import check_model_type

    if family not in TINY_CONFIGS:
        check_model_type(type("C", (), {"model_type": family})())
        return _shrunk_tiny(family, vocab_size, num_layers, hidden, over)
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=96, num_hidden_layers=num_layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    kw.update(TINY_CONFIGS[family])
    kw.update(over)
    return AutoConfig.for_model(family, **kw)


def _shrunk_tiny(family: str, vocab_size: int, num_layers: int, hidden: int, over: dict):
    from .shrink import shrunk_config

    text = {"vocab_size": vocab_size, "num_hidden_layers": num_layers, "hidden_size": hidden}
    ids = {k: over.pop(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in over}
    cfg = shrunk_config(family, **over)
    sub = cfg.get_text_config()
    extra = {**text, **ids}
    if sub is cfg:
        return shrunk_config(family, **extra, **over)
    name = next(k for k, v in vars(cfg).items() if v is sub)
    return shrunk_config(family, **{name: extra}, **ids, **over)


def spread_routers(model) -> None:
    """Random init of transformers leaves routers near zero (uniform routing); spread them so that routing
    depends on the input, as in a trained model."""
    import torch

    from .registry import moe_layers

    with torch.no_grad():
        for l in moe_layers(model):
            l.router.weight.normal_(0, 0.5)


def toy_task(n: int, seed: int = 0) -> list[dict]:
    """A toy task in the reference messages layout: reverse a short list of words."""
    rng = random.Random(seed)
    words = "red green blue cat dog fish one two three sun moon star tree rock sand wave".split()
    rows = []
    for _ in range(n):
        seq = rng.sample(words, rng.randint(2, 5))
        rows.append({"messages": [{"role": "user", "content": "Reverse: " + " ".join(seq)},
                                  {"role": "assistant", "content": " ".join(reversed(seq))}]})
    return rows


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (``tokenizers``), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"])


def make_tiny_checkpoint(out_dir: str | Path, family: str = "deepseek_v2", seed: int = 0, num_layers: int = 3,
                         texts: list[str] | None = None, **config_over) -> Path:
    """Write a random tiny MoE checkpoint + tokenizer to ``out_dir``; returns the path."""
    import torch

    from .registry import model_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if texts is None:
        texts = [m["content"] for r in toy_task(300, seed=seed) for m in r["messages"]]
        texts += ["User: \n\nAssistant:"] * 5
    tokenizer = train_tokenizer(texts)
    cfg = tiny_config(family, vocab_size=len(tokenizer), num_layers=num_layers,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **config_over)
    torch.manual_seed(seed)
    model = model_class(cfg).from_config(cfg)
    spread_routers(model)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
