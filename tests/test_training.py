"""Only the selected experts learn: gradients, optimizer memory, frozen weights, resume."""

import json

import pytest
import torch

from conftest import build_tiny
from esft.models.loading import load_model
from esft.models.registry import base_experts, moe_layers
from esft.training.config import TrainConfig
from esft.training.experts import apply_esft
from esft.training.recipe import make_optimizer, train

SEL = {1: [0, 5, 9], 2: [3]}


def _batch(vocab=500, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    return ids, ids.clone()


def test_expert_gradients_equal_rows_of_full_gradient():
    """Independent computation: backprop through the untouched model w.r.t. the fused tensors."""
    full = build_tiny("deepseek_v2")
    esft = build_tiny("deepseek_v2")
    ids, labels = _batch()
    full(input_ids=ids, labels=labels).loss.backward()
    plan = apply_esft(esft, {"experts": SEL})
    esft(input_ids=ids, labels=labels).loss.backward()
    full_layers = {l.index: l.experts for l in moe_layers(full)}
    for layer, w in plan.wrappers.items():
        for s, e in enumerate(w.selected):
            torch.testing.assert_close(w.trained.gate_up_proj.grad[s], full_layers[layer].gate_up_proj.grad[e],
                                       rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(w.trained.down_proj.grad[s], full_layers[layer].down_proj.grad[e],
                                       rtol=1e-4, atol=1e-7)
        assert w.base.gate_up_proj.grad is None  # no full-size gradient exists
    assert [p for n, p in esft.named_parameters() if p.grad is not None and n not in plan.params] == []


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "mixtral"])
def test_optimizer_state_scales_with_selected_experts(family):
    model = build_tiny(family)
    layers = moe_layers(model)
    sel = {l.index: [0, 2] if i == 0 else [1] for i, l in enumerate(layers)}
    plan = apply_esft(model, {"experts": sel})
    opt = make_optimizer(plan.parameters(), TrainConfig(model="m", train_data="d", output_dir="o", expert_config="x"))
    ids, labels = _batch()
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    state_elems = sum(v.numel() for st in opt.state.values() for v in st.values() if v.dim() > 0)
    ex = base_experts(layers[0].experts)
    per_expert = ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
    n_selected = sum(len(v) for v in sel.values())
    assert state_elems == 2 * n_selected * per_expert  # AdamW: exp_avg + exp_avg_sq, selected experts only
    all_expert_elems = sum(base_experts(l.experts).gate_up_proj.numel() + base_experts(l.experts).down_proj.numel()
                           for l in layers)
    assert state_elems / (2 * all_expert_elems) == pytest.approx(n_selected / (len(layers) * ex.gate_up_proj.shape[0]))


def _snapshot(model):
    """All base weights under their plain names (wrapped experts' frozen tensors included)."""
    return {n.replace(".experts.base.", ".experts."): p.detach().clone()
            for n, p in model.named_parameters() if ".experts.trained." not in n}


def _train_steps(model, plan_params, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(plan_params, lr=lr, weight_decay=0.1)
    for s in range(steps):
        ids, labels = _batch(seed=s)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()


def test_everything_but_selected_experts_is_bit_identical_after_training():
    model = build_tiny("deepseek_v2")
    before = _snapshot(model)
    plan = apply_esft(model, {"experts": SEL})
    trained_before = {l: w.trained.gate_up_proj.detach().clone() for l, w in plan.wrappers.items()}
    _train_steps(model, plan.parameters())
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for n in before:  # unselected experts, routers, attention, embeddings, norms, LM head, shared experts
        assert torch.equal(before[n], after[n]), n
    for l, w in plan.wrappers.items():
        assert not torch.equal(trained_before[l], w.trained.gate_up_proj)  # the selected experts did learn
    merged = {l.index: l.experts.merged() for l in moe_layers(model)}
    for l, es in SEL.items():
        base = before[f"model.layers.{l}.mlp.experts.gate_up_proj"]
        unselected = [e for e in range(16) if e not in es]
        assert torch.equal(merged[l]["gate_up_proj"][unselected], base[unselected])
        assert not torch.equal(merged[l]["gate_up_proj"][es], base[es])


@pytest.mark.parametrize("shared,non_expert", [(True, False), (False, True)])
def test_ablation_options_train_shared_or_non_expert_modules(shared, non_expert):
    model = build_tiny("deepseek_v2")
    plan = apply_esft(model, {"experts": SEL, "shared_experts": shared, "non_expert_modules": non_expert})
    names = set(plan.params)
    assert any("shared_experts" in n for n in names)
    assert any("self_attn" in n for n in names) == non_expert
    assert not any(".experts.base." in n for n in names)
    before = _snapshot(model)
    _train_steps(model, plan.parameters(), steps=1)
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("shared_experts" in n for n in changed)
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in changed)


