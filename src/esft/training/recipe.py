"""The training recipe: a plain, linear loop (no trainer framework).

    load model -> freeze all but the plan's tensors -> pack data -> AdamW over the plan ->
    [micro-batches -> backward -> clip -> step] x steps, with validation, checkpoints, resume

Output directory:

    config.yaml            the exact config used
    checkpoints/step-N/    resumable state: trainable tensors, optimizer, step (atomic, newest kept)
    adapter/               best adapter by validation loss (esft), atomic
    last/                  adapter (esft) or full checkpoint (full) after the last step
    tb/                    TensorBoard logs
    train_log.jsonl        one line per logged step / evaluation
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapter.fingerprint import model_fingerprint
from ..adapter.io import save_adapter
from ..config import to_yaml
from ..data.conversations import load_examples
from ..data.packing import Packed, pack
from ..io import DataError, atomic_dir, write_json_atomic
from ..models.loading import load_model
from ..selection.select import read_expert_config
from .config import TrainConfig
from .experts import TrainablePlan, apply_esft

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    train_loss: float
    best_valid_loss: float | None
    trainable_params: int
    optimizer_state_bytes: int
    seconds: float
    adapter_dir: str | None
    best_dir: str | None = None  # what to evaluate: best-by-validation adapter (esft, lora) or checkpoint (full)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=True)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)


def full_plan(model: nn.Module) -> dict[str, nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(True)
    return dict(model.named_parameters())


ATTENTION_PROJ = r".*\.self_attn\.(q_proj|q_a_proj|q_b_proj|k_proj|v_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"


def lora_wrap(model: nn.Module, cfg: TrainConfig):
    """The paper's LoRA baseline via PEFT: rank r on attention projections and on the fused expert tensors."""
    from peft import LoraConfig, get_peft_model

    from ..models.registry import get_family

    fam = get_family(model)
    targets = [f"{fam.moe_attr}.{fam.experts_attr}.gate_up_proj", f"{fam.moe_attr}.{fam.experts_attr}.down_proj"]
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=ATTENTION_PROJ,
                      target_parameters=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def _split_valid(train: Packed, fraction: float, seed: int) -> tuple[Packed, Packed | None]:
    n = len(train)
    k = int(round(n * fraction))
    if fraction <= 0 or k == 0 or n - k < 1:
        return train, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    vi, ti = perm[:k].sort().values, perm[k:].sort().values
    sub = lambda idx: Packed(train.input_ids[idx], train.labels[idx], train.attention_mask[idx], train.stats)  # noqa: E731
    return sub(ti), sub(vi)


