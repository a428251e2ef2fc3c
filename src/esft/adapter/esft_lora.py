"""ESFT-LoRA adapters (``method=esft-lora``) on disk: a PEFT LoRA adapter plus esft's records.

    adapter_config.json        PEFT's LoraConfig: r, lora_alpha, target_parameters = the fused expert tensors
                               of the layers with selected experts ("model.layers.5.mlp.experts.gate_up_proj",
                               "...down_proj"), target_modules = []
    adapter_model.safetensors  PEFT's tensors for those parameters: per layer
                               base_model.model.<experts>.base_layer.lora_{A,B}.weight  (gate_up_proj) and
                               base_model.model.<experts>.lora_{A,B}.weight             (down_proj),
                               A [r * E, in], B [out, r * E] in PEFT's 3-D layout (A expert-major, B rank-major);
                               the rows of experts that were not selected are zeros (their delta is 0)
    esft_adapter.json          format "esft-lora-adapter": base-model fingerprint, model type, method,
                               training settings, template, and under "lora" the rank, alpha and, per layer,
                               the experts module and its expert rows
    expert_cfg.json            the selection it was trained on (as `esft select` wrote it)

Because the unselected rows are zeros, the directory is an ordinary PEFT adapter: ``PeftModel.from_pretrained``
on the base loads it and computes the same model. esft itself reads only the selected rows (and refuses an
adapter whose other rows are not zero), and turns them into merged expert rows W_e + (alpha / r) * B_e @ A_e
(:func:`materialize`): an ESFT adapter in memory that ``esft eval``, ``esft merge`` and ``esft serve`` handle as
they handle ESFT adapters.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..io import atomic_dir, find_nonfinite, write_json_atomic
from ..selection.select import is_number, read_expert_config
from ..training.esft_lora import LORA_PARAMS, LoRAPlan, lora_dims, merged_rows
from .io import CFG_FILE, META_FILE, Adapter, AdapterError, check_finite, read_meta

FORMAT = "esft-lora-adapter"
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_key(module: str, param: str, factor: str) -> str:
    """PEFT's key of one factor: two target parameters of one module nest their wrappers in target_parameters
    order, so gate_up_proj (listed first) is the inner ``base_layer`` and down_proj the outer one."""
    inner = ".base_layer" if param == LORA_PARAMS[0] else ""
    return f"{PEFT_PREFIX}{module}{inner}.lora_{factor}.weight"


@dataclass
class LoRAAdapter:
    """An ESFT-LoRA adapter read from disk: the selected rows' factors only."""

    path: Path
    expert_cfg: dict  # int layer keys
    rank: int
    alpha: float
    modules: dict[int, str]  # layer -> module name of its fused experts
    factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # layer -> {param: (A [S,r,in], B [S,out,r])}
    transposed: bool
    meta: dict

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def stub(self) -> Adapter:
        """The adapter's records without tensors (for the base-model and family checks)."""
        return Adapter(self.path, self.expert_cfg, {}, self.meta)


