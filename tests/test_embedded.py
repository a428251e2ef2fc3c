"""The shipped model: loads offline, a few ESFT steps end to end, clear errors when damaged."""

import json
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


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    """Same seed -> byte-identical checkpoint, also when the run is killed and resumed from its
    state (a short run; the shipped models are the same script at full length)."""
    import transformers.models.qwen2_moe.modeling_qwen2_moe as qm

    from esft.embedded.pretrain import main

    args = ["--steps", "4", "--examples-per-task", "300", "--batch-size", "4", "--seq-len", "128", "--vocab-size", "600",
            "--shape", "v2lite", "--threads", "1"]
    assert main(["--out", str(tmp_path / "a"), "--save-every", "0", *args]) == 0

    real, calls = qm.load_balancing_loss_func, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    state = ["--state-dir", str(tmp_path / "state"), "--save-every", "2"]
    monkeypatch.setattr(qm, "load_balancing_loss_func", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(tmp_path / "b"), *state, *args])
    assert (tmp_path / "state" / "state.pt").exists() and not (tmp_path / "b").exists()
    monkeypatch.setattr(qm, "load_balancing_loss_func", real)
    with pytest.raises(SystemExit, match="steps: 4 there, 5 now"):  # other settings: refused, not continued
        main(["--out", str(tmp_path / "b"), *state, *[x if x != "4" else "5" for x in args]])
    assert main(["--out", str(tmp_path / "b"), *state, *args]) == 0
    assert not (tmp_path / "state").exists()
    assert json.loads((tmp_path / "b" / "pretrain_log.json").read_text())["resumed_at_step"] == 2
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_shared_experts"]) == (64, 6, 2)
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_shipped_models_by_name(tmp_path, monkeypatch):
    from esft.embedded import SHIPPED, embedded_model_dir, resolve_model
    from esft.training.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    assert resolve_model("small") == resolve_model(None) == MODEL_DIR
    cfg = TrainConfig(model="small", train_data="x.jsonl", output_dir="o", method="full")
    assert cfg.model == str(MODEL_DIR)
    (tmp_path / "small").mkdir()  # a directory of that name in the working directory wins
    assert resolve_model("small") == tmp_path / "small" or resolve_model("small").resolve() == tmp_path / "small"
    with pytest.raises(EmbeddedModelError, match="--shape v2lite"):  # a missing v2lite says how to build it
        embedded_model_dir(tmp_path / "elsewhere" / "model_v2lite")
    if (SHIPPED["v2lite"] / "model.safetensors").exists():
        assert resolve_model("v2lite") == SHIPPED["v2lite"]


def test_v2lite_has_deepseek_v2_lite_proportions_and_was_trained():
    """The second shipped model: V2-Lite's shape ratios, and a language model, not random weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esft.data.conversations import prompt_text
    from esft.embedded import SHIPPED
    from esft.embedded.pretrain import SHAPES
    from esft.tasks import generate_split, task_names

    d = embedded_model_dir(SHIPPED["v2lite"])  # raises (with the rebuild command) if it is missing or damaged
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    cfg = model.config
    for k, v in SHAPES["v2lite"].items():
        assert getattr(cfg, k) == v, k
    assert cfg.first_k_dense_replace == 1 and cfg.num_hidden_layers - 1 >= 8
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert routed / sum(p.numel() for p in model.parameters()) > 0.85  # V2-Lite: 92%
    assert sum(f.stat().st_size for f in d.iterdir()) < 45 * 2**20  # bf16 weights
    # next-token loss on held-out general-domain text: uniform guessing over the vocabulary is ln(2048) = 7.6
    texts = [prompt_text(p) + " " + a for name in task_names("general") for p, a in generate_split(name, "eval", 2, 0)]
    losses = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids
            losses.append(model(ids, labels=ids).loss.item())
    assert sum(losses) / len(losses) < 2.5, losses
