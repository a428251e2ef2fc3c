"""`esft report`: the paper's comparison, regenerated on the shipped model with local metrics.

    data -> base scores -> profile each task -> selections -> [LR sweep] -> all runs -> report

Every run is trained and evaluated by :func:`worker.execute` in its own process; the result
files under ``work_dir/runs/<key>/result.json`` are the only source of the report's numbers,
and a rerun reuses every result whose settings match (an interrupted report resumes). Every
finished result is also kept in the *ledger* beside the report (``docs/report.runs.json``):
it is small enough to commit, so a report that takes longer than one sitting resumes from a
fresh clone, where ``work_dir`` (scratch, not committed) is empty.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from .config import ReportConfig
from .plan import MAIN, Run, choose_lr, front_variant, frontier_seed_runs, report_runs, sweep_runs, variant_by_name

log = logging.getLogger(__name__)
COST = {"full": 3, "lora": 3, "esft": 1, "esft-lora": 1}  # rough relative step cost, to start the long runs first


def _safe_execute(job: dict) -> dict:
    from .worker import execute

    try:
        return execute(job)
    except BaseException:  # noqa: BLE001 - reported by the parent with the run's key
        return {"key": job["run"]["key"], "error": traceback.format_exc()}


class Runner:
    """Turns runs into jobs, skips cached ones, executes the rest (in parallel processes)."""

    def __init__(self, cfg: ReportConfig, model_dir: str, data: dict, selections: dict, progress: bool,
                 model_fingerprint: dict | None = None):
        self.cfg, self.model_dir, self.data, self.selections, self.progress = cfg, model_dir, data, selections, progress
        self.model_fingerprint = model_fingerprint
        self._sha: dict[str, str] = {}
        self.work = Path(cfg.work_dir)
        self.trained: set[str] = set()  # keys of the runs trained by this invocation
        self.reused: set[str] = set()  # keys of the runs taken from the cache
        self.ledger = ledger_path(cfg.report)
        self.finished = read_ledger(self.ledger)  # job_id -> result, from earlier invocations anywhere

    def job(self, run: Run) -> dict:
        v = variant_by_name(run.variant, self.cfg.p_sweep)
        cfg = self.cfg
        data = self.data[run.task]
        spec = lambda s: str(s) if isinstance(s, Path) else s  # noqa: E731 - a suite file, or a user's specification
        train = dict(
            model=self.model_dir, train_data=spec(data["train"]),
            valid_data=spec(data["valid"]), output_dir=str(self.work / "runs" / run.key),
            method=v.method, expert_config=self.selections.get((run.task, run.variant, run.seed)),
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=run.lr, eval_every=cfg.eval_every,
            save_every=0, keep_checkpoints=1, log_every=10, dtype=cfg.dtype, device=cfg.device, seed=run.seed,
            overwrite=True, tensorboard=False,
        )
        if v.rank is not None:  # LoRA r=1, 2, ESFT-LoRA; the paper's LoRA keeps TrainConfig's 8/16 (and its key)
            train.update(lora_rank=v.rank, lora_alpha=2 * v.rank)
        # what the result depends on beyond the settings: the files' contents and the base weights
        inputs = {"model": self.model_fingerprint,
                  **{k: self._content(train[k]) for k in ("train_data", "valid_data")},
                  "expert_config": self._file(train["expert_config"])}
        ev = {"n_eval": cfg.n_eval, "n_general": cfg.n_general, "data_seed": 0}
        if "metric" in data:  # a user task: scored on its eval data with its metric (suite tasks' jobs unchanged)
            ev.update(metric=data["metric"], data=data["eval"])
            inputs["eval_data"] = self._content(data["eval"])
        job = {"run": run.as_dict(), "train": train, "inputs": inputs, "eval": ev}
        job["job_id"] = _job_id(job)  # the cache key: a result is reused only for the same settings
        job["threads"] = max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers else None
        return job

    def _file(self, path: str | None) -> str | None:
        import hashlib

        if path is None or not Path(path).is_file():
            return None  # a missing file fails the run itself, under its key
        if path not in self._sha:
            self._sha[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        return self._sha[path]

    def _content(self, spec) -> str | None:
        """The contents of a data specification: one file's SHA-256 (what every earlier report hashed, so
        their cached runs stay valid), else training's hash over the specification and every file it reads
        (a list of sources, a glob, a folder, a YAML file of sources). None when nothing can be read: the
        run itself then fails, under its key."""
        from ..io import DataError
        from ..training.recipe import _sha256

        if spec is None:
            return None
        if isinstance(spec, (str, Path)) and Path(spec).is_file() and not str(spec).endswith((".yaml", ".yml")):
            return self._file(str(spec))
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._sha:
            try:
                self._sha[key] = _sha256(spec)[:16]
            except (DataError, OSError):
                return None
        return self._sha[key]

    def cached(self, job: dict) -> dict | None:
        path = Path(job["train"]["output_dir"]) / "result.json"
        if path.exists():
            r = json.loads(path.read_text())
            if r.get("job_id") == job["job_id"]:
                return r
        return self.finished.get(job["job_id"])

    def record(self, result: dict) -> None:
        """Keep ``result`` in the ledger (rewritten atomically: a crash leaves the old or the new one)."""
        from ..io import write_json_atomic

        if self.finished.get(result["job_id"]) != result:
            self.finished[result["job_id"]] = result
            write_json_atomic(self.ledger, dict(sorted(self.finished.items(), key=lambda kv: kv[1]["key"])))

    def execute(self, runs: list[Run], stage: str) -> list[dict]:
        from tqdm.auto import tqdm

        jobs = [self.job(r) for r in dict.fromkeys(runs)]  # dedupe, keep order
        results, todo = [], []
        for j in jobs:
            c = self.cached(j)
            (results.append(c) if c else todo.append(j))
        for r in results:
            self.record(r)
        todo.sort(key=lambda j: -COST[j["train"]["method"]] - (1 if j["run"]["variant"].endswith("non-expert") else 0))
        log.info("%s: %d runs, %d cached, %d to train", stage, len(jobs), len(results), len(todo))
        self.trained |= {j["run"]["key"] for j in todo}
        self.reused |= {r["key"] for r in results} - self.trained
        errors = []
        bar = tqdm(total=len(todo), desc=f"report: {stage}", disable=not self.progress or not todo, dynamic_ncols=True)
        try:
            for r in self._map(todo):
                bar.update(1)
                if "error" in r:
                    errors.append(r)
                    log.error("run %s failed:\n%s", r["key"], r["error"])
                    continue
                bar.set_postfix_str(f"{r['key']}: score {r['task_score']:.1f}, general {r['general']:.1f}")
                results.append(r)
                self.record(r)
        finally:
            bar.close()
        if errors:
            raise RuntimeError(f"{len(errors)} run(s) failed: {', '.join(e['key'] for e in errors)} "
                               f"(tracebacks above; finished runs are kept, rerun to retry the rest)")
        return results

    def _map(self, jobs: list[dict]):
        if not self.cfg.workers:
            yield from map(_safe_execute, jobs)
            return
        import multiprocessing as mp

        # spawn, not fork: the parent has used OpenMP threads (profiling), which fork would break
        with mp.get_context("spawn").Pool(self.cfg.workers, maxtasksperchild=1) as pool:
            yield from pool.imap_unordered(_safe_execute, jobs)


def _job_id(job: dict) -> str:
    """The cache key: a hash of everything the result depends on. Files enter through their
    contents (``job["inputs"]``: the base weights' fingerprint, the data's and selection's
    hashes), never their paths, so a result stays valid when the checkout or ``work_dir``
    moves (a fresh clone resumes from the committed ledger). Without a fingerprint of the base
    weights its path stands for them."""
    import hashlib

    paths = ("train_data", "valid_data", "expert_config", "output_dir") + (("model",) if job["inputs"]["model"] else ())
    keyed = {**job, "train": {k: v for k, v in job["train"].items() if k not in paths}}
    if "data" in job["eval"]:  # a user task's eval data: its contents are in inputs["eval_data"]
        keyed["eval"] = {k: v for k, v in job["eval"].items() if k != "data"}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ledger_path(report: str | Path) -> Path:
    """Where the finished runs of the report at ``report`` are kept: ``docs/report.md`` -> ``docs/report.runs.json``."""
    return Path(report).with_suffix(".runs.json")


def read_ledger(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(r, dict) and r.get("job_id") == k for k, r in data.items()):
            raise ValueError("expected an object of job_id -> result with that job_id")
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"the report's ledger of finished runs {path} is damaged ({e}); fix it, or move it away "
                         f"to retrain the runs it held") from None
    return data


def user_task_data(cfg: ReportConfig) -> dict[str, dict]:
    """Each user task's data, every row of it read and converted now (before any model loads): a bad row,
    an undetectable layout or eval rows without a reference stop the report here, naming the task, the file
    and the row. Returns {name: {train, valid, eval, metric}} (specifications as given)."""
    from ..data.pipeline import iter_conversations
    from ..eval.run import read_eval_rows
    from ..io import DataError

    out = {}
    for u in cfg.user_tasks:
        name = u["name"]
        try:
            for k in ("train", "valid"):
                if u[k] is not None and sum(1 for _ in iter_conversations(u[k], what=f"{name}.{k}")) == 0:
                    raise DataError(f"{k}: no examples (the data is empty)")
            prompts, _, _ = read_eval_rows(u["eval"], cfg.n_eval)
        except DataError as e:
            raise DataError(f"user task {name}: {e}") from None
        if len(prompts) < cfg.n_eval:
            log.info("user task %s: %d eval rows (fewer than n_eval=%d): all are scored", name, len(prompts), cfg.n_eval)
        out[name] = {k: u[k] for k in ("train", "valid", "eval", "metric")}
    return out


def prepare(cfg: ReportConfig, progress: bool) -> dict:
    """Data, base-model scores, routing profiles and every expert selection the runs need."""
    from ..embedded import resolve_model
    from ..eval.generate import evaluate_task, general_ability
    from ..io import write_json_atomic
    from ..models.loading import load_model
    from ..profiling.run import ProfileConfig, run_profile
    from ..selection.select import SelectConfig, expert_config, select_experts
    from ..tasks import write_suite
    from .plan import ABLATIONS, p_variant
    from .worker import evaluate_user_task

    work = Path(cfg.work_dir)
    model_dir = str(resolve_model(cfg.model))
    data = user_task_data(cfg)  # the user's data is read and checked before the model loads
    if cfg.tasks:
        data = {**write_suite(work / "data", cfg.n_train, cfg.n_valid, 1, seed=0, tasks=cfg.tasks), **data}
    model, tok = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    base = {t: evaluate_task(model, tok, t, cfg.n_eval, 0).score for t in cfg.tasks}
    for u in cfg.user_tasks:
        base[u["name"]] = evaluate_user_task(model, tok, u["name"], u["eval"], u["metric"], cfg.n_eval).score
    base_general, base_per_domain = general_ability(model, tok, cfg.n_general, 0)
    profiles, selections, selected = {}, {}, {"token": {}, "gate": {}}
    router_stage = {}  # task -> the router-first stage's record and how its selection differs
    variants = []  # every variant that trains selected experts, once (a front method can also be an ablation)
    for v in (MAIN + (ABLATIONS if cfg.ablations else []) + [p_variant(p) for p in cfg.p_sweep]
              + [front_variant(m) for m in cfg.methods]):
        if v.method in ("esft", "esft-lora") and v.name not in {u.name for u in variants}:
            variants.append(v)
    for t in cfg.all_tasks:
        train = data[t]["train"]
        spec = str(train) if isinstance(train, Path) else train
        prof = run_profile(ProfileConfig(data=spec, out=str(work / "profiles" / f"{t}.json"),
                                         max_tokens=cfg.profile_tokens, seq_len=cfg.seq_len, batch_size=8),
                           model=model, tokenizer=tok, progress=progress)
        profiles[t] = prof
        tuned = stage = None
        if any(v.router_stage for v in variants):  # the same rows, scored after a router-only stage (then undone)
            tuned = run_profile(ProfileConfig(data=spec, out=str(work / "profiles" / f"{t}.router_first.json"),
                                              max_tokens=cfg.profile_tokens, seq_len=cfg.seq_len, batch_size=8,
                                              router_stage_steps=cfg.router_stage_steps,
                                              router_stage_lr=cfg.router_stage_lr,
                                              router_stage_batch_size=cfg.router_stage_batch_size),
                                model=model, tokenizer=tok, progress=progress)
            rec = tuned.meta["router_stage"]
            # the expert config records the stage's settings only: its losses and seconds vary with the machine,
            # and the file's hash is part of every run's cache key
            stage = {k: rec[k] for k in ("method", "steps", "lr", "modules", "batch_size") if k in rec}
            router_stage[t] = dict(rec)
        for v in variants:
            src = tuned if v.router_stage else prof
            scores = src.token_scores if v.score_function == "token" else src.gate_scores
            scfg = SelectConfig(score_function=v.score_function, top_p=v.top_p, train_shared_experts=v.shared,
                                train_non_expert_modules=v.non_expert)
            chosen = select_experts(scores, scfg)
            if v.name in ("ESFT-Token", "ESFT-Gate"):
                selected[v.score_function][t] = chosen
            if v.router_stage:
                selected.setdefault("router_first", {})[t] = chosen
            if v.method == "esft-lora":  # a rank above an expert's smaller dimension: refused before any run
                from ..training.esft_lora import check_lora_fits

                check_lora_fits(model, {"experts": {int(l): e for l, e in chosen.items()}}, v.rank)
            for seed in range(cfg.seeds):
                sel, name = chosen, Run(t, v.name, 0, seed).slug
                if v.random:  # paper Table 4: same per-layer counts, experts drawn at random, one draw per seed
                    sel = select_experts(scores, SelectConfig(score_function=v.score_function, budget="random",
                                                              seed=1000 + seed), reference=chosen)
                    name += f"_seed{seed}"
                path = work / "selections" / t / f"{name}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, expert_config(sel, scfg, router_stage=stage if v.router_stage else None))
                selections[(t, v.name, seed)] = str(path)
    from ..adapter.fingerprint import model_fingerprint
    from .plots import overlap

    for t, rec in router_stage.items():  # how far the tuned routing moved the selection (Jaccard, mean over layers)
        rec["overlap_with_esft_token"] = overlap({"a": selected["token"].get(t, {}),
                                                  "b": selected["router_first"][t]})["b"]["a"] \
            if selected["token"].get(t) else None
        rec["experts"] = sum(len(e) for e in selected["router_first"][t].values())
    fingerprint = model_fingerprint(model)
    model_params = sum(p.numel() for p in model.parameters())
    model_type = model.config.model_type
    del model
    return {"model_dir": model_dir, "model_type": model_type, "model_fingerprint": fingerprint, "data": data, "base": base, "base_general": base_general,
            "base_per_domain": base_per_domain, "profiles": profiles, "selections": selections,
            "selected": selected, "router_stage": router_stage, "model_params": model_params}


def frontier_lrs(results: list[dict], variant: str, task: str, base_task: float, base_general: float,
                 budgets: list[float]) -> list[float]:
    """The LRs of ``variant``'s seed-0 grid on ``task`` that its frontier values at ``budgets`` use."""
    from .frontier import frontier_support, with_base

    points = {r["lr"]: (base_general - r["general"], r["task_score"])
              for r in results if r["variant"] == variant and r["task"] == task and r["seed"] == 0}
    lrs = sorted(points)
    used = frontier_support(with_base(base_task, points), budgets)
    return [lrs[i - 1] for i in sorted(used) if i > 0]  # index 0 is the base model


