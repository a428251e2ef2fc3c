#!/usr/bin/env python
"""Mixed-precision benchmark: does bf16 ESFT learn, and what does it cost against fp32 and full fine-tuning?

Part A, learning (the issue's measurement): on the shipped model and the demo's task data, the
experts ESFT-Token selects are trained for --steps steps at the paper's lr 1e-5 three ways:

    fp32            fp32 model, AdamW on the fp32 weights
    bf16 + masters  bf16 model, fp32 master weights and AdamW state (what `esft train` does)
    bf16 in place   bf16 model, AdamW stepping the bf16 weights (the reference code's way)

and it reports the share of the selected experts' weights that changed (as trained, and as written
in bf16), and how far the bf16 loss curve is from the fp32 one (same data, same order).

Part B, cost: ESFT and full fine-tuning, fp32 and bf16, each in its own process (so that peak RSS,
or peak CUDA memory on a GPU, is that run's alone): median step time over --cost-steps steps
(after warm-up) and the bytes of weights, fp32 masters and AdamW state.

    .venv/bin/python benchmarks/mixed_precision.py                     # shipped model, CPU (~3 min here)
    .venv/bin/python benchmarks/mixed_precision.py --model DIR --device cuda --batch-size 4 --seq-len 2048

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--task", default="translate_synth", help="suite task whose data is trained on")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=10, help="Part A: training steps at --lr")
    p.add_argument("--lr", type=float, default=1e-5, help="Part A: learning rate (the paper's)")
    p.add_argument("--batch-size", type=int, default=16, help="packed rows per step (the demo's)")
    p.add_argument("--seq-len", type=int, default=256, help="packed row length (the demo's)")
    p.add_argument("--cost-steps", type=int, default=10, help="Part B: timed steps per run (median reported)")
    p.add_argument("--cost-warmup", type=int, default=2, help="Part B: untimed warm-up steps per run")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="keep data and runs here (default: a temporary directory)")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "DTYPE", "EXPERT_CFG"), help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_dir(args) -> str:
    from esft.embedded import embedded_model_dir

    return args.model or str(embedded_model_dir())


def prepare(args, work: Path) -> tuple[Path, Path]:
    """The task's training data and ESFT-Token (p=0.2) expert config, as `esft demo` makes them."""
    from esft.models.loading import load_model
    from esft.profiling.run import ProfileConfig, run_profile
    from esft.selection.run import run_select
    from esft.selection.select import SelectConfig
    from esft.tasks import write_suite

    paths = write_suite(work / "data", 2000, 100, 10, args.seed, tasks=[args.task])[args.task]
    model, tok = load_model(model_dir(args), dtype="float32", device=args.device)
    run_profile(ProfileConfig(data=str(paths["train"]), out=str(work / "scores.json"), max_tokens=32768,
                              seq_len=args.seq_len, batch_size=8), model=model, tokenizer=tok, progress=False)
    run_select(str(work / "scores.json"), SelectConfig(score_function="token", top_p=0.2), str(work / "expert_cfg.json"))
    return Path(paths["train"]), work / "expert_cfg.json"


def train_cfg(args, data: Path, ecfg: Path, out: Path, dtype: str):
    from esft.training.config import TrainConfig

    return TrainConfig(model=model_dir(args), train_data=str(data), output_dir=str(out), expert_config=str(ecfg),
                       seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr, eval_every=0,
                       save_every=0, log_every=1, tensorboard=False, dtype=dtype, device=args.device,
                       valid_fraction=0, adapter_dtype="float32", overwrite=True, seed=args.seed)


def base_rows(args, ecfg_path: Path) -> dict:
    """The selected experts' base values under the adapter's keys (fp32 load of the checkpoint)."""
    from esft.models.loading import load_model
    from esft.selection.select import read_expert_config
    from esft.training.experts import apply_esft

    model, _ = load_model(model_dir(args), dtype="float32", device="cpu", with_tokenizer=False)
    return {k: v.clone() for k, v in apply_esft(model, read_expert_config(str(ecfg_path))).adapter_state_dict().items()}


