"""esft eval: bad numbers and paths end in one line before the model loads; no NaN/Infinity in what it writes."""

import json

import pytest

from esft.cli import main
from esft.eval.run import EvalConfig, run_eval
from esft.models.loading import load_model


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Reverse: {w}", "answers": [w]}) + "\n" for w in ("a b", "c", "d e")))
    return p


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model fails the test: every check below must come first."""
    monkeypatch.setattr("esft.eval.run.load_for_eval", lambda *a, **k: pytest.fail("loaded the model before checking"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("esft eval: error: ")
    return err


@pytest.mark.parametrize("args, says", [
    (["--n", "-1"], "--n must be an integer >= 1, got -1"),
    (["--n", "0"], "--n must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 1, got -5"),
    (["--n-general", "0", "--general"], "--n-general must be an integer >= 1, got 0"),
    (["--harness-limit", "0"], "--harness-limit must be an integer >= 1, got 0"),
    (["--harness-fewshot", "-2"], "--harness-fewshot must be an integer >= 0, got -2"),
    (["--judge-timeout", "0", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j"],
     "--judge-timeout must be a number of seconds > 0, got 0.0"),
    (["--judge-timeout", "nan"], "--judge-timeout must be a number of seconds > 0, got nan"),
    (["--judge-timeout", "inf"], "--judge-timeout must be a number of seconds > 0, got inf"),
    (["--judge-retries", "-1"], "--judge-retries must be an integer >= 0, got -1"),
    (["--judge-url", "localhost:8000/v1", "--judge-model", "j"], "--judge-url must be an http:// or https:// URL"),
    (["--metric", "bleu9"], "unknown metric 'bleu9'; known: chrf, exact_match"),
])
def test_bad_numbers_are_refused_before_the_model_loads(data, args, says, capsys, no_loading):
    assert main(["eval", "--data", str(data), *args]) == 2
    assert says in one_error_line(capsys)


def test_bad_task_options_are_refused_before_the_model_loads(capsys, no_loading):
    assert main(["eval", "--task", "no_such_task"]) == 2
    assert "unknown task 'no_such_task'; available tasks:" in one_error_line(capsys)
    assert main(["eval", "--task", "intent_json", "--metric", "chrf"]) == 2
    assert "--metric is for --data; suite task intent_json is scored with its own metric, intent_json" in \
        one_error_line(capsys)
    with pytest.raises(ValueError, match="--n must be an integer >= 1, got 2.5"):
        EvalConfig(task="intent_json", n=2.5)
    with pytest.raises(ValueError, match="--n must be an integer >= 1, got True"):
        EvalConfig(task="intent_json", n=True)


def test_bad_paths_name_the_option_and_the_remedy(tmp_path, data, capsys, no_loading):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "summary.json").mkdir()
    d = ["--data", str(data)]
    cases = [
        (["--data", str(tmp_path / "blocked")], f"{tmp_path / 'blocked'}: the folder holds no data file"),
        (["--data", str(tmp_path / "nope.jsonl")], f"{tmp_path / 'nope.jsonl'}: not found"),
        (d + ["--adapter", str(a_file)], f"--adapter {a_file} is a file; give the adapter's directory"),
        (d + ["--adapter", str(tmp_path / "none")], "no such directory; give the directory `esft train` wrote"),
        (d + ["--model", str(a_file)], f"--model {a_file} is a file; give the checkpoint directory"),
        (d + ["--model", str(tmp_path / "none")], "no such directory; give a checkpoint directory"),
        (d + ["--out", str(a_file)], f"--out {a_file} is a file; give a directory for predictions.jsonl"),
        (d + ["--out", str(a_file / "sub")], f"{a_file} is a file, so no directory can be made under it"),
        (d + ["--out", str(tmp_path / "blocked")], "holds a directory named summary.json"),
    ]
    for args, says in cases:
        assert main(["eval", *args]) == 2, args
        assert says in one_error_line(capsys), args


def test_n_keeps_that_many_rows_of_a_file(tiny_dir, data, tmp_path):
    s = run_eval(EvalConfig(model=str(tiny_dir / "model"), data=str(data), n=2, max_new_tokens=2))
    assert s["n"] == 2
    s = run_eval(EvalConfig(model=str(tiny_dir / "model"), data=str(data), max_new_tokens=2))
    assert s["n"] == 3  # the default, 200, is "at most" for a file
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: (no examples|empty dataset)"):
        run_eval(EvalConfig(model=str(tiny_dir / "model"), data=str(tmp_path / "empty.jsonl")))


# ---------------------------------------------------------------- no NaN or Infinity in what eval writes

def strict_json(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written: not JSON"))


def test_a_non_finite_metric_is_written_as_null_with_a_note(tiny_dir, data, tmp_path, monkeypatch):
    from esft.tasks import METRICS

    monkeypatch.setitem(METRICS, "unstable", lambda preds, refs: float("nan") if len(preds) > 1 else float("-inf"))
    model, tok = load_model(tiny_dir / "model")
    s = run_eval(EvalConfig(data=str(data), metric="unstable", max_new_tokens=2, out=str(tmp_path / "o")),
                 model=model, tokenizer=tok)
    summary = strict_json((tmp_path / "o" / "summary.json").read_text())
    assert summary["score"] is None and summary["non_finite_as_null"] == ["score"]
    rows = [strict_json(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [None] * 3 and all(r["non_finite_as_null"] == ["score"] for r in rows)
    assert s["n"] == 3


def fake_harness(monkeypatch, result=None, error=None):
    """The harness stand-in: lm-eval is not needed to test what eval writes around it."""
    from esft.eval.harness import HarnessConfig

    def run(model, tok, cfg):
        if error:
            raise error
        return result

    monkeypatch.setattr("esft.eval.run.harness_config", lambda cfg: HarnessConfig(tasks=["t"]))
    monkeypatch.setattr("esft.eval.harness.run_harness", run)


def test_non_finite_harness_numbers_are_written_as_null(tiny_dir, tmp_path, monkeypatch):
    nan, inf = float("nan"), float("inf")
    fake_harness(monkeypatch, {"results": {"t": {"acc,none": nan, "acc_stderr,none": inf, "f1,none": 0.5}},
                               "n": {"t": 2}, "versions": {"t": 1.0}, "lm_eval": "0",
                               "samples": {"t": [{"doc_id": 0, "acc": nan}, {"doc_id": 1, "acc": 1.0}]}})
    model, tok = load_model(tiny_dir / "model")
    run_eval(EvalConfig(harness="t", out=str(tmp_path / "h")), model=model, tokenizer=tok)
    summary = strict_json((tmp_path / "h" / "summary.json").read_text())
    assert summary["harness"]["results"]["t"] == {"acc,none": None, "acc_stderr,none": None, "f1,none": 0.5}
    assert summary["non_finite_as_null"] == ["harness.results.t.acc,none", "harness.results.t.acc_stderr,none"]
    rows = [strict_json(line) for line in (tmp_path / "h" / "harness_t.jsonl").read_text().splitlines()]
    assert rows == [{"doc_id": 0, "acc": None, "non_finite_as_null": ["acc"]}, {"doc_id": 1, "acc": 1.0}]


def test_a_failing_harness_leaves_the_local_results_on_disk(tiny_dir, data, tmp_path, monkeypatch):
    fake_harness(monkeypatch, error=RuntimeError("dataset download failed"))
    model, tok = load_model(tiny_dir / "model")
    with pytest.raises(RuntimeError, match="dataset download failed"):
        run_eval(EvalConfig(data=str(data), harness="t", max_new_tokens=2, out=str(tmp_path / "o")), model=model,
                 tokenizer=tok)
    summary = strict_json((tmp_path / "o" / "summary.json").read_text())
    assert summary["n"] == 3 and "score" in summary and "harness" not in summary
    assert len((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()) == 3
