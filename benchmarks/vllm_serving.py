#!/usr/bin/env python
"""ESFT adapters on vLLM (the plugin, src/esft/vllm_plugin) against vLLM serving the base alone and against
today's `esft serve --engine esft`: one machine, one open-loop request stream, every engine over HTTP.

Engines, each started as a server, measured, and shut down before the next:
  vllm base alone       vLLM's OpenAI server on the base checkpoint, the plugin not loaded (VLLM_PLUGINS=none)
  vllm+esft N           `esft serve --engine vllm` with N adapters (N = 0: the plugin on, requests on the base)
  esft serve N          `esft serve --engine esft` (this package's engine) with N adapters
The base alone runs first and again last, so drift of a shared machine shows; ratios use their mean.

Workload (as benchmarks/serve_throughput.py): Poisson arrivals at --rate requests/s (open loop: arrivals
do not wait for answers), a quarter of the prompts long (8 task prompts in one), a quarter of the answers
long (96-160 tokens, else 8-24, EOS ignored), greedy, streamed; request i goes to adapter a{i % N} (the
base when N = 0). Per engine: output tokens/s (first arrival to last token), time to first token and
end-to-end latency (p50, p99), and memory: the weights the engine holds (base checkpoint + the adapter
slots both engines preallocate, --max-adapter-experts per layer, computed from their shapes) and the peak resident memory of the server's processes (RSS summed over
its process group; vLLM's includes the KV cache it touched out of VLLM_CPU_KVCACHE_SPACE).

The LAST line printed is one JSON object with `throughput_ratio_8_adapters` (vllm+esft at 8 adapters /
vllm base alone).

    make bench-vllm                       # builds .venv-vllm if needed, then runs this with .venv's python
    .venv/bin/python benchmarks/vllm_serving.py --rate 32 --requests 128 --adapters 0 1 8 16 --esft-adapters 0 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vllm_plugin"))


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


# ---- checkpoints ----------------------------------------------------------------------------------------

def build(root: Path, a) -> dict:
    """A random tiny Qwen3-MoE base and max(adapters) ESFT adapters of it (cached under root)."""
    from fixtures import make_adapter

    from esft.adapter.fingerprint import checkpoint_fingerprint
    from esft.models.tiny import make_tiny_checkpoint

    key = {"layers": a.layers, "hidden": a.hidden, "experts": a.experts, "adapters": max(a.adapters + a.esft_adapters),
           "per_layer": a.experts_per_layer, "seed": a.seed}
    done = root / "done.json"
    base = root / "base"
    dirs = [root / "adapters" / f"a{i}" for i in range(key["adapters"])]
    if not (done.exists() and json.loads(done.read_text()) == key):
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        make_tiny_checkpoint(base, family="qwen3_moe", seed=a.seed, num_layers=a.layers, hidden=a.hidden,
                             head_dim=64, num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=64,
                             intermediate_size=256, num_experts=a.experts, num_experts_per_tok=4)
        rng = random.Random(a.seed)
        for i, d in enumerate(dirs):
            sel = {l: rng.sample(range(a.experts), a.experts_per_layer) for l in range(a.layers)}
            make_adapter(base, d, sel, seed=1000 + i, scale=0.5)
        (root / "fingerprint.json").write_text(json.dumps(checkpoint_fingerprint(base)))
        done.write_text(json.dumps(key))
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return {"base": base, "adapters": dirs, "weight_bytes": weights}


def workload(tok_dir: Path, n: int, rate: float, seed: int) -> list[dict]:
    from esft.data.conversations import prompt_text
    from esft.tasks import generate_split

    rng = random.Random(seed)
    texts = [p for p, _ in generate_split("translate_synth", "eval", 40, 0)] + \
            [p for p, _ in generate_split("arithmetic", "eval", 40, 0)]
    t, jobs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        user = " ".join(rng.sample(texts, 8)) if rng.random() < 0.25 else rng.choice(texts)
        long_answer = rng.random() < 0.25
        jobs.append({"at": t, "prompt": prompt_text(user),
                     "max_tokens": rng.randint(96, 160) if long_answer else rng.randint(8, 24)})
    return jobs


# ---- servers --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid``."""
    total = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:  # field 5 of stat: pgrp
                continue
            for line in (p / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


class Server:
    def __init__(self, cmd: list[str], env: dict, port: int, log: Path):
        self.port, self.log = port, log
        self.f = open(log, "w")
        # its own process group: vLLM's engine-core process is a child; the whole group is ended in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.f, stderr=subprocess.STDOUT, start_new_session=True)
        self.peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, group_rss(self.proc.pid))
            self._stop.wait(0.5)

    def wait_ready(self, timeout: float = 900) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log {self.log}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not up in {timeout} s; log {self.log}")

    def stop(self):
        self._stop.set()
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may outlive its leader for a moment (engine core shutting down)
        for _ in range(30):
            if group_rss(self.proc.pid) == 0:
                break
            time.sleep(1)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.f.close()


