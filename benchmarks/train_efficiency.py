#!/usr/bin/env python
"""Training-efficiency benchmark: ESFT against full fine-tuning (FFT) on one small MoE model.

What it measures, on ONE small random DeepSeek-V2-style model (built here with
``AutoConfig.for_model("deepseek_v2", ...)``; routers initialised N(0, --router-std) so routing
depends on the input, as in a trained model) and the SAME packed toy-task data and batches:

1. Routing profiling speed: ``profile_routing`` (router hooks + ESFT score accumulation) against
   a plain ``torch.no_grad()`` forward over the very same batches. Both passes are warmed up, then
   run interleaved ``--profile-repeats`` times (alternating which goes first); the best pass of
   each is the headline figure (medians are reported too).
2. Expert selection with ESFT-Token, top_p (default 0.2), exactly as ``esft select`` does.
3. Training-step time: forward + backward + gradient clipping + AdamW step + zero_grad, for ESFT
   (a fresh copy of the model with ``apply_esft``) and FFT (a fresh copy with ``full_plan``), on the
   same batches (``batch_rows``), ESFT and FFT steps interleaved so machine noise hits both alike.
   Warm-up steps are excluded; the median over the measured steps is reported, with a per-phase
   breakdown. Also: optimizer state bytes (``optimizer_state_bytes``) and trainable parameters.
4. On-disk size: the ESFT adapter (``save_adapter``) against the full model (``save_pretrained``),
   both written to a temporary directory that is removed afterwards.

It prints a table with each figure, the ESFT/FFT ratio and the targets (ESFT step time <= 0.6x
FFT, optimizer state <= 10% of FFT, adapter <= 10% of the full checkpoint, profiling >= 90% of
plain forward speed), each marked met or missed. The LAST line of stdout is one JSON object with
every figure, for scripts.

Run it (about 2-4 minutes on a 2-core CPU with the defaults):

    .venv/bin/python benchmarks/train_efficiency.py
    .venv/bin/python benchmarks/train_efficiency.py --help
    .venv/bin/python benchmarks/train_efficiency.py --op-profile 12   # + top ops per step (torch.profiler)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TARGETS = {
    "step_time": 0.6,  # ESFT step time <= 0.6 x FFT
    "optimizer_state": 0.10,  # ESFT optimizer state <= 10% of FFT
    "adapter_size": 0.10,  # adapter <= 10% of the full checkpoint
    "profile_speed": 0.90,  # profiling >= 90% of plain forward tokens/s
}


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def add_model_args(m):
    """The random DeepSeek-V2-style model's shape options (``build`` reads them); shared with benchmarks/distributed.py."""
    m.add_argument("--hidden", type=int, default=256, help="hidden size")
    m.add_argument("--layers", type=int, default=4, help="number of decoder layers")
    m.add_argument("--first-dense", type=int, default=1,
                   help="first_k_dense_replace: how many leading layers use a dense MLP instead of MoE")
    m.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer (n_routed_experts)")
    m.add_argument("--top-k", type=int, default=6, help="routed experts per token (num_experts_per_tok)")
    m.add_argument("--shared-experts", type=int, default=2, help="shared experts per MoE layer (n_shared_experts)")
    m.add_argument("--moe-intermediate", type=int, default=128, help="intermediate size of one routed expert")
    m.add_argument("--dense-intermediate", type=int, default=512, help="intermediate size of the dense MLP layers")
    m.add_argument("--heads", type=int, default=4,
                   help="attention heads (num_key_value_heads is set equal, as deepseek_v2 needs)")
    m.add_argument("--vocab", type=int, default=512, help="vocabulary size of the BPE tokenizer trained on the toy task")
    m.add_argument("--router-std", type=float, default=0.5,
                   help="std of the normal init of router weights (0 keeps transformers' init: near-uniform routing)")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model dtype for both methods (bfloat16: fp32 master weights and AdamW state, as the recipe)")
    return m


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark ESFT against full fine-tuning on one small DeepSeek-V2-style MoE model: routing "
                    "profiling speed, training-step time, optimizer state, trainable parameters and on-disk size. "
                    "Prints a table and, as the last line of stdout, one JSON object.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = add_model_args(p.add_argument_group("model (random DeepSeek-V2-style MoE)"))
    m.add_argument("--experts-impl", choices=["default", "grouped_mm", "batched_mm", "eager"], default="default",
                   help="transformers experts implementation for both methods (default: what transformers picks, grouped_mm in 5.x; batched_mm is very slow on CPU)")
    d = p.add_argument_group("data and batches")
    d.add_argument("--examples", type=int, default=2000, help="toy-task conversations (reverse a list of words)")
    d.add_argument("--seq-len", type=int, default=512, help="packed sequence length in tokens")
    d.add_argument("--batch-size", type=int, default=4, help="packed sequences per batch (profiling and training)")
    d.add_argument("--profile-batches", type=int, default=8,
                   help="batches profiled per pass (token budget = this x batch-size x seq-len)")
    d.add_argument("--profile-repeats", type=int, default=9,
                   help="interleaved timed passes of profile_routing and of the plain forward (after one warm-up each)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=100, help="timed training steps per method (median reported)")
    t.add_argument("--warmup-steps", type=int, default=3, help="untimed warm-up steps per method, run first")
    t.add_argument("--top-p", type=float, default=0.2, help="ESFT-Token top_p selection budget per layer")
    t.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (does not affect timing)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = no clipping)")
    t.add_argument("--lora-rank", type=int, default=8,
                   help="also time ESFT-LoRA (method=esft-lora: LoRA of this rank on the same selected experts), "
                        "interleaved after the ESFT and FFT steps; 0 = skip it")
    t.add_argument("--lora-alpha", type=int, default=16, help="ESFT-LoRA alpha")
    o = p.add_argument_group("run")
    o.add_argument("--seed", type=int, default=0, help="seed for data, weights and batch order")
    o.add_argument("--threads", type=int, default=default_threads(),
                   help="torch.set_num_threads (default: the cores this process may use)")
    o.add_argument("--op-profile", type=int, default=0, metavar="N",
                   help="also run torch.profiler over one ESFT and one FFT step and print the N ops with the "
                        "most self CPU time (0 = off)")
    o.add_argument("--keep-dir", default=None,
                   help="write the adapter and full checkpoint here and keep them (default: a temp dir, removed)")
    a = p.parse_args(argv)
    for name in ("hidden", "layers", "experts", "top_k", "moe_intermediate", "heads", "seq_len", "batch_size",
                 "profile_batches", "profile_repeats", "steps", "threads", "examples"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= a.first_dense < a.layers:
        p.error("--first-dense must be in [0, layers) so that at least one MoE layer exists")
    if a.top_k > a.experts:
        p.error("--top-k cannot exceed --experts")
    if not 0 < a.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if a.lora_rank < 0 or a.lora_alpha < 1:
        p.error("--lora-rank must be >= 0 and --lora-alpha >= 1")
    return a


# ---------------------------------------------------------------------------------------------- setup

def build(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from esft.models.tiny import toy_task, train_tokenizer

    rows = toy_task(args.examples, seed=args.seed)
    texts = [m["content"] for r in rows for m in r["messages"]] + ["User: \n\nAssistant:"] * 5
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    qk_rope, qk_nope = 16, 32
    cfg = AutoConfig.for_model(
        "deepseek_v2",
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.dense_intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq_len), first_k_dense_replace=args.first_dense,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_shared_experts=args.shared_experts,
        moe_intermediate_size=args.moe_intermediate, kv_lora_rank=64, q_lora_rank=None,
        qk_rope_head_dim=qk_rope, qk_nope_head_dim=qk_nope, v_head_dim=qk_rope + qk_nope,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, getattr(args, "dtype", "float32")))
    if args.experts_impl != "default":
        model.set_experts_implementation(args.experts_impl)
    if args.router_std > 0:
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if name.endswith("mlp.gate.weight") and prm.dim() == 2 and prm.shape[0] > 1:
                    prm.normal_(0, args.router_std)
    return model, tokenizer, rows


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------------------------- profiling

