"""Finding a model's MoE blocks, routers, fused experts and shared experts from its module structure.

transformers 5.x models follow one convention for routed experts: an experts module whose
``gate_up_proj`` and ``down_proj`` are 3-D parameters (experts along dim 0), a sibling router module
holding one weight row per expert, and the two inside a block that is (part of) a decoder layer of a
``ModuleList``. :func:`discover` reads that from a model, without a table of paths per family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class StructureError(ValueError):
    """The model's structure is not one ESFT can work with; the message says why."""


@dataclass(frozen=True)
class Structure:
    """Module paths of a model's MoE parts, the same for every MoE layer.

    layers_path: the ModuleList of decoder layers ("model.layers", "model.language_model.layers");
    moe_attr: the MoE block inside a layer ("mlp", "block_sparse_moe", "feed_forward");
    router_attr / experts_attr: inside the block; shared_attrs: the block's shared-expert modules;
    moe_layers: the decoder-layer indices that hold routed experts.
    """

    layers_path: str
    moe_attr: str
    router_attr: str
    experts_attr: str
    shared_attrs: tuple[str, ...]
    moe_layers: tuple[int, ...]


def is_fused_experts(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3


def _experts_modules(model: nn.Module) -> list[str]:
    """Module names of fused experts; an ESFT or serving wrapper counts as the experts it wraps."""
    found, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in inside):
            continue
        base = getattr(m, "base", None)
        if base is not None and is_fused_experts(base) and not is_fused_experts(m):
            found.append(name)  # ESFTExperts / WovenExperts
            inside.append(name)
        elif is_fused_experts(m):
            found.append(name)
    return found


def _router_of(block: nn.Module, experts_attr: str, num_experts: int, hidden: int | None) -> str | None:
    """The block's child holding one weight row per expert ([E, H]): the router."""
    for name, child in block.named_children():
        if name == experts_attr or "shared" in name:
            continue
        w = getattr(child, "weight", None)
        if w is not None and w.dim() == 2 and w.shape[0] == num_experts and (hidden is None or w.shape[1] == hidden):
            return name
    return None


def discover(model: nn.Module) -> Structure:
    """The MoE structure of ``model``; StructureError naming the reason when there is none usable."""
    names = _experts_modules(model)
    if not names:
        raise StructureError(f"{type(model).__name__} has no MoE layer with fused routed experts (3-D gate_up_proj "
                             "and down_proj parameters); ESFT needs routed experts")
    modules = dict(model.named_modules())
    found = []
    for name in names:
        parts = name.split(".")
        # the decoder layer: the deepest "<ModuleList>.<index>" above the experts
        cut = next((i for i in range(len(parts) - 2, 0, -1)
                    if parts[i].isdigit() and isinstance(modules.get(".".join(parts[:i])), nn.ModuleList)), None)
        if cut is None or cut + 1 >= len(parts) - 1:
            raise StructureError(f"{name}: the fused experts are not inside a block of a decoder layer list")
        block_name = ".".join(parts[:-1])
        experts = modules[name]
        base = getattr(experts, "base", experts) if not is_fused_experts(experts) else experts
        E = base.gate_up_proj.shape[0]
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        router = _router_of(modules[block_name], parts[-1], E, None)
        if router is None:
            raise StructureError(f"{block_name}: no router next to the experts (a child module with a weight of one "
                                 f"row per expert, [{E}, {hidden}])")
        shared = tuple(n for n, _ in modules[block_name].named_children() if "shared" in n)
        found.append((".".join(parts[:cut]), int(parts[cut]), ".".join(parts[cut + 1:-1]), router, parts[-1], shared))
    paths = {(f[0], f[2], f[3], f[4]) for f in found}
    if len(paths) != 1:
        raise StructureError(f"the MoE blocks sit at different module paths {sorted(paths)}; ESFT needs one path "
                             "for all MoE layers")
    layers_path, moe_attr, router_attr, experts_attr = paths.pop()
    shared = tuple(sorted({s for f in found for s in f[5]}))
    return Structure(layers_path, moe_attr, router_attr, experts_attr, shared, tuple(sorted(f[1] for f in found)))
