"""NaN / Inf never reach a scores file: profiling refuses non-finite router outputs, selection non-finite scores."""

import json
import math

import pytest
import torch

from conftest import build_tiny
from esft.cli import main
from esft.io import DataError
from esft.models.registry import moe_layers
from esft.profiling.profiler import ProfileError, profile_routing
from esft.selection.run import run_select
from esft.selection.select import SelectConfig, read_scores


def _batch(seed=0, B=2, T=10):
    ids = torch.randint(3, 500, (B, T), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_nan_router_weight_is_refused_naming_its_layer():
    model = build_tiny("qwen2_moe")
    layers = moe_layers(model)
    with torch.no_grad():
        layers[1].router.weight[5, 0] = math.nan  # the second MoE layer's router, one expert's row
    with pytest.raises(ProfileError, match=rf"^layer {layers[1].index}: the router produced NaN/Inf scores for 20 "
                                           rf"of 20 tokens \(and in layer {layers[2].index}\); the checkpoint's weights"):
        profile_routing(model, [_batch()])


def test_an_infinite_expert_weight_is_caught_at_the_next_router():
    model = build_tiny("deepseek_v2")
    first, second = moe_layers(model)[:2]
    ex = first.experts
    with torch.no_grad():
        ex.down_proj[:, 0, 0] = math.inf  # every expert of the first MoE layer: whatever the routing
    with pytest.raises(ProfileError, match=rf"^layer {second.index}: the router produced NaN/Inf scores for \d+ of "
                                           r"20 tokens[;( ]"):
        profile_routing(model, [_batch()])


def test_nonfinite_padding_rows_count_for_nothing():
    """Only counted tokens are checked, and a NaN router row of a padding token does not poison the sums."""
    from esft.profiling.profiler import RouterObserver

    model = build_tiny("mixtral")
    layer = moe_layers(model)[0]
    seen = []
    handle = layer.router.register_forward_hook(lambda mod, inp, out: seen.append(out))
    model(input_ids=torch.randint(3, 500, (2, 6)))
    handle.remove()
    logits, weights, ids = seen[0]  # the router's (logits [12, E], weights [12, K], ids [12, K])
    logits = logits.clone()
    logits[11] = math.nan  # the last token of the second sequence, which is padding
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with RouterObserver(model) as obs:
        obs.begin_batch(mask)
        hook = obs._make_hook(layer.index, layer.num_experts, layer.router, layer.top_k)
        hook(layer.router, None, (logits, weights, ids))
        assert int(obs.stats[layer.index].nonfinite) == 0
        assert torch.isfinite(obs.stats[layer.index].gate_sum).all()
        logits[0, 2] = math.inf  # a counted token
        hook(layer.router, None, (logits, weights, ids))
        assert int(obs.stats[layer.index].nonfinite) == 1


def test_profile_command_writes_no_scores_file(tiny_dir, tmp_path, capsys):
    from esft.models.tiny import make_tiny_checkpoint
    from safetensors.torch import load_file, save_file

    ckpt = make_tiny_checkpoint(tmp_path / "model", family="deepseek_v2", seed=0)
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.2.mlp.gate.weight"
    tensors[key][3, 7] = -math.inf
    save_file(tensors, str(f), metadata={"format": "pt"})
    out = tmp_path / "scores.json"
    rc = main(["profile", "--model", str(ckpt), "--data", str(tiny_dir / "train.jsonl"), "--out", str(out),
               "--max-tokens", "300", "--seq-len", "64", "--device", "cpu", "--dtype", "float32"])
    assert rc == 2
    assert "layer 2: the router produced NaN/Inf scores" in capsys.readouterr().err
    assert not out.exists()


def _scores(tmp_path, row1, name="s.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"token_scores": {"1": row1, "2": {"0": 0.5, "1": 0.5}}}))
    return p


@pytest.mark.parametrize("bad,match", [
    (-math.inf, r"'token_scores' layer 1 expert 3: score -inf is not a finite non-negative number"),
    (math.nan, r"'token_scores' layer 1 expert 3: score nan is not a finite non-negative number"),
    (-0.25, r"'token_scores' layer 1 expert 3: score -0.25 is not a finite non-negative number"),
    ("0.3", r"'token_scores' layer 1 expert 3: a score must be a JSON number, got \"0.3\" \(a string\)"),
    (True, r"'token_scores' layer 1 expert 3: a score must be a JSON number, got true \(a boolean\)"),
    (None, r"'token_scores' layer 1 expert 3: a score must be a JSON number, got null"),
])
def test_bad_scores_are_refused_naming_layer_and_expert(tmp_path, bad, match):
    p = _scores(tmp_path, {"0": 0.4, "1": 0.3, "2": 0.2, "3": bad})
    with pytest.raises(DataError, match=rf"s\.json: {match}"):
        read_scores(p, "token")


def test_select_command_refuses_a_nan_scores_file(tmp_path, capsys):
    p = _scores(tmp_path, {"0": math.nan, "1": 0.3})  # written by json.dumps as NaN, as esft profile once did
    out = tmp_path / "cfg.json"
    assert main(["select", "--scores", str(p), "--out", str(out)]) == 2
    assert "layer 1 expert 0: score nan" in capsys.readouterr().err
    assert not out.exists()
    # a finite file still selects as before
    p = _scores(tmp_path, {"0": 0.1, "1": 0.9}, "ok.json")
    assert run_select(str(p), SelectConfig(top_p=0.5))["experts"] == {"1": [1], "2": [0]}


@pytest.mark.parametrize("table,match", [
    ({"token_scores": {"01": {"0": 1.0}}}, r"'token_scores': layer keys must be decimal integers such as \"5\", got '01'"),
    ({"token_scores": {"1": {"e0": 1.0}}}, r"'token_scores' layer 1: expert keys must be decimal integers .* got 'e0'"),
    ({"token_scores": {"1": [0.5, 0.5]}}, r"'token_scores' layer 1: must map expert -> score, got \[0.5, 0.5\] \(an array\)"),
    ({"token_scores": [1, 2]}, r"'token_scores' must map layer -> expert -> score, got \[1, 2\] \(an array\)"),
    ([1], r"a scores file is a JSON object, got \[1\] \(an array\)"),
])
def test_scores_file_types_are_strict(tmp_path, table, match):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(table))
    with pytest.raises(DataError, match=rf"s\.json: {match}"):
        read_scores(p, "token")


def test_a_repeated_key_in_a_scores_file_is_refused(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"token_scores": {"1": {"0": 0.5, "0": 0.1}}}')
    with pytest.raises(DataError, match=r"s\.json: key '0' appears twice in one JSON object"):
        read_scores(p, "token")
