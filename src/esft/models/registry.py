"""MoE model families: found from the model, with the few facts structure does not say kept as data.

:func:`get_family` reads a loaded model's MoE structure (``discovery.py``: decoder-layer list, MoE
block, router, fused experts, shared experts) and joins it with the model type's entry in
``families.NOTES`` (gate-value definition, router output layout, experts calling convention). How the
checkpoint names each expert tensor comes from transformers' own conversion mapping (``layout.py``).
Nothing else in the package branches on the model family.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .discovery import StructureError, discover
from .families import NOTES, Notes
from .layout import ExpertLayout, LayoutError, probe_layout, relocate
from .routers import gate_values as _gate_values


class UnsupportedModelError(ValueError):
    """The model is not a supported MoE family, or has no MoE layer."""


def _model_type(config) -> str | None:
    return getattr(config, "model_type", None)


def supported_model_types() -> list[str]:
    """Model types with a family entry and no reason against them (structure is checked on loading)."""
    return sorted(k for k, n in NOTES.items() if n.unsupported is None)


FAMILIES: dict[str, Notes] = {k: n for k, n in sorted(NOTES.items()) if n.unsupported is None}


def supported_families() -> str:
    return ", ".join(supported_model_types())


def check_model_type(config) -> Notes:
    """The family notes of ``config.model_type``; UnsupportedModelError naming the reason otherwise."""
    model_type = _model_type(config)
    # a multimodal family's text model reports its own type ("llama4_text", "qwen3_5_moe_text")
    notes = NOTES.get(model_type) or NOTES.get(str(model_type).removesuffix("_text"))
    if notes is None:
        raise UnsupportedModelError(f"model_type {model_type!r} is not a supported MoE family (see `esft families`). "
                                    f"Supported: {supported_families()}")
    if notes.unsupported:
        raise UnsupportedModelError(f"model_type {model_type!r} has fused experts but is not supported: {notes.unsupported}")
    return notes


@dataclass(frozen=True)
class MoEFamily:
    """Where the MoE parts of one loaded model live (module paths relative to a decoder layer) and how its
    routers are read. ``gate``: see ``routers.py``; ``experts_kind``: "sparse" or "dense_bmm"."""

    model_type: str
    layers_path: str
    moe_attr: str
    router_attr: str
    experts_attr: str
    shared_attrs: tuple[str, ...]
    gate: str
    router_outputs: str
    experts_kind: str
    doc: str = ""
    _renames: tuple = field(default=(), compare=False, repr=False)

    @property
    def affinity(self) -> str:  # the older name of ``gate``
        return self.gate

    def checkpoint_name(self, param_name: str) -> str:
        """Checkpoint key of a (non-expert) module parameter name, by transformers' reverse renamings."""
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(param_name, list(self._renames)) if self._renames else param_name


_CACHE: "weakref.WeakKeyDictionary[nn.Module, MoEFamily]" = weakref.WeakKeyDictionary()


def _renamings(model: nn.Module) -> tuple:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    try:
        conv = getattr(model, "_weight_conversions", None) or get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001 - a model transformers has no mapping for: names are kept
        return ()
    rev = [c.reverse_transform() for c in conv[::-1] if not isinstance(c, PrefixChange)]
    return tuple(r for r in rev if isinstance(r, WeightRenaming))


def get_family(model_or_config) -> MoEFamily:
    """The family of a loaded model (structure read from it). A config only checks the model type is
    supported and returns the family of a skeleton model built on the meta device."""
    if not isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", model_or_config)
        check_model_type(config)
        if not hasattr(config, "to_dict"):  # a bare namespace with a model_type: nothing more to read
            return None  # type: ignore[return-value]
        return get_family(meta_model(config))
    model = model_or_config
    fam = _CACHE.get(model)
    if fam is not None:
        return fam
    notes = check_model_type(model.config)
    try:
        s = discover(model)
    except StructureError as e:
        raise UnsupportedModelError(str(e)) from None
    fam = MoEFamily(model.config.model_type, s.layers_path, s.moe_attr, s.router_attr, s.experts_attr, s.shared_attrs,
                    notes.gate, notes.outputs, notes.experts, notes.examples, _renamings(model))
    _CACHE[model] = fam
    return fam


