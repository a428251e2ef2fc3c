"""A cheap identity for a base model: hashes of its config and of a sample of every weight.

Weights are sampled (up to 64 evenly spaced elements per tensor) and rounded to bfloat16
before hashing, so a checkpoint loaded in float32 or bfloat16 gets the same fingerprint,
while a different checkpoint (other weights or shapes) does not. Hashing a 16B-parameter
model this way reads a few thousand numbers per tensor, not the whole model.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

_VOLATILE = {"dtype", "torch_dtype", "transformers_version", "use_cache", "name_or_path", "architectures",
             "output_router_logits", "return_dict", "output_hidden_states", "output_attentions"}


def config_fingerprint(config) -> str:
    d = config.to_dict()
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _canonical_name(name: str) -> str:
    # An ESFT-wrapped model names its frozen fused experts ".experts.base."; hash them as the plain model.
    return name.replace(".experts.base.", ".experts.")


@torch.no_grad()
def weights_fingerprint(model: nn.Module, samples: int = 64) -> str:
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


def model_fingerprint(model: nn.Module) -> dict:
    return {"config": config_fingerprint(model.config), "weights": weights_fingerprint(model)}
