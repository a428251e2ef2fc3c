"""`esft report`'s front methods beyond the paper's three (issue 26): ESFT-Token + shared experts, router-first
ESFT, ESFT-LoRA and LoRA of other ranks, each over its own LR grid. Their ids and jobs, the committed ledger's
runs still matched by the new code (a fresh clone resumes), and a tiny report through plan -> worker -> render."""

import json
import math
import re
from pathlib import Path

import pytest

from esft.report.config import ReportConfig
from esft.report.plan import (DEFAULT_METHODS, EXTENDED_METHODS, Run, front_variant, frontier_seed_runs, sweep_runs,
                              variant_by_name)

LEDGER = Path(__file__).resolve().parents[1] / "docs" / "report.runs.json"


def test_method_ids_and_their_variants():
    assert [front_variant(m).name for m in DEFAULT_METHODS] == ["FFT", "LoRA", "ESFT-Token"]
    names = {m: front_variant(m).name for m in EXTENDED_METHODS}
    assert names == {"full": "FFT", "lora": "LoRA", "lora-r2": "LoRA r=2", "lora-r1": "LoRA r=1", "esft": "ESFT-Token",
                     "esft-shared": "ESFT-Token + shared", "esft-router": "ESFT-Token (router-first)",
                     "esft-lora-r8": "ESFT-LoRA r=8", "esft-lora-r32": "ESFT-LoRA r=32",
                     "esft-lora-r8-p0.5": "ESFT-LoRA r=8 p=0.5"}
    for m, name in names.items():  # a run's variant name leads back to the variant (the worker's lookup)
        assert variant_by_name(name) == front_variant(m)
    assert front_variant("lora-r8") == front_variant("lora")  # the paper's LoRA is r=8 (TrainConfig's default)
    assert front_variant("esft-lora-r32").method == "esft-lora" and front_variant("esft-lora-r32").rank == 32
    assert front_variant("esft-router").router_stage and front_variant("esft-shared").shared
    with pytest.raises(ValueError, match=r"unknown report method 'lora-rx'; known: full, lora, esft"):
        front_variant("lora-rx")
    # ESFT-LoRA on a larger selection (MoE-Sieve's ~25% of experts): its own p, its own name and run keys
    assert front_variant("esft-lora-r8-p0.5").top_p == 0.5 and front_variant("esft-lora-r8-p0.2") == front_variant("esft-lora-r8")
    for bad, why in (("lora-r8-p0.5", "a p applies to esft-lora only"), ("esft-lora-r8-p1.5", r"p must be a number in \(0, 1\]"),
                     ("esft-lora-r8-p0", r"p must be a number in \(0, 1\]"), ("esft-lora-r8-p.", "p must be a number")):
        with pytest.raises(ValueError, match=why):
            front_variant(bad)
    # the paper's three keep their run keys; the new ones get their own
    runs = sweep_runs(["t"], {"esft": [1e-3], "esft-lora-r8": [2e-3], "lora-r1": [1e-3], "esft-router": [5e-3]})
    assert [r.key for r in runs] == ["t/ESFT-Token/lr0.001/seed0", "t/ESFT-LoRA_r8/lr0.002/seed0",
                                     "t/LoRA_r1/lr0.001/seed0", "t/ESFT-Token_router-first/lr0.005/seed0"]
    seeds = frontier_seed_runs({("esft-shared", "t"): [5e-3], ("full", "t"): [1e-4]}, 3)
    assert [r.key for r in seeds] == ["t/ESFT-Token_plus_shared/lr0.005/seed1", "t/ESFT-Token_plus_shared/lr0.005/seed2",
                                      "t/FFT/lr0.0001/seed1", "t/FFT/lr0.0001/seed2"]


