"""Models spread by a device map (CPU proxy: a layer offloaded to disk, the rest on "cpu").

No GPU is needed: accelerate's dispatch with a "disk" entry installs the same hooks that move
weights and activations between devices under `device_map="auto"` on several GPUs (weights of the
offloaded layer stay on the meta device and are read at each forward). Profiling and ESFT training
must give the same numbers as the model held in memory.
"""

import json

import pytest
import torch

from esft.io import DataError
from esft.models.loading import CheckpointError, input_device, load_model, parse_device_map
from esft.profiling.run import ProfileConfig, run_profile
from esft.training.config import TrainConfig
from esft.training.recipe import train


def _device_map(tmp_path, offload_layer=1, n_layers=3):
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": ("disk" if i == offload_layer else "cpu") for i in range(n_layers)})
    f = tmp_path / "device_map.json"
    f.write_text(json.dumps(dm))
    return str(f)


def test_device_map_offloads_a_layer(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir / "model", dtype="float32", device="cpu", device_map=_device_map(tmp_path))
    devices = {n: p.device.type for n, p in model.named_parameters()}
    assert devices["model.layers.1.mlp.experts.gate_up_proj"] == "meta"  # not in memory
    assert devices["model.layers.2.mlp.experts.gate_up_proj"] == "cpu"
    assert input_device(model).type == "cpu"


def test_profile_with_an_offloaded_layer_equals_in_memory(tiny_dir, tmp_path):
    cfg = dict(model=str(tiny_dir / "model"), data=str(tiny_dir / "train.jsonl"), out="", max_tokens=2048,
               seq_len=256, batch_size=2, dtype="float32", device="cpu")
    ref = run_profile(ProfileConfig(**cfg), progress=False)
    spread = run_profile(ProfileConfig(**cfg, device_map=_device_map(tmp_path)), progress=False)
    assert spread.layers == ref.layers and spread.num_tokens == ref.num_tokens
    for l in ref.layers:
        torch.testing.assert_close(torch.tensor(spread.token_scores[l]), torch.tensor(ref.token_scores[l]))
        torch.testing.assert_close(torch.tensor(spread.gate_scores[l]), torch.tensor(ref.gate_scores[l]))


def _train_cfg(tiny_dir, out, sel, **kw):
    (out.parent / f"{out.name}.sel.json").write_text(json.dumps({"experts": sel}))
    base = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"), output_dir=str(out),
                expert_config=str(out.parent / f"{out.name}.sel.json"), seq_len=128, batch_size=2, steps=3, lr=1e-3,
                eval_every=0, save_every=0, log_every=1, tensorboard=False, dtype="float32", device="cpu",
                valid_fraction=0, adapter_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def test_esft_training_through_an_offloaded_frozen_layer_equals_in_memory(tiny_dir, tmp_path):
    """Layer 1 is on disk (frozen, its input gradients still flow); layer 2's experts train."""
    from safetensors.torch import load_file

    ref = train(_train_cfg(tiny_dir, tmp_path / "ref", {"2": [0, 3, 5]}), progress=False)
    spread = train(_train_cfg(tiny_dir, tmp_path / "spread", {"2": [0, 3, 5]}, device_map=_device_map(tmp_path)),
                   progress=False)
    assert spread.train_loss == pytest.approx(ref.train_loss, rel=1e-6)
    a = load_file(str(tmp_path / "ref" / "last" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "spread" / "last" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    log = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log("spread") == pytest.approx(log("ref"), rel=1e-6) and len(log("ref")) == 3


def test_selected_expert_on_the_meta_device_is_refused(tiny_dir, tmp_path):
    cfg = _train_cfg(tiny_dir, tmp_path / "bad", {"1": [0, 2], "2": [1]}, device_map=_device_map(tmp_path))
    with pytest.raises(DataError, match=r"layer 1: experts \[0, 2\].*meta device.*model\.layers\.1"):
        train(cfg, progress=False)
    assert not (tmp_path / "bad" / "last").exists()


def test_bad_device_map_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        parse_device_map(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed device map JSON"):
        parse_device_map(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="non-empty JSON object"):
        parse_device_map(str(tmp_path / "list.json"))


def test_shared_experts_of_an_offloaded_layer_are_refused(tiny_dir, tmp_path):
    """Not only routed experts: any trainable tensor left on meta would silently never train."""
    sel = tmp_path / "with_shared.json"
    sel.write_text(json.dumps({"experts": {"2": [1]}, "shared_experts": True}))
    cfg = _train_cfg(tiny_dir, tmp_path / "shared", {"2": [1]}, device_map=_device_map(tmp_path))
    cfg.expert_config = str(sel)
    with pytest.raises(DataError, match=r"trainable tensor\(s\) are on the meta device.*layers\.1\.mlp\.shared_experts"):
        train(cfg, progress=False)
