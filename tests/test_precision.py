"""Mixed precision: bf16 model, fp32 master weights and AdamW state for what trains (CPU, bf16)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from esft.models.loading import checkpoint_dtype, load_model
from esft.models.registry import base_experts, moe_layers
from esft.training.config import TrainConfig
from esft.training.experts import apply_esft
from esft.training.precision import MasterWeights
from esft.training.recipe import make_optimizer, train

SEL = {"1": [0, 3], "2": [5]}


@pytest.fixture(scope="module")
def bf16_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint stored in bf16 (as real checkpoints are), with its tokenizer and data."""
    root = tmp_path_factory.mktemp("bf16")
    model, tok = load_model(tiny_dir / "model", dtype="bfloat16", device="cpu")
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    shutil.copy(tiny_dir / "train.jsonl", root / "train.jsonl")
    (root / "sel.json").write_text(json.dumps({"experts": SEL}))
    assert checkpoint_dtype(root / "model") == torch.bfloat16
    return root


def _cfg(root, out, **kw):
    base = dict(model=str(root / "model"), train_data=str(root / "train.jsonl"), output_dir=str(out),
                expert_config=str(root / "sel.json"), seq_len=128, batch_size=2, steps=10, lr=1e-5, eval_every=0,
                save_every=0, log_every=1, tensorboard=False, device="cpu", dtype="bfloat16", valid_fraction=0)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def _base_rows(model_dir, key):
    """The base checkpoint's value of one per-expert adapter key, read from the fused tensors."""
    model, _ = load_model(model_dir, dtype="float32", device="cpu", with_tokenizer=False)
    parts = key.split(".")
    layer, expert, proj = int(parts[2]), int(parts[5]), parts[6]
    ex = base_experts(moe_layers(model)[[l.index for l in moe_layers(model)].index(layer)].experts)
    inter = ex.gate_up_proj.shape[1] // 2
    return {"gate_proj": ex.gate_up_proj[expert, :inter], "up_proj": ex.gate_up_proj[expert, inter:],
            "down_proj": ex.down_proj[expert]}[proj].detach()


def _changed_fraction(adapter: dict, model_dir) -> float:
    changed = total = 0
    for k, t in adapter.items():
        base = _base_rows(model_dir, k)
        changed += int((t.float() != base).sum())
        total += t.numel()
    return changed / total


