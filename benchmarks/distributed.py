#!/usr/bin/env python
"""Distributed benchmark: per-rank memory and step time of ESFT and full fine-tuning (FFT) on 1, 2, 4 processes.

What it does (issue 10, "Performance"):

1. The driver (this script, run plainly) builds ONE small random DeepSeek-V2-style model (the same
   ``build`` as ``benchmarks/train_efficiency.py``), writes it with ``save_pretrained`` into the work dir,
   profiles its routing on a few batches of the toy task (``profile_routing``) and selects, per MoE
   layer, the ``--expert-share`` of experts with the highest ESFT-Token score; it also writes the packed
   batches every run trains on (the same global batches for every process count).
2. For each process count N of ``--procs`` and each method, it launches a fresh job as a subprocess:
   N > 1 with ``torchrun --standalone --nproc_per_node=N`` (gloo, one thread per process), N = 1 as
   a plain process. Each rank loads the checkpoint with ``esft.models.loading.load_model`` — under
   torchrun with ``distributed_config`` so that transformers applies FSDP2 (every frozen weight is a
   DTensor sharded over the N ranks), alone plainly — and runs ``--warmup-steps`` + ``--steps``
   optimizer steps, each on its share (``Dist.rows``) of the global batch:

   ESFT (as the recipe): ``apply_esft`` with ``shard_trainable`` (under torchrun every layer's trainable
   copy becomes fp32 FSDP2 shards, which are the masters) -> ``MasterWeights`` -> forward -> backward
   (FSDP2 reduce-scatters the copy's gradients) -> clip -> AdamW -> ``sync``.

   FFT (the recipe does not run method=full under torchrun yet, so it is built here): every parameter
   trains (``full_plan``); under FSDP2 they are DTensor shards whose gradients FSDP reduce-scatters
   itself in backward (no extra all-reduce); clip_grad_norm_ and AdamW run over the DTensor shards.
   FSDP2 averages the reduce-scattered gradients over the ranks while each rank's loss is its share
   of the global token mean (``num_items_in_batch``, as the recipe), so the loss is multiplied by N
   before backward: the gradient then equals one process's. (Both methods' losses and first-step
   gradient norms are compared with the single-process run: the "parity" columns.)

   Each rank writes its figures to ``<work dir>/ranks/<method>-n<N>-r<rank>.json``; the driver collects them.
3. Per rank it reports: parameter bytes the rank holds (a DTensor counts its local shard), split into
   frozen and trainable; fp32 master bytes (the local shards: ``MasterWeights.master_bytes``, also
   recorded, counts a DTensor master's global size, which FFT in bf16 has); gradient bytes after
   backward (local shards); AdamW state bytes (local shards); peak RSS (``ru_maxrss``; the row also
   shows how much of it is above the RSS after importing torch/transformers, i.e. the model's part);
   the median step time over ``--steps`` steps after ``--warmup-steps``.

   Peak RSS and glibc: after freeing a large block glibc raises its mmap threshold (up to 32 MiB), so the
   buffers FSDP2 gathers and frees for every layer stay in the heap and a rank's RSS *grows* with N
   although its live tensors shrink (measured here: ESFT 674 MiB on 1 process, ~900 MiB per rank on 2).
   The ranks therefore run with ``MALLOC_MMAP_THRESHOLD_`` fixed (``--malloc-mmap-threshold``, default
   1 MiB), which makes RSS follow live memory at some cost in step time (mmap page faults);
   ``--malloc-mmap-threshold 0`` keeps glibc's default.

Targets (printed met / MISSED): frozen parameter bytes per rank ~ 1/N of the model (within 10%), and
ESFT's AdamW state per rank <= 10% of FFT's at the same N. ESFT's trainable copy is sharded over the
N ranks like FFT's parameters (see ``esft/training/distributed.py``), so both shrink as 1/N and the
ratio stays the trainable share for every N. (Until 2026-11-23 the copy was replicated, and the ratio
grew as N x share: 11.4% at N=2 and 22.9% at N=4 on this benchmark's model.)

This machine has 2 cores: with 4 processes (one thread each) the ranks share cores, so step times
across N are NOT a scaling measurement (and include gloo on loopback); they only show that the step
runs and what it costs here.

    .venv/bin/python benchmarks/distributed.py                 # 1, 2 and 4 processes (make bench-distributed)
    .venv/bin/python benchmarks/distributed.py --procs 1,2 --steps 3
    .venv/bin/python benchmarks/distributed.py --help

With the defaults (20.6M parameters, hidden 256, 4 layers, 64 experts, batch 4x256, 2 + 6 steps) the whole
run took 4 min 17 s on this 2-core machine (each of the six launches 24-68 s, most of it process start,
imports and loading). The LAST line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
METHODS = ("esft", "full")
TARGETS = {"frozen_per_rank_tolerance": 0.10, "esft_optimizer_state_max": 0.10}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Per-rank memory (parameters frozen/trainable, fp32 masters, gradients, AdamW state, peak RSS) "
                    "and step time of ESFT and full fine-tuning under torchrun + FSDP2 (gloo, CPU) on 1, 2 and 4 "
                    "processes. Prints tables and, as the last line of stdout, one JSON object.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from train_efficiency import add_model_args

    add_model_args(p.add_argument_group("model (random DeepSeek-V2-style MoE, saved as a checkpoint directory)"))
    t = p.add_argument_group("data and training")
    t.add_argument("--examples", type=int, default=2000, help="toy-task conversations")
    t.add_argument("--seq-len", type=int, default=256, help="packed sequence length")
    t.add_argument("--batch-size", type=int, default=4,
                   help="global batch (packed rows) per step, split evenly over the ranks: a multiple of every N")
    t.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run (median reported)")
    t.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    t.add_argument("--expert-share", type=float, default=0.07,
                   help="ESFT: share of each MoE layer's routed experts selected (top by ESFT-Token score)")
    t.add_argument("--profile-batches", type=int, default=4, help="batches of the quick routing profile")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = none)")
    o = p.add_argument_group("run")
    o.add_argument("--procs", default="1,2,4", help="comma-separated process counts")
    o.add_argument("--methods", default="esft,full", help="comma-separated: esft, full")
    o.add_argument("--work-dir", default="runs/bench-distributed",
                   help="checkpoint, batches and per-rank JSON files (replaced on each run)")
    o.add_argument("--timeout", type=int, default=900, help="seconds one launch may take")
    o.add_argument("--malloc-mmap-threshold", type=int, default=1048576, metavar="BYTES",
                   help="MALLOC_MMAP_THRESHOLD_ for the ranks (glibc): fixed, so that freed large buffers (FSDP's "
                        "per-layer all-gathers) go back to the OS and peak RSS follows live memory; 0 = glibc's "
                        "default dynamic threshold, which keeps them in the heap (RSS then grows with FSDP)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the driver
    o.add_argument("--method", default="esft", help=argparse.SUPPRESS)
    o.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # set by the driver
    a = p.parse_args(argv)
    try:
        a.procs = [int(x) for x in str(a.procs).split(",") if x.strip()]
    except ValueError:
        p.error("--procs must be comma-separated integers, e.g. 1,2,4")
    a.methods = [x.strip() for x in str(a.methods).split(",") if x.strip()]
    if not a.procs or any(n < 1 for n in a.procs):
        p.error("--procs: each process count must be >= 1")
    if not a.methods or any(x not in METHODS for x in a.methods):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    for n in a.procs:
        if a.batch_size % n:
            p.error(f"--batch-size {a.batch_size} must be a multiple of every process count (not of {n})")
    for name in ("hidden", "layers", "experts", "top_k", "seq_len", "batch_size", "steps", "profile_batches"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    if not 0 <= a.first_dense < a.layers:
        p.error("--first-dense must be in [0, layers)")
    if not 0 < a.expert_share <= 1:
        p.error("--expert-share must be in (0, 1]")
    return a


# ------------------------------------------------------------------------------------------ helpers

def local(t):
    """A DTensor's local shard; a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(t) -> int:
    loc = local(t)
    return loc.numel() * loc.element_size()


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def vm_hwm_bytes() -> int | None:
    """The peak RSS of this process image (/proc VmHWM, reset at exec, unlike ru_maxrss); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------------------------- worker

def worker(args) -> int:
    """One rank of one run (method ``args.method``); writes ranks/<method>-n<N>-r<rank>.json."""
    rss_start = maxrss_bytes()
    import torch

    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from esft.models.loading import load_model
    from esft.selection.select import read_expert_config
    from esft.training.config import TrainConfig
    from esft.training.distributed import distributed_config, join, shard_trainable
    from esft.training.experts import apply_esft
    from esft.training.precision import MasterWeights
    from esft.training.recipe import full_plan, make_optimizer

    work = Path(args.work_dir)
    job = join("cpu", timeout_s=args.timeout)
    rss_imports = maxrss_bytes()
    layout = TrainConfig(model=str(work / "model"), train_data="-", output_dir="-", method="full", lr=args.lr,
                         fsdp_size=job.world if job.enabled else 0)
    t_load = time.perf_counter()
    if job.enabled:  # transformers applies FSDP2: every weight a DTensor sharded over the ranks
        model, _ = load_model(work / "model", dtype=args.dtype, device="cpu", with_tokenizer=False,
                              distributed_config=distributed_config(layout, job.world))
    else:
        model, _ = load_model(work / "model", dtype=args.dtype, device="cpu", with_tokenizer=False)
    load_seconds = time.perf_counter() - t_load
    rss_loaded = maxrss_bytes()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # global (unsharded) sizes
    model_params = sum(p.numel() for p in model.parameters())
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())

    if args.method == "esft":
        # Under torchrun each layer's trainable copy is sharded by FSDP2 as esft train does (fp32 shards).
        dtype = next(model.parameters()).dtype
        plan = apply_esft(model, read_expert_config(work / "expert_cfg.json"), prepare=shard_trainable(job, dtype))
        params = dict(plan.params)
    else:
        params = full_plan(model)
    masters = MasterWeights(params)
    opt = make_optimizer(masters.parameters(), layout)  # AdamW, foreach=True, as the recipe
    train_ids = {id(p) for p in params.values()}
    frozen_bytes = sum(nbytes(p) for p in model.parameters() if id(p) not in train_ids)
    trainable_bytes = sum(nbytes(p) for p in params.values())
    trainable_dtensors = sum(isinstance(p, DTensor) for p in params.values())

    batches = torch.load(work / "batches.pt")
    # FSDP2 averages the gradients it reduce-scatters over the ranks; the loss below is each rank's share
    # of the global token mean, so the loss is scaled by N to make FSDP's average the sum (= one process),
    # as esft train does (ESFT's trainable copy is FSDP-sharded too).
    loss_scale = float(job.loss_scale)

    def grad_bytes() -> int:
        seen, total = set(), 0
        for t in list(model.parameters()) + masters.parameters():
            if id(t) not in seen and t.grad is not None:
                seen.add(id(t))
                total += nbytes(t.grad)
        return total

    times, losses, norms, grads_after_backward = [], [], [], 0
    model.train()
    for i, b in enumerate(batches):
        rows = job.rows(torch.arange(len(b["input_ids"])))
        n_items = int((b["labels"][:, 1:] != -100).sum())
        job.barrier()  # ranks start each step together
        t0 = time.perf_counter()
        out = model(input_ids=b["input_ids"][rows], attention_mask=b["attention_mask"][rows],
                    labels=b["labels"][rows], use_cache=False, num_items_in_batch=torch.tensor(max(n_items, 1)))
        t1 = time.perf_counter()
        (out.loss * loss_scale if loss_scale != 1.0 else out.loss).backward()
        masters.accumulate()
        t2 = time.perf_counter()
        job.sum_grads(masters.parameters())  # tensors FSDP does not shard (none here): summed over ranks
        t3 = time.perf_counter()
        grads_after_backward = grad_bytes()
        t3b = time.perf_counter()
        norm = float("nan")
        if args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(masters.parameters(), args.max_grad_norm)
            norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        masters.sync()
        t6 = time.perf_counter()
        losses.append(job.sum(float(out.loss.detach())))
        norms.append(norm)
        if i >= args.warmup_steps:
            times.append({"forward": t1 - t0, "backward": t2 - t1, "grad_all_reduce": t3 - t2, "clip": t4 - t3b,
                          "optimizer": t5 - t4, "zero_grad_sync": t6 - t5, "total": (t6 - t0) - (t3b - t3)})

    opt_bytes = sum(nbytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    opt_dtensors = sum(isinstance(v, DTensor) for st in opt.state.values() for v in st.values())
    rec = {
        "method": args.method, "world": job.world, "rank": job.rank, "dtype": args.dtype,
        "model_params": model_params, "model_param_bytes": model_bytes, "sharded_params": sharded,
        "frozen_param_bytes": frozen_bytes, "trainable_param_bytes": trainable_bytes,
        "trainable_params": sum(p.numel() for p in params.values()), "trainable_dtensors": trainable_dtensors,
        # master_bytes() counts a DTensor master's global numel; what this rank holds is its local shard.
        "master_bytes": sum(nbytes(m) for m, p in zip(masters.masters.values(), masters.model_params.values())
                            if m is not p),
        "master_bytes_reported_by_MasterWeights": masters.master_bytes(), "grad_bytes": grads_after_backward,
        "optimizer_state_bytes": opt_bytes, "optimizer_state_dtensors": opt_dtensors,
        "rss_start_bytes": rss_start, "rss_after_imports_bytes": rss_imports, "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": maxrss_bytes(), "vm_hwm_bytes": vm_hwm_bytes(), "load_seconds": load_seconds,
        "step_seconds": statistics.median(t["total"] for t in times),
        "step_breakdown_seconds": {k: statistics.median(t[k] for t in times) for k in times[0]},
        "losses": losses, "grad_norms": norms, "loss_scale": loss_scale,
    }
    out_dir = work / "ranks"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.method}-n{job.world}-r{job.rank}.json").write_text(json.dumps(rec))
    job.barrier()
    if job.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------- driver

def prepare(args) -> int:
    """Write the checkpoint, the expert config, the batches and info.json into the work dir (once per run).

    Run in its own process, so that the driver stays small: a child's ru_maxrss starts at its parent's
    peak RSS at fork (Linux keeps it across exec), so a driver holding the model would inflate it.
    """
    import torch

    sys.path.insert(0, str(HERE))
    from train_efficiency import build

    from esft.data.conversations import load_examples
    from esft.data.packing import pack
    from esft.models.registry import moe_layers
    from esft.models.tiny import write_jsonl
    from esft.profiling.profiler import profile_routing
    from esft.profiling.run import profile_batches
    from esft.selection.select import SelectConfig, expert_config, select_experts
    from esft.training.recipe import batch_rows

    torch.set_num_threads(1)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args.experts_impl = "default"
    model, tokenizer, rows = build(args)
    model.save_pretrained(str(work / "model"))
    tokenizer.save_pretrained(str(work / "model"))
    data = write_jsonl(rows, work / "toy.jsonl")
    n_params = sum(p.numel() for p in model.parameters())

    # ESFT selection: a quick routing profile, then the top --expert-share of each layer by token score.
    k = max(1, round(args.expert_share * args.experts))
    pb, _ = profile_batches(str(data), tokenizer, args.seq_len, args.profile_batches * args.batch_size * args.seq_len,
                            args.batch_size)
    prof = profile_routing(model, pb)
    scfg = SelectConfig(score_function="token", budget="top_k", top_k=k)
    selected = select_experts(prof.token_scores, scfg)
    (work / "expert_cfg.json").write_text(json.dumps(expert_config(selected, scfg)))

    train = pack(load_examples(str(data), tokenizer), args.seq_len, tokenizer.pad_token_id)
    batches = []
    for i in range(args.warmup_steps + args.steps):
        idx = batch_rows(len(train), i, 0, args.batch_size, 1, args.seed)
        batches.append({"input_ids": train.input_ids[idx], "attention_mask": train.attention_mask[idx],
                        "labels": train.labels[idx]})
    torch.save(batches, work / "batches.pt")
    routed = sum(l.num_experts for l in moe_layers(model))
    info = {"params": n_params, "moe_layers": len(selected), "experts_per_layer_selected": k,
            "experts_selected": k * len(selected), "experts_total": routed,
            "selected": {str(l): es for l, es in selected.items()}}
    (work / "info.json").write_text(json.dumps(info))
    return 0


def run_prepare(args, argv: list[str], log) -> dict:
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare"] + list(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log.print("[dim]writing the checkpoint, profiling its routing, selecting experts ...[/dim]")
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0 or not (work / "info.json").exists():
        raise SystemExit(f"preparing the work dir failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    info = json.loads((work / "info.json").read_text())
    log.print(f"[dim]model: {info['params'] / 1e6:.2f}M params ({args.dtype}), {info['moe_layers']} MoE layers x "
              f"{args.experts} experts; ESFT trains {info['experts_per_layer_selected']} per layer "
              f"({info['experts_selected']} of {info['experts_total']})[/dim]")
    return info


def launch(args, n: int, method: str, log) -> dict:
    """One run (N processes, one method); returns {"ranks": [...], "seconds", "error"}."""
    script = str(Path(__file__).resolve())
    passthrough = ["--worker", "--method", method, "--work-dir", str(Path(args.work_dir).resolve()),
                   "--dtype", args.dtype, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                   "--lr", str(args.lr), "--max-grad-norm", str(args.max_grad_norm), "--timeout", str(args.timeout),
                   "--batch-size", str(args.batch_size), "--procs", str(n)]
    if n == 1:  # one process: loaded plainly (no process group, no FSDP)
        cmd = [sys.executable, script] + passthrough
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script] + passthrough
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if args.malloc_mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    log.print(f"[dim]{method}: {n} process(es) ...[/dim]")
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, tail = res.returncode, (res.stdout + res.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = -1, f"timed out after {args.timeout}s: {str(e.stderr or '')[-2000:]}"
    seconds = time.perf_counter() - t0
    ranks = []
    for r in range(n):
        f = Path(args.work_dir) / "ranks" / f"{method}-n{n}-r{r}.json"
        if f.exists():
            ranks.append(json.loads(f.read_text()))
    error = None
    if rc != 0 or len(ranks) != n:
        error = f"exit {rc}, {len(ranks)}/{n} rank files; output tail:\n{tail}"
        log.print(f"[red]{method} on {n} process(es) failed[/red]\n{tail}")
    return {"ranks": ranks, "seconds": seconds, "error": error}


def rel_diff(a: list[float], b: list[float]) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.prepare:
        return prepare(args)
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 150, highlight=False)
    log = Console(file=sys.stderr, highlight=False)
    t_start = time.perf_counter()
    info = run_prepare(args, argv, log)
    runs: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    for n in args.procs:
        for method in args.methods:
            runs[method][n] = launch(args, n, method, log)

    # --------------------------------------------------------------------------------- per-rank table
    tab = Table(title=f"per rank, after {args.warmup_steps} warm-up + {args.steps} timed steps "
                      f"(global batch {args.batch_size}x{args.seq_len}, gloo, 1 thread per process)",
                title_justify="left")
    for col in ("method", "N", "rank", "frozen params", "trainable params", "fp32 masters", "grads",
                "AdamW state", "peak RSS (model part)", "step ms"):
        tab.add_column(col, justify="left" if col == "method" else "right")
    for method in args.methods:
        for n in args.procs:
            run = runs[method][n]
            if run["error"]:
                first = run["error"].strip().splitlines()
                tab.add_row(method, str(n), "-", "[red]FAILED[/red]", first[0][:60], "", "", "", "", "")
                continue
            for r in run["ranks"]:
                tab.add_row(method if r["rank"] == 0 else "", str(n) if r["rank"] == 0 else "", str(r["rank"]),
                            human(r["frozen_param_bytes"]), human(r["trainable_param_bytes"]), human(r["master_bytes"]),
                            human(r["grad_bytes"]), human(r["optimizer_state_bytes"]),
                            f"{human(r['peak_rss_bytes'])} ({human(r['peak_rss_bytes'] - r['rss_after_imports_bytes'])})",
                            f"{r['step_seconds'] * 1e3:.0f}")
        tab.add_section()
    console.print(tab)

    # ---------------------------------------------------------------------------------- summary/targets
    model_bytes = next((r["model_param_bytes"] for m in runs.values() for run in m.values() for r in run["ranks"]), 0)
    summary = {}
    sm = Table(title="targets per N (worst rank)", title_justify="left")
    for col in ("N", "ESFT frozen/rank x N / model", "target", "", "ESFT AdamW / FFT AdamW per rank", "target", "",
                "ESFT loss parity vs N=1", "FFT loss parity vs N=1", "FFT grad-norm parity", "ESFT / FFT step"):
        sm.add_column(col, justify="right")

    def mark(ok):
        return "" if ok is None else ("[green]met[/green]" if ok else "[red]MISSED[/red]")

    def fmt(s, k, spec):
        return format(s[k], spec) if s.get(k) is not None else "-"

    base = {m: (runs[m].get(1) or {}).get("ranks") or [] for m in args.methods}
    for n in args.procs:
        e = runs.get("esft", {}).get(n, {"ranks": []})["ranks"]
        f = runs.get("full", {}).get(n, {"ranks": []})["ranks"]
        s = {}
        if e:
            s["esft_frozen_share_x_n"] = max(r["frozen_param_bytes"] for r in e) * n / model_bytes
            s["frozen_met"] = abs(s["esft_frozen_share_x_n"] - 1) <= TARGETS["frozen_per_rank_tolerance"]
        if f:
            s["fft_param_share_x_n"] = max(r["trainable_param_bytes"] for r in f) * n / model_bytes
        if e and f:
            s["optimizer_ratio"] = max(r["optimizer_state_bytes"] for r in e) / max(r["optimizer_state_bytes"] for r in f)
            s["optimizer_met"] = s["optimizer_ratio"] <= TARGETS["esft_optimizer_state_max"]
            s["step_ratio"] = max(r["step_seconds"] for r in e) / max(r["step_seconds"] for r in f)
        for m, rr in (("esft", e), ("full", f)):
            if rr and base.get(m):
                s[f"{m}_loss_rel_diff_vs_1"] = rel_diff(rr[0]["losses"], base[m][0]["losses"])
                s[f"{m}_grad_norm_rel_diff_vs_1"] = rel_diff(rr[0]["grad_norms"][:1], base[m][0]["grad_norms"][:1])
        summary[n] = s
        sm.add_row(str(n), fmt(s, "esft_frozen_share_x_n", ".3f"), "1 +- 0.10", mark(s.get("frozen_met")),
                   fmt(s, "optimizer_ratio", ".1%"), "<= 10%", mark(s.get("optimizer_met")),
                   fmt(s, "esft_loss_rel_diff_vs_1", ".1e"), fmt(s, "full_loss_rel_diff_vs_1", ".1e"),
                   fmt(s, "full_grad_norm_rel_diff_vs_1", ".1e"), fmt(s, "step_ratio", ".2f"))
    console.print(sm)

    failures = {f"{m}-n{n}": run["error"] for m in runs for n, run in runs[m].items() if run["error"]}
    elapsed = time.perf_counter() - t_start
    share = info["experts_selected"] / info["experts_total"]
    esft_any = next((r for run in runs.get("esft", {}).values() for r in run["ranks"]), None)
    trainable_share = esft_any["trainable_param_bytes"] / model_bytes if esft_any and model_bytes else None
    lines = [
        f"model: {info['params'] / 1e6:.2f}M params = {human(model_bytes)} ({args.dtype}); ESFT trains "
        f"{info['experts_selected']} of {info['experts_total']} routed experts ({share:.1%})"
        + (f" = {trainable_share:.1%} of the model's parameters" if trainable_share is not None else ""),
        ("frozen/rank x N / model: 1.0 = exactly 1/N of the model per rank (FSDP2 shards dim 0; uneven shards "
         "make it slightly more on some ranks)."),
        "ESFT's trainable copy is sharded over the ranks by FSDP2 (distributed.py's design), as FFT's parameters "
        "are: both AdamW states shrink as 1/N, so ESFT/FFT stays the trainable share"
        + (f" (here {trainable_share:.1%}) for every N." if trainable_share else "."),
        ("FFT: gradients reduce-scattered by FSDP2 (loss x N against FSDP's averaging), clip_grad_norm_ and AdamW "
         "(foreach) run on the DTensor shards; parity = max relative difference of the per-step losses (and the "
         "first step's gradient norm) from the single-process run."),
        "peak RSS includes ~the import of torch + transformers (RSS after imports); '(model part)' is peak minus that. "
        + (f"Ranks run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (glibc's dynamic threshold would keep "
           "FSDP's freed gather buffers in the heap and make RSS grow with N; --malloc-mmap-threshold 0 shows that); "
           "this costs step time (buffers >= the threshold are mmapped and page-faulted anew each step)."
           if args.malloc_mmap_threshold > 0 else "glibc's default dynamic mmap threshold (--malloc-mmap-threshold 0): "
           "freed FSDP gather buffers stay in the heap, so RSS overstates live memory under FSDP."),
        ("2 cores shared by all ranks: step times across N are NOT a scaling measurement (N=4 runs 4 processes on "
         "2 cores, gloo over loopback)."),
        f"wall {elapsed:.0f}s in all (" + ", ".join(f"{m} N={n}: {run['seconds']:.0f}s" for m in runs
                                                     for n, run in runs[m].items()) + ")",
    ]
    off = [f"{r['method']} N={r['world']} rank {r['rank']}" for m in runs.values() for run in m.values()
           for r in run["ranks"] if r["master_bytes"] != r["master_bytes_reported_by_MasterWeights"]]
    if off:
        lines.append(f"MasterWeights.master_bytes() counts DTensor masters at their global size ({', '.join(off[:3])}"
                     f"{', ...' if len(off) > 3 else ''}): the table shows the local shards.")
    if failures:
        lines.append("[red]FAILED runs: " + ", ".join(failures) + " (errors in the JSON)[/red]")
    for line in lines:
        console.print(line)

    result = {
        "model": {"params": info["params"], "param_bytes": model_bytes, "dtype": args.dtype, "hidden": args.hidden,
                  "layers": args.layers, "first_dense": args.first_dense, "experts": args.experts, "top_k": args.top_k,
                  "shared_experts": args.shared_experts, "moe_intermediate": args.moe_intermediate},
        "esft_selection": info,
        "batch": {"batch_size": args.batch_size, "seq_len": args.seq_len},
        "steps": args.steps, "warmup_steps": args.warmup_steps, "procs": args.procs, "backend": "gloo",
        "threads_per_process": 1, "malloc_mmap_threshold": args.malloc_mmap_threshold or None,
        "runs": {m: {str(n): {"seconds": run["seconds"], "error": run["error"], "ranks": run["ranks"]}
                     for n, run in runs[m].items()} for m in runs},
        "summary": {str(n): s for n, s in summary.items()},
        "targets": TARGETS,
        "wall_seconds": elapsed,
    }
    sys.stdout.flush()
    print(json.dumps(result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
