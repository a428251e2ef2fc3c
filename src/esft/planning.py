"""`esft plan`: per-rank GPU memory of a training layout, from a checkpoint's config.json alone.

The model is built on the meta device (shapes, no storage, no weights read) and the memory of
this project's distributed layout (``training/distributed.py``) is added up per rank, in bytes:

    N processes (= fsdp_size), model dtype b bytes/element (bf16/fp16: 2, fp32: 4)

    weights      every parameter sharded by FSDP2:             P * b / N
                 + ESFT, fp32 model: the selected experts' trainable copy, sharded: Tr * 4 / N
    fp32 masters T * 4 / N  (none when the model is fp32; ESFT's routed copy is fp32 shards: its masters)
    gradients    fp32 (the masters' gradients), sharded:       T * 4 / N
    optimizer    AdamW exp_avg + exp_avg_sq, fp32, sharded:    T * 8 / N
    activations  see below (per rank: micro_batch x seq_len tokens)
    transient    FSDP2 all-gathers one decoder layer at a time: the largest layer unsharded
                 (its non-expert weights + its routed experts / ep_size: expert parallelism gathers
                 only the rank's own experts), plus the LM head, which transformers' FSDP plan for
                 these models keeps unsharded from its forward to the end of backward
                 ("keep_full_weight"); full fine-tuning doubles it (the gathered layer's unsharded
                 gradient exists before its reduce-scatter); ESFT adds the largest layer's trainable
                 copy gathered in b, its unsharded gradient in b and that gradient's fp32 copy for the
                 reduce-scatter (Tl * (2b + 4); Tl * 8 for fp32). None for one process.

    One process (N = 1, `esft train` without torchrun) keeps ESFT's trainable copy as a plain tensor
    in the model's dtype beside its fp32 master: weights P * b + Tr * b, masters T * 4.

P = all parameters, T = trainable ones (ESFT: the selected experts, + shared experts / non-expert
modules if the expert config asks for them), Tr = the selected routed experts alone. Expert parallelism (ep_size) places each rank's E/ep
experts and shards them over N/ep ranks, so the per-rank share of the weights is 1/N either way.

Activations (bytes per token, what autograd saves for backward; b as above, 4 for fp32 parts).
Per decoder layer, with H hidden, n heads, SwiGLU MLPs (a dense one of width D, or K of E routed
experts of width I each plus shared experts of total width Ds), and "+" terms only where the
weights they serve train (full fine-tuning: all; ESFT: the selected experts' pairs, a share s of
the K (token, expert) pairs, taking routing as uniform: s = selected / E of the layer):

    attention  4H (input RMSNorm, fp32) + b*n*(2*dqk + 2*dv) (SDPA keeps q, k, v, out; no
               seq^2 term: memory-efficient attention) + 4*(kv_lora + q_lora) (MLA's latent norms)
               [+ b*(2H + 2*kv_lora + 2*q_lora + n*dv): linear and norm inputs, when attention trains]
               (a standard attention layer has no latents and n*dh for dqk and dv)
    MLP        4H (post-attention RMSNorm) + dense: 3*b*D (SiLU input, SiLU output, up output)
               [+ b*(2H + D)];  MoE: 4E (router softmax) + K*b*(H + 3I) per token (each pair's
               gate/up output, SiLU output, expert output) [+ K*s*b*(H + I): the pair's inputs to
               the two projections] + shared experts as a dense MLP of width Ds [+ its inputs]
    loss       once: 4V (fp32 log-softmax, saved) + 8V (two fp32 gradients in its backward) + bV (the
               logits, which esft train's output object holds until backward is done)

ESFT freezes everything before the first trained expert, so no gradient flows there: earlier
layers save nothing, and the first trained layer saves only its trained pairs (K*s*b*(2H + 4I)).
With gradient checkpointing each layer keeps only its input (b*H per token), and in backward one
layer at a time is recomputed: the peak is the logits + the larger of the loss's own tensors and
the largest layer's saved activations times 1.3 (the gradients of its intermediate tensors while
its backward runs; 1.3 is what CPU runs of two model shapes measured, see the test). Gradients:
backward writes model-dtype gradients that ``MasterWeights.accumulate`` moves into the fp32 ones
tensor by tensor, so only the fp32 ones are counted (with grad_accum > 1 both exist: add T * b).
Not modelled: the CUDA context, NCCL buffers, allocator fragmentation, AdamW's foreach temporaries
during the step, and routing imbalance: ``margin`` (default 10% of the GPU) is left for them.
Full fine-tuning is estimated for plain FSDP2 (everything trains, everything sharded 1/N); esft
train refuses method=full under torchrun for now, so that row is for comparison.

``tests/test_plan.py`` checks weights, masters, gradients and optimizer state against the tensors
of a real training step (exact), and the activation estimate against what autograd saves and the
peak RSS growth of a CPU forward + backward.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_EXPERT_SHARE = 0.075  # the reference intent config: 124 of 1664 routed experts of V2-Lite


@dataclass
class PlanConfig:
    """One training layout to estimate. Memory sizes in GiB (2**30 bytes)."""

    model: str  # checkpoint directory (its config.json), or a published name (see models/published.py)
    gpus: int = 8  # processes, one per GPU
    gpu_memory_gib: float = 80.0
    fsdp_size: int = 0  # 0 = all processes (the only layout esft train runs)
    ep_size: int = 1  # expert parallelism: divides gpus and the routed experts per layer
    dtype: str = "bfloat16"  # model dtype: bfloat16, float16, float32 (bf16/fp16/fp32 accepted)
    method: str = "esft"  # esft or full
    expert_config: str | None = None  # ESFT: expert_cfg.json from `esft select`
    expert_share: float | None = None  # ESFT without an expert config: share of routed experts per MoE layer
    micro_batch: int = 1  # packed sequences per rank per forward (esft train's batch_size / processes)
    seq_len: int = 4096
    gradient_checkpointing: bool = False
    margin: float = 0.10  # share of GPU memory left for what is not modelled (CUDA context, NCCL, fragmentation)

    def __post_init__(self):
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.method not in ("esft", "full"):
            raise ValueError(f"method must be esft or full, got {self.method!r}")
        for name in ("gpus", "micro_batch", "seq_len", "ep_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpu_memory_gib <= 0:
            raise ValueError(f"gpu memory must be > 0 GiB, got {self.gpu_memory_gib}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if self.method == "esft":
            if self.expert_config and self.expert_share is not None:
                raise ValueError("give either an expert config or an expert share, not both")
            if not self.expert_config and self.expert_share is None:
                self.expert_share = DEFAULT_EXPERT_SHARE
            if self.expert_share is not None and not 0 < self.expert_share <= 1:
                raise ValueError(f"expert share must be in (0, 1], got {self.expert_share}")
        elif self.expert_config or self.expert_share is not None:
            raise ValueError("an expert config / expert share is for method=esft (full fine-tuning trains everything)")
        check_layout(self.gpus, self.fsdp_size, self.ep_size)


def check_layout(gpus: int, fsdp_size: int, ep_size: int) -> None:
    """The layout rules of ``esft train`` under torchrun (``training/distributed.check_layout``)."""
    fsdp = fsdp_size or gpus
    if fsdp != gpus:
        raise ValueError(f"fsdp_size={fsdp_size} does not match the {gpus} GPUs: ESFT shards the frozen model over "
                         f"all processes (leave fsdp_size unset, or {gpus})")
    if gpus % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of GPUs ({gpus})")


# ----------------------------------------------------------------------------------------- model shapes


@dataclass
class Attention:
    """Per-token attention sizes. MLA (DeepSeek): latent ranks > 0; standard: q_lora = kv_lora = 0."""

    heads: int
    qk_head: int  # query/key width per head
    v_head: int  # value width per head
    q_lora: int = 0
    kv_lora: int = 0


@dataclass
class Layer:
    """One decoder layer: parameter counts (elements) and its MLP's widths."""

    index: int
    params: int  # every parameter of the layer
    expert_params: int = 0  # of which the fused routed experts (all E)
    dense_width: int = 0  # dense MLP intermediate size (0 in an MoE layer)
    experts: int = 0  # routed experts E (0 in a dense layer)
    expert_width: int = 0  # one routed expert's intermediate size I
    expert_size: int = 0  # elements of one routed expert (3 * H * I)
    top_k: int = 0
    shared_width: int = 0  # shared experts' total intermediate size
    shared_params: int = 0


