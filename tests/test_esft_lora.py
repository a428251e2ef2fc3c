"""method=esft-lora: LoRA on the selected experts only. Exact at init, trains S x r factors only, saves a PEFT
adapter that plain PEFT loads, resumes, and is evaluated, merged and served like an ESFT adapter."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny
from esft.adapter.esft_lora import (PEFT_CONFIG, PEFT_WEIGHTS, is_lora_adapter, materialize, read_lora_adapter,
                                    save_lora_adapter)
from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import AdapterError, merge_adapter
from esft.io import DataError
from esft.models.loading import load_model
from esft.models.registry import moe_layers
from esft.training.config import TrainConfig
from esft.training.esft_lora import apply_esft_lora, load_factors
from esft.training.recipe import make_optimizer, optimizer_state_bytes, train

SEL = {1: [3, 0], 2: [5]}  # not sorted: rows follow the config's order
RANK, ALPHA = 2, 8


def _ids(n=2, t=16, seed=0):
    return torch.randint(3, 200, (n, t), generator=torch.Generator().manual_seed(seed))  # within the tiny vocab


def _perturb(plan, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def make_lora_adapter(model_dir, out, sel=SEL, seed=1, rank=RANK, alpha=ALPHA):
    """An ESFT-LoRA adapter of the checkpoint at model_dir with visibly non-zero factors, saved to ``out``."""
    model, _ = load_model(model_dir)
    fp = model_fingerprint(model)
    plan = apply_esft_lora(model, {"experts": sel}, rank, alpha)
    _perturb(plan, seed)
    save_lora_adapter(plan, out, fp, {"method": "esft-lora", "template": {"name": "reference", "chat_template": None}})
    return out


def _attached(model_dir, adapter_dir):
    """The base with the adapter attached unmerged (the training wrapper, factors loaded)."""
    model, _ = load_model(model_dir)
    la = read_lora_adapter(adapter_dir)
    plan = apply_esft_lora(model, la.expert_cfg, la.rank, la.alpha)
    load_factors(plan, la.factors)
    return model.eval()


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory):
    return make_lora_adapter(tiny_dir / "model", tmp_path_factory.mktemp("esft_lora") / "adapter")


def test_exact_at_init_and_only_the_selected_experts_factors_train():
    base = build_tiny()
    model = copy.deepcopy(base)
    plan = apply_esft_lora(model, {"experts": SEL}, RANK, ALPHA)
    ids = _ids()
    # at init B = 0: every effective expert weight is the base's, bit for bit, and so is the output up to the
    # float rounding of the overlay's split sum (the same as method=esft)
    for l in moe_layers(model):
        if l.index in SEL:
            for n, w in l.experts.merged().items():
                assert torch.equal(w, getattr(l.experts.base, n)), (l.index, n)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-6)
    # trainable: A [S, r, in] and B [S, out, r] of gate_up_proj [2I, H] and down_proj [H, I], nothing else
    H, I = 64, 32
    want = sum(len(es) for es in SEL.values()) * RANK * ((H + 2 * I) + (I + H))
    assert plan.num_trainable() == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(plan.params)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_optimizer(plan.parameters(), TrainConfig(model="-", train_data="-", output_dir="-", method="full",
                                                        lr=1e-2))
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * want * 4  # AdamW's two fp32 moments, of the factors only
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)


def test_saved_adapter_is_a_peft_adapter_with_the_same_logits(tiny_dir, lora_dir):
    from peft import PeftModel

    peft_cfg = json.loads((lora_dir / PEFT_CONFIG).read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == RANK and peft_cfg["lora_alpha"] == ALPHA
    assert sorted(peft_cfg["target_parameters"]) == sorted(f"model.layers.{l}.mlp.experts.{n}"
                                                           for l in SEL for n in ("gate_up_proj", "down_proj"))
    meta = json.loads((lora_dir / "esft_adapter.json").read_text())
    assert {l: r["experts"] for l, r in meta["lora"]["layers"].items()} == {str(l): es for l, es in SEL.items()}
    assert meta["base_model"]["weights"] and is_lora_adapter(lora_dir)
    ids = _ids()
    attached = _attached(tiny_dir / "model", lora_dir)
    base, _ = load_model(tiny_dir / "model")
    with torch.no_grad():
        want = attached(input_ids=ids).logits
        assert not torch.allclose(want, base(input_ids=ids).logits, atol=1e-3)  # the adapter does change the model
        got = PeftModel.from_pretrained(base, str(lora_dir)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_equals_base_plus_adapter_row_by_row(tiny_dir, lora_dir, tmp_path):
    """esft merge: each selected expert is W_e + (alpha/r) B_e @ A_e, computed here from PEFT's tensors as PEFT
    lays them out (A [r*E, in] expert-major, B [out, r*E] rank-major); every other tensor is the base's, bit for bit."""
    from esft.adapter.merge import merge_checkpoint

    merge_checkpoint(tiny_dir / "model", lora_dir, tmp_path / "merged")
    merged, _ = load_model(tmp_path / "merged")
    base, _ = load_model(tiny_dir / "model")
    t = load_file(str(lora_dir / PEFT_WEIGHTS))
    pre = "base_model.model.model.layers.{}.mlp.experts"
    mp, bp = dict(merged.named_parameters()), dict(base.named_parameters())
    assert mp.keys() == bp.keys()
    for name in bp:
        layer = next((l for l in SEL if name.startswith(f"model.layers.{l}.mlp.experts.")), None)
        param = name.rsplit(".", 1)[-1]
        if layer is None or param not in ("gate_up_proj", "down_proj"):
            assert torch.equal(mp[name], bp[name]), name
            continue
        key = pre.format(layer) + (".base_layer" if param == "gate_up_proj" else "")
        A, B = t[key + ".lora_A.weight"], t[key + ".lora_B.weight"]
        E = bp[name].shape[0]
        for e in range(E):
            if e in SEL[layer]:
                A_e = A[e * RANK:(e + 1) * RANK]  # [r, in]
                B_e = B[:, [j * E + e for j in range(RANK)]]  # [out, r]
                want = bp[name][e] + (ALPHA / RANK) * (B_e @ A_e)
                torch.testing.assert_close(mp[name][e], want, rtol=0, atol=1e-6)
                assert not torch.allclose(mp[name][e], bp[name][e], atol=1e-3)
            else:
                assert torch.equal(mp[name][e], bp[name][e]), (name, e)
    ids = _ids(seed=3)
    with torch.no_grad():  # and as a model: the merged checkpoint computes base + attached adapter
        torch.testing.assert_close(merged(input_ids=ids).logits,
                                   _attached(tiny_dir / "model", lora_dir)(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    rec = json.loads((tmp_path / "merged" / "esft_merge.json").read_text())
    assert rec["base_check"] == "fingerprint matches" and rec["template"]["name"] == "reference"


def test_served_greedy_completion_equals_the_merged_models(tiny_dir, lora_dir, tmp_path):
    """esft serve weaves the adapter's merged rows into the expert overlay, beside the base and an ESFT adapter."""
    from conftest import make_adapter
    from esft.serving.engine import Engine, GenParams
    from esft.serving.server import _load
    from esft.serving.weave import Weaver

    esft_dir = make_adapter(tiny_dir, tmp_path / "esft", {1: [3, 9]}, 4)
    model, tok = load_model(tiny_dir / "model")
    w = Weaver(model.eval(), max_adapters=2, max_adapter_experts=4)
    engine = Engine(model, tok, w, max_batch=4)
    prompt = [5, 17, 42, 9, 30, 11]
    try:
        _load(engine, "elora", lora_dir)
        _load(engine, "esft", esft_dir)
        reqs = {n: engine.submit(n, prompt, GenParams(max_tokens=10, ignore_eos=True, logprobs=0))
                for n in ("elora", None, "esft")}
        served = {}
        for n, r in reqs.items():
            ev = []
            while not ev or ev[-1][0] not in ("done", "error"):
                ev.append(r.events.get(timeout=60))
            assert ev[-1] == ("done", "length", 10), ev[-1]
            served[n] = [lp[0] for e in ev if e[0] == "text" for lp in e[2]]
    finally:
        engine.close()
    merged, _ = load_model(tiny_dir / "model")
    merge_adapter(merged, materialize(read_lora_adapter(lora_dir), merged))
    base, _ = load_model(tiny_dir / "model")
    ids = torch.tensor([prompt])
    for n, m in (("elora", merged), (None, base)):
        out = m.eval().generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        assert served[n] == out[0, len(prompt):].tolist(), n
    assert served["elora"] != served[None]  # the adapter changes the completion


def _cfg(tiny_dir, out, sel_file, **kw):
    base = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"),
                valid_data=str(tiny_dir / "valid.jsonl"), output_dir=str(out), method="esft-lora",
                expert_config=str(sel_file), seq_len=128, batch_size=2, steps=4, lr=1e-2, eval_every=2,
                save_every=2, log_every=1, tensorboard=False, lora_rank=RANK, lora_alpha=ALPHA)
    base.update(kw)
    return TrainConfig(**base)


def test_train_keeps_the_best_adapter_resumes_exactly_and_evaluates(tiny_dir, tmp_path):
    from esft.eval.run import adapter_format, load_for_eval

    sel_file = tmp_path / "sel.json"
    sel_file.write_text(json.dumps({"experts": {str(l): es for l, es in SEL.items()}}))
    straight = train(_cfg(tiny_dir, tmp_path / "a", sel_file), progress=False)
    assert straight.adapter_dir == str(tmp_path / "a" / "adapter") == straight.best_dir
    assert straight.trainable_params == 3 * RANK * (64 + 64 + 32 + 64)
    assert straight.optimizer_state_bytes == 2 * 4 * straight.trainable_params
    meta = json.loads((tmp_path / "a" / "adapter" / "esft_adapter.json").read_text())
    assert meta["method"] == "esft-lora" and meta["valid_loss"] == pytest.approx(straight.best_valid_loss)
    assert (tmp_path / "a" / "last" / PEFT_WEIGHTS).exists()

    class Stop(Exception):
        pass

    cfg = _cfg(tiny_dir, tmp_path / "b", sel_file)
    model, tok = load_model(cfg.model)
    calls, orig = {"n": 0}, model.forward

    def crash_on_third_step(*a, **k):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Stop
        return orig(*a, **k)

    model.forward = crash_on_third_step
    with pytest.raises(Stop):
        train(cfg, model=model, tokenizer=tok, progress=False)
    assert (tmp_path / "b" / "checkpoints" / "step-2").is_dir() and not (tmp_path / "b" / "last").exists()
    resumed = train(_cfg(tiny_dir, tmp_path / "b", sel_file, resume=True), progress=False)
    assert resumed.train_loss == pytest.approx(straight.train_loss, rel=1e-5)
    a, b = (load_file(str(tmp_path / d / "last" / PEFT_WEIGHTS)) for d in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # a resume with another rank is refused (it would not continue the same run)
    with pytest.raises(Exception, match="lora_rank"):
        train(_cfg(tiny_dir, tmp_path / "b", sel_file, resume=True, steps=6, lora_rank=1), progress=False)

    # esft eval: the adapter's recorded template, its merged rows in the model
    assert adapter_format(str(tmp_path / "a" / "adapter")).name == "reference"
    model, _, kind = load_for_eval(str(tiny_dir / "model"), str(tmp_path / "a" / "adapter"))
    assert kind == "esft-lora"
    ids = _ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   _attached(tiny_dir / "model", tmp_path / "a" / "adapter")(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input

def test_config_refusals_name_the_problem(tiny_dir, tmp_path):
    from esft.config import ConfigError, build_config
    from esft.training.distributed import check_layout

    common = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="method=esft-lora needs expert_config"):
        TrainConfig(method="esft-lora", **common)
    with pytest.raises(ValueError, match="lora_dropout=0.1.*set lora_dropout=0"):
        TrainConfig(method="esft-lora", expert_config="x.json", lora_dropout=0.1, **common)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        TrainConfig(method="full", lora_dropout=1.5, **common)
    with pytest.raises(ValueError, match="method must be esft, full, lora or esft-lora"):
        TrainConfig(method="esft_lora", **common)
    over = [f"{k}={v}" for k, v in common.items()] + ["method=esft-lora", "expert_config=x.json"]
    for bad, field in (("lora_rank=2.5", "lora_rank must be an integer"), ("lora_rank=true", "lora_rank must be an "
                       "integer"), ("lora_dropout='0'", "lora_dropout must be a number"),
                       ("lora_alpha=[1]", "lora_alpha must be an integer"), ("lora_rank=0", "lora_rank must be >= 1")):
        with pytest.raises((ConfigError, ValueError), match=field):
            build_config(TrainConfig, None, over + [bad])
    assert build_config(TrainConfig, None, over + ["lora_dropout=0"]).lora_dropout == 0.0
    with pytest.raises(NotImplementedError, match="method=esft-lora under torchrun"):
        check_layout(TrainConfig(method="esft-lora", expert_config="x.json", batch_size=2, **common), 2)


def test_rank_above_the_experts_smaller_dimension_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    model = build_tiny()
    # gate_up_proj [2I, H] = 64 x 64 takes rank 33; down_proj [H, I] = 64 x 32 does not
    with pytest.raises(DataError, match=r"lora_rank=33 is larger than the smaller dimension of layer 1's "
                                        r"model\.layers\.1\.mlp\.experts\.down_proj: one expert's down_proj is 64 x 32, "
                                        r"so its rank is at most 32; pass lora_rank<=32"):
        apply_esft_lora(model, {"experts": SEL}, 33, 16)
    assert not any(p.requires_grad is False for p in model.parameters())  # refused before freezing anything
    sel_file = tmp_path / "sel.json"
    sel_file.write_text(json.dumps({"experts": {"2": [1]}}))
    with pytest.raises(DataError, match=r"lora_rank=40 is larger than the smaller dimension of layer 2's .*64 x 32"):
        train(_cfg(tiny_dir, tmp_path / "out", sel_file, lora_rank=40), progress=False)
    assert not (tmp_path / "out").exists()


def test_selection_without_routed_experts_or_with_ablation_flags_is_refused():
    with pytest.raises(DataError, match="selects no routed expert"):
        apply_esft_lora(build_tiny(), {"experts": {1: [], 2: []}}, 2, 4)
    with pytest.raises(DataError, match="shared_experts=true.*selected routed experts only"):
        apply_esft_lora(build_tiny(), {"experts": SEL, "shared_experts": True}, 2, 4)
    with pytest.raises(DataError, match="layer 1 expert 99 does not exist"):
        apply_esft_lora(build_tiny(), {"experts": {1: [99]}}, 2, 4)


def test_adapter_on_another_base_is_refused_everywhere(tiny_dir, lora_dir, tmp_path):
    from esft.adapter.merge import merge_checkpoint
    from esft.eval.run import load_for_eval
    from esft.serving.weave import Weaver

    other, tok = load_model(tiny_dir / "model")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other.save_pretrained(str(tmp_path / "other"))
    tok.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(AdapterError, match="trained on a different base model: its weights fingerprint"):
        materialize(read_lora_adapter(lora_dir), other)
    with pytest.raises(AdapterError, match="trained on a different base model"):
        Weaver(copy.deepcopy(other).eval()).load("x", lora_dir)
    with pytest.raises(AdapterError, match="trained on a different base model"):
        load_for_eval(str(tmp_path / "other"), str(lora_dir))
    with pytest.raises(AdapterError, match="trained on a different base model"):
        merge_checkpoint(tmp_path / "other", lora_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    # allow_other_base: loads (same shapes)
    assert materialize(read_lora_adapter(lora_dir), other, allow_other_base=True).tensors


def test_damaged_or_foreign_lora_adapters_are_refused(lora_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(lora_dir, bad)
    t = load_file(str(bad / PEFT_WEIGHTS))
    key = "base_model.model.model.layers.1.mlp.experts.lora_B.weight"
    t[key] = t[key] + 0.1  # every expert's B non-zero: a LoRA on all experts, not on the selected ones
    t[key.replace("lora_B", "lora_A")] = t[key.replace("lora_B", "lora_A")] + 0.1
    save_file(t, str(bad / PEFT_WEIGHTS))
    with pytest.raises(AdapterError, match="non-zero LoRA factors for expert.*which expert_cfg.json does not select"):
        read_lora_adapter(bad)
    t[key][0, 0] = float("nan")
    save_file(t, str(bad / PEFT_WEIGHTS))
    with pytest.raises(AdapterError, match="non-finite"):
        read_lora_adapter(bad)
    cfg = json.loads((lora_dir / PEFT_CONFIG).read_text())
    shutil.copy(lora_dir / PEFT_WEIGHTS, bad / PEFT_WEIGHTS)
    (bad / PEFT_CONFIG).write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(AdapterError, match="says r=4.*records rank=2"):
        read_lora_adapter(bad)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_other_layouts_peft_and_on_disk_merge_agree(family, tmp_path):
    """gpt-oss stores its experts transposed ([E, in, out]) and fused in its checkpoint, Qwen3-MoE per expert: PEFT
    and the on-disk merge read the factors the same way as the training wrapper."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esft.adapter.merge import merge_checkpoint

    base = build_tiny(family)
    base.save_pretrained(str(tmp_path / "base"))
    layer = moe_layers(base)[0].index
    model = copy.deepcopy(base)
    plan = apply_esft_lora(model, {"experts": {layer: [1, 0]}}, RANK, ALPHA)
    _perturb(plan, 7)
    save_lora_adapter(plan, tmp_path / "a", model_fingerprint(base))
    ids = _ids(t=12)
    merge_checkpoint(tmp_path / "base", tmp_path / "a", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(PeftModel.from_pretrained(base, str(tmp_path / "a"))(input_ids=ids).logits, want,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    w = plan.wrappers[layer].merged()
    for n, t in w.items():
        torch.testing.assert_close(dict(merged.named_parameters())[f"{plan.module_names[layer]}.{n}"], t, rtol=0,
                                   atol=1e-6)
