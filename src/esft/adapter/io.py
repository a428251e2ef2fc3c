"""Expert adapters: save only the trained tensors, load them back, merge them into a checkpoint.

An adapter directory holds

    adapter.safetensors   trained tensors under the base checkpoint's own key names, e.g.
                          model.layers.5.mlp.experts.17.gate_proj.weight (one key per expert and
                          projection, as the reference adapters are published)
    expert_cfg.json       the reference layout: experts per layer, shared_experts, non_expert_modules
    esft_adapter.json     what base model (config and weight fingerprints) and settings made it

Merging into a checkpoint on disk (``merge_to_checkpoint``) streams its shards: adapter/merge.py.

Adapters written by the reference code (any *.safetensors files + expert_cfg.json, no
esft_adapter.json) load too; their base model cannot be checked, which is logged.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..io import DataError, atomic_dir, find_nonfinite, write_json_atomic
from ..models.registry import base_experts, get_family, moe_layers
from ..selection.select import is_number, load_json, read_expert_config, show
from ..training.experts import ESFTExperts, TrainablePlan, apply_esft
from .fingerprint import fingerprint_mismatch, fingerprint_version, model_fingerprint

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "esft_adapter.json"
CFG_FILE = "expert_cfg.json"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter that does not fit the model, or a damaged adapter directory."""


@dataclass
class Adapter:
    path: Path
    expert_cfg: dict  # int layer keys
    tensors: dict[str, torch.Tensor]
    meta: dict  # {} for reference-code adapters

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def save_adapter(plan: TrainablePlan, out_dir: str | os.PathLike, base_fingerprint: dict, extra_meta: dict | None = None,
                 dtype: torch.dtype | None = None, source: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write the adapter of ``plan`` to ``out_dir`` (replacing an older one).

    ``dtype``: the tensors' dtype on disk (None = as trained); ``source``: tensors to read instead of the
    model's parameters (the fp32 masters of a mixed-precision run), see ``TrainablePlan.adapter_state_dict``.
    """
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in plan.adapter_state_dict(source).items()}
    # Checked after the cast (a float16 adapter can overflow to inf) and before anything is written, so a
    # diverged run never replaces a good adapter with a NaN one.
    check_finite(tensors, plan.expert_cfg["experts"], f"{out_dir}: cannot save the adapter")
    cfg = dict(plan.expert_cfg)
    cfg["experts"] = {str(l): list(es) for l, es in sorted(cfg["experts"].items())}
    meta = {
        "format": "esft-expert-adapter",
        "format_version": FORMAT_VERSION,
        "esft_version": __version__,
        "model_type": plan.family.model_type,
        "base_model": base_fingerprint,
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
        **(extra_meta or {}),
    }
    if is_number(meta.get("valid_loss")) and not math.isfinite(meta["valid_loss"]):
        # inf is the trainer's "no validation loss yet", NaN evaluate_loss's "nothing to score": both mean none.
        log.warning("%s: valid_loss %s recorded as null", out_dir, meta["valid_loss"])
        meta["valid_loss"] = None
    for name, obj in ((META_FILE, meta), (CFG_FILE, cfg)):
        bad = find_nonfinite(obj)
        if bad:  # JSON has no NaN / Infinity (json.dumps would write them, and other parsers reject them)
            raise AdapterError(f"{out_dir}: cannot save the adapter: {name} field {bad} is not a finite number")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / CFG_FILE, cfg)
        write_json_atomic(tmp / META_FILE, meta)
    return out_dir


def read_adapter(path: str | os.PathLike) -> Adapter:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    cfg = read_expert_config(path / CFG_FILE)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{path}: no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:  # safetensors raises several types for damaged files
            raise AdapterError(f"{f}: not a readable safetensors file ({e})") from None
        check_finite(part, cfg["experts"], str(f))
        tensors.update(part)
    meta = {}
    if (path / META_FILE).exists():
        meta = read_meta(path / META_FILE)
    if meta.get("format") != "esft-expert-adapter":
        # The reference code's v1 adapters stored keys without the "model." prefix. esft's own adapters keep
        # the checkpoint's keys as they are (Mistral's native checkpoints do start with "layers.").
        tensors = {("model." + k if k.startswith("layers.") else k): v for k, v in tensors.items()}
    return Adapter(path, cfg, tensors, meta)


def as_adapter(adapter: Adapter | str | os.PathLike) -> Adapter:
    """The adapter in a directory (read_adapter checks it), or an Adapter given in memory, checked again for
    NaN / Inf because its tensors may have been changed since it was read."""
    if isinstance(adapter, Adapter):
        check_finite(adapter.tensors, adapter.expert_cfg["experts"], str(adapter.path))
        return adapter
    return read_adapter(adapter)


def check_finite(tensors: dict[str, torch.Tensor], experts: dict[int, list[int]], where: str) -> None:
    """Refuse a tensor holding NaN or Inf, naming its layer, expert and key: such an adapter (from a diverged
    run or a damaged file) would make every token routed to the expert NaN. One isfinite pass per tensor."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            kinds = [name for name, m in (("NaN", torch.isnan(t)), ("+Inf", t == math.inf), ("-Inf", t == -math.inf))
                     if bool(m.any())]
            raise AdapterError(f"{where}: {_tensor_name(key, t, experts)} holds {int(bad.sum())} non-finite value(s) "
                               f"({'/'.join(kinds)}) of {t.numel()} (a diverged run, or damaged weights)")


