"""The data layer: every layout and file type gives the same ids and labels as the same conversations
written by hand; mixtures, streaming, the cache, chat-template spans, and bad input named precisely."""

import bz2
import gzip
import json
import shutil

import pytest

from esft.data.conversations import IGNORE, encode_chat_template, encode_reference
from esft.data.pipeline import iter_conversations, read_examples
from esft.io import DataError

# Three conversations, written once by hand in the internal form: the parity target for every layout.
CONVS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}],
    [{"role": "user", "content": "Translate: chat\nfrom French"}, {"role": "assistant", "content": "cat"}],
]


def as_messages(c):
    return {"messages": c}


def as_sharegpt(c):
    tag = {"user": "human", "assistant": "gpt"}
    row = {"conversations": [{"from": tag[m["role"]], "value": m["content"]} for m in c if m["role"] != "system"]}
    if c[0]["role"] == "system":
        row["system"] = c[0]["content"]
    return row


def as_alpaca(c):
    system = c[0]["content"] if c[0]["role"] == "system" else ""
    turns = [m for m in c if m["role"] != "system"]
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]
    instruction, _, extra = turns[-2]["content"].partition("\n")  # LLaMA-Factory: instruction + "\n" + input
    return {"instruction": instruction, "input": extra, "output": turns[-1]["content"], "system": system,
            "history": pairs}


def as_prompt_completion(c):
    return {"prompt": c[:-1], "completion": c[-1]["content"]}


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from esft.models.loading import load_tokenizer

    return load_tokenizer(tiny_dir / "model")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFT_DATA_CACHE", str(tmp_path / "cache"))


def expected(tok):
    return [encode_reference(c, tok) for c in CONVS]


def got(spec, tok, **kw):
    return [(e.input_ids, e.labels) for e in read_examples(spec, tok, **kw).examples]


def test_every_layout_and_file_type_gives_the_same_ids_and_labels(tmp_path, tok):
    import datasets

    want = expected(tok)
    files = {
        "messages.jsonl": lambda p: write_jsonl(p, map(as_messages, CONVS)),
        "messages.jsonl.gz": lambda p: write_jsonl(p, map(as_messages, CONVS), gzip.open),
        "messages.jsonl.bz2": lambda p: write_jsonl(p, map(as_messages, CONVS), bz2.open),
        "sharegpt.json": lambda p: p.write_text(json.dumps([as_sharegpt(c) for c in CONVS])),
        "alpaca.json": lambda p: p.write_text(json.dumps([as_alpaca(c) for c in CONVS])),
        "pc.jsonl": lambda p: write_jsonl(p, map(as_prompt_completion, CONVS)),
        "messages.parquet": lambda p: datasets.Dataset.from_list([as_messages(c) for c in CONVS]).to_parquet(str(p)),
    }
    for name, make in files.items():
        make(tmp_path / name)
        assert got(str(tmp_path / name), tok) == want, name
    # zstd, a save_to_disk folder, a folder of files, a glob
    import zstandard

    (tmp_path / "m.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (tmp_path / "messages.jsonl").read_bytes()))
    assert got(str(tmp_path / "m.jsonl.zst"), tok) == want
    datasets.Dataset.from_list([as_alpaca(c) for c in CONVS]).save_to_disk(str(tmp_path / "saved"))
    assert got(str(tmp_path / "saved"), tok) == want
    (tmp_path / "folder").mkdir()
    shutil.copy(tmp_path / "sharegpt.json", tmp_path / "folder" / "a.json")
    assert got(str(tmp_path / "folder"), tok) == want
    assert got(str(tmp_path / "messages.jsonl*"), tok) == want * 3  # .jsonl, .jsonl.gz, .jsonl.bz2


def test_csv_and_tsv_alpaca_with_empty_input(tmp_path, tok):
    rows = [("Say hi", "", "hi"), ("Add", "2 3", "5")]
    (tmp_path / "a.csv").write_text("instruction,input,output\n" + "".join(f'"{a}","{b}","{c}"\n' for a, b, c in rows))
    (tmp_path / "a.tsv").write_text("instruction\tinput\toutput\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    want = [encode_reference([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}], tok),
            encode_reference([{"role": "user", "content": "Add\n2 3"}, {"role": "assistant", "content": "5"}], tok)]
    assert got(str(tmp_path / "a.csv"), tok) == want
    assert got(str(tmp_path / "a.tsv"), tok) == want


def test_column_mapping_and_masks(tmp_path, tok):
    rows = [{"dialog": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                        {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
                        {"role": "assistant", "content": "e"}]}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    ids, labels = got([{"path": str(tmp_path / "d.jsonl"), "format": "messages", "columns": {"messages": "dialog"}}],
                      tok)[0]
    hand = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "mask": 1},
            {"role": "user", "content": "cd"}, {"role": "assistant", "content": "e"}]
    assert (ids, labels) == encode_reference(hand, tok)
    learned = tok.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert learned.strip().startswith("e") and "b" not in learned  # weight 0 turn not learned


