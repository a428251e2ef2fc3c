"""Many ESFT adapters over one base model, in one forward pass (ExpertWeave-style).

ESFT freezes the router, so every adapter routes exactly like the base model; an adapter only
replaces a few experts' weights. Per MoE layer, :class:`WovenExperts` keeps one experts module
``all`` of the model's own class over E + M experts: the E base experts followed by the M experts
that the loaded adapters changed (the base module's tensors become views of its first E rows, so
the base is held once), and a table

    table   [A, E] long: for adapter row a and expert e, the index in ``all`` to run
            (row 0 = the base model: e itself; an adapter's changed expert: E + its slot)

After routing (the base router's, untouched), each token's top-k ids are looked up in its
request's table row and the model's own experts code runs once on the rewritten ids. So one batch
mixes requests of different adapters and of the base model, at the cost of one table lookup per
layer, and memory is the base once plus only the experts each adapter changed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapter.fingerprint import model_fingerprint
from ..adapter.io import Adapter, AdapterError, _split, check_base, read_adapter
from ..models.registry import get_family, moe_layers
from ..models.layout import expert_params
from ..training.experts import _subset_copy


class WovenExperts(nn.Module):
    """forward(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H], with
    ``self.rows`` ([B] adapter row per sequence, set by :class:`Weaver`) and N = B x T."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.all = base  # the base itself while no adapter is loaded
        self.E = base.gate_up_proj.shape[0]
        self.register_buffer("table", torch.arange(self.E, device=base.gate_up_proj.device).unsqueeze(0),
                             persistent=False)
        self.rows: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.E

    @torch.no_grad()
    def build(self, experts: list[tuple[torch.Tensor, ...]], table: torch.Tensor) -> tuple:
        """The new woven tensors for the adapters' experts ([(gate_up row, down row, biases...), ...] in
        ``expert_params`` order) and the
        [A, E] index table, allocated but not installed (so a failure, e.g. out of memory, changes nothing)."""
        dev = self.base.gate_up_proj.device
        if not experts:
            return table.to(dev), None
        full = {}
        for i, n in enumerate(expert_params(self.base)):
            current = getattr(self.base, n).detach()
            full[n] = torch.cat([current, torch.stack([e[i] for e in experts]).to(dev, current.dtype)])  # [E+M, ...]
        return table.to(dev), full

    @torch.no_grad()
    def install(self, built: tuple) -> None:
        table, full = built
        self.table = table
        if full is None:
            if self.all is not self.base:  # give the base its own storage back, free the woven one
                for n in expert_params(self.base):
                    setattr(self.base, n, nn.Parameter(getattr(self.base, n).detach().clone(), requires_grad=False))
                self.all = self.base
            return
        woven = _subset_copy(self.base, [0])  # same class and settings; its weights are replaced below
        for n, w in full.items():
            setattr(woven, n, nn.Parameter(w, requires_grad=False))
            setattr(self.base, n, nn.Parameter(w[: self.E], requires_grad=False))  # a view: the base held once
        woven.num_experts = full["gate_up_proj"].shape[0]
        self.all = woven

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.all is self.base:
            return self.base(hidden_states, top_k_index, top_k_weights)
        N = hidden_states.shape[0]
        rows = self.rows if self.rows is not None else torch.zeros(1, dtype=torch.long)
        if N % rows.numel():
            raise RuntimeError(f"woven experts got {N} tokens for a batch of {rows.numel()} sequences")
        per_token = rows.to(hidden_states.device).repeat_interleave(N // rows.numel())  # [N]
        return self.all(hidden_states, self.table[per_token.unsqueeze(1), top_k_index], top_k_weights)


class Weaver:
    """Loads adapters by name onto one base model; ``rows_for(names)`` gives the per-sequence table rows.

    Usage::

        w = Weaver(model)
        w.load("sql", "adapters/sql")
        w.set_rows(["sql", None, "sql"])      # one name per sequence; None = the base model
        model(input_ids=...)                  # [3, T]: each row through its own adapter
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = get_family(model)
        if self.family.experts_kind != "sparse":
            raise NotImplementedError(f"serving several adapters over one {self.family.model_type} model is not "
                                      f"supported: its experts ({self.family.experts_kind}) take no expert ids to "
                                      "rewrite; merge each adapter instead")
        self.layers = {l.index: l for l in moe_layers(model)}
        # name -> (layer, expert) -> (gate_up row, down row, biases...): views of the woven rows once installed
        self.adapters: dict[str, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.fingerprint = model_fingerprint(model)  # of the plain base, before any weaving
        for l in self.layers.values():
            if not isinstance(l.experts, WovenExperts):
                setattr(l.block, self.family.experts_attr, WovenExperts(l.experts))
        self.layers = {l.index: l for l in moe_layers(model)}
        self._rebuild()

    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, name: str, adapter: Adapter | str, allow_other_base: bool = False) -> None:
        """Validate and add an adapter (routed experts only: dense changes cannot be shared per request)."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        a = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
        if not allow_other_base:
            check_base(self.model, a, self.fingerprint)
        routed, rest = _split(a, self.model)  # the woven modules name their frozen experts ".experts.base."
        if rest:
            raise AdapterError(f"{a.path}: trains non-expert tensors ({sorted(rest)[:3]}...); only routed-expert "
                               "adapters can share one base model. Merge it into its own checkpoint instead.")
        experts = {}
        for l, tensors in routed.items():
            w = self.layers[l].experts.base
            ids = list(a.expert_cfg["experts"][l])
            params = dict(w.named_parameters(recurse=False))
            rows = self.layers[l].layout().from_checkpoint(ids, tensors, params)
            for s, e in enumerate(ids):
                experts[(l, e)] = tuple(rows[n][s] for n in expert_params(w))
        self.adapters[name] = experts
        try:
            self._rebuild()
        except BaseException:
            del self.adapters[name]  # nothing was installed: back to the previous set
            raise

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} (loaded: {', '.join(self.adapters) or 'none'})")
        before = dict(self.adapters)  # the order of names is the order of table rows
        del self.adapters[name]
        try:
            self._rebuild()
        except BaseException:
            self.adapters = before  # nothing was installed: the old tables still match
            raise

    def row(self, name: str | None) -> int:
        if name is None:
            return 0
        try:
            return 1 + list(self.adapters).index(name)
        except ValueError:
            raise KeyError(f"no adapter named {name!r} (loaded: {', '.join(self.adapters) or 'none'})") from None

    def set_rows(self, names: list[str | None]) -> None:
        rows = torch.tensor([self.row(n) for n in names], dtype=torch.long)
        for l in self.layers.values():
            l.experts.rows = rows

    def weight_bytes(self) -> int:
        """Bytes of distinct parameter storage (woven base views are not counted twice)."""
        return storage_bytes(self.model)

    def adapter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ex in self.adapters.values() for pair in ex.values() for t in pair)

    def _rebuild(self) -> None:
        """Rebuild every layer's woven tensors and table; all are built before any is installed."""
        names = list(self.adapters)
        built, slots = {}, {}
        for li, l in self.layers.items():
            E = l.experts.E
            table = torch.arange(E).repeat(1 + len(names), 1)  # [A, E]: every row starts as the base
            stacked = []
            for a, name in enumerate(names, start=1):
                for (layer, e), pair in sorted(self.adapters[name].items()):
                    if layer == li:
                        table[a, e] = E + len(stacked)
                        slots[(name, layer, e)] = E + len(stacked)
                        stacked.append(pair)
            built[li] = l.experts.build(stacked, table)
        for li, l in self.layers.items():
            l.experts.install(built[li])
        # Keep each adapter's experts only as views of the woven rows: no second copy in memory.
        for (name, layer, e), row in slots.items():
            woven = self.layers[layer].experts.all
            self.adapters[name][(layer, e)] = tuple(getattr(woven, n)[row] for n in expert_params(woven))


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters (views count once)."""
    seen = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