def is_lora_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ESFT-LoRA adapter directory (a PEFT config and esft_adapter.json saying so)."""
    p = Path(path)
    if not isinstance(path, (str, os.PathLike)) or not (p / PEFT_CONFIG).is_file() or not (p / META_FILE).is_file():
        return False
    try:
        return json.loads((p / META_FILE).read_text()).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def save_lora_adapter(plan: LoRAPlan, out_dir: str | os.PathLike, base_fingerprint: dict, extra_meta: dict | None = None,
                      dtype: torch.dtype | None = None, source: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write ``plan``'s factors to ``out_dir`` as a PEFT adapter (see the module docstring)."""
    from peft import LoraConfig

    tensors, targets, layers = {}, [], {}
    for l, per in plan.factors(source).items():
        w = plan.wrappers[l]
        module, ids, E = plan.module_names[l], w.selected, w.num_experts
        idx = torch.tensor(ids)
        for n in LORA_PARAMS:
            A, B = (t.to("cpu", dtype or t.dtype) for t in per[n])
            S, r, in_f = A.shape
            out_f = B.shape[1]
            full_a = torch.zeros((E, r, in_f), dtype=A.dtype)
            full_a[idx] = A
            full_b = torch.zeros((out_f, r, E), dtype=B.dtype)
            full_b[:, :, idx] = B.permute(1, 2, 0)
            tensors[peft_key(module, n, "A")] = full_a.reshape(E * r, in_f).contiguous()
            tensors[peft_key(module, n, "B")] = full_b.reshape(out_f, r * E).contiguous()
            targets.append(f"{module}.{n}")
        layers[str(l)] = {"module": module, "experts": list(ids), "num_experts": E}
    check_finite(tensors, {}, f"{out_dir}: cannot save the adapter")
    transposed = any(w.transposed for w in plan.wrappers.values())
    lcfg = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=0.0, target_modules=[],
                      target_parameters=targets, task_type="CAUSAL_LM", bias="none",
                      base_model_name_or_path=str((extra_meta or {}).get("train_config", {}).get("model") or "") or None)
    cfg = dict(plan.expert_cfg)
    cfg["experts"] = {str(l): list(es) for l, es in sorted(cfg["experts"].items())}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "esft_version": __version__,
        "model_type": plan.family.model_type, "base_model": base_fingerprint,
        "num_tensors": len(tensors), "num_parameters": plan.num_trainable(),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "lora": {"rank": plan.rank, "alpha": plan.alpha, "scaling": plan.alpha / plan.rank, "transposed": transposed,
                 "peft_layout": "target_parameters, 3-D experts (rows of unselected experts are zero)",
                 "layers": layers},
        **(extra_meta or {}),
    }
    if is_number(meta.get("valid_loss")) and not math.isfinite(meta["valid_loss"]):
        meta["valid_loss"] = None
    for name, obj in ((META_FILE, meta), (CFG_FILE, cfg)):
        bad = find_nonfinite(obj)
        if bad:
            raise AdapterError(f"{out_dir}: cannot save the adapter: {name} field {bad} is not a finite number")
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        lcfg.save_pretrained(str(tmp))
        write_json_atomic(tmp / CFG_FILE, cfg)
        write_json_atomic(tmp / META_FILE, meta)
    return Path(out_dir)


