"""What a router returns, and how its logits become the gate values ESFT-Gate scores.

transformers' routers return ``(router_logits [N, E], routing_weights [N, K], expert_ids [N, K])``;
Llama 4's returns ``(scores [N, E], logits [N, E])`` and takes the top-k of the logits
(``outputs="scores_logits"`` in the family table). The gate value g(i, t) of a token's chosen expert is
the router's affinity before any top-k renormalisation or routed scaling factor, per ``gate``:

- ``softmax``: softmax over all E logits (routers that renormalise over the top-k, or take a
  softmax of the top-k logits, apply it afterwards: the same affinities);
- ``sigmoid``: sigmoid of the logit (Llama 4, and sigmoid routers without renormalisation);
- ``sigmoid_topk_norm``: sigmoids normalised over the chosen top-k (DeepSeek-V3 and its descendants);
- ``probs``: the router's first output already holds the affinities (gathered as they are).
"""

from __future__ import annotations

import torch

GATES = ("softmax", "sigmoid", "sigmoid_topk_norm", "probs")


def split_outputs(outputs, kind: str, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, E], expert ids [N, K]) from a router's return value."""
    if kind == "scores_logits":
        logits = outputs[1]
        return logits, logits.topk(top_k, dim=-1).indices
    if kind != "logits_weights_ids":
        raise ValueError(f"unknown router output kind {kind!r}")
    return outputs[0], outputs[2]


def gate_values(gate: str, router_logits: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """router_logits [N, E], topk_idx [N, K] -> [N, K] float32 gate values (see the module docstring)."""
    logits = router_logits.float()
    if gate == "softmax":
        return logits.softmax(dim=-1).gather(1, topk_idx)
    if gate == "sigmoid":
        return logits.sigmoid().gather(1, topk_idx)
    if gate == "sigmoid_topk_norm":
        g = logits.sigmoid().gather(1, topk_idx)
        return g / (g.sum(dim=-1, keepdim=True) + 1e-20)
    if gate == "probs":
        return logits.gather(1, topk_idx)
    raise ValueError(f"unknown gate kind {gate!r} (known: {', '.join(GATES)})")


def detect_gate(logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> str | None:
    """Which gate kind's affinities the router's own routing weights [N, K] are (up to top-k renormalisation
    and a constant scale), or None. Used to check the family table against each router's behaviour."""
    w = weights.float()
    for gate in ("softmax", "sigmoid_topk_norm", "sigmoid", "probs"):
        g = gate_values(gate, logits, ids)
        for cand in (g, g / g.sum(dim=-1, keepdim=True).clamp_min(1e-20)):
            scale = (w.sum() / cand.sum()).item() if cand.sum() != 0 else 0.0
            if scale > 0 and torch.allclose(w, cand * scale, rtol=1e-4, atol=1e-6):
                return gate
    return None
