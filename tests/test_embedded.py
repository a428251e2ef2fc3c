"""The shipped model: loads offline, a few ESFT steps end to end, clear errors when damaged."""

import shutil

import pytest
import torch

from esft.embedded import MODEL_DIR, EmbeddedModelError, embedded_model_dir


def test_shipped_model_loads_offline_and_is_a_deepseek_v2_moe():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    cfg = model.config
    assert cfg.model_type == "deepseek_v2"
    assert 32 <= cfg.n_routed_experts <= 64 and 4 <= cfg.num_experts_per_tok <= 6 and cfg.n_shared_experts >= 1
    assert sum(f.stat().st_size for f in d.iterdir()) < 25 * 2**20
    ids = tok("User: What is 2 + 3?\n\nAssistant:", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_missing_or_corrupted_checkpoint_says_how_to_rebuild(tmp_path):
    with pytest.raises(EmbeddedModelError, match=r"(?s)missing.*rebuild it with:.*esft.embedded.pretrain"):
        embedded_model_dir(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(MODEL_DIR, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EmbeddedModelError, match=r"(?s)corrupted.*rebuild it with"):
        embedded_model_dir(bad)


def test_unknown_task_lists_tasks():
    from esft.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="unknown task 'nope'; available tasks: .*intent_json"):
        run_demo(DemoConfig(task="nope"))
    with pytest.raises(ValueError, match="general domain; pick an adaptation task"):
        run_demo(DemoConfig(task="arithmetic"))


def test_few_esft_steps_on_the_shipped_model_end_to_end(tmp_path):
    """profile -> select -> train a few steps -> adapter round trip, on the real shipped checkpoint."""
    from esft.demo import DemoConfig, run_demo

    s = run_demo(DemoConfig(out=str(tmp_path / "demo"), n_train=200, n_valid=16, n_eval=8, n_general=2, steps=3,
                            profile_tokens=2048), progress=False)
    assert 0 < s["experts_trained"] < s["experts_total"]
    assert s["adapter_bytes"] < 0.1 * s["full_checkpoint_bytes"]
    assert 0 <= s["task_score_after"] <= 100 and 0 <= s["general_after"] <= 100
    assert (tmp_path / "demo" / "train" / "adapter" / "adapter.safetensors").exists()
    assert s["best_valid_loss"] is not None


def test_pretraining_script_is_deterministic(tmp_path):
    """Same seed -> byte-identical checkpoint (a short run; the shipped one is the same script at full length)."""
    from esft.embedded.pretrain import main

    args = ["--steps", "3", "--examples-per-task", "300", "--batch-size", "4", "--seq-len", "128", "--vocab-size", "600"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
