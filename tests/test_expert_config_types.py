"""Strict JSON types in expert_cfg.json and esft_adapter.json: a wrong type is refused, naming field and file."""

import json

import pytest

from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import AdapterError, read_adapter, save_adapter
from esft.io import DataError
from esft.models.loading import load_model
from esft.selection.run import run_select
from esft.selection.select import SelectConfig, read_expert_config
from esft.training.experts import apply_esft

# The reference repo's results/expert_configs/intent.json, cut to three layers: its layout must still read.
REFERENCE = ('{"experts": {"1": [8, 26, 55, 6, 20], "10": [33, 45, 59, 50, 41], "2": [57, 19, 47, 60, 35, 42]}, '
             '"shared_experts": false, "non_expert_modules": false}')


def _cfg(tmp_path, text):
    p = tmp_path / "expert_cfg.json"
    p.write_text(text if isinstance(text, str) else json.dumps(text))
    return p


def test_reference_layout_and_esft_select_output_read(tmp_path):
    cfg = read_expert_config(_cfg(tmp_path, REFERENCE))
    assert cfg["experts"] == {1: [8, 26, 55, 6, 20], 10: [33, 45, 59, 50, 41], 2: [57, 19, 47, 60, 35, 42]}
    assert cfg["shared_experts"] is False and cfg["non_expert_modules"] is False
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({"token_scores": {"1": {"0": 0.7, "1": 0.3}}}))
    run_select(str(scores), SelectConfig(top_p=0.5), str(tmp_path / "selected.json"))
    assert read_expert_config(tmp_path / "selected.json")["selection"]["budget"] == "top_p"  # "selection" is ours
    assert read_expert_config(_cfg(tmp_path, {"experts": {"3": []}}))["shared_experts"] is False  # defaults


@pytest.mark.parametrize("cfg,match", [
    # the two reported cases: "false" was truthy (shared experts and more trained), "45" iterated as 4, 5
    ({"experts": {"1": [2]}, "shared_experts": "false"}, r"'shared_experts' must be JSON true or false, got \"false\" \(a string\)"),
    ({"experts": {"1": "45"}}, r"'experts' layer 1: must be a list of expert ids, got \"45\" \(a string\)"),
    ({"experts": {"1": [2]}, "non_expert_modules": 0}, r"'non_expert_modules' must be JSON true or false, got 0 \(an integer\)"),
    ({"experts": {"1": [2]}, "shared_experts": None}, r"'shared_experts' must be JSON true or false, got null"),
    ({"experts": {"1": ["4", 5]}}, r"'experts' layer 1: expert ids must be JSON integers, got \"4\" \(a string\)"),
    ({"experts": {"1": [4.0]}}, r"'experts' layer 1: expert ids must be JSON integers, got 4.0 \(a number\)"),
    ({"experts": {"1": [True]}}, r"'experts' layer 1: expert ids must be JSON integers, got true \(a boolean\)"),
    ({"experts": {"1": [3, -1]}}, r"'experts' layer 1: expert id -1 is negative"),
    ({"experts": {"1": [3, 5, 3]}}, r"layer 1 lists an expert twice: \[3, 5, 3\]"),
    ({"experts": {"1": 4}}, r"'experts' layer 1: must be a list of expert ids, got 4 \(an integer\)"),
    ({"experts": {"layer1": [4]}}, r"'experts': layer keys must be decimal integers such as \"5\", got 'layer1'"),
    ({"experts": {"1.0": [4]}}, r"'experts': layer keys must be decimal integers .* got '1.0'"),
    ({"experts": {" 1": [4]}}, r"'experts': layer keys must be decimal integers .* got ' 1'"),
    ({"experts": {"-1": [4]}}, r"'experts': layer keys must be decimal integers .* got '-1'"),
    ({"experts": [[4]]}, r"missing 'experts' mapping of layer -> \[expert ids\], got \[\[4\]\] \(an array\)"),
    ({"shared_experts": True}, r"missing 'experts' mapping of layer -> \[expert ids\]$"),
    ({"experts": {"1": [2]}, "shared_expert": True}, r"unknown field\(s\) 'shared_expert'; an expert config has 'experts', "
                                                     "'shared_experts', 'non_expert_modules', 'selection'"),
    ({"experts": {"1": [2]}, "selection": "top_p"}, r"'selection' must be a JSON object, got \"top_p\" \(a string\)"),
    ([{"1": [2]}], r"an expert config is a JSON object, got .* \(an array\)"),
])
def test_wrong_types_are_refused_naming_field_and_file(tmp_path, cfg, match):
    with pytest.raises(DataError, match=rf"expert_cfg\.json: {match}"):
        read_expert_config(_cfg(tmp_path, cfg))