def bench_profiling(model, batches, repeats: int) -> dict:
    import torch

    from esft.profiling.profiler import profile_routing

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    @torch.no_grad()
    def plain():
        model.eval()
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def prof():
        return profile_routing(model, batches)

    result = prof()  # warm-up (and the profile used for selection)
    plain()
    t_prof, t_plain = [], []
    for r in range(repeats):
        order = [(prof, t_prof), (plain, t_plain)]
        for fn, acc in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return {
        "profile": result,
        "tokens": tokens,
        "profile_tokens_per_second": tokens / min(t_prof),
        "forward_tokens_per_second": tokens / min(t_plain),
        "profile_tokens_per_second_median": tokens / statistics.median(t_prof),
        "forward_tokens_per_second_median": tokens / statistics.median(t_plain),
    }


# -------------------------------------------------------------------------------------------- training

class Runner:
    """One method's model, trainable tensors and optimizer; ``step`` times one optimizer step by phase."""

    def __init__(self, name, model, params: list, lr: float, max_grad_norm: float):
        from esft.training.config import TrainConfig
        from esft.training.precision import MasterWeights
        from esft.training.recipe import make_optimizer

        self.name, self.model = name, model
        self.max_grad_norm = max_grad_norm
        # As the recipe does: fp32 masters for bf16 trainable tensors (none for an fp32 model).
        self.masters = MasterWeights({str(i): p for i, p in enumerate(params)})
        self.params = self.masters.parameters()
        cfg = TrainConfig(model="-", train_data="-", output_dir="-", method="full", lr=lr)
        self.opt = make_optimizer(self.params, cfg)
        self.times: list[dict] = []
        self.losses: list[float] = []
        model.train()

    def step(self, batch, record: bool) -> None:
        import torch

        t0 = time.perf_counter()
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False)
        t1 = time.perf_counter()
        out.loss.backward()
        self.masters.accumulate()
        t2 = time.perf_counter()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        t3 = time.perf_counter()
        self.opt.step()
        t4 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.masters.sync()
        t5 = time.perf_counter()
        self.losses.append(float(out.loss.detach()))
        if record:
            self.times.append({"forward": t1 - t0, "backward": t2 - t1, "clip": t3 - t2, "optimizer": t4 - t3,
                               "zero_grad": t5 - t4, "total": t5 - t0})

    def median(self, key: str) -> float:
        return statistics.median(t[key] for t in self.times)


