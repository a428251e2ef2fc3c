#!/usr/bin/env python
"""Serving benchmark: many ESFT adapters woven over one base model, against the base alone and
against one merged model per adapter. On the shipped model, CPU by default.

For each adapter count N (default 1, 4, 8, 16) it makes N adapters (random expert selections of
ESFT-like size, perturbed weights; saved and loaded like real ones) and a workload of requests
spread evenly over the adapters (task-suite prompts, greedy, exactly --max-tokens each: EOS is
ignored so that every setup generates the same number of tokens and batches run equally long). Then, all through
the same :class:`esft.serving.engine.Engine` (dynamic batching, up to --max-batch requests per
batch), it measures generated tokens per second for

  base alone   the plain base model (no weaving), every request on the base
  woven        one base + N adapters woven, requests of all adapters batched together
  merged x N   one merged model per adapter, each serving its own requests (one after another)

and memory as parameter bytes (distinct storages: the woven base is a view, counted once): the woven model against the base plus the adapters' expert bytes,
and against N merged models. Throughput is measured at the engine (no HTTP), the requests all
submitted at once. Targets: woven throughput at 8 adapters >= 0.85 x base alone; woven memory
<= base + adapters' expert bytes + 10%. Prints a table; the LAST line is one JSON object.

    .venv/bin/python benchmarks/serve_throughput.py            # about 3-6 minutes on 2 cores
    .venv/bin/python benchmarks/serve_throughput.py --adapters 1 8 --requests 32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_adapters(model_dir, root: Path, n: int, per_layer: int, seed: int) -> list[Path]:
    from esft.adapter.fingerprint import model_fingerprint
    from esft.adapter.io import save_adapter
    from esft.models.loading import load_model
    from esft.models.registry import moe_layers
    from esft.training.experts import apply_esft, unwrap_esft

    model, _ = load_model(model_dir, dtype="float32", device="cpu")
    fp = model_fingerprint(model)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sel = {l.index: rng.sample(range(l.num_experts), per_layer) for l in moe_layers(model)}
        plan = apply_esft(model, {"experts": sel})
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in plan.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        save_adapter(plan, root / f"a{i}", fp)
        for w in plan.wrappers.values():  # back to the plain base for the next adapter
            for name in ("gate_up_proj", "down_proj"):
                getattr(w.trained, name).data.copy_(getattr(w.base, name)[torch.tensor(w.selected)])
        unwrap_esft(model)
        out.append(root / f"a{i}")
    return out


def run_workload(engine, jobs: list[tuple[str | None, list[int]]], max_tokens: int) -> tuple[float, int]:
    from esft.serving.engine import GenParams

    t = time.perf_counter()
    reqs = [engine.submit(a, ids, GenParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)) for a, ids in jobs]
    tokens = 0
    for r in reqs:
        while True:
            ev = r.events.get()
            if ev[0] == "done":
                tokens += ev[2]
                break
            if ev[0] == "error":
                raise RuntimeError(ev[1])
    return time.perf_counter() - t, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8, 16], help="adapter counts to measure")
    ap.add_argument("--requests", type=int, default=96, help="requests per measurement (spread over the adapters)")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens generated per request (greedy)")
    ap.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    ap.add_argument("--experts-per-layer", type=int, default=3, help="experts each adapter changes per MoE layer")
    ap.add_argument("--repeats", type=int, default=5, help="measurements per setting (the median is reported)")
    ap.add_argument("--model", default=None, help="base checkpoint (default: the shipped model)")
    ap.add_argument("--experts-implementation", default=None,
                    help="transformers experts kernel for every model compared (eager, batched_mm, grouped_mm; "
                    "default: the model's own)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from esft.adapter.io import merge_adapter
    from esft.embedded import embedded_model_dir
    from esft.models.loading import load_model
    from esft.serving.engine import Engine
    from esft.serving.weave import Weaver
    from esft.tasks import generate_split
    from esft.data.conversations import prompt_text

    model_dir = a.model or embedded_model_dir()

    def load(path=model_dir):
        m, t = load_model(path, dtype="float32", device="cpu")
        if a.experts_implementation:
            m.config._experts_implementation = a.experts_implementation
        return m, t

    base, tok = load()
    prompts = [p for p, _ in generate_split("translate_synth", "eval", 40, 0)] + \
              [p for p, _ in generate_split("arithmetic", "eval", 40, 0)]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    encoded = [bos + tok.encode(prompt_text(p), add_special_tokens=False) for p in prompts]
    base_bytes = param_bytes(base)

    def median_tps(runs):
        rates = sorted(toks / secs for secs, toks in runs)
        return rates[len(rates) // 2]

    rows, record = [], {"base_param_bytes": base_bytes, "settings": vars(a), "results": []}
    plain = Engine(base, tok, None, max_batch=a.max_batch)
    base_jobs = [(None, encoded[i % len(encoded)]) for i in range(a.requests)]
    run_workload(plain, base_jobs[:4], 4)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.adapters:
            dirs = make_adapters(model_dir, Path(tmp) / f"n{n}", n, a.experts_per_layer, a.seed + 100 * n)
            model, _ = load()
            weaver = Weaver(model)
            for i, d in enumerate(dirs):
                weaver.load(f"a{i}", d)
            engine = Engine(model, tok, weaver, max_batch=a.max_batch)
            jobs = [(f"a{i % n}", encoded[i % len(encoded)]) for i in range(a.requests)]
            run_workload(engine, jobs[:4], 4)
            # base alone and woven interleaved, so slow moments of the machine hit both alike
            base_runs, woven_runs = [], []
            for _ in range(a.repeats):
                base_runs.append(run_workload(plain, base_jobs, a.max_tokens))
                woven_runs.append(run_workload(engine, jobs, a.max_tokens))
            base_tps, woven_tps = median_tps(base_runs), median_tps(woven_runs)
            woven_bytes, adapter_bytes = weaver.weight_bytes(), weaver.adapter_bytes()
            engine.close()
            # one merged model per adapter, each serving its own share of the requests
            merged_secs, merged_toks = 0.0, 0
            for i, d in enumerate(dirs):
                m, _ = load()
                merge_adapter(m, d)
                e = Engine(m, tok, None, max_batch=a.max_batch)
                own = [(None, ids) for (name, ids) in jobs if name == f"a{i}"]
                runs = sorted(run_workload(e, own, a.max_tokens) for _ in range(a.repeats))
                s, t = runs[len(runs) // 2]
                merged_secs, merged_toks = merged_secs + s, merged_toks + t
                e.close()
                del m
            merged_tps = merged_toks / merged_secs
            res = {"adapters": n, "woven_tokens_per_s": woven_tps, "base_tokens_per_s": base_tps,
                   "merged_tokens_per_s": merged_tps, "woven_vs_base": woven_tps / base_tps,
                   "woven_vs_merged": woven_tps / merged_tps, "woven_param_bytes": woven_bytes,
                   "adapter_expert_bytes": adapter_bytes,
                   "woven_vs_base_plus_adapters": woven_bytes / (base_bytes + adapter_bytes),
                   "merged_param_bytes": n * base_bytes}
            record["results"].append(res)
            rows.append(res)
            print(f"  measured {n} adapter(s)", file=sys.stderr, flush=True)
    plain.close()

    mib = 2**20
    print(f"\nServing {a.requests} requests x {a.max_tokens} greedy tokens, batches of <= {a.max_batch}, "
          f"{torch.get_num_threads()} threads, experts kernel {base.config._experts_implementation}; base model {base_bytes / mib:.1f} MiB of parameters\n")
    head = ["adapters", "woven tok/s", "base-alone tok/s", "merged xN tok/s", "woven/base", "woven MiB",
            "base+adapters MiB", "ratio", "N merged MiB"]
    print(" | ".join(head))
    print("|".join("---" for _ in head))
    for r in rows:
        print(" | ".join([str(r["adapters"]), f"{r['woven_tokens_per_s']:.0f}", f"{r['base_tokens_per_s']:.0f}",
                          f"{r['merged_tokens_per_s']:.0f}", f"{r['woven_vs_base']:.2f}",
                          f"{r['woven_param_bytes'] / mib:.2f}",
                          f"{(base_bytes + r['adapter_expert_bytes']) / mib:.2f}",
                          f"{r['woven_vs_base_plus_adapters']:.3f}", f"{r['merged_param_bytes'] / mib:.1f}"]))
    at8 = next((r for r in rows if r["adapters"] == 8), None)
    if at8:
        print(f"\ntarget: woven throughput at 8 adapters >= 0.85 x base alone: {at8['woven_vs_base']:.2f} "
              f"({'met' if at8['woven_vs_base'] >= 0.85 else 'MISSED'})")
    worst = max(r["woven_vs_base_plus_adapters"] for r in rows)
    print(f"target: woven memory <= (base + adapter experts) x 1.10: worst {worst:.3f} "
          f"({'met' if worst <= 1.10 else 'MISSED'})")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
