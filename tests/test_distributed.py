"""ESFT under torchrun on transformers' FSDP2 / expert parallelism: 2 gloo processes on the CPU.

Each distributed run is a real `torchrun --standalone --nproc_per_node=2` of tests/dist_worker.py
(one thread per process). The frozen model and the trainable copy of the selected experts are both
sharded by FSDP2. Parity tolerance: the two ranks' partial gradients are summed in another
order than one process sums its batch, which moves float32 results by ~1e-7 relative per step;
after 4 AdamW steps losses agree to 1e-5 relative and adapter tensors to 1e-4 relative.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esft.training.config import TrainConfig
from esft.training.distributed import check_expert_counts, check_layout
from esft.training.recipe import train

WORKER = Path(__file__).with_name("dist_worker.py")
SEL = {"experts": {"1": [0, 3, 9], "2": [5]}}


def _settings(tiny_dir, out, **kw):
    (tiny_dir / "dist_sel.json").write_text(json.dumps(SEL))
    s = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"), output_dir=str(out),
             method="esft", expert_config=str(tiny_dir / "dist_sel.json"), seq_len=128, batch_size=4, steps=4,
             lr=1e-3, eval_every=2, save_every=2, log_every=1, tensorboard=False, dtype="float32", device="cpu",
             valid_fraction=0.1, adapter_dtype="float32", dist_timeout_s=60)
    s.update(kw)
    return s


def torchrun(result_dir, mode, settings, timeout=240, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(result_dir), mode] + [f"{k}={v}" for k, v in settings.items()]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(out):
    return [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(TrainConfig(**_settings(tiny_dir, out)), progress=False)
    return out


def _assert_same_run(a, b):
    la, lb = _losses(a), _losses(b)
    assert [sorted(r) for r in la] == [sorted(r) for r in lb] and len(la) == 6  # 4 losses, 2 valid losses
    for ra, rb in zip(la, lb):
        for k in ("loss", "valid_loss"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5), (ra, rb)
    ta = load_file(str(Path(a) / "last" / "adapter.safetensors"))
    tb = load_file(str(Path(b) / "last" / "adapter.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ep_size", [1, 2], ids=["fsdp", "ep+fsdp"])
def test_two_processes_equal_one(tiny_dir, tmp_path, single, ep_size):
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "dist", ep_size=ep_size))
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(single, tmp_path / "dist")
    for r in (0, 1):
        rank = json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text())
        assert rank["world"] == 2 and rank["sharded"] > 0  # the frozen model really is sharded
        assert rank["frozen_checked"] > 20 and rank["frozen_changed"] == []  # bit-identical on every rank
        assert rank["sum_with_missing_grad"] == [1.0, 1.0, 1.0]  # rank 1 had none: zeros, no hang
        # The trainable copy is sharded too: each rank holds half of the selected experts' (3 + 1 experts of
        # 2 layers) fp32 weights and of their AdamW moments.
        assert rank["trainable_params"] == 4 * (64 * 64 + 64 * 32)
        assert rank["trained_sharded"] == ["DTensor"] * 4
        assert rank["optimizer_state_bytes"] == 2 * 4 * rank["trainable_params"] // 2
    # `esft plan` counts the same per-rank optimizer state for this layout (from config.json alone)
    from esft.planning import PlanConfig, make_plan

    plan = make_plan(PlanConfig(model=str(tiny_dir / "model"), gpus=2, ep_size=ep_size, dtype="float32",
                                expert_config=str(tiny_dir / "dist_sel.json")))
    assert plan.bytes["optimizer state"] == rank["optimizer_state_bytes"]
    assert plan.bytes["gradients"] == 4 * rank["trainable_params"] // 2
    meta = json.loads((tmp_path / "dist" / "last" / "esft_adapter.json").read_text())
    assert meta["base_model"]["version"] == 2  # read from the shards, as a single process computes it


def test_torchrun_with_one_process_is_bit_identical_to_plain_training_in_bf16(tiny_dir, tmp_path):
    """torchrun --nproc_per_node=1 takes the distributed path (process group, FSDP2-sharded fp32 trainable copy
    gathered in bf16, DCP checkpoints) with a world of one: the same bf16 numbers as `esft train` alone."""
    kw = dict(dtype="bfloat16", steps=3)
    train(TrainConfig(**_settings(tiny_dir, tmp_path / "plain", **kw)), progress=False)
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "one", **kw), nproc=1)
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads((tmp_path / "ranks" / "rank-0.json").read_text())["trained_sharded"] == ["DTensor"] * 4
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "one")
    a, b = (load_file(str(tmp_path / r / "last" / "adapter.safetensors")) for r in ("plain", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_under_fsdp_keeps_fp32_masters_and_tracks_one_process(tiny_dir, tmp_path):
    """bf16 model sharded over 2 ranks: fp32 masters for the replicated copy, as in one process.

    bf16 rounds each rank's partial gradients before they are summed in fp32, so the runs agree to
    bf16 precision (losses within 1%), not bit for bit."""
    train(TrainConfig(**_settings(tiny_dir, tmp_path / "one", dtype="bfloat16")), progress=False)
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "two", dtype="bfloat16"))
    assert res.returncode == 0, res.stderr[-4000:]
    rank = json.loads((tmp_path / "ranks" / "rank-0.json").read_text())
    assert rank["master_weight_bytes"] == 4 * rank["trainable_params"] // 2  # fp32 shards: half on each rank
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        for k in ("loss", "valid_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-2)
    meta = json.loads((tmp_path / "two" / "last" / "esft_adapter.json").read_text())
    assert meta["trained_dtype"] == "bfloat16"


@pytest.mark.slow
def test_full_fine_tuning_on_two_processes_equals_one(tiny_dir, tmp_path):
    """Full fine-tuning under torchrun: every weight an FSDP2 shard; the saved model equals one process's."""
    kw = dict(method="full", expert_config=None, steps=3, save_every=3, eval_every=3)
    train(TrainConfig(**_settings(tiny_dir, tmp_path / "one", **kw)), progress=False)
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "two", **kw))
    assert res.returncode == 0, res.stderr[-4000:]
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(la) == len(lb) == 4
    for ra, rb in zip(la, lb):
        for k in ("loss", "valid_loss"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5), (ra, rb)
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "two" / "best" / "tokenizer_config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [1, 2, 4], ids=["fsdp4", "ep2+fsdp4", "ep4+fsdp4"])
def test_four_processes_equal_one(tiny_dir, tmp_path, single, ep_size):
    """4 processes on 2 cores (slow: run with -m slow)."""
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "dist", ep_size=ep_size), nproc=4,
                   timeout=500)
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(single, tmp_path / "dist")
    for r in range(4):
        assert json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text())["frozen_changed"] == []