def test_methods_config():
    assert ReportConfig().methods == DEFAULT_METHODS  # the default report is the paper's three
    assert ReportConfig(extended=True).methods == EXTENDED_METHODS
    assert ReportConfig(methods=["esft", "lora-r8"]).methods == ["esft", "lora"]
    assert ReportConfig(quick=True, extended=True).methods == DEFAULT_METHODS  # no grid in quick mode: no front
    cfg = ReportConfig(methods=["esft-lora-r8", "lora-r2", "esft-router"])
    assert cfg.grid("esft-lora-r8") == cfg.sweep_esft_lora and cfg.grid("lora-r2") == cfg.sweep_lora
    assert cfg.grid("esft-router") == cfg.sweep_esft
    with pytest.raises(ValueError, match="needs the LR grid"):
        ReportConfig(quick=True, methods=["esft", "esft-lora-r8"])
    with pytest.raises(ValueError, match="names a method twice"):
        ReportConfig(methods=["lora", "lora-r8"])
    with pytest.raises(ValueError, match="unknown report method 'dora'"):
        ReportConfig(methods=["dora"])
    with pytest.raises(ValueError, match="router_stage_steps must be an integer >= 1"):
        ReportConfig(router_stage_steps=0)


def test_rank_reaches_the_job_and_only_for_the_new_methods(tmp_path):
    from esft.report.run import Runner

    cfg = ReportConfig(work_dir=str(tmp_path), report=str(tmp_path / "r.md"), tasks=["translate_synth"], workers=0)
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": []}\n')
    data = {"translate_synth": {"train": train, "valid": train}}
    runner = Runner(cfg, "m", data, {}, False, {"weights": "w"})
    lora = runner.job(Run("translate_synth", "LoRA", 1e-3, 0))
    assert "lora_rank" not in lora["train"] and "lora_alpha" not in lora["train"]  # its key as before
    r1 = runner.job(Run("translate_synth", "LoRA r=1", 1e-3, 0))
    assert (r1["train"]["method"], r1["train"]["lora_rank"], r1["train"]["lora_alpha"]) == ("lora", 1, 2)
    el = runner.job(Run("translate_synth", "ESFT-LoRA r=32", 1e-3, 0))
    assert (el["train"]["method"], el["train"]["lora_rank"], el["train"]["lora_alpha"]) == ("esft-lora", 32, 64)
    assert len({lora["job_id"], r1["job_id"], el["job_id"]}) == 3


@pytest.mark.skipif(not LEDGER.exists(), reason="no committed ledger")
def test_the_committed_ledger_is_still_matched(tmp_path):
    """The committed ledger's runs of the paper's methods (written by the code before the new methods) have the
    job ids the current code computes for them: a fresh clone's `esft report` reuses them instead of retraining.
    FFT and LoRA on every task; the ESFT variants on one task, whose selections are profiled here as the report
    profiles them."""
    from esft.adapter.fingerprint import model_fingerprint
    from esft.embedded import resolve_model
    from esft.io import write_json_atomic
    from esft.models.loading import load_model
    from esft.profiling.run import ProfileConfig, run_profile
    from esft.report.run import Runner, read_ledger
    from esft.selection.select import SelectConfig, expert_config, select_experts
    from esft.tasks import write_suite

    ledger = {k: r for k, r in read_ledger(LEDGER).items() if r.get("device", "cpu") == "cpu"}
    cfg = ReportConfig(work_dir=str(tmp_path), report=str(tmp_path / "r.md"))  # the default report's settings
    data = write_suite(tmp_path / "data", cfg.n_train, cfg.n_valid, 1, seed=0, tasks=cfg.tasks)
    model_dir = str(resolve_model(cfg.model))
    model, tok = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    fingerprint = model_fingerprint(model)

    def job_id(runner, r):
        return runner.job(Run(r["task"], r["variant"], r["lr"], r["seed"]))["job_id"]

    runner = Runner(cfg, model_dir, data, {}, False, fingerprint)
    base = [(k, r) for k, r in ledger.items() if r["variant"] in ("FFT", "LoRA")]
    assert len(base) >= 40
    assert [r["key"] for k, r in base if job_id(runner, r) != k] == []

    t = "translate_synth"
    prof = run_profile(ProfileConfig(data=str(data[t]["train"]), out=str(tmp_path / "p.json"),
                                     max_tokens=cfg.profile_tokens, seq_len=cfg.seq_len, batch_size=8),
                       model=model, tokenizer=tok, progress=False)
    selections = {}
    for name, fn, p, shared in (("ESFT-Token", "token", 0.2, False), ("ESFT-Gate", "gate", 0.1, False),
                                ("ESFT-Token + shared", "token", 0.2, True)):
        scfg = SelectConfig(score_function=fn, top_p=p, train_shared_experts=shared)
        chosen = select_experts(prof.token_scores if fn == "token" else prof.gate_scores, scfg)
        path = tmp_path / "selections" / f"{Run(t, name, 0, 0).slug}.json"
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, expert_config(chosen, scfg))
        selections.update({(t, name, s): str(path) for s in range(cfg.seeds)})
    runner = Runner(cfg, model_dir, data, selections, False, fingerprint)
    esft = [(k, r) for k, r in ledger.items() if r["task"] == t and r["variant"] in
            ("ESFT-Token", "ESFT-Gate", "ESFT-Token + shared")]
    assert len(esft) >= 10
    assert [r["key"] for k, r in esft if job_id(runner, r) != k] == []