@dataclass
class ModelShape:
    name: str
    model_type: str
    params: int  # all parameters (elements)
    hidden: int
    vocab: int
    lm_head: int  # elements of the output projection
    attention: Attention
    layers: list[Layer] = field(default_factory=list)

    @property
    def moe_layers(self) -> list[Layer]:
        return [l for l in self.layers if l.experts]

    @property
    def routed_experts(self) -> int:
        return sum(l.experts for l in self.moe_layers)


def load_config(model: str):
    """A transformers config: a published name (models/published.py) or a directory with config.json."""
    from transformers import AutoConfig

    from .models.published import PUBLISHED, published_config

    if model in PUBLISHED:
        return published_config(model)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model}: no config.json there, and not a published model "
                                f"({', '.join(PUBLISHED)})")
    return AutoConfig.from_pretrained(str(path))


def meta_model(config):
    """The model of ``config`` on the meta device: every parameter has its shape, none has storage."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _width(module) -> int:
    """Intermediate size of a SwiGLU MLP module (its up projection's output features), 0 if none."""
    up = getattr(module, "up_proj", None)
    return int(up.weight.shape[0]) if up is not None else 0


def _attention(config) -> Attention:
    heads = int(config.num_attention_heads)
    if getattr(config, "kv_lora_rank", None):  # MLA (DeepSeek-V2/V3)
        return Attention(heads=heads, qk_head=int(config.qk_nope_head_dim + config.qk_rope_head_dim),
                         v_head=int(config.v_head_dim), q_lora=int(config.q_lora_rank or 0),
                         kv_lora=int(config.kv_lora_rank))
    head = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return Attention(heads=heads, qk_head=head, v_head=head)


def model_shape(model, name: str = "") -> ModelShape:
    """Parameter counts and widths of a (meta or real) model, per decoder layer."""
    from .models.registry import _getattr_path, base_experts, get_family, moe_layers

    family = get_family(model)
    config = model.config
    moe = {l.index: l for l in moe_layers(model)}
    layers = []
    for i, layer in enumerate(_getattr_path(model, family.layers_path)):
        params = sum(p.numel() for p in layer.parameters())
        if i not in moe:
            layers.append(Layer(i, params, dense_width=_width(getattr(layer, family.moe_attr))))
            continue
        l = moe[i]
        ex = base_experts(l.experts)
        expert_params = ex.gate_up_proj.numel() + ex.down_proj.numel()
        layers.append(Layer(
            i, params, expert_params=expert_params, experts=l.num_experts,
            expert_width=int(ex.gate_up_proj.shape[1]) // 2, expert_size=expert_params // l.num_experts,
            top_k=l.top_k, shared_width=sum(_width(m) for _, m in l.shared),
            shared_params=sum(p.numel() for _, m in l.shared for p in m.parameters())))
    head = model.get_output_embeddings()
    return ModelShape(name=name or getattr(config, "_name_or_path", "") or config.model_type,
                      model_type=config.model_type, params=sum(p.numel() for p in model.parameters()),
                      hidden=int(config.hidden_size), vocab=int(config.vocab_size),
                      lm_head=head.weight.numel() if head is not None else 0,
                      attention=_attention(config), layers=layers)


# ----------------------------------------------------------------------------------------- what trains


@dataclass
class Trainable:
    """What trains: elements T, and per layer the share s of routed experts that train."""

    params: int
    expert_share: dict[int, float]  # layer index -> selected / E (1.0 everywhere for full fine-tuning)
    selected_experts: int  # routed experts that train, over all layers
    shared: bool  # shared experts train
    non_expert: bool  # attention, norms, routers, embeddings, LM head train

    @property
    def first_layer(self) -> int:
        """Index of the first layer with anything trainable (gradients flow from there on)."""
        if self.non_expert:
            return 0
        trained = [i for i, s in self.expert_share.items() if s > 0]
        return min(trained) if trained else math.inf


def trainable(shape: ModelShape, cfg: PlanConfig, expert_cfg: dict | None = None) -> Trainable:
    """Full fine-tuning: everything. ESFT: the experts of ``expert_cfg`` (int layer keys), or ``expert_share``
    of each MoE layer's experts (rounded, at least one)."""
    if cfg.method == "full":
        return Trainable(shape.params, {l.index: 1.0 for l in shape.moe_layers}, shape.routed_experts, True, True)
    moe = {l.index: l for l in shape.moe_layers}
    if expert_cfg is not None:
        counts = {i: len(expert_cfg["experts"].get(i, [])) for i in moe}
        shared, non_expert = bool(expert_cfg.get("shared_experts")), bool(expert_cfg.get("non_expert_modules"))
    else:
        counts = {i: max(1, round(cfg.expert_share * l.experts)) for i, l in moe.items()}
        shared = non_expert = False
    params = sum(counts[i] * l.expert_size for i, l in moe.items())
    if shared:
        params += sum(l.shared_params for l in moe.values())
    if non_expert:  # everything but the routed experts (the paper's Table 3 ablation)
        params += shape.params - sum(l.expert_params for l in moe.values())
    return Trainable(params, {i: counts[i] / l.experts for i, l in moe.items()}, sum(counts.values()),
                     shared, non_expert)


# ----------------------------------------------------------------------------------------- activations


def layer_activation_bytes(shape: ModelShape, layer: Layer, b: int, tr: Trainable) -> float:
    """Bytes per token that ``layer`` saves for backward (the formula in the module docstring)."""
    if layer.index < tr.first_layer:
        return 0.0  # no gradient flows through layers before the first trained one
    H, a = shape.hidden, shape.attention
    s = tr.expert_share.get(layer.index, 0.0)
    if layer.index == tr.first_layer and not tr.non_expert:
        # Its input needs no gradient: only the trained experts' pairs (and trained shared experts) save.
        out = layer.top_k * s * b * (2 * H + 4 * layer.expert_width)
        return out + (b * (2 * H + 4 * layer.shared_width) if tr.shared else 0.0)
    nx = tr.non_expert  # attention, norms, routers and dense MLPs train
    attn = 4 * H + b * a.heads * (2 * a.qk_head + 2 * a.v_head) + 4 * (a.kv_lora + a.q_lora)
    if nx:
        attn += b * (2 * H + 2 * a.kv_lora + 2 * a.q_lora + a.heads * a.v_head)
    mlp = 4 * H + (b * H if nx else 0)  # post-attention norm
    if not layer.experts:
        mlp += 3 * b * layer.dense_width + (b * (H + layer.dense_width) if nx else 0)
    else:
        mlp += 4 * layer.experts + (4 * H if nx else 0)  # router softmax (+ its fp32 input when it trains)
        mlp += layer.top_k * b * (H + 3 * layer.expert_width)
        mlp += layer.top_k * s * b * (H + layer.expert_width)
        mlp += 3 * b * layer.shared_width + (b * (H + layer.shared_width) if tr.shared else 0)
    return attn + mlp


def loss_activation_bytes(shape: ModelShape, b: int) -> float:
    """Bytes per token of the loss: fp32 log-softmax saved, two fp32 gradients in backward, the logits."""
    return (12 + b) * shape.vocab


RECOMPUTE_FACTOR = 1.3  # a recomputed layer's peak in backward / its saved activations (measured on CPU)


def activation_bytes(shape: ModelShape, cfg: PlanConfig, tr: Trainable) -> float:
    """Peak activation bytes per rank for one micro-batch (micro_batch x seq_len tokens)."""
    b = DTYPE_BYTES[cfg.dtype]
    per_layer = [layer_activation_bytes(shape, l, b, tr) for l in shape.layers]
    logits = b * shape.vocab  # held by the caller's output object until backward ends
    loss = loss_activation_bytes(shape, b) - logits  # the loss's own tensors, gone once its backward is done
    if cfg.gradient_checkpointing:
        kept = sum(b * shape.hidden for l in shape.layers if l.index >= tr.first_layer)  # layer inputs
        # Backward first runs the loss, then recomputes one layer at a time (its saved tensors plus
        # the gradients of its intermediates: x RECOMPUTE_FACTOR); the two never overlap.
        per_token = kept + logits + max(loss, RECOMPUTE_FACTOR * max(per_layer, default=0.0))
    else:  # every layer's saved tensors are alive when the loss's backward starts
        per_token = sum(per_layer) + logits + loss
    return cfg.micro_batch * cfg.seq_len * per_token


# ----------------------------------------------------------------------------------------- the plan

COMPONENTS = ("weights", "fp32 masters", "gradients", "optimizer state", "activations", "transient gathered layer")


def routed_trainable(shape: ModelShape, tr: Trainable) -> dict[int, float]:
    """Elements of each MoE layer's trainable copy of its selected routed experts (ESFT)."""
    return {l.index: tr.expert_share.get(l.index, 0.0) * l.experts * l.expert_size for l in shape.moe_layers}


def transient_bytes(shape: ModelShape, cfg: PlanConfig, tr: Trainable, gpus: int) -> float:
    """FSDP2's unsharded tensors alive at once: the largest layer (its experts / ep_size) + the LM head; ESFT:
    + the largest layer's gathered trainable copy with its gradient (see the module docstring)."""
    if gpus == 1:
        return 0.0
    b = DTYPE_BYTES[cfg.dtype]
    layer = max((l.params - l.expert_params + l.expert_params / cfg.ep_size for l in shape.layers), default=0)
    gathered = (layer + shape.lm_head) * b
    if cfg.method == "full":
        return gathered * 2  # + the layer's unsharded gradient
    copy = max(routed_trainable(shape, tr).values(), default=0.0)
    return gathered + copy * (2 * b + (4 if b != 4 else 0))


def per_rank_bytes(shape: ModelShape, cfg: PlanConfig, tr: Trainable, gpus: int) -> dict[str, float]:
    """Bytes per rank by component (see COMPONENTS) for ``gpus`` processes, and their total."""
    b = DTYPE_BYTES[cfg.dtype]
    master = 4 if cfg.dtype != "float32" else 0  # an fp32 tensor is its own master
    if cfg.method == "full":  # everything trains and everything is sharded 1/N
        P = shape.params / gpus
        out = {"weights": P * b, "fp32 masters": P * master, "gradients": P * 4, "optimizer state": P * 8}
    elif gpus == 1:  # one process: the trainable copy is a plain tensor in the model's dtype + its fp32 master
        T, Tr = tr.params, sum(routed_trainable(shape, tr).values())
        out = {"weights": shape.params * b + Tr * b, "fp32 masters": T * master, "gradients": T * 4,
               "optimizer state": T * 8}
    else:  # torchrun: frozen model and trainable copy both sharded 1/N; the routed copy's fp32 shards are masters
        T, Tr = tr.params, sum(routed_trainable(shape, tr).values())
        out = {"weights": (shape.params * b + (Tr * 4 if b == 4 else 0)) / gpus, "fp32 masters": T * master / gpus,
               "gradients": T * 4 / gpus, "optimizer state": T * 8 / gpus}
    out["activations"] = activation_bytes(shape, cfg, tr)
    out["transient gathered layer"] = transient_bytes(shape, cfg, tr, gpus)
    out["total"] = sum(out[c] for c in COMPONENTS)
    return out


@dataclass
class Plan:
    config: PlanConfig
    shape: ModelShape
    trainable: Trainable
    bytes: dict[str, float]  # per rank, by component, for config.gpus
    usable_bytes: float  # GPU memory less the margin
    fits: bool
    min_gpus: int | None  # smallest number of GPUs of this memory that fits (None: none does)
    min_gpus_note: str = ""

    def to_dict(self) -> dict:
        return {
            "model": self.shape.name, "model_type": self.shape.model_type, "config": asdict(self.config),
            "params": self.shape.params, "trainable_params": self.trainable.params,
            "trainable_share": self.trainable.params / self.shape.params,
            "selected_experts": self.trainable.selected_experts, "routed_experts": self.shape.routed_experts,
            "per_rank_bytes": {k: int(v) for k, v in self.bytes.items()},
            "per_rank_gib": {k: round(v / GIB, 3) for k, v in self.bytes.items()},
            "usable_gib": round(self.usable_bytes / GIB, 3), "fits": self.fits, "min_gpus": self.min_gpus,
            "min_gpus_note": self.min_gpus_note,
        }


def smallest_fit(shape: ModelShape, cfg: PlanConfig, tr: Trainable, usable: float) -> tuple[int | None, str]:
    """The fewest GPUs (a multiple of ep_size; same dtype, method, per-rank batch) whose per-rank total fits."""
    def total(n: float) -> float:
        return per_rank_bytes(shape, cfg, tr, n)["total"]

    # Per-rank memory falls with N toward what does not shard (activations, the gathered layer): if that
    # does not fit, nothing does.
    floor = total(math.inf)
    if floor > usable:
        return None, (f"none: a rank needs at least {floor / GIB:.1f} GiB however many GPUs share the model "
                      "(activations, the gathered layer): use gradient checkpointing or shorter sequences")
    hi = 1  # in units of ep_size; total(n) falls as n grows: double, then bisect
    while total(hi * cfg.ep_size) > usable:
        hi *= 2
    lo = hi // 2  # lo == 0 or total(lo * ep) > usable
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(mid * cfg.ep_size) > usable:
            lo = mid
        else:
            hi = mid
    return hi * cfg.ep_size, ""


def check_experts(shape: ModelShape, ep_size: int) -> None:
    """Expert parallelism splits every MoE layer's routed experts evenly over the ep ranks."""
    bad = sorted({l.experts for l in shape.moe_layers if l.experts % ep_size})
    if bad:
        raise ValueError(f"ep_size={ep_size} does not divide the model's {bad[0]} routed experts per layer")


def make_plan(cfg: PlanConfig) -> Plan:
    """Estimate per-rank memory of ``cfg`` (builds the model on the meta device; reads no weights)."""
    from .models.registry import get_family

    config = load_config(cfg.model)
    get_family(config)  # a clear error for a model type that is not a supported MoE family
    model = meta_model(config)
    shape = model_shape(model, name=cfg.model)
    check_experts(shape, cfg.ep_size)
    expert_cfg = None
    if cfg.method == "esft" and cfg.expert_config:
        from .selection.select import read_expert_config
        from .training.experts import validate_expert_cfg

        expert_cfg = read_expert_config(cfg.expert_config)
        validate_expert_cfg(model, expert_cfg, source=cfg.expert_config)  # a layer/expert the model lacks
    tr = trainable(shape, cfg, expert_cfg)
    usable = cfg.gpu_memory_gib * GIB * (1 - cfg.margin)
    by = per_rank_bytes(shape, cfg, tr, cfg.gpus)
    n, note = smallest_fit(shape, cfg, tr, usable)
    return Plan(cfg, shape, tr, by, usable, by["total"] <= usable, n, note)


# ----------------------------------------------------------------------------------------- output


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def describe(plan: Plan) -> str:
    """One line: model, method, layout."""
    c, t = plan.config, plan.trainable
    what = ("full fine-tuning" if c.method == "full" else
            f"ESFT, {t.selected_experts} of {plan.shape.routed_experts} routed experts "
            f"({t.selected_experts / max(plan.shape.routed_experts, 1):.1%})")
    return (f"{plan.shape.name}: {plan.shape.params / 1e9:.2f}B parameters, {what}, {t.params / 1e9:.3g}B trainable; "
            f"{c.gpus} x {c.gpu_memory_gib:g} GiB, fsdp {c.fsdp_size or c.gpus}, ep {c.ep_size}, {c.dtype}, "
            f"micro-batch {c.micro_batch} x {c.seq_len}, gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}")


def verdict(plan: Plan) -> str:
    c = plan.config
    usable = f"{gib(plan.usable_bytes)} GiB usable ({c.margin:.0%} of {c.gpu_memory_gib:g} GiB left as margin)"
    fits = ("fits" if plan.fits else "does NOT fit") + f" in {usable}"
    least = (f"{plan.min_gpus} GPU{'s' if plan.min_gpus > 1 else ''}" if plan.min_gpus else plan.min_gpus_note)
    least = f"fewest GPUs of {c.gpu_memory_gib:g} GiB that fit: {least}"
    return f"{fits}; {least}"


def to_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)


