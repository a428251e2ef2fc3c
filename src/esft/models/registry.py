"""MoE model families as data.

Each :class:`MoEFamily` entry says where a transformers 5.x model keeps its MoE blocks,
routers, routed experts (fused 3-D tensors) and shared experts, how a router's logits become
the gate values ESFT scores, and how the routed experts are named in the model's own
checkpoint files. Nothing else in the package branches on the model family.

Adding a family: add one entry to ``FAMILIES`` and one tiny config to ``tests/tiny_configs.py``;
``tests/test_registry.py`` then checks the entry against a model built from that config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model is not a supported MoE family, or has no MoE layer."""


@dataclass(frozen=True)
class MoEFamily:
    """Where the MoE parts of one model family live (module paths relative to a decoder layer)."""

    model_type: str
    moe_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attrs: tuple[str, ...] = ()
    # How router logits [N, E] become gate values g(i,t): "softmax" (softmax over all experts,
    # before any top-k renormalisation or scaling) or "sigmoid_topk_norm" (DeepSeek-V3: sigmoid
    # affinities normalised over the chosen top-k, before the routed scaling factor).
    affinity: str = "softmax"
    # Names in the checkpoint files: "model.layers.{L}.{ckpt_moe_attr}.experts.{E}.{name}.weight".
    ckpt_moe_attr: str = "mlp"
    ckpt_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    layers_path: str = "model.layers"
    doc: str = ""

    def expert_key(self, layer: int, expert: int, part: str) -> str:
        """Checkpoint key of one routed expert's projection; part in {"gate", "up", "down"}."""
        name = dict(zip(("gate", "up", "down"), self.ckpt_expert_names))[part]
        return f"model.layers.{layer}.{self.ckpt_moe_attr}.experts.{expert}.{name}.weight"

    def checkpoint_name(self, param_name: str) -> str:
        """Map a module parameter name (``model.named_parameters()``) to its checkpoint key."""
        if self.ckpt_moe_attr != self.moe_attr:
            return param_name.replace(f".{self.moe_attr}.", f".{self.ckpt_moe_attr}.")
        return param_name


FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in [
        MoEFamily("deepseek_v2", shared_attrs=("shared_experts",), doc="DeepSeek-V2 / V2-Lite (the paper's model)"),
        MoEFamily(
            "deepseek_v3",
            shared_attrs=("shared_experts",),
            affinity="sigmoid_topk_norm",
            doc="DeepSeek-V3 / R1 (sigmoid router)",
        ),
        MoEFamily("qwen2_moe", shared_attrs=("shared_expert", "shared_expert_gate"), doc="Qwen1.5-MoE / Qwen2-MoE"),
        MoEFamily("qwen3_moe", doc="Qwen3-MoE"),
        MoEFamily(
            "mixtral",
            ckpt_moe_attr="block_sparse_moe",
            ckpt_expert_names=("w1", "w3", "w2"),
            doc="Mixtral 8x7B / 8x22B",
        ),
        MoEFamily("olmoe", doc="OLMoE"),
    ]
}


def supported_families() -> str:
    return ", ".join(f"{k} ({f.doc})" for k, f in FAMILIES.items())


def get_family(model_or_config) -> MoEFamily:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family. Supported: {supported_families()}"
        )
    return FAMILIES[model_type]


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class MoELayer:
    """Handles to one MoE block of a loaded model."""

    index: int  # the model's own decoder-layer index (used as the layer key in every file)
    block: nn.Module
    router: nn.Module
    experts: nn.Module  # fused: gate_up_proj [E, 2*I, H], down_proj [E, H, I]
    shared: list[tuple[str, nn.Module]]
    prefix: str  # module-name prefix of the block, e.g. "model.layers.5.mlp"

    @property
    def num_experts(self) -> int:
        return base_experts(self.experts).gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)


def base_experts(experts: nn.Module) -> nn.Module:
    """The original fused experts module, also when wrapped for ESFT training."""
    return getattr(experts, "base", experts)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks of ``model`` in layer order; raises if there are none."""
    family = get_family(model)
    layers = _getattr_path(model, family.layers_path)
    found = []
    for i, layer in enumerate(layers):
        block = getattr(layer, family.moe_attr, None)
        experts = getattr(block, family.experts_attr, None) if block is not None else None
        if experts is None or getattr(base_experts(experts), "gate_up_proj", None) is None:
            continue  # a dense layer (e.g. DeepSeek's first_k_dense_replace layers)
        shared = [(a, getattr(block, a)) for a in family.shared_attrs if getattr(block, a, None) is not None]
        found.append(
            MoELayer(
                index=i,
                block=block,
                router=getattr(block, family.router_attr),
                experts=experts,
                shared=shared,
                prefix=f"{family.layers_path}.{i}.{family.moe_attr}",
            )
        )
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({family.model_type}) has no MoE layer with fused routed experts; "
            f"ESFT needs routed experts. Supported families: {supported_families()}"
        )
    return found


def gate_values(family: MoEFamily, router_logits: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Gate values g(i,t) of each token's chosen experts.

    router_logits: [N, E]; topk_idx: [N, K] -> [N, K] float32, taken before any top-k
    renormalisation or routed scaling factor (for softmax routers), as ESFT-Gate defines them.
    """
    logits = router_logits.float()
    if family.affinity == "softmax":
        return logits.softmax(dim=-1).gather(1, topk_idx)
    if family.affinity == "sigmoid_topk_norm":
        g = logits.sigmoid().gather(1, topk_idx)
        return g / (g.sum(dim=-1, keepdim=True) + 1e-20)
    raise ValueError(f"unknown affinity {family.affinity!r}")
