#!/usr/bin/env python
"""Merge benchmark: peak memory of `esft merge` on a generated multi-shard bf16 checkpoint.

Generates (fixed seed, once, under --work) a random DeepSeek-V2-style checkpoint written straight
as safetensors shards with the keys transformers' deepseek_v2 ``save_pretrained`` writes (the model
is never built; the key list is checked against a tiny model's save_pretrained): by default 8
layers (the first dense), 64 routed experts of 1024 x 512 + 2 shared per MoE layer, ~830M parameters,
~1.66 GB in bf16, shards of <= 450 MB, plus config.json and generation_config.json. Then a random
bf16 adapter of 5 experts over 3 layers (~16 MB) whose esft_adapter.json records the base's
``checkpoint_fingerprint``. It runs `esft merge` in a subprocess and reads that process's peak
RSS from wait4(), checks the merged tensors, and prints a table; the LAST line is one JSON object.

Target: peak RSS <= largest shard + adapter + 300 MB.

    .venv/bin/python benchmarks/merge_memory.py                 # ~1 min on 2 cores, ~5 GB of disk
    .venv/bin/python benchmarks/merge_memory.py --work /tmp/bm --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_EXPERTS = {1: [3, 17], 4: [5, 40], 7: [63]}
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, first_k_dense_replace=1,
              moe_intermediate_size=512, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
              num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=256, q_lora_rank=None,
              qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=4096,
              topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def key_shapes(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, from a meta-device model (no weights allocated)."""
    from transformers import AutoModelForCausalLM

    from esft.adapter.fingerprint import checkpoint_key_shapes

    with torch.device("meta"):
        return checkpoint_key_shapes(AutoModelForCausalLM.from_config(config))


