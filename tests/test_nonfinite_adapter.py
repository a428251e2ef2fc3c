"""NaN / Inf never enter or leave an adapter: save, read, attach, merge and the streaming merge refuse them."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import (AdapterError, attach_adapter, check_finite, merge_adapter, read_adapter,
                             save_adapter)
from esft.adapter.merge import merge_checkpoint
from esft.cli import main
from esft.models.loading import load_model
from esft.training.experts import apply_esft

SEL = {1: [2, 7], 2: [0, 11, 4]}
DOWN = "model.layers.{l}.mlp.experts.{e}.down_proj.weight"


@pytest.fixture
def plan(tiny_dir):
    model, _ = load_model(tiny_dir / "model")
    return apply_esft(model, {"experts": SEL}), model_fingerprint(model)


@pytest.fixture
def good(tiny_dir, tmp_path, plan):
    return save_adapter(plan[0], tmp_path / "good", plan[1])


def _poison(adapter_dir, key, value, index=(0, 0)):
    """Rewrite one element of one tensor of a saved adapter."""
    f = adapter_dir / "adapter.safetensors"
    tensors = load_file(str(f))
    tensors[key][index] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_save_refuses_an_infinite_expert_tensor_and_keeps_the_old_adapter(plan, good):
    p, fp = plan
    before = (good / "adapter.safetensors").read_bytes()
    w = p.wrappers[2]
    with torch.no_grad():
        w.trained.down_proj[w.selected.index(11), 3, 1] = math.inf  # expert 11 of layer 2, its down projection
    with pytest.raises(AdapterError, match=r"good: cannot save the adapter: layer 2 expert 11 down_proj\.weight "
                                           r"\(model\.layers\.2\.mlp\.experts\.11\.down_proj\.weight\) holds 1 "
                                           r"non-finite value\(s\) \(\+Inf\) of 2048"):
        save_adapter(p, good, fp)
    assert (good / "adapter.safetensors").read_bytes() == before  # not replaced


def test_save_refuses_an_overflow_of_the_saved_dtype(plan, tmp_path):
    p, fp = plan
    with torch.no_grad():
        p.wrappers[1].trained.gate_up_proj[0, 0, 0] = -1e6  # finite in fp32, -inf in fp16
    with pytest.raises(AdapterError, match=r"layer 1 expert 2 (gate|up)_proj\.weight .* \(-Inf\)"):
        save_adapter(p, tmp_path / "a", fp, dtype=torch.float16)
    assert not (tmp_path / "a").exists()


def test_save_writes_null_for_a_nonfinite_valid_loss_and_refuses_other_nonfinite_metadata(plan, tmp_path):
    p, fp = plan
    for i, v in enumerate([math.inf, math.nan]):
        out = save_adapter(p, tmp_path / f"a{i}", fp, {"valid_loss": v, "step": 3})
        text = (out / "esft_adapter.json").read_text()
        assert json.loads(text)["valid_loss"] is None and "Infinity" not in text and "NaN" not in text
        assert read_adapter(out).meta["valid_loss"] is None
    with pytest.raises(AdapterError, match=r"esft_adapter\.json field train_config\.max_grad_norm is not a finite"):
        save_adapter(p, tmp_path / "b", fp, {"train_config": {"lr": 1e-5, "max_grad_norm": -math.inf}})
    assert not (tmp_path / "b").exists()


def test_read_attach_and_merge_refuse_a_nan_adapter_naming_file_and_tensor(tiny_dir, good):
    _poison(good, DOWN.format(l=1, e=7), math.nan, (5, 2))
    want = rf"{good / 'adapter.safetensors'}: layer 1 expert 7 down_proj\.weight .* holds 1 non-finite value\(s\) \(NaN\)"
    with pytest.raises(AdapterError, match=want):
        read_adapter(good)
    model, _ = load_model(tiny_dir / "model")
    for load in (attach_adapter, merge_adapter):
        with pytest.raises(AdapterError, match=want):
            load(model, good)


def test_an_adapter_changed_in_memory_is_checked_again(tiny_dir, good):
    adapter = read_adapter(good)
    adapter.tensors[DOWN.format(l=2, e=4)][0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    model, _ = load_model(tiny_dir / "model")
    with pytest.raises(AdapterError, match=r"layer 2 expert 4 down_proj\.weight .* holds 3 non-finite value\(s\) "
                                           r"\(NaN/\+Inf/-Inf\)"):
        merge_adapter(model, adapter)


def test_streaming_merge_refuses_an_infinite_adapter_and_writes_nothing(tiny_dir, good, tmp_path, capsys):
    _poison(good, "model.layers.2.mlp.experts.0.up_proj.weight", -math.inf)
    with pytest.raises(AdapterError, match=r"layer 2 expert 0 up_proj\.weight .* \(-Inf\)"):
        merge_checkpoint(tiny_dir / "model", good, tmp_path / "merged")
    assert main(["merge", "--model", str(tiny_dir / "model"), "--adapter", str(good),
                 "--out", str(tmp_path / "merged")]) == 2
    assert "layer 2 expert 0 up_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_a_nonfinite_number_in_esft_adapter_json_is_refused(good):
    meta_file = good / "esft_adapter.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "valid_loss": math.inf}))  # json.dumps writes Infinity
    with pytest.raises(AdapterError, match=r"esft_adapter\.json: field valid_loss is not a finite number"):
        read_adapter(good)
    meta_file.write_text(json.dumps({**meta, "train_config": {"lr": math.nan}}))
    with pytest.raises(AdapterError, match=r"esft_adapter\.json: field train_config\.lr is not a finite number"):
        read_adapter(good)


def test_experts_fused_in_one_key_are_named_by_row():
    t = torch.zeros(2, 4, 4)
    t[1, 2, 3] = math.nan
    with pytest.raises(AdapterError, match=r"x: layer 3 expert 9 \(row 1 of model\.layers\.3\.mlp\.experts\.gate_up_proj\)"):
        check_finite({"model.layers.3.mlp.experts.gate_up_proj": t}, {3: [5, 9]}, "x")
    with pytest.raises(AdapterError, match=r"x: layer 0 tensor model\.layers\.0\.self_attn\.q_proj\.weight holds"):
        check_finite({"model.layers.0.self_attn.q_proj.weight": t}, {}, "x")
    check_finite({"model.layers.3.mlp.experts.gate_up_proj": torch.zeros(2, 4, 4), "ids": torch.tensor([1, 2])},
                 {3: [5, 9]}, "x")  # finite (and integer) tensors pass