def test_sharegpt_custom_tags_and_text_layout(tmp_path, tok):
    rows = [{"conversations": [{"from": "me", "value": "Capital of France?"}, {"from": "bot", "value": "Paris"}]}]
    write_jsonl(tmp_path / "s.jsonl", rows)
    spec = [{"path": str(tmp_path / "s.jsonl"), "columns": {"user_tag": "me", "assistant_tag": "bot"}}]
    assert got(spec, tok) == [encode_reference(CONVS[0][1:], tok)]
    write_jsonl(tmp_path / "t.jsonl", [{"text": "domain words here"}])
    ids, labels = got(str(tmp_path / "t.jsonl"), tok)[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels == [IGNORE] + ids[1:]  # every token learned (nothing predicts the first)


def test_mixture_weights(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [as_messages(c) for c in CONVS] * 4)  # 12 rows
    (tmp_path / "b.json").write_text(json.dumps([as_alpaca(CONVS[2])] * 3))
    spec_file = tmp_path / "mix.yaml"
    spec_file.write_text("- path: a.jsonl\n  weight: 0.5\n- path: b.json\n  weight: 2\n")
    res = read_examples(str(spec_file), tok)
    assert [s.taken for s in res.stats.sources] == [6, 6] and len(res.examples) == 12
    again = read_examples(str(spec_file), tok)
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in res.examples]  # a fixed subsample
    for bad, msg in (("- path: a.jsonl\n  weight: -1\n", "'weight' must be a finite number >= 0"),
                     ("- path: a.jsonl\n  weight: 0\n- path: b.json\n  weight: 0\n", "every source has weight 0"),
                     ("- path: a.jsonl\n  wieght: 1\n", "unknown key\\(s\\) \\['wieght'\\]"),
                     ("- path: a.jsonl\n  format: chatml\n", "format 'chatml' is not a known layout")):
        spec_file.write_text(bad)
        with pytest.raises(DataError, match=msg):
            read_examples(str(spec_file), tok)