def test_pick_lines_follow_the_numbers():
    from esft.report.render import pick_lines

    def state(n):
        results = [{"variant": v, "method": m, "trainable_params": p} for v, m, p in
                   (("FFT", "full", 1000), ("ESFT-Token", "esft", 50), ("LoRA r=1", "lora", 10))]
        return {"config": {"budgets": [1.0, 5.0]}, "results": results, "model_params": n}

    mf = {"FFT": {"average": {0: [40.0, 60.0], 1: [41.0, 61.0]}},
          "ESFT-Token": {"average": {0: [40.5, 45.0], 1: [40.0, 45.5]}},
          "LoRA r=1": {"average": {0: [30.0, 44.8], 1: [31.0, 45.2]}}}
    at1, at5 = pick_lines(state(1000), mf)
    # <= 1: FFT and ESFT-Token tie within noise -> the smaller one is picked
    assert at1.startswith("- **Forgetting ≤ 1:** FFT scores highest (40.5); within seed noise of it: ESFT-Token (40.2)")
    assert "Pick **ESFT-Token** (5.00% of the parameters trained)" in at1
    # <= 5: FFT leads clearly -> picked; among the small adapters ESFT-Token (45.25) and LoRA r=1 (45.0) tie
    # within noise -> the same rule picks the smaller, and names the best beside it
    assert "FFT scores highest (60.5), 15.2 points above the next, ESFT-Token" in at5
    assert "Pick **FFT** (100.00% of the parameters trained); if a small adapter per task is needed, **LoRA r=1** " \
           "(45.0, -15.5 points; 1.00% of the parameters), within seed noise of the best of them, ESFT-Token (45.2)" in at5


@pytest.fixture(scope="module")
def methods_report(tmp_path_factory):
    from esft.report.run import run_report

    root = tmp_path_factory.mktemp("methods")
    cfg = ReportConfig(report=str(root / "r" / "report.md"), work_dir=str(root / "work"), tasks=["translate_synth"],
                       seeds=2, steps=1, eval_every=1, n_train=40, n_valid=4, n_eval=2, n_general=1,
                       profile_tokens=512, seq_len=64, batch_size=2, workers=0,
                       methods=["esft", "esft-shared", "esft-router", "esft-lora-r8", "lora-r1"],
                       sweep_esft=[1e-2], sweep_lora=[1e-3], sweep_esft_lora=[1e-2],
                       router_stage_steps=2, router_stage_batch_size=2)
    state = run_report(cfg, progress=False, command="esft report (test)")
    return cfg, state, Path(cfg.report).read_text()


