"""Routing statistics through forward hooks on the routers (no model code is edited).

For every MoE layer l and routed expert i, over N sequences (paper §3.1):

- ESFT-Gate   G(l,i) = mean_s ( mean_{t in s} g(i,t) ),  g = gate value if i in top-K(t) else 0
- ESFT-Token  R(l,i) = mean_s ( mean_{t in s} 1[i in top-K(t)] / K )

Normalisation is per sequence and per layer: each sequence weighs the same whatever its
length, and each layer's Token scores sum to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.registry import MoEFamily, get_family, moe_layers, router_scores


@dataclass
class LayerStats:
    """Running sums for one layer, kept on the model's device (no host sync per batch)."""

    gate_sum: torch.Tensor  # [E] sum over sequences of per-sequence mean gate value
    token_sum: torch.Tensor  # [E] sum over sequences of per-sequence selection ratio
    counts: torch.Tensor  # [E] raw number of (token, expert) selections, for reports
    nonfinite: torch.Tensor  # [] counted tokens whose gate values hold NaN/Inf (checked once, in result())


class ProfileError(ValueError):
    """Routing statistics that cannot be trusted (the router produced NaN/Inf scores)."""


@dataclass
class RoutingProfile:
    """What a profiling run measured; ``to_summary`` gives the reference layout."""

    layers: list[int]
    num_experts: int
    top_k: int
    num_sequences: int
    num_tokens: int
    gate_scores: dict[int, list[float]]
    token_scores: dict[int, list[float]]
    counts: dict[int, list[int]]
    meta: dict = field(default_factory=dict)

    def balance(self) -> dict:
        """How the task's tokens spread over the experts, per layer: MaxVio over the whole data (max load /
        mean load - 1; 0 = balanced) and how many experts hold half the routed tokens (uniform would need
        ceil(E/2)). The counts follow the router's real choice, routing bias included."""
        from ..training.balance import maxvio_summary

        return {"maxvio_global": maxvio_summary(self.counts),
                "experts_for_half_of_tokens": {str(l): concentration(c, 0.5) for l, c in sorted(self.counts.items())},
                "uniform_experts_for_half": uniform_concentration(self.num_experts, 0.5)}

    def to_summary(self) -> dict:
        def fmt(scores):
            return {str(l): {str(e): float(v) for e, v in enumerate(row)} for l, row in scores.items()}

        return {
            "token_scores": fmt(self.token_scores),
            "gate_scores": fmt(self.gate_scores),
            "selection_counts": {str(l): row for l, row in self.counts.items()},
            "balance": self.balance(),
            "meta": {
                "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "normalization": "per-sequence, per-layer",
                **self.meta,
            },
        }


