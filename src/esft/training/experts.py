"""Making only the selected experts trainable when transformers fuses all experts in one tensor.

transformers 5.x keeps a layer's routed experts as ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]; ``requires_grad`` cannot freeze part of a tensor, and training the
whole tensor would make gradients and AdamW state scale with E. So each MoE layer's experts
module is swapped (PEFT-style, the model's code is untouched) for :class:`ESFTExperts`, the
expert overlay of ``esft/overlay.py`` (shared with serving) with one table row:

    ESFTExperts
      base     the original fused module, frozen, still holding all E experts
      trained  a second instance of the *same class* holding only the S selected experts
               ([S, 2I, H], [S, H, I], biases), trainable
      table    [1, E]: the selected experts' slots in ``trained``, -1 elsewhere

Ids of selected experts become the sentinel E in ``base`` and their (token, expert) pairs run
through ``trained``; see the overlay for why both halves run the model's own expert code and the
output is their sum. Gradients, and so optimizer state, exist only for the S selected experts;
frozen experts compute input gradients only.

One :class:`TrainablePlan` (name -> tensor) then drives the optimizer, checkpointing and the
adapter file.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..io import DataError
from ..models.layout import expert_params
from ..models.registry import MoEFamily, base_experts, get_family, moe_layers
from ..overlay import ExpertOverlay, expert_rows, rows_module

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # always present; expert_params() adds a family's biases


class ESFTExperts(ExpertOverlay):
    """Fused experts with a trainable subset. forward(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]."""

    def __init__(self, base: nn.Module, selected: list[int], kind: str = "sparse"):
        if not selected:
            raise ValueError("ESFTExperts needs at least one selected expert")
        rows = {n: expert_rows(getattr(base, n).detach(), list(selected)) for n in expert_params(base)}
        E = base.gate_up_proj.shape[0]
        table = torch.full((1, E), -1, dtype=torch.long)
        table[0, torch.tensor(selected)] = torch.arange(len(selected))
        super().__init__(base, rows_module(base, rows, trainable=True), table, kind, every_row=True)
        self.selected = list(selected)

    @property
    def slot_of(self) -> torch.Tensor:
        """[E]: each expert's row in ``trained``, -1 if frozen."""
        return self.table[0]

    @torch.no_grad()
    def merged(self) -> dict[str, torch.Tensor]:
        """The fused tensors with the trained rows written back: {"gate_up_proj": [E,2I,H], "down_proj": [E,H,I], ...}."""
        idx = torch.tensor(self.selected, device=self.base.gate_up_proj.device)
        out = {}
        for n in expert_params(self.base):
            w = getattr(self.base, n).detach().clone()
            w.index_copy_(0, idx, getattr(self.trained, n).detach().to(w.dtype))
            out[n] = w
        return out


@dataclass
class TrainablePlan:
    """The one list of what trains. ``experts[layer][expert]`` -> (gate_up [2I,H] view, down [H,I] view)."""

    family: MoEFamily
    expert_cfg: dict
    model: nn.Module | None = None
    params: "OrderedDict[str, nn.Parameter]" = field(default_factory=OrderedDict)  # module name -> param
    wrappers: dict[int, ESFTExperts] = field(default_factory=dict)  # layer -> wrapper

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def adapter_state_dict(self, source: dict[str, torch.Tensor] | None = None) -> "OrderedDict[str, torch.Tensor]":
        """Trained tensors under the base checkpoint's own key names (per-expert keys for routed experts).

        ``source`` ({param name: tensor of the same shape}, e.g. the fp32 masters of a bf16 run) is read
        instead of the model's own parameters when given.
        """
        name_of = {id(p): n for n, p in self.params.items()}

        def read(p: torch.Tensor) -> torch.Tensor:
            return (source[name_of[id(p)]] if source is not None else p).detach()

        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        layers = {l.index: l for l in moe_layers(self.model)} if self.wrappers else {}
        for layer, w in sorted(self.wrappers.items()):
            rows = {n: read(getattr(w.trained, n)) for n in expert_params(w.trained)}
            out.update(sorted(layers[layer].layout().to_checkpoint(w.selected, rows).items()))
        for name, p in self.params.items():
            if ".trained." in name:
                continue
            out[self.family.checkpoint_name(name)] = read(p).contiguous()
        return out


OFFLOAD_HINT = ('map {module} to a GPU (accelerate offloads "cpu" entries when GPUs are in the map), or to '
                '"cpu" on a machine without GPUs')