def run_report(cfg: ReportConfig, progress: bool = True, command: str = "esft report") -> dict:
    """Run (or resume) every run of the comparison and write the Markdown report. Returns its data."""
    from ..io import write_json_atomic
    from .render import write_report

    t0 = time.perf_counter()
    prep = prepare(cfg, progress)
    runner = Runner(cfg, prep["model_dir"], prep["data"], prep["selections"], progress, prep["model_fingerprint"])
    lr = cfg.fixed_lr()  # LR family -> LR; with the grid, each front method's id -> the LR its validation loss picks
    tasks = cfg.all_tasks  # the suite's, then the user's
    sweep, sweep_results, support = {}, [], {}
    if cfg.sweep:
        grids = {m: cfg.grid(m) for m in cfg.methods}  # method id -> its family's grid (the paper's: id = family)
        sweep_results = runner.execute(sweep_runs(tasks, grids), "LR grid (seed 0)")
        for m, grid in grids.items():
            name = front_variant(m).name
            losses = {g: {r["task"]: (r["best_valid_loss"] if r["best_valid_loss"] is not None else float("inf"))
                          for r in sweep_results if r["variant"] == name and r["lr"] == g} for g in grid}
            lr[m], rel = choose_lr(losses)
            sweep[m] = {"chosen": lr[m], "relative_loss": rel}
            for t in tasks:  # the LRs that make seed 0's frontier: they get the other seeds
                support[(m, t)] = frontier_lrs(sweep_results, name, t, prep["base"][t], prep["base_general"],
                                               cfg.budgets)
    runs = frontier_seed_runs(support, cfg.seeds)
    if cfg.extended or cfg.ablations or cfg.p_sweep or not cfg.sweep:  # the paper's layout at the validation-loss LRs, every variant, every seed
        runs += report_runs(tasks, cfg.seeds, lr, cfg.ablations, cfg.p_sweep)
    results = runner.execute(runs, "seeds at the frontier" + (" and the chosen LRs" if cfg.extended else "")
                             if cfg.sweep else "runs")
    keys = {r["key"] for r in results}
    results += [r for r in sweep_results if r["key"] not in keys]
    state = {
        "config": asdict(cfg), "command": command, "tasks": tasks, "lr": lr, "sweep": sweep, "results": results,
        "frontier_lrs": {f"{fam}/{t}": lrs for (fam, t), lrs in support.items()},
        "base": prep["base"], "base_general": prep["base_general"], "base_per_domain": prep["base_per_domain"],
        "profiles": {t: {"token_scores": p.token_scores, "gate_scores": p.gate_scores, "layers": p.layers,
                         "num_experts": p.num_experts, "top_k": p.top_k} for t, p in prep["profiles"].items()},
        "selected": prep["selected"], "router_stage": prep["router_stage"], "model_params": prep["model_params"],
        "model_type": prep["model_type"],
        "methods": [{"id": m, "variant": front_variant(m).name} for m in cfg.methods] if cfg.sweep else [],
        "seconds": time.perf_counter() - t0, "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"), "runs_trained": len(runner.trained),
        "runs_reused": len(runner.reused),
    }
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_report(state, report)
    write_json_atomic(report.with_suffix(".json"), state)
    return state