def _tensor_name(key: str, t: torch.Tensor, experts: dict[int, list[int]]) -> str:
    """'layer 1 expert 7 down_proj.weight (model.layers.1.mlp.experts.7.down_proj.weight)', for messages."""
    layer = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
    if layer is None:
        return f"tensor {key}"
    l = int(layer.group(1))
    one = re.search(r"\.experts\.(\d+)\.(.+)$", key)
    if one:  # one key per expert
        return f"layer {l} expert {one.group(1)} {one.group(2)} ({key})"
    ids = experts.get(l, [])
    if ".experts." in key and t.dim() and t.shape[0] == len(ids) > 0:  # experts fused in one key: a row each
        row = int((~torch.isfinite(t.reshape(len(ids), -1))).any(dim=1).nonzero()[0, 0])
        return f"layer {l} expert {ids[row]} (row {row} of {key})"
    return f"layer {l} tensor {key}"


# Fields of esft_adapter.json that esft reads, and their JSON types. Other fields (extra_meta) are kept as
# they are: an adapter from a newer esft may record more.
META_TYPES = {
    "format": ("string",), "format_version": ("integer",), "esft_version": ("string",), "model_type": ("string",),
    "base_model": ("object",), "num_tensors": ("integer",), "num_parameters": ("integer",),
    "dtype": ("string", "null"), "method": ("string",), "train_config": ("object",), "template": ("object",),
    "trained_dtype": ("string",), "step": ("integer",), "valid_loss": ("number", "null"),
    "base_model.version": ("integer",), "base_model.config": ("string",), "base_model.weights": ("string",),
    "template.name": ("string",), "template.chat_template": ("string", "null"),
}
_IS = {"string": lambda v: isinstance(v, str), "integer": lambda v: type(v) is int,  # not bool
       "number": is_number, "object": lambda v: isinstance(v, dict), "null": lambda v: v is None}


def read_meta(file: Path) -> dict:
    """esft_adapter.json, with the types of the fields esft reads checked (AdapterError naming file and field)."""
    try:
        meta = load_json(file, "adapter metadata")
    except DataError as e:
        raise AdapterError(str(e)) from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{file}: must be a JSON object, got {show(meta)}")
    for field, kinds in META_TYPES.items():
        outer, _, inner = field.partition(".")
        holder = meta.get(outer) if inner else meta  # checked above to be an object, when present
        name = inner or outer
        if isinstance(holder, dict) and name in holder and not any(_IS[k](holder[name]) for k in kinds):
            raise AdapterError(f"{file}: field {field!r} must be {' or '.join(kinds)}, got {show(holder[name])}")
    bad = find_nonfinite(meta)
    if bad:  # NaN / Infinity are not JSON; esft never writes them
        raise AdapterError(f"{file}: field {bad} is not a finite number")
    return meta


