"""Loss-Free Balancing and MaxVio (esft.training.balance), against independent recomputations.

The routing of a biased router (DeepSeek-V3's: sigmoid scores, bias added for the top-k choice only,
group-limited, gate values normalised over the chosen experts) is recomputed naively, token by token,
from the router's input, weight and bias; profiling, the load meter and the bias update must agree.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build_tiny
from esft.models.registry import moe_layers
from esft.training.balance import (LoadMeter, max_violation, maxvio_summary, routing_biases, to_dtype_keeping_bias,
                                   update_bias)


def naive_route(h, weight, bias, top_k, n_group, topk_group, norm):
    """h [N, H] -> (chosen [N][K] expert ids, gate values [N][K]), one token at a time, in Python."""
    E = weight.shape[0]
    per_group = E // n_group
    chosen, gates = [], []
    for t in range(h.shape[0]):
        s = [float(torch.sigmoid(h[t].double() @ weight[e].detach().double())) for e in range(E)]
        c = [s[e] + float(bias[e]) for e in range(E)]
        gscore = [sum(sorted(c[g * per_group:(g + 1) * per_group], reverse=True)[:2]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        allowed = [e for e in range(E) if e // per_group in keep]
        ids = sorted(allowed, key=lambda e: -c[e])[:top_k]
        g = [s[e] for e in ids]
        if norm:
            tot = sum(g)
            g = [x / tot for x in g]
        chosen.append(ids)
        gates.append(g)
    return chosen, gates


def biased_v3(seed=0):
    model = build_tiny("deepseek_v3", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in routing_biases(model).values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)  # large enough to change choices
    return model


def capture_router_inputs(model):
    seen, handles = {}, []
    for l in moe_layers(model):
        def pre(mod, args, idx=l.index):
            seen.setdefault(idx, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(l.router.register_forward_pre_hook(pre))
    return seen, handles


def test_update_rule_is_the_papers():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([5, 1, 3, 3]), 0.01)  # mean 3: overloaded down, underloaded up, balanced stays
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    update_bias(bias, torch.tensor([0, 0, 0, 12]), 0.01)
    assert bias.tolist() == pytest.approx([0.0, 0.02, 0.01, -0.01])


def test_maxvio_matches_definition():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        load = torch.randint(0, 50, (16,), generator=g)
        mean = sum(load.tolist()) / 16
        want = max(load.tolist()) / mean - 1 if mean else math.nan
        got = max_violation(load)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert max_violation([3, 3, 3, 3]) == 0.0
    assert max_violation([8, 0, 0, 0]) == pytest.approx(3.0)  # one expert takes all: E - 1 at top-1
    s = maxvio_summary({1: [2, 2], 3: [4, 0], 5: [0, 0]})
    assert s["per_layer"] == {"1": 0.0, "3": 1.0, "5": None} and s["mean"] == 0.5 and s["max"] == 1.0


def test_profile_and_meter_follow_the_biased_choice():
    """Profiling counts and scores, and the load meter, equal a naive recomputation of DeepSeek-V3 routing:
    biased top-k choice (group-limited), unbiased gate values normalised over the chosen experts."""
    from esft.profiling.profiler import profile_routing

    model = biased_v3()
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    seen, handles = capture_router_inputs(model)
    with LoadMeter(model) as meter:
        meter.begin_batch(mask)
        prof = profile_routing(model, [{"input_ids": ids, "attention_mask": mask}])
        load = meter.take()
    for h in handles:
        h.remove()
    flat = mask.reshape(-1).bool()
    changed = 0
    for layer in moe_layers(model):
        l = layer.index
        h = seen[l][0]
        bias = routing_biases(model)[l]
        chosen, gates = naive_route(h, layer.router.weight, bias, cfg.num_experts_per_tok, cfg.n_group,
                                    cfg.topk_group, cfg.norm_topk_prob)
        unbiased, _ = naive_route(h, layer.router.weight, torch.zeros_like(bias), cfg.num_experts_per_tok,
                                  cfg.n_group, cfg.topk_group, cfg.norm_topk_prob)
        changed += sum(set(a) != set(b) for a, b, m in zip(chosen, unbiased, flat) if m)
        E, K, T = layer.num_experts, cfg.num_experts_per_tok, ids.shape[1]
        counts = [0] * E
        gate_sum, tok_sum = [0.0] * E, [0.0] * E
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            for t in range(n):
                for e, gv in zip(chosen[b * T + t], gates[b * T + t]):
                    counts[e] += 1
                    gate_sum[e] += gv / n
                    tok_sum[e] += 1 / (n * K)
        assert prof.counts[l] == counts, f"layer {l}"
        assert load[l].tolist() == counts, f"layer {l}"
        assert prof.gate_scores[l] == pytest.approx([x / 2 for x in gate_sum], abs=1e-6)
        assert prof.token_scores[l] == pytest.approx([x / 2 for x in tok_sum], abs=1e-7)  # fp32 weights
        assert prof.balance()["maxvio_global"]["per_layer"][str(l)] == pytest.approx(max_violation(counts), abs=1e-4)
    assert changed > 0, "the bias changed no choice: the test would not tell a biased router from an unbiased one"


def test_bias_kept_fp32_when_saved_in_bf16(tmp_path):
    model = biased_v3()
    want = {l: b.clone() for l, b in routing_biases(model).items()}
    to_dtype_keeping_bias(model, torch.bfloat16).save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for l, b in want.items():
            t = f.get_tensor(f"model.layers.{l}.mlp.gate.e_score_correction_bias")
            assert t.dtype == torch.float32 and torch.equal(t, b.float())
            assert f.get_tensor(f"model.layers.{l}.mlp.gate.weight").dtype == torch.bfloat16


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint with a non-zero routing bias, its tokenizer and toy task data."""
    from transformers import AutoModelForCausalLM

    from esft.models.tiny import make_tiny_checkpoint, toy_task, write_jsonl

    root = tmp_path_factory.mktemp("v3")
    make_tiny_checkpoint(root / "model", family="deepseek_v3", seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(root / "model"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in routing_biases(model).values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    model.save_pretrained(str(root / "model"))
    write_jsonl(toy_task(60, seed=0), root / "train.jsonl")
    return root


def _train(v3_dir, out, **kw):
    from esft.training.config import TrainConfig
    from esft.training.recipe import train

    cfg = TrainConfig(model=str(v3_dir / "model"), train_data=str(v3_dir / "train.jsonl"), output_dir=str(out),
                      **{"seq_len": 64, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_every": 0,
                         "tensorboard": False, "valid_fraction": 0.1, **kw})
    return train(cfg, progress=False)


def _saved_bias(path):
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if k.endswith("e_score_correction_bias")})
    return out