def table_rows(plan: Plan) -> list[list[str]]:
    """[component, GiB per rank, how it is counted] for each component and the total."""
    c, t = plan.config, plan.trainable
    n, b = c.gpus, DTYPE_BYTES[c.dtype]
    T = f"{t.params / 1e9:.3g}B trainable"
    if c.method == "full":
        how = {"weights": f"all parameters x {b} B / {n}",
               "fp32 masters": f"all parameters x 4 B / {n}" if c.dtype != "float32" else "none: fp32 weights are their own",
               "gradients": f"fp32, all parameters x 4 B / {n}",
               "optimizer state": f"AdamW, all parameters x 8 B / {n}"}
    elif n == 1:
        how = {"weights": f"all parameters x {b} B + the selected experts' copy x {b} B",
               "fp32 masters": f"{T} x 4 B" if c.dtype != "float32" else "none: fp32 weights are their own",
               "gradients": f"fp32, {T} x 4 B", "optimizer state": f"AdamW, {T} x 8 B"}
    else:
        how = {"weights": f"all parameters x {b} B / {n}" + (" + the selected experts' copy x 4 B / {n}"
                                                               if c.dtype == "float32" else ""),
               "fp32 masters": f"{T} x 4 B / {n} (the trainable copy's fp32 shards)" if c.dtype != "float32"
               else "none: fp32 weights are their own",
               "gradients": f"fp32, {T} x 4 B / {n}", "optimizer state": f"AdamW, {T} x 8 B / {n}"}
    how["activations"] = (f"{c.micro_batch} x {c.seq_len} tokens, "
                          + ("checkpointed: layer inputs + one recomputed layer" if c.gradient_checkpointing
                             else "every layer's saved tensors") + " + loss")
    how["transient gathered layer"] = ("none: one process, nothing sharded" if n == 1 else
                                       "largest layer (experts / ep_size) + LM head, unsharded"
                                       + (", x2 with its gradient" if c.method == "full" else
                                          "; + its trainable copy gathered, with its gradient"))
    rows = [[k, gib(plan.bytes[k]), how[k]] for k in COMPONENTS]
    rows.append(["total", gib(plan.bytes["total"]), f"of {gib(plan.usable_bytes)} GiB usable"])
    return rows