def check_base(model: nn.Module, adapter: Adapter, fingerprint: dict | None = None) -> None:
    """Refuse an adapter made for another base model (compares config and weight fingerprints).

    ``fingerprint``: the model's, if already computed; used when its version is the adapter's,
    otherwise the adapter's version (1 for adapters written before fingerprints had one) is
    computed from the model.
    """
    check_family(adapter, get_family(model).model_type)
    want = adapter.meta.get("base_model")
    if not want:
        log.warning("%s has no %s (reference-code adapter?): its base model cannot be checked", adapter.path, META_FILE)
        return
    version = fingerprint_version(want)
    have = fingerprint if fingerprint and fingerprint_version(fingerprint) == version else model_fingerprint(model, version)
    k = fingerprint_mismatch(want, have)
    if k:
        raise AdapterError(
            f"{adapter.path} was trained on a different base model: its {k} fingerprint is "
            f"{want.get(k)}, this model's is {have.get(k)} (pass allow_other_base / --allow-other-base to load anyway)"
        )


def check_family(adapter: Adapter, model_type: str | None) -> None:
    """Refuse an adapter made for another model family (its esft_adapter.json records the model type it was
    trained on): its tensors name another family's checkpoint keys, whatever the flags. A multimodal family's
    text model (``qwen3_5_moe_text``) counts as the family (``qwen3_5_moe``)."""
    want = adapter.meta.get("model_type")
    norm = lambda t: str(t).removesuffix("_text")  # noqa: E731
    if want and model_type and norm(want) != norm(model_type):
        raise AdapterError(f"{adapter.path} was made for model type {want!r}, this model is {model_type!r}: an ESFT "
                           "adapter only loads on the family (and base model) it was trained on")


def _targets(model: nn.Module) -> tuple[dict, dict]:
    """Checkpoint key -> (layer, expert or None for a fused key) for routed experts; checkpoint key -> param
    for the rest."""
    family = get_family(model)
    expert_keys = {}
    for l in moe_layers(model):
        lay = l.layout()
        expert_keys.update({k: (l.index, e) for k, (e, _) in lay.per_expert_keys().items()})
        expert_keys.update({k: (l.index, None) for k in lay.fused_keys()})
    routed = {id(p) for l in moe_layers(model) for p in base_experts(l.experts).parameters()}
    others = {}
    for name, p in model.named_parameters():
        if id(p) in routed or ".experts.trained." in name or ".experts.all." in name:
            continue
        others[family.checkpoint_name(name)] = p
    return expert_keys, others


