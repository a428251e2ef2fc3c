"""Making only the selected experts trainable when transformers fuses all experts in one tensor.

transformers 5.x keeps a layer's routed experts as ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]; ``requires_grad`` cannot freeze part of a tensor, and training the
whole tensor would make gradients and AdamW state scale with E. So each MoE layer's experts
module is swapped (PEFT-style, the model's code is untouched) for :class:`ESFTExperts`:

    ESFTExperts
      base     the original fused module, frozen, still holding all E experts
      trained  a second instance of the *same class* holding only the S selected experts
               ([S, 2I, H], [S, H, I]), trainable

After routing, each token's expert ids are split: ids of selected experts become the sentinel
E in ``base``, and the (token, expert) pairs that hit a selected expert are gathered and run
through ``trained`` (one pair per row, id = the expert's slot), then added back. Every transformers experts implementation
(eager loop, batched_mm, grouped_mm) skips sentinel ids once the
module's expert-parallel flag is set (that is what the flag means in transformers), so both halves run the model's own
expert code and the output is their sum. Gradients, and so optimizer state, exist only for the
S selected experts; frozen experts compute input gradients only.

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

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # always present; expert_params() adds a family's biases


def expert_rows(t: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Rows ``ids`` of a fused expert tensor [E, ...] -> a plain tensor [len(ids), ...] on every rank.

    A tensor sharded over ranks (a DTensor: FSDP2 or expert parallelism, rows split along dim 0) is
    never gathered whole: each selected row is filled in by the first rank that holds it and summed
    over the ranks (adding zeros is exact), so the cost is the selected rows only.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.index_select(0, torch.tensor(ids, dtype=torch.long, device=t.device)).clone()
    import torch.distributed as dist
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = t.device_mesh
    if mesh.size() != dist.get_world_size():
        raise NotImplementedError(f"expert tensors sharded over a sub-mesh of {mesh.size()} of "
                                  f"{dist.get_world_size()} ranks (e.g. pipeline parallelism) are not supported")
    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    if tuple(shape[1:]) != tuple(t.shape[1:]):
        raise NotImplementedError(f"expert tensors sharded along a dim other than the experts' ({t.placements})")
    spans = [None] * dist.get_world_size()  # every rank's (first row, row count)
    dist.all_gather_object(spans, (offset[0], shape[0]))
    me = dist.get_rank()
    out = torch.zeros((len(ids), *t.shape[1:]), dtype=local.dtype, device=local.device)
    for slot, e in enumerate(ids):
        owner = next(r for r, (start, n) in enumerate(spans) if start <= e < start + n)
        if owner == me:
            out[slot] = local[e - offset[0]]
    dist.all_reduce(out)
    return out


def _unwrapped_class(module: nn.Module) -> type:
    """The model's own class of a module, also when FSDP2's fully_shard replaced it by a subclass."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    return cls


def _subset_copy(experts: nn.Module, ids: list[int]) -> nn.Module:
    """A shallow copy of a fused experts module that owns only rows ``ids`` of its expert tensors
    (weights and, where the family has them, biases: every parameter with the experts along dim 0)."""
    names = {n for n, _ in experts.named_parameters(recurse=False)}
    fused = set(expert_params(experts))
    if names != fused:
        raise NotImplementedError(
            f"{type(experts).__name__} has parameters {sorted(names - fused)} that are not per-expert tensors "
            f"(experts along dim 0); ESFT can only train per-expert rows"
        )
    # A shallow copy of the plain class: FSDP2 (fully_shard) swaps in a subclass whose __new__ re-runs
    # __init__, and the copy must not share the original's FSDP state.
    cls = _unwrapped_class(experts)
    sub = cls.__new__(cls)
    sub.__dict__.update(experts.__dict__)
    # copy.copy shares the registries of the original; give the copy its own.
    sub._parameters = OrderedDict()
    sub._buffers = OrderedDict(experts._buffers)
    sub._modules = OrderedDict(experts._modules)
    sub._forward_hooks = OrderedDict()
    sub._forward_pre_hooks = OrderedDict()
    # torch's composable APIs (fully_shard) keep their per-module state in the module's __dict__: the
    # copy is not the original's FSDP unit (under torchrun it is sharded on its own, see shard_trainable).
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY

    sub.__dict__.pop(STATE_KEY, None)
    sub.__dict__.pop(REGISTRY_KEY, None)
    # accelerate's dispatch (device_map) rebinds `forward` on the instance to run *the original*
    # module through its device hook; the copy must run its own class forward on its own weights.
    for attr in ("forward", "_hf_hook", "_old_forward"):
        sub.__dict__.pop(attr, None)
    for n in expert_params(experts):
        setattr(sub, n, nn.Parameter(expert_rows(getattr(experts, n).detach(), ids)))
    sub.num_experts = len(ids)
    return sub