def check_keys_against_save_pretrained(tmp: Path) -> None:
    """The generator's key list equals what transformers writes for the same architecture, shrunk."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(CONFIG, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, moe_intermediate_size=16,
                 n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=2,
                 kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
    cfg = AutoConfig.for_model("deepseek_v2", **small)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp))
    with safe_open(str(tmp / "model.safetensors"), "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == key_shapes(cfg), "generated keys differ from transformers' save_pretrained"


def generate_base(out: Path, shard_bytes: int, seed: int) -> None:
    """Random bf16 weights, written shard by shard (keys sorted, as transformers orders them)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    cfg = AutoConfig.for_model("deepseek_v2", dtype="bfloat16", **CONFIG)
    shapes = key_shapes(cfg)
    groups, cur, size = [], [], 0
    for k in sorted(shapes):
        n = 2 * torch.Size(shapes[k]).numel()
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    groups.append(cur)
    g = torch.Generator().manual_seed(seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
        print(f"  wrote {name}", file=sys.stderr, flush=True)
    index = {"metadata": {"total_parameters": total // 2, "total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(str(tmp))
    GenerationConfig(bos_token_id=0, eos_token_id=1).save_pretrained(str(tmp))
    os.replace(tmp, out)


def generate_adapter(base: Path, out: Path, seed: int) -> float:
    """Random bf16 experts for ADAPTER_EXPERTS + metadata with the base's fingerprint; returns fingerprint seconds."""
    from safetensors.torch import save_file

    from esft import __version__
    from esft.adapter.fingerprint import checkpoint_fingerprint
    from esft.adapter.shards import open_checkpoint

    ckpt = open_checkpoint(base)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for layer, experts in ADAPTER_EXPERTS.items():
        for e in experts:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                k = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                tensors[k] = (torch.randn(ckpt.tensors[k].shape, generator=g) * 0.02).to(torch.bfloat16)
    checkpoint_fingerprint(base)  # the first call also imports the modeling code (seconds): not what is timed
    t0 = time.perf_counter()
    fp = checkpoint_fingerprint(base)
    fp_seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter.safetensors"), metadata={"format": "pt"})
    (out / "expert_cfg.json").write_text(json.dumps({"experts": {str(l): es for l, es in ADAPTER_EXPERTS.items()},
                                                     "shared_experts": False, "non_expert_modules": False}))
    (out / "esft_adapter.json").write_text(json.dumps({
        "format": "esft-expert-adapter", "format_version": 1, "esft_version": __version__, "model_type": "deepseek_v2",
        "base_model": fp, "num_tensors": len(tensors), "num_parameters": sum(t.numel() for t in tensors.values())}))
    return fp_seconds


# Linux counts the parent's RSS at fork in the child's ru_maxrss (the old mm's high-water mark
# survives exec), and this process has held whole shards while generating them: so the measured
# command is started by a bare interpreter (-S, ~10 MB), which reports its child's wait4() rusage.
_LAUNCHER = """import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), time.perf_counter() - t, usage.ru_maxrss * 1024], f)
"""


def run_measured(cmd: list[str], work: Path) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS bytes) of ``cmd`` run in its own process (Linux: ru_maxrss is in KiB)."""
    result = work / "measured.json"
    subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(result), *cmd], cwd=ROOT, check=True)
    rc, seconds, peak = json.loads(result.read_text())
    result.unlink()
    return rc, seconds, peak


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def verify(base: Path, adapter: Path, out: Path) -> None:
    """Rewritten tensors equal the adapter's, a few others equal the base's, dtypes are the base's."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from esft.adapter.shards import open_checkpoint

    a = load_file(str(adapter / "adapter.safetensors"))
    src, dst = open_checkpoint(base), open_checkpoint(out)
    assert {k: (t.dtype, t.shape) for k, t in src.tensors.items()} == {k: (t.dtype, t.shape) for k, t in dst.tensors.items()}
    others = [k for k in list(src.tensors)[::97] if k not in a]
    for k in list(a) + others:
        with safe_open(str(dst.tensors[k].file), "pt") as f:
            got = f.get_tensor(k)
        if k in a:
            want = a[k]
        else:
            with safe_open(str(src.tensors[k].file), "pt") as f:
                want = f.get_tensor(k)
        assert torch.equal(got, want), k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-merge"), help="directory for the generated files")
    ap.add_argument("--shard-mb", type=int, default=450, help="largest shard size in MB (default 450)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the merged checkpoint (the base is always kept for reuse)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base, adapter, out = work / "base", work / "adapter", work / "merged"
    spec = {"config": CONFIG, "shard_mb": a.shard_mb, "seed": a.seed}
    marker = work / "base.spec.json"
    if not (base.is_dir() and marker.is_file() and json.loads(marker.read_text()) == spec):
        check_keys_against_save_pretrained(work / "keys-check")
        shutil.rmtree(work / "keys-check", ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        print(f"generating the base checkpoint in {base} ...", file=sys.stderr, flush=True)
        generate_base(base, a.shard_mb * 10**6, a.seed)
        marker.write_text(json.dumps(spec))
    fp_seconds = generate_adapter(base, adapter, a.seed)

    esft = Path(sys.executable).with_name("esft")
    cli = [str(esft)] if esft.exists() else [sys.executable, "-c", "import sys; from esft.cli import main; sys.exit(main())"]
    rc, seconds, peak = run_measured(cli + ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out),
                                            "--overwrite"], work)
    if rc != 0:
        print(f"esft merge failed with exit code {rc}", file=sys.stderr)
        return 1
    _, _, floor = run_measured([sys.executable, "-c", "import esft.cli, esft.adapter.merge, transformers, safetensors"], work)
    verify(base, adapter, out)

    shards = sorted(base.glob("*.safetensors"))
    rec = {"peak_rss_bytes": peak, "largest_shard_bytes": max(f.stat().st_size for f in shards),
           "adapter_bytes": (adapter / "adapter.safetensors").stat().st_size, "output_bytes": dir_bytes(out),
           "base_bytes": dir_bytes(base), "seconds": round(seconds, 2), "shards": len(shards),
           "import_floor_rss_bytes": floor, "checkpoint_fingerprint_seconds": round(fp_seconds, 2)}
    budget = rec["largest_shard_bytes"] + rec["adapter_bytes"] + 300 * 2**20
    rec["target_bytes"] = budget
    rec["target_met"] = peak <= budget
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    rows = [("base checkpoint", f"{mib(rec['base_bytes'])} in {len(shards)} bf16 shards"),
            ("largest shard", mib(rec["largest_shard_bytes"])), ("adapter", mib(rec["adapter_bytes"])),
            ("esft merge peak RSS", mib(peak)), ("  of which interpreter + imports alone", mib(floor)),
            ("target: largest shard + adapter + 300 MiB", f"{mib(budget)} -> {'met' if rec['target_met'] else 'NOT met'}"),
            ("esft merge wall time", f"{seconds:.1f} s"),
            ("output / base size", f"{mib(rec['output_bytes'])} / {mib(rec['base_bytes'])} = "
                                   f"{rec['output_bytes'] / rec['base_bytes']:.4f}"),
            ("checkpoint_fingerprint from the shards (modeling code imported)", f"{fp_seconds:.2f} s")]
    print()
    print("| figure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(rec))
    return 0 if rec["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
