"""Checkpoints (torch.distributed.checkpoint, one process here): atomic saves, exact resume, old format, bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from esft.io import DataError
from esft.training import checkpoint
from esft.training.config import TrainConfig
from esft.training.recipe import train


def _cfg(tiny_dir, out, sel_file, **kw):
    base = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"), output_dir=str(out),
                expert_config=str(sel_file), seq_len=128, batch_size=2, steps=4, lr=1e-3, eval_every=0,
                save_every=2, log_every=1, tensorboard=False, dtype="float32", device="cpu", valid_fraction=0,
                adapter_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def sel(tmp_path):
    f = tmp_path / "sel.json"
    f.write_text(json.dumps({"experts": {"1": [0, 3], "2": [5]}}))
    return f


@pytest.fixture
def uninterrupted(tiny_dir, tmp_path, sel):
    train(_cfg(tiny_dir, tmp_path / "straight", sel), progress=False)
    return load_file(str(tmp_path / "straight" / "last" / "adapter.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_an_interrupted_save_leaves_the_previous_checkpoint_and_resume_is_exact(tiny_dir, tmp_path, sel,
                                                                                  uninterrupted, monkeypatch):
    import torch.distributed.checkpoint as dcp

    real, calls = dcp.save, {"n": 0}

    def dies_on_second_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 save: killed half-way (after DCP began writing)
            real(*a, **k)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dcp, "save", dies_on_second_save)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_dir, out, sel), progress=False)
    monkeypatch.setattr(dcp, "save", real)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-2"]  # the half-written one is not listed
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # and it was removed
    assert not (out / "last").exists()
    # A hard kill cannot clean up: a leftover temporary directory is neither listed nor in the way.
    (out / "checkpoints" / ".step-4.tmp-killed").mkdir()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-2"]
    train(_cfg(tiny_dir, out, sel, resume=True), progress=False)
    _same(uninterrupted, load_file(str(out / "last" / "adapter.safetensors")))  # bit-exact


def test_a_checkpoint_of_the_earlier_format_still_resumes(tiny_dir, tmp_path, sel, uninterrupted):
    """trainable.pt + optimizer.pt (one process, before DCP): written here from a DCP checkpoint's contents."""
    from esft.training.precision import MasterWeights

    out = tmp_path / "run"
    train(_cfg(tiny_dir, out, sel, steps=2), progress=False)
    ckpt = out / "checkpoints" / "step-2"
    # Read the DCP checkpoint into plain tensors through the module's own loader, then write the old layout.
    from esft.models.loading import load_model
    from esft.selection.select import read_expert_config
    from esft.training.experts import apply_esft
    from esft.training.recipe import make_optimizer

    model, _ = load_model(str(tiny_dir / "model"), dtype="float32", device="cpu")
    plan = apply_esft(model, read_expert_config(str(sel)))
    masters = MasterWeights(dict(plan.params))
    opt = make_optimizer(masters.parameters(), _cfg(tiny_dir, out, sel))
    checkpoint.load(ckpt, masters, opt)
    torch.save(masters.state_dict(), ckpt / "trainable.pt")
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    shutil.rmtree(ckpt / "state")
    train(_cfg(tiny_dir, out, sel, resume=True), progress=False)
    _same(uninterrupted, load_file(str(out / "last" / "adapter.safetensors")))


def test_a_checkpoint_of_other_tensors_is_refused_by_name(tiny_dir, tmp_path, sel):
    from esft.models.loading import load_model
    from esft.training.experts import apply_esft
    from esft.training.precision import MasterWeights
    from esft.training.recipe import make_optimizer

    out = tmp_path / "run"
    train(_cfg(tiny_dir, out, sel, steps=2), progress=False)
    model, _ = load_model(str(tiny_dir / "model"), dtype="float32", device="cpu")
    plan = apply_esft(model, {"experts": {1: [0, 3, 4], 2: [5]}})  # layer 1 now has three experts
    masters = MasterWeights(dict(plan.params))
    opt = make_optimizer(masters.parameters(), _cfg(tiny_dir, out, sel))
    with pytest.raises(DataError, match=r"layers\.1\.mlp\.experts\.trained\.gate_up_proj has shape \(2, "):
        checkpoint.load(out / "checkpoints" / "step-2", masters, opt)
