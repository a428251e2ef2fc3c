"""`esft report` on the user's own data: user_tasks = [{name, train, valid, eval, metric}], each a data
specification; validated before any model loads, cached by the contents of every file it reads, and scored
on its eval data with its metric exactly as `esft eval --data` scores it."""

import json
from pathlib import Path

import pytest

from esft.config import build_config
from esft.io import DataError
from esft.report.config import ReportConfig
from esft.report.plan import Run

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "light", "music", "horse", "paper", "glass", "north"]


def _write_alpaca(path: Path, n: int) -> Path:
    rows = [{"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"}
            for w in (WORDS[i % len(WORDS)] for i in range(n))]
    path.write_text(json.dumps(rows))  # a JSON array: Alpaca files as LLaMA-Factory reads them
    return path


def _write_sharegpt(path: Path) -> Path:
    rows = [
        {"conversations": [{"from": "human", "value": "Repeat the word twice.\nriver"}, {"from": "gpt", "value": "river river"}]},
        {"conversations": [{"from": "human", "value": "Repeat the word twice.\nstone"}, {"from": "gpt", "value": "stone stone"}]},
        {"system": "You repeat words.",  # system message and an earlier exchange: the prompt keeps them
         "conversations": [{"from": "human", "value": "Repeat the word twice.\ncloud"}, {"from": "gpt", "value": "cloud cloud"},
                           {"from": "human", "value": "Repeat the word twice.\nmusic"}, {"from": "gpt", "value": "music music"}]},
        {"conversations": [{"from": "human", "value": "Repeat the word twice.\npaper"}, {"from": "gpt", "value": "paper paper"}]},
    ]
    path.write_text(json.dumps(rows))
    return path


def _cfg(root: Path, user_tasks, **kw) -> ReportConfig:
    kw = {"report": str(root / "r" / "report.md"), "work_dir": str(root / "work"), "tasks": [], "user_tasks": user_tasks,
          "quick": True, "ablations": False, "steps": 2, "eval_every": 1, "seq_len": 64, "batch_size": 4,
          "n_eval": 4, "n_general": 1, "profile_tokens": 256, "workers": 0, **kw}
    return ReportConfig(**kw)


# ------------------------------------------------------------------ validation, before any model loads

def test_user_tasks_are_checked_when_the_config_is_built(tmp_path):
    train = _write_alpaca(tmp_path / "alpaca.json", 4)
    ev = _write_sharegpt(tmp_path / "eval.json")
    good = {"name": "echo", "train": str(train), "eval": str(ev), "metric": "chrf"}
    cfg = ReportConfig(tasks=[], user_tasks=[good])
    assert cfg.all_tasks == ["echo"] and cfg.user_task("echo")["valid"] is None
    assert ReportConfig(tasks=["translate_synth"], user_tasks=[good]).all_tasks == ["translate_synth", "echo"]
    # from a YAML config / overrides: a list of sources is a specification too
    over = build_config(ReportConfig, None, ["tasks=[]", f"user_tasks=[{{name: echo, train: [{{path: {train}, "
                                                         f"format: alpaca, weight: 2}}], eval: {ev}, metric: chrf}}]"])
    assert over.user_tasks[0]["train"] == [{"path": str(train), "format": "alpaca", "weight": 2}]

    bad = [({**good, "metric": "bleu"}, r"unknown metric 'bleu'; known: chrf, exact_match"),
           ({**good, "name": "translate_synth"}, "is a suite task's name"),
           ({**good, "name": "arithmetic"}, "is a suite task's name"),
           ({**good, "name": "a/b"}, "name must be letters"),
           ({**good, "evaluation": "x"}, r"unknown key\(s\) \['evaluation'\]"),
           ({k: v for k, v in good.items() if k != "eval"}, "missing eval"),
           ({**good, "train": [{"path": str(train), "wieght": 2}]}, r"user_tasks\[0\] \(echo\)\.train source 1: unknown key"),
           ({**good, "valid": [{"path": str(train), "format": "chatml"}]}, "format 'chatml' is not a known layout")]
    for u, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ReportConfig(tasks=[], user_tasks=[u])
    with pytest.raises(ValueError, match="two user tasks are named 'echo'"):
        ReportConfig(tasks=[], user_tasks=[good, good])
    with pytest.raises(ValueError, match="no tasks"):
        ReportConfig(tasks=[])


