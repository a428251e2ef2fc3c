"""Each kind of bad input gets an error that names the problem."""

import json

import pytest

from esft.config import ConfigError, build_config
from esft.data.conversations import load_examples
from esft.data.packing import pack
from esft.io import DataError, OutputError
from esft.models.loading import CheckpointError, load_model
from esft.training.config import TrainConfig
from esft.training.recipe import train


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_model(tiny_dir / "model")[1]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_json_line_names_file_and_line(tmp_path, tok):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    p = _write(tmp_path / "d.jsonl", [good, good, '{"messages": [}'])
    with pytest.raises(DataError, match=r"d.jsonl:3: malformed JSON"):
        load_examples(str(p), tok)


def test_empty_dataset(tmp_path, tok):
    p = _write(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(DataError, match="e.jsonl: empty dataset"):
        load_examples(str(p), tok)


def test_conversation_without_assistant_turn(tmp_path, tok):
    p = _write(tmp_path / "n.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    with pytest.raises(DataError, match="n.jsonl:1: conversation has no assistant turn"):
        load_examples(str(p), tok)


def test_overlong_examples_are_counted(tmp_path, tok):
    rows = [json.dumps({"messages": [{"role": "user", "content": "word " * n}, {"role": "assistant", "content": "ok"}]})
            for n in (2, 200, 3, 300)]
    ex = load_examples(str(_write(tmp_path / "l.jsonl", rows)), tok)
    t = pack(ex, 64, tok.pad_token_id, "truncate")
    assert (t.stats.truncated, t.stats.dropped) == (2, 0) and "2 truncated" in t.stats.describe()
    d = pack(ex, 64, tok.pad_token_id, "drop")
    assert (d.stats.truncated, d.stats.dropped, d.stats.examples) == (0, 2, 4) and "2 dropped" in d.stats.describe()


def test_user_turns_are_masked_and_answers_learned(tok):
    from esft.data.conversations import IGNORE, encode_reference

    ids, labels = encode_reference([{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}], tok)
    answer = tok.encode(" b a", add_special_tokens=False) + [tok.eos_token_id]
    assert labels[-len(answer):] == answer
    assert set(labels[: -len(answer)]) == {IGNORE}
    assert tok.decode(ids[1: len(ids) - len(answer)]) == "User: Reverse: a b\n\nAssistant:"


def _cfg(tiny_dir, tmp_path, **kw):
    base = dict(model=str(tiny_dir / "model"), train_data=str(tiny_dir / "train.jsonl"), output_dir=str(tmp_path / "o"),
                expert_config=str(tmp_path / "cfg.json"), seq_len=128, steps=1, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("experts,msg", [({"0": [1]}, "layer 0 is not an MoE layer of this model \\(MoE layers: \\[1, 2\\]\\)"),
                                         ({"1": [16]}, "layer 1 expert 16 does not exist \\(the model has experts 0..15\\)")])
def test_expert_config_naming_missing_layer_or_expert_fails_before_training(tiny_dir, tmp_path, experts, msg):
    (tmp_path / "cfg.json").write_text(json.dumps({"experts": experts}))
    with pytest.raises(DataError, match=msg):
        train(_cfg(tiny_dir, tmp_path), progress=False)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_existing_output_dir_is_refused_unless_overwrite_or_resume(tiny_dir, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"experts": {"1": [1]}}))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=true.*resume=true"):
        train(_cfg(tiny_dir, tmp_path), progress=False)
    assert (tmp_path / "o" / "precious.txt").read_text() == "keep me"
    # overwrite replaces only a directory esft wrote: this one is the user's, so it stays
    with pytest.raises(OutputError, match="not written by esft"):
        train(_cfg(tiny_dir, tmp_path, overwrite=True), progress=False)
    assert (tmp_path / "o" / "precious.txt").read_text() == "keep me"
    (tmp_path / "o" / "precious.txt").unlink()
    train(_cfg(tiny_dir, tmp_path), progress=False)  # empty: fine
    (tmp_path / "o" / "mine.txt").write_text("a file added to esft's own run")
    train(_cfg(tiny_dir, tmp_path, overwrite=True), progress=False)
    assert not (tmp_path / "o" / "mine.txt").exists() and (tmp_path / "o" / "adapter").is_dir()


def test_config_errors(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("model: m\ntrain_data: d\noutput_dir: o\nexpert_config: e\nlearning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\].*valid keys"):
        build_config(TrainConfig, y)
    y.write_text("model: m\ntrain_data: d\noutput_dir: o\nexpert_config: e\n")
    with pytest.raises(ConfigError, match="TrainConfig.steps must be an integer"):
        build_config(TrainConfig, y, ["steps=ten"])
    cfg = build_config(TrainConfig, y, ["steps=7", "lr=3e-5"])
    assert (cfg.steps, cfg.lr) == (7, 3e-5)
    with pytest.raises(ValueError, match="method=esft needs expert_config"):
        build_config(TrainConfig, None, ["model=m", "train_data=d", "output_dir=o"])


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "nothing")


def test_chat_template_option_learns_only_assistant_turns(tok):
    from esft.data.conversations import IGNORE, encode_chat_template

    tok = __import__("copy").deepcopy(tok)
    with pytest.raises(DataError, match="no chat template"):
        encode_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tok)
    tok.chat_template = ("{% for m in messages %}<|{{m.role}}|>{{m.content}}{{ eos_token if m.role == 'assistant' "
                         "else '' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "x y"}]
    ids, labels = encode_chat_template(msgs, tok)
    assert tok.decode(ids) == "<|user|>Reverse: a b<|assistant|>b a<|eos|><|user|>again<|assistant|>x y<|eos|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == "b a<|eos|>x y<|eos|>"


def test_validation_set_with_nothing_to_score_is_refused(tiny_dir, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"experts": {"1": [1]}}))
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]})
    _write(tmp_path / "v.jsonl", [long, long])
    with pytest.raises(DataError, match="v.jsonl: no validation tokens left"):
        train(_cfg(tiny_dir, tmp_path, valid_data=str(tmp_path / "v.jsonl"), overlong="drop"), progress=False)


def test_system_message_prefixes_the_next_user_turn(tok):
    from esft.data.conversations import encode_reference

    with_sys, _ = encode_reference([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "ok"}], tok)
    assert "User: Be brief.\nHi\n\nAssistant: ok" in tok.decode(with_sys)
    assert tok.decode(with_sys).count("Assistant:") == 1