def meta_model(config) -> nn.Module:
    """A weightless skeleton (meta device) of the model class esft loads for ``config``."""
    with torch.device("meta"):
        return model_class(config).from_config(config)


def model_class(config):
    """The auto class that loads ``config``: causal LM, else image-text-to-text (text-only ESFT of a
    vision-language model's language model)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise UnsupportedModelError(f"model_type {_model_type(config)!r}: transformers has no causal-LM or "
                                "image-text-to-text class for it")


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
    experts: nn.Module  # fused: gate_up_proj [E, 2I, H] (or transposed), down_proj [E, H, I], optional biases
    shared: list[tuple[str, nn.Module]]
    prefix: str  # module-name prefix of the block, e.g. "model.layers.5.mlp"
    family: MoEFamily | None = None
    _model: object = None

    @property
    def num_experts(self) -> int:
        return base_experts(self.experts).gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        for obj in (self.router, self.block):
            for name in ("top_k", "num_experts_per_tok"):
                if isinstance(getattr(obj, name, None), int):
                    return int(getattr(obj, name))
        return int(self._model.config.get_text_config().num_experts_per_tok)

    @property
    def experts_prefix(self) -> str:
        return f"{self.prefix}.{self.family.experts_attr}"

    def layout(self) -> ExpertLayout:
        """The checkpoint names and layout of this layer's experts (see layout.py); cached per layer."""
        per_model = _LAYOUTS.setdefault(self._model, {})
        lay = per_model.get(self.index)
        if lay is None:
            ex = base_experts(self.experts)
            shapes = tuple((n, tuple(p.shape)) for n, p in ex.named_parameters(recurse=False))
            same = per_model.get(shapes)  # a layer with the same shapes: rename its keys, share its index maps
            lay = relocate(same, self.experts_prefix) if same is not None else None
            if lay is None:
                try:
                    lay = probe_layout(self._model, self.experts_prefix, ex)
                except LayoutError as e:
                    raise UnsupportedModelError(str(e)) from None
                per_model.setdefault(shapes, lay)
            per_model[self.index] = lay
        return lay


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def base_experts(experts: nn.Module) -> nn.Module:
    """The original fused experts module, also when wrapped for ESFT training or serving."""
    return getattr(experts, "base", experts)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks of ``model`` in layer order; raises if there are none."""
    family = get_family(model)
    layers = _getattr_path(model, family.layers_path)
    found = []
    for i, layer in enumerate(layers):
        block = _getattr_path(layer, family.moe_attr) if _has_path(layer, family.moe_attr) else None
        experts = getattr(block, family.experts_attr, None) if block is not None else None
        if experts is None or getattr(base_experts(experts), "gate_up_proj", None) is None:
            continue  # a dense layer (e.g. DeepSeek's first_k_dense_replace layers)
        shared = [(a, getattr(block, a)) for a in family.shared_attrs if getattr(block, a, None) is not None]
        found.append(MoELayer(i, block, getattr(block, family.router_attr), experts, shared,
                              f"{family.layers_path}.{i}.{family.moe_attr}", family, model))
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} ({family.model_type}) has no MoE layer with fused routed "
                                    f"experts; ESFT needs routed experts. Supported families: {supported_families()}")
    return found


def _has_path(obj, path: str) -> bool:
    try:
        _getattr_path(obj, path)
        return True
    except AttributeError:
        return False


def router_scores(family: MoEFamily, router: nn.Module, outputs, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate values [N, K] float32, expert ids [N, K]) from one router call's outputs."""
    from .routers import split_outputs

    logits, ids = split_outputs(outputs, family.router_outputs, top_k)
    if family.gate == "weights":  # the router's own normalised weights, before its routed scaling factor
        scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
        return outputs[1].float() / scale, ids
    return _gate_values(family.gate, logits, ids), ids


def gate_values(family: MoEFamily, router_logits: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Gate values g(i,t) of each token's chosen experts: router_logits [N, E], topk_idx [N, K] -> [N, K]."""
    return _gate_values(family.gate, router_logits, topk_idx)
