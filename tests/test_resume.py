"""Resume is safe: a checkpoint records what it was trained with; a different run cannot continue it."""

import json

import pytest
import yaml

from esft.io import DataError
from esft.training.config import TrainConfig
from esft.training.recipe import train


def _cfg(tiny_dir, out, sel_file, **kw):
    base = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"), output_dir=str(out),
                expert_config=str(sel_file), seq_len=128, batch_size=2, steps=2, lr=1e-3, eval_every=0,
                save_every=2, log_every=1, tensorboard=False, dtype="float32", device="cpu", valid_fraction=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def first_run(tiny_dir, tmp_path):
    sel = tmp_path / "sel_a.json"
    sel.write_text(json.dumps({"experts": {"1": [0, 1]}}))
    train(_cfg(tiny_dir, tmp_path / "run", sel), progress=False)
    return tmp_path / "run", sel


def test_resume_with_other_experts_is_refused_and_changes_nothing(tiny_dir, tmp_path, first_run):
    out, _ = first_run
    other = tmp_path / "sel_b.json"
    other.write_text(json.dumps({"experts": {"1": [2, 3]}}))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"expert_config: checkpoint .*\[0, 1\].*now .*\[2, 3\]"):
        train(_cfg(tiny_dir, out, other, steps=4, resume=True), progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # config.yaml, adapter and checkpoints untouched


def test_resume_names_every_changed_setting(tiny_dir, tmp_path, first_run):
    out, sel = first_run
    data = tmp_path / "other.jsonl"
    data.write_text((tiny_dir / "train.jsonl").read_text().replace("Reverse", "Invert"))
    with pytest.raises(DataError) as e:
        train(_cfg(tiny_dir, out, sel, steps=4, resume=True, lr=3e-3, seq_len=256, train_data=str(data),
                   dtype="bfloat16"), progress=False)
    msg = str(e.value)
    for key in ("lr:", "seq_len:", "train_data_sha256:", "dtype:"):
        assert key in msg, msg
    assert "expert_config" not in msg  # unchanged settings are not listed


def test_resume_with_the_same_settings_continues_and_keeps_the_first_config(tiny_dir, tmp_path, first_run):
    out, sel = first_run
    first_yaml = (out / "config.yaml").read_text()
    # More steps and another logging cadence do not change the trajectory: allowed.
    res = train(_cfg(tiny_dir, out, sel, steps=4, resume=True, log_every=2), progress=False)
    assert res.steps == 4
    assert (out / "config.yaml").read_text() == first_yaml
    resumed = yaml.safe_load((out / "config.resumed-at-step-2.yaml").read_text())
    assert resumed["steps"] == 4 and resumed["resume"] is True
    state = json.loads((out / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["run"]["expert_config"]["experts"] == {"1": [0, 1]}
    assert state["run"]["train_data_sha256"] and state["run"]["base_model"]["config"]


def test_resume_without_a_checkpoint_starts_over_with_the_new_config(tiny_dir, tmp_path):
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"experts": {"1": [0, 1]}}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 0.5  # from a run that crashed before its first checkpoint\n")
    train(_cfg(tiny_dir, out, sel, resume=True, lr=2e-3), progress=False)
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 2e-3


def test_a_checkpoint_from_before_run_records_still_checks_its_base(tiny_dir, tmp_path, first_run):
    out, sel = first_run
    state_file = out / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    del state["run"]  # as esft 0.1 wrote it
    state["base_model"]["weights"] = "0" * 16
    state_file.write_text(json.dumps(state))
    with pytest.raises(DataError, match="another base model"):
        train(_cfg(tiny_dir, out, sel, steps=4, resume=True), progress=False)