def _cfg(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"),
                valid_data=str(tiny_dir / "valid.jsonl"), output_dir=str(out), method="esft",
                expert_config=str(tiny_dir / "cfg_train.json"), seq_len=128, batch_size=2, steps=4, lr=1e-3,
                eval_every=2, save_every=2, log_every=1, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_interruption_equals_uninterrupted_run(tiny_dir, tmp_path):
    (tiny_dir / "cfg_train.json").write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}}))
    straight = train(_cfg(tiny_dir, tmp_path / "a"), progress=False)

    class Stop(Exception):
        pass

    cfg = _cfg(tiny_dir, tmp_path / "b")
    model, tok = load_model(cfg.model)
    calls = {"n": 0}
    orig = model.forward

    def crash_on_third_step(*a, **k):  # the 3rd training forward (after the step-2 checkpoint) "crashes"
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Stop
        return orig(*a, **k)

    model.forward = crash_on_third_step
    with pytest.raises(Stop):
        train(cfg, model=model, tokenizer=tok, progress=False)
    assert (tmp_path / "b" / "checkpoints" / "step-2").is_dir()
    assert not (tmp_path / "b" / "last").exists()
    resumed = train(_cfg(tiny_dir, tmp_path / "b", resume=True), progress=False)
    assert resumed.train_loss == pytest.approx(straight.train_loss, rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "last" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # same math; thread scheduling may reorder sums


def test_full_fine_tuning_baseline_trains_everything(tiny_dir, tmp_path):
    res = train(_cfg(tiny_dir, tmp_path / "fft", method="full", expert_config=None, steps=2), progress=False)
    model, _ = load_model(tiny_dir / "model")
    assert res.trainable_params == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "fft" / "last" / "config.json").exists()
    # like ESFT and LoRA keep their best adapter, full fine-tuning keeps its best checkpoint by validation loss
    assert res.best_dir == str(tmp_path / "fft" / "best") and (tmp_path / "fft" / "best" / "model.safetensors").exists()


def test_gradient_checkpointing_gives_the_same_expert_gradients():
    a, b = build_tiny("deepseek_v2"), build_tiny("deepseek_v2")
    pa, pb = apply_esft(a, {"experts": SEL}), apply_esft(b, {"experts": SEL})
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    a.train(), b.train()
    ids, labels = _batch()
    a(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    b(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    for p, q in zip(pa.parameters(), pb.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


def test_lora_baseline_trains_attention_and_expert_adapters(tiny_dir, tmp_path):
    """PEFT LoRA (rank 8, attention + fused expert tensors); the saved adapter reloads with esft eval's loader."""
    from esft.eval.run import load_for_eval

    (tiny_dir / "cfg_train.json").write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}}))
    res = train(_cfg(tiny_dir, tmp_path / "lora", method="lora", expert_config=None, steps=2), progress=False)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    base, _ = load_model(tiny_dir / "model")
    assert 0 < res.trainable_params < sum(p.numel() for p in base.parameters()) / 2  # tiny model: rank 8 is large here
    model, _, kind = load_for_eval(str(tiny_dir / "model"), str(tmp_path / "lora" / "adapter"))
    assert kind == "lora"
    changed = [n for (n, p), (_, q) in zip(sorted(base.state_dict().items()), sorted(model.state_dict().items()))
               if not torch.equal(p, q)]
    assert any("self_attn" in n for n in changed) and any("experts" in n for n in changed)


def test_gradient_accumulation_equals_one_big_batch(tiny_dir, tmp_path):
    """2 micro-batches of 1 row == 1 batch of 2 rows (token-weighted), so the trained adapters agree."""
    from safetensors.torch import load_file

    (tiny_dir / "cfg_train.json").write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}}))
    big = train(_cfg(tiny_dir, tmp_path / "big", steps=2, batch_size=2, grad_accum=1, valid_data=None,
                     valid_fraction=0.0), progress=False)
    acc = train(_cfg(tiny_dir, tmp_path / "acc", steps=2, batch_size=1, grad_accum=2, valid_data=None,
                     valid_fraction=0.0), progress=False)
    assert acc.train_loss == pytest.approx(big.train_loss, rel=1e-5)
    a = load_file(str(tmp_path / "big" / "last" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "acc" / "last" / "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