def _row(md: str, section: str, name: str) -> list[str]:
    body = md.split(section, 1)[1]
    line = next(l for l in body.splitlines() if l.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_new_methods_end_to_end(methods_report):
    from transformers import AutoConfig

    from esft.embedded import embedded_model_dir
    from esft.report.render import fmt_ms, mean_std
    from esft.report.shares import lora_trainable

    cfg, state, md = methods_report
    names = ["ESFT-Token", "ESFT-Token + shared", "ESFT-Token (router-first)", "ESFT-LoRA r=8", "LoRA r=1"]
    assert [m["variant"] for m in state["methods"]] == names
    runs = {r["variant"]: r for r in state["results"] if r["seed"] == 0}
    assert set(runs) == set(names)
    assert runs["ESFT-LoRA r=8"]["method"] == "esft-lora" and runs["LoRA r=1"]["method"] == "lora"
    model_cfg = AutoConfig.from_pretrained(embedded_model_dir())
    assert runs["LoRA r=1"]["trainable_params"] == lora_trainable(model_cfg, 1)  # rank 1 reached the run
    # ESFT-LoRA r=8 on the same experts as ESFT-Token: 8 x (in + out) per selected expert tensor, far fewer weights
    assert runs["ESFT-LoRA r=8"]["experts_trained"] == runs["ESFT-Token"]["experts_trained"]
    h, i = model_cfg.hidden_size, model_cfg.moe_intermediate_size
    assert runs["ESFT-LoRA r=8"]["trainable_params"] == runs["ESFT-Token"]["experts_trained"] * 8 * ((h + 2 * i) + (i + h))
    assert runs["ESFT-Token + shared"]["trainable_params"] > runs["ESFT-Token"]["trainable_params"]
    # the router-first selection records the stage's settings (not its timing: the file's hash keys the runs)
    sel = json.loads((Path(cfg.work_dir) / "selections" / "translate_synth" / "ESFT-Token_router-first.json").read_text())
    assert sel["selection"]["router_stage"] == {"method": "router-first (Router Lens / CEFT, arXiv 2508.19594)",
                                                "steps": 2, "lr": 5e-4, "modules": "router", "batch_size": 2}
    rec = state["router_stage"]["translate_synth"]
    assert 0 <= rec["overlap_with_esft_token"] <= 1 and rec["loss_after"] < rec["loss_before"]

    head = md.split("## Task skill at matched forgetting", 1)[1].split("## Second view", 1)[0]
    mf = state["matched_forgetting"]

    def at(n, i):  # the method's headline values at budget i, one per seed
        return [v[i] for v in mf[n]["average"].values()]
    for n in names:  # every method on the front, its value = the frontier of its runs
        assert f"- **{n}** (`" in head
        assert _row(head, "| method (task score", n) == [fmt_ms(at(n, i)) for i in range(3)]
        cost = _row(head, "### Trainable share and cost", n)
        tp = runs[n]["trainable_params"]
        assert cost[0] == f"{tp / 1e6:.3f} M" and cost[1] == f"{100 * tp / state['model_params']:.2f}"
        assert cost[-3:] == [f"{mean_std(at(n, i))[0]:.1f}" for i in range(3)]
    assert "router-first" in head and "Jaccard" in head and "LR grid 0.01" in head
    picks = [l for l in head.split("### Which method at which forgetting budget", 1)[1].splitlines()
             if l.startswith("- **Forgetting")]
    assert len(picks) == 3
    for line, i in zip(picks, range(3)):  # the named best is the one with the highest value
        top = max(mean_std(at(n, i))[0] for n in names)
        best = [n for n in names if mean_std(at(n, i))[0] == top]
        assert any(f"** {b} scores highest ({top:.1f})" in line for b in best), line
    assert (Path(cfg.report).parent / "report_frontier.png").stat().st_size > 1000
    grid = md.split("## Learning-rate grid", 1)[1]
    for n in names:
        assert f"| {n} | " in grid


def test_new_methods_reuse_their_runs(methods_report, monkeypatch, tmp_path):
    """A rerun (profiling again, the router stage included) finds every run in the ledger, also from a fresh
    work_dir: the selections' contents, router-first's included, are the same."""
    import dataclasses

    import esft.report.worker as worker
    from esft.report.run import run_report

    cfg, state, md = methods_report
    monkeypatch.setattr(worker, "execute", lambda job: (_ for _ in ()).throw(AssertionError(job["run"]["key"])))
    again = run_report(dataclasses.replace(cfg, work_dir=str(tmp_path / "fresh")), progress=False,
                       command="esft report (test)")
    assert again["runs_trained"] == 0
    assert {r["key"]: r["task_score"] for r in again["results"]} == {r["key"]: r["task_score"] for r in state["results"]}
    assert all(math.isfinite(r["general"]) for r in again["results"])
