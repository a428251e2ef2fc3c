"""Data pipeline figures: tokenizing a generated dataset cold, from the cache, and streamed.

    python benchmarks/data_pipeline.py [--tokens 20000000] [--work runs/bench-data]

Generates conversations (the synthetic task suite's, several per row, ~200 tokens a row) as JSON lines
and as parquet, at the full size and at half of it. Each measurement runs in a fresh process (peak RSS
is per process): `read_examples` cold (empty cache), the same again (from datasets' cache), and a
streamed read that consumes every row without keeping it. Prints a table, then one JSON line with every
figure, `cache_speedup` (cold / cached seconds, JSON lines) and `streaming_rss_ratio` (peak RSS of the
streamed read at the full size / at half: 1.0 = independent of the data's size).

Targets (issue 23): cached >= 10x faster than cold; streaming RSS independent of the data size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def generate(path_jsonl: Path, path_parquet: Path, tokens: int, tok) -> dict:
    """Rows of 3-turn conversations from the task suite until ``tokens`` (counted with the tokenizer)."""
    import datasets

    from esft.data.conversations import encode_reference
    from esft.tasks import generate_split, task_names

    names = task_names()
    pools = {t: generate_split(t, "train", 400, 0) for t in names}
    rows, total, i = [], 0, 0
    measured, measured_tokens = 0, 0
    while total < tokens:
        t = names[i % len(names)]
        pool = pools[t]
        msgs = []
        for k in range(3):
            p, a = pool[(i * 3 + k) % len(pool)]
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
        if i % 17 == 0:  # every 17th row (prime: not in step with the task cycle) tokenized: its mean estimates the rest
            measured += 1
            measured_tokens += len(encode_reference(msgs, tok)[0])
        total += measured_tokens / measured
        i += 1
    path_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(path_jsonl, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    datasets.Dataset.from_list(rows).to_parquet(str(path_parquet))
    return {"rows": len(rows), "approx_tokens": round(total)}


def phase(kind: str, data: str, cache: str) -> dict:
    """One measurement, in this (fresh) process."""
    os.environ["ESFT_DATA_CACHE"] = cache
    from esft.data.pipeline import read_examples
    from esft.models.loading import load_tokenizer

    tok = load_tokenizer("small")
    t0 = time.perf_counter()
    if kind == "stream":
        rows = tokens = 0
        for ex in read_examples(data, tok, streaming=True).examples:  # consumed, not kept
            rows += 1
            tokens += len(ex.input_ids)
    else:
        ex = read_examples(data, tok).examples
        rows, tokens = len(ex), sum(len(e.input_ids) for e in ex)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"kind": kind, "data": Path(data).name, "rows": rows, "tokens": tokens, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds), "tokens_per_s": round(tokens / seconds),
            "peak_rss_mib": round(rss)}


def run_phase(kind: str, data: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", kind, "--data", str(data), "--cache", str(cache)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000_000, help="tokens of the full-size dataset (default 20M)")
    ap.add_argument("--work", default="runs/bench-data", help="where the generated data and caches go")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(phase(a.phase, a.data, a.cache)))
        return
    import shutil

    from esft.models.loading import load_tokenizer

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    tok = load_tokenizer("small")
    sizes = {"full": a.tokens, "half": a.tokens // 2}
    made = {}
    for name, n in sizes.items():
        made[name] = generate(work / f"{name}.jsonl", work / f"{name}.parquet", n, tok)
        print(f"generated {name}: {made[name]['rows']:,} rows, ~{made[name]['approx_tokens']:,} tokens", flush=True)
    results = []
    for fmt in ("jsonl", "parquet"):
        data = work / f"full.{fmt}"
        cache = work / f"cache-{fmt}"
        for kind in ("cold", "cached"):
            results.append(run_phase(kind, data, cache))
            print(results[-1], flush=True)
    for name in ("half", "full"):
        results.append(run_phase("stream", work / f"{name}.jsonl", work / "cache-stream"))
        print(results[-1], flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"data pipeline ({os.cpu_count()} CPUs; tokenizer of the shipped model; reference template)")
    for c in ("read", "data", "rows", "tokens", "seconds", "rows/s", "tokens/s", "peak RSS MiB"):
        t.add_column(c)
    for r in results:
        t.add_row(r["kind"], r["data"], f"{r['rows']:,}", f"{r['tokens']:,}", str(r["seconds"]),
                  f"{r['rows_per_s']:,}", f"{r['tokens_per_s']:,}", str(r["peak_rss_mib"]))
    Console().print(t)
    by = {(r["kind"], r["data"]): r for r in results}
    summary = {
        "cpus": os.cpu_count(), "generated": made, "results": results,
        "cache_speedup": round(by[("cold", "full.jsonl")]["seconds"] / by[("cached", "full.jsonl")]["seconds"], 1),
        "cache_speedup_parquet": round(by[("cold", "full.parquet")]["seconds"]
                                       / by[("cached", "full.parquet")]["seconds"], 1),
        "streaming_rss_ratio": round(by[("stream", "full.jsonl")]["peak_rss_mib"]
                                     / by[("stream", "half.jsonl")]["peak_rss_mib"], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
