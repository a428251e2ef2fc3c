"""Router-first selection (`esft profile --router-stage-steps`): the routers (and attention) train briefly in memory,
the experts are scored under the tuned routing, and nothing of it reaches training or the adapter."""

import json
import math
import re

import pytest
import torch

from esft.cli import main
from esft.models.loading import load_model
from esft.models.registry import moe_layers
from esft.profiling.router_stage import RouterStageError, stage_parameters, tune_router, tuned_router
from esft.profiling.run import ProfileConfig, group_rows, profile_rows, run_profile

SEQ = 128


def _batches(tiny_dir, tok, batch_size=2, max_tokens=1024):
    packed, rows, _ = profile_rows(str(tiny_dir / "train.jsonl"), tok, SEQ, max_tokens)
    return group_rows(packed, rows, batch_size, labels=True)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _router_names(model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for layer in moe_layers(model) for p in layer.router.parameters()}


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, tok = load_model(tiny_dir / "model")
    return model, tok


@pytest.mark.parametrize("modules", ["router", "router+attention"])
def test_stage_trains_only_the_routers_and_attention(tiny_dir, modules):
    model, tok = load_model(tiny_dir / "model")
    batches = _batches(tiny_dir, tok)
    assert all((b["labels"][b["attention_mask"] == 0] == -100).all() for b in batches)
    before = _state(model)
    rec = tune_router(model, batches, steps=3, lr=1e-2, modules=modules)
    after = _state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    routers = _router_names(model)
    attention = {n for n in before if ".self_attn." in n}
    assert routers and routers <= changed  # every router moved
    if modules == "router":
        assert changed == routers  # everything else bit-identical
        assert rec["attention_layers"] == []
    else:
        assert attention and attention <= changed
        assert changed == routers | attention
        assert rec["attention_layers"] == [0, 1, 2]
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    assert rec["steps"] == 3 and rec["modules"] == modules and rec["lr"] == 1e-2
    assert rec["tokens_seen"] > 0 and 0 < rec["label_tokens_seen"] <= rec["tokens_seen"]
    assert math.isfinite(rec["loss_before"]) and rec["loss_after"] < rec["loss_before"]
    assert rec["trainable_parameters"] == sum(before[n].numel() for n in changed)


def test_tuned_routing_changes_the_scores_and_the_model_is_put_back(tiny_dir, loaded):
    model, tok = loaded
    kw = dict(model=str(tiny_dir / "model"), data=str(tiny_dir / "train.jsonl"), seq_len=SEQ, max_tokens=1024,
              batch_size=2)
    before = _state(model)
    plain = run_profile(ProfileConfig(**kw), model=model, tokenizer=tok, progress=False)
    tuned = run_profile(ProfileConfig(**kw, router_stage_steps=3, router_stage_lr=1e-2, router_stage_batch_size=2),
                        model=model, tokenizer=tok, progress=False)
    assert tuned.token_scores != plain.token_scores
    assert tuned.num_tokens == plain.num_tokens
    rec = tuned.meta["router_stage"]
    assert {"steps", "lr", "modules", "batch_size", "tokens_seen", "loss_before", "loss_after"} <= set(rec)
    assert (rec["steps"], rec["lr"], rec["modules"], rec["batch_size"]) == (3, 1e-2, "router", 2)
    assert "router_stage" not in plain.meta
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the tuned routers were put back
    again = run_profile(ProfileConfig(**kw), model=model, tokenizer=tok, progress=False)
    assert again.token_scores == plain.token_scores


