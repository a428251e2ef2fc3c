"""ESFT-LoRA (``method=esft-lora``): LoRA factors on the selected experts of each MoE layer only.

The fused expert tensors of transformers 5.x (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I];
gpt-oss and a few others store them transposed) cannot be frozen row by row, and PEFT's LoRA on a 3-D
parameter (``target_parameters``) always creates factors for all E experts. So, as for ESFT, each layer
with selected experts gets the expert overlay of ``esft/overlay.py`` (:class:`ESFTLoRAExperts`):

    base     the original fused module, frozen, all E experts
    trained  a frozen copy of the S selected rows whose ``gate_up_proj`` / ``down_proj`` are
             parametrized as  W_s + (alpha / r) * delta_s,  delta_s = B_s @ A_s  (transposed for
             transposed experts), with A_s [r, in] and B_s [out, r] the trainable factors
    table    [1, E]: the selected experts' rows in ``trained``, -1 elsewhere

"in" and "out" follow PEFT's ``ParamWrapper`` for a 3-D parameter, so that the saved factors are PEFT's
own (adapter/esft_lora.py): A is initialised as PEFT does (Kaiming-uniform), B = 0, so at the start the
model computes exactly what the base computes. Only the S x r factors train: gradients and AdamW state
scale with the selected experts times the rank. Biases and everything else stay frozen.

LoRA dropout acts on the input of A, which a LoRA added to a fused weight never sees separately (PEFT
refuses ``lora_dropout`` on ``target_parameters`` for the same reason), so ESFT-LoRA has none.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..io import DataError
from ..models.registry import MoEFamily, base_experts, get_family, moe_layers
from ..overlay import ExpertOverlay, expert_rows, rows_module
from ..models.layout import expert_params
from .experts import OFFLOAD_HINT, fill_plan, validate_expert_cfg

LORA_PARAMS = ("gate_up_proj", "down_proj")  # PEFT's target_parameters on the fused experts, in this order


def lora_dims(weight_shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """(in_features, out_features) of one expert's row [d1, d2], as PEFT's ParamWrapper reads a 3-D parameter:
    [E, out, in] for the usual layout, [E, in, out] for transposed experts (gpt-oss)."""
    d1, d2 = weight_shape
    return (d1, d2) if transposed else (d2, d1)


class LoRAFactors(nn.Module):
    """A parametrization of S expert rows W [S, d1, d2]: W + scale * delta, delta_s = B_s @ A_s (transposed
    for transposed experts). A [S, r, in], B [S, out, r]."""

    def __init__(self, rows: int, rank: int, row_shape: tuple[int, int], transposed: bool, scale: float,
                 dtype: torch.dtype, device):
        super().__init__()
        in_f, out_f = lora_dims(row_shape, transposed)
        self.transposed, self.scale = transposed, scale
        self.lora_A = nn.Parameter(torch.empty((rows, rank, in_f), dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros((rows, out_f, rank), dtype=dtype, device=device))
        with torch.no_grad():  # PEFT's init of lora_A (nn.Linear(in, r * E)): fan_in = in for every row
            nn.init.kaiming_uniform_(self.lora_A.view(rows * rank, in_f), a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """[S, d1, d2]: B_s @ A_s per row, unscaled."""
        d = torch.bmm(self.lora_B, self.lora_A)  # [S, out, in]
        return d.transpose(1, 2) if self.transposed else d

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * self.delta()).to(weight.dtype)


class ESFTLoRAExperts(ExpertOverlay):
    """Fused experts with LoRA on a subset of experts; see the module docstring."""

    def __init__(self, base: nn.Module, selected: list[int], rank: int, alpha: float, kind: str = "sparse"):
        if not selected:
            raise ValueError("ESFTLoRAExperts needs at least one selected expert")
        rows = {n: expert_rows(getattr(base, n).detach(), list(selected)) for n in expert_params(base)}
        E = base.gate_up_proj.shape[0]
        table = torch.full((1, E), -1, dtype=torch.long)
        table[0, torch.tensor(selected)] = torch.arange(len(selected))
        super().__init__(base, rows_module(base, rows, trainable=False), table, kind, every_row=True)
        self.selected, self.rank, self.alpha = list(selected), rank, alpha
        self.transposed = bool(getattr(base, "is_transposed", False))
        for n in LORA_PARAMS:
            w = getattr(self.trained, n)
            factors = LoRAFactors(len(selected), rank, tuple(w.shape[1:]), self.transposed, alpha / rank, w.dtype,
                                  w.device)
            parametrize.register_parametrization(self.trained, n, factors)

    def factors(self, name: str) -> LoRAFactors:
        return self.trained.parametrizations[name][0]

    def frozen_rows(self, name: str) -> torch.Tensor:
        """[S, d1, d2]: the selected experts' base rows (the parametrization's frozen original)."""
        return self.trained.parametrizations[name].original

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None):
        # One W + delta per forward, however often the experts code reads the parametrized tensor.
        with parametrize.cached():
            return super().forward(hidden_states, top_k_index, top_k_weights)

    @torch.no_grad()
    def merged(self) -> dict[str, torch.Tensor]:
        """The fused tensors with W_e + scale * B_e @ A_e written into the selected rows (computed in fp32)."""
        idx = torch.tensor(self.selected, device=self.base.gate_up_proj.device)
        out = {}
        for n in expert_params(self.base):
            w = getattr(self.base, n).detach().clone()
            if n in LORA_PARAMS:
                f = self.factors(n)
                rows = merged_rows(self.frozen_rows(n), f.lora_A, f.lora_B, f.scale, self.transposed)
                w.index_copy_(0, idx, rows.to(w.dtype))
            out[n] = w
        return out


def merged_rows(rows: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """W_s + scale * B_s @ A_s for rows W [S, d1, d2], A [S, r, in], B [S, out, r]: computed in fp32, returned in
    W's dtype (the one rounding of a merge)."""
    d = torch.bmm(B.float(), A.float())
    if transposed:
        d = d.transpose(1, 2)
    return (rows.float() + scale * d).to(rows.dtype)