def check_in_memory(params: dict[str, torch.Tensor], what: str = "trainable") -> None:
    """Refuse tensors a device map left on the meta device: they have no values to train or overwrite."""
    off = [n for n, p in params.items() if p.device.type == "meta"]
    if off:
        module = ".".join(off[0].split(".")[:3])
        raise DataError(f"{len(off)} {what} tensor(s) are on the meta device (offloaded by the device map), e.g. "
                        f"{', '.join(off[:3])}: {OFFLOAD_HINT.format(module=module)}")


def validate_expert_cfg(model: nn.Module, expert_cfg: dict, source: str = "expert config") -> None:
    """Raise DataError if the config names a layer or expert the model lacks (before any training)."""
    layers = {l.index: l for l in moe_layers(model)}
    for layer, experts in expert_cfg["experts"].items():
        if layer not in layers:
            raise DataError(
                f"{source}: layer {layer} is not an MoE layer of this model (MoE layers: {sorted(layers)})"
            )
        E = layers[layer].num_experts
        for e in experts:
            if not 0 <= e < E:
                raise DataError(f"{source}: layer {layer} expert {e} does not exist (the model has experts 0..{E - 1})")


def apply_esft(model: nn.Module, expert_cfg: dict, prepare=None) -> TrainablePlan:
    """Freeze ``model`` except what ``expert_cfg`` names; swap in :class:`ESFTExperts`. In place.

    ``prepare(wrapper)``, if given, is called on each new wrapper as soon as it exists (under torchrun:
    shard its trainable copy), so that at most one layer's copy is ever held whole.
    """
    family = get_family(model)
    validate_expert_cfg(model, expert_cfg)
    layers = moe_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if expert_cfg.get("non_expert_modules"):
        # Paper Table 3 ablation: everything except the routed experts trains as well.
        routed = {id(p) for l in layers for p in base_experts(l.experts).parameters()}
        for p in model.parameters():
            if id(p) not in routed:
                p.requires_grad_(True)
    if expert_cfg.get("shared_experts"):
        for l in layers:
            for _, mod in l.shared:
                for p in mod.parameters():
                    p.requires_grad_(True)
    for l in layers:
        selected = expert_cfg["experts"].get(l.index, [])
        if selected and base_experts(l.experts).gate_up_proj.device.type == "meta":
            raise DataError(
                f"layer {l.index}: experts {selected} are selected for training, but the device map left this "
                f"layer's experts on the meta device (offloaded to disk, or to CPU next to GPUs, by accelerate); "
                f"trained experts must be in memory: {OFFLOAD_HINT.format(module=l.prefix.rsplit('.', 1)[0])}"
            )
        if selected and not isinstance(l.experts, ESFTExperts):
            l.layout()  # read (and cache) the checkpoint layout from the plain module, before it is wrapped
            wrapper = ESFTExperts(l.experts, selected, family.experts_kind)
            setattr(l.block, family.experts_attr, wrapper)
            if prepare is not None:
                prepare(wrapper)
    return fill_plan(TrainablePlan(family=family, expert_cfg=expert_cfg, model=model), model, ESFTExperts)


def fill_plan(plan, model: nn.Module, kind: type):
    """``plan.params`` = every trainable parameter of ``model`` (checked to be in memory), ``plan.wrappers`` =
    each layer's overlay of class ``kind``; returns ``plan`` (ESFT's and ESFT-LoRA's plans alike)."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            plan.params[name] = p
    check_in_memory(plan.params)
    for l in moe_layers(model):
        if isinstance(l.experts, kind):
            plan.wrappers[l.index] = l.experts
    return plan


@torch.no_grad()
def unwrap_esft(model: nn.Module, kinds: tuple[type, ...] | None = None) -> nn.Module:
    """Write trained experts back into the fused tensors and restore the original modules. In place.

    ``kinds``: the overlay classes to unwrap (default ESFTExperts; esft-lora passes its own): each has
    ``merged()`` -> {tensor name: [E, ...] merged weights} and ``restore()`` -> the original module."""
    family = get_family(model)
    kinds = kinds or (ESFTExperts,)
    for l in moe_layers(model):
        if isinstance(l.experts, kinds):
            merged = l.experts.merged()
            base = l.experts.restore()
            for n, w in merged.items():
                getattr(base, n).copy_(w)
            setattr(l.block, family.experts_attr, base)
    return model