def test_cli_profile_select_then_training_uses_the_checkpoint_routers(tiny_dir, tmp_path, capsys):
    from esft.adapter.fingerprint import checkpoint_fingerprint
    from esft.adapter.io import read_adapter
    from esft.selection.select import read_expert_config
    from esft.training.config import TrainConfig
    from esft.training.recipe import train

    scores, cfg = tmp_path / "scores.json", tmp_path / "expert_cfg.json"
    assert main(["profile", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "train.jsonl"),
                 "--out", str(scores), "--seq-len", str(SEQ), "--max-tokens", "1024", "--router-stage-steps", "3",
                 "--router-stage-lr", "1e-2", "--router-stage-modules", "router+attention",
                 "--router-stage-batch-size", "2", "--quiet"]) == 0
    rec = json.loads(scores.read_text())["meta"]["router_stage"]
    assert (rec["steps"], rec["lr"], rec["modules"], rec["batch_size"]) == (3, 1e-2, "router+attention", 2)
    assert main(["select", "--scores", str(scores), "--out", str(cfg), "--top-p", "0.3"]) == 0
    written = json.loads(cfg.read_text())
    assert written["selection"]["router_stage"] == rec
    assert set(written) == {"experts", "shared_experts", "non_expert_modules", "selection"}  # reference layout
    assert read_expert_config(cfg)["selection"]["router_stage"] == rec

    # The in-process path is the one that could leak: the same model object runs the stage, then trains.
    model, tok = load_model(tiny_dir / "model")
    fresh, _ = load_model(tiny_dir / "model", with_tokenizer=False)
    run_profile(ProfileConfig(model=str(tiny_dir / "model"), data=str(tiny_dir / "train.jsonl"), seq_len=SEQ,
                              max_tokens=1024, router_stage_steps=3, router_stage_lr=1e-2,
                              router_stage_modules="router+attention"), model=model, tokenizer=tok, progress=False)
    want = dict(fresh.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []

    def check(module, args):
        for p in module.parameters():
            seen.append(torch.equal(p, want[names[id(p)]]))

    handles = [layer.router.register_forward_pre_hook(check) for layer in moe_layers(model)]
    try:
        train(TrainConfig(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"),
                          valid_data=str(tiny_dir / "valid.jsonl"), output_dir=str(tmp_path / "run"), method="esft",
                          expert_config=str(cfg), seq_len=SEQ, batch_size=2, steps=2, lr=1e-3, eval_every=2,
                          save_every=2, log_every=1, tensorboard=False), model=model, tokenizer=tok, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert seen and all(seen)  # every router call of the ESFT run saw the checkpoint's router weights
    adapter = read_adapter(tmp_path / "run" / "adapter")
    assert adapter.meta["base_model"] == checkpoint_fingerprint(tiny_dir / "model")
    assert adapter.expert_cfg["selection"]["router_stage"] == rec


def test_refusals(tiny_dir, loaded, tmp_path, capsys):
    model, tok = loaded
    batches = _batches(tiny_dir, tok)
    base = dict(model=str(tiny_dir / "model"), data=str(tiny_dir / "train.jsonl"))
    for kw, msg in [(dict(router_stage_steps=-1), "router_stage_steps must be an integer >= 0"),
                    (dict(router_stage_lr=float("nan")), "router_stage_lr must be a finite number in (0, 1]"),
                    (dict(router_stage_lr=float("inf")), "finite number"), (dict(router_stage_lr=0.0), "(0, 1]"),
                    (dict(router_stage_lr=2.0), "(0, 1]"), (dict(router_stage_batch_size=0), ">= 1"),
                    (dict(router_stage_modules="experts"), "router, router+attention")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            ProfileConfig(**base, **kw)
    assert main(["profile", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "train.jsonl"), "--out",
                 str(tmp_path / "s.json"), "--router-stage-steps", "-2", "--quiet"]) == 2
    assert "router_stage_steps must be an integer >= 0, got -2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        tune_router(model, batches, steps=0)

    router, block = moe_layers(model)[0].router, moe_layers(model)[0].block
    weight = router.weight
    try:  # a quantized router: int8 weights, which AdamW cannot step
        router.weight = torch.nn.Parameter(weight.detach().to(torch.int8), requires_grad=False)
        with pytest.raises(RouterStageError, match=r"deepseek_v2: the router model\.layers\.1\.mlp\.gate \(\w+\) "
                                                   r"cannot be trained: its weights are int8"):
            tune_router(model, batches, steps=1)
        router.weight = torch.nn.Parameter(torch.empty_like(weight, device="meta"))  # offloaded by a device map
        with pytest.raises(RouterStageError, match=r"deepseek_v2: the router model\.layers\.1\.mlp\.gate \(\w+\) "
                                                   r"cannot be trained: its weights are on the meta device"):
            stage_parameters(model)
        block.gate = torch.nn.Module()  # a router with no parameter at all (hash routing, say)
        with pytest.raises(RouterStageError, match=r"the router model\.layers\.1\.mlp\.gate \(Module\) cannot be "
                                                   r"trained: it has no parameter"):
            stage_parameters(model)
    finally:
        block.gate = router
        router.weight = weight

    layers = model.model.layers
    attn = [layer.self_attn for layer in layers]
    try:  # a family whose decoder layers have no attention module (as a pure state-space hybrid would)
        for layer in layers:
            del layer.self_attn
        assert stage_parameters(model, "router")[1] == []  # router-only still runs
        with pytest.raises(RouterStageError, match="deepseek_v2: --router-stage-modules router\\+attention, but no "
                                                   "decoder layer .* has an attention module"):
            with tuned_router(model, batches, steps=1, modules="router+attention"):
                pass
    finally:
        for layer, a in zip(layers, attn):
            layer.self_attn = a


def test_refused_under_a_disk_offloading_device_map(tiny_dir, tmp_path):
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": ("disk" if i == 1 else "cpu") for i in range(3)}}
    (tmp_path / "dm.json").write_text(json.dumps(dm))
    with pytest.raises(RouterStageError, match=r"deepseek_v2: the router model\.layers\.1\.mlp\.gate \(\w+\) cannot "
                                               r"be trained: its weights are on the meta device \(offloaded to disk"):
        run_profile(ProfileConfig(model=str(tiny_dir / "model"), data=str(tiny_dir / "train.jsonl"), seq_len=SEQ,
                                  max_tokens=512, device="cpu", dtype="float32", device_map=str(tmp_path / "dm.json"),
                                  router_stage_steps=1), progress=False)
