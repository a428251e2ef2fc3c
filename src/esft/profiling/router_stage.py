"""Router-first selection stage: a short training of the routers (optionally with attention) before profiling.

Router Lens / CEFT (arXiv 2508.19594) tune only the routers on the task's data, then read the task's experts
off the tuned routing ("DAS" tunes attention and routers first). Here the stage runs on the in-memory model
just before :func:`~esft.profiling.profiler.profile_routing`: the routers (and, if asked, every decoder
layer's attention) train for a few AdamW steps on the next-token loss of the task's answer tokens, with every
other weight frozen; the experts are then scored with the tuned routing. The tuned weights are discarded
afterwards (:func:`tuned_router` restores them), so ESFT trains the selected experts under the checkpoint's
own routers and every adapter stays swappable over the one base.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import nn

from ..io import DataError
from ..models.registry import _getattr_path, get_family, moe_layers

ROUTER_STAGE_MODULES = ("router", "router+attention")
# Decoder-layer attributes that hold the attention block, in the order they are tried. Transformers' decoder
# layers name it self_attn; a layer without any (a Mamba or convolution layer of a hybrid) is skipped.
ATTENTION_ATTRS = ("self_attn", "attention", "attn")
TRAINABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class RouterStageError(ValueError):
    """The router-first stage cannot run on this model (a router or attention block that cannot be trained)."""


def stage_parameters(model: nn.Module, modules: str = "router") -> tuple[dict[str, nn.Parameter], list[int]]:
    """The parameters the stage trains, by name, and the decoder layers whose attention trains (empty for
    ``modules="router"``). Refuses, naming the model type and the module, whatever cannot be trained."""
    if modules not in ROUTER_STAGE_MODULES:
        raise ValueError(f"router stage modules must be one of {ROUTER_STAGE_MODULES}, got {modules!r}")
    family = get_family(model)
    mtype = family.model_type
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise RouterStageError(f"{mtype}: the model is loaded quantized; the router-first stage trains the routers "
                               "with AdamW, which needs floating-point weights (load it unquantized)")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    def take(module: nn.Module, where: str, what: str) -> dict[str, nn.Parameter]:
        params = list(module.parameters())
        bad = [p for p in params if p.dtype not in TRAINABLE_DTYPES]
        if any(p.device.type == "meta" for p in params):
            raise RouterStageError(f"{mtype}: the {what} {where} ({type(module).__name__}) cannot be trained: its "
                                   "weights are on the meta device (offloaded to disk by the device map, read only "
                                   "at each forward); use a device map without disk offload for the router stage")
        if not params or bad:
            got = ("it has no parameter" if not params else
                   f"its weights are {', '.join(sorted({str(p.dtype).removeprefix('torch.') for p in bad}))}")
            raise RouterStageError(f"{mtype}: the {what} {where} ({type(module).__name__}) cannot be trained: {got}; "
                                   "the router-first stage needs floating-point (fp32/bf16/fp16) weights")
        return {names[id(p)]: p for p in params}

    out: dict[str, nn.Parameter] = {}
    for layer in moe_layers(model):
        out.update(take(layer.router, f"{layer.prefix}.{family.router_attr}", "router"))
    attn_layers: list[int] = []
    if modules == "router+attention":
        decoder = _getattr_path(model, family.layers_path)
        for i, dl in enumerate(decoder):
            attr = next((a for a in ATTENTION_ATTRS if isinstance(getattr(dl, a, None), nn.Module)), None)
            if attr is None:
                continue
            out.update(take(getattr(dl, attr), f"{family.layers_path}.{i}.{attr}", "attention block"))
            attn_layers.append(i)
        if not attn_layers:
            kind = type(decoder[0]).__name__ if len(decoder) else "decoder layer"
            raise RouterStageError(f"{mtype}: --router-stage-modules router+attention, but no decoder layer "
                                   f"({kind} under {family.layers_path}) has an attention module "
                                   f"({' / '.join(ATTENTION_ATTRS)}); use --router-stage-modules router")
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise RouterStageError(f"{mtype}: {len(offloaded)} weight(s) such as {offloaded[0]} are on the meta device "
                               "(offloaded to disk by the device map); the router stage backpropagates through every "
                               "layer, which needs every weight in memory. Use a device map without disk offload")
    return out, attn_layers


def _loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(mean next-token loss over the batch's label tokens, how many there are)."""
    n = int((batch["labels"][:, 1:] != -100).sum())
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False)
    return out.loss, n


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list[dict]) -> float:
    total, items = 0.0, 0
    for b in batches:
        loss, n = _loss(model, b)
        total += float(loss) * n
        items += n
    return total / max(items, 1)