def test_repeated_layer_key_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"expert_cfg\.json: key '1' appears twice in one JSON object"):
        read_expert_config(_cfg(tmp_path, '{"experts": {"1": [2], "1": [3]}}'))


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    model, _ = load_model(tiny_dir / "model")
    plan = apply_esft(model, {"experts": {1: [2, 7]}})
    return save_adapter(plan, tmp_path_factory.mktemp("a") / "adapter", model_fingerprint(model),
                        {"step": 3, "valid_loss": 1.5, "template": {"name": "reference", "chat_template": None}})


@pytest.mark.parametrize("edit,match", [
    ({"format_version": "1"}, r"field 'format_version' must be integer, got \"1\" \(a string\)"),
    ({"base_model": "abc"}, r"field 'base_model' must be object, got \"abc\" \(a string\)"),
    ({"base_model": {"version": "2", "config": "x", "weights": "y"}}, r"field 'base_model.version' must be integer, got \"2\""),
    ({"base_model": {"version": 2, "config": 1, "weights": "y"}}, r"field 'base_model.config' must be string, got 1"),
    ({"model_type": None}, r"field 'model_type' must be string, got null"),
    ({"valid_loss": "1.5"}, r"field 'valid_loss' must be number or null, got \"1.5\" \(a string\)"),
    ({"step": 3.0}, r"field 'step' must be integer, got 3.0 \(a number\)"),
    ({"step": True}, r"field 'step' must be integer, got true \(a boolean\)"),
    ({"dtype": 16}, r"field 'dtype' must be string or null, got 16"),
    ({"template": {"name": "chat", "chat_template": 0}}, r"field 'template.chat_template' must be string or null, got 0"),
])
def test_adapter_metadata_types_are_checked(adapter_dir, edit, match):
    meta_file = adapter_dir / "esft_adapter.json"
    good = meta_file.read_text()
    meta = json.loads(good)
    assert meta["valid_loss"] == 1.5 and read_adapter(adapter_dir).meta == meta  # as written, it reads
    try:
        meta_file.write_text(json.dumps({**meta, **edit}))
        with pytest.raises(AdapterError, match=rf"esft_adapter\.json: {match}"):
            read_adapter(adapter_dir)
    finally:
        meta_file.write_text(good)


def test_adapter_metadata_must_be_an_object_and_may_have_more_fields(adapter_dir):
    meta_file = adapter_dir / "esft_adapter.json"
    good = meta_file.read_text()
    try:
        meta_file.write_text("[1, 2]")
        with pytest.raises(AdapterError, match=r"esft_adapter\.json: must be a JSON object, got \[1, 2\] \(an array\)"):
            read_adapter(adapter_dir)
        meta_file.write_text('{"format": "esft-expert-adapter",')
        with pytest.raises(AdapterError, match=r"esft_adapter\.json:1: malformed JSON"):
            read_adapter(adapter_dir)
        meta_file.write_text(json.dumps({**json.loads(good), "recorded_by_a_newer_esft": [1, "x"]}))
        assert read_adapter(adapter_dir).meta["recorded_by_a_newer_esft"] == [1, "x"]
    finally:
        meta_file.write_text(good)


def test_an_adapters_expert_cfg_is_read_strictly(adapter_dir):
    cfg_file = adapter_dir / "expert_cfg.json"
    good = cfg_file.read_text()
    try:
        cfg_file.write_text(json.dumps({"experts": {"1": [2, "7"]}}))
        with pytest.raises(DataError, match=r"expert_cfg\.json: 'experts' layer 1: expert ids must be JSON integers"):
            read_adapter(adapter_dir)
    finally:
        cfg_file.write_text(good)