def test_esft_keeps_the_bias_bit_identical(v3_dir, tmp_path):
    from esft.models.loading import load_model

    base = _saved_bias(v3_dir / "model")
    model, _ = load_model(v3_dir / "model")
    layers = [l.index for l in moe_layers(model)]
    (tmp_path / "cfg.json").write_text(json.dumps({"experts": {str(l): [0, 3] for l in layers},
                                                   "shared_experts": False, "non_expert_modules": False}))
    from esft.training.config import TrainConfig
    from esft.training.recipe import train

    cfg = TrainConfig(model=str(v3_dir / "model"), train_data=str(v3_dir / "train.jsonl"),
                      output_dir=str(tmp_path / "run"), expert_config=str(tmp_path / "cfg.json"), steps=3, seq_len=64,
                      batch_size=2, lr=1e-2, log_every=1, eval_every=0, tensorboard=False)
    train(cfg, model=model, tokenizer=None, progress=False)
    after = {f"model.layers.{l}.mlp.gate.e_score_correction_bias": b for l, b in routing_biases(model).items()}
    assert after.keys() == base.keys()
    for k in base:
        assert torch.equal(after[k].float(), base[k].float()), k
    lines = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(isinstance(r.get("maxvio_batch"), float) for r in lines if "loss" in r)


