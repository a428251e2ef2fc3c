"""Many ESFT adapters over one base model, in one forward pass (ExpertWeave-style).

ESFT freezes the router, so every adapter routes exactly like the base model; an adapter only
replaces a few experts' weights. Each MoE layer's experts become the expert overlay of
``esft/overlay.py`` (the same module training uses), with

    trained  R preallocated adapter slots ([R, 2I, H], [R, H, I], biases), R = ``max_adapter_experts``
    table    [1 + max_adapters, E]: row 0 = the base model (all -1); row a = one loaded adapter,
             holding for each expert it changed the slot of its weights, -1 elsewhere

Loading an adapter converts its checkpoint tensors to fused rows (the layer's checkpoint layout),
writes them into free slots in place and then fills its table row; unloading clears the table row
and frees the slots. Neither copies the base nor allocates more than the adapter's own rows, so
memory is the base once plus the slots, from start-up on. A request's sequence picks its table
row (``set_rows``), so one batch mixes requests of different adapters and of the base model.

An adapter with a non-finite value (NaN, Inf) in any tensor, as read or once converted to the model's
dtype (e.g. 1e5 in a float16 model), is refused at load, naming the adapter and the tensor: such a row
would end every request routed through it with an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapter.esft_lora import is_lora_adapter, materialize, read_lora_adapter
from ..adapter.fingerprint import model_fingerprint
from ..adapter.io import Adapter, AdapterError, _split, check_base, read_adapter
from ..models.layout import expert_params
from ..models.registry import get_family, moe_layers
from ..overlay import ExpertOverlay, rows_module


@dataclass
class _Loaded:
    row: int  # its table row
    slots: dict[int, list[int]]  # layer -> the slots of its experts (in the order of ``experts``)
    experts: dict[int, list[int]]  # layer -> the experts it changed
    name: str = ""


class Weaver:
    """Loads adapters by name onto one base model; ``set_rows(names)`` picks each sequence's adapter.

    Usage::

        w = Weaver(model, max_adapters=8, max_adapter_experts=16)
        w.load("sql", "adapters/sql")
        w.set_rows(["sql", None, "sql"])      # one name per sequence; None = the base model
        model(input_ids=...)                  # [3, T]: each row through its own adapter
    """

    def __init__(self, model: nn.Module, max_adapters: int = 64, max_adapter_experts: int | None = None):
        self.model = model
        self.family = get_family(model)
        if self.family.experts_kind != "sparse":
            raise NotImplementedError(f"serving several adapters over one {self.family.model_type} model is not "
                                      f"supported: its experts ({self.family.experts_kind}) take no expert ids to "
                                      "rewrite; merge each adapter instead")
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
        if max_adapter_experts is not None and max_adapter_experts < 1:
            raise ValueError(f"max_adapter_experts must be >= 1, got {max_adapter_experts}")
        self.max_adapters = max_adapters
        self.fingerprint = model_fingerprint(model)  # of the plain base, before any overlay
        self.adapters: dict[str, _Loaded] = {}
        self.free_rows = list(range(1, max_adapters + 1))
        self.free: dict[int, list[int]] = {}  # layer -> free slots
        for l in moe_layers(model):
            if isinstance(l.experts, ExpertOverlay):
                raise ValueError(f"layer {l.index}'s experts are wrapped already ({type(l.experts).__name__})")
            l.layout()  # read (and cache) the checkpoint layout from the plain module, before it is wrapped
            base = l.experts
            E = base.gate_up_proj.shape[0]
            R = max_adapter_experts or default_slots(E)
            # zeros, not empty: a free slot is never read, but its bytes are then counted honestly (touched)
            rows = {n: torch.zeros((R, *getattr(base, n).shape[1:]), dtype=getattr(base, n).dtype,
                                   device=getattr(base, n).device) for n in expert_params(base)}
            table = torch.full((1 + max_adapters, E), -1, dtype=torch.long)
            setattr(l.block, self.family.experts_attr,
                    ExpertOverlay(base, rows_module(base, rows, trainable=False), table, "sparse"))
            self.free[l.index] = list(range(R))
        self.layers = {l.index: l for l in moe_layers(model)}

    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, name: str, adapter: Adapter | str, allow_other_base: bool = False) -> None:
        """Validate an adapter (routed experts only: dense changes cannot be shared per request) and write
        its rows into free slots. Nothing changes unless it succeeds; the name is routable once it returns."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        if not isinstance(adapter, Adapter) and is_lora_adapter(adapter):
            # ESFT-LoRA: its merged rows W_e + (alpha/r) B_e A_e, computed once here, are served as an ESFT adapter's
            adapter = materialize(read_lora_adapter(adapter), self.model, self.fingerprint, allow_other_base)
        a = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
        if not allow_other_base:
            check_base(self.model, a, self.fingerprint)
        routed, rest = _split(a, self.model)
        for l, tensors in sorted(routed.items()):
            for key, t in sorted(tensors.items()):
                _check_finite(t, f"adapter {name!r} ({a.path}): tensor {key}")
        if rest:
            raise AdapterError(f"{a.path}: trains non-expert tensors ({sorted(rest)[:3]}...); only routed-expert "
                               "adapters can share one base model. Merge it into its own checkpoint instead.")
        if not self.free_rows:
            raise AdapterError(f"{a.path}: {self.max_adapters} adapters are loaded already, the most this server "
                               f"holds (esft serve --max-adapters); unload one first")
        experts = {l: list(a.expert_cfg["experts"][l]) for l in routed}
        full = {l: (len(ids), len(self.free[l])) for l, ids in experts.items() if len(ids) > len(self.free[l])}
        if full:
            l, (need, have) = next(iter(sorted(full.items())))
            total = len(self.free[l]) + sum(len(x.slots.get(l, ())) for x in self.adapters.values())
            raise AdapterError(f"{a.path}: layer {l} needs {need} adapter expert slots, {have} of {total} are free "
                               f"(esft serve --max-adapter-experts sets the slots per layer); unload an adapter "
                               f"or start the server with more")
        loaded = _Loaded(self.free_rows[0], {l: self.free[l][:len(ids)] for l, ids in experts.items()}, experts,
                         name)
        self._write(loaded, routed)
        self.free_rows.pop(0)
        for l, slots in loaded.slots.items():
            del self.free[l][:len(slots)]
        self.adapters[name] = loaded

    def _write(self, loaded: _Loaded, routed: dict[int, dict[str, torch.Tensor]]) -> None:
        """Write the adapter's rows into its (free) slots, layer by layer, then point its table row at them.

        The slots are free and its table row is all -1 until the end, so a failure (a bad tensor, out of
        memory for one layer's conversion) leaves every served adapter as it was."""
        for l, tensors in routed.items():
            overlay = self.layers[l].experts
            like = dict(overlay.base.named_parameters(recurse=False))
            # only this layer's rows exist at once: [S, ...] per parameter, the adapter's own size
            rows = self.layers[l].layout().from_checkpoint(loaded.experts[l], tensors, like)
            for param, t in rows.items():  # finite as read; the model's dtype may still overflow (fp16)
                _check_finite(t, f"adapter {loaded.name!r}: layer {l} {param} in {t.dtype}")
            overlay.write(loaded.slots[l], rows)
        for l, ids in loaded.experts.items():
            table = self.layers[l].experts.table
            table[loaded.row, torch.tensor(ids, device=table.device)] = torch.tensor(loaded.slots[l],
                                                                                    device=table.device)

    def unload(self, name: str) -> None:
        """Forget an adapter: its table row goes back to -1 and its slots are free (their bytes stay)."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} (loaded: {', '.join(self.adapters) or 'none'})")
        loaded = self.adapters.pop(name)
        for l in self.layers.values():
            l.experts.table[loaded.row].fill_(-1)
        for l, slots in loaded.slots.items():
            self.free[l].extend(slots)
        self.free_rows.append(loaded.row)

    def row(self, name: str | None) -> int:
        if name is None:
            return 0
        try:
            return self.adapters[name].row
        except KeyError:
            raise KeyError(f"no adapter named {name!r} (loaded: {', '.join(self.adapters) or 'none'})") from None

    def set_rows(self, names: list[str | None]) -> None:
        rows = torch.tensor([self.row(n) for n in names], dtype=torch.long)
        on = {}  # one copy per device (a device map spreads layers over devices)
        for l in self.layers.values():
            dev = l.experts.table.device
            if dev not in on:
                on[dev] = rows.to(dev)
            l.experts.rows = on[dev]

    def weight_bytes(self) -> int:
        """Bytes of distinct parameter storage: the base and every preallocated slot."""
        return storage_bytes(self.model)

    def slot_bytes(self) -> int:
        """Bytes of the preallocated adapter slots (all layers), used or free."""
        return sum(p.numel() * p.element_size() for l in self.layers.values() for p in l.experts.trained.parameters())

    def adapter_bytes(self) -> int:
        """Bytes of the slots the loaded adapters use."""
        total = 0
        for x in self.adapters.values():
            for l, slots in x.slots.items():
                total += len(slots) * sum(p[0].numel() * p.element_size()
                                          for p in self.layers[l].experts.trained.parameters())
        return total

    def slots(self) -> dict[int, tuple[int, int]]:
        """layer -> (free slots, all slots)."""
        return {l: (len(self.free[l]), self.layers[l].experts.trained.gate_up_proj.shape[0]) for l in self.layers}


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise AdapterError(f"{what} holds {bad} non-finite values (NaN or Inf) of {t.numel()}; refusing to "
                           f"serve it")


def default_slots(num_experts: int) -> int:
    """Adapter slots per layer when ``--max-adapter-experts`` is not given: a quarter of the layer's experts
    (at least 4), i.e. slot memory of a quarter of the routed experts; ESFT adapters change a few each."""
    return max(4, num_experts // 4)


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters (views count once)."""
    seen = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
