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

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..io import atomic_dir, write_json_atomic
from ..models.registry import base_experts, get_family, moe_layers
from ..selection.select import read_expert_config
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
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for damaged files
            raise AdapterError(f"{f}: not a readable safetensors file ({e})") from None
    # The reference code's v1 adapters stored keys without the "model." prefix.
    tensors = {("model." + k if k.startswith("layers.") else k): v for k, v in tensors.items()}
    meta = {}
    if (path / META_FILE).exists():
        meta = json.loads((path / META_FILE).read_text())
    return Adapter(path, cfg, tensors, meta)


def check_base(model: nn.Module, adapter: Adapter, fingerprint: dict | None = None) -> None:
    """Refuse an adapter made for another base model (compares config and weight fingerprints).

    ``fingerprint``: the model's, if already computed; used when its version is the adapter's,
    otherwise the adapter's version (1 for adapters written before fingerprints had one) is
    computed from the model.
    """
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


def _targets(model: nn.Module) -> tuple[dict, dict]:
    """Checkpoint key -> (layer, expert, part) for routed experts; checkpoint key -> param for the rest."""
    family = get_family(model)
    expert_keys = {}
    for l in moe_layers(model):
        for e in range(l.num_experts):
            for part in ("gate", "up", "down"):
                expert_keys[family.expert_key(l.index, e, part)] = (l.index, e, part)
    others = {}
    for name, p in model.named_parameters():
        if ".experts." in name and (".experts.base." in name or ".experts.trained." in name or name.endswith(("gate_up_proj", "down_proj"))):
            continue
        others[family.checkpoint_name(name)] = p
    return expert_keys, others


def _split(adapter: Adapter, model: nn.Module):
    expert_keys, others = _targets(model)
    routed: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    rest: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for k, t in adapter.tensors.items():
        if k in expert_keys:
            l, e, part = expert_keys[k]
            routed.setdefault((l, e), {})[part] = t
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
    check_expert_cfg(adapter, {le: set(parts) for le, parts in routed.items()})
    return routed, rest


def check_expert_cfg(adapter: Adapter, routed: dict[tuple[int, int], set[str]]) -> None:
    """The routed experts an adapter holds ((layer, expert) -> parts present) must be exactly its expert_cfg's, whole."""
    listed = {(l, e) for l, es in adapter.expert_cfg["experts"].items() for e in es}
    for (l, e), parts in sorted(routed.items()):
        if (l, e) not in listed:
            raise AdapterError(f"{adapter.path}: holds layer {l} expert {e}, which its expert_cfg.json does not list")
        missing = {"gate", "up", "down"} - set(parts)
        if missing:
            raise AdapterError(f"{adapter.path}: layer {l} expert {e} lacks its {sorted(missing)} projection(s)")
    absent = sorted(listed - set(routed))
    if absent:
        raise AdapterError(f"{adapter.path}: expert_cfg.json lists (layer, expert) {absent[:5]} but the adapter has no tensors for them")


def _check_expert_shapes(adapter: Adapter, layer: int, expert: int, parts: dict, gate_up: torch.Tensor, down: torch.Tensor):
    inter = gate_up.shape[1] // 2
    want = {"gate": (inter, gate_up.shape[2]), "up": (inter, gate_up.shape[2]), "down": tuple(down.shape[1:])}
    for part, t in parts.items():
        if tuple(t.shape) != want[part]:
            raise AdapterError(
                f"{adapter.path}: layer {layer} expert {expert} {part} projection has shape {tuple(t.shape)}, "
                f"the model expects {want[part]}"
            )


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Adapter | str | os.PathLike, allow_other_base: bool = False) -> nn.Module:
    """Write the adapter's tensors into ``model``'s own weights, in place (a plain, unwrapped model)."""
    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
    if not allow_other_base:
        check_base(model, adapter)
    if any(isinstance(l.experts, ESFTExperts) for l in moe_layers(model)):
        raise AdapterError("this model is wrapped for ESFT training: use attach_adapter, or unwrap_esft it first")
    routed, rest = _split(adapter, model)
    layers = {l.index: base_experts(l.experts) for l in moe_layers(model)}
    for (l, e), parts in sorted(routed.items()):
        ex = layers[l]
        if ex.gate_up_proj.device.type == "meta":
            raise AdapterError(f"{adapter.path}: layer {l} expert {e}: the device map offloaded this layer's experts "
                               "(meta device); an adapter can only be merged into weights held in memory")
        _check_expert_shapes(adapter, l, e, parts, ex.gate_up_proj, ex.down_proj)
        inter = ex.gate_up_proj.shape[1] // 2
        ex.gate_up_proj[e, :inter].copy_(parts["gate"])
        ex.gate_up_proj[e, inter:].copy_(parts["up"])
        ex.down_proj[e].copy_(parts["down"])
    for _, (p, t) in rest.items():
        p.copy_(t)
    return model


@torch.no_grad()
def attach_adapter(model: nn.Module, adapter: Adapter | str | os.PathLike, allow_other_base: bool = False) -> TrainablePlan:
    """Wrap ``model`` for ESFT with the adapter's selection and load its tensors as the trainable ones.

    The base weights stay untouched (so the adapter can be trained further or compared).
    """
    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
    if not allow_other_base:
        check_base(model, adapter)
    routed, rest = _split(adapter, model)
    plan = apply_esft(model, adapter.expert_cfg)
    for (l, e), parts in routed.items():
        w: ESFTExperts = plan.wrappers[l]
        _check_expert_shapes(adapter, l, e, parts, w.base.gate_up_proj, w.base.down_proj)
        s = w.selected.index(e)
        inter = w.trained.gate_up_proj.shape[1] // 2
        w.trained.gate_up_proj[s, :inter].copy_(parts["gate"])
        w.trained.gate_up_proj[s, inter:].copy_(parts["up"])
        w.trained.down_proj[s].copy_(parts["down"])
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
