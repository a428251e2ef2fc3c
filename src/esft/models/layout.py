"""How one MoE layer's fused expert tensors are named and laid out in the model's checkpoint files.

A loaded transformers 5.x model keeps a layer's routed experts fused: ``gate_up_proj`` [E, 2I, H]
(or transposed), ``down_proj`` [E, H, I], and for some families ``gate_up_proj_bias`` [E, 2I],
``down_proj_bias`` [E, H]. Its checkpoint files may store them per expert
(``...experts.17.gate_proj.weight``, Mixtral's ``...experts.17.w1.weight``), fused under other names,
transposed or interleaved. transformers knows the mapping (its checkpoint conversion mapping, reverted
by ``save_pretrained``); nothing here is written per family. :func:`probe_layout` runs transformers' own
``revert_weight_conversion`` once per layer on two marker experts whose elements hold their own
positions, and reads off, for every checkpoint tensor that stores experts:

- its key for expert ``e`` (per-expert keys), or its one key (a fused tensor, experts along dim 0);
- for each of its elements, which element of which fused parameter row it is (an index map).

With that map an adapter's tensors are exactly what ``save_pretrained`` writes for the merged model, and
they are read back into fused rows without knowing the family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class LayoutError(ValueError):
    """transformers' checkpoint conversion for these experts is not an element permutation esft can invert."""


@dataclass(frozen=True)
class CkptTensor:
    """One checkpoint tensor holding routed experts of a layer.

    per_expert: the key names one expert (``template`` with ``{e}``) and the tensor is ``shape``;
    otherwise the key holds all experts fused along dim 0 and ``shape`` is one expert's row.
    ``param_of`` / ``index`` ([numel of one expert's piece], long): element i of the (row of the) tensor
    is element ``index[i]`` of the row of fused parameter ``params[param_of[i]]``.
    """

    template: str
    per_expert: bool
    shape: tuple[int, ...]
    params: tuple[str, ...]
    param_of: torch.Tensor  # [n] int8: which of ``params``
    index: torch.Tensor  # [n] int32 (int64 for rows of 2^30+ elements): flat index within that parameter's row

    def key(self, expert: int) -> str:
        return self.template.format(e=expert) if self.per_expert else self.template


@dataclass(frozen=True)
class ExpertLayout:
    """The checkpoint tensors of one layer's experts (see :func:`probe_layout`)."""

    prefix: str  # module name of the fused experts, e.g. "model.layers.3.mlp.experts"
    params: tuple[str, ...]  # fused parameter names, e.g. ("gate_up_proj", "down_proj")
    row_shapes: tuple[tuple[int, ...], ...]  # one expert's row of each parameter
    tensors: tuple[CkptTensor, ...]
    num_experts: int

    def keys(self, expert: int) -> list[str]:
        """Checkpoint keys that hold (part of) ``expert``; fused keys are shared by all experts."""
        return [t.key(expert) for t in self.tensors]

    def per_expert_keys(self) -> dict[str, tuple[int, CkptTensor]]:
        """key -> (expert, tensor spec) for every per-expert key of the layer."""
        return {t.key(e): (e, t) for t in self.tensors if t.per_expert for e in range(self.num_experts)}

    def fused_keys(self) -> dict[str, CkptTensor]:
        return {t.template: t for t in self.tensors if not t.per_expert}

    def checkpoint_shape(self, t: CkptTensor) -> tuple[int, ...]:
        return t.shape if t.per_expert else (self.num_experts, *t.shape)

    def to_checkpoint(self, ids: list[int], rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fused rows {param: [S, *row]} of experts ``ids`` -> checkpoint tensors.

        Per-expert keys get one tensor each; a fused checkpoint key gets its selected rows [S, *shape]
        (in ``ids`` order), which a merge writes into rows ``ids`` of the checkpoint's tensor.
        """
        flat = [rows[p].reshape(len(ids), -1) for p in self.params]  # [S, n_p]
        out = {}
        for t in self.tensors:
            pieces = _gather(flat, t)  # [S, n]
            if t.per_expert:
                for s, e in enumerate(ids):
                    out[t.key(e)] = pieces[s].reshape(t.shape).contiguous()
            else:
                out[t.template] = pieces.reshape(len(ids), *t.shape).contiguous()
        return out

    def from_checkpoint(self, ids: list[int], tensors: dict[str, torch.Tensor],
                        like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_checkpoint`: {param: [S, *row]} (dtype and device of ``like[param]``)."""
        flat = {p: torch.empty((len(ids), int(torch.tensor(s).prod())), dtype=like[p].dtype, device=like[p].device)
                for p, s in zip(self.params, self.row_shapes)}
        for t in self.tensors:
            if t.per_expert:
                src = torch.stack([tensors[t.key(e)].reshape(-1) for e in ids])  # [S, n]
            else:
                src = tensors[t.template].reshape(len(ids), -1)
            for i, p in enumerate(self.params):
                sel = (t.param_of == i).nonzero(as_tuple=True)[0]
                if sel.numel():
                    flat[p][:, t.index[sel].to(flat[p].device)] = src[:, sel.to(src.device)].to(flat[p].device,
                                                                                          flat[p].dtype)
        return {p: flat[p].reshape(len(ids), *s) for p, s in zip(self.params, self.row_shapes)}


def _gather(flat: list[torch.Tensor], t: CkptTensor) -> torch.Tensor:
    """[S, n]: element i of each selected expert's piece, read from the fused rows via the index map."""
    out = None
    for i, f in enumerate(flat):
        sel = (t.param_of == i).nonzero(as_tuple=True)[0]
        if not sel.numel():
            continue
        if out is None:
            out = torch.empty((f.shape[0], t.param_of.numel()), dtype=f.dtype, device=f.device)
        out[:, sel.to(f.device)] = f[:, t.index[sel].to(f.device)]
    return out


def expert_params(experts: nn.Module) -> tuple[str, ...]:
    """Names of the fused per-expert parameters (dim 0 = experts) of an experts module: gate_up_proj,
    down_proj, then the rest (biases) by name."""
    E = experts.gate_up_proj.shape[0]
    names = [n for n, p in experts.named_parameters(recurse=False) if p is not None and p.dim() >= 2 and p.shape[0] == E]
    first = ("gate_up_proj", "down_proj")
    return first + tuple(sorted(n for n in names if n not in first))


def probe_layout(model: nn.Module, prefix: str, experts: nn.Module) -> ExpertLayout:
    """The checkpoint layout of the fused experts at module name ``prefix`` (see the module docstring)."""
    from transformers.core_model_loading import revert_weight_conversion

    params = expert_params(experts)
    shapes = tuple(tuple(getattr(experts, p).shape[1:]) for p in params)
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    # Two marker experts: element k of expert j's row of param p holds j * total + offset_p + k.
    dt = torch.int32 if 2 * total < 2**31 else torch.int64  # a quarter of the memory for the usual sizes
    probe = {f"{prefix}.{p}": torch.stack([j * total + off + torch.arange(n, dtype=dt) for j in range(2)]).reshape(2, *s)
             for p, s, n, off in zip(params, shapes, sizes, offsets)}
    try:
        reverted = revert_weight_conversion(model, dict(probe))
    except Exception as e:  # noqa: BLE001 - any failure of transformers' conversion means: cannot probe
        raise LayoutError(f"transformers' checkpoint conversion of {prefix} failed on a probe ({type(e).__name__}: {e})") from None
    bounds = torch.tensor(offsets[1:] + [total])
    pairs: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}  # template -> {j: (key, values)}
    tensors = []
    for key, v in reverted.items():
        if not torch.is_tensor(v) or v.dtype != dt:
            raise LayoutError(f"{key}: transformers' conversion of {prefix} does not keep element values (not a permutation)")
        j = v // total
        if v.numel() and bool((j == j.reshape(-1)[0]).all()):  # one expert: a per-expert key
            pairs.setdefault(_template_slot(key), {})[int(j.reshape(-1)[0])] = (key, v % total)
        elif v.dim() >= 1 and v.shape[0] == 2 and bool((j[0] == 0).all()) and bool((j[1] == 1).all()):
            tensors.append(_spec(key, False, v[0], bounds, offsets, params))
        else:
            raise LayoutError(f"{key}: transformers stores the experts of {prefix} mixed in one tensor along a "
                              f"dim other than the first; esft cannot write one expert of it")
    for by_j in pairs.values():
        if set(by_j) != {0, 1}:
            raise LayoutError(f"{prefix}: the checkpoint keys {sorted(k for k, _ in by_j.values())} do not name one "
                              "expert each")
        k0, v0 = by_j[0]
        k1, _ = by_j[1]
        tensors.append(_spec(_expert_template(k0, k1, prefix), True, v0, bounds, offsets, params))
    covered = sum(t.param_of.numel() for t in tensors)
    if covered != total:
        raise LayoutError(f"{prefix}: the checkpoint tensors hold {covered} of each expert's {total} elements")
    return ExpertLayout(prefix, params, shapes, tuple(sorted(tensors, key=lambda t: t.template)),
                        experts.gate_up_proj.shape[0])


