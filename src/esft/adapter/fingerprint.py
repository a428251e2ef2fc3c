"""A cheap identity for a base model: hashes of its config and of a sample of every weight.

Version 2 (``{"version": 2, "config": ..., "weights": ...}``, what adapters now record) hashes the
weights as the *checkpoint files* name and shape them, so the same value comes from a loaded
model (:func:`model_fingerprint`) and from the safetensors shards alone
(:func:`checkpoint_fingerprint`, which never loads the model):

- routed experts appear as the checkpoint's tensors (``ExpertLayout``, models/layout.py): gate =
  rows [:I] of the fused ``gate_up_proj[e]`` [2I, H], up = rows [I:], down = ``down_proj[e]`` [H, I];
  every other parameter under ``family.checkpoint_name``; an ESFT-wrapped model hashes as its base;
- each tensor contributes its key, its shape and ``SAMPLES`` elements at exact integer flat indices
  ``i * (n - 1) // (SAMPLES - 1)`` (the same on CPU and GPU, at any size), rounded to bfloat16 so a
  float32 and a bfloat16 load of one checkpoint agree.

With 16 samples, DeepSeek-V3 (~44k per-expert tensors) costs ~0.7M element reads.

Version 1 (no ``version`` key; adapters written before) hashed ``named_parameters()`` (fused
expert tensors) at ``torch.linspace`` indices, 64 per tensor. It is kept, unchanged, to check such
adapters against a loaded model: its float indices differ from exact integer ones even below 2^24
elements (e.g. for 64 x 512 tensors), so "fixing" it would change every v1 value.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..models.registry import base_experts, get_family, moe_layers

FINGERPRINT_VERSION = 2
SAMPLES = 16  # elements per tensor (v2)
_COMPARED = ("config", "weights")  # other keys (version, ...) describe a fingerprint, they are not compared

_VOLATILE = {"dtype", "torch_dtype", "transformers_version", "use_cache", "name_or_path", "architectures",
             "output_router_logits", "return_dict", "output_hidden_states", "output_attentions"}


def config_fingerprint(config) -> str:
    d = config.to_dict()
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_version(fp: dict) -> int:
    return int(fp.get("version", 1))


def fingerprint_mismatch(want: dict, have: dict) -> str | None:
    """The first compared field ("config", "weights") in which two fingerprints differ, else None."""
    for k in _COMPARED:
        if want.get(k) != have.get(k):
            return k
    return None


def sample_indices(numel: int, k: int = SAMPLES) -> list[int]:
    """``min(k, numel)`` evenly spaced flat indices from 0 to numel - 1, exact (Python integers)."""
    k = min(k, numel)
    if k <= 1:
        return [0] * k
    return [i * (numel - 1) // (k - 1) for i in range(k)]


def gather_flat(t: torch.Tensor, flat_indices: list[int]) -> torch.Tensor:
    """Elements of ``t`` at row-major flat indices, without a flattened copy of ``t`` -> [k] on CPU, t's dtype."""
    t = t.detach()
    if t.dim() == 0:
        return t.reshape(1).cpu()[: len(flat_indices)]
    coords = torch.unravel_index(torch.tensor(flat_indices, dtype=torch.long), tuple(t.shape))
    return t[tuple(c.to(t.device) for c in coords)].cpu()


def _canonical_name(name: str) -> str:
    # An ESFT-wrapped model names its frozen fused experts ".experts.base."; hash them as the plain model.
    return name.replace(".experts.base.", ".experts.")