def op_profile(runner: Runner, batch, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(batch, record=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console
    from rich.table import Table

    from esft.adapter.fingerprint import model_fingerprint
    from esft.adapter.io import save_adapter
    from esft.data.conversations import load_examples
    from esft.data.packing import pack
    from esft.models.registry import moe_layers
    from esft.models.tiny import write_jsonl
    from esft.profiling.run import profile_batches
    from esft.selection.select import SelectConfig, expert_config, select_experts
    from esft.training.experts import apply_esft
    from esft.training.recipe import batch_rows, full_plan, optimizer_state_bytes

    torch.set_num_threads(args.threads)
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 118, highlight=False)
    log = Console(file=sys.stderr, highlight=False)
    t_start = time.perf_counter()

    model, tokenizer, rows = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    layers = moe_layers(model)
    impl = model.config._experts_implementation
    log.print(f"[dim]model: {n_params / 1e6:.2f}M params, {len(layers)} MoE layers x {args.experts} experts "
              f"(top-{args.top_k}, {args.shared_experts} shared), experts impl {impl}, {args.threads} threads[/dim]")

    with tempfile.TemporaryDirectory(prefix="esft-bench-") as tmp_root:
        tmp = Path(tmp_root)
        data_path = write_jsonl(rows, tmp / "toy.jsonl")

        # 1. profiling vs plain forward, same batches
        budget = args.profile_batches * args.batch_size * args.seq_len
        pbatches, _ = profile_batches(str(data_path), tokenizer, args.seq_len, budget, args.batch_size)
        log.print(f"[dim]profiling: {len(pbatches)} batches x {args.profile_repeats} repeats ...[/dim]")
        prof = bench_profiling(model, pbatches, args.profile_repeats)

        # 2. selection: ESFT-Token, top_p
        scfg = SelectConfig(score_function="token", budget="top_p", top_p=args.top_p)
        scores = {l: dict(enumerate(row)) for l, row in prof["profile"].token_scores.items()}
        selected = select_experts(scores, scfg)
        ecfg = expert_config(selected, scfg)
        ecfg["experts"] = {int(l): es for l, es in ecfg["experts"].items()}
        n_selected = sum(len(es) for es in selected.values())
        per_layer = {int(l): len(es) for l, es in selected.items()}

        # 3. training steps, ESFT and FFT interleaved on the same batches
        train = pack(load_examples(str(data_path), tokenizer), args.seq_len, tokenizer.pad_token_id)
        model.train()
        esft_model = copy.deepcopy(model)
        fft_model = copy.deepcopy(model)
        lora_model = copy.deepcopy(model) if args.lora_rank else None
        base_fp = model_fingerprint(model)
        del model
        plan = apply_esft(esft_model, ecfg)
        fft_params = full_plan(fft_model)
        esft = Runner("ESFT", esft_model, plan.parameters(), args.lr, args.max_grad_norm)
        fft = Runner("FFT", fft_model, list(fft_params.values()), args.lr, args.max_grad_norm)
        elora = lplan = None
        if lora_model is not None:  # ESFT-LoRA on the same selected experts (method=esft-lora)
            from esft.training.esft_lora import apply_esft_lora

            lplan = apply_esft_lora(lora_model, ecfg, args.lora_rank, args.lora_alpha)
            elora = Runner("ESFT-LoRA", lora_model, lplan.parameters(), args.lr, args.max_grad_norm)

        def batch(i):
            idx = batch_rows(len(train), i, 0, args.batch_size, 1, args.seed)
            return {"input_ids": train.input_ids[idx], "attention_mask": train.attention_mask[idx],
                    "labels": train.labels[idx]}

        total_steps = args.warmup_steps + args.steps
        log.print(f"[dim]training: {total_steps} steps each for ESFT and FFT ({args.warmup_steps} warm-up) ...[/dim]")
        for i in range(total_steps):
            b = batch(i)
            for r in ((esft, fft) if i % 2 == 0 else (fft, esft)):
                r.step(b, record=i >= args.warmup_steps)
            if elora is not None:  # after the pair, so that ESFT and FFT alternate as without it
                elora.step(b, record=i >= args.warmup_steps)
        train_tokens = int(batch(0)["attention_mask"].sum())

        op_tables = {}
        if args.op_profile > 0:
            b = batch(total_steps)
            for r in (esft, fft):
                op_tables[r.name] = op_profile(r, b, args.op_profile)

        esft_opt_bytes = optimizer_state_bytes(esft.opt)
        fft_opt_bytes = optimizer_state_bytes(fft.opt)
        esft_trainable = plan.num_trainable()
        fft_trainable = sum(p.numel() for p in fft_params.values())

        # 4. on-disk sizes
        out_root = Path(args.keep_dir) if args.keep_dir else tmp
        adapter_dir = save_adapter(plan, out_root / "adapter", base_fp, {"benchmark": "train_efficiency"})
        full_dir = out_root / "full"
        fft_model.save_pretrained(str(full_dir))
        adapter_bytes = dir_bytes(adapter_dir)
        full_bytes = dir_bytes(full_dir)
        lora_bytes = None
        if lplan is not None:
            from esft.adapter.esft_lora import save_lora_adapter

            lora_bytes = dir_bytes(save_lora_adapter(lplan, out_root / "esft_lora_adapter", base_fp,
                                                     {"benchmark": "train_efficiency"}))

    # ----------------------------------------------------------------------------------- report
    phases = ("forward", "backward", "clip", "optimizer", "zero_grad", "total")
    esft_ph = {k: esft.median(k) for k in phases}
    fft_ph = {k: fft.median(k) for k in phases}
    ratios = {
        "step_time": esft_ph["total"] / fft_ph["total"],
        "optimizer_state": esft_opt_bytes / fft_opt_bytes,
        "adapter_size": adapter_bytes / full_bytes,
        "profile_speed": prof["profile_tokens_per_second"] / prof["forward_tokens_per_second"],
    }
    met = {
        "step_time": ratios["step_time"] <= TARGETS["step_time"],
        "optimizer_state": ratios["optimizer_state"] <= TARGETS["optimizer_state"],
        "adapter_size": ratios["adapter_size"] <= TARGETS["adapter_size"],
        "profile_speed": ratios["profile_speed"] >= TARGETS["profile_speed"],
    }
    mark = lambda k: "[green]met[/green]" if met[k] else "[red]MISSED[/red]"  # noqa: E731

    title = (f"ESFT vs FFT ({args.dtype}) - deepseek_v2, hidden {args.hidden}, {args.layers} layers ({len(layers)} MoE), "
             f"{args.experts} experts top-{args.top_k} + {args.shared_experts} shared, {n_params / 1e6:.1f}M params; "
             f"batch {args.batch_size}x{args.seq_len}; {args.threads} threads; experts impl {impl}")
    tab = Table(title=title, title_justify="left")
    for col, kw in (("figure", {}), ("ESFT", {"justify": "right"}), ("FFT / plain fwd", {"justify": "right"}),
                    ("ratio", {"justify": "right"}), ("target", {"justify": "center"}), ("", {})):
        tab.add_column(col, **kw)
    tab.add_row(f"train step time (median of {args.steps})", f"{esft_ph['total'] * 1e3:.1f} ms",
                f"{fft_ph['total'] * 1e3:.1f} ms", f"{ratios['step_time']:.3f}", "<= 0.60", mark("step_time"))
    tab.add_row("optimizer state", human(esft_opt_bytes), human(fft_opt_bytes), f"{ratios['optimizer_state']:.4f}",
                "<= 0.10", mark("optimizer_state"))
    tab.add_row("trainable params", f"{esft_trainable:,}", f"{fft_trainable:,}",
                f"{esft_trainable / fft_trainable:.4f}", "", "")
    tab.add_row("on disk: adapter / full checkpoint", human(adapter_bytes), human(full_bytes),
                f"{ratios['adapter_size']:.4f}", "<= 0.10", mark("adapter_size"))
    tab.add_row(f"profile_routing vs plain forward (best of {args.profile_repeats})",
                f"{prof['profile_tokens_per_second']:,.0f} tok/s", f"{prof['forward_tokens_per_second']:,.0f} tok/s",
                f"{ratios['profile_speed']:.3f}", ">= 0.90", mark("profile_speed"))
    tab.add_row("  (medians)", f"{prof['profile_tokens_per_second_median']:,.0f} tok/s",
                f"{prof['forward_tokens_per_second_median']:,.0f} tok/s",
                f"{prof['profile_tokens_per_second_median'] / prof['forward_tokens_per_second_median']:.3f}", "", "")
    tab.add_row("experts selected (ESFT-Token, top_p)",
                f"{n_selected} of {len(layers) * args.experts}", "", f"{n_selected / (len(layers) * args.experts):.3f}",
                "", "per layer " + ", ".join(f"L{l}:{n}" for l, n in per_layer.items()))
    console.print(tab)

    brk = Table(title=f"step breakdown (median ms over {args.steps} steps, {train_tokens} tokens/step)",
                title_justify="left")
    for col in ("phase", "ESFT", "FFT", "ESFT/FFT", "share of ESFT step", "share of FFT step"):
        brk.add_column(col, justify="left" if col == "phase" else "right")
    for k in phases:
        brk.add_row(k, f"{esft_ph[k] * 1e3:.1f}", f"{fft_ph[k] * 1e3:.1f}",
                    f"{esft_ph[k] / fft_ph[k]:.2f}" if fft_ph[k] > 0 else "-",
                    f"{esft_ph[k] / esft_ph['total']:.0%}", f"{fft_ph[k] / fft_ph['total']:.0%}")
    console.print(brk)
    for name, text in op_tables.items():
        console.print(f"\ntorch.profiler, one {name} step, top {args.op_profile} ops by self CPU time:")
        console.print(text, markup=False, soft_wrap=True)

    elora_res = {}
    if elora is not None:
        el_total = elora.median("total")
        el_opt = optimizer_state_bytes(elora.opt)
        lt = Table(title=f"ESFT-LoRA (rank {args.lora_rank}, alpha {args.lora_alpha}, same experts) beside ESFT and "
                         f"FFT, same batches", title_justify="left")
        for col in ("figure", "ESFT-LoRA", "ESFT", "FFT", "ESFT-LoRA / ESFT", "ESFT-LoRA / FFT"):
            lt.add_column(col, justify="left" if col == "figure" else "right")
        for name, mine, e, f, fmt in (
                (f"train step time (median of {args.steps})", el_total, esft_ph["total"], fft_ph["total"],
                 lambda v: f"{v * 1e3:.1f} ms"),
                ("optimizer state", el_opt, esft_opt_bytes, fft_opt_bytes, human),
                ("trainable params", lplan.num_trainable(), esft_trainable, fft_trainable, lambda v: f"{v:,}"),
                ("on disk (adapter / full checkpoint)", lora_bytes, adapter_bytes, full_bytes, human)):
            lt.add_row(name, fmt(mine), fmt(e), fmt(f), f"{mine / e:.3f}", f"{mine / f:.4f}")
        console.print(lt)
        elora_res = {"esft_lora_rank": args.lora_rank, "esft_lora_alpha": args.lora_alpha,
                     "esft_lora_step_seconds": el_total, "esft_lora_optimizer_state_bytes": el_opt,
                     "esft_lora_trainable_params": lplan.num_trainable(), "esft_lora_adapter_bytes": lora_bytes,
                     "esft_lora_master_weight_bytes": elora.masters.master_bytes(),
                     "step_breakdown_seconds_esft_lora": {k: elora.median(k) for k in phases}}

    missed = [k for k, v in met.items() if not v]
    elapsed = time.perf_counter() - t_start
    console.print(f"targets met: {4 - len(missed)}/4" + (f"; missed: {', '.join(missed)}" if missed else "")
                  + f"; final loss ESFT {esft.losses[-1]:.4f}, FFT {fft.losses[-1]:.4f}; wall {elapsed:.0f}s")

    result = {
        "esft_step_seconds": esft_ph["total"],
        "fft_step_seconds": fft_ph["total"],
        "esft_optimizer_state_bytes": esft_opt_bytes,
        "fft_optimizer_state_bytes": fft_opt_bytes,
        "esft_trainable_params": esft_trainable,
        "dtype": args.dtype,
        "esft_master_weight_bytes": esft.masters.master_bytes(),
        "fft_master_weight_bytes": fft.masters.master_bytes(),
        "model_param_bytes": sum(p.numel() * p.element_size() for p in fft_model.parameters()),
        "fft_trainable_params": fft_trainable,
        "adapter_bytes": adapter_bytes,
        "full_checkpoint_bytes": full_bytes,
        "profile_tokens_per_second": prof["profile_tokens_per_second"],
        "forward_tokens_per_second": prof["forward_tokens_per_second"],
        "profile_tokens_per_second_median": prof["profile_tokens_per_second_median"],
        "forward_tokens_per_second_median": prof["forward_tokens_per_second_median"],
        "ratios": ratios,
        "targets": {"step_time_max": TARGETS["step_time"], "optimizer_state_max": TARGETS["optimizer_state"],
                    "adapter_size_max": TARGETS["adapter_size"], "profile_speed_min": TARGETS["profile_speed"]},
        "targets_met": met,
        "step_breakdown_seconds": {"esft": esft_ph, "fft": fft_ph},
        "experts_selected": n_selected,
        "experts_selected_per_layer": {str(l): n for l, n in per_layer.items()},
        "experts_total": len(layers) * args.experts,
        "top_p": args.top_p,
        "model": {
            "model_type": "deepseek_v2", "params": n_params, "hidden_size": args.hidden,
            "num_hidden_layers": args.layers, "first_k_dense_replace": args.first_dense,
            "moe_layers": len(layers), "n_routed_experts": args.experts, "num_experts_per_tok": args.top_k,
            "n_shared_experts": args.shared_experts, "moe_intermediate_size": args.moe_intermediate,
            "intermediate_size": args.dense_intermediate, "num_attention_heads": args.heads,
            "vocab_size": len(tokenizer), "experts_implementation": impl, "router_std": args.router_std,
        },
        "batch": {"batch_size": args.batch_size, "seq_len": args.seq_len, "tokens_per_step": train_tokens,
                  "profile_tokens": prof["tokens"], "profile_batches": len(pbatches),
                  "profile_repeats": args.profile_repeats},
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
        "seed": args.seed,
        "torch_version": torch.__version__,
        "wall_seconds": elapsed,
        **elora_res,
    }
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
