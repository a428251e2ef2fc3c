"""The quickstart through the real CLI, --help of every subcommand, and the shipped YAML configs."""

import json
from pathlib import Path

import pytest
import yaml

from esft.cli import build_parser, main
from esft.config import from_dict
from esft.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd", ["profile", "select", "train", "merge", "eval", "demo", "make-tiny"])
def test_help_explains_every_option(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{cmd} {action.option_strings} has no help"
    if cmd == "train":
        assert "gradient_checkpointing" in text and "lr" in text


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_parse(path):
    from_dict(TrainConfig, yaml.safe_load(path.read_text()), source=str(path))


def test_quickstart_profile_select_train_merge(tmp_path, capsys):
    t = tmp_path / "tiny"
    assert main(["make-tiny", "--out", str(t), "--examples", "120"]) == 0
    assert main(["profile", "--model", str(t / "model"), "--data", str(t / "train.jsonl"), "--out", str(t / "scores.json"),
                 "--seq-len", "256", "--batch-size", "4", "--quiet"]) == 0
    assert main(["select", "--scores", str(t / "scores.json"), "--score-function", "token", "--top-p", "0.2",
                 "--out", str(t / "expert_cfg.json")]) == 0
    cfg = yaml.safe_load((ROOT / "configs" / "train_tiny.yaml").read_text())
    over = [f"{k}={str(v).replace('runs/tiny', str(t))}" for k, v in cfg.items() if isinstance(v, str)]
    assert main(["train", "--config", str(ROOT / "configs" / "train_tiny.yaml"), *over, "steps=4", "tensorboard=true",
                 "--quiet"]) == 0
    assert (t / "esft" / "adapter" / "adapter.safetensors").exists()
    assert list((t / "esft" / "tb").iterdir())
    assert main(["merge", "--model", str(t / "model"), "--adapter", str(t / "esft" / "adapter"),
                 "--out", str(t / "merged")]) == 0
    assert (t / "merged" / "config.json").exists()
    # refusing to clobber, with a clear message and exit code 2
    assert main(["merge", "--model", str(t / "model"), "--adapter", str(t / "esft" / "adapter"),
                 "--out", str(t / "merged")]) == 2
    assert "already exists" in capsys.readouterr().err
    selected = json.loads((t / "expert_cfg.json").read_text())["experts"]
    assert set(selected) == {"1", "2"} and all(selected.values())