def _layout(model: nn.Module) -> tuple[list[tuple[object, dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """[(ExpertLayout, {fused param name: tensor [E, ...]})] of the routed experts, and checkpoint key ->
    parameter for the rest."""
    family = get_family(model)
    experts, fused = [], set()
    for l in moe_layers(model):
        ex = base_experts(l.experts)
        params = dict(ex.named_parameters(recurse=False))
        experts.append((l.layout(), params))
        fused |= {id(p) for p in params.values()}
    others = {}
    for name, p in model.named_parameters():
        if id(p) in fused or ".experts.trained." in name:
            continue
        others[family.checkpoint_name(_canonical_name(name))] = p
    return experts, others


def checkpoint_key_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of every tensor the v2 fingerprint hashes (a meta-device model is enough)."""
    experts, others = _layout(model)
    out = {k: tuple(p.shape) for k, p in others.items()}
    for lay, _ in experts:
        for t in lay.tensors:
            for e in (range(lay.num_experts) if t.per_expert else [0]):
                out[t.key(e)] = lay.checkpoint_shape(t)
    return out


@torch.no_grad()
def _model_samples(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Checkpoint key -> (shape, sampled elements [k] on CPU), read from the loaded model."""
    experts, others = _layout(model)
    out = {k: (tuple(p.shape), gather_flat(p, sample_indices(p.numel()))) for k, p in others.items()}
    for lay, params in experts:
        flat = [params[n].reshape(lay.num_experts, -1) for n in lay.params]  # [E, n_p] views
        for t in lay.tensors:
            shape = lay.checkpoint_shape(t)
            n = t.param_of.numel()
            if t.per_expert:
                # One gather per tensor for all experts (V3 has 256 per layer): every expert's piece shares
                # one sample pattern (same numel).
                idx = torch.tensor(sample_indices(n))
                vals = _pick(flat, t, slice(None), idx)  # [E, k]
                for e in range(lay.num_experts):
                    out[t.key(e)] = (shape, vals[e])
            else:
                idx = torch.tensor(sample_indices(lay.num_experts * n))
                rows, local = idx // n, idx % n
                vals = torch.stack([_pick(flat, t, int(r), local[i:i + 1])[0] for i, r in enumerate(rows.tolist())])
                out[t.template] = (shape, vals.reshape(-1))
    return out


def _pick(flat: list[torch.Tensor], t, rows, local: torch.Tensor) -> torch.Tensor:
    """Elements ``local`` (flat indices of a checkpoint tensor's piece) of experts ``rows`` -> [R, k] on CPU."""
    which, index = t.param_of[local].long(), t.index[local]
    cols = []
    for j in range(local.numel()):
        f = flat[int(which[j])]
        cols.append(f[rows, int(index[j])].reshape(-1, 1).cpu() if isinstance(rows, slice)
                    else f[rows, int(index[j])].reshape(1, 1).cpu())
    return torch.cat(cols, dim=1)


def _digest(samples: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> str:
    from .shards import tensor_bytes

    h = hashlib.sha256()
    for key in sorted(samples):
        shape, vals = samples[key]
        h.update(json.dumps([key, list(shape)]).encode())
        h.update(tensor_bytes(vals.to(torch.bfloat16)))  # bf16: fp32 and bf16 loads hash alike
    return h.hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """The v2 weight hash of a loaded (plain or ESFT-wrapped) model."""
    return _digest(_model_samples(model))


@torch.no_grad()
def weights_fingerprint_v1(model: nn.Module, samples: int = 64) -> str:
    """The v1 weight hash, exactly as esft 0.1 computed it (kept to check v1 adapters)."""
    h = hashlib.sha256()
    named = {_canonical_name(n): p for n, p in model.named_parameters() if ".experts.trained." not in n}
    for name in sorted(named):
        p = named[name].detach()
        flat = p.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(samples, flat.numel()), device=flat.device).long()
        vals = flat.index_select(0, idx).to(torch.bfloat16).float().cpu().numpy().tobytes()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(vals)
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module, version: int = FINGERPRINT_VERSION) -> dict:
    """{"version": 2, "config": ..., "weights": ...} of a loaded model (version=1: the old dict, no version key)."""
    if version == 1:
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ValueError("a version-1 base fingerprint (an adapter or checkpoint from esft 0.1) needs every weight "
                             "in memory, and this model has weights offloaded to the meta device: load it without "
                             "offloading to check it, or pass allow_other_base to skip the check")
        return {"config": config_fingerprint(model.config), "weights": weights_fingerprint_v1(model)}
    if version != FINGERPRINT_VERSION:
        raise ValueError(f"unknown fingerprint version {version} (this esft knows 1 and {FINGERPRINT_VERSION})")
    if any(p.device.type == "meta" for p in model.parameters()):
        # Layers a device map offloaded to disk have no values in memory; v2 is defined over the
        # checkpoint's tensors, so the files the model was loaded from give the same value.
        source = Path(str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")))
        if not (source / "config.json").is_file():
            raise ValueError("this model has weights on the meta device (offloaded) and no checkpoint directory "
                             "to read them from, so its fingerprint cannot be computed")
        return checkpoint_fingerprint(source)
    return {"version": FINGERPRINT_VERSION, "config": config_fingerprint(model.config), "weights": weights_fingerprint(model)}


def checkpoint_fingerprint(path: str | os.PathLike) -> dict:
    """The v2 fingerprint of a safetensors checkpoint directory, read from its files.

    Equals ``model_fingerprint(AutoModelForCausalLM.from_pretrained(path))`` in any float dtype.
    Reads config.json, the shard headers and SAMPLES elements per tensor; the model is built on
    the meta device only to list its parameter names and shapes (no weight is allocated).
    """
    from transformers import AutoConfig

    from ..models.registry import meta_model

    from ..models.loading import CheckpointError
    from .shards import open_checkpoint, read_elements

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config.json ({e})") from None
    skeleton = meta_model(config)
    ckpt = open_checkpoint(path)
    samples, fds = {}, {}
    try:
        for key, shape in checkpoint_key_shapes(skeleton).items():
            info = ckpt.tensors.get(key)
            if info is None:
                raise CheckpointError(f"{path}: no tensor {key!r} in the checkpoint, which its config.json implies")
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: {key!r} has shape {list(info.shape)}, its config.json implies {list(shape)}")
            if info.file not in fds:
                fds[info.file] = os.open(info.file, os.O_RDONLY)
            samples[key] = (shape, read_elements(fds[info.file], info, sample_indices(info.numel)))
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"version": FINGERPRINT_VERSION, "config": config_fingerprint(config), "weights": _digest(samples)}
