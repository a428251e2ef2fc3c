"""Mixed precision: fp32 master weights for the trainable tensors of a bf16 (or fp16) model.

AdamW applied in place to bf16 weights loses every update smaller than half a bf16 ulp of the
weight (at lr 1e-5 most of them: a weight of 0.02 has an ulp of 1.2e-4), so a bf16 run barely
learns. The frozen model and the forward/backward compute stay in the model's dtype; only the
trainable tensors get an fp32 twin:

    model param p (bf16)  --backward-->  p.grad (bf16)  --accumulate()-->  master.grad (fp32)
    AdamW (fp32 state) steps the masters  --sync()-->  p = round(master)  (next forward)

Memory per trainable element: 2 (p) + 4 (master) + 4 (master grad) + 8 (AdamW) bytes, so it stays
proportional to what trains. Tensors that are already fp32 are their own master (no copy), so an
fp32 run is exactly the plain loop.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class MasterWeights:
    """fp32 masters of ``params`` ({name: model parameter}); the optimizer is built over :meth:`parameters`."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.model_params = OrderedDict(params)
        self.masters: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, p in self.model_params.items():
            if p.dtype == torch.float32:
                self.masters[name] = p
            else:
                m = p.detach().float().clone()
                m.requires_grad_(True)
                self.masters[name] = m

    @property
    def copies(self) -> int:
        """How many tensors have a separate fp32 master (0 for an fp32 model)."""
        return sum(m is not p for m, p in zip(self.masters.values(), self.model_params.values()))

    def parameters(self) -> list[torch.Tensor]:
        return list(self.masters.values())

    def master_bytes(self) -> int:
        """Bytes this process holds in separate masters (a sharded DTensor master counts its local shard)."""
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        return sum(local(m).numel() * 4 for m, p in zip(self.masters.values(), self.model_params.values()) if m is not p)

    @torch.no_grad()
    def accumulate(self) -> None:
        """Move the model params' low-precision grads into the fp32 masters' grads (call after each backward)."""
        for name, p in self.model_params.items():
            m = self.masters[name]
            if m is p or p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def sync(self) -> None:
        """Write the masters into the model params (rounded to their dtype); call after each optimizer step."""
        for name, p in self.model_params.items():
            m = self.masters[name]
            if m is not p:
                p.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 masters by parameter name (what a checkpoint must keep to resume exactly)."""
        return {n: m.detach().cpu() for n, m in self.masters.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, m in self.masters.items():
            m.copy_(tensors[n])
        self.sync()