def batch_rows(n_rows: int, step: int, micro: int, batch_size: int, grad_accum: int, seed: int) -> torch.Tensor:
    """Row indices of one micro-batch; a pure function of the position, so a resumed run sees the same data."""
    start = (step * grad_accum + micro) * batch_size
    rows = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(perm[i]))
    return torch.tensor(rows)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: Packed, batch_size: int, device: str) -> float:
    """Token-weighted mean loss over all label tokens of ``data``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids = data.input_ids[i:i + batch_size].to(device)
        lab = data.labels[i:i + batch_size].to(device)
        att = data.attention_mask[i:i + batch_size].to(device)
        n = int((lab[:, 1:] != -100).sum())
        if n == 0:
            continue
        out = model(input_ids=ids, attention_mask=att, labels=lab, use_cache=False)
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / count if count else math.nan


def _checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    if not d.exists():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith("step-")), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, step: int, params: dict[str, nn.Parameter], opt, state: dict, keep: int) -> None:
    with atomic_dir(out / "checkpoints" / f"step-{step}") as tmp:
        torch.save({n: p.detach().cpu() for n, p in params.items()}, tmp / "trainable.pt")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", {**state, "step": step})
    for old in _checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, params: dict[str, nn.Parameter], opt) -> dict:
    tensors = torch.load(ckpt / "trainable.pt", map_location="cpu")
    missing = set(params) - set(tensors)
    extra = set(tensors) - set(params)
    if missing or extra:
        raise DataError(f"{ckpt}: checkpoint does not match this run's trainable tensors "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu"))
    return json.loads((ckpt / "state.json").read_text())


def prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        if cfg.resume:
            return out
        if not cfg.overwrite:
            raise FileExistsError(f"{out} exists and is not empty: pass overwrite=true to replace it "
                                  f"or resume=true to continue its training")
        shutil.rmtree(out)
    elif cfg.resume:
        log.warning("resume=true but %s holds no run yet: starting fresh", out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_data(cfg: TrainConfig, tokenizer) -> tuple[Packed, Packed | None]:
    train_ex = load_examples(cfg.train_data, tokenizer, cfg.template)
    train = pack(train_ex, cfg.seq_len, tokenizer.pad_token_id, cfg.overlong)
    if len(train) == 0:
        raise DataError(f"{cfg.train_data}: no example left after dropping over-long ones ({train.stats.describe()})")
    if cfg.valid_data:
        valid = pack(load_examples(cfg.valid_data, tokenizer, cfg.template), cfg.seq_len, tokenizer.pad_token_id,
                     cfg.overlong)
        if len(valid) == 0 or valid.stats.label_tokens == 0:
            raise DataError(f"{cfg.valid_data}: no validation tokens left to score ({valid.stats.describe()})")
    else:
        train, valid = _split_valid(train, cfg.valid_fraction, cfg.seed)
    return train, valid


def train(cfg: TrainConfig, model=None, tokenizer=None, progress: bool = True) -> TrainResult:
    """Run the recipe. ``model``/``tokenizer`` may be passed in (tests, benchmarks) instead of loaded."""
    from tqdm.auto import tqdm

    out = prepare_output_dir(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    device = str(next(model.parameters()).device)
    base_fp = model_fingerprint(model)

    plan: TrainablePlan | None = None
    if cfg.method == "esft":
        expert_cfg = read_expert_config(cfg.expert_config)
        plan = apply_esft(model, expert_cfg)  # validates layers/experts before anything trains
        params = dict(plan.params)
    elif cfg.method == "lora":
        model = lora_wrap(model, cfg)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        params = full_plan(model)
    train_data, valid_data = load_data(cfg, tokenizer)
    log.info("train data: %s", train_data.stats.describe())
    (out / "config.yaml").write_text(to_yaml(cfg))

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    opt = make_optimizer(list(params.values()), cfg)

    def lr_at(step: int) -> float:  # linear warmup, then constant (the paper's schedule)
        return cfg.lr * (min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)

    start, best = 0, math.inf
    state = {"best_valid_loss": None, "base_model": base_fp}
    ckpts = _checkpoints(out) if cfg.resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], params, opt)
        if state.get("base_model") != base_fp and not cfg.allow_other_base:
            raise DataError(f"{ckpts[-1]}: checkpoint was made from another base model "
                            f"({state.get('base_model')} vs {base_fp})")
        start = state["step"]
        best = state["best_valid_loss"] if state.get("best_valid_loss") is not None else math.inf
        # An eval after the last checkpoint may have written a better adapter/ before the crash.
        saved = out / "adapter" / "esft_adapter.json"
        if saved.exists():
            best = min(best, json.loads(saved.read_text()).get("valid_loss") or math.inf)
        log.info("resumed from %s at step %d", ckpts[-1], start)

    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"), purge_step=start or None)
    log_file = open(out / "train_log.jsonl", "a")
    meta = {"method": cfg.method, "train_config": asdict(cfg)}

    def save_best(step: int):
        if plan is not None:
            save_adapter(plan, out / "adapter", base_fp, {**meta, "step": step, "valid_loss": best})
        elif cfg.method == "lora":
            with atomic_dir(out / "adapter") as tmp:
                model.save_pretrained(str(tmp))
        else:  # full fine-tuning keeps its best whole checkpoint, as the others keep their best adapter
            with atomic_dir(out / "best") as tmp:
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))

    model.train()
    t0 = time.perf_counter()
    loss_ema, last_loss = None, float("nan")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train ({cfg.method})",
               disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            step_loss = 0.0
            micro_rows = [batch_rows(len(train_data), step, m, cfg.batch_size, cfg.grad_accum, cfg.seed)
                          for m in range(cfg.grad_accum)]
            # Token-weighted mean over the whole step: each micro-batch's summed loss is divided by the
            # step's total number of predicted tokens, so accumulation equals one big batch.
            n_items = sum(int((train_data.labels[r][:, 1:] != -100).sum()) for r in micro_rows)
            for rows in micro_rows:
                out_ = model(input_ids=train_data.input_ids[rows].to(device),
                             attention_mask=train_data.attention_mask[rows].to(device),
                             labels=train_data.labels[rows].to(device), use_cache=False,
                             num_items_in_batch=torch.tensor(max(n_items, 1), device=device))
                out_.loss.backward()
                step_loss += float(out_.loss.detach())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            last_loss = step_loss
            loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
            done = step + 1
            bar.set_postfix(loss=f"{loss_ema:.4f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = {"step": done, "loss": step_loss, "lr": lr_at(step)}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                if writer:
                    writer.add_scalar("train/loss", step_loss, done)
            if valid_data is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                vloss = evaluate_loss(model, valid_data, cfg.batch_size, device)
                log_file.write(json.dumps({"step": done, "valid_loss": vloss}) + "\n")
                log_file.flush()
                if writer:
                    writer.add_scalar("valid/loss", vloss, done)
                if vloss < best:  # NaN (nothing to score) never counts as best
                    best = vloss
                    save_best(done)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                state["best_valid_loss"] = None if best == math.inf else best
                save_checkpoint(out, done, params, opt, state, cfg.keep_checkpoints)
    finally:
        bar.close()
        log_file.close()
        if writer:
            writer.close()

    adapter_dir = None
    if plan is not None:
        save_adapter(plan, out / "last", base_fp, {**meta, "step": cfg.steps})
        if valid_data is None:
            save_adapter(plan, out / "adapter", base_fp, {**meta, "step": cfg.steps})
        adapter_dir = str(out / "adapter")
    else:  # full: a whole checkpoint; lora: the PEFT adapter directory
        with atomic_dir(out / "last") as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        if cfg.method == "lora":
            if valid_data is None:
                with atomic_dir(out / "adapter") as tmp:
                    model.save_pretrained(str(tmp))
            adapter_dir = str(out / "adapter")
    return TrainResult(
        output_dir=str(out), steps=cfg.steps, train_loss=last_loss,
        best_valid_loss=None if best == math.inf else best,
        trainable_params=sum(p.numel() for p in params.values()),
        optimizer_state_bytes=optimizer_state_bytes(opt), seconds=time.perf_counter() - t0,
        adapter_dir=adapter_dir,
        best_dir=adapter_dir if cfg.method != "full" else str(out / ("best" if (out / "best").exists() else "last")),
    )
