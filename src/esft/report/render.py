"""Markdown tables and the win/tie/lose sentences, computed from the runs' result files only."""

from __future__ import annotations

import math
import statistics

from .plan import variant_by_name

MiB = 2**20


# said beside run times when a report reused runs from its ledger (resumed, or grown by new methods)
SITTINGS = ("Times come from the runs themselves, and this report reused runs of earlier sittings from its ledger: "
            "the machine's load differed between sittings, so methods run in different sittings can differ in time "
            "by more than their cost does. `make bench-methods` (`benchmarks/method_costs.py`) times every method of "
            "the front side by side.")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def gap_text(a: list[float], b: list[float]) -> str:
    """Mean of ``a`` minus mean of ``b`` (per-seed values), with the combined seed std when both have seeds."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    spread = f" ± {math.sqrt(sa ** 2 + sb ** 2):.1f}" if min(len(a), len(b)) > 1 else ""
    return f"{ma - mb:+.1f}{spread}"


def compare(a: list[float], b: list[float], min_gap: float = 1.0) -> str:
    """'win', 'tie' or 'lose' for ``a`` against ``b`` (higher is better).

    A tie unless the means differ by more than the larger of ``min_gap`` points and the
    combined seed noise sqrt(std_a^2 + std_b^2).
    """
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    gap = max(min_gap, math.sqrt(sa**2 + sb**2))
    if abs(ma - mb) <= gap:
        return "tie"
    return "win" if ma > mb else "lose"


class Results:
    """Lookup over result dicts: values of a field for (variant, task), over seeds."""

    def __init__(self, results: list[dict], lr: dict[str, float]):
        self.all = results
        self.lr = lr  # family -> chosen LR; main and ablation tables use only runs at these LRs

    def runs(self, variant: str, task: str | None = None, lr: float | None = None) -> list[dict]:
        out = []
        for r in self.all:
            if r["variant"] != variant or (task is not None and r["task"] != task):
                continue
            want = lr if lr is not None else self.lr[_family(r["variant"])]
            if not math.isclose(r["lr"], want, rel_tol=1e-9):
                continue
            out.append(r)
        return sorted(out, key=lambda r: (r["task"], r["seed"]))

    def values(self, variant: str, task: str | None, key: str) -> list[float]:
        return [r[key] for r in self.runs(variant, task) if r.get(key) is not None]

    def task_means(self, variant: str, tasks: list[str], key: str) -> list[float]:
        """Per seed, the mean over tasks (so the 'average' column has a seed spread too)."""
        by_seed: dict[int, list[float]] = {}
        for t in tasks:
            for r in self.runs(variant, t):
                by_seed.setdefault(r["seed"], []).append(r[key])
        return [statistics.fmean(v) for v in by_seed.values() if len(v) == len(tasks)]


def _family(name: str) -> str:
    try:
        return variant_by_name(name).lr_of
    except KeyError:
        return "esft"  # p-sweep variants


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def score_table(res: Results, variants: list[str], tasks: list[str], key: str,
                base: dict[str, float] | None = None, base_avg: float | None = None) -> list[str]:
    rows = []
    if base is not None:
        rows.append(["Base model"] + [f"{base[t]:.1f}" for t in tasks] + [f"{base_avg:.1f}"])
    for v in variants:
        rows.append([v] + [fmt_ms(res.values(v, t, key)) for t in tasks] + [fmt_ms(res.task_means(v, tasks, key))])
    return table(["method"] + tasks + ["average"], rows)


def efficiency_rows(res: Results, variants: list[str], total_experts: int) -> list[list[str]]:
    rows = []
    for v in variants:
        runs = res.runs(v)
        if not runs:
            continue

        def m(key, scale=1.0, digits=1, runs=runs):
            vals = [r[key] / scale for r in runs if r.get(key) is not None]
            return f"{statistics.fmean(vals):.{digits}f}" if vals else "–"

        experts = [r["experts_trained"] for r in runs if r.get("experts_trained") is not None]
        rows.append([
            v, f"{statistics.fmean(r['trainable_params'] for r in runs) / 1e6:.3f} M",
            (f"{statistics.fmean(experts):.1f} / {total_experts}" if experts else "all" if runs[0]["method"] == "full"
             else "–"),
            m("optimizer_state_bytes", MiB, 2), m("train_seconds"), m("peak_memory_bytes", MiB, 0),
            m("artifact_bytes", MiB, 2),
        ])
    return rows


def verdicts(res: Results, tasks: list[str], esft: list[str], baselines: list[str]) -> list[str]:
    """One sentence per (ESFT variant, baseline): task skill, general ability, time, storage."""
    lines = []
    for e in esft:
        for b in baselines:
            parts = []
            for key, what in (("task_score", "task skill"), ("general", "general ability")):
                outcome = {"win": [], "tie": [], "lose": []}
                for t in tasks:
                    a, bb = res.values(e, t, key), res.values(b, t, key)
                    if a and bb:
                        outcome[compare(a, bb)].append(t)
                ma, mb = mean_std(res.task_means(e, tasks, key))[0], mean_std(res.task_means(b, tasks, key))[0]
                desc = ", ".join(f"{k}s on {len(v)} ({', '.join(v)})" for k, v in outcome.items() if v)
                parts.append(f"{what}: {desc} — mean {ma:.1f} vs {mb:.1f}")
            for key, what in (("train_seconds", "training time"), ("artifact_bytes", "storage"),
                              ("optimizer_state_bytes", "optimizer state")):
                va, vb = [r[key] for r in res.runs(e)], [r[key] for r in res.runs(b)]
                if va and vb and statistics.fmean(vb) > 0:
                    ratio = statistics.fmean(va) / statistics.fmean(vb)
                    parts.append(f"{what} {ratio:.2f}× ({'less' if ratio < 1 else 'more'})")
            lines.append(f"- **{e} vs {b}** — " + "; ".join(parts) + ".")
    return lines


def write_report(state: dict, path) -> None:
    """The Markdown report and its PNG figures (beside it, named after it)."""
    from pathlib import Path

    from .plan import ABLATIONS, MAIN, SWEPT, p_variant
    from .plots import concentration_curves, overlap_matrix, routing_heatmaps, tradeoff

    path = Path(path)
    stem = path.with_suffix("")
    cfg, lr = state["config"], state["lr"]
    tasks = state.get("tasks") or cfg["tasks"]  # the suite's, then the user's (states before user tasks: suite only)
    users = {u["name"]: u for u in cfg.get("user_tasks") or []}
    # every seed trains at the validation-loss LRs only when the paper's layout was run (run.py); otherwise the
    # other seeds exist only where that LR is on a frontier, and mixing them in would average unlike things
    all_seeds = not state["sweep"] or bool(cfg.get("extended") or cfg.get("ablations") or cfg.get("p_sweep"))
    res = Results([r for r in state["results"] if all_seeds or r["seed"] == 0], lr)
    main = [v.name for v in MAIN if res.runs(v.name)]  # default mode: no ESFT-Gate
    prof = state["profiles"]
    any_prof = next(iter(prof.values()))
    E, layers = any_prof["num_experts"], any_prof["layers"]
    total_experts = E * len(layers)
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    seeds_txt = f"{cfg['seeds']} seed{'s' if cfg['seeds'] > 1 else ''}"
    tok = {t: {int(l): s for l, s in p["token_scores"].items()} for t, p in prof.items()}

    model_name = f"`{cfg['model']}`" if cfg.get("model") else "the shipped model"
    where = run_devices(state)
    L = [f"# ESFT against full fine-tuning and LoRA on {model_name}{' (quick mode)' if cfg['quick'] else ''}", "",
         f"Generated by `{state['command']}` on {state['date']} in {state['seconds'] / 60:.1f} min "
         f"({where}, {cfg['workers'] or 1} run(s) at a time"
         + (f"; {state['runs_trained']} runs trained now, {state['runs_reused']} reused from the cache"
            if state.get("runs_reused") else "") + "). Every number below is read "
         f"from the runs' result files ({path.with_suffix('.json').name} holds all of them); none is typed by hand.",
         "",
         f"**Setup.** Model: {model_name}, {_model_kind(state.get('model_type', 'deepseek_v2'))} "
         f"({len(layers)} MoE layers x {E} routed experts, top-{any_prof['top_k']}). Tasks: {', '.join(tasks)} "
         + (f"(the suite's adaptation tasks; scored on {cfg['n_eval']} held-out examples with each task's local "
            f"metric). " if not users else _user_setup(tasks, users, cfg["n_eval"]))
         + f"General ability: mean score over the {len(state['base_per_domain'])} general domains ({cfg['n_general']} examples each), "
         "which no run trains on. Every method gets the same data and budget: "
         f"{cfg['steps']} steps x {cfg['batch_size']} packed rows x {cfg['seq_len']} tokens "
         f"({tokens_per_step * cfg['steps'] / 1e3:.0f}k tokens), AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, "
         f"constant LR; validation loss every {cfg['eval_every']} steps on {cfg['n_valid']} held-out examples and "
         f"the best checkpoint by validation loss is evaluated (greedy decoding). Up to {seeds_txt} per method, task "
         "and LR" + (" (mean ± sample std" + ("; which LRs have them is said below" if state["sweep"] else "") + ")"
                     if cfg["seeds"] > 1 else "") + ". Learning rates: "
         + ", ".join(f"{SWEPT[f]} family {lr[f]:g}" + ("" if not state["sweep"] or f in state["sweep"] else " (fixed: not on the front)")
                     for f in ("esft", "full", "lora"))
         + (" (chosen by validation loss on the LR grid below) for the second view's tables." if state["sweep"]
            else " (fixed; no LR grid in this mode)."), ""]

    if state["sweep"]:
        lines, state["matched_forgetting"] = matched_section(state, tasks, stem, stem.name)
        L += lines
        L += ["## Second view: each method at the LR with the best validation loss", "",
              "The tables below are the paper's layout: one LR per method, the one whose runs reach the lowest "
              "validation loss on the task data (seed 0, grid below). Validation loss does not see forgetting, so "
              "these LRs can sit where a method forgets far more than the others; read them beside the headline."
              + ("" if all_seeds else " These tables use seed 0 only: without `--extended` the other seeds train "
                 "only at the LRs on a method's frontier, and ESFT-Gate and the ablations are not run."), ""]
    L += ["### Where ESFT wins, ties and loses", "",
          "Per task, a method *wins* when its mean beats the other's by more than max(1 point, "
          "sqrt(std_a² + std_b²)), *loses* in the opposite case, and *ties* otherwise. Time, storage and "
          "optimizer state are ratios of means (ESFT / baseline).", ""]
    L += verdicts(res, tasks, [v for v in ("ESFT-Token", "ESFT-Gate") if v in main], [v for v in ("FFT", "LoRA") if v in main])
    L += ["", "### Downstream task scores (paper Table 1)", ""]
    L += score_table(res, main, tasks, "task_score", state["base"], sum(state["base"].values()) / len(tasks))
    L += ["", "### General ability after training on each task (paper Table 2)", "",
          f"Base model: {state['base_general']:.1f}. Each column is the general ability of the model trained "
          "on that task.", ""]
    L += score_table(res, main, tasks, "general")
    domains = list(state["base_per_domain"])
    rows = [["Base model"] + [f"{state['base_per_domain'][d]:.1f}" for d in domains]]
    for v in main:
        rows.append([v] + [fmt_ms([r["general_per_domain"][d] for r in res.runs(v)]) for d in domains])
    L += ["", "Per general domain, over all tasks and seeds:", ""] + table(["method"] + domains, rows)
    points = {v: (mean_std(res.task_means(v, tasks, "task_score"))[0], mean_std(res.task_means(v, tasks, "general"))[0])
              for v in main + ([a.name for a in ABLATIONS] if cfg["ablations"] else [])}
    tradeoff(points, state["base_general"], f"{stem}_tradeoff.png")
    L += ["", f"![task skill vs general ability]({stem.name}_tradeoff.png)", ""]

    peak_kind = next((r["peak_memory_kind"] for r in state["results"] if r.get("peak_memory_kind")), "peak memory")
    threads = sorted({r["threads"] for r in state["results"] if r.get("threads")})
    threads_txt = "/".join(map(str, threads)) if threads else "?"
    workers = cfg["workers"] or 1
    L += ["## Efficiency (paper Figure 5)", "",
          f"Means over tasks and seeds. Optimizer state: AdamW's tensors; peak memory: {peak_kind} of the run's own "
          "process during training (the Python and torch runtime included, so differences matter more than "
          "totals); stored weights: what a user keeps per task (ESFT: the expert adapter; LoRA: the PEFT adapter; "
          "FFT: the whole fine-tuned checkpoint), fp32 files. Training time is wall-clock with "
          f"{threads_txt} CPU thread(s) per run and {workers} run(s) at a time ({where}), the same for every "
          "method." + (" " + SITTINGS if state.get("runs_reused") else ""), ""]
    L += table(["method", "trainable params", "experts trained", "optimizer state (MiB)", "training time (s)",
                "peak memory (MiB)", "stored weights (MiB)"], efficiency_rows(res, main, total_experts))

    if cfg["ablations"]:
        L += ["", "## Ablations", "", "### Random experts with ESFT's per-layer counts (paper Table 4)", ""]
        pairs = [("ESFT-Token", "Random (Token counts)"), ("ESFT-Gate", "Random (Gate counts)")]
        L += score_table(res, [n for p in pairs for n in p], tasks, "task_score")
        diffs = [f"{e} minus {rnd}: {mean_std(res.task_means(e, tasks, 'task_score'))[0] - mean_std(res.task_means(rnd, tasks, 'task_score'))[0]:+.1f} points"
                 for e, rnd in pairs]
        L += ["", "On average over tasks: " + "; ".join(diffs) + " (paper, on DeepSeek-V2-Lite: +2.8 Token, +4.4 Gate)."]
        L += ["", "### Also training shared experts or all non-expert modules (paper Table 3)", ""]
        v3 = ["ESFT-Token", "ESFT-Token + shared", "ESFT-Token + non-expert"]
        rows = []
        for v in v3:
            rows.append([v, fmt_ms(res.task_means(v, tasks, "task_score")), fmt_ms(res.task_means(v, tasks, "general")),
                         f"{statistics.fmean(r['trainable_params'] for r in res.runs(v)) / 1e6:.3f} M"
                         if res.runs(v) else "–"])
        L += table(["variant", "task score (avg)", "general ability (avg)", "trainable params"], rows)
        L += ["", "Per task:", ""] + score_table(res, v3, tasks, "task_score")
        L += ["", "Efficiency of the ablations:", ""]
        L += table(["method", "trainable params", "experts trained", "optimizer state (MiB)", "training time (s)",
                    "peak memory (MiB)", "stored weights (MiB)"],
                   efficiency_rows(res, [a.name for a in ABLATIONS], total_experts))

    if cfg["p_sweep"]:
        ps = sorted(set(cfg["p_sweep"]) | {0.2})
        rows = []
        for p in ps:
            name = "ESFT-Token" if p == 0.2 else p_variant(p).name
            runs = [r for r in res.runs(name) if r["seed"] == 0]
            if not runs:
                continue
            by_task = {r["task"]: r for r in runs}
            rows.append([f"{p:g}", f"{statistics.fmean(r['experts_trained'] for r in runs) / len(layers):.1f}"]
                        + [f"{by_task[t]['task_score']:.1f}" if t in by_task else "–" for t in tasks]
                        + [f"{statistics.fmean(r['task_score'] for r in runs):.1f}",
                           f"{statistics.fmean(r['general'] for r in runs):.1f}"])
        L += ["", "### ESFT-Token threshold p (seed 0)", ""]
        L += table(["p", "experts/layer (mean)"] + tasks + ["task avg", "general avg"], rows)

    if state["sweep"]:
        L += ["", "## Learning-rate grid (seed 0, validation split)", "",
              "Each method on the front is run at every LR of its grid; the second view's LR minimises the mean over tasks of "
              "best validation loss / the best loss any LR reached on that task (1.00 = best everywhere). "
              "Task and general scores are shown for transparency; they did not drive this choice (they drive the headline). ESFT-Gate and the "
              "ablations use ESFT-Token's LR.", ""]
        rows = []
        names = front_methods(state)
        for fam, info in state["sweep"].items():
            for g, rel in sorted(info["relative_loss"].items(), key=lambda kv: float(kv[0])):
                g = float(g)
                runs = res.runs(names[fam], lr=g)
                runs = [r for r in runs if r["seed"] == 0]
                by_task = {r["task"]: r for r in runs}
                rows.append([names[fam], f"{g:g}" + (" **(chosen)**" if g == info["chosen"] else ""), f"{rel:.3f}"]
                            + [f"{by_task[t]['best_valid_loss']:.3f}" if t in by_task and by_task[t]['best_valid_loss']
                               is not None else "–" for t in tasks]
                            + [f"{statistics.fmean(r['task_score'] for r in runs):.1f}" if runs else "–",
                               f"{statistics.fmean(r['general'] for r in runs):.1f}" if runs else "–"])
        L += table(["method", "lr", "relative loss"] + [f"valid loss {t}" for t in tasks] + ["task avg", "general avg"],
                   rows)
        edge = [f"{names[f]} ({info['chosen']:g})" for f, info in state["sweep"].items()
                if len(info["relative_loss"]) > 1 and info["chosen"] in (min(map(float, info["relative_loss"])), max(map(float, info["relative_loss"])))]
        if edge:
            L += ["", f"Chosen at the edge of its grid: {', '.join(edge)}; a wider sweep could move it further."]

    routing_heatmaps(tok, f"{stem}_routing.png")
    curves = concentration_curves(tok, f"{stem}_concentration.png")
    ov = overlap_matrix({t: {int(l): e for l, e in s.items()} for t, s in state["selected"]["token"].items()},
                        f"{stem}_overlap.png", "Overlap of ESFT-Token (p=0.2) selections")
    half = {t: next(i + 1 for i, c in enumerate(cu) if c >= 0.5 - 1e-9) for t, cu in curves.items()}
    off = [ov[a][b] for a in tasks for b in tasks if a != b]
    L += ["", "## Routing of the tasks", "",
          "Experts carrying half of each task's token selections (mean over layers; uniform routing would need "
          f"{E // 2}): " + ", ".join(f"{t} {h}" for t, h in half.items()) + ". "
          f"Mean overlap of the selected experts between two different tasks: "
          f"{(sum(off) / len(off)) if off else float('nan'):.2f} (Jaccard; 1 = same experts).", "",
          f"![routing heatmaps]({stem.name}_routing.png)", "",
          f"![concentration curves]({stem.name}_concentration.png)", "",
          f"![overlap of selected experts]({stem.name}_overlap.png)", "",
          "## Reproduce", "", f"    {state['command']}", "",
          ("Runs on a GPU are not bit-reproducible (CUDA's non-deterministic kernels); a rerun moves scores "
           "within the seed noise shown above." if "cuda" in where.lower() or "gpu" in where.lower() else
           "Runs are deterministic for a given machine type and thread count; another CPU can round "
           "differently, which moves scores within the seed noise shown above."), ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L))
    tmp.replace(path)


def run_devices(state: dict) -> str:
    """Where the runs trained, in words: "2 CPU cores" or "GPU NVIDIA H100 80GB HBM3, float32; 16 CPU cores".
    Results written before runs recorded their device count as CPU runs."""
    cfg = state["config"]
    gpus = sorted({r["device_name"] for r in state["results"] if str(r.get("device", "")).startswith("cuda")})
    dtype = cfg.get("dtype", "auto")
    if not gpus:
        return f"{state['cpu_count']} CPU cores" + ("" if dtype in ("auto", "float32", "fp32") else f", {dtype}")
    return f"GPU {' / '.join(gpus)}, {'bf16 (auto)' if dtype == 'auto' else dtype}; {state['cpu_count']} CPU cores"


def _spec_text(spec) -> str:
    if isinstance(spec, list):
        return ", ".join(_spec_text(x) for x in spec)
    if isinstance(spec, dict):
        return str(spec.get("path")) + (f" ({spec['format']})" if spec.get("format") else "")
    return str(spec)


def _user_setup(tasks: list[str], users: dict, n_eval: int) -> str:
    """The setup sentence's description of the tasks when some are the user's."""
    suite = [t for t in tasks if t not in users]
    text = (f"({', '.join(suite)}: the suite's adaptation tasks, scored on {n_eval} held-out examples with each task's "
            "local metric; " if suite else "(")
    text += "; ".join(f"{n}: the user's data, trained on `{_spec_text(u['train'])}`, validated on "
                      + (f"`{_spec_text(u['valid'])}`" if u.get("valid") is not None else "a held-out share of it")
                      + f", scored on at most {n_eval} rows of `{_spec_text(u['eval'])}` with {u['metric']}"
                      for n, u in users.items())
    return text + "). "


def matched_forgetting(state: dict, tasks: list[str]) -> dict:
    """Each swept method's frontier values at the budgets, per task and averaged over tasks.

    Returns {method: {"tasks": {task: {"values": {seed: [v per budget]}, "lrs": [...]}},
    "average": {seed: [mean over tasks, per budget]}}}; seeds missing a task are left out of
    the average.
    """
    from .frontier import matched

    budgets = state["config"]["budgets"]
    out = {}
    for fam, v in front_methods(state).items():
        # over the LRs of seed 0's front only: the values then do not depend on which other runs exist
        # (--extended adds seeds at the validation-loss LR), and seed 0's are those of its whole grid
        support = state.get("frontier_lrs", {})
        ran = sorted({r["seed"] for r in state["results"] if r["variant"] == v})  # a task whose seed-0 front is
        # the base point alone has no runs of the other seeds, yet their value there is the base's
        per_task = {t: matched(state["results"], v, t, state["base"][t], state["base_general"], budgets,
                               lrs=support.get(f"{fam}/{t}"), seeds=ran if f"{fam}/{t}" in support else ())
                    for t in tasks}
        if not any(m["seeds"] for m in per_task.values()):
            continue
        seeds = set.intersection(*(set(m["seeds"]) for m in per_task.values()))
        avg = {s: [statistics.fmean(per_task[t]["seeds"][s][i] for t in tasks) for i in range(len(budgets))]
               for s in sorted(seeds)}
        out[v] = {"tasks": {t: {"values": m["seeds"], "lrs": m["lrs"]} for t, m in per_task.items()},
                  "average": avg}
    return out


_LINESTYLE = {"full": "-", "esft": "-", "lora": "--", "esft-lora": "-."}  # the frontier plot's line per method kind


def _total_experts(state: dict) -> int:
    p = next(iter(state["profiles"].values()))
    return p["num_experts"] * len(p["layers"])


def front_methods(state: dict) -> dict[str, str]:
    """Front method id -> its variant's name, in the report's order (a state from before `methods`: the paper's
    three, whose ids are their LR families)."""
    from .plan import SWEPT

    if state.get("methods"):
        return {m["id"]: m["variant"] for m in state["methods"]}
    return {f: SWEPT[f] for f in ("full", "lora", "esft")}


def _runs_of(state: dict, variant: str) -> list[dict]:
    return [r for r in state["results"] if r["variant"] == variant]


def method_lines(state: dict, names: dict[str, str]) -> list[str]:
    """What each front method trains, and its LR grid (read from the state, not typed)."""
    cfg = state["config"]
    out = []
    for mid, name in names.items():
        v = variant_by_name(name)
        r = v.rank or 8
        if v.method == "full":
            d = "every weight of the model"
        elif v.method == "lora":
            d = (f"PEFT LoRA of rank {r} (alpha {2 * r}) on every attention projection and on the fused expert "
                 f"tensors (one rank-{r} pair per routed expert)")
        elif v.method == "esft-lora":
            d = (f"LoRA of rank {r} (alpha {2 * r}) on gate_up_proj and down_proj of the experts ESFT-Token selects"
                 + ("" if v.top_p == 0.2 else f" at p = {v.top_p:g}") + ", "
                 "nothing else (MoE-Sieve's setting); stored as a PEFT adapter, whose 3-D layout holds every expert's "
                 "rows (the unselected ones zero)")
        elif v.router_stage:
            d = (f"the routers first train alone for {cfg.get('router_stage_steps')} AdamW steps (lr "
                 f"{cfg.get('router_stage_lr'):g}, {cfg.get('router_stage_batch_size')} packed rows of "
                 f"{cfg['seq_len']} tokens per step) on the task's profiled rows; the experts are scored under the tuned "
                 f"routing and chosen as ESFT-Token's (p = {v.top_p:g}); the tuned routers are then discarded and the "
                 "chosen experts train under the checkpoint's own routers (Router Lens / CEFT)")
            stages = [rec for rec in (state.get("router_stage") or {}).values() if rec]
            ov = [rec["overlap_with_esft_token"] for rec in stages if rec.get("overlap_with_esft_token") is not None]
            if stages:
                d += (f". The stage took the answer-token loss from {statistics.fmean(x['loss_before'] for x in stages):.3f}"
                      f" to {statistics.fmean(x['loss_after'] for x in stages):.3f} (mean over tasks)"
                      + (f", and its selection overlaps ESFT-Token's by {statistics.fmean(ov):.2f} (Jaccard, mean over "
                         "tasks and layers; 1 = the same experts)" if ov else ""))
        elif v.shared:
            d = "ESFT-Token's experts and the shared experts"
        else:
            d = (f"the routed experts carrying the top p = {v.top_p:g} of the task's token selections in each MoE "
                 "layer (the paper's ESFT-Token), everything else frozen")
        grid = sorted(float(g) for g in (state.get("sweep", {}).get(mid) or {}).get("relative_loss", {}))
        out.append(f"- **{name}** (`{mid}`): {d}" + (f"; LR grid {', '.join(f'{g:g}' for g in grid)}" if grid else "")
                   + ".")
    return out


def _model_params(state: dict) -> int | None:
    """All parameters of the base model: recorded by the report, else what full fine-tuning trains."""
    if state.get("model_params"):
        return int(state["model_params"])
    full = [r["trainable_params"] for r in state["results"] if r.get("method") == "full" and r.get("trainable_params")]
    return int(full[0]) if full else None


def cost_rows(state: dict, mf: dict) -> list[list[str]]:
    """Per front method: its trainable share and costs (means over all its runs: they do not depend on the LR)
    beside its task score at each budget."""
    total = _model_params(state)
    budgets = state["config"]["budgets"]
    rows = []
    for v, m in mf.items():
        runs = _runs_of(state, v)

        def mean(key, scale=1.0, digits=2, runs=runs):
            vals = [r[key] / scale for r in runs if r.get(key) is not None]
            return f"{statistics.fmean(vals):.{digits}f}" if vals else "–"

        trainable = statistics.fmean(r["trainable_params"] for r in runs)
        experts = [r["experts_trained"] for r in runs if r.get("experts_trained") is not None]
        steps = [r["train_seconds"] / r["steps"] for r in runs if r.get("train_seconds") and r.get("steps")]
        rows.append([v, f"{trainable / 1e6:.3f} M", f"{100 * trainable / total:.2f}" if total else "–",
                     f"{statistics.fmean(experts):.1f}" if experts else ("all" if runs[0]["method"] == "full" else "–"),
                     mean("optimizer_state_bytes", MiB), f"{statistics.fmean(steps):.2f}" if steps else "–",
                     mean("artifact_bytes", MiB)]
                    + [f"{mean_std(_col(m['average'], i))[0]:.1f}" for i in range(len(budgets))])
    return rows


def pick_lines(state: dict, mf: dict) -> list[str]:
    """Which method to pick at each forgetting budget, from the headline's numbers: the highest score; the
    methods within seed noise of it (the win/tie/lose rule); of those, the one that trains the fewest
    parameters; and, where full fine-tuning is picked, the same choice among the methods that store a small
    adapter."""
    budgets = state["config"]["budgets"]
    size = {v: statistics.fmean(r["trainable_params"] for r in _runs_of(state, v)) for v in mf}
    total = _model_params(state)
    share = lambda v: f"{100 * size[v] / total:.2f}% of the parameters" if total else f"{size[v] / 1e6:.3f} M parameters"  # noqa: E731
    full = {v for v in mf if _runs_of(state, v)[0]["method"] == "full"}
    lines = []
    for i, b in enumerate(budgets):
        vals = {v: _col(m["average"], i) for v, m in mf.items()}
        means = {v: mean_std(x)[0] for v, x in vals.items()}

        def choose(candidates: list[str]) -> tuple[list[str], list[str], str]:
            """(candidates by score, best first; those within seed noise of the best; the smallest of those)"""
            order = sorted(candidates, key=lambda v: (-means[v], size[v]))
            tied = [v for v in order if v == order[0] or compare(vals[v], vals[order[0]]) == "tie"]
            return order, tied, min(tied, key=lambda v: (size[v], -means[v]))

        order, tied, pick = choose(list(mf))
        best = order[0]
        text = f"- **Forgetting ≤ {b:g}:** {best} scores highest ({means[best]:.1f})"
        if len(tied) > 1:
            text += "; within seed noise of it: " + ", ".join(f"{v} ({means[v]:.1f})" for v in tied[1:])
        elif len(order) > 1:
            text += f", {means[best] - means[order[1]]:.1f} points above the next, {order[1]} (more than the seed noise)"
        text += f". Pick **{pick}** ({share(pick)} trained)"
        small = [v for v in mf if v not in full]
        if pick in full and small:
            s_order, s_tied, s_pick = choose(small)
            text += (f"; if a small adapter per task is needed, **{s_pick}** ({means[s_pick]:.1f}, "
                     f"{means[s_pick] - means[best]:+.1f} points; {share(s_pick)})")
            if s_pick != s_order[0]:
                text += f", within seed noise of the best of them, {s_order[0]} ({means[s_order[0]]:.1f})"
        lines.append(text + ".")
    return lines


MODEL_KINDS = {"deepseek_v2": "a DeepSeek-V2-style MoE (softmax router)",
               "deepseek_v3": "a DeepSeek-V3-style MoE (sigmoid router, routing bias for the top-k choice)"}


def _model_kind(model_type: str) -> str:
    """How the Setup paragraph names the model's architecture (reports written before model_type was kept: V2)."""
    return MODEL_KINDS.get(model_type, f"an MoE of transformers type `{model_type}`")