def read_lora_adapter(path: str | os.PathLike) -> LoRAAdapter:
    """Read and check an ESFT-LoRA adapter directory (AdapterError naming the file and the problem)."""
    path = Path(path)
    meta = read_meta(path / META_FILE)
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path}: not an ESFT-LoRA adapter ({META_FILE} format {meta.get('format')!r})")
    try:
        peft_cfg = json.loads((path / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path / PEFT_CONFIG}: not a readable JSON file ({e})") from None
    r, alpha = peft_cfg.get("r"), peft_cfg.get("lora_alpha")
    if type(r) is not int or r < 1 or not is_number(alpha):
        raise AdapterError(f"{path / PEFT_CONFIG}: r must be a positive integer and lora_alpha a number, got "
                           f"r={r!r}, lora_alpha={alpha!r}")
    for k, ok in (("use_rslora", False), ("use_dora", False), ("lora_dropout", 0.0)):
        if peft_cfg.get(k, ok) not in (ok, 0):
            raise AdapterError(f"{path / PEFT_CONFIG}: {k}={peft_cfg[k]!r}; an ESFT-LoRA adapter has {k}={ok!r}")
    info = meta.get("lora")
    if not isinstance(info, dict) or not isinstance(info.get("layers"), dict):
        raise AdapterError(f"{path / META_FILE}: missing the 'lora' record (rank, alpha, layers)")
    if info.get("rank") != r or info.get("alpha") != alpha:
        raise AdapterError(f"{path}: {PEFT_CONFIG} says r={r}, lora_alpha={alpha}, {META_FILE} records "
                           f"rank={info.get('rank')}, alpha={info.get('alpha')}")
    cfg = read_expert_config(path / CFG_FILE)
    f = path / PEFT_WEIGHTS
    try:
        tensors = load_file(str(f))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise AdapterError(f"{f}: not a readable safetensors file ({e})") from None
    check_finite(tensors, {}, str(f))
    modules, factors, used = {}, {}, set()
    targets = set(peft_cfg.get("target_parameters") or [])
    for l, ids in sorted(cfg["experts"].items()):
        if not ids:
            continue
        rec = info["layers"].get(str(l))
        if not isinstance(rec, dict) or not isinstance(rec.get("module"), str) or rec.get("experts") != list(ids):
            raise AdapterError(f"{path}: {META_FILE} does not record layer {l}'s experts {ids} as {CFG_FILE} lists them")
        module = modules[l] = rec["module"]
        factors[l] = {}
        for n in LORA_PARAMS:
            if f"{module}.{n}" not in targets:
                raise AdapterError(f"{path / PEFT_CONFIG}: target_parameters lacks {module}.{n} (layer {l})")
            ka, kb = peft_key(module, n, "A"), peft_key(module, n, "B")
            if ka not in tensors or kb not in tensors:
                raise AdapterError(f"{f}: lacks {ka if ka not in tensors else kb} (layer {l} {n})")
            a, b = tensors[ka], tensors[kb]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] % r or b.shape[1] != a.shape[0]:
                raise AdapterError(f"{f}: layer {l} {n}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                                   f"PEFT's 3-D expert layout for rank {r}")
            E = a.shape[0] // r
            if max(ids) >= E:
                raise AdapterError(f"{f}: layer {l} {n} holds {E} experts, {CFG_FILE} lists expert {max(ids)}")
            full_a, full_b = a.reshape(E, r, -1), b.reshape(b.shape[0], r, E)
            idx = torch.tensor(ids)
            others = torch.ones(E, dtype=torch.bool)
            others[idx] = False
            if bool(full_a[others].any()) and bool(full_b[:, :, others].any()):
                bad = [e for e in range(E) if others[e] and bool(full_a[e].any()) and bool(full_b[:, :, e].any())]
                if bad:
                    raise AdapterError(f"{f}: layer {l} {n} has non-zero LoRA factors for expert(s) {bad[:8]}, which "
                                       f"{CFG_FILE} does not select (not an ESFT-LoRA adapter, or a damaged one)")
            factors[l][n] = (full_a[idx].clone(), full_b[:, :, idx].permute(2, 0, 1).contiguous())
            used.update((ka, kb))
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterError(f"{f}: tensor {extra[0]!r} belongs to no layer with selected experts in {CFG_FILE}")
    return LoRAAdapter(path, cfg, r, float(alpha) if not isinstance(alpha, int) else alpha, modules, factors,
                       bool(info.get("transposed", False)), meta)


def _merge_layer(la: LoRAAdapter, l: int, rows: dict[str, torch.Tensor], transposed: bool) -> dict[str, torch.Tensor]:
    """Base rows {param: [S, d1, d2]} of layer l's selected experts -> the merged rows (other params as they are)."""
    if transposed != la.transposed:
        raise AdapterError(f"{la.path}: was trained on experts stored {'transposed' if la.transposed else 'untransposed'}"
                           f", this model's are {'transposed' if transposed else 'untransposed'}")
    out = dict(rows)
    for n in LORA_PARAMS:
        A, B = la.factors[l][n]
        in_f, out_f = lora_dims(tuple(rows[n].shape[1:]), transposed)
        if A.shape[2] != in_f or B.shape[1] != out_f:
            raise AdapterError(f"{la.path}: layer {l} {n}: LoRA factors for a {B.shape[1]} x {A.shape[2]} weight, this "
                               f"model's experts have {out_f} x {in_f} (another base model)")
        out[n] = merged_rows(rows[n], A, B, la.scale, transposed)
    return out


def materialize(la: LoRAAdapter, model: nn.Module, fingerprint: dict | None = None,
                allow_other_base: bool = False) -> Adapter:
    """The adapter as merged expert rows of ``model``'s base weights: an ESFT adapter in memory (checkpoint keys
    of the selected experts holding W_e + (alpha / r) * B_e @ A_e). The base model is checked first."""
    from ..models.registry import base_experts, get_family, moe_layers
    from ..overlay import expert_rows
    from .io import check_base, check_family

    if allow_other_base:
        check_family(la.stub(), get_family(model).model_type)
    else:
        check_base(model, la.stub(), fingerprint)
    layers = {l.index: l for l in moe_layers(model)}
    tensors = {}
    for l, module in sorted(la.modules.items()):
        if l not in layers:
            raise AdapterError(f"{la.path}: layer {l} is not an MoE layer of this model (MoE layers: {sorted(layers)})")
        if layers[l].experts_prefix != module:
            raise AdapterError(f"{la.path}: layer {l}'s experts are {module} in the adapter, "
                               f"{layers[l].experts_prefix} in this model")
        ex = base_experts(layers[l].experts)
        ids = list(la.expert_cfg["experts"][l])
        lay = layers[l].layout()
        rows = {n: expert_rows(getattr(ex, n).detach(), ids) for n in lay.params}
        merged = _merge_layer(la, l, rows, bool(getattr(ex, "is_transposed", False)))
        tensors.update(lay.to_checkpoint(ids, merged))
    return Adapter(la.path, la.expert_cfg, tensors, la.meta)


def materialize_from_checkpoint(la: LoRAAdapter, base: str | os.PathLike, allow_other_base: bool = False) -> Adapter:
    """:func:`materialize` for a checkpoint on disk (``esft merge``): the selected experts' base rows are read
    from the shards (per-expert keys, or rows of fused keys), nothing else is loaded."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from ..models.registry import base_experts, meta_model, moe_layers
    from .io import check_family
    from .merge import check_base_on_disk
    from .shards import open_checkpoint

    base = Path(base)
    check_family(la.stub(), json.loads((base / "config.json").read_text()).get("model_type"))
    check_base_on_disk(la.stub(), base, allow_other_base)
    ckpt = open_checkpoint(base)
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    layers = {l.index: l for l in moe_layers(meta_model(config))}
    tensors = {}
    for l, module in sorted(la.modules.items()):
        if l not in layers:
            raise AdapterError(f"{la.path}: layer {l} is not an MoE layer of {base} (MoE layers: {sorted(layers)})")
        ids = list(la.expert_cfg["experts"][l])
        lay = layers[l].layout()
        ex = base_experts(layers[l].experts)
        src, dtype = {}, None
        for t in lay.tensors:
            for key in ([t.key(e) for e in ids] if t.per_expert else [t.template]):
                info = ckpt.tensors.get(key)
                if info is None:
                    raise AdapterError(f"{la.path}: layer {l}: the base checkpoint {base} has no tensor {key}")
                dtype = dtype or info.torch_dtype
                with safe_open(str(info.file), framework="pt") as f:
                    if t.per_expert:
                        src[key] = f.get_tensor(key)
                    else:
                        sl = f.get_slice(key)
                        src[key] = torch.stack([sl[e:e + 1][0] for e in ids])
        like = {n: torch.empty(0, dtype=dtype) for n in lay.params}
        rows = lay.from_checkpoint(ids, src, like)
        merged = _merge_layer(la, l, rows, bool(getattr(ex, "is_transposed", False)))
        tensors.update(lay.to_checkpoint(ids, merged))
    return Adapter(la.path, la.expert_cfg, tensors, la.meta)
