#!/usr/bin/env python
"""What each method of `esft report`'s front costs, measured side by side in one process.

The report's cost table reads step times from its runs, which a report resumed from its ledger made in
several sittings under different machine load. This benchmark times the same methods together: the same
model, task data, selections and settings as the report's runs (built by the report's own job builder), each
method trained for ``--steps`` steps without validation, methods taken in turn for ``--rounds`` rounds (so
machine noise hits all alike), on ``--threads`` threads. Per method: trainable parameters and their share of
the model, AdamW state, the median optimizer step (forward to AdamW step, over all rounds) and its ratio to
ESFT-Token's, and the bytes of the saved adapter or checkpoint. The router-first stage is timed once, apart
(it runs at selection, not per step).

    .venv/bin/python benchmarks/method_costs.py                 # the extended front, small model, ~5 min on 2 cores
    .venv/bin/python benchmarks/method_costs.py --model small-lfb --methods esft esft-lora-r8 lora

The LAST line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args(argv=None):
    from esft.report.plan import EXTENDED_METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="small", help="shipped model name or checkpoint directory")
    p.add_argument("--task", default="translate_synth", help="suite task whose data and selections are used")
    p.add_argument("--methods", nargs="+", default=list(EXTENDED_METHODS),
                   help="front method ids, as in `esft report methods=[...]`")
    p.add_argument("--steps", type=int, default=20, help="training steps per method and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all methods (methods in turn)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the report's runs use 1 each)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (does not affect timing)")
    a = p.parse_args(argv)
    if min(a.steps, a.rounds, a.threads) < 1:
        p.error("--steps, --rounds and --threads must be >= 1")
    return a


def main(argv=None) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from esft.report.config import ReportConfig
    from esft.report.plan import Run, front_variant
    from esft.report.run import Runner, prepare
    from esft.report.worker import weight_bytes  # the report's "stored weights": the .safetensors a user keeps
    from esft.training.config import TrainConfig
    from esft.training.recipe import train

    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # a weights bar per run would bury the figures
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="esft-costs-") as tmp:
        cfg = ReportConfig(model=args.model, tasks=[args.task], methods=args.methods, work_dir=tmp,
                           report=str(Path(tmp) / "report.md"), n_eval=10, n_general=5, workers=0)
        t0 = time.perf_counter()
        prep = prepare(cfg, progress=False)
        console.print(f"[dim]prepared in {time.perf_counter() - t0:.0f} s (profile, selections"
                      f"{', router stage' if prep['router_stage'] else ''})[/dim]")
        runner = Runner(cfg, prep["model_dir"], prep["data"], prep["selections"], False, prep["model_fingerprint"])
        names = {m: front_variant(m).name for m in args.methods}
        steps = {m: [] for m in args.methods}
        facts = {}
        for rnd in range(args.rounds):
            for m in args.methods:
                job = runner.job(Run(args.task, names[m], args.lr, 0))
                kw = {**job["train"], "steps": args.steps, "eval_every": 0, "valid_data": None,
                      "output_dir": str(Path(tmp) / "runs" / f"{m}-{rnd}")}
                res = train(TrainConfig(**kw), progress=False)
                steps[m].append(res.step_seconds)
                facts[m] = {"trainable_params": res.trainable_params, "optimizer_state_bytes": res.optimizer_state_bytes,
                            "stored_bytes": weight_bytes(Path(res.best_dir))}
                console.print(f"[dim]round {rnd + 1}/{args.rounds} {names[m]}: {res.step_seconds * 1e3:.0f} ms/step[/dim]")
    total = prep["model_params"]
    ref = statistics.median(steps["esft"]) if "esft" in steps else None
    rows = {}
    tab = Table(title=f"{args.model}, {args.task}: {args.steps} steps x {args.rounds} rounds per method, "
                      f"{args.threads} thread(s), batch {cfg.batch_size} x {cfg.seq_len} tokens", title_justify="left")
    for col in ("method", "trainable", "share %", "AdamW state", "median step", "vs ESFT-Token", "stored"):
        tab.add_column(col, justify="left" if col == "method" else "right")
    for m in args.methods:
        med = statistics.median(steps[m])
        f = facts[m]
        rows[m] = {**f, "name": names[m], "share": f["trainable_params"] / total, "step_seconds": med,
                   "step_seconds_all": steps[m], "step_vs_esft": med / ref if ref else None}
        tab.add_row(names[m], f"{f['trainable_params'] / 1e6:.3f} M", f"{100 * rows[m]['share']:.2f}",
                    f"{f['optimizer_state_bytes'] / 2**20:.2f} MiB", f"{med * 1e3:.0f} ms",
                    f"{rows[m]['step_vs_esft']:.2f}x" if ref else "–", f"{f['stored_bytes'] / 2**20:.2f} MiB")
    Console(width=150).print(tab)
    for t, rec in prep["router_stage"].items():
        print(f"router-first stage on {t}: {rec.get('seconds', float('nan')):.1f} s "
              f"({rec.get('steps')} steps), once per task at selection")
    print(json.dumps({"model": args.model, "task": args.task, "threads": args.threads, "steps": args.steps,
                      "rounds": args.rounds, "model_params": total, "methods": rows,
                      "router_stage": prep["router_stage"], "cpu_count": os.cpu_count()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