def test_full_fine_tuning_updates_the_bias_by_the_rule(v3_dir, tmp_path):
    """router_bias_rate > 0 under method=full: the saved bias = the base's + rate * sum over steps of
    sign(mean load - load), each step's load recounted naively from the router's inputs at that step."""
    from esft.models.loading import load_model

    rate = 0.01
    model, _ = load_model(v3_dir / "model")
    cfg = model.config
    base = {l: b.clone() for l, b in routing_biases(model).items()}
    expected = {l: b.clone().double() for l, b in base.items()}
    layers = {l.index: l for l in moe_layers(model)}
    step_inputs: dict[int, list] = {}

    def pre(mod, args, idx):  # the router's input and its weight/bias as this forward sees them
        b = routing_biases(model)[idx]
        step_inputs.setdefault(idx, []).append((args[0].detach().reshape(-1, args[0].shape[-1]).clone(),
                                                mod.weight.detach().clone(), b.detach().clone()))

    for idx, l in layers.items():
        l.router.register_forward_pre_hook(lambda m, a, idx=idx: pre(m, a, idx))
    masks = []
    from esft.training import recipe

    real = LoadMeter.begin_batch

    def spy(self, mask):  # the masks of the training forwards, to count only real tokens
        masks.append(None if mask is None else mask.clone())
        return real(self, mask)

    LoadMeter.begin_batch = spy
    try:
        from esft.training.config import TrainConfig

        train_cfg = TrainConfig(model=str(v3_dir / "model"), train_data=str(v3_dir / "train.jsonl"),
                                output_dir=str(tmp_path / "run"), method="full", router_bias_rate=rate, steps=3,
                                seq_len=64, batch_size=2, lr=1e-3, log_every=1, eval_every=0, tensorboard=False,
                                valid_fraction=0.0)
        recipe.train(train_cfg, model=model, progress=False)
    finally:
        LoadMeter.begin_batch = real
    assert len(masks) == 3
    for idx, l in layers.items():
        assert len(step_inputs[idx]) == 3
        for (h, w, b), m in zip(step_inputs[idx], masks):
            chosen, _ = naive_route(h, w, b, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob)
            load = torch.zeros(l.num_experts, dtype=torch.float64)
            for ids_t, keep in zip(chosen, m.reshape(-1).bool()):
                if keep:
                    load[ids_t] += 1
            expected[idx] += rate * torch.sign(load.mean() - load)
    got = _saved_bias(tmp_path / "run" / "last")
    for idx in layers:
        saved = got[f"model.layers.{idx}.mlp.gate.e_score_correction_bias"]
        assert saved.dtype == torch.float32
        assert saved.double().tolist() == pytest.approx(expected[idx].tolist(), abs=1e-6)
        assert not torch.equal(saved, base[idx].float())


