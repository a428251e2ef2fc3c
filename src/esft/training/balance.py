"""Expert load balance: how it is measured (MaxVio) and Loss-Free Balancing's bias update.

Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664; what DeepSeek-V3 uses) adds an expert-wise bias
b [E] to the routing scores for the top-k *choice* only; the gate values that weight the chosen experts'
outputs stay unbiased. After every optimizer step each expert's bias moves by a fixed rate u towards
balance, from the step's load c [E] (tokens routed to each expert):

    b_i <- b_i + u * sign(mean(c) - c_i)            (the paper's rule; its default u = 1e-3)

MaxVio (the paper's balance metric), per MoE layer, from a load c [E]:

    MaxVio = max_i c_i / mean(c) - 1                (0 = perfectly balanced; E/K - 1 = one expert per slot)

"per batch" takes c over one training batch (the mean over batches is reported); "global" takes c over a
whole dataset (a validation set, or a task's profiling data).

In transformers the bias is a buffer of the router (``e_score_correction_bias``: DeepSeek-V3/V3.2,
GLM-4.5, Kimi K2, dots.llm1, ...): no gradient reaches it, so whatever trains the router (full fine-tuning,
the non-expert ablation) leaves it where it was unless this module moves it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.registry import get_family, moe_layers
from ..models.routers import split_outputs

# Attribute names under which transformers' routers (or their MoE blocks) keep a routing bias. A family
# whose bias has another name is a row to add here.
BIAS_NAMES = ("e_score_correction_bias", "expert_bias")

DEFAULT_BIAS_RATE = 1e-3  # the paper's update rate u


def routing_bias(layer) -> torch.Tensor | None:
    """The routing-bias tensor [E] of one MoE layer (``esft.models.registry.MoELayer``), or None."""
    for module in (layer.router, layer.block):
        for name in BIAS_NAMES:
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == layer.num_experts:
                return t
    return None


def routing_biases(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer index: bias [E]} for every MoE layer that has a routing bias (empty when none has one)."""
    return {l.index: b for l in moe_layers(model) if (b := routing_bias(l)) is not None}


def to_dtype_keeping_bias(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, the routing biases kept in float32 (as DeepSeek-V3's checkpoints store them and
    transformers loads them: a bf16 bias of 0.5 has steps of 0.002, coarser than the update rate)."""
    keep = []
    for layer in moe_layers(model):
        for module in (layer.router, layer.block):
            for name in BIAS_NAMES:
                if isinstance(module._buffers.get(name), torch.Tensor):
                    keep.append((module, name, module._buffers[name].detach().float().clone()))
    model.to(dtype)
    for module, name, t in keep:
        module._buffers[name] = t
    return model


def check_bias_rate(rate, what: str = "bias update rate") -> float:
    """A rate the update can use: a finite number >= 0 (0 = the bias stays where it is)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (the paper's is {DEFAULT_BIAS_RATE}), got {rate!r}")
    return float(rate)


def require_bias(model: nn.Module, what: str) -> dict[int, torch.Tensor]:
    """The model's routing biases; a clear error when it has none (naming the architecture)."""
    biases = routing_biases(model)
    if not biases:
        mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"{what}: {mt} ({type(model).__name__}) has no routing bias to update (Loss-Free "
                         f"Balancing needs a per-expert bias added to the routing scores before the top-k choice, "
                         f"as DeepSeek-V3's e_score_correction_bias; looked for {', '.join(BIAS_NAMES)} on each "
                         f"MoE layer's router)")
    return biases


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """The paper's rule, in place: bias [E] += rate * sign(mean(load) - load), load [E] (token counts)."""
    load = load.to(device=bias.device, dtype=torch.float32)
    bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))


def max_violation(load) -> float:
    """MaxVio of one layer's load [E]: max / mean - 1 (NaN when nothing was routed)."""
    load = torch.as_tensor(load, dtype=torch.float64)
    mean = float(load.mean())
    return float(load.max()) / mean - 1 if mean > 0 else float("nan")


class LoadMeter:
    """Counts, through forward hooks on the routers, how many tokens each MoE layer routes to each expert.

    ``begin_batch(mask)`` before a forward ([B, T], 1 = a token that counts; without it every row counts);
    ``take()`` returns the counts since the last ``take()`` ({layer: [E] long}) and resets them. The
    counts follow the choice the router really made (with any routing bias), which is what load means.
    """

    def __init__(self, model: nn.Module):
        self.family = get_family(model)
        self.layers = moe_layers(model)
        self._mask: torch.Tensor | None = None
        self._counts: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "LoadMeter":
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook(layer.index, layer.num_experts,
                                                                                layer.top_k)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_batch(self, mask: torch.Tensor | None) -> None:
        self._mask = None if mask is None else mask.bool().reshape(-1)

    def _hook(self, index: int, num_experts: int, top_k: int):
        def hook(module, inputs, outputs):
            _, ids = split_outputs(outputs, self.family.router_outputs, top_k)  # [N, K] chosen experts
            ids = ids.detach()
            mask = self._mask
            if mask is not None and mask.numel() == ids.shape[0]:
                ids = ids[mask.to(ids.device)]
            c = torch.bincount(ids.reshape(-1), minlength=num_experts)
            prev = self._counts.get(index)
            self._counts[index] = c if prev is None else prev + c.to(prev.device)

        return hook

    def take(self, job=None) -> dict[int, torch.Tensor]:
        """The counts since the last take, summed over the ranks of ``job`` (training.distributed.Dist)."""
        counts, self._counts = self._counts, {}
        if job is not None and job.enabled:
            import torch.distributed as dist

            for _, c in sorted(counts.items()):
                dist.all_reduce(c)
        return counts


def maxvio_summary(counts: dict[int, torch.Tensor | list]) -> dict:
    """{"per_layer": {layer: MaxVio}, "mean": mean over layers, "max": max over layers} of loads [E]."""
    per = {str(l): (round(v, 4) if math.isfinite(v := max_violation(c)) else None) for l, c in sorted(counts.items())}
    vals = [v for v in per.values() if v is not None]
    return {"per_layer": per, "mean": round(sum(vals) / len(vals), 4) if vals else None,
            "max": round(max(vals), 4) if vals else None}