def test_resume_on_another_number_of_processes(tiny_dir, tmp_path, single):
    """A one-process checkpoint (DCP, whole tensors) continues on 2 processes, which read their shards of it."""
    train(TrainConfig(**_settings(tiny_dir, tmp_path / "run", steps=2)), progress=False)
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "run", resume=True))
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(single, tmp_path / "run")


def test_a_sharded_checkpoint_resumes_on_the_same_and_on_one_process(tiny_dir, tmp_path, single):
    """2 steps on 2 processes (each rank saves its shards), then 2 more on 2 processes, or on 1."""
    import shutil

    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "two", steps=2))
    assert res.returncode == 0, res.stderr[-4000:]
    shards = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-2" / "state").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "two", resume=True))
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_run(single, tmp_path / "two")
    train(TrainConfig(**_settings(tiny_dir, tmp_path / "one", resume=True)), progress=False)
    _assert_same_run(single, tmp_path / "one")


def test_a_rank_whose_tokens_never_reach_a_selected_expert_does_not_hang(tiny_dir, tmp_path):
    """Rank 1 routes no token to any selected expert in any step: the job completes, both ranks agree."""
    res = torchrun(tmp_path / "ranks", "starve", _settings(tiny_dir, tmp_path / "starve", steps=2, eval_every=0),
                   timeout=200)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["train_loss"] == ranks[1]["train_loss"]  # the summed loss, the same on both ranks
    assert all(r["frozen_changed"] == [] for r in ranks)
    assert (tmp_path / "starve" / "last" / "adapter.safetensors").exists()


