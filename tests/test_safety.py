"""Nothing lost, nothing silently wrong: output ownership, validation before loading, non-finite stops,
strict config types, stale temporaries, SIGTERM, umask. Each check uses the real CLI (``main``) where a
user would, and compares the inputs' bytes before and after."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esft.cli import main
from esft.config import ConfigError, build_config
from esft.io import MARKER, OutputError, atomic_dir, remove_stale_temps, write_json_atomic
from esft.training.config import TrainConfig
from esft.training.recipe import TrainingDiverged, train


def tree_digest(root: Path) -> dict:
    """Every file under ``root`` (or the file itself) -> sha256: the bytes an input must keep."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def run_inputs(tiny_dir, tmp_path):
    """A user's working folder: a copy of the tiny model, its data and an expert config."""
    w = tmp_path / "work"
    shutil.copytree(tiny_dir / "model", w / "model")
    shutil.copy(tiny_dir / "train.jsonl", w / "train.jsonl")
    (w / "cfg.json").write_text(json.dumps({"experts": {"1": [1, 3], "2": [0]}}))
    return w


def train_args(w: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model={w / 'model'}", f"train_data={w / 'train.jsonl'}", f"expert_config={w / 'cfg.json'}",
            f"output_dir={out}", "seq_len=128", "steps=2", "tensorboard=false", "--quiet", *extra]


# -- 1. the tool never deletes what it did not write ------------------------------------------------------------

def test_train_overwrite_never_removes_a_directory_holding_its_inputs(run_inputs, capsys):
    before = tree_digest(run_inputs)
    # the target holds the run's own model, data and expert config (the case, and a deeper one)
    for out in (run_inputs, run_inputs.parent):
        assert main(train_args(run_inputs, out, "overwrite=true")) == 2
        err = capsys.readouterr().err
        assert "contains the" in err or "not written by esft" in err, err
        assert tree_digest(run_inputs) == before


def test_train_output_inside_or_equal_to_an_input_is_refused(run_inputs, capsys):
    before = tree_digest(run_inputs)
    for out, msg in ((run_inputs / "model" / "run", "lies inside the model"),
                     (run_inputs / "train.jsonl", "is the train_data")):
        assert main(train_args(run_inputs, out)) == 2
        assert msg in capsys.readouterr().err
    assert tree_digest(run_inputs) == before