@pytest.mark.parametrize("rows,match", [
    ([{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     r"d.jsonl:1: field 'messages\[0\].role': unknown role 'human'; known roles: system, user, assistant, tool"),
    ([{"conversations": [{"from": "person", "value": "a"}, {"from": "gpt", "value": "b"}]}],
     r"d.jsonl:1: field 'conversations\[0\].from': unknown speaker tag 'person'; known tags: 'human', 'gpt'"),
    ([{"messages": [{"role": "user", "content": "a"}]}], r"d.jsonl:1: conversation has no assistant turn"),
    ([{"question": "a", "reply": "b"}],
     r"d.jsonl: cannot tell the data layout from its columns \['question', 'reply'\]; known layouts .*alpaca "
     r"\(instruction, output\)"),
    ([{"instruction": "a", "output": "b"}, {"conversations": [{"from": "human", "value": "a"}]}],
     r"d.jsonl:2: this row is in the sharegpt layout, while the source's first row is alpaca"),
    ([{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]}],
     r"d.jsonl:1: field 'messages\[0\].content': expected a string or a list of text parts, found int 7"),
])
def test_bad_rows_name_file_row_field_expected_and_found(tmp_path, tok, rows, match):
    write_jsonl(tmp_path / "d.jsonl", [{"x": 0}] * 0 + rows)
    with pytest.raises(DataError, match=match):
        read_examples(str(tmp_path / "d.jsonl"), tok)


def test_blank_lines_keep_line_numbers(tmp_path, tok):
    good = json.dumps(as_messages(CONVS[0]))
    (tmp_path / "d.jsonl").write_text(f"{good}\n\n\n{good}\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"d.jsonl:5: field 'messages\[0\].role'"):
        read_examples(str(tmp_path / "d.jsonl"), tok)


def test_damaged_files_are_named(tmp_path, tok):
    import datasets

    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"messages": []}\n' * 50)[:30])  # cut short
    with pytest.raises(DataError, match=r"c.jsonl.gz: cannot be read"):
        read_examples(str(tmp_path / "c.jsonl.gz"), tok)
    datasets.Dataset.from_list([{"messages": "not a list"}]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p.parquet record 1: field 'messages': expected a non-empty list of "
                                        r"messages, found str"):
        read_examples(str(tmp_path / "p.parquet"), tok)
    (tmp_path / "m.jsonl").write_text(json.dumps(as_messages(CONVS[0])) + "\n{oops\n")
    with pytest.raises(DataError, match=r"m.jsonl:2: malformed JSON"):
        read_examples(str(tmp_path / "m.jsonl"), tok)


def test_skip_bad_rows_counts_by_reason_and_refuses_an_empty_result(tmp_path, tok):
    bad_role = {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}
    no_answer = {"messages": [{"role": "user", "content": "a"}]}
    write_jsonl(tmp_path / "d.jsonl", [as_messages(CONVS[0]), bad_role, no_answer, bad_role])
    res = read_examples(str(tmp_path / "d.jsonl"), tok, skip_bad_rows=True)
    assert len(res.examples) == 1 and res.stats.sources[0].skipped == 3
    reasons = dict(res.stats.skipped)
    assert sum(reasons.values()) == 3 and any("unknown role 'robot'" in r and n == 2 for r, n in reasons.items())
    write_jsonl(tmp_path / "e.jsonl", [bad_role, no_answer])
    with pytest.raises(DataError, match="no examples left"):
        read_examples(str(tmp_path / "e.jsonl"), tok, skip_bad_rows=True)


def test_the_second_read_comes_from_the_cache(tmp_path, tok, monkeypatch):
    import esft.data.pipeline as pipeline

    write_jsonl(tmp_path / "d.jsonl", [as_messages(c) for c in CONVS] * 5)
    first = got(str(tmp_path / "d.jsonl"), tok)
    calls = []
    real = pipeline._tokenize

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "_tokenize", counting)  # the cache key was fixed by the first read
    assert got(str(tmp_path / "d.jsonl"), tok) == first and calls == []
    assert got(str(tmp_path / "d.jsonl"), tok, template="reference", mask_prompt=False) != first and calls  # new key


def test_streaming_reads_only_what_is_asked(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", [as_messages(c) for c in CONVS] * 100)
    res = read_examples(str(tmp_path / "d.jsonl"), tok, streaming=True, max_examples=4)
    ex = list(res.examples)
    assert len(ex) == 4 and [(e.input_ids, e.labels) for e in ex] == (expected(tok) * 2)[:4]


# special tokens around each turn: a prefix tokenizes the same alone or followed by more text
GEN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|bos|>A:<|pad|>{% generation %}"
                "{{ m['content'] }}<|eos|>{% endgeneration %}{% else %}<|bos|>{{ m['role'] }}: {{ m['content'] }}"
                "<|pad|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|bos|>A:<|pad|>{% endif %}")


