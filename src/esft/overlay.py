"""The expert overlay: a few replacement expert rows laid over a frozen fused experts module.

Training and serving both need "the model's experts, except that some (table row, expert) pairs run
other weights": training runs the S selected experts from a trainable copy, serving runs each
adapter's changed experts from that adapter's rows. One module does both, so the rules for fused
expert tensors, sentinel ids and biases live here only::

    ExpertOverlay
      base     the original fused experts module, frozen, holding all E experts (never copied)
      trained  a second instance of the model's *own* experts class holding R overlay rows
               ([R, 2I, H], [R, H, I], biases [R, ...]): the experts being trained, or adapter slots
      table    [A, E] long: for table row a and expert e, the overlay row to run, or -1 (the base)
      rows     None (every token uses table row 0), or [B] the table row of each sequence (serving)

After routing, each token's top-k ids are looked up in its table row. Pairs with an overlay row get
the sentinel id E in ``base`` (transformers' expert-parallel flag makes every experts implementation
skip ids >= num_experts) and are gathered, one pair per row, through ``trained``; both outputs are
summed. Training uses one table row (the selected experts, ``trained`` trainable); serving uses row 0
= the base model (all -1) and one row per loaded adapter, with R preallocated slots that a load fills
in place (see ``serving/weave.py``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .models.layout import expert_params


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


def unwrapped_class(module: nn.Module) -> type:
    """The model's own class of a module, also when FSDP2's fully_shard replaced it by a subclass."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    return cls


def rows_module(experts: nn.Module, rows: dict[str, torch.Tensor], trainable: bool) -> nn.Module:
    """A shallow copy of a fused experts module whose per-expert tensors are ``rows`` ({name: [R, ...]} for
    every name of ``expert_params``: weights and, where the family has them, biases); same class, same
    settings (activation, implementation), its own parameter registry."""
    names = {n for n, _ in experts.named_parameters(recurse=False)}
    fused = set(expert_params(experts))
    if names != fused:
        raise NotImplementedError(
            f"{type(experts).__name__} has parameters {sorted(names - fused)} that are not per-expert tensors "
            f"(experts along dim 0); an expert overlay can only replace per-expert rows"
        )
    if set(rows) != fused:
        raise ValueError(f"overlay rows for {sorted(rows)}, the experts have {sorted(fused)}")
    # A shallow copy of the plain class: FSDP2 (fully_shard) swaps in a subclass whose __new__ re-runs
    # __init__, and the copy must not share the original's FSDP state.
    cls = unwrapped_class(experts)
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
        setattr(sub, n, nn.Parameter(rows[n], requires_grad=trainable))
    sub.num_experts = rows["gate_up_proj"].shape[0]
    return sub


