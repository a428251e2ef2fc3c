#!/usr/bin/env python
"""Serving benchmark on the shipped model (CPU by default), in two modes.

``--mode open-loop`` (the default): requests arrive as a Poisson process at ``--rates`` requests/s
(open loop: arrivals do not wait for answers), with mixed lengths (a quarter of the prompts long,
a quarter of the answers long, exactly as many tokens as asked: EOS is ignored), spread over 0 (the
base alone), 1, 8 and 16 woven adapters. Each load runs once through the continuous scheduler and once
through the static one (a batch runs to its longest request before the next starts), and the table
gives, side by side, throughput, time to first token and end-to-end latency (p50, p99; also p99 of the
short requests alone) and memory (parameters + KV cache, and the process's peak RSS). Targets (issue
11): p99 latency of short requests >= 3x lower than static at the same load; throughput at 8
adapters >= 0.9x the base alone. Measured at the engine (no HTTP).

``--mode closed``: the earlier measurement, all requests submitted at once: woven against the base
alone and one merged model per adapter (tokens/s), and parameter memory. Targets: woven throughput
at 8 adapters >= 0.85 x base alone; woven memory <= base + adapters' expert bytes + 10%.

The LAST line printed is one JSON object.

    .venv/bin/python benchmarks/serve_throughput.py                   # open loop, a few minutes on 2 cores
    .venv/bin/python benchmarks/serve_throughput.py --rates 2 4 8 --requests 64
    .venv/bin/python benchmarks/serve_throughput.py --mode closed --adapters 1 8 --requests 32
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


def closed_loop(a) -> int:

    from esft.adapter.io import merge_adapter
    from esft.embedded import embedded_model_dir
    from esft.models.loading import load_model
    from esft.serving.engine import Engine
    from esft.serving.weave import Weaver
    from esft.tasks import generate_split
    from esft.data.conversations import prompt_text

    model_dir = a.model or embedded_model_dir()

    def load(path=model_dir):
        m, t = load_model(path, dtype=a.dtype, device=a.device)
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
            weaver = Weaver(model, max_adapters=n, max_adapter_experts=n * a.experts_per_layer)
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


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def workload(tok, n: int, rate: float, adapters: int, seed: int) -> list[dict]:
    """Poisson arrivals; a quarter of the prompts long (several task prompts in one), a quarter of the
    answers long; requests spread round-robin over the adapters (None = the base)."""
    from esft.data.conversations import prompt_text
    from esft.tasks import generate_split

    rng = random.Random(seed)
    texts = [p for p, _ in generate_split("translate_synth", "eval", 40, 0)] + \
            [p for p, _ in generate_split("arithmetic", "eval", 40, 0)]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    t, jobs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        user = " ".join(rng.sample(texts, 8)) if rng.random() < 0.25 else rng.choice(texts)
        ids = bos + tok.encode(prompt_text(user), add_special_tokens=False)
        long_answer = rng.random() < 0.25
        jobs.append({"at": t, "ids": ids, "adapter": f"a{i % adapters}" if adapters else None,
                     "max_tokens": rng.randint(96, 160) if long_answer else rng.randint(8, 24),
                     "short": not long_answer})
    return jobs


def run_open_loop(engine, jobs: list[dict]) -> dict:
    """Submit each job at its arrival time; per request: time to first token and to the last."""
    import threading

    from esft.serving.engine import GenParams

    done = threading.Semaphore(0)
    rec = [{"first": None, "end": None, "tokens": 0} for _ in jobs]

    def listener(i):
        def on(ev):
            now = time.perf_counter()
            if rec[i]["first"] is None:
                rec[i]["first"] = now
            if ev[0] in ("done", "error"):
                rec[i]["end"], rec[i]["tokens"] = now, ev[2] if ev[0] == "done" else 0
                done.release()
        return on

    start = time.perf_counter()
    for i, j in enumerate(jobs):
        delay = start + j["at"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        rec[i]["sent"] = time.perf_counter()
        engine.submit(j["adapter"], j["ids"], GenParams(max_tokens=j["max_tokens"], temperature=0.0,
                                                        ignore_eos=True), listener=listener(i))
    for _ in jobs:
        done.acquire()
    end = max(r["end"] for r in rec)
    ttft = [r["first"] - r["sent"] for r in rec]
    e2e = [r["end"] - r["sent"] for r in rec]
    short = [x for x, j in zip(e2e, jobs) if j["short"]]
    return {"tokens_per_s": sum(r["tokens"] for r in rec) / (end - start),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "e2e_p50": percentile(e2e, 50), "e2e_p99": percentile(e2e, 99), "short_e2e_p99": percentile(short, 99)}


def open_loop(a) -> int:
    import resource

    from esft.embedded import embedded_model_dir
    from esft.models.loading import load_model
    from esft.serving.engine import Engine, Limits
    from esft.serving.weave import Weaver

    model_dir = a.model or embedded_model_dir()
    model, tok = load_model(model_dir, dtype=a.dtype, device=a.device)
    if a.experts_implementation:
        model.config._experts_implementation = a.experts_implementation
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        most = max(a.adapters)
        dirs = make_adapters(model_dir, Path(tmp), most, a.experts_per_layer, a.seed) if most else []
        for n in sorted(a.adapters):
            m, _ = load_model(model_dir, dtype=a.dtype, device=a.device)
            if a.experts_implementation:
                m.config._experts_implementation = a.experts_implementation
            weaver = Weaver(m, max_adapters=n, max_adapter_experts=n * a.experts_per_layer) if n else None
            for i, d in enumerate(dirs[:n]):
                weaver.load(f"a{i}", d)
            for rate in a.rates:
                jobs = workload(tok, a.requests, rate, n, a.seed + int(rate * 1000))
                for scheduler in ("continuous", "static"):
                    engine = Engine(m, tok, weaver, max_batch=a.max_batch, scheduler=scheduler,
                                    limits=Limits(max_queue=10 * a.requests, prefill_chunk=a.prefill_chunk))
                    try:
                        run_open_loop(engine, jobs[:4])  # warm-up
                        res = run_open_loop(engine, jobs)
                        res.update(adapters=n, rate=rate, scheduler=scheduler,
                                   param_bytes=(weaver.weight_bytes() if weaver else param_bytes(m)),
                                   kv_cache_bytes=engine.cache.nbytes(),
                                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                    finally:
                        engine.close()
                    results.append(res)
                    print(f"  {n} adapter(s), {rate} req/s, {scheduler}: {res['tokens_per_s']:.0f} tok/s",
                          file=sys.stderr, flush=True)
            del m, weaver
    mib = 2**20
    print(f"\nOpen-loop load: {a.requests} requests per run, Poisson arrivals, 1/4 long prompts, 1/4 long answers "
          f"(96-160 tokens, else 8-24), greedy; max batch {a.max_batch}, prefill chunk {a.prefill_chunk}, "
          f"{torch.get_num_threads()} threads. Latencies in seconds; C = continuous, S = static.\n")
    head = ["adapters", "req/s", "tok/s C", "tok/s S", "TTFT p50 C", "TTFT p50 S", "TTFT p99 C", "TTFT p99 S",
            "e2e p50 C", "e2e p50 S", "e2e p99 C", "e2e p99 S", "short p99 C", "short p99 S", "S/C short p99",
            "params+KV MiB C", "peak RSS MiB"]
    print(" | ".join(head))
    print("|".join("---" for _ in head))
    pairs = {}
    for r in results:
        pairs.setdefault((r["adapters"], r["rate"]), {})[r["scheduler"]] = r
    for (n, rate), p in pairs.items():
        c, s = p["continuous"], p["static"]
        cells = [str(n), f"{rate:g}", f"{c['tokens_per_s']:.0f}", f"{s['tokens_per_s']:.0f}"]
        for k in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99", "short_e2e_p99"):
            cells += [f"{c[k]:.2f}", f"{s[k]:.2f}"]
        cells += [f"{s['short_e2e_p99'] / c['short_e2e_p99']:.1f}x",
                  f"{(c['param_bytes'] + c['kv_cache_bytes']) / mib:.1f}", f"{c['peak_rss_bytes'] / mib:.0f}"]
        print(" | ".join(cells))
    for rate in a.rates:
        base = pairs.get((0, rate), {}).get("continuous")
        at8 = pairs.get((8, rate), {}).get("continuous")
        if base and at8:
            ratio = at8["tokens_per_s"] / base["tokens_per_s"]
            print(f"\n{rate:g} req/s: throughput at 8 adapters / base alone (continuous): {ratio:.2f} "
                  f"(target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})")
    worst = min(p["static"]["short_e2e_p99"] / p["continuous"]["short_e2e_p99"] for p in pairs.values())
    print(f"short requests' p99 latency, static / continuous: worst {worst:.1f}x (target >= 3: "
          f"{'met' if worst >= 3 else 'MISSED'})")
    print(json.dumps({"mode": "open-loop", "settings": vars(a), "results": results}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["open-loop", "closed"], default="open-loop")
    ap.add_argument("--adapters", type=int, nargs="+", default=None,
                    help="adapter counts to measure (default: 0 1 8 16 open loop, 1 4 8 16 closed)")
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0], help="open loop: arrivals per second")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per measurement (default: 48 open loop, 96 closed)")
    ap.add_argument("--max-tokens", type=int, default=24, help="closed: tokens generated per request (greedy)")
    ap.add_argument("--max-batch", type=int, default=None, help="requests decoded together (default: 16 open "
                    "loop, 32 closed)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="open loop: prompt tokens prefilled per step")
    ap.add_argument("--experts-per-layer", type=int, default=3, help="experts each adapter changes per MoE layer")
    ap.add_argument("--repeats", type=int, default=5, help="closed: measurements per setting (the median)")
    ap.add_argument("--model", default=None, help="base checkpoint (default: the shipped model)")
    ap.add_argument("--experts-implementation", default=None,
                    help="transformers experts kernel for every model compared (eager, batched_mm, grouped_mm; "
                    "default: the model's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the served models run: cpu, cuda, cuda:N "
                    "(adapters are made on the CPU)")
    ap.add_argument("--dtype", default="float32", help="served models' dtype: float32, bfloat16")
    a = ap.parse_args(argv)
    openl = a.mode == "open-loop"
    a.adapters = a.adapters if a.adapters is not None else ([0, 1, 8, 16] if openl else [1, 4, 8, 16])
    a.requests = a.requests or (48 if openl else 96)
    a.max_batch = a.max_batch or (16 if openl else 32)
    if any(n < 0 for n in a.adapters) or (not openl and 0 in a.adapters):
        ap.error("--adapters: counts >= 0 (>= 1 in closed mode)")
    if any(r <= 0 for r in a.rates):
        ap.error("--rates must be > 0")
    return open_loop(a) if openl else closed_loop(a)


if __name__ == "__main__":
    sys.exit(main())
