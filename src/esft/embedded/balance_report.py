"""Auxiliary loss vs Loss-Free Balancing on the shipped model's shape: validation loss and MaxVio, side by side.

    python -m esft.embedded.balance_report --out docs/balance.md

Every model is measured the same way, here, from its saved checkpoint (bf16 weights, fp32 routing bias,
run in fp32): the validation loss and MaxVio on the same held-out general-domain examples (the tasks'
valid splits, packed as in pretraining). MaxVio (esft.training.balance) per layer, then the mean over the
MoE layers: "global" over the whole validation set, "batch" the mean over validation batches of
``--batch-size`` packed rows (pretraining's batch). The training-time batch MaxVio (mean over all steps)
comes from each run's pretrain_log.json where the run logged it. Where the two specialization reports
exist (``--specialization``), their concentration and overlap are set side by side.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

DEFAULT_MODELS = ["aux, softmax (shipped small)=small", "aux, sigmoid=runs/lfb/model_aux_sigmoid",
                  "loss-free, sigmoid (small-lfb)=small-lfb"]
DEFAULT_SPECIALIZATION = ["small=docs/specialization.json", "small-lfb=docs/specialization_lfb.json"]
DEFAULT_REPORTS = ["aux, softmax (shipped small)=docs/report.json", "aux, sigmoid=docs/report_aux_sigmoid.json",
                   "loss-free, sigmoid (small-lfb)=docs/report_small-lfb.json"]
FRONT = ["FFT", "LoRA", "ESFT-Token"]  # the default report's methods, on every model's front


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for it in items:
        name, sep, path = it.rpartition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{what} takes NAME=PATH, got {it!r}")
        out.append((name, path))
    return out


def measure(name: str, path: str, valid_per_task: int, batch_size: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import resolve_model
    from .pretrain import valid_rows, validate

    d = resolve_model(path)
    log = json.loads((d / "pretrain_log.json").read_text()) if (d / "pretrain_log.json").exists() else {}
    args = log.get("args", {})
    tok = AutoTokenizer.from_pretrained(str(d))
    seed = args.get("seed", seed)  # each run on its own held-out set (its seed's tokenizer differs too)
    rows = valid_rows(tok, valid_per_task, seed, args.get("seq_len", 256))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    t0 = time.perf_counter()
    v = validate(model, rows, batch_size, "cpu")
    steps = args.get("steps")
    return {"name": name, "path": str(d), "model_type": model.config.model_type, "seed": seed,
            "balance": args.get("balance", "aux"), "gate": args.get("gate", "softmax"),
            "aux_coef": args.get("aux_coef"), "bias_rate": args.get("bias_rate"), "steps": steps,
            "train_seconds": log.get("train_seconds"), "threads": log.get("threads"),
            "seconds_per_step": round(log["train_seconds"] / steps, 3) if log.get("train_seconds") and steps else None,
            "train_maxvio_batch_mean": log.get("maxvio_batch_mean"),
            "train_maxvio_batch_second_half": _late_maxvio(log.get("log", []), steps),
            "final_train_loss": (log.get("log") or [{}])[-1].get("loss"),
            "curve": [(r["step"], r.get("loss"), r.get("maxvio_batch")) for r in log.get("log", [])],
            "valid": v, "measure_seconds": round(time.perf_counter() - t0, 1)}


def _late_maxvio(log: list[dict], steps: int | None) -> float | None:
    """Mean batch MaxVio over the logged steps of the second half of training (after the start-up phase)."""
    vals = [r["maxvio_batch"] for r in log if steps and r["step"] >= steps // 2 and r.get("maxvio_batch") is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def seed_pairs(results: list[dict]) -> list[tuple[int, dict, dict]]:
    """(seed, aux run, loss-free run) for every seed with both, on the sigmoid router (the like-for-like pair)."""
    by = {(r["seed"], r["balance"]): r for r in results if r["gate"] == "sigmoid"}
    return [(s, by[(s, "aux")], by[(s, "loss-free")]) for s in sorted({s for s, _ in by})
            if (s, "aux") in by and (s, "loss-free") in by]


def specialization_rows(pairs: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]] | None:
    reps = [(n, json.loads(Path(p).read_text())) for n, p in pairs if Path(p).exists()]
    if len(reps) < 2:
        return None
    tasks = list(reps[0][1]["tasks"])
    rows = []
    for t in tasks:
        row = [t, reps[0][1]["tasks"][t]["kind"]]
        for _, r in reps:
            h = r["tasks"].get(t, {}).get("experts_for_half_mass", {})
            row.append(f"{sum(h.values()) / len(h):.1f}" if h else "-")
        rows.append(row)
    overlap = ["mean overlap between tasks (Jaccard)", ""]
    for _, r in reps:
        vals = [v for k, v in r["overlap"].items() if k.split("|")[0] != k.split("|")[1]]
        overlap.append(f"{sum(vals) / len(vals):.2f}")
    rows.append(overlap)
    uniform = ["*uniform routing*", ""] + [str(r["uniform_half_mass"]) for _, r in reps]
    rows.append(uniform)
    return [n for n, _ in reps], rows


def esft_rows(pairs: list[tuple[str, str]]) -> dict | None:
    """ESFT-Token, FFT and LoRA at matched forgetting on each model, from each model's `esft report` JSON.

    Returns {"budgets", "models": [name, ...], "reports": [path, ...], "table": rows of (model, method, seeds,
    value per budget), "gaps": rows of (model, ESFT-Token minus FFT per budget, minus LoRA per budget): all
    seeds (mean +- combined sample std) and seed 0 alone, which every report has, so a one-seed report compares
    like for like; "per_task": the same gaps per task beside the base score; "bars": (mean, std) per model,
    method and budget for the plot}. None when no report exists.
    """
    from esft.report.render import _col, fmt_ms, gap_text, mean_std

    reps = [(n, p, json.loads(Path(p).read_text())) for n, p in pairs if Path(p).exists()]
    reps = [(n, p, r) for n, p, r in reps if all(m in r.get("matched_forgetting", {}) for m in FRONT)]
    if not reps:
        return None
    budgets = reps[0][2]["config"]["budgets"]
    table, gaps, per_task, bars = [], [], [], {}
    for name, path, r in reps:
        mf = r["matched_forgetting"]
        if r["config"]["budgets"] != budgets:
            raise SystemExit(f"{path}: forgetting budgets {r['config']['budgets']} differ from {budgets}")
        base = sum(r["base"].values()) / len(r["base"])
        table.append([name, "Base model (no training)", "", f"{r['base_general']:.1f}"] + [f"{base:.1f}"] * len(budgets))
        bars[name] = {m: [mean_std(_col(mf[m]["average"], i)) for i in range(len(budgets))] for m in FRONT}
        bars[name]["Base model (no training)"] = [(base, 0.0)] * len(budgets)
        for m in FRONT:
            avg = mf[m]["average"]
            table.append([name, m, str(len(avg)), ""] + [fmt_ms(_col(avg, i)) for i in range(len(budgets))])
        row = [name]
        for other in ("FFT", "LoRA"):
            for i in range(len(budgets)):
                s0 = mf["ESFT-Token"]["average"]["0"][i] - mf[other]["average"]["0"][i]
                row.append(f"{gap_text(_col(mf['ESFT-Token']['average'], i), _col(mf[other]['average'], i))} "
                           f"(seed 0: {s0:+.1f})")
        gaps.append(row)
        for t, base_t in r["base"].items():  # where the gaps come from: a task the base already solves has none
            row = [name, t, f"{base_t:.1f}"]
            for other in ("FFT", "LoRA"):
                for i in range(len(budgets)):
                    e, o = _col(mf["ESFT-Token"]["tasks"][t]["values"], i), _col(mf[other]["tasks"][t]["values"], i)
                    row.append(f"{mean_std(e)[0] - mean_std(o)[0]:+.1f}")
            per_task.append(row)
    return {"budgets": budgets, "models": [n for n, _, _ in reps], "reports": [p for _, p, _ in reps],
            "table": table, "gaps": gaps, "per_task": per_task, "bars": bars}


def plot_esft(esft: dict, path: Path) -> None:
    """One panel per model: each method's task score at each forgetting budget (bars, +- seed std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, budgets = esft["models"], esft["budgets"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), sharey=True, squeeze=False)
    methods = ["Base model (no training)"] + FRONT
    width = 0.8 / len(methods)
    for ax, name in zip(axes[0], models):
        for j, m in enumerate(methods):
            means, stds = zip(*esft["bars"][name][m])
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(budgets))]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=m, color=f"C{j}")
        ax.set_xticks(range(len(budgets)), [f"≤ {b:g}" for b in budgets])
        ax.set(title=name, xlabel="forgetting budget (general points)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("task score at matched forgetting (mean over tasks)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(results):  # one colour per model in both panels
        pts = [(s, m) for s, _, m in r["curve"] if m is not None]
        if pts:
            ax1.plot(*zip(*pts), label=r["name"], color=f"C{i}")
        pts = [(s, l) for s, l, _ in r["curve"] if l is not None]
        if pts:
            ax2.plot(*zip(*pts), label=r["name"], color=f"C{i}")
    ax1.set(xlabel="step", ylabel="batch MaxVio (mean over MoE layers)", title="load imbalance while pretraining")
    ax2.set(xlabel="step", ylabel="training loss", title="training loss", ylim=(0.5, 3))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/balance.md", help="Markdown report (JSON and PNG written beside it)")
    ap.add_argument("--model", action="append", default=None, metavar="NAME=DIR",
                    help=f"a pretrained checkpoint to compare (repeatable; default: {'; '.join(DEFAULT_MODELS)})")
    ap.add_argument("--specialization", action="append", default=None, metavar="NAME=JSON",
                    help="specialization reports to set side by side (default: "
                         f"{'; '.join(DEFAULT_SPECIALIZATION)}; missing ones are left out)")
    ap.add_argument("--report", action="append", default=None, metavar="NAME=JSON",
                    help="`esft report` results (report.json) of the models, set side by side at matched forgetting "
                         f"(default: {'; '.join(DEFAULT_REPORTS)}; missing ones are left out)")
    ap.add_argument("--valid-per-task", type=int, default=200, help="held-out examples per general domain")
    ap.add_argument("--batch-size", type=int, default=16, help="packed rows per validation batch (batch MaxVio)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation examples")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    results = [measure(n, p, a.valid_per_task, a.batch_size, a.seed)
               for n, p in _pairs(a.model or DEFAULT_MODELS, "--model")]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(out.stem + "_maxvio.png")
    plot(results, png)
    spec = specialization_rows(_pairs(a.specialization or DEFAULT_SPECIALIZATION, "--specialization"))
    esft = esft_rows(_pairs(a.report or DEFAULT_REPORTS, "--report"))

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"# Auxiliary loss vs Loss-Free Balancing on the small model's shape", "",
             f"Generated by `python -m esft.embedded.balance_report {shlex.join(sys.argv[1:] if argv is None else argv)}` "
             f"({date.today()}, "
             f"{time.time() - t0:.0f} s). Same data, tokenizer, size and schedule for every model (2,400 steps of "
             "16 x 256 tokens); measured here from each saved checkpoint on the same "
             f"{results[0]['valid']['tokens']} held-out tokens ({a.valid_per_task} validation examples per general "
             "domain). MaxVio = max expert load / mean load - 1 per MoE layer (0 = balanced), then the mean over "
             "layers; *global* over the whole validation set, *batch* the mean over batches of "
             f"{a.batch_size} packed rows.", "",
             "| model | router | balancing | valid loss | global MaxVio | batch MaxVio (valid) | "
             "batch MaxVio (training: all steps / second half) | s/step (threads) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        bal = (f"aux loss x {r['aux_coef']}" if r["balance"] == "aux" else f"loss-free, u = {r['bias_rate']}")
        lines.append(f"| {r['name']} | {r['model_type']} ({r['gate']}) | {bal} | {r['valid']['loss']:.4f} | "
                     f"{f(r['valid']['maxvio_global']['mean'], '.3f')} | {f(r['valid']['maxvio_batch_mean'], '.3f')} | "
                     f"{f(r['train_maxvio_batch_mean'], '.3f')} / {f(r['train_maxvio_batch_second_half'], '.3f')} | "
                     f"{f(r['seconds_per_step'], '.2f')} ({r['threads']}) |")
    lines += ["", "Global MaxVio per MoE layer:", "",
              "| model | " + " | ".join(f"layer {l}" for l in results[0]["valid"]["maxvio_global"]["per_layer"]) + " |",
              "|---|" + "---|" * len(results[0]["valid"]["maxvio_global"]["per_layer"])]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f(v, ".3f") for v in r["valid"]["maxvio_global"]["per_layer"].values())
                     + " |")
    pairs = seed_pairs(results)
    if pairs:
        lines += ["", "Like for like, per seed (the same DeepSeek-V3 router; a seed changes the data sample, the "
                  "tokenizer and the initialisation, so losses compare only within a seed): loss-free minus aux.", "",
                  "| seed | valid loss | global MaxVio | batch MaxVio (training, second half) |", "|---|---|---|---|"]
        for seed, aux, lf in pairs:
            d = lambda k: lf[k] - aux[k] if lf[k] is not None and aux[k] is not None else None  # noqa: E731
            lines.append(f"| {seed} | {f(lf['valid']['loss'] - aux['valid']['loss'], '+.4f')} | "
                         f"{f(lf['valid']['maxvio_global']['mean'] - aux['valid']['maxvio_global']['mean'], '+.3f')} | "
                         f"{f(d('train_maxvio_batch_second_half'), '+.3f')} |")
    lines += ["", f"![MaxVio and loss while pretraining]({png.name})", ""]
    if spec:
        names, rows = spec
        lines += ["## Specialization: experts holding half of each task's routed tokens (mean over MoE layers)", "",
                  "From the specialization reports (`python -m esft.embedded.specialization --model ...`). Fewer "
                  "experts = a more concentrated task, which is what ESFT needs.", "",
                  "| task | kind | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    if esft:
        bh = [f"≤ {b:g}" for b in esft["budgets"]]
        links = ", ".join(f"[{n}]({Path(p).with_suffix('.md').name})" for n, p in zip(esft["models"], esft["reports"]))
        lines += ["## What balancing does to ESFT: task skill at matched forgetting", "",
                  f"From each model's `esft report` ({links}): the same tasks, data, budget of 100 steps, LR grids "
                  "and scoring on every model; a method's value at a forgetting budget is the height of its Pareto "
                  "front there (task score, mean over the 4 tasks; mean ± sample std over the seeds at its front). "
                  "Forgetting is measured from each model's own base general ability.", "",
                  "| model | method | seeds | base general | " + " | ".join(f"task score, forgetting {b}" for b in bh)
                  + " |", "|---|---|---|---|" + "---|" * len(bh)]
        lines += ["| " + " | ".join(r) + " |" for r in esft["table"]]
        lines += ["", "ESFT-Token minus FFT and minus LoRA, in task points (all seeds ± combined seed std; in brackets "
                  "seed 0 alone, which every report has):", "",
                  "| model | " + " | ".join(f"minus FFT, {b}" for b in bh) + " | " + " | ".join(f"minus LoRA, {b}" for b in bh)
                  + " |", "|---|" + "---|" * (2 * len(bh))]
        lines += ["| " + " | ".join(r) + " |" for r in esft["gaps"]]
        lines += ["", "The same gaps per task (mean over seeds), beside the base model's score on the task:", "",
                  "| model | task | base score | " + " | ".join(f"minus FFT, {b}" for b in bh) + " | "
                  + " | ".join(f"minus LoRA, {b}" for b in bh) + " |", "|---|---|---|" + "---|" * (2 * len(bh))]
        lines += ["| " + " | ".join(r) + " |" for r in esft["per_task"]]
        esft_png = out.with_name(out.stem + "_esft.png")
        plot_esft(esft, esft_png)
        lines += ["", f"![task score at matched forgetting on each model]({esft_png.name})", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"results": results, "seed_pairs": [(s, a["name"], l["name"]) for s, a, l in pairs], "specialization": spec, "esft": esft}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