def test_bf16_training_at_paper_lr_changes_the_selected_weights(bf16_dir, tmp_path):
    """lr 1e-5, 10 steps, bf16 model: every selected weight moves (in the fp32 masters)."""
    res = train(_cfg(bf16_dir, tmp_path / "run", adapter_dtype="float32"), progress=False)
    adapter = load_file(str(tmp_path / "run" / "last" / "adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    frac = _changed_fraction(adapter, bf16_dir / "model")
    assert frac >= 0.99, frac
    assert res.master_weight_bytes == 4 * res.trainable_params  # one fp32 master per bf16 trainable element

    # Control, the flaw being fixed: AdamW stepping the bf16 weights in place loses most updates.
    model, tok = load_model(bf16_dir / "model", dtype="bfloat16", device="cpu")
    plan = apply_esft(model, {"experts": {int(k): v for k, v in SEL.items()}})
    opt = make_optimizer(plan.parameters(), _cfg(bf16_dir, tmp_path / "x"))
    before = {n: p.detach().clone() for n, p in plan.params.items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    naive = sum(int((p != before[n]).sum()) for n, p in plan.params.items()) / plan.num_trainable()
    assert naive < 0.5 * frac, (naive, frac)


def test_bf16_loss_curve_tracks_fp32(bf16_dir, tmp_path):
    """Same data and steps in bf16 and fp32 (lr 1e-2 so that the loss really falls).

    Tolerance: 1% relative per step. bf16 rounds activations to 8 significant bits (~0.4%), which
    moves a mean loss by far less; measured here: at most 0.04% over 20 steps (the loss falls ~7%).
    """
    kw = dict(lr=1e-2, steps=20)
    train(_cfg(bf16_dir, tmp_path / "bf16", dtype="bfloat16", **kw), progress=False)
    train(_cfg(bf16_dir, tmp_path / "fp32", dtype="float32", **kw), progress=False)
    lb, lf = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert len(lb) == len(lf) == 20
    assert lf[-1] < 0.96 * lf[0]  # the run learns, so tracking means something
    for step, (b, f) in enumerate(zip(lb, lf), 1):
        assert abs(b - f) <= 0.01 * f, f"step {step}: bf16 loss {b:.4f} vs fp32 {f:.4f}"


def test_adapter_is_written_in_the_base_checkpoint_dtype_by_default(bf16_dir, tmp_path):
    train(_cfg(bf16_dir, tmp_path / "a", dtype="float32", steps=2), progress=False)  # fp32 compute, bf16 base
    meta = json.loads((tmp_path / "a" / "last" / "esft_adapter.json").read_text())
    tensors = load_file(str(tmp_path / "a" / "last" / "adapter.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert meta["dtype"] == "bfloat16" and meta["trained_dtype"] == "float32"
    assert meta["template"] == {"name": "reference", "chat_template": None}


def test_master_weights_and_adam_state_scale_with_the_selected_experts():
    from conftest import build_tiny

    model = build_tiny("deepseek_v2").to(torch.bfloat16)
    plan = apply_esft(model, {"experts": {1: [0, 2, 7], 2: [4]}})
    mw = MasterWeights(plan.params)
    opt = make_optimizer(mw.parameters(), TrainConfig(model="m", train_data="d", output_dir="o", expert_config="x"))
    ids = torch.randint(3, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    mw.accumulate()
    assert all(p.grad is None for p in plan.parameters())  # bf16 grads handed over to the masters
    opt.step()
    mw.sync()
    ex = base_experts(moe_layers(model)[0].experts)
    per_expert = ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
    assert mw.master_bytes() == 4 * 4 * per_expert  # 4 selected experts, fp32
    state = [v for st in opt.state.values() for v in st.values() if v.dim() > 0]
    assert {v.dtype for v in state} == {torch.float32}
    assert sum(v.numel() for v in state) == 2 * 4 * per_expert
    for n, p in plan.params.items():  # the model's bf16 weights are the masters, rounded
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, mw.masters[n].to(torch.bfloat16))


def test_fp16_uses_loss_scaling_and_tracks_fp32(bf16_dir, tmp_path):
    """fp16's narrow range needs a loss scale (torch.amp.GradScaler) on top of the fp32 masters."""
    kw = dict(lr=1e-2, steps=6, save_every=6)
    train(_cfg(bf16_dir, tmp_path / "fp16", dtype="float16", **kw), progress=False)
    train(_cfg(bf16_dir, tmp_path / "fp32", dtype="float32", **kw), progress=False)
    lh, lf = _losses(tmp_path / "fp16"), _losses(tmp_path / "fp32")
    # The scaler starts at 2^16 and may skip a first overflowing step; after that the curves agree.
    for step, (h, f) in enumerate(zip(lh[2:], lf[2:]), 3):
        assert abs(h - f) <= 0.01 * f, f"step {step}: fp16 loss {h:.4f} vs fp32 {f:.4f}"
    state = json.loads((tmp_path / "fp16" / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0  # saved for resume
    adapter = load_file(str(tmp_path / "fp16" / "last" / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_baselines_train_in_bf16(bf16_dir, tmp_path, method):
    res = train(_cfg(bf16_dir, tmp_path / method, method=method, expert_config=None, lr=1e-3, steps=2),
                progress=False)
    losses = _losses(tmp_path / method)
    assert len(losses) == 2 and all(l == l for l in losses)  # finite, not NaN
    if method == "full":  # every weight is bf16 with an fp32 master
        assert res.master_weight_bytes == 4 * res.trainable_params
        model, _ = load_model(tmp_path / method / "last", dtype="bfloat16", device="cpu")
        base, _ = load_model(bf16_dir / "model", dtype="bfloat16", device="cpu")
        changed = sum(int((a != b).sum()) for a, b in zip(model.parameters(), base.parameters()))
        assert changed > 0.5 * res.trainable_params
    else:  # PEFT keeps LoRA weights in fp32: their own masters
        assert res.master_weight_bytes == 0


def test_bf16_resume_equals_an_uninterrupted_bf16_run(bf16_dir, tmp_path):
    """Checkpoints keep the fp32 masters, so a resumed bf16 run continues bit for bit."""
    kw = dict(lr=1e-3, steps=4, save_every=2, adapter_dtype="float32")
    train(_cfg(bf16_dir, tmp_path / "straight", **kw), progress=False)
    train(_cfg(bf16_dir, tmp_path / "split", **{**kw, "steps": 2}), progress=False)
    train(_cfg(bf16_dir, tmp_path / "split", **kw, resume=True), progress=False)
    a = load_file(str(tmp_path / "straight" / "last" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