@dataclass
class LoRAPlan:
    """What trains under ESFT-LoRA: ``params`` (name -> factor) and the wrapped layers."""

    family: MoEFamily
    expert_cfg: dict
    rank: int
    alpha: float
    model: nn.Module | None = None
    params: "OrderedDict[str, nn.Parameter]" = field(default_factory=OrderedDict)
    wrappers: dict[int, ESFTLoRAExperts] = field(default_factory=dict)  # layer -> wrapper
    module_names: dict[int, str] = field(default_factory=dict)  # layer -> module name of the fused experts

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def factors(self, source: dict[str, torch.Tensor] | None = None) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """layer -> {param: (A [S, r, in], B [S, out, r])}, read from ``source`` ({param name: tensor}, e.g. the
        fp32 masters of a mixed-precision run) when given."""
        name_of = {id(p): n for n, p in self.params.items()}
        read = lambda p: (source[name_of[id(p)]] if source is not None else p).detach()  # noqa: E731
        return {l: {n: (read(w.factors(n).lora_A), read(w.factors(n).lora_B)) for n in LORA_PARAMS}
                for l, w in sorted(self.wrappers.items())}


def check_lora_fits(model: nn.Module, expert_cfg: dict, rank: int) -> None:
    """The rank must not exceed the smaller dimension of any targeted expert weight (a LoRA of rank r on a d1 x
    d2 matrix has rank min(r, d1, d2): more only adds parameters). DataError naming the layer and tensor."""
    for l in moe_layers(model):
        if not expert_cfg["experts"].get(l.index):
            continue
        ex = base_experts(l.experts)
        for n in LORA_PARAMS:
            d1, d2 = getattr(ex, n).shape[1:]
            if rank > min(d1, d2):
                raise DataError(f"lora_rank={rank} is larger than the smaller dimension of layer {l.index}'s "
                                f"{l.experts_prefix}.{n}: one expert's {n} is {d1} x {d2}, so its rank is at most "
                                f"{min(d1, d2)}; pass lora_rank<={min(d1, d2)}")


def apply_esft_lora(model: nn.Module, expert_cfg: dict, rank: int, alpha: float,
                    source: str = "expert_config") -> LoRAPlan:
    """Freeze ``model`` and put LoRA factors on the experts ``expert_cfg`` selects. In place."""
    family = get_family(model)
    validate_expert_cfg(model, expert_cfg, source)
    extra = [k for k in ("shared_experts", "non_expert_modules") if expert_cfg.get(k)]
    if extra:
        raise DataError(f"{source} sets {' and '.join(f'{k}=true' for k in extra)}, but method=esft-lora puts LoRA "
                        "on the selected routed experts only; select without --train-shared-experts / "
                        "--train-non-expert-modules, or use method=esft for that ablation")
    if not any(expert_cfg["experts"].values()):
        raise DataError(f"{source} selects no routed expert in any layer: method=esft-lora would train nothing")
    check_lora_fits(model, expert_cfg, rank)
    for p in model.parameters():
        p.requires_grad_(False)
    plan = LoRAPlan(family=family, expert_cfg=expert_cfg, rank=rank, alpha=alpha, model=model)
    for l in moe_layers(model):
        selected = expert_cfg["experts"].get(l.index, [])
        if not selected:
            continue
        if base_experts(l.experts).gate_up_proj.device.type == "meta":
            raise DataError(f"layer {l.index}: experts {selected} are selected for ESFT-LoRA, but the device map "
                            f"left this layer's experts on the meta device; "
                            f"{OFFLOAD_HINT.format(module=l.prefix.rsplit('.', 1)[0])}")
        if isinstance(l.experts, ExpertOverlay):
            raise ValueError(f"layer {l.index}'s experts are wrapped already ({type(l.experts).__name__})")
        l.layout()  # read (and cache) the checkpoint layout from the plain module, before it is wrapped
        plan.module_names[l.index] = l.experts_prefix
        setattr(l.block, family.experts_attr, ESFTLoRAExperts(l.experts, selected, rank, alpha, family.experts_kind))
    return fill_plan(plan, model, ESFTLoRAExperts)


@torch.no_grad()
def load_factors(plan: LoRAPlan, factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Write factors (layer -> {param: (A, B)}, as ``LoRAPlan.factors`` returns them) into the plan's wrappers."""
    for l, per in factors.items():
        w = plan.wrappers[l]
        for n, (A, B) in per.items():
            f = w.factors(n)
            f.lora_A.copy_(A.to(f.lora_A.dtype))
            f.lora_B.copy_(B.to(f.lora_B.dtype))


@torch.no_grad()
def unwrap_esft_lora(model: nn.Module) -> nn.Module:
    """Write W + scale * B @ A into the selected rows and restore the original expert modules. In place."""
    from .experts import unwrap_esft

    return unwrap_esft(model, (ESFTLoRAExperts,))