class RouterObserver:
    """Context manager that hooks every router of ``model`` and accumulates ESFT scores.

    Before each forward call ``observer.begin_batch(attention_mask)`` with the batch's
    attention mask [B, T] (1 = real token): padding is ignored and the per-sequence means
    need to know which flattened router rows belong to which sequence.
    """

    def __init__(self, model: nn.Module):
        self.family: MoEFamily = get_family(model)
        self.layers = moe_layers(model)
        self.stats: dict[int, LayerStats] = {}
        self.num_sequences = 0
        self.num_tokens = 0
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> "RouterObserver":
        for layer in self.layers:
            hook = self._make_hook(layer.index, layer.num_experts, layer.router, layer.top_k)
            self._handles.append(layer.router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        mask = attention_mask.bool()
        self._mask = mask
        per_seq = mask.sum(dim=1)
        self.num_sequences += int((per_seq > 0).sum())
        self.num_tokens += int(per_seq.sum())

    def _make_hook(self, layer_idx: int, num_experts: int, router: nn.Module, top_k: int):
        def hook(module, inputs, outputs):
            # g [N, K] gate values and topk_idx [N, K] chosen experts, per the family's router layout
            g, topk_idx = router_scores(self.family, router, outputs, top_k)
            mask = self._mask
            if mask is None:
                raise RuntimeError("RouterObserver.begin_batch(attention_mask) must be called before each forward")
            B, T = mask.shape
            N, K = topk_idx.shape
            if N != B * T:
                raise RuntimeError(f"layer {layer_idx}: router saw {N} tokens, batch mask has {B}x{T}")
            mask = mask.to(g.device)  # a device map may place this layer on another device than the inputs
            counted = mask.reshape(N)  # [N] bool
            # NaN/Inf weights or inputs make NaN gate values, which would reach the scores (and a NaN score
            # makes top-p selection take every expert). Counted on the device, checked in result(): no host
            # sync per layer and batch. Tokens that do not count get 0 so that they can poison nothing.
            nonfinite = ~torch.isfinite(g).all(dim=1) & counted  # [N]
            g = torch.where(counted.unsqueeze(1), g, torch.zeros((), dtype=g.dtype, device=g.device))
            valid = counted.to(g.dtype)  # [N]
            n_tok = mask.sum(dim=1).clamp(min=1).to(g.dtype)  # [B]
            w_tok = (valid / n_tok.repeat_interleave(T)).unsqueeze(1)  # [N, 1]: 1/len(seq) on real tokens
            seq_expert = topk_idx  # [N, K]
            st = self.stats.get(layer_idx)
            if st is None:
                z = torch.zeros(num_experts, dtype=torch.float64, device=g.device)
                st = self.stats[layer_idx] = LayerStats(z.clone(), z.clone(), torch.zeros_like(z, dtype=torch.long),
                                                        torch.zeros((), dtype=torch.long, device=g.device))
            st.nonfinite += nonfinite.sum()
            # Summing w_tok * x over all tokens of all sequences = sum over sequences of the
            # per-sequence mean, which is exactly what the scores need before dividing by N.
            st.gate_sum.index_add_(0, seq_expert.reshape(-1), (g * w_tok).reshape(-1).double())
            st.token_sum.index_add_(0, seq_expert.reshape(-1), (w_tok.expand(N, K) / K).reshape(-1).double())
            st.counts.index_add_(0, seq_expert.reshape(-1), valid.long().unsqueeze(1).expand(N, K).reshape(-1))

        return hook

    def reduce(self, job) -> None:
        """Sum this rank's statistics with the other ranks' (``job``: training.distributed.Dist)."""
        if not job.enabled:
            return
        import torch.distributed as dist

        for _, st in sorted(self.stats.items()):  # every rank has every layer: each ran >= 1 forward
            for t in (st.gate_sum, st.token_sum, st.counts, st.nonfinite):
                dist.all_reduce(t)
        self.num_sequences = int(job.sum(self.num_sequences))
        self.num_tokens = int(job.sum(self.num_tokens))

    def result(self, meta: dict | None = None) -> RoutingProfile:
        if self.num_sequences == 0:
            raise RuntimeError("no tokens were profiled")
        bad = {l: int(s.nonfinite) for l, s in sorted(self.stats.items()) if int(s.nonfinite)}
        if bad:
            # The first layer is named: NaN/Inf hidden states flow on, so the layers after it follow.
            l, n = next(iter(bad.items()))
            rest = list(bad)[1:]
            later = f" (and in layer{'s' * (len(rest) > 1)} {', '.join(map(str, rest))})" if rest else ""
            raise ProfileError(f"layer {l}: the router produced NaN/Inf scores for {n} of {self.num_tokens} tokens"
                               f"{later}; the checkpoint's weights (in this layer or an earlier one) or the input "
                               "are not finite, so no scores are written")
        n = self.num_sequences
        gate = {l: (s.gate_sum / n).tolist() for l, s in sorted(self.stats.items())}
        tok = {l: (s.token_sum / n).tolist() for l, s in sorted(self.stats.items())}
        counts = {l: s.counts.tolist() for l, s in sorted(self.stats.items())}
        return RoutingProfile(
            layers=[l.index for l in self.layers],
            num_experts=self.layers[0].num_experts,
            top_k=self.layers[0].top_k,
            num_sequences=n,
            num_tokens=self.num_tokens,
            gate_scores=gate,
            token_scores=tok,
            counts=counts,
            meta=meta or {},
        )


@torch.no_grad()
def profile_routing(model, batches, progress=None, job=None) -> RoutingProfile:
    """Run ``model`` over ``batches`` (dicts with input_ids and attention_mask [B, T]) and score experts.

    A batch may carry ``count_mask`` [B, T] (default: its attention mask): the tokens that count. Under
    torchrun (``job``), each rank runs its share of the batches and the sums are added up at the end.
    """
    model.eval()
    with RouterObserver(model) as obs:
        for batch in batches:
            count = batch.get("count_mask", batch["attention_mask"])
            obs.begin_batch(count)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            if progress is not None:
                progress(int(count.sum()))
        if job is not None:
            obs.reduce(job)
        return obs.result()


def concentration(scores: list[float], mass: float = 0.5) -> int:
    """How many experts (best first) it takes to cover ``mass`` of a layer's score total."""
    total = sum(scores)
    acc, n = 0.0, 0
    for s in sorted(scores, reverse=True):
        if acc >= mass * total - 1e-12:
            break
        acc += s
        n += 1
    return n


def uniform_concentration(num_experts: int, mass: float = 0.5) -> int:
    return math.ceil(num_experts * mass - 1e-9)