def test_chat_template_generation_marks_agree_with_prefix_rendering(tok):
    from esft.data.conversations import chat_label_method

    marked = tok.__class__.from_pretrained(tok.name_or_path)
    marked.chat_template = GEN_TEMPLATE
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = GEN_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "generation" in chat_label_method(marked) and "prefix" in chat_label_method(plain)
    for c in CONVS + [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "mask": 1},
                       {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]:
        a, b = encode_chat_template(c, marked), encode_chat_template(c, plain)
        assert a == b, c
        assert any(l != IGNORE for l in a[1])


def test_tool_calls_need_the_chat_template(tmp_path, tok):
    row = {"conversations": [{"from": "human", "value": "weather?"},
                             {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {}})},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}],
           "tools": json.dumps([{"name": "get_weather", "parameters": {}}])}
    write_jsonl(tmp_path / "t.jsonl", [row])
    (conv,) = iter_conversations(str(tmp_path / "t.jsonl"))
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather" and conv.tools
    with pytest.raises(DataError, match="template=reference has no slot for tool"):
        read_examples(str(tmp_path / "t.jsonl"), tok)


def test_train_reads_a_mixture_from_its_yaml_config(tiny_dir, tmp_path):
    from esft.cli import main

    write_jsonl(tmp_path / "a.jsonl", [as_messages(c) for c in CONVS] * 10)
    (tmp_path / "b.json").write_text(json.dumps([as_sharegpt(c) for c in CONVS] * 10))
    (tmp_path / "cfg.json").write_text(json.dumps({"experts": {"1": [0], "2": [3]}}))
    (tmp_path / "train.yaml").write_text(
        f"model: {tiny_dir / 'model'}\noutput_dir: {tmp_path / 'o'}\nexpert_config: {tmp_path / 'cfg.json'}\n"
        f"seq_len: 128\nsteps: 2\ntensorboard: false\ntrain_data:\n  - path: {tmp_path / 'a.jsonl'}\n"
        f"  - path: {tmp_path / 'b.json'}\n    weight: 0.5\n")
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--quiet"]) == 0
    assert (tmp_path / "o" / "adapter" / "adapter.safetensors").exists()


def test_inspect_reports_layouts_lengths_and_spans(tiny_dir, tmp_path, capsys):
    from esft.cli import main

    (tmp_path / "a.json").write_text(json.dumps([as_alpaca(c) for c in CONVS]))
    assert main(["data", "inspect", str(tmp_path / "a.json"), "--model", str(tiny_dir / "model"), "--seq-len", "20",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["sources"][0]["layout"] == "alpaca" and r["conversations"] == 3
    lengths = [len(ids) for ids, _ in expected(load_tok(tiny_dir))]
    assert r["tokens"]["over_seq_len"] == sum(n > 20 for n in lengths) and r["tokens"]["max"] == max(lengths)
    learned = "".join(t for t, learn in r["example"]["spans"] if learn)
    assert "Paris" in learned and "France" not in learned
    assert main(["data", "inspect", str(tmp_path / "a.json")]) == 0
    assert "alpaca" in capsys.readouterr().out


def load_tok(tiny_dir):
    from esft.models.loading import load_tokenizer

    return load_tokenizer(tiny_dir / "model")


def test_packing_the_token_table_equals_packing_examples(tmp_path, tok):
    from esft.data.packing import pack

    rows = [as_messages(c) for c in CONVS] * 7 + [as_messages([{"role": "user", "content": "long " * 80},
                                                               {"role": "assistant", "content": "ok"}])]
    write_jsonl(tmp_path / "d.jsonl", rows)
    res = read_examples(str(tmp_path / "d.jsonl"), tok)
    for seq_len, overlong, max_rows in ((64, "truncate", None), (64, "drop", None), (40, "truncate", 3)):
        a = pack(res.table, seq_len, tok.pad_token_id, overlong, max_rows=max_rows)
        b = pack(res.examples, seq_len, tok.pad_token_id, overlong, max_rows=max_rows)
        assert all((getattr(a, k) == getattr(b, k)).all() for k in ("input_ids", "labels", "attention_mask"))
        assert (a.stats.rows, a.stats.tokens, a.stats.truncated, a.stats.dropped) == \
            (b.stats.rows, b.stats.tokens, b.stats.truncated, b.stats.dropped)