def _split(adapter: Adapter, model: nn.Module):
    """(routed: {layer: {checkpoint key: tensor}}, rest: {key: (param, tensor)}), checked against expert_cfg."""
    check_family(adapter, get_family(model).model_type)
    expert_keys, others = _targets(model)
    routed: dict[int, dict[str, torch.Tensor]] = {}
    rest: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for k, t in adapter.tensors.items():
        if k in expert_keys:
            routed.setdefault(expert_keys[k][0], {})[k] = t
        elif k in others:
            p = others[k]
            if tuple(p.shape) != tuple(t.shape):
                raise AdapterError(f"{adapter.path}: {k} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
            if p.device.type == "meta":
                raise AdapterError(f"{adapter.path}: {k} belongs to a layer the device map offloaded (meta device); "
                                   "an adapter can only be written into weights held in memory")
            rest[k] = (p, t)
        else:
            raise AdapterError(f"{adapter.path}: tensor {k!r} matches no parameter or expert of this model")
    layouts = {l.index: l.layout() for l in moe_layers(model)}
    check_routed(adapter, layouts, {l: set(ts) for l, ts in routed.items()})
    for l, ts in routed.items():
        check_routed_shapes(adapter, layouts[l], adapter.expert_cfg["experts"][l], ts)
    return routed, rest


def check_routed(adapter: Adapter, layouts: dict, present: dict[int, set[str]]) -> None:
    """The routed-expert keys an adapter holds (layer -> keys) must be exactly those of its expert_cfg's
    experts, every tensor of each (``layouts``: layer -> ExpertLayout)."""
    cfg = adapter.expert_cfg["experts"]
    for l, keys in sorted(present.items()):
        listed = list(cfg.get(l, []))
        per_expert = layouts[l].per_expert_keys()
        for k in sorted(keys):
            if k in per_expert and per_expert[k][0] not in listed:
                raise AdapterError(f"{adapter.path}: holds layer {l} expert {per_expert[k][0]}, which its "
                                   "expert_cfg.json does not list")
    for l, es in sorted(cfg.items()):
        if l not in layouts:
            continue  # validate_expert_cfg / the caller names a layer that is not an MoE layer
        have = present.get(l, set())
        for e in es:
            missing = [k for k in layouts[l].keys(e) if k not in have]
            if missing and len(missing) == len(layouts[l].keys(e)):
                raise AdapterError(f"{adapter.path}: expert_cfg.json lists (layer, expert) ({l}, {e}) but the adapter "
                                   "has no tensors for it")
            if missing:
                raise AdapterError(f"{adapter.path}: layer {l} expert {e} lacks its tensor(s) {missing}")


def check_routed_shapes(adapter: Adapter, layout, ids: list[int], tensors: dict[str, torch.Tensor]) -> None:
    """Per-expert tensors must have the checkpoint's shape; a fused key's rows [len(ids), *row]."""
    per_expert = layout.per_expert_keys()
    for k, t in sorted(tensors.items()):
        if k in per_expert:
            e, spec = per_expert[k]
            want, what = spec.shape, f"layer {layout.prefix.split('.')[-3]} expert {e} {k.rsplit('.experts.', 1)[-1].split('.', 1)[-1]}"
        else:
            want, what = (len(ids), *layout.fused_keys()[k].shape), f"{k} (rows of experts {ids})"
        if tuple(t.shape) != tuple(want):
            raise AdapterError(f"{adapter.path}: {what} has shape {tuple(t.shape)}, the model expects {tuple(want)}")


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Adapter | str | os.PathLike, allow_other_base: bool = False) -> nn.Module:
    """Write the adapter's tensors into ``model``'s own weights, in place (a plain, unwrapped model)."""
    adapter = as_adapter(adapter)
    if not allow_other_base:
        check_base(model, adapter)
    if any(isinstance(l.experts, ESFTExperts) for l in moe_layers(model)):
        raise AdapterError("this model is wrapped for ESFT training: use attach_adapter, or unwrap_esft it first")
    routed, rest = _split(adapter, model)
    layers = {l.index: l for l in moe_layers(model)}
    for l, tensors in sorted(routed.items()):
        ex = base_experts(layers[l].experts)
        if ex.gate_up_proj.device.type == "meta":
            raise AdapterError(f"{adapter.path}: layer {l}: the device map offloaded this layer's experts "
                               "(meta device); an adapter can only be merged into weights held in memory")
        ids = list(adapter.expert_cfg["experts"][l])
        params = dict(ex.named_parameters(recurse=False))
        rows = layers[l].layout().from_checkpoint(ids, tensors, params)
        idx = torch.tensor(ids, device=ex.gate_up_proj.device)
        for n, r in rows.items():
            params[n].index_copy_(0, idx, r)
    for _, (p, t) in rest.items():
        p.copy_(t)
    return model


@torch.no_grad()
def attach_adapter(model: nn.Module, adapter: Adapter | str | os.PathLike, allow_other_base: bool = False) -> TrainablePlan:
    """Wrap ``model`` for ESFT with the adapter's selection and load its tensors as the trainable ones.

    The base weights stay untouched (so the adapter can be trained further or compared).
    """
    adapter = as_adapter(adapter)
    if not allow_other_base:
        check_base(model, adapter)
    routed, rest = _split(adapter, model)
    layouts = {l.index: l.layout() for l in moe_layers(model)}
    plan = apply_esft(model, adapter.expert_cfg)
    for l, tensors in routed.items():
        w: ESFTExperts = plan.wrappers[l]
        params = dict(w.trained.named_parameters(recurse=False))
        rows = layouts[l].from_checkpoint(w.selected, tensors, params)
        for n, r in rows.items():
            params[n].copy_(r)
    for _, (p, t) in rest.items():
        p.copy_(t)
    return plan


def merge_to_checkpoint(base_path: str, adapter_dir: str, out_dir: str, dtype: str = "auto",
                        overwrite: bool = False, allow_other_base: bool = False) -> Path:
    """base checkpoint + adapter -> a standalone checkpoint that AutoModelForCausalLM loads.

    Streams the base's safetensors shards without instantiating the model (see adapter/merge.py);
    ``dtype``: "auto" keeps each tensor's own dtype, "float32" / "bfloat16" cast the floating ones.
    """
    from .merge import merge_checkpoint

    return merge_checkpoint(base_path, adapter_dir, out_dir, dtype=dtype, overwrite=overwrite,
                            allow_other_base=allow_other_base).out
