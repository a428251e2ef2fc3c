"""`esft eval --harness`: lm-evaluation-harness on base, base + attached ESFT adapter, and merged checkpoints.

Offline: a small multiple-choice harness task is defined here from a local JSONL file (the harness reads it
through ``dataset_path: json``). Its scores are checked against an independent computation on the same items:
each choice's log-likelihood summed directly from the model's logits, the argmax choice scored with the
project's own ``exact_match`` metric.
"""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import attach_adapter, merge_to_checkpoint, save_adapter
from esft.cli import main
from esft.eval.harness import HarnessConfig, HarnessNotInstalled, require_lm_eval, run_harness, wrap_model
from esft.tasks import METRICS
from esft.training.experts import apply_esft

TASK = "esft_toy_mc"
SEL = {1: [0, 3, 5], 2: [1, 2, 6, 7]}


def _items(n=16):
    """Pick-the-reversal items over the toy task's words; three distinct choices, the answer's place varies."""
    words = ["rock", "red", "dog", "three", "two", "sun", "fish", "wave", "cat"]
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        a, b, c = (words[int(j)] for j in torch.randperm(len(words), generator=g)[:3])
        wrong = [f"{a} {b} {c}", f"{b} {c} {a}"]
        label = i % 3
        choices = wrong[:label] + [f"{c} {b} {a}"] + wrong[label:]
        rows.append({"question": f"Reverse: {a} {b} {c}\nAnswer:", "choices": choices, "label": label})
    return rows


@pytest.fixture(scope="module", autouse=True)
def _quick():
    """One torch thread (the tiny model gains nothing from more, and a shared CPU loses much), and no
    environment report: simple_evaluate runs `pip list` in a subprocess for it, seconds per call; the scores do
    not depend on it."""
    import lm_eval.evaluator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _items()))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    base_dir = tiny_dir / "model"
    # an adapter whose selected experts moved far enough to change the log-likelihoods
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": SEL})
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    adapter = save_adapter(plan, root / "adapter", fp)
    merged = merge_to_checkpoint(str(base_dir), str(adapter), str(root / "merged"))
    return {"root": root, "tasks": tasks, "data": data, "base": base_dir, "adapter": adapter, "merged": merged}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def _own_scores(model, tok, rows):
    """Per item: each choice's summed log-probability given the question, by a direct forward pass; then the
    project's exact_match over the argmax choices (0-100)."""
    lls, picks = [], []
    for r in rows:
        ctx = tok(r["question"])["input_ids"]
        per = []
        for c in r["choices"]:
            full = tok(r["question"] + " " + c)["input_ids"]
            assert full[:len(ctx)] == ctx  # the choice starts at a token boundary
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            per.append(sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
        lls.append(per)
        picks.append(r["choices"][max(range(len(per)), key=per.__getitem__)])
    return lls, METRICS["exact_match"](picks, [[r["choices"][r["label"]]] for r in rows])


def _harness(model, tok, setup):
    return run_harness(model, tok, HarnessConfig(tasks=[TASK], include=str(setup["tasks"]), builtin=False,
                                                 batch_size=8))


def _flat(rows):
    return [x for r in rows for x in r]


def _harness_lls(res):
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(x[0]) for x in s["filtered_resps"]] for s in samples]


def test_harness_equals_own_metric_on_base_attached_and_merged(setup):
    tok = AutoTokenizer.from_pretrained(str(setup["base"]))
    rows = [json.loads(x) for x in setup["data"].read_text().splitlines()]
    base = _load(setup["base"])
    attached = _load(setup["base"])
    attach_adapter(attached, setup["adapter"])
    merged = _load(setup["merged"])
    assert wrap_model(attached, tok, 8).model is attached  # the harness evaluates our object, not a copy

    got = {}
    for name, model in (("base", base), ("attached", attached), ("merged", merged)):
        res = _harness(model, tok, setup)
        lls, own_acc = _own_scores(model, tok, rows)
        assert res["n"][TASK] == len(rows)
        assert _flat(_harness_lls(res)) == pytest.approx(_flat(lls), abs=1e-4), name
        assert 100 * res["results"][TASK]["acc,none"] == pytest.approx(own_acc, abs=1e-9), name
        got[name] = (lls, own_acc)
    # the adapter is really used: attached differs from the base and equals the merged checkpoint
    diff = max(abs(a - b) for x, y in zip(got["base"][0], got["attached"][0]) for a, b in zip(x, y))
    assert diff > 0.1
    assert _flat(got["attached"][0]) == pytest.approx(_flat(got["merged"][0]), abs=1e-4)
    print({k: v[1] for k, v in got.items()})


def test_cli_harness_with_attached_adapter(setup, capsys):
    out = setup["root"] / "cli_out"
    rc = main(["eval", "--model", str(setup["base"]), "--adapter", str(setup["adapter"]), "--harness", TASK,
               "--harness-include", str(setup["tasks"]), "--harness-no-builtin", "--batch-size", "8",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_kind"] == "esft"
    attached = _load(setup["base"])
    attach_adapter(attached, setup["adapter"])
    _, own_acc = _own_scores(attached, AutoTokenizer.from_pretrained(str(setup["base"])),
                             [json.loads(x) for x in setup["data"].read_text().splitlines()])
    assert 100 * summary["harness"]["results"][TASK]["acc,none"] == pytest.approx(own_acc, abs=1e-9)
    assert len((out / f"harness_{TASK}.jsonl").read_text().splitlines()) == 16
    assert TASK in capsys.readouterr().out


def test_unknown_task_says_how_to_list_tasks(setup):
    with pytest.raises(ValueError, match=r"unknown harness task\(s\) no_such_task .*lm-eval ls tasks"):
        run_harness(None, None, HarnessConfig(tasks=["no_such_task"], include=str(setup["tasks"]), builtin=False))


def test_cli_unknown_task_is_a_clear_error(setup, capsys):
    rc = main(["eval", "--model", str(setup["base"]), "--harness", "nope_task", "--harness-include",
               str(setup["tasks"]), "--harness-no-builtin"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown harness task(s) nope_task" in err and "lm-eval ls tasks" in err


def test_missing_lm_eval_names_the_extra(monkeypatch, setup, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(HarnessNotInstalled, match=r"pip install 'esft\[harness\]'"):
        require_lm_eval()
    rc = main(["eval", "--model", str(setup["base"]), "--harness", TASK])
    assert rc == 2
    assert "esft[harness]" in capsys.readouterr().err


def test_bad_harness_config():
    with pytest.raises(ValueError, match="at least one task"):
        HarnessConfig(tasks=[" ", ""])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HarnessConfig(tasks=["x"], include="/no/such/dir")
    with pytest.raises(ValueError, match="harness-limit"):
        HarnessConfig(tasks=["x"], limit=0)
