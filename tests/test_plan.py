"""esft plan: its estimate against the tensors and memory of real CPU training steps, the published
configs' parameter counts, and the command (table, JSON, bad layouts and expert configs -> exit 2).

The measured model is DeepSeek-V2-style with 21.5M parameters (the training benchmark's shape), so
that tensors, not the interpreter, dominate. One process: the estimate's 1/N sharding is then 1/1.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esft.cli import main
from esft.planning import PlanConfig, make_plan

MEASURED = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=2048, first_k_dense_replace=1, n_routed_experts=64,
                num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=128, kv_lora_rank=64,
                q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=48, topk_method="greedy",
                n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, tie_word_embeddings=False)
SELECTED = {1: [0, 9, 17, 33, 60], 2: [1, 2, 3, 4, 5], 3: [7, 14, 21, 28, 63]}  # 15 of 192 routed experts (7.8%)
TENSORS = ("weights", "fp32 masters", "gradients", "optimizer state")


def _config(**over):
    from transformers import AutoConfig

    return AutoConfig.for_model("deepseek_v2", **{**MEASURED, **over})


@pytest.fixture(scope="module")
def measured_dir(tmp_path_factory) -> Path:
    """config.json of the measured model and an expert_cfg.json for it (no weights: the plan needs none)."""
    d = tmp_path_factory.mktemp("plan")
    _config().save_pretrained(str(d))
    (d / "expert_cfg.json").write_text(json.dumps({"experts": {str(k): v for k, v in SELECTED.items()},
                                                   "shared_experts": False, "non_expert_modules": False}))
    return d


def _model(dtype: torch.dtype, method: str):
    """The measured model, random, in ``dtype``, with ESFT applied or every parameter trainable."""
    from transformers import AutoModelForCausalLM

    from esft.training.experts import apply_esft
    from esft.training.recipe import full_plan

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config()).to(dtype)
    with torch.no_grad():  # spread the routers so routing depends on the input, as in a trained model
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    params = dict(apply_esft(model, {"experts": SELECTED}).params) if method == "esft" else full_plan(model)
    model.train()
    return model, params


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, MEASURED["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------- tensors: exact


@pytest.mark.parametrize("method", ["esft", "full"])
def test_weights_masters_gradients_optimizer_match_a_training_step(measured_dir, method):
    """bf16 model + fp32 masters + AdamW, one step as the recipe does it; tensor bytes against the plan."""
    from esft.training.precision import MasterWeights
    from esft.training.recipe import optimizer_state_bytes

    kw = {"expert_config": str(measured_dir / "expert_cfg.json")} if method == "esft" else {}
    plan = make_plan(PlanConfig(model=str(measured_dir), gpus=1, dtype="bfloat16", method=method, micro_batch=1,
                                seq_len=16, **kw))
    model, params = _model(torch.bfloat16, method)
    masters = MasterWeights(params)
    opt = torch.optim.AdamW(masters.parameters(), lr=1e-5, foreach=True)
    ids = _ids(1, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    masters.accumulate()
    for m in masters.parameters():  # an expert no token reached still steps (as under torchrun: zeros)
        if m.grad is None:
            m.grad = torch.zeros_like(m)
    grads = sum(m.grad.numel() * m.grad.element_size() for m in masters.parameters())
    opt.step()
    measured = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                "fp32 masters": masters.master_bytes(), "gradients": grads,
                "optimizer state": optimizer_state_bytes(opt)}
    print(f"\n{method} bf16, one process: " + ", ".join(
        f"{k} estimated {plan.bytes[k] / 2**20:.2f} / measured {measured[k] / 2**20:.2f} MiB" for k in TENSORS))
    for k in TENSORS:  # the issue asks for 20%; these are counted exactly
        assert plan.bytes[k] == pytest.approx(measured[k], rel=1e-6), k
    assert plan.trainable.params == sum(p.numel() for p in params.values())


# ----------------------------------------------------------------------------------------- activations


def _rss(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _forward_backward(model, ids, weight_grads: bool):
    """One forward + backward as esft train runs it (the output, with its logits, alive until backward ends).

    ``weight_grads=False``: backward computes only the activations' gradients (autograd.grad with
    respect to the input embeddings), not the weights': full fine-tuning's weight gradients are the
    plan's 'gradients' row, and each layer's would otherwise sit in the measured peak."""
    if weight_grads:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids, use_cache=False)
    torch.autograd.grad(out.loss, [embeds])
    return out


def _peak_growth(model, ids, count_saved: bool, weight_grads: bool) -> tuple[int, int]:
    """(peak RSS growth over one forward + backward, bytes autograd saved in the forward)."""
    param_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storage:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    gc.collect()
    base = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else contextlib.nullcontext()
    with hooks:
        _forward_backward(model, ids, weight_grads)
    return _rss("VmHWM") - base, sum(saved.values())


def _measure_activations() -> list[dict]:
    """In a fresh process (see the test): peak RSS growth of fp32 forward + backward on 1 x 256 tokens."""
    import warnings

    warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's rename notice
    torch.set_num_threads(1)
    ids, rows = _ids(1, 256), []
    for method in ("esft", "full"):
        model, params = _model(torch.float32, method)
        for p in params.values():  # ESFT's few weight gradients: dropped as they arrive
            p.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
        weight_grads = method == "esft"
        for ckpt in (False, True):
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                _forward_backward(model, ids, weight_grads)  # warm-up (one-time buffers)
            peak, saved = _peak_growth(model, ids, not ckpt, weight_grads)
            rows.append({"method": method, "ckpt": ckpt, "peak": peak, "saved": saved})
        del model, params
        gc.collect()
    return rows


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, glibc malloc settings")
def test_activation_estimate_against_peak_rss_of_forward_backward(measured_dir):
    """fp32, 1 x 256 tokens per forward, ESFT and full fine-tuning, gradient checkpointing off and on.

    Measured in a fresh process whose glibc malloc serves every block >= 4 KiB by mmap
    (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the RSS at once and the peak RSS growth over
    a forward + backward is the activations'. Weight gradients are the plan's 'gradients' row and kept
    out: ESFT's few are dropped as they arrive, full fine-tuning's are not computed (backward to the
    input embeddings only; the forward saves the same tensors). In a long-lived process freed heap blocks are reused and the RSS
    under-counts, which is why this is not measured in the pytest process.

    Measured here over two runs (estimate / peak RSS growth): ESFT 0.95-0.96, full 1.00-1.02; with
    checkpointing ESFT 0.94-0.96, full 0.97-1.00. Another shape (hidden 384, 5 layers, 32 experts, top-4, 2 x 256 tokens) gave 0.90, 1.00,
    0.96, 0.98. The checkpointing factor 1.3 was fitted on these two models' runs. Reported, asserted
    only to a factor of 2 (the RSS includes allocator rounding; the estimate leaves out small index
    tensors and assumes uniform routing).
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, __file__, "measure-activations"], capture_output=True, text=True,
                       env=env, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    kw = {"expert_config": str(measured_dir / "expert_cfg.json")}
    for row in json.loads(r.stdout.strip().splitlines()[-1]):
        method, ckpt, peak = row["method"], row["ckpt"], row["peak"]
        plan = make_plan(PlanConfig(model=str(measured_dir), gpus=1, dtype="float32", method=method, micro_batch=1,
                                    seq_len=256, gradient_checkpointing=ckpt, **(kw if method == "esft" else {})))
        est = plan.bytes["activations"]
        print(f"\n{method} fp32 1x256 checkpointing {'on' if ckpt else 'off'}: activations estimated "
              f"{est / 2**20:.1f} MiB, peak RSS growth {peak / 2**20:.1f} MiB (ratio {est / peak:.2f})"
              + (f", autograd saved {row['saved'] / 2**20:.1f} MiB" if row["saved"] else ""))
        assert 0.5 < est / peak < 2, "the activation formula is far off the measurement"