def one_request(port: int, model: str, job: dict, rec: dict) -> None:
    body = {"model": model, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    rec["sent"] = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=1800) as r:
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if ev.get("choices") and ev["choices"][0].get("text") and rec.get("first") is None:
                    rec["first"] = time.perf_counter()
                if ev.get("usage"):
                    rec["tokens"] = ev["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["end"] = time.perf_counter()
    rec.setdefault("first", rec["end"])


def run_open_loop(port: int, jobs: list[dict], models: list[str]) -> dict:
    recs = [{} for _ in jobs]
    threads = []
    start = time.perf_counter()
    for i, j in enumerate(jobs):
        delay = start + j["at"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one_request, args=(port, models[i % len(models)], j, recs[i]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    errors = [r["error"] for r in recs if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    end = max(r["end"] for r in recs)
    ttft = [r["first"] - r["sent"] for r in recs]
    e2e = [r["end"] - r["sent"] for r in recs]
    return {"tokens": sum(r.get("tokens", 0) for r in recs), "tokens_per_s": sum(r.get("tokens", 0) for r in recs)
            / (end - start), "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "e2e_p50": percentile(e2e, 50), "e2e_p99": percentile(e2e, 99)}


def slot_bytes(a, slots: int) -> int:
    """Adapter expert slots: per MoE layer ``slots`` x (gate + up + down) rows of the served dtype."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[a.dtype]
    return a.layers * slots * 3 * 64 * a.hidden * itemsize  # moe_intermediate_size 64 (build())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8, 16], help="vllm+esft adapter counts")
    ap.add_argument("--esft-adapters", type=int, nargs="*", default=[0, 8], help="esft serve adapter counts")
    ap.add_argument("--rate", type=float, default=32.0, help="arrivals per second (open loop)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the workload per engine; the table shows the "
                    "median run by throughput")
    ap.add_argument("--max-batch", type=int, default=16, help="requests decoded together (both engines)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--experts-per-layer", type=int, default=2, help="experts each adapter changes per layer")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="compute threads of every engine (OMP_NUM_THREADS; vLLM's binding off)")
    ap.add_argument("--compile", action="store_true", help="vLLM's default compiled model (default: --enforce-eager, "
                    "as start-up compiles take minutes on a small CPU)")
    ap.add_argument("--out", default="runs/bench_vllm")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = (REPO / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    vpy = os.environ.get("ESFT_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(vpy).exists():
        raise SystemExit(f"no vLLM Python at {vpy}: run `make vllm-venv` (or set ESFT_VLLM_PYTHON)")
    esft_cli = str(Path(sys.executable).parent / "esft")
    ck = build(out / "ckpt", a)
    jobs = workload(ck["base"], a.requests, a.rate, a.seed)
    warm = workload(ck["base"], 4, a.rate, a.seed + 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "ESFT_VLLM_PYTHON": vpy}
    env.pop("ESFT_API_KEY", None)
    vargs = [] if a.compile else ["--enforce-eager"]
    vargs += ["--max-model-len", "2048", "--seed", "0"]
    runs = [("vllm base alone", "plain", 0)] + [("vllm+esft", "plugin", n) for n in a.adapters] + \
           [("esft serve", "esft", n) for n in a.esft_adapters] + [("vllm base alone", "plain", 0)]
    results = []
    for label, kind, n in runs:
        port = free_port()
        adapters = [f"--adapter=a{i}={ck['adapters'][i]}" for i in range(n)]
        slots = ["--max-adapters", str(max(n, 1)), "--max-adapter-experts", str(max(n, 1) * a.experts_per_layer)]
        if kind == "plain":
            cmd = [vpy, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ck["base"]), "--served-model-name",
                   "base", "--port", str(port), "--dtype", a.dtype, "--max-num-seqs", str(a.max_batch), *vargs]
            e = {**env, "VLLM_PLUGINS": "none"}
        else:
            cmd = [esft_cli, "serve", "--engine", "vllm" if kind == "plugin" else "esft", "--model", str(ck["base"]),
                   "--adapter-root", str(out), "--port", str(port), "--dtype", a.dtype, "--max-batch",
                   str(a.max_batch), *slots, *adapters]
            e = {**env, "ESFT_VLLM_ARGS": " ".join(vargs)}
        log = out / f"server_{len(results)}_{kind}_{n}.log"
        print(f"  {label} {n}: starting", file=sys.stderr, flush=True)
        srv = Server(cmd, e, port, log)
        try:
            startup = srv.wait_ready()
            models = [f"a{i}" for i in range(n)] or ["base"]
            run_open_loop(port, warm, models)  # warm-up
            reps = [run_open_loop(port, jobs, models) for _ in range(a.repeats)]
            res = sorted(reps, key=lambda r: r["tokens_per_s"])[(len(reps) - 1) // 2]  # the median run (lower)
            res["tokens_per_s_runs"] = [r["tokens_per_s"] for r in reps]
        finally:
            srv.stop()
        # both engines preallocate --max-adapter-experts slots per layer (esft serve: serving/weave.py)
        weights = ck["weight_bytes"] + (slot_bytes(a, max(n, 1) * a.experts_per_layer) if kind != "plain" else 0)
        res.update(engine=label, kind=kind, adapters=n, startup_s=startup, weight_bytes=weights,
                   peak_rss_bytes=srv.peak)
        results.append(res)
        print(f"  {label} {n}: {res['tokens_per_s']:.0f} tok/s (start-up {startup:.0f} s)", file=sys.stderr, flush=True)

    mib = 2**20
    base_runs = [r for r in results if r["kind"] == "plain"]
    base_tps = statistics.mean(r["tokens_per_s"] for r in base_runs)
    print(f"\n{a.requests} requests, Poisson arrivals at {a.rate:g}/s, 1/4 long prompts, 1/4 long answers "
          f"(96-160 tokens, else 8-24), greedy, streamed over HTTP; {a.dtype}, max batch {a.max_batch}, "
          f"{a.threads} thread(s) per engine; vLLM {'compiled' if a.compile else '--enforce-eager'}; tiny Qwen3-MoE "
          f"({a.layers} layers, hidden {a.hidden}, {a.experts} experts, top-4), adapters of {a.experts_per_layer} "
          f"experts per layer. Latencies in seconds.\n")
    head = ["engine", "adapters", "tok/s", "vs vLLM base", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99",
            "weights MiB", "peak RSS MiB", "start-up s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in results:
        print("| " + " | ".join([r["engine"], str(r["adapters"]), f"{r['tokens_per_s']:.0f}",
                                 f"{r['tokens_per_s'] / base_tps:.2f}", f"{r['ttft_p50']:.2f}", f"{r['ttft_p99']:.2f}",
                                 f"{r['e2e_p50']:.2f}", f"{r['e2e_p99']:.2f}", f"{r['weight_bytes'] / mib:.1f}",
                                 f"{r['peak_rss_bytes'] / mib:.0f}", f"{r['startup_s']:.0f}"]) + " |")
    at8 = next((r for r in results if r["kind"] == "plugin" and r["adapters"] == 8), None)
    ratio = at8["tokens_per_s"] / base_tps if at8 else None
    if ratio is not None:
        print(f"\nvllm+esft at 8 adapters / vllm base alone: {ratio:.2f} (target >= 0.9: "
              f"{'met' if ratio >= 0.9 else 'MISSED'})")
    print(json.dumps({"bench": "vllm_serving", "throughput_ratio_8_adapters": ratio, "base_alone_tokens_per_s":
                      [r["tokens_per_s"] for r in base_runs], "settings": vars(a), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
