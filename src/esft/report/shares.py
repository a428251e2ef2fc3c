"""Trainable-parameter shares: LoRA at r = 1, 2, 8 and ESFT at several top_p, on the shipped model and on the
paper's DeepSeek-V2-Lite (``python -m esft.report.shares``).

Every count is taken from a real model object built on the meta device (no weights are allocated): LoRA by
wrapping it with PEFT exactly as ``esft train method=lora`` does (``training.recipe.lora_wrap``: attention
projections and the fused expert tensors) and counting the parameters that require gradients; ESFT by the
selected experts' rows of the fused expert tensors. The shipped model's ESFT selections come from profiling it
on an adaptation task's training split; the paper's from the expert counts of the reference code's published
expert configs (``results/expert_configs/*.json`` of github.com/deepseek-ai/ESFT, trained on DeepSeek-V2-Lite),
recorded below per MoE layer 1..26.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

# Experts selected per MoE layer (layers 1..26) in the reference code's published expert configs.
REFERENCE_COUNTS: dict[str, list[int]] = {
    "intent": [5, 6, 6, 6, 5, 5, 4, 4, 4, 5, 5, 5, 4, 4, 5, 4, 5, 4, 5, 5, 5, 4, 5, 4, 5, 5],
    "law": [9, 9, 8, 7, 7, 6, 6, 5, 6, 6, 6, 6, 5, 6, 4, 6, 6, 6, 3, 5, 6, 6, 5, 3, 5, 6],
    "summary": [8, 7, 6, 6, 5, 6, 4, 4, 3, 5, 4, 6, 6, 4, 5, 5, 8, 5, 4, 4, 3, 5, 4, 5, 4, 2],
    "translation": [4, 3, 4, 3, 3, 3, 3, 2, 3, 3, 2, 3, 3, 4, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4],
}
LORA_RANKS = (1, 2, 8)
TOP_PS = (0.05, 0.1, 0.2, 0.3)


def meta_model(config):
    """``config``'s causal LM with every tensor on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lora_trainable(config, rank: int) -> int:
    """Trainable parameters of the project's LoRA baseline at ``rank``, counted on the PEFT-wrapped model."""
    from ..training.recipe import lora_wrap

    model = lora_wrap(meta_model(config), SimpleNamespace(lora_rank=rank, lora_alpha=2 * rank))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expert_params(model) -> dict[int, int]:
    """MoE layer index -> parameters of one routed expert, from the layer's fused expert tensors."""
    from ..models.layout import expert_params as names
    from ..models.registry import moe_layers

    return {layer.index: sum(getattr(layer.experts, p).numel() for p in names(layer.experts)) // layer.num_experts
            for layer in moe_layers(model)}


def esft_trainable(model, counts: dict[int, int]) -> int:
    """Trainable parameters of ESFT selecting ``counts[layer]`` experts in each MoE layer."""
    per = expert_params(model)
    unknown = sorted(set(counts) - set(per))
    if unknown:
        raise ValueError(f"layers {unknown} are not MoE layers of this model (MoE layers: {sorted(per)})")
    return sum(per[l] * c for l, c in counts.items())


def shipped_selections(task: str = "translate_synth", top_ps=TOP_PS, seq_len: int = 256, sequences: int = 32,
                       seed: int = 0) -> dict[float, dict[int, int]]:
    """top_p -> experts per MoE layer that ESFT-Token selects on the shipped model for ``task``."""
    from ..embedded import embedded_model_dir
    from ..models.loading import load_model
    from ..profiling.run import ProfileConfig, run_profile
    from ..selection.select import SelectConfig, select_experts
    from ..tasks import write_suite

    model, tok = load_model(embedded_model_dir(), dtype="float32", device="cpu")
    with tempfile.TemporaryDirectory() as d:
        paths = write_suite(Path(d), 400, 10, 10, seed, tasks=[task])[task]
        prof = run_profile(ProfileConfig(data=str(paths["train"]), seq_len=seq_len, max_tokens=seq_len * sequences,
                                         batch_size=8, dtype="float32", device="cpu"),
                           model=model, tokenizer=tok, progress=False)
    return {p: {l: len(e) for l, e in select_experts(prof.token_scores, SelectConfig(top_p=p)).items()}
            for p in top_ps}


def share_rows(shipped_counts: dict[float, dict[int, int]] | None = None) -> list[list[str]]:
    """[model, method, trainable, total, share %] rows for the shipped model and DeepSeek-V2-Lite."""
    from transformers import AutoConfig

    from ..embedded import embedded_model_dir
    from ..models.published import published_config

    rows = []
    for name, config, esft in (
            ("shipped (6.9M)", AutoConfig.from_pretrained(embedded_model_dir()),
             {f"ESFT-Token p={p}": c for p, c in (shipped_counts or shipped_selections()).items()}),
            ("DeepSeek-V2-Lite (paper)", published_config("deepseek-v2-lite"),
             {f"ESFT reference {t} ({sum(c)} experts)": dict(enumerate(c, start=1))
              for t, c in REFERENCE_COUNTS.items()})):
        model = meta_model(config)
        total = total_params(model)
        for r in LORA_RANKS:
            n = lora_trainable(config, r)
            rows.append([name, f"LoRA r={r}", n, total])
        for label, counts in esft.items():
            rows.append([name, label, esft_trainable(model, counts), total])
    return [[m, k, f"{n:,}", f"{t:,}", f"{100 * n / t:.2f}"] for m, k, n, t in rows]


def markdown(rows: list[list[str]]) -> str:
    head = ["model", "method", "trainable", "all parameters", "share %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esft.report.shares", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="translate_synth", help="adaptation task the shipped model is profiled on")
    a = ap.parse_args(argv)
    print(markdown(share_rows(shipped_selections(a.task))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