def relocate(layout: ExpertLayout, prefix: str) -> ExpertLayout | None:
    """The layout of another layer whose experts module ``prefix`` differs from ``layout.prefix`` only in the
    layer index (same shapes): the keys renamed, the index maps shared (they hold one expert's elements,
    ~4 bytes each, so one copy for all layers matters for big models). None if the names differ otherwise."""
    a, b = layout.prefix.split("."), prefix.split(".")
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(diff) != 1 or not (a[diff[0]].isdigit() and b[diff[0]].isdigit()):
        return None
    i, old, new = diff[0], a[diff[0]], b[diff[0]]
    tensors = []
    for t in layout.tensors:
        parts = t.template.split(".")
        hits = [j for j, p in enumerate(parts) if p == old]
        if len(hits) != 1:
            return None
        parts[hits[0]] = new
        tensors.append(CkptTensor(".".join(parts), t.per_expert, t.shape, t.params, t.param_of, t.index))
    del i
    return ExpertLayout(prefix, layout.params, layout.row_shapes, tuple(tensors), layout.num_experts)


def _spec(key: str, per_expert: bool, local: torch.Tensor, bounds: torch.Tensor, offsets: list[int],
          params: tuple[str, ...]) -> CkptTensor:
    flat = local.reshape(-1)
    which = torch.bucketize(flat, bounds.to(flat.dtype), right=True)  # index of the param each element comes from
    index = flat - torch.tensor(offsets, dtype=flat.dtype)[which]
    return CkptTensor(key, per_expert, tuple(local.shape), params, which.to(torch.int8), index)


def _template_slot(key: str) -> str:
    """The key with its integer components blanked: keys of the two probe experts share it."""
    return ".".join("#" if p.isdigit() else p for p in key.split("."))


def _expert_template(k0: str, k1: str, prefix: str) -> str:
    a, b = k0.split("."), k1.split(".")
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(diff) != 1 or (a[diff[0]], b[diff[0]]) != ("0", "1"):
        raise LayoutError(f"{prefix}: cannot tell the expert index in the checkpoint keys {k0!r}, {k1!r}")
    a[diff[0]] = "{e}"
    return ".".join(p.replace("{", "{{").replace("}", "}}") if i != diff[0] else p for i, p in enumerate(a))