# ----------------------------------------------------------------------------------------- published configs


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "deepseek-v2", "deepseek-v3"])
def test_published_configs_have_the_published_parameter_counts(name):
    from esft.models.published import PUBLISHED, published_config
    from esft.planning import meta_model

    model = meta_model(published_config(name))
    assert all(p.device.type == "meta" for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(PUBLISHED[name].total_params, rel=0.02), f"{n / 1e9:.2f}B"


def test_published_plans():
    lite = make_plan(PlanConfig(model="deepseek-v2-lite", gpus=8, gradient_checkpointing=True))
    assert lite.fits and lite.min_gpus == 1
    # the paper's reference config trains 124 of 1664 experts (7.5%); 5 of 64 per layer is 130
    assert lite.trainable.selected_experts == 130
    assert lite.trainable.params == 130 * 3 * 2048 * 1408
    full = make_plan(PlanConfig(model="deepseek-v3", gpus=8, method="full", gradient_checkpointing=True))
    assert not full.fits and full.min_gpus > 8
    # optimizer state per rank: 8 bytes per parameter / N
    assert full.bytes["optimizer state"] == pytest.approx(full.shape.params * 8 / 8)


# ----------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory) -> Path:
    from esft.models.tiny import tiny_config

    d = tmp_path_factory.mktemp("tiny")
    tiny_config("deepseek_v2").save_pretrained(str(d))  # 3 layers (the first dense), 16 routed experts
    return d


def test_cli_prints_a_table_and_json(tiny_config_dir, capsys):
    assert main(["plan", "--model", str(tiny_config_dir), "--gpus", "2", "--gpu-memory", "1",
                 "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "fp32 masters", "gradients", "optimizer state", "activations", "transient", "total",
                 "fits", "fewest GPUs"):
        assert word in out
    assert main(["plan", "--model", str(tiny_config_dir), "--method", "full", "--gpus", "4", "--ep-size", "2",
                 "--dtype", "fp32", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["dtype"] == "float32" and plan["per_rank_bytes"]["fp32 masters"] == 0
    assert plan["fits"] is True and plan["min_gpus"] == 2  # ep 2: multiples of 2
    assert plan["per_rank_bytes"]["optimizer state"] == plan["params"] * 8 // 4


def test_cli_tiny_gpu_memory_does_not_fit(tiny_config_dir, capsys):
    assert main(["plan", "--model", str(tiny_config_dir), "--gpu-memory", "0.0001", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["min_gpus"] is None and "none" in plan["min_gpus_note"]


@pytest.mark.parametrize("args, message", [
    (["--gpus", "4", "--ep-size", "3"], "ep_size=3 must divide the number of GPUs (4)"),
    (["--gpus", "6", "--ep-size", "3"], "ep_size=3 does not divide the model's 16 routed experts"),
    (["--gpus", "4", "--fsdp-size", "2"], "fsdp_size=2 does not match the 4 GPUs"),
    (["--dtype", "int8"], "dtype must be one of"),
    (["--expert-share", "0.2", "--method", "full"], "for method=esft"),
    (["--expert-share", "1.5"], "expert share must be in (0, 1]"),
])
def test_cli_bad_layouts_exit_2(tiny_config_dir, capsys, args, message):
    assert main(["plan", "--model", str(tiny_config_dir), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("experts, message", [
    ({"0": [1]}, "layer 0 is not an MoE layer of this model (MoE layers: [1, 2])"),
    ({"1": [99]}, "layer 1 expert 99 does not exist (the model has experts 0..15)"),
])
def test_cli_expert_config_for_another_model_exits_2(tiny_config_dir, tmp_path, capsys, experts, message):
    cfg = tmp_path / "expert_cfg.json"
    cfg.write_text(json.dumps({"experts": experts}))
    assert main(["plan", "--model", str(tiny_config_dir), "--expert-config", str(cfg)]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_exits_2(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err


if __name__ == "__main__":  # python tests/test_plan.py measure-activations (the activation test's fresh process)
    if sys.argv[1:] == ["measure-activations"]:
        print(json.dumps(_measure_activations()))
