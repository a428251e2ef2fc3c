"""`esft report`: LR choice, the win/tie/lose rule, run planning and caching, and a small end-to-end report
whose tables are checked against the result files they were made from."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from esft.config import ConfigError, build_config
from esft.report.config import ReportConfig
from esft.report.plan import MAIN, Run, choose_lr, report_runs, sweep_runs
from esft.report.render import compare, fmt_ms, mean_std


def test_choose_lr_uses_loss_relative_to_each_tasks_best():
    # task b's losses are 10x larger; a plain mean would let b decide alone
    losses = {1e-3: {"a": 1.0, "b": 30.0}, 1e-2: {"a": 2.0, "b": 20.0}, 1e-1: {"a": 1.1, "b": 22.0}}
    lr, rel = choose_lr(losses)
    assert rel[1e-3] == pytest.approx((1.0 / 1.0 + 30.0 / 20.0) / 2)
    assert rel[1e-2] == pytest.approx((2.0 + 1.0) / 2)
    assert rel[1e-1] == pytest.approx((1.1 + 1.1) / 2)
    assert lr == 1e-1
    # a diverged run (inf / missing task) can never be chosen
    lr, rel = choose_lr({1e-3: {"a": 1.0, "b": 2.0}, 1e-2: {"a": 0.5, "b": math.inf}})
    assert lr == 1e-3 and rel[1e-2] == math.inf


def test_compare_rule_and_formatting():
    assert compare([50, 52, 54], [40, 41, 42]) == "win"
    assert compare([40, 41, 42], [50, 52, 54]) == "lose"
    assert compare([50, 60, 70], [45, 55, 65]) == "tie"  # 5-point gap, noise sqrt(100+100) = 14
    assert compare([50.5], [50.0]) == "tie"  # within the 1-point floor
    m, s = mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (2.0, 1.0)
    assert fmt_ms([1.0, 2.0, 3.0]) == "2.0 ± 1.0" and fmt_ms([4.0]) == "4.0" and fmt_ms([]) == "–"


def test_plan_trains_the_sweep_winner_once():
    tasks = ["translate_synth", "word_problems"]
    sweep = sweep_runs(tasks, {"esft": [1e-3, 1e-2], "full": [1e-4], "lora": [1e-3]})
    assert len(sweep) == 2 * 2 + 2 + 2
    runs = report_runs(tasks, 3, {"esft": 1e-2, "full": 1e-4, "lora": 1e-3}, ablations=True, p_values=[0.5])
    assert len(runs) == 8 * 2 * 3 + 2
    assert len({r.key for r in runs}) == len(runs)
    shared = {r.key for r in sweep} & {r.key for r in runs}
    # seed 0 of ESFT-Token at 1e-2, FFT at 1e-4, LoRA at 1e-3, per task: trained once, used by both tables
    assert shared == {Run(t, v, lr, 0).key for t in tasks
                      for v, lr in (("ESFT-Token", 1e-2), ("FFT", 1e-4), ("LoRA", 1e-3))}
    assert Run("t", "ESFT-Token + non-expert", 1e-3, 2).key == "t/ESFT-Token_plus_non-expert/lr0.001/seed2"


def test_report_config_from_overrides():
    cfg = build_config(ReportConfig, None, ["sweep_esft=[1e-3, 3e-3]", "tasks=[translate_synth]", "quick=true"])
    assert cfg.sweep_esft == [1e-3, 3e-3] and all(isinstance(x, float) for x in cfg.sweep_esft)
    assert cfg.seeds == 1 and not cfg.sweep and cfg.p_sweep == []
    with pytest.raises(ConfigError, match="must be a list"):
        build_config(ReportConfig, None, ["sweep_esft=0.1"])
    with pytest.raises(ValueError, match="general domain"):
        ReportConfig(tasks=["arithmetic"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        ReportConfig(tasks=["nope"])


def _cell_values(md: str, section: str, row: str) -> list[str]:
    body = md.split(section, 1)[1]
    line = next(l for l in body.splitlines() if l.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    from esft.report.run import run_report

    root = tmp_path_factory.mktemp("report")
    cfg = ReportConfig(report=str(root / "r" / "report.md"), work_dir=str(root / "work"), tasks=["translate_synth"],
                       seeds=2, steps=2, eval_every=1, n_train=60, n_valid=8, n_eval=6, n_general=2,
                       profile_tokens=1024, sweep_esft=[1e-3, 1e-2], sweep_full=[1e-4], sweep_lora=[1e-3],
                       p_sweep=[0.5], ablations=False, workers=0, extended=True,
                       methods=["full", "lora", "esft"])  # the paper's three (test_report_methods: the others)
    state = run_report(cfg, progress=False, command="esft report (test)")
    return cfg, state, (root / "r" / "report.md").read_text()


def test_report_tables_match_the_result_files(small_report):
    cfg, state, md = small_report
    results = json.loads((Path(cfg.report).with_suffix(".json")).read_text())["results"]
    lr = state["lr"]
    fam = {"FFT": "full", "LoRA": "lora", "ESFT-Token": "esft", "ESFT-Gate": "esft"}
    for v in [m.name for m in MAIN]:
        runs = [r for r in results if r["variant"] == v and r["lr"] == lr[fam[v]]]
        assert sorted(r["seed"] for r in runs) == [0, 1], v
        scores = [r["task_score"] for r in runs]
        m, s = statistics.fmean(scores), statistics.stdev(scores)
        assert _cell_values(md, "## Downstream task scores", v)[0] == f"{m:.1f} ± {s:.1f}"
        general = [r["general"] for r in runs]
        assert _cell_values(md, "## General ability after", v)[0] == f"{statistics.fmean(general):.1f} ± " \
                                                                     f"{statistics.stdev(general):.1f}"
    base = _cell_values(md, "## Downstream task scores", "Base model")[0]
    assert base == f"{state['base']['translate_synth']:.1f}"
    # the sweep winner is the LR with the lowest validation loss (one task: relative loss = loss / min loss)
    sweep = [r for r in results if r["variant"] == "ESFT-Token" and r["seed"] == 0]
    best = min((r for r in sweep if r["lr"] in (1e-3, 1e-2)), key=lambda r: (r["best_valid_loss"], r["lr"]))
    assert lr["esft"] == best["lr"]
    # efficiency: ESFT trains and stores a fraction of what FFT does
    fft = next(r for r in results if r["variant"] == "FFT")
    tok = next(r for r in results if r["variant"] == "ESFT-Token")
    assert tok["trainable_params"] < fft["trainable_params"] / 5
    assert tok["artifact_bytes"] < fft["artifact_bytes"] / 5
    assert tok["optimizer_state_bytes"] == 2 * 4 * tok["trainable_params"]  # AdamW: two fp32 moments
    assert re.search(r"\*\*ESFT-Token vs FFT\*\* — task skill: (wins|ties|loses) on 1", md)
    for png in ("tradeoff", "routing", "concentration", "overlap"):
        assert (Path(cfg.report).parent / f"report_{png}.png").stat().st_size > 1000
    assert "ESFT-Token p=0.5" not in md and "| 0.5 |" in md  # the p sweep table


def test_report_leads_with_matched_forgetting(small_report, monkeypatch):
    """The headline's cells are the frontier values of the result files; the default mode (no
    --extended) reuses the same runs and leaves out ESFT-Gate."""
    import dataclasses

    import esft.report.worker as worker
    from esft.report.frontier import frontier_value, with_base
    from esft.report.run import run_report

    cfg, state, md = small_report
    assert md.index("## Task skill at matched forgetting") < md.index("## Second view")
    t, base, bg = "translate_synth", state["base"]["translate_synth"], state["base_general"]
    fam = {"FFT": "full", "LoRA": "lora", "ESFT-Token": "esft"}
    for v in ("FFT", "LoRA", "ESFT-Token"):
        runs = [r for r in state["results"] if r["variant"] == v and r["task"] == t]

        def value(seed, lrs):
            return frontier_value(with_base(base, {r["lr"]: (bg - r["general"], r["task_score"])
                                                   for r in runs if r["seed"] == seed and r["lr"] in lrs}), 1.0)

        support = state["frontier_lrs"][f"{fam[v]}/{t}"]
        # seed 0's front LRs give seed 0 the value of its whole grid
        assert value(0, support) == pytest.approx(value(0, {r["lr"] for r in runs}))
        vals = [value(s, support) for s in (0, 1)]
        m, sd = statistics.fmean(vals), statistics.stdev(vals)
        assert _cell_values(md, "## Task skill at matched forgetting", v)[0] == f"{m:.1f} ± {sd:.1f}"
    assert "Without seed 0 (mean of the other seeds" in md
    assert (Path(cfg.report).parent / "report_frontier.png").stat().st_size > 1000

    monkeypatch.setattr(worker, "execute", lambda job: (_ for _ in ()).throw(AssertionError(job["run"]["key"])))
    default = dataclasses.replace(cfg, extended=False, p_sweep=[], report=str(Path(cfg.report).with_name("d.md")))
    run_report(default, progress=False, command="esft report (test)")
    dmd = Path(default.report).read_text()
    assert _cell_values(dmd, "## Task skill at matched forgetting", "ESFT-Token") == \
        _cell_values(md, "## Task skill at matched forgetting", "ESFT-Token")
    assert "| ESFT-Gate |" not in dmd and "These tables use seed 0 only" in dmd
    fft0 = next(r for r in state["results"] if r["variant"] == "FFT" and r["seed"] == 0 and r["lr"] == state["lr"]["full"])
    assert _cell_values(dmd, "## Downstream task scores", "FFT")[0] == f"{fft0['task_score']:.1f}"  # seed 0, no ±


def test_report_with_one_seed_shows_no_spread(small_report, tmp_path):
    """With one seed the headline shows values, not '± 0.0', and says so."""
    import copy

    from esft.report.render import write_report

    cfg, state, md = small_report
    one = copy.deepcopy(state)
    one["results"] = [r for r in one["results"] if r["seed"] == 0]
    one["config"]["seeds"] = 1
    write_report(one, tmp_path / "one.md")
    head = (tmp_path / "one.md").read_text().split("## Task skill at matched forgetting", 1)[1].split("## Second view")[0]
    assert "±" not in head.replace("mean ± sample std", "") and "One seed: no spread is shown" in head
    assert "Gaps in task points: ESFT-Token minus FFT:" in head and "Without seed 0" not in head


def test_times_from_reused_runs_are_flagged(small_report, tmp_path):
    """Run times of a report that reused runs from its ledger come from several sittings: the report says so
    beside both tables of times, and says nothing when every run was made in this sitting."""
    import copy

    from esft.report.render import SITTINGS, write_report

    cfg, state, md = small_report
    for reused, expected in ((0, 0), (5, 2)):
        s = copy.deepcopy(state)
        s["runs_reused"] = reused
        write_report(s, tmp_path / f"r{reused}.md")
        assert (tmp_path / f"r{reused}.md").read_text().count(SITTINGS) == expected


def test_rerun_reuses_finished_runs(small_report, monkeypatch):
    import esft.report.worker as worker
    from esft.report.run import run_report

    cfg, state, md = small_report

    def boom(job):
        raise AssertionError(f"retrained {job['run']['key']}")

    monkeypatch.setattr(worker, "execute", boom)
    again = run_report(cfg, progress=False, command="esft report (test)")
    assert again["runs_trained"] == 0 and again["runs_reused"] == len({r["key"] for r in state["results"]})
    assert {r["key"]: r["task_score"] for r in again["results"]} == {r["key"]: r["task_score"] for r in state["results"]}


def test_a_failed_run_is_named(tmp_path):
    from esft.report.run import Runner

    cfg = ReportConfig(work_dir=str(tmp_path), report=str(tmp_path / "r.md"), tasks=["translate_synth"], workers=0)
    data = {"translate_synth": {"train": tmp_path / "missing.jsonl", "valid": tmp_path / "missing.jsonl"}}
    runner = Runner(cfg, "/nonexistent/model", data, {}, progress=False)
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed: translate_synth/FFT/lr0.001/seed0"):
        runner.execute([Run("translate_synth", "FFT", 1e-3, 0)], "test")


def test_cache_key_follows_file_contents_and_the_base_model(tmp_path):
    from esft.report.run import Runner

    cfg = ReportConfig(work_dir=str(tmp_path), report=str(tmp_path / "r.md"), tasks=["translate_synth"], workers=0)
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": []}\n')
    data = {"translate_synth": {"train": train, "valid": train}}
    run = Run("translate_synth", "FFT", 1e-3, 0)
    a = Runner(cfg, "m", data, {}, False, {"weights": "w1"}).job(run)["job_id"]
    assert Runner(cfg, "m", data, {}, False, {"weights": "w1"}).job(run)["job_id"] == a
    assert Runner(cfg, "m", data, {}, False, {"weights": "w2"}).job(run)["job_id"] != a  # other base weights
    train.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')  # same path, new data
    assert Runner(cfg, "m", data, {}, False, {"weights": "w1"}).job(run)["job_id"] != a


def test_device_and_dtype_reach_every_run_and_the_cache_key(tmp_path):
    from esft.report.render import run_devices
    from esft.report.run import Runner

    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": []}\n')
    data = {"translate_synth": {"train": train, "valid": train}}
    run = Run("translate_synth", "FFT", 1e-3, 0)

    def job(**kw):
        cfg = ReportConfig(work_dir=str(tmp_path), report=str(tmp_path / "r.md"), tasks=["translate_synth"], workers=0, **kw)
        return Runner(cfg, "m", data, {}, False, {"weights": "w"}).job(run)

    default, gpu = job(), job(device="cuda", dtype="float32")
    # the defaults are the strings earlier reports hashed: their cached runs stay valid
    assert (default["train"]["device"], default["train"]["dtype"]) == ("auto", "auto")
    assert (gpu["train"]["device"], gpu["train"]["dtype"]) == ("cuda", "float32")
    assert gpu["job_id"] != default["job_id"]  # a GPU result is never taken for a CPU one

    state = {"config": {"dtype": "float32"}, "cpu_count": 16,
             "results": [{"device": "cuda", "device_name": "NVIDIA H100"}, {"device": "cuda", "device_name": "NVIDIA H100"}]}
    assert run_devices(state) == "GPU NVIDIA H100, float32; 16 CPU cores"
    state = {"config": {"dtype": "auto"}, "cpu_count": 2, "results": [{"threads": 1}]}  # results from before 'device'
    assert run_devices(state) == "2 CPU cores"


def test_a_fresh_clone_resumes_from_the_ledger(small_report, monkeypatch, tmp_path):
    """The ledger beside the report holds every finished run; with an empty work_dir (a fresh
    clone: runs/ is not committed) and the model at another path, nothing is retrained."""
    import dataclasses

    import esft.report.worker as worker
    from esft.report.run import Runner, ledger_path, read_ledger, run_report

    cfg, state, md = small_report
    ledger = read_ledger(ledger_path(cfg.report))
    assert {r["key"] for r in ledger.values()} == {r["key"] for r in state["results"]}
    monkeypatch.setattr(worker, "execute", lambda job: (_ for _ in ()).throw(AssertionError(job["run"]["key"])))
    moved = dataclasses.replace(cfg, work_dir=str(tmp_path / "fresh_work"))
    again = run_report(moved, progress=False, command="esft report (test)")
    assert again["runs_trained"] == 0
    assert {r["key"]: r["general"] for r in again["results"]} == {r["key"]: r["general"] for r in state["results"]}

    run = Run("translate_synth", "FFT", 1e-4, 0)
    data = {"translate_synth": {"train": tmp_path / "fresh_work" / "data" / "translate_synth" / "train.jsonl"}}
    data["translate_synth"]["valid"] = data["translate_synth"]["train"]
    here, there = (Runner(moved, m, data, {}, False, {"weights": "w"}).job(run)["job_id"] for m in ("/a/model", "/b/model"))
    assert here == there  # the weights' fingerprint stands for the model, not its path

    damaged = dataclasses.replace(moved, report=str(tmp_path / "d" / "report.md"))
    ledger_path(damaged.report).parent.mkdir()
    ledger_path(damaged.report).write_text('{"x": ')  # a damaged ledger is named, never silently dropped
    with pytest.raises(ValueError, match=r"report\.runs\.json is damaged"):
        Runner(damaged, "m", data, {}, False, {"weights": "w"})