def in_place_bf16(args, data: Path, ecfg: Path) -> tuple[dict, list[float]]:
    """The reference code's way: AdamW steps the bf16 weights themselves (same data and order as the recipe)."""
    import torch

    from esft.models.loading import input_device, load_model
    from esft.selection.select import read_expert_config
    from esft.training.experts import apply_esft
    from esft.training.recipe import batch_rows, load_data, make_optimizer

    cfg = train_cfg(args, data, ecfg, Path("-"), "bfloat16")
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model, dtype="bfloat16", device=args.device)
    plan = apply_esft(model, read_expert_config(str(ecfg)))
    opt = make_optimizer(plan.parameters(), cfg)
    rows, _ = load_data(cfg, tok)
    dev = input_device(model)
    losses = []
    model.train()
    for step in range(cfg.steps):
        idx = batch_rows(len(rows), step, 0, cfg.batch_size, 1, cfg.seed)
        n = max(int((rows.labels[idx][:, 1:] != -100).sum()), 1)
        out = model(input_ids=rows.input_ids[idx].to(dev), attention_mask=rows.attention_mask[idx].to(dev),
                    labels=rows.labels[idx].to(dev), use_cache=False, num_items_in_batch=torch.tensor(n, device=dev))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(plan.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return {k: v.float().cpu() for k, v in plan.adapter_state_dict().items()}, losses


def changed(tensors: dict, base: dict, as_bf16: bool = False) -> float:
    import torch

    n = c = 0
    for k, t in tensors.items():
        a, b = t.float(), base[k].float()
        if as_bf16:
            a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        c += int((a != b).sum())
        n += t.numel()
    return c / n


def part_a(args, data: Path, ecfg: Path, work: Path) -> dict:
    from safetensors.torch import load_file

    from esft.training.recipe import train

    base = base_rows(args, ecfg)
    out = {}
    for dtype in ("float32", "bfloat16"):
        run = work / f"learn-{dtype}"
        t0 = time.perf_counter()
        train(train_cfg(args, data, ecfg, run, dtype), progress=False)
        tensors = load_file(str(run / "last" / "adapter.safetensors"))
        losses = [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
        out[dtype] = {"changed": changed(tensors, base), "changed_as_bf16": changed(tensors, base, True),
                      "losses": losses, "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    tensors, losses = in_place_bf16(args, data, ecfg)
    out["bfloat16_in_place"] = {"changed": changed(tensors, base), "changed_as_bf16": changed(tensors, base, True),
                                "losses": losses, "seconds": time.perf_counter() - t0}
    ref = out["float32"]["losses"]
    for k in ("bfloat16", "bfloat16_in_place"):
        out[k]["max_rel_loss_diff_vs_fp32"] = max(abs(a - b) / b for a, b in zip(out[k]["losses"], ref))
    out["trainable_params"] = sum(t.numel() for t in base.values())
    return out


# ---------------------------------------------------------------------------- Part B, one run per process

def worker(args) -> None:
    import torch

    from esft.models.loading import input_device, load_model
    from esft.selection.select import read_expert_config
    from esft.training.experts import apply_esft
    from esft.training.precision import MasterWeights
    from esft.training.recipe import batch_rows, full_plan, load_data, make_optimizer, optimizer_state_bytes

    method, dtype, ecfg = args.worker
    cfg = train_cfg(args, Path(args.data), Path(ecfg), Path("-"), dtype)
    model, tok = load_model(cfg.model, dtype=dtype, device=args.device)
    params = apply_esft(model, read_expert_config(ecfg)).params if method == "esft" else full_plan(model)
    masters = MasterWeights(params)
    opt = make_optimizer(masters.parameters(), cfg)
    rows, _ = load_data(cfg, tok)
    dev = input_device(model)
    cuda = str(dev).startswith("cuda")
    times = []
    model.train()
    for step in range(args.cost_warmup + args.cost_steps):
        idx = batch_rows(len(rows), step, 0, cfg.batch_size, 1, cfg.seed)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=rows.input_ids[idx].to(dev), attention_mask=rows.attention_mask[idx].to(dev),
                    labels=rows.labels[idx].to(dev), use_cache=False)
        out.loss.backward()
        masters.accumulate()
        torch.nn.utils.clip_grad_norm_(masters.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        masters.sync()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.cost_warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({
        "method": method, "dtype": dtype, "step_seconds": statistics.median(times),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params.values()),
        "master_bytes": masters.master_bytes(), "optimizer_state_bytes": optimizer_state_bytes(opt),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }))


def part_b(args, data: Path, ecfg: Path) -> list[dict]:
    rows = []
    for method in ("esft", "full"):
        for dtype in ("float32", "bfloat16"):
            cmd = [sys.executable, __file__, "--worker", method, dtype, str(ecfg), "--data", str(data),
                   "--device", args.device, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--cost-steps", str(args.cost_steps), "--cost-warmup", str(args.cost_warmup),
                   "--threads", str(args.threads), "--seed", str(args.seed)]
            if args.model:
                cmd += ["--model", args.model]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"worker {method} {dtype} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  {method} {dtype}: {rows[-1]['step_seconds'] * 1e3:.0f} ms/step", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="esft-mp-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("preparing data and the expert selection ...", file=sys.stderr)
        data, ecfg = prepare(args, work)
        print("part A: learning at lr %g ..." % args.lr, file=sys.stderr)
        a = part_a(args, data, ecfg, work)
        print("part B: cost, one process per run ...", file=sys.stderr)
        b = part_b(args, data, ecfg)

    t = Table(title=f"A. {args.steps} steps at lr {args.lr:g} on {args.task} ({a['trainable_params']:,} trainable "
                    f"params in the selected experts), batch {args.batch_size}x{args.seq_len}", title_justify="left")
    for c in ("run", "selected weights changed", "changed once stored in bf16", "max |loss - fp32 loss| / fp32", "wall s"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for k, name in (("float32", "fp32"), ("bfloat16", "bf16 + fp32 masters (esft train)"),
                    ("bfloat16_in_place", "bf16, AdamW in place (reference)")):
        r = a[k]
        t.add_row(name, f"{r['changed']:.1%}", f"{r['changed_as_bf16']:.1%}",
                  "-" if k == "float32" else f"{r['max_rel_loss_diff_vs_fp32']:.2e}", f"{r['seconds']:.1f}")
    console.print(t)
    t = Table(title=f"B. cost per run (own process; {args.device}; median of {args.cost_steps} steps)", title_justify="left")
    for c in ("method", "dtype", "step ms", "weights MiB", "fp32 masters MiB", "AdamW state MiB", "peak RSS MiB", "peak CUDA MiB"):
        t.add_column(c, justify="left" if c in ("method", "dtype") else "right")
    mib = lambda n: "-" if n is None else f"{n / 2**20:.1f}"  # noqa: E731
    for r in b:
        t.add_row(r["method"], r["dtype"], f"{r['step_seconds'] * 1e3:.0f}", mib(r["weight_bytes"]), mib(r["master_bytes"]),
                  mib(r["optimizer_state_bytes"]), mib(r["peak_rss_bytes"]), mib(r["peak_cuda_bytes"]))
    console.print(t)
    console.print(f"wall {time.perf_counter() - t_start:.0f} s; torch {torch.__version__}; {args.threads} threads")
    print(json.dumps({"learning": a, "cost": b, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "data")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