class ESFTExperts(nn.Module):
    """Fused experts with a trainable subset. forward(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]."""

    def __init__(self, base: nn.Module, selected: list[int], kind: str = "sparse"):
        super().__init__()
        if not selected:
            raise ValueError("ESFTExperts needs at least one selected expert")
        self.kind = kind
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.selected = list(selected)
        self.trained = _subset_copy(base, self.selected)
        # transformers' expert-parallel flag means "ids >= num_experts are sentinels": every
        # experts implementation (eager, batched_mm, grouped_mm) then skips or zeroes them.
        self._base_was_ep = getattr(base, "_is_expert_parallel", False)
        base._is_expert_parallel = True
        self.trained._is_expert_parallel = True
        E = base.gate_up_proj.shape[0]
        slot = torch.full((E,), -1, dtype=torch.long)
        slot[torch.tensor(self.selected)] = torch.arange(len(self.selected))
        self.register_buffer("slot_of", slot.to(base.gate_up_proj.device), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None):
        if self.kind == "dense_bmm":
            return self._dense(hidden_states)
        slot = self.slot_of[top_k_index]  # [N, K]; -1 where the expert is frozen
        chosen = slot >= 0
        base_idx = top_k_index.masked_fill(chosen, self.base.num_experts)  # sentinel: skipped by base
        out = self._frozen(hidden_states, base_idx, top_k_weights.masked_fill(chosen, 0))
        # Only the (token, slot) pairs routed to a selected expert go through `trained`, one pair
        # per row (k=1): its cost follows the few pairs it serves, not all N x K.
        tok, pos = chosen.nonzero(as_tuple=True)  # [P], [P]
        # Plus one zero-weighted row per slot, so that `trained` runs, and every selected expert gets a
        # (zero) gradient, in every forward, whatever the tokens: FSDP2, which shards `trained` under
        # torchrun, gathers its weights and reduces its gradients on every rank, and a rank whose tokens
        # missed an expert must take part all the same. It also makes a step's gradient always defined.
        S = len(self.selected)
        rows = torch.cat([hidden_states[tok], hidden_states.new_zeros(S, hidden_states.shape[-1])])  # [P+S, H]
        ids = torch.cat([slot[tok, pos], torch.arange(S, device=slot.device)]).unsqueeze(1)  # [P+S, 1]
        weights = torch.cat([top_k_weights[tok, pos], top_k_weights.new_zeros(S)]).unsqueeze(1)  # [P+S, 1]
        y = self.trained(rows, ids, weights)[: tok.numel()]  # [P, H]
        return out.index_add(0, tok, y.to(out.dtype))

    def _dense(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama 4's experts: hidden [E * N, H], rows grouped by expert (already scaled by the router) ->
        [E * N, H]. The frozen module runs all E experts; the selected experts' rows are replaced by the
        trainable copy's output on the same rows."""
        E = self.base.gate_up_proj.shape[0]
        out = self.base(hidden_states).view(E, -1, hidden_states.shape[-1])  # [E, N, H]
        idx = torch.tensor(self.selected, device=hidden_states.device)
        mine = hidden_states.view(E, -1, hidden_states.shape[-1]).index_select(0, idx)  # [S, N, H]
        y = self.trained(mine.reshape(-1, mine.shape[-1])).view(len(self.selected), -1, out.shape[-1])
        return out.index_copy(0, idx, y.to(out.dtype)).view(-1, out.shape[-1])

    def _frozen(self, hidden_states, top_k_index, top_k_weights):
        eager = getattr(_unwrapped_class(self.base).forward, "__wrapped__", None)
        # Hooks (FSDP2 unsharding, expert-parallel token dispatch, accelerate offload) run only through
        # the module call: with any of them, the frozen half must go through it.
        hooked = bool(self.base._forward_pre_hooks or self.base._forward_hooks)
        if (eager is not None and not hooked and hidden_states.device.type == "cpu" and hidden_states.requires_grad
                and self._eager_skips_sentinel(eager, hidden_states)):
            # transformers' CPU fallback for grouped_mm always computes (and allocates) the weight
            # gradient of all E experts, frozen or not; the model's own eager loop computes only the
            # input gradient here, which is all that frozen experts need.
            return eager(self.base, hidden_states, top_k_index, top_k_weights)
        return self.base(hidden_states, top_k_index, top_k_weights)

    def _eager_skips_sentinel(self, eager, hidden_states) -> bool:
        """Whether the class's own eager loop skips the sentinel id E (gpt-oss's one_hot has no class for it)."""
        ok = getattr(self, "_eager_ok", None)
        if ok is None:
            E = self.base.gate_up_proj.shape[0]
            h = hidden_states.new_zeros((1, hidden_states.shape[-1])).detach()
            try:
                with torch.no_grad():
                    eager(self.base, h, torch.full((1, 1), E, device=h.device), h.new_ones((1, 1)))
                ok = True
            except (RuntimeError, IndexError):
                ok = False
            self._eager_ok = ok
        return ok

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
    plan = TrainablePlan(family=family, expert_cfg=expert_cfg, model=model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            plan.params[name] = p
    check_in_memory(plan.params)
    for l in moe_layers(model):
        if isinstance(l.experts, ESFTExperts):
            plan.wrappers[l.index] = l.experts
    return plan


@torch.no_grad()
def unwrap_esft(model: nn.Module) -> nn.Module:
    """Write trained experts back into the fused tensors and restore the original modules. In place."""
    family = get_family(model)
    for l in moe_layers(model):
        if isinstance(l.experts, ESFTExperts):
            merged = l.experts.merged()
            base = l.experts.base
            for n, w in merged.items():
                getattr(base, n).copy_(w)
            base._is_expert_parallel = l.experts._base_was_ep
            setattr(l.block, family.experts_attr, base)
    return model