def test_bad_user_data_stops_the_report_before_the_model_loads(tmp_path, monkeypatch):
    import esft.models.loading as loading
    from esft.report.run import prepare

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    train = _write_alpaca(tmp_path / "alpaca.json", 4)
    ev = _write_sharegpt(tmp_path / "eval.json")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')  # row 2 has no output
    cfg = _cfg(tmp_path, [{"name": "echo", "train": str(broken), "eval": str(ev), "metric": "exact_match"}])
    with pytest.raises(DataError, match=r"user task echo: .*broken\.jsonl:2"):
        prepare(cfg, progress=False)
    no_answer = tmp_path / "noanswer.jsonl"  # an eval row without a reference to score against
    no_answer.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cfg = _cfg(tmp_path, [{"name": "echo", "train": str(train), "eval": str(no_answer), "metric": "exact_match"}])
    with pytest.raises(DataError, match=r"user task echo: .*noanswer\.jsonl:1: .*no assistant turn"):
        prepare(cfg, progress=False)


# ------------------------------------------------------------------ cache keys

def test_suite_jobs_keep_their_cache_keys(tmp_path):
    """The job ids of suite tasks are those earlier reports computed (the committed ledgers stay valid):
    pinned from the code before user tasks existed."""
    from esft.report.run import Runner

    train, valid, sel = tmp_path / "train.jsonl", tmp_path / "valid.jsonl", tmp_path / "sel.json"
    train.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    valid.write_text('{"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n')
    sel.write_text('{"experts": {"1": [0, 1]}}\n')
    cfg = ReportConfig(work_dir="w", report="r/r.md", tasks=["translate_synth"], workers=2)
    runner = Runner(cfg, "m", {"translate_synth": {"train": train, "valid": valid}},
                    {("translate_synth", "ESFT-Token", 0): str(sel)}, False, {"weights": "w"})
    fft = runner.job(Run("translate_synth", "FFT", 1e-3, 0))
    assert fft["job_id"] == "7b07d0978a45653f" and set(fft["eval"]) == {"n_eval", "n_general", "data_seed"}
    assert set(fft["inputs"]) == {"model", "train_data", "valid_data", "expert_config"}
    assert runner.job(Run("translate_synth", "ESFT-Token", 1e-2, 0))["job_id"] == "3aaee6a0a21870ec"


def test_user_job_key_follows_every_file_the_specification_reads(tmp_path):
    from esft.report.run import Runner

    d = tmp_path / "data"
    d.mkdir()
    a, b = _write_alpaca(d / "a.json", 3), _write_alpaca(d / "b.json", 5)
    ev = _write_sharegpt(tmp_path / "eval.json")

    def job(train, valid=None, eval_=str(ev), metric="exact_match", where=tmp_path):
        u = {"name": "echo", "train": train, "valid": valid, "eval": eval_, "metric": metric}
        cfg = ReportConfig(work_dir=str(where / "w"), report=str(where / "r.md"), tasks=[], user_tasks=[u], workers=0)
        data = {"echo": {k: u[k] for k in ("train", "valid", "eval", "metric")}}
        return Runner(cfg, str(where / "model"), data, {}, False, {"weights": "w"}).job(Run("echo", "FFT", 1e-3, 0))

    for spec in (str(d / "*.json"), str(d), [{"path": str(a)}, {"path": str(b), "format": "alpaca"}]):
        j = job(spec)
        assert j["train"]["train_data"] == spec and j["train"]["valid_data"] is None  # given as is to training
        assert j["eval"]["metric"] == "exact_match" and j["inputs"]["eval_data"]
        assert job(spec)["job_id"] == j["job_id"]
        assert job(spec, where=tmp_path / "moved")["job_id"] == j["job_id"]  # work_dir, model path: not keyed
        b.write_text(json.dumps(json.loads(b.read_text()) + [{"instruction": "x", "input": "", "output": "y"}]))
        # ^ the second file the specification reads changes
        assert job(spec)["job_id"] != j["job_id"], spec
    j = job(str(a))
    assert j["inputs"]["train_data"] == __import__("hashlib").sha256(a.read_bytes()).hexdigest()[:16]
    assert job(str(a), metric="chrf")["job_id"] != j["job_id"]  # another metric is another result
    assert job(str(a), valid=str(b))["job_id"] != j["job_id"]
    ev2 = _write_sharegpt(tmp_path / "eval2.json")
    assert job(str(a), eval_=str(ev2))["job_id"] == j["job_id"]  # the same eval contents at another path
    ev2.write_text(ev2.read_text().replace("paper paper", "paper"))
    assert job(str(a), eval_=str(ev2))["job_id"] != j["job_id"]


