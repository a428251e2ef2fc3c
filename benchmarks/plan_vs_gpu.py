#!/usr/bin/env python
"""Does `esft plan` predict real GPU memory? Peak CUDA memory of `esft train` against the plan's estimate.

On a CUDA machine: builds a model with DeepSeek-V2-Lite's published layer shapes (hidden 2048, 64 routed
experts of width 1408, top-6, 2 shared, MLA attention, vocabulary 102400) but only ``--layers`` decoder
layers (the first dense, as in V2-Lite), random bf16 weights, saves it, and trains it with the recipe
(`esft.training.recipe.train`, one process) for ``--steps`` steps with ESFT (``--share`` of each MoE
layer's experts, chosen at random: memory does not depend on which) and with full fine-tuning, each in
its own process so that ``torch.cuda.max_memory_allocated`` is that run's peak (load + training). The
plan is `esft plan`'s estimate for the same layout (one GPU, same dtype, micro-batch and sequence
length), computed from the saved config.json alone.

    python benchmarks/plan_vs_gpu.py --layers 4 --seq-len 2048 --steps 8     # ~2 min on an H100

Training checkpoints are not written (a no-op replaces the checkpoint writer): they do not change
device memory and full fine-tuning's would be tens of GB on disk. The LAST line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the first one dense)")
    p.add_argument("--share", type=float, default=0.075, help="ESFT: share of routed experts trained per MoE layer")
    p.add_argument("--seq-len", type=int, default=2048, help="packed sequence length")
    p.add_argument("--micro-batch", type=int, default=1, help="packed sequences per step")
    p.add_argument("--steps", type=int, default=8, help="training steps per run (the median step time is reported)")
    p.add_argument("--methods", default="esft,full", help="comma-separated: esft, full")
    p.add_argument("--work", default="/tmp/plan_vs_gpu", help="work directory (model, data, runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args) -> Path:
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from esft.models.published import published_config
    from esft.models.tiny import toy_task, train_tokenizer, write_jsonl

    work = Path(args.work)
    model_dir = work / "model"
    rows = toy_task(4000, seed=args.seed)
    write_jsonl(rows, work / "train.jsonl")
    tok = train_tokenizer([m["content"] for r in rows for m in r["messages"]])
    cfg = published_config("deepseek-v2-lite")
    cfg.num_hidden_layers = args.layers
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    E, k = cfg.n_routed_experts, max(1, round(args.share * cfg.n_routed_experts))
    rng = random.Random(args.seed)
    experts = {str(i): sorted(rng.sample(range(E), k)) for i in range(cfg.first_k_dense_replace, args.layers)}
    (work / "expert_cfg.json").write_text(json.dumps({"experts": experts, "shared_experts": False,
                                                      "non_expert_modules": False}))
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return params


def worker(args) -> int:
    import torch

    from esft.training import checkpoint, recipe
    from esft.training.config import TrainConfig

    work = Path(args.work)
    checkpoint.save = lambda *a, **k: None  # see the module docstring
    method = args.worker
    cfg = TrainConfig(model=str(work / "model"), train_data=str(work / "train.jsonl"),
                      output_dir=str(work / f"run-{method}"), method=method,
                      expert_config=str(work / "expert_cfg.json") if method == "esft" else None,
                      seq_len=args.seq_len, batch_size=args.micro_batch, steps=args.steps, lr=1e-5, eval_every=0,
                      save_every=0, log_every=1, tensorboard=False, dtype="bfloat16", device="cuda",
                      valid_fraction=0)
    t0 = time.perf_counter()
    res = recipe.train(cfg, progress=False)
    print(json.dumps({"method": method, "peak_bytes": torch.cuda.max_memory_allocated(),
                      "reserved_peak_bytes": torch.cuda.max_memory_reserved(),
                      "trainable_params": res.trainable_params, "optimizer_state_bytes": res.optimizer_state_bytes,
                      "master_weight_bytes": res.master_weight_bytes, "seconds": time.perf_counter() - t0,
                      "step_seconds": res.step_seconds,
                      "train_loss": res.train_loss}))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    if not torch.cuda.is_available():
        print("plan_vs_gpu: no CUDA device here (this benchmark measures GPU memory)", file=sys.stderr)
        return 2
    from esft.planning import PlanConfig, make_plan

    t0 = time.perf_counter()
    params = prepare(args)
    gib = 2 ** 30
    gpu = torch.cuda.get_device_properties(0)
    rows = []
    for method in args.methods.split(","):
        res = subprocess.run([sys.executable, __file__, *argv, "--worker", method], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            rows.append({"method": method, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        run = json.loads(res.stdout.strip().splitlines()[-1])
        plan = make_plan(PlanConfig(model=str(Path(args.work) / "model"), gpus=1, gpu_memory_gib=gpu.total_memory / gib,
                                    dtype="bfloat16", method=method, micro_batch=args.micro_batch, seq_len=args.seq_len,
                                    expert_config=str(Path(args.work) / "expert_cfg.json") if method == "esft" else None))
        run["plan_bytes"] = {k: int(v) for k, v in plan.bytes.items()}
        run["plan_over_measured"] = plan.bytes["total"] / run["peak_bytes"]
        rows.append(run)
    print(f"{gpu.name}, {gpu.total_memory / gib:.1f} GiB; model {params / 1e9:.2f}B parameters (DeepSeek-V2-Lite "
          f"shapes, {args.layers} layers), bf16, micro-batch {args.micro_batch} x {args.seq_len}, {args.steps} steps")
    print(f"{'method':<6} {'plan total':>11} {'measured peak':>14} {'plan/measured':>14} {'of which plan: weights':>23} "
          f"{'masters':>8} {'grads':>8} {'AdamW':>8} {'activations':>12} {'step (median)':>14}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<6} FAILED: {r['error']}")
            continue
        b = r["plan_bytes"]
        print(f"{r['method']:<6} {b['total'] / gib:>9.2f} G {r['peak_bytes'] / gib:>12.2f} G {r['plan_over_measured']:>14.2f} "
              f"{b['weights'] / gib:>21.2f} G {b['fp32 masters'] / gib:>6.2f} G {b['gradients'] / gib:>6.2f} G "
              f"{b['optimizer state'] / gib:>6.2f} G {b['activations'] / gib:>10.2f} G {r['step_seconds'] * 1e3:>11.0f} ms")
    print(f"wall {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"gpu": gpu.name, "params": params, "layers": args.layers, "seq_len": args.seq_len,
                      "micro_batch": args.micro_batch, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