class ExpertOverlay(nn.Module):
    """forward(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]; see the module docstring.

    ``every_row``: run every overlay row in every forward (one zero-weighted token each). Training needs
    it (FSDP2 collectives on every rank, a defined gradient for every selected expert); serving does not.
    """

    def __init__(self, base: nn.Module, trained: nn.Module, table: torch.Tensor, kind: str = "sparse",
                 every_row: bool = False):
        super().__init__()
        E = base.gate_up_proj.shape[0]
        if table.dim() != 2 or table.shape[1] != E:
            raise ValueError(f"the overlay table must be [rows, {E}], got {tuple(table.shape)}")
        self.kind, self.every_row = kind, every_row
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.trained = trained
        # transformers' expert-parallel flag means "ids >= num_experts are sentinels": every
        # experts implementation (eager, batched_mm, grouped_mm) then skips or zeroes them.
        self._base_was_ep = getattr(base, "_is_expert_parallel", False)
        base._is_expert_parallel = True
        trained._is_expert_parallel = True
        self.register_buffer("table", table.to(base.gate_up_proj.device), persistent=False)
        self.rows: torch.Tensor | None = None  # [B] table row per sequence (on the table's device), or None

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    @torch.no_grad()
    def write(self, slots: list[int], rows: dict[str, torch.Tensor]) -> None:
        """Write {param: [S, ...]} into overlay rows ``slots`` in place (no other tensor is allocated)."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.table.device)
        for n in expert_params(self.base):
            w = getattr(self.trained, n)
            w.index_copy_(0, idx.to(w.device), rows[n].to(w.device, w.dtype))

    def restore(self) -> nn.Module:
        """The base module with its own expert-parallel flag back (the overlay is dropped by the caller)."""
        self.base._is_expert_parallel = self._base_was_ep
        return self.base

    def _slots(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """[N, K] overlay row of each (token, expert) pair, -1 for the base."""
        if self.rows is None:
            return self.table[0][top_k_index]
        N, B = top_k_index.shape[0], self.rows.numel()
        if N % B:
            raise RuntimeError(f"the expert overlay got {N} tokens for a batch of {B} sequences")
        per_token = self.rows.repeat_interleave(N // B)  # [N]: tokens are sequence-major (B x T)
        return self.table[per_token.unsqueeze(1), top_k_index]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None):
        if self.kind == "dense_bmm":
            return self._dense(hidden_states)
        slot = self._slots(top_k_index)  # [N, K]
        chosen = slot >= 0
        if not self.every_row and not bool(chosen.any()):  # serving a batch of base requests: the base alone
            return self._frozen(hidden_states, top_k_index, top_k_weights)
        base_idx = top_k_index.masked_fill(chosen, self.base.num_experts)  # sentinel: skipped by base
        out = self._frozen(hidden_states, base_idx, top_k_weights.masked_fill(chosen, 0))
        # Only the (token, slot) pairs routed to an overlay row go through `trained`, one pair per row
        # (k=1): its cost follows the few pairs it serves, not all N x K.
        tok, pos = chosen.nonzero(as_tuple=True)  # [P], [P]
        # Training adds one zero-weighted row per overlay row, so that `trained` runs, and every selected
        # expert gets a (zero) gradient, in every forward, whatever the tokens: FSDP2, which shards `trained`
        # under torchrun, gathers its weights and reduces its gradients on every rank, and a rank whose tokens
        # missed an expert must take part all the same. It also makes a step's gradient always defined.
        R = self.trained.gate_up_proj.shape[0] if self.every_row else 0
        rows = torch.cat([hidden_states[tok], hidden_states.new_zeros(R, hidden_states.shape[-1])])  # [P+R, H]
        ids = torch.cat([slot[tok, pos], torch.arange(R, device=slot.device)]).unsqueeze(1)  # [P+R, 1]
        weights = torch.cat([top_k_weights[tok, pos], top_k_weights.new_zeros(R)]).unsqueeze(1)  # [P+R, 1]
        y = self.trained(rows, ids, weights)[: tok.numel()]  # [P, H]
        return out.index_add(0, tok, y.to(out.dtype))

    def _dense(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama 4's experts: hidden [E * N, H], rows grouped by expert (already scaled by the router) ->
        [E * N, H]. The frozen module runs all E experts; the overlaid experts' rows (table row 0: training
        only, these experts take no ids to look up per request) are replaced by ``trained``'s output."""
        E = self.base.gate_up_proj.shape[0]
        out = self.base(hidden_states).view(E, -1, hidden_states.shape[-1])  # [E, N, H]
        slot = self.table[0]
        idx = (slot >= 0).nonzero(as_tuple=True)[0]
        idx = idx[slot[idx].argsort()]  # experts in overlay-row order
        mine = hidden_states.view(E, -1, hidden_states.shape[-1]).index_select(0, idx)  # [R, N, H]
        y = self.trained(mine.reshape(-1, mine.shape[-1])).view(idx.numel(), -1, out.shape[-1])
        return out.index_copy(0, idx, y.to(out.dtype)).view(-1, out.shape[-1])

    def _frozen(self, hidden_states, top_k_index, top_k_weights):
        eager = getattr(unwrapped_class(self.base).forward, "__wrapped__", None)
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