def test_a_crashed_rank_ends_the_job_with_an_error(tiny_dir, tmp_path):
    t0 = time.monotonic()
    res = torchrun(tmp_path / "ranks", "crash", _settings(tiny_dir, tmp_path / "crash"), timeout=200)
    assert res.returncode != 0
    assert "rank 1 crashed on purpose" in res.stdout + res.stderr
    assert time.monotonic() - t0 < 150  # torchrun stops the other rank; the collectives' timeout is 60 s
    assert not (tmp_path / "crash" / "last").exists()


def test_parallel_options_need_torchrun(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="launch with torchrun"):
        train(TrainConfig(**_settings(tiny_dir, tmp_path / "x", fsdp_size=2)), progress=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        train(TrainConfig(**_settings(tiny_dir, tmp_path / "y", ep_size=2)), progress=False)


def test_layouts_that_do_not_fit_are_refused(tiny_dir, tmp_path):
    cfg = lambda **kw: TrainConfig(**_settings(tiny_dir, tmp_path / "z", **kw))  # noqa: E731
    with pytest.raises(ValueError, match="ep_size=3 must divide the number of processes"):
        check_layout(cfg(ep_size=3), 2)
    with pytest.raises(ValueError, match="fsdp_size=4 does not match the 2 processes"):
        check_layout(cfg(fsdp_size=4), 2)
    with pytest.raises(ValueError, match="batch_size=3 must be a multiple of the 2 processes"):
        check_layout(cfg(batch_size=3), 2)
    with pytest.raises(NotImplementedError, match="method=lora under torchrun"):
        check_layout(cfg(method="lora", expert_config=None), 2)
    with pytest.raises(NotImplementedError, match="method=full with ep_size=2"):
        check_layout(cfg(method="full", expert_config=None, ep_size=2), 2)
    with pytest.raises(ValueError, match="ep_size=3 does not divide the model's 16 routed experts"):
        check_expert_counts(str(tiny_dir / "model"), 3)


def test_an_expert_config_for_another_model_stops_every_rank_with_its_error(tiny_dir, tmp_path):
    bad = tmp_path / "other_model.json"
    bad.write_text(json.dumps({"experts": {"1": [0], "7": [2]}}))  # the tiny model has MoE layers 1 and 2
    res = torchrun(tmp_path / "ranks", "train", _settings(tiny_dir, tmp_path / "bad", expert_config=str(bad)),
                   timeout=200)
    assert res.returncode != 0
    assert "layer 7 is not an MoE layer of this model" in res.stdout + res.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_distributed_profile_equals_one_process(tiny_dir, tmp_path):
    """7 batches over 2 ranks (4 + 3 and one padding batch that does not count): same scores."""
    from esft.profiling.run import ProfileConfig, run_profile

    kw = dict(model=str(tiny_dir / "model"), data=str(tiny_dir / "train.jsonl"), max_tokens=1500, seq_len=128,
              batch_size=2, dtype="float32", device="cpu")
    run_profile(ProfileConfig(out=str(tmp_path / "one.json"), **kw), progress=False)
    res = torchrun(tmp_path / "ranks", "profile", dict(kw, out=str(tmp_path / "two.json")))
    assert res.returncode == 0, res.stderr[-4000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (two["meta"]["num_tokens"], two["meta"]["num_sequences"]) == (one["meta"]["num_tokens"],
                                                                       one["meta"]["num_sequences"]) == (1500, 13)
    assert two["selection_counts"] == one["selection_counts"]
    for kind in ("token_scores", "gate_scores"):
        for layer, row in one[kind].items():
            assert two[kind][layer] == pytest.approx(row, abs=1e-12)