# ------------------------------------------------------------------ a tiny report on the user's data

@pytest.fixture(scope="module")
def user_report(tmp_path_factory):
    import torch

    from esft.report.run import run_report

    root = tmp_path_factory.mktemp("user_report")
    train = _write_alpaca(root / "alpaca.json", 60)
    ev = _write_sharegpt(root / "eval_sharegpt.json")
    cfg = _cfg(root, [{"name": "echo", "train": str(train), "eval": str(ev), "metric": "chrf"}])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs no faster on two threads, and far slower on a busy machine
    try:
        state = run_report(cfg, progress=False, command="esft report (test)")
        yield cfg, state, ev, Path(cfg.report).read_text()
    finally:
        torch.set_num_threads(threads)


def test_user_task_runs_like_a_suite_task(user_report):
    cfg, state, ev, md = user_report
    results = state["results"]
    assert {r["task"] for r in results} == {"echo"}  # tasks: [] -> only the user's task
    assert {r["variant"] for r in results} == {"FFT", "LoRA", "ESFT-Token", "ESFT-Gate"}
    assert state["tasks"] == ["echo"] and set(state["profiles"]) == {"echo"}
    assert set(state["selected"]["token"]) == {"echo"}
    for r in results:
        assert r["best_valid_loss"] is not None  # valid omitted: the recipe's valid_fraction held out of train
    # the report's tables hold the user task's column
    for v in ("FFT", "LoRA", "ESFT-Token"):
        r = next(x for x in results if x["variant"] == v)
        assert _cell(md, "Downstream task scores", v)[0] == f"{r['task_score']:.1f}"
    assert _cell(md, "Downstream task scores", "Base model")[0] == f"{state['base']['echo']:.1f}"
    assert "echo: the user's data, trained on" in md and "with chrf" in md


def test_user_task_is_scored_as_esft_eval_scores_its_data(user_report):
    """The prompts and references are the ShareGPT file's conversations up to their last assistant turn; each
    run's score is chrF over its predictions (recomputed here with sacrebleu); the base model's equals what
    `esft eval --data FILE --metric chrf` gives."""
    from sacrebleu.metrics import CHRF

    from esft.embedded import resolve_model
    from esft.eval.run import EvalConfig, run_eval

    cfg, state, ev, md = user_report
    rows = json.loads(ev.read_text())
    want_prompts = [[{"role": "user", "content": "Repeat the word twice.\nriver"}],
                    [{"role": "user", "content": "Repeat the word twice.\nstone"}],
                    [{"role": "system", "content": "You repeat words."},
                     {"role": "user", "content": "Repeat the word twice.\ncloud"},
                     {"role": "assistant", "content": "cloud cloud"},
                     {"role": "user", "content": "Repeat the word twice.\nmusic"}],
                    [{"role": "user", "content": "Repeat the word twice.\npaper"}]]
    want_refs = [[r["conversations"][-1]["value"]] for r in rows]
    for r in state["results"]:
        ex = r["examples"]  # n_eval = 4 rows: every example is kept
        assert [e["prompt"] for e in ex] == want_prompts and [e["reference"] for e in ex] == want_refs
        preds = [e["prediction"] for e in ex]
        assert r["task_score"] == pytest.approx(CHRF().corpus_score(preds, [[x[0] for x in want_refs]]).score)
    base = run_eval(EvalConfig(model=str(resolve_model(None)), data=str(ev), metric="chrf", n=4))
    assert base["n"] == 4 and state["base"]["echo"] == pytest.approx(base["score"])


def test_rerun_reuses_the_user_tasks_runs(user_report, monkeypatch):
    import esft.report.worker as worker
    from esft.report.run import run_report

    cfg, state, ev, md = user_report
    monkeypatch.setattr(worker, "execute", lambda job: (_ for _ in ()).throw(AssertionError(job["run"]["key"])))
    again = run_report(cfg, progress=False, command="esft report (test)")
    assert again["runs_trained"] == 0
    assert {r["key"]: r["task_score"] for r in again["results"]} == {r["key"]: r["task_score"] for r in state["results"]}


def _cell(md: str, section: str, row: str) -> list[str]:
    body = md.split(section, 1)[1]
    line = next(l for l in body.splitlines() if l.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]