def _col(values_by_seed: dict, i: int) -> list[float]:
    return [v[i] for v in values_by_seed.values()]


def matched_section(state: dict, tasks: list[str], stem, name: str) -> tuple[list[str], dict]:
    """The headline: task score at matched forgetting (tables + the frontier figure)."""
    import numpy as np

    from .frontier import frontier_value, with_base
    from .plots import frontiers

    budgets = state["config"]["budgets"]
    mf = matched_forgetting(state, tasks)
    if not mf:
        return [], mf
    bh = [f"forgetting ≤ {b:g}" for b in budgets]
    seeds = state["config"]["seeds"]
    more = (f"the runs its frontier values are made of are repeated with {seeds - 1} more seed(s)" if seeds > 1
            else "one seed")
    L = ["## Task skill at matched forgetting (the headline)", "",
         f"Each method is trained at every learning rate of its grid (seed 0); {more}. *Forgetting* is the base "
         f"model's general ability ({state['base_general']:.1f}) minus the trained model's, in points. Each run is "
         "a point (forgetting, task score), the base model is the point (0, its task score), and a method's value "
         "at a budget is the height there of the Pareto front of its points joined by straight lines: the best "
         "score among runs forgetting at most the budget, raised linearly towards the next front point (an LR "
         "in between). It is computed per seed over the LRs on seed 0's front (the other seeds ran at least these)"
         + (", then averaged (mean ± sample std over seeds); the average column averages the tasks per seed. Seed 0 "
            "chose which LRs to repeat, so its values are biased upwards (its own noise helped pick them); the "
            "values of the other seeds alone, which are not, are given below the table." if seeds > 1 else
            "; the average column averages the tasks. One seed: no spread is shown, and a difference of a few "
            "points can be seed noise.") , "", "The methods on the front (each at every LR of its own grid, seed 0):", ""]
    L += method_lines(state, {mid: v for mid, v in front_methods(state).items() if v in mf}) + [""]
    rows = [["Base model (no training)"] + [f"{statistics.fmean(state['base'][t] for t in tasks):.1f}"] * len(budgets)]
    for v, m in mf.items():
        rows.append([v] + [fmt_ms(_col(m["average"], i)) for i in range(len(budgets))])
    L += table(["method (task score, mean over tasks)"] + bh, rows)
    order = list(mf)
    if "ESFT-Token" in mf:
        gaps = []
        for other in [o for o in order if o != "ESFT-Token"]:
            parts = []
            for i, b in enumerate(budgets):
                parts.append(f"{gap_text(_col(mf['ESFT-Token']['average'], i), _col(mf[other]['average'], i))} at ≤ {b:g}")
            gaps.append(f"ESFT-Token minus {other}: " + ", ".join(parts))
        L += ["", "Gaps in task points" + (" (± combined seed std)" if seeds > 1 else "") + ": "
              + "; ".join(gaps) + "."]
    if seeds > 1:  # the seeds that did not choose the LRs: an unbiased check of the table
        later = []
        for v, m in mf.items():
            rest = {s: vals for s, vals in m["average"].items() if int(s) != 0}
            if rest:
                later.append(f"{v} " + " / ".join(f"{statistics.fmean(_col(rest, i)):.1f}" for i in range(len(budgets))))
        if later:
            L += ["", "Without seed 0 (mean of the other seeds, at ≤ " + " / ".join(f"{b:g}" for b in budgets)
                  + "): " + "; ".join(later) + "."]
    L += ["", "### Which method at which forgetting budget", "",
          "From the table above: the highest mean score at each budget, the methods within seed noise of it "
          "(means apart by at most max(1 point, the combined seed std)), and of those the one that trains the "
          "fewest parameters.", ""]
    L += pick_lines(state, mf)
    L += ["", "### Trainable share and cost beside the score", "",
          "Means over every run of the method (all LRs and seeds; they do not depend on the LR): trainable "
          "parameters and their share of the model's, experts trained (of "
          + str(_total_experts(state)) + "), AdamW state, wall-clock training seconds per step (validation "
          "included, the same threads for every method), the weights a user keeps per task "
          "(fp32 files), then the task score at each budget (the headline's)."
          + (" " + SITTINGS if state.get("runs_reused") else ""), ""]
    L += table(["method", "trainable", "share of the model %", "experts trained", "optimizer state (MiB)",
                "training s/step", "stored weights (MiB)"] + [f"score, ≤ {b:g}" for b in budgets], cost_rows(state, mf))
    L += ["", "Per task:", ""]
    rows = []
    for i, b in enumerate(budgets):
        for v, m in mf.items():
            rows.append([f"{v}, ≤ {b:g}"] + [fmt_ms(_col(m["tasks"][t]["values"], i)) for t in tasks])
    L += table(["method, forgetting budget"] + tasks, rows)
    lr_rows = [[v] + [", ".join(f"{x:g}" for x in m["tasks"][t]["lrs"]) for t in tasks] for v, m in mf.items()]
    L += ["", "LRs the values are computed over (those on seed 0's front around a budget; the other seeds ran "
          "exactly these):", ""]
    L += table(["method"] + tasks, lr_rows)

    panels = {}
    for t in tasks:
        runs_t = [r for r in state["results"] if r["task"] == t and r["variant"] in mf]
        top = max([state["base_general"] - r["general"] for r in runs_t if math.isfinite(r["general"])] + budgets) + 1
        grid = np.linspace(0, top, 240)
        methods = {}
        for v, m in mf.items():
            lrs = m["tasks"][t]["lrs"]
            runs_v = [r for r in runs_t if r["variant"] == v]
            curves = []
            for s in m["tasks"][t]["values"]:
                pts = {r["lr"]: (state["base_general"] - r["general"], r["task_score"])
                       for r in runs_v if r["seed"] == s and r["lr"] in lrs}
                curves.append([frontier_value(with_base(state["base"][t], pts), b) for b in grid])
            if not curves:  # no seed ran every LR of this task (a partial state): nothing to draw
                continue
            arr = np.asarray(curves)
            methods[v] = {"budget": grid, "mean": arr.mean(0), "ls": _LINESTYLE.get(runs_v[0]["method"], "-"),
                          "std": arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(len(grid)),
                          "runs": [(state["base_general"] - r["general"], r["task_score"], r["lr"], r["seed"])
                                   for r in runs_v]}
        panels[t] = {"base": state["base"][t], "methods": methods}
    frontiers(panels, budgets, f"{stem}_frontier.png")
    L += ["", f"![frontiers: best task score within a forgetting budget]({name}_frontier.png)", ""]
    return L, mf
