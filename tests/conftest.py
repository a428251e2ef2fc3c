import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def build_tiny(family="deepseek_v2", seed=0, **over):
    """A tiny random model of ``family`` whose routers depend on the input."""
    from transformers import AutoModelForCausalLM

    from esft.models.tiny import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **over))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny DeepSeek-V2 checkpoint directory with tokenizer, plus toy task JSONL files."""
    from esft.models.tiny import make_tiny_checkpoint, toy_task, write_jsonl

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint(root / "model", family="deepseek_v2", seed=0)
    write_jsonl(toy_task(120, seed=0), root / "train.jsonl")
    write_jsonl(toy_task(16, seed=1), root / "valid.jsonl")
    return root


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    """One folder for the checkpoints of every vLLM plugin test (tests/vllm_plugin/fixtures.py builds each family
    once). Here, not in tests/vllm_plugin/conftest.py: a second conftest module would shadow this one for the
    tests that import build_tiny from it."""
    return tmp_path_factory.mktemp("vllm")


def make_adapter(tiny_dir, out, sel, seed):
    """An ESFT adapter of the tiny checkpoint: experts ``sel`` {layer: [ids]} moved by seeded noise (a visible
    change in every selected expert), saved to ``out``."""
    from esft.adapter.fingerprint import model_fingerprint
    from esft.adapter.io import save_adapter
    from esft.models.loading import load_model
    from esft.training.experts import apply_esft

    model, _ = load_model(tiny_dir / "model")
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": sel})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(plan, out, fp)
    return out