def tune_router(model: nn.Module, batches: list[dict], steps: int, lr: float = 5e-4, modules: str = "router",
                progress=None) -> dict:
    """Train ``model``'s routers (``modules="router+attention"``: and every decoder layer's attention) in place
    for ``steps`` AdamW steps, everything else frozen; returns the stage's record.

    ``batches``: dicts of input_ids, attention_mask and labels [B, T] (-100 where nothing is learned), on the
    model's input device, used in turn. The weights stay tuned: reload the model, or use :func:`tuned_router`,
    which puts them back. ``progress(step, loss)`` is called after each step.
    """
    if type(steps) is not int or steps < 1:
        raise ValueError(f"router stage steps must be an integer >= 1, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 1:
        raise ValueError(f"router stage lr must be a finite number in (0, 1], got {lr!r}")
    from ..training.precision import MasterWeights

    params, attn_layers = stage_parameters(model, modules)
    usable = [b for b in batches if int((b["labels"][:, 1:] != -100).sum()) > 0]
    if not usable:
        raise DataError("router stage: the data has no token to learn (no answer token within the profiled rows)")
    visited = usable[:min(steps, len(usable))]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    t0 = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
        loss_before = _mean_loss(model, visited)
        masters = MasterWeights(params)  # fp32 twins of bf16/fp16 weights: small updates are not rounded away
        # No weight decay: it would pull the router weights towards 0, i.e. towards uniform routing.
        opt = torch.optim.AdamW(masters.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        tokens = label_tokens = 0
        for step in range(steps):
            b = usable[step % len(usable)]
            loss, n = _loss(model, b)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RouterStageError(f"router stage step {step + 1}: the loss is {value} "
                                       f"(--router-stage-lr {lr}); lower the learning rate or check the checkpoint")
            loss.backward()
            masters.accumulate()
            opt.step()
            opt.zero_grad(set_to_none=True)
            masters.sync()
            tokens += int(b["attention_mask"].sum())
            label_tokens += n
            if progress is not None:
                progress(step + 1, value)
        model.eval()
        loss_after = _mean_loss(model, visited)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    return {
        "method": "router-first (Router Lens / CEFT, arXiv 2508.19594)",
        "steps": steps,
        "lr": lr,
        "modules": modules,
        "batch_size": int(usable[0]["input_ids"].shape[0]),
        "optimizer": "AdamW, weight_decay 0, constant lr",
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "attention_layers": attn_layers,
        "tokens_seen": tokens,
        "label_tokens_seen": label_tokens,
        "loss_before": round(loss_before, 6),
        "loss_after": round(loss_after, 6),
        "loss_batches": len(visited),
        "seconds": round(time.perf_counter() - t0, 3),
        "weights": "discarded after profiling: training uses the checkpoint's routers",
    }


@contextmanager
def tuned_router(model: nn.Module, batches: list[dict], steps: int, lr: float = 5e-4, modules: str = "router",
                 progress=None):
    """``with tuned_router(model, batches, steps) as record:`` the model's routers (and attention) are tuned
    inside the block and put back bit for bit when it ends (also on an error)."""
    params, _ = stage_parameters(model, modules)
    saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    try:
        yield tune_router(model, batches, steps, lr, modules, progress)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
