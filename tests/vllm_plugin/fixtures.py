"""Checkpoints for the vLLM plugin's tests and benchmark: a tiny random base, ESFT adapters, merged models.

Shapes are ones vLLM's CPU kernels take: attention head_dim 64 (head_dim 16 is refused), DeepSeek-V2's
MLA latent kv_lora_rank 512 + rope 64 = 576 (the only size its CPU MLA kernel compiles for), hidden and
expert intermediate sizes multiples of 32. Adapters are made the way training makes them
(``apply_esft`` -> changed trainable rows -> ``save_adapter``, base fingerprint included) and merged
with ``esft merge``'s own code, so the plugin is compared with an independent path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FAMILIES = {
    "qwen3_moe": dict(hidden=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=64,
                      intermediate_size=256, num_experts=16, num_experts_per_tok=4),
    "deepseek_v2": dict(hidden=256, num_attention_heads=2, num_key_value_heads=2, moe_intermediate_size=64,
                        intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                        first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                        qk_nope_head_dim=64, v_head_dim=64, topk_method="greedy", n_group=1, topk_group=1,
                        routed_scaling_factor=1.0, norm_topk_prob=False),
    # DeepSeek-V3's router (sigmoid scores, a routing bias for the top-k choice, group-limited, renormalised
    # and scaled gate values) on the same MLA shapes; make_base gives it a non-zero bias, so that vLLM's biased
    # choice is exercised (a zero bias would route as a plain sigmoid top-k)
    "deepseek_v3": dict(hidden=256, num_attention_heads=2, num_key_value_heads=2, moe_intermediate_size=64,
                        intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                        first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                        qk_nope_head_dim=64, v_head_dim=64, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True,
                        # what DeepSeek-V3's config.json says and vLLM reads (transformers' V3 class implies both)
                        topk_method="noaux_tc", scoring_func="sigmoid"),
}

# layer -> experts each adapter changed; A and B share layer 0 expert 1 (with different weights), so a wrong
# table row would show. "big" needs more slots per layer than the tests give (4).
ADAPTERS = {
    "a": {0: [1, 5], 1: [3]},
    "b": {0: [1, 7, 9], 1: [2, 3]},
    "c": {1: [0]},
    "big": {0: [0, 1, 2, 3, 4]},
}


def make_base(out: Path, family: str = "qwen3_moe", num_layers: int = 2, seed: int = 0) -> Path:
    from esft.models.tiny import make_tiny_checkpoint

    kw = dict(FAMILIES[family])
    hidden = kw.pop("hidden")
    path = make_tiny_checkpoint(out, family=family, seed=seed, num_layers=num_layers, hidden=hidden, **kw)
    if family == "deepseek_v3":
        import torch
        from transformers import AutoModelForCausalLM

        from esft.training.balance import routing_biases

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for b in routing_biases(model).values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        model.save_pretrained(str(path))
    return path


def make_adapter(base: Path, out: Path, experts: dict[int, list[int]], seed: int, scale: float = 3.0) -> Path:
    """An ESFT adapter of ``base`` whose selected experts are the base's plus noise (``scale`` x their std)."""
    import torch
    from transformers import AutoModelForCausalLM

    from esft.adapter.fingerprint import model_fingerprint
    from esft.adapter.io import save_adapter
    from esft.training.experts import apply_esft

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": {l: list(es) for l, es in experts.items()}, "shared_experts": False,
                              "non_expert_modules": False})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plan.params.values():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return save_adapter(plan, out, fp)


def merge(base: Path, adapter: Path, out: Path) -> Path:
    from esft.adapter.merge import merge_checkpoint

    return merge_checkpoint(base, adapter, out, overwrite=True).out


def build(root: Path, family: str = "qwen3_moe", adapters: tuple[str, ...] = ("a", "b", "c", "big"),
          merged: tuple[str, ...] = ("a", "b", "c")) -> dict[str, Path]:
    """root/base, root/adapters/NAME, root/merged/NAME, root/base_fingerprint.json (cached: built once per root).

    Runs in the project's environment (its transformers): vLLM's venv has an older transformers that
    esft's fingerprint code does not support."""
    root = Path(root)
    done = root / "done.json"
    paths = {"base": root / "base", **{f"adapter_{n}": root / "adapters" / n for n in adapters},
             **{f"merged_{n}": root / "merged" / n for n in merged}}
    if done.exists() and json.loads(done.read_text()) == {k: str(v) for k, v in paths.items()}:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    make_base(paths["base"], family)
    for i, n in enumerate(adapters):
        make_adapter(paths["base"], paths[f"adapter_{n}"], ADAPTERS[n], seed=100 + i)
    for n in merged:
        merge(paths["base"], paths[f"adapter_{n}"], paths[f"merged_{n}"])
    from esft.adapter.fingerprint import checkpoint_fingerprint

    (root / "base_fingerprint.json").write_text(json.dumps(checkpoint_fingerprint(paths["base"])))
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


if __name__ == "__main__":
    import sys

    fam = sys.argv[2] if len(sys.argv) > 2 else "qwen3_moe"
    print(build(Path(sys.argv[1]), fam))