def test_resumed_full_run_restores_the_bias(v3_dir, tmp_path):
    kw = dict(method="full", router_bias_rate=0.01, valid_fraction=0.0)
    _train(v3_dir, tmp_path / "straight", steps=4, **kw)
    _train(v3_dir, tmp_path / "split", steps=2, save_every=2, **kw)
    _train(v3_dir, tmp_path / "split", steps=4, save_every=2, resume=True, **kw)
    a, b = _saved_bias(tmp_path / "straight" / "last"), _saved_bias(tmp_path / "split" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bias_rate_refusals(v3_dir, tiny_dir, tmp_path):
    from esft.training.config import TrainConfig

    common = dict(train_data=str(v3_dir / "train.jsonl"), output_dir=str(tmp_path / "o"), method="full")
    for bad in (float("nan"), float("inf"), -0.001):
        with pytest.raises(ValueError, match="router_bias_rate"):
            TrainConfig(model=str(v3_dir / "model"), router_bias_rate=bad, **common)
    with pytest.raises(ValueError, match="only method=full"):
        TrainConfig(model=str(v3_dir / "model"), train_data=common["train_data"], output_dir=common["output_dir"],
                    method="lora", router_bias_rate=0.001)
    # a model without a routing bias: named, with what would be needed, before anything is written
    with pytest.raises(ValueError, match=r"deepseek_v2 .* has no routing bias.*e_score_correction_bias"):
        _train(tiny_dir, tmp_path / "v2", method="full", router_bias_rate=0.001, steps=1)
    assert not (tmp_path / "v2").exists()


def test_pretrain_refusals(capsys):
    from esft.embedded import pretrain

    for argv, want in ((["--balance", "loss-free", "--gate", "softmax"], "deepseek_v2, whose router has none"),
                       (["--balance", "loss-free", "--bias-rate", "nan"], "--bias-rate must be a finite number"),
                       (["--balance", "loss-free", "--bias-rate", "-0.1"], "--bias-rate must be a finite number")):
        with pytest.raises(SystemExit) as e:
            pretrain.main(["--out", "unused"] + argv)
        assert e.value.code == 2
        assert want in capsys.readouterr().err
    assert "balance" not in pretrain.RUN_ONLY_ARGS and "bias_rate" not in pretrain.RUN_ONLY_ARGS


def test_pretrain_resume_with_other_balance_is_refused(tmp_path):
    from esft.embedded.pretrain import PretrainState

    key = {"steps": 10, "balance": "aux", "gate": "sigmoid", "aux_coef": 0.01, "bias_rate": None}
    PretrainState(tmp_path, key).save({"step": 5})
    other = {**key, "balance": "loss-free", "aux_coef": None, "bias_rate": 0.001}
    with pytest.raises(SystemExit, match="balance: 'aux' there, 'loss-free' now"):
        PretrainState(tmp_path, other).load()


def test_pretrain_loss_free_short_run(tmp_path):
    """A few loss-free steps: a DeepSeek-V3 checkpoint whose fp32 bias moved in steps of the rate, MaxVio
    logged per batch, validation loss and global MaxVio at the end; transformers loads it with the bias."""
    from transformers import AutoModelForCausalLM

    from esft.embedded import pretrain

    out = tmp_path / "lfb"
    rate = 0.01
    assert pretrain.main(["--out", str(out), "--balance", "loss-free", "--bias-rate", str(rate), "--steps", "4",
                          "--examples-per-task", "60", "--valid-per-task", "8", "--warmup", "1", "--batch-size", "4",
                          "--save-every", "0", "--threads", "1", "--state-dir", str(tmp_path / "state")]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    log = json.loads((out / "pretrain_log.json").read_text())
    assert log["args"]["balance"] == "loss-free" and log["args"]["aux_coef"] is None
    assert all(0 <= r["maxvio_batch"] <= cfg["n_routed_experts"] / cfg["num_experts_per_tok"] - 1 for r in log["log"])
    assert math.isfinite(log["valid"]["loss"]) and log["valid"]["maxvio_global"]["mean"] >= 0
    biases = _saved_bias(out)
    assert len(biases) == cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    for b in biases.values():
        assert b.dtype == torch.float32
        steps = (b / rate).double()
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 4 and steps.abs().max() >= 1
    model = AutoModelForCausalLM.from_pretrained(str(out))
    for l, b in routing_biases(model).items():
        assert torch.equal(b, biases[f"model.layers.{l}.mlp.gate.e_score_correction_bias"])
    # the comparison report over it: the figures it prints are the ones its JSON holds, MaxVio from its loads
    from esft.embedded import balance_report

    md = tmp_path / "report" / "balance.md"
    assert balance_report.main(["--out", str(md), "--model", f"lf={out}", "--valid-per-task", "4", "--threads", "1",
                                "--specialization", f"a={tmp_path / 'none.json'}"]) == 0
    rep = json.loads(md.with_suffix(".json").read_text())["results"][0]
    assert rep["model_type"] == "deepseek_v3" and rep["balance"] == "loss-free" and rep["bias_rate"] == rate
    for l, load in rep["valid"]["load"].items():
        assert rep["valid"]["maxvio_global"]["per_layer"][l] == pytest.approx(max_violation(load), abs=1e-4)
    assert f"| lf | deepseek_v3 (sigmoid) | loss-free, u = {rate} | {rep['valid']['loss']:.4f} |" in md.read_text()
    assert (tmp_path / "report" / "balance_maxvio.png").stat().st_size > 0


def test_balance_report_sets_esft_reports_side_by_side(tmp_path):
    """The ESFT section reads each model's report JSON: its values are the per-seed frontier heights averaged."""
    from esft.embedded.balance_report import esft_rows

    def report(path, per_seed, base_general):
        # per task: task a scores the seed's average + 1, task b the average - 1 (so they average to it)
        mf = {m: {"average": {str(s): v for s, v in enumerate(vals)},
                  "tasks": {t: {"values": {str(s): [x + d for x in v] for s, v in enumerate(vals)}}
                            for t, d in (("a", 1), ("b", -1))}} for m, vals in per_seed.items()}
        path.write_text(json.dumps({"config": {"budgets": [1.0, 5.0]}, "base": {"a": 10.0, "b": 20.0},
                                    "base_general": base_general, "matched_forgetting": mf}))
        return str(path)

    three = report(tmp_path / "three.json", {"FFT": [[40, 50], [42, 54], [44, 52]],
                                             "LoRA": [[30, 31], [30, 33], [30, 35]],
                                             "ESFT-Token": [[41, 45], [41, 45], [41, 45]]}, 37.0)
    one = report(tmp_path / "one.json", {"FFT": [[20, 30]], "LoRA": [[10, 12]], "ESFT-Token": [[25, 26]]}, 30.0)
    out = esft_rows([("three", three), ("one", one), ("missing", str(tmp_path / "none.json"))])
    assert out["models"] == ["three", "one"] and out["budgets"] == [1.0, 5.0]
    assert out["table"][0] == ["three", "Base model (no training)", "", "37.0", "15.0", "15.0"]
    assert out["table"][1] == ["three", "FFT", "3", "", "42.0 ± 2.0", "52.0 ± 2.0"]
    # ESFT - FFT at <= 1: 41 - 42 = -1, spread sqrt(0^2 + 2^2) = 2; seed 0 alone: 41 - 40 = +1
    assert out["gaps"][0][1] == "-1.0 ± 2.0 (seed 0: +1.0)"
    # ESFT - LoRA at <= 5: 45 - 33 = +12, LoRA's std over 31/33/35 = 2
    assert out["gaps"][0][4] == "+12.0 ± 2.0 (seed 0: +14.0)"
    # one seed: no spread, and seed 0 is the value itself
    assert out["gaps"][1][1:] == ["+5.0 (seed 0: +5.0)", "-4.0 (seed 0: -4.0)", "+15.0 (seed 0: +15.0)",
                                  "+14.0 (seed 0: +14.0)"]
    # per task: the offsets cancel in ESFT minus FFT, so each task's gap is the average's mean gap
    assert out["per_task"][0] == ["three", "a", "10.0", "-1.0", "-7.0", "+11.0", "+12.0"]
    assert out["per_task"][1][:3] == ["three", "b", "20.0"]
    bad = report(tmp_path / "bad.json", {"FFT": [[1, 2, 3]], "LoRA": [[1, 2, 3]], "ESFT-Token": [[1, 2, 3]]}, 1.0)
    data = json.loads(Path(bad).read_text())
    data["config"]["budgets"] = [1.0, 2.0, 5.0]
    Path(bad).write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="budgets"):
        esft_rows([("three", three), ("bad", bad)])