def test_train_overwrite_replaces_only_its_own_runs(run_inputs, tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert main(train_args(run_inputs, foreign, "overwrite=true")) == 2
    assert "not written by esft" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "years of work"

    run = tmp_path / "run"
    assert main(train_args(run_inputs, run)) == 0
    assert json.loads((run / MARKER).read_text())["command"] == "train"
    assert main(train_args(run_inputs, run)) == 2  # no overwrite: refused
    assert main(train_args(run_inputs, run, "overwrite=true")) == 0


def test_merge_overwrite_refuses_the_adapters_own_run_and_foreign_dirs(run_inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run_inputs, run)) == 0
    run_before = tree_digest(run)
    model = str(run_inputs / "model")
    # onto the training run that holds the adapter
    assert main(["merge", "--model", model, "--adapter", str(run / "adapter"), "--out", str(run), "--overwrite"]) == 2
    assert "contains the adapter" in capsys.readouterr().err
    # into the adapter directory itself, and onto the output of another command
    assert main(["merge", "--model", model, "--adapter", str(run / "last"), "--out", str(run / "adapter"),
                 "--overwrite"]) == 2
    other = tmp_path / "tiny"
    assert main(["make-tiny", "--out", str(other), "--examples", "8"]) == 0
    assert main(["merge", "--model", model, "--adapter", str(run / "adapter"), "--out", str(other), "--overwrite"]) == 2
    assert "output of `esft make-tiny`" in capsys.readouterr().err
    assert tree_digest(run) == run_before
    # an earlier merge is replaced
    merged = tmp_path / "merged"
    assert main(["merge", "--model", model, "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    assert main(["merge", "--model", model, "--adapter", str(run / "last"), "--out", str(merged), "--overwrite"]) == 0
    assert json.loads((merged / "esft_merge.json").read_text())["adapter"].endswith("last")


def test_make_tiny_and_demo_refuse_directories_they_did_not_write(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    for args in (["make-tiny", "--out", str(d)], ["make-tiny", "--out", str(d), "--overwrite"],
                 ["demo", "--out", str(d), "--steps", "1"]):
        assert main(args) == 2, args
        assert "keep.txt" not in capsys.readouterr().err
        assert (d / "keep.txt").read_text() == "keep"
    t = tmp_path / "t"
    assert main(["make-tiny", "--out", str(t), "--examples", "8"]) == 0
    assert main(["make-tiny", "--out", str(t), "--examples", "8"]) == 2  # asks first
    assert "overwrite" in capsys.readouterr().err
    assert main(["make-tiny", "--out", str(t), "--examples", "9", "--overwrite", "--seed", "3"]) == 0
    # the demo does not replace make-tiny's output either
    assert main(["demo", "--out", str(t), "--steps", "1"]) == 2
    assert "output of `esft make-tiny`" in capsys.readouterr().err


def test_profile_and_select_never_write_over_their_inputs(run_inputs, capsys):
    before = tree_digest(run_inputs)
    data = str(run_inputs / "train.jsonl")
    assert main(["profile", "--model", str(run_inputs / "model"), "--data", data, "--out", data, "--quiet"]) == 2
    assert "is the data" in capsys.readouterr().err
    assert main(["profile", "--model", str(run_inputs / "model"), "--data", data, "--quiet",
                 "--out", str(run_inputs / "model" / "scores.json")]) == 2
    cfg = str(run_inputs / "cfg.json")
    assert main(["select", "--scores", cfg, "--out", cfg]) == 2
    assert tree_digest(run_inputs) == before


# -- 5. validate before loading -------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model's weights are loaded: the error must come first."""
    import esft.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad value was refused")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr("esft.training.recipe.load_model", refuse)


@pytest.mark.parametrize("override,msg", [
    ("lr=-0.5", "lr must be in"), ("lr=2", "lr must be in (0, 1]"), ("lr=.inf", "lr must be a finite"), ("lr=.nan", "lr must be a finite"),
    ("beta1=1.0", "beta1 must be in"), ("beta2=-0.1", "beta2 must be in"), ("log_every=0", "log_every must be >= 1"),
    ("max_grad_norm=-1", "max_grad_norm must be in"), ("weight_decay=.inf", "weight_decay must be a finite"),
    ("warmup_steps=-2", "warmup_steps must be >= 0"), ("device=cuda:97", "device 'cuda:97'"),
    ("device=tpu", "device must be"), ("dtype=fp8", "dtype must be"), ("seq_len=1000000", "exceeds the model's context"),
    ("steps=2.5", "steps must be an integer"), ("tensorboard='false'", "tensorboard must be true or false"),
    ("overwrite=1", "overwrite must be true or false"), ("seed=true", "seed must be an integer"),
])
def test_bad_values_are_refused_before_the_model_loads(run_inputs, tmp_path, capsys, no_model_load, override, msg):
    out = tmp_path / "o"
    assert main(train_args(run_inputs, out, override)) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing half-made


def test_unusable_paths_are_refused_before_the_model_loads(run_inputs, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "notes.txt").write_text("x")
    cases = [
        ([f"output_dir={tmp_path / 'afile' / 'sub'}"], "cannot write there"),  # a file where a directory is expected
        ([f"output_dir={tmp_path / 'afile'}"], "is a file, not a directory"),
        ([f"train_data={tmp_path / 'nodata'}"], "the folder holds no data file"),
        ([f"train_data={run_inputs / 'model' / 'config.json'}"], "cannot tell the data layout from its columns"),
        ([f"model={run_inputs / 'train.jsonl'}"], "is a file; expected a checkpoint directory"),
        ([f"expert_config={tmp_path / 'missing.json'}"], "not found"),
    ]
    for extra, msg in cases:
        assert main(train_args(run_inputs, tmp_path / "o", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "o").exists()


def test_a_run_with_nothing_to_learn_is_refused(run_inputs, tmp_path, capsys, no_model_load):
    # seq_len shorter than every prompt: each example is cut before its answer
    assert main(train_args(run_inputs, tmp_path / "o", "seq_len=6")) == 2
    assert "no token to learn" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(run_inputs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(run_inputs, out, "steps=4", "save_every=2")) == 0
    meta = (out / "last" / "esft_adapter.json").read_bytes()
    assert main(train_args(run_inputs, out, "steps=3", "resume=true")) == 2
    assert "already trained 4 steps" in capsys.readouterr().err
    assert (out / "last" / "esft_adapter.json").read_bytes() == meta


def test_resumed_log_does_not_repeat_steps(run_inputs, tmp_path):
    out = tmp_path / "o"
    assert main(train_args(run_inputs, out, "steps=4", "save_every=2", "log_every=1")) == 0
    shutil.rmtree(out / "checkpoints" / "step-4")  # killed after logging step 4, before its checkpoint
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # and a line cut short by the kill
    assert main(train_args(run_inputs, out, "steps=4", "log_every=1", "resume=true")) == 0
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]


def test_overrides_may_stand_on_both_sides_of_an_option(run_inputs, tmp_path):
    w = run_inputs
    out = tmp_path / "o"
    assert main(["train", f"model={w / 'model'}", "--quiet", f"train_data={w / 'train.jsonl'}",
                 f"expert_config={w / 'cfg.json'}", f"output_dir={out}", "seq_len=128", "steps=1",
                 "tensorboard=false"]) == 0
    assert (out / "adapter").is_dir()
    with pytest.raises(SystemExit):
        main(["train", f"model={w / 'model'}", "--quiet", "stray-word"])


# -- 3. strict types in config files ------------------------------------------------------------------------------

def test_config_types_are_strict(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("model: m\ntrain_data: d\noutput_dir: o\nexpert_config: e\nsteps: 3.0\n")
    with pytest.raises(ConfigError, match=r"TrainConfig.steps must be an integer, got float 3.0"):
        build_config(TrainConfig, y)
    for bad, field in (("gradient_checkpointing: 'no'", "gradient_checkpointing"), ("lr: '1e-4'", "lr"),
                       ("batch_size: true", "batch_size"), ("template: 7", "template")):
        y.write_text(f"model: m\ntrain_data: d\noutput_dir: o\nexpert_config: e\n{bad}\n")
        with pytest.raises(ConfigError, match=rf"TrainConfig\.{field} must be"):
            build_config(TrainConfig, y)
    # what YAML means as numbers stays numbers: 2e-4 without a dot, ints for floats
    cfg = build_config(TrainConfig, None, ["model=m", "train_data=d", "output_dir=o", "expert_config=e", "lr=2e-4",
                                           "max_grad_norm=2"])
    assert cfg.lr == 2e-4 and cfg.max_grad_norm == 2.0


# -- 2. non-finite numbers stop the work --------------------------------------------------------------------------

def test_a_checkpoint_that_overflows_stops_at_step_one(run_inputs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    st = run_inputs / "model" / "model.safetensors"
    w = load_file(st)
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], 3e38)  # finite, but the logits overflow
    save_file(w, st, metadata={"format": "pt"})
    out = tmp_path / "o"
    assert main(train_args(run_inputs, out, "steps=5", "save_every=1")) == 2
    err = capsys.readouterr().err
    assert "step 1: the training loss is" in err and "Traceback" not in err, err
    assert not (out / "last").exists() and not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_an_update_that_leaves_nan_weights_writes_no_checkpoint(run_inputs, tmp_path, monkeypatch):
    import esft.training.recipe as recipe

    real = recipe.make_optimizer

    def poisoned(params, cfg):  # an optimizer step that writes NaN, as an overflowing update would
        opt = real(params, cfg)
        step = opt.step

        def bad_step(*a, **k):
            step(*a, **k)
            with torch.no_grad():
                params[0].view(-1)[0] = float("nan")

        opt.step = bad_step
        return opt

    monkeypatch.setattr(recipe, "make_optimizer", poisoned)
    out = tmp_path / "o"
    cfg = build_config(TrainConfig, None, [a for a in train_args(run_inputs, out, "save_every=1")[1:] if "=" in a])
    with pytest.raises(TrainingDiverged, match="step 1: the trainable weights hold NaN/Inf.*no checkpoint"):
        train(cfg, progress=False)
    assert not (out / "checkpoints").exists() and not (out / "last").exists()


def test_nan_weights_stop_training_at_the_first_step(tiny_dir, tmp_path):
    from esft.models.loading import load_model

    model, tok = load_model(tiny_dir / "model")
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    (tmp_path / "cfg.json").write_text(json.dumps({"experts": {"2": [5]}}))
    cfg = TrainConfig(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"), seq_len=128, steps=3,
                      output_dir=str(tmp_path / "o"), expert_config=str(tmp_path / "cfg.json"), tensorboard=False)
    with pytest.raises(TrainingDiverged, match="step 1: the training loss is nan"):
        train(cfg, model=model, tokenizer=tok, progress=False)
    assert not (tmp_path / "o" / "adapter").exists()


def test_json_writer_refuses_non_finite_numbers(tmp_path):
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"non-finite number at scores\.layer_2\[1\]"):
            write_json_atomic(tmp_path / "s.json", {"scores": {"layer_2": [0.5, bad]}})
        assert not (tmp_path / "s.json").exists() and not list(tmp_path.iterdir())


# -- 6. errors, not tracebacks -----------------------------------------------------------------------------------

def test_damaged_inputs_end_in_one_line(run_inputs, tmp_path, capsys):
    model = run_inputs / "model"
    data = run_inputs / "train.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n" +
                   '{"messages": [{"role": "user", "content": "x\\udc80"}, {"role": "assistant", "content": "y"}]}\n')
    assert main(["profile", "--model", str(model), "--data", str(bad), "--out", str(tmp_path / "s.json"),
                 "--quiet", "--seq-len", "64"]) == 2
    assert "bad.jsonl:2: a string holds a lone UTF-16 surrogate" in capsys.readouterr().err
    gz = tmp_path / "g.jsonl"
    gz.write_bytes(b"\x1f\x8b\x08\x00binary")
    assert main(train_args(run_inputs, tmp_path / "o", f"train_data={gz}")) == 2
    assert "g.jsonl: the file is gz-compressed but not named so; rename it to end in .gz" in capsys.readouterr().err
    # a truncated weights file: named, before transformers fails inside loading
    st = model / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert main(["profile", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "s.json"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: truncated" in err and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path)]) == 2  # a directory where a YAML file is expected
    assert "Is a directory" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_that_says_how_to_see_more(run_inputs, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise TypeError("something nobody expected")

    monkeypatch.setattr("esft.training.recipe.load_tokenizer", boom)
    assert main(train_args(run_inputs, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: something nobody expected" in err and "esft -v train" in err


# -- 7. clean up after kills ---------------------------------------------------------------------------------------

def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import socket

    host = "".join(c for c in socket.gethostname().split(".")[0] if c.isalnum() or c == "-")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".adapter.tmp-{dead}@{host}.x1"
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"0" * 1000)
    live = tmp_path / f".adapter.tmp-{os.getppid()}@{host}.x2"  # a running writer: left alone
    live.mkdir()
    other_host = tmp_path / f".adapter.tmp-{dead}@elsewhere-node.x3"  # another node of a shared filesystem
    other_host.mkdir()
    user = tmp_path / ".adapter.tmp-mine"  # not our pattern
    user.mkdir()
    with atomic_dir(tmp_path / "adapter") as t:
        (t / "f").write_text("new")
    assert not stale.exists() and live.exists() and other_host.exists() and user.exists()
    assert (tmp_path / "adapter" / "f").read_text() == "new"
    assert remove_stale_temps(tmp_path) == []


def test_sigterm_is_handled_like_ctrl_c(run_inputs, tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = train_args(run_inputs, out, "steps=100000", "save_every=1", "log_every=1", "keep_checkpoints=1")
    p = subprocess.Popen([sys.executable, "-m", "esft", *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-3").exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    leftovers = [q for q in out.rglob(".*") if ".tmp" in q.name or ".old-" in q.name]
    assert leftovers == []
    from esft.training import checkpoint

    last = checkpoint.list_checkpoints(out)[-1]
    assert checkpoint.read_state(last)["step"] >= 3


# -- 9. files follow the umask -------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as t:
            (t / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode


def test_a_full_disk_during_a_checkpoint_names_the_cause_and_keeps_the_last_one(run_inputs, tmp_path, capsys,
                                                                                monkeypatch):
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "o"
    assert main(train_args(run_inputs, out, "steps=2", "save_every=1")) == 0
    real = dcp.save
    calls = []

    def full_disk(state, checkpoint_id):
        calls.append(checkpoint_id)
        real(state, checkpoint_id=checkpoint_id)
        raise RuntimeError("unexpected pos 704 vs 598")  # what a full disk looked like from DCP's writer

    monkeypatch.setattr(dcp, "save", full_disk)
    assert main(train_args(run_inputs, out, "steps=3", "save_every=1", "resume=true")) == 2
    err = capsys.readouterr().err
    assert "writing checkpoint" in err and "step-3" in err and "disk full" in err and "Traceback" not in err
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-1", "step-2"]  # the half-written step-3 is gone, step-2 intact


def test_eval_never_writes_into_its_inputs(run_inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run_inputs, run)) == 0
    before = tree_digest(run / "adapter")
    for out in (run / "adapter", run / "adapter" / "preds", run_inputs / "model" / "eval"):
        assert main(["eval", "--model", str(run_inputs / "model"), "--adapter", str(run / "adapter"), "--data",
                     str(run_inputs / "train.jsonl"), "--n", "2", "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    assert tree_digest(run / "adapter") == before
