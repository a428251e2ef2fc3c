"""Adapters: only trained tensors, reference key names, logits parity of attach / merge / merged checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import AdapterError, attach_adapter, merge_adapter, merge_to_checkpoint, read_adapter, save_adapter
from esft.io import atomic_dir
from esft.models.loading import load_model
from esft.training.experts import apply_esft

SEL = {1: [2, 7], 2: [0, 11, 4]}


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A model with a few ESFT steps done in memory, its adapter, and reference logits."""
    model, tok = load_model(tiny_dir / "model")
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": SEL})
    opt = torch.optim.AdamW(plan.parameters(), lr=1e-2)
    for s in range(3):
        ids = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(plan, out, fp)
    model.eval()
    probe = torch.randint(3, len(tok), (3, 20), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    return {"model": model, "plan": plan, "dir": out, "probe": probe, "logits": logits}


def test_adapter_holds_only_trained_experts_under_checkpoint_names(trained):
    tensors = load_file(str(trained["dir"] / "adapter.safetensors"))
    want = {f"model.layers.{l}.mlp.experts.{e}.{p}.weight" for l, es in SEL.items() for e in es
            for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(tensors) == want
    cfg = json.loads((trained["dir"] / "expert_cfg.json").read_text())
    assert cfg["experts"] == {str(l): es for l, es in SEL.items()}
    meta = json.loads((trained["dir"] / "esft_adapter.json").read_text())
    assert set(meta["base_model"]) == {"version", "config", "weights"} and meta["base_model"]["version"] == 2


def test_logits_parity_attach_merge_and_merged_checkpoint(trained, tiny_dir, tmp_path):
    want = trained["logits"]
    for mode in ("attach", "merge"):
        model, _ = load_model(tiny_dir / "model")
        (attach_adapter if mode == "attach" else merge_adapter)(model, trained["dir"])
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(input_ids=trained["probe"]).logits, want, rtol=1e-5, atol=1e-5)
    merged = merge_to_checkpoint(str(tiny_dir / "model"), str(trained["dir"]), str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=trained["probe"]).logits, want, rtol=1e-5, atol=1e-5)


def test_reference_code_adapter_loads(trained, tiny_dir, tmp_path):
    """No esft_adapter.json, legacy keys without the 'model.' prefix, other file name: still loads."""
    ref = tmp_path / "ref_adapter"
    ref.mkdir()
    tensors = load_file(str(trained["dir"] / "adapter.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(ref / "model-00001.safetensors"))
    (ref / "expert_cfg.json").write_text(json.dumps({"experts": {str(l): es for l, es in SEL.items()},
                                                     "shared_experts": False, "non_expert_modules": False}))
    model, _ = load_model(tiny_dir / "model")
    merge_adapter(model, ref)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=trained["probe"]).logits, trained["logits"], rtol=1e-5, atol=1e-5)


def test_adapter_for_another_base_model_is_refused(trained, tmp_path):
    from esft.models.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=123)
    model, _ = load_model(other)
    with pytest.raises(AdapterError, match="different base model"):
        merge_adapter(model, trained["dir"])
    merge_adapter(model, trained["dir"], allow_other_base=True)  # same shapes: allowed when asked


def test_damaged_adapters_are_refused(trained, tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "expert_cfg.json").write_text(json.dumps({"experts": {"1": [2]}}))
    save_file({"model.layers.1.mlp.experts.2.gate_proj.weight": torch.zeros(5, 5),
               "model.layers.1.mlp.experts.2.up_proj.weight": torch.zeros(5, 5),
               "model.layers.1.mlp.experts.2.down_proj.weight": torch.zeros(5, 5)}, str(bad / "a.safetensors"))
    model, _ = load_model(tiny_dir / "model")
    with pytest.raises(AdapterError, match=r"layer 1 expert 2 (gate|up|down)_proj.weight has shape \(5, 5\), the model expects \((32, 64|64, 32)\)"):
        merge_adapter(model, bad)
    save_file({"model.layers.1.mlp.experts.99.gate_proj.weight": torch.zeros(32, 64)}, str(bad / "a.safetensors"))
    with pytest.raises(AdapterError, match="matches no parameter or expert"):
        merge_adapter(model, bad)
    (bad / "a.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(bad)


def test_interrupted_save_leaves_previous_adapter_intact(trained, tmp_path):
    target = tmp_path / "adapter"
    save_adapter(trained["plan"], target, {"config": "x", "weights": "y"})
    before = (target / "adapter.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "adapter.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (target / "adapter.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary leftovers


def test_merge_into_a_wrapped_model_is_refused(trained, tiny_dir):
    model, _ = load_model(tiny_dir / "model")
    apply_esft(model, {"experts": SEL})
    with pytest.raises(AdapterError, match="wrapped for ESFT training"):
        merge_adapter(model, trained["dir"])
