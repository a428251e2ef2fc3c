"""What `esft report` runs: tasks, seeds, budget, learning-rate sweep, p sweep."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


def _f(default, help_: str, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help_})
    return field(default=default, metadata={"help": help_})


DEFAULT_REPORT, DEFAULT_WORK_DIR = "docs/report.md", "runs/report"
ADAPTATION_TASKS = ["intent_json", "translate_synth", "word_problems", "verdict_json"]


@dataclass
class ReportConfig:
    report: str = _f(DEFAULT_REPORT, "Markdown report to write (PNG plots, results JSON and the ledger of finished "
                                     "runs, <report>.runs.json, go beside it; commit the ledger and a fresh clone "
                                     "resumes); with another model: docs/report_<model name>.md")
    work_dir: str = _f(DEFAULT_WORK_DIR, "run directories and the result cache (a rerun reuses finished runs); "
                                         "with another model: runs/report_<model name>")
    model: str | None = _f(None, "base checkpoint directory, or a shipped model: small (default), v2lite")
    tasks: list[str] = _f(None, "adaptation tasks to compare on", lambda: list(ADAPTATION_TASKS))
    seeds: int = _f(3, "training seeds per method and task (mean +- std over them)")
    steps: int = _f(100, "optimizer steps per run (the same budget for every method)")
    batch_size: int = _f(8, "packed rows per step")
    seq_len: int = _f(256, "packed row length in tokens")
    eval_every: int = _f(25, "steps between validation losses; the best checkpoint by validation loss is evaluated")
    n_train: int = _f(2000, "training examples per task")
    n_valid: int = _f(100, "validation examples per task (LR sweep and best-checkpoint choice)")
    n_eval: int = _f(200, "task eval examples (scored with the task's metric)")
    n_general: int = _f(50, "eval examples per general domain (general ability)")
    profile_tokens: int = _f(32768, "profiling token budget per task")
    lr_esft: float = _f(1e-2, "ESFT learning rate when the LR grid is off (--quick; all ESFT variants and ablations). By validation loss the old 3-LR sweep picked 1e-2, the 5-LR grid picks 5e-3")
    lr_full: float = _f(1e-3, "full fine-tuning learning rate when the LR grid is off (by validation loss both grids pick 1e-3)")
    lr_lora: float = _f(3e-3, "LoRA learning rate when the LR grid is off (by validation loss both grids pick 3e-3)")
    sweep: bool = _f(True, "train ESFT-Token, FFT and LoRA at every LR of their grids (seed 0), then more seeds at the "
                           "LRs on each method's frontier; the headline is task skill at matched forgetting, and the "
                           "LR with the best validation loss gives the second view")
    sweep_esft: list[float] = _f(None, "ESFT learning rates (the grid of the frontier and of the LR choice)",
                                 lambda: [1e-3, 2e-3, 3e-3, 5e-3, 1e-2])
    sweep_full: list[float] = _f(None, "full fine-tuning learning rates", lambda: [1e-4, 2e-4, 3e-4, 5e-4, 1e-3])
    sweep_lora: list[float] = _f(None, "LoRA learning rates", lambda: [3e-4, 1e-3, 2e-3, 3e-3, 6e-3])
    budgets: list[float] = _f(None, "forgetting budgets in general-ability points: the headline table gives each "
                                    "method's task score at this much forgetting (its Pareto front's height)",
                              lambda: [1.0, 2.0, 5.0])
    extended: bool = _f(False, "also run the ablations (random experts, + shared, + non-expert) and the p sweep "
                               "(88 more runs with 3 seeds: 65 minutes on a 2-core VM after the default report)")
    p_sweep: list[float] = _f(None, "extra ESFT-Token p values (seed 0 only; [] = skip; --extended: 0.05 0.1 0.3 0.5)",
                              list)
    ablations: bool | None = _f(None, "run the ablations: random experts, + shared experts, + non-expert modules "
                                       "(default: on with --extended or --quick, off otherwise)")
    device: str = _f("auto", "where every run trains and is evaluated: auto (a GPU if there is one), cpu, cuda, cuda:N. "
                             "Several workers share one GPU")
    dtype: str = _f("auto", "training dtype of every run: auto (bf16 on a GPU, fp32 on CPU), float32, bfloat16. "
                            "float32 on a GPU follows the CPU recipe, so its numbers compare with a CPU report's")
    workers: int = _f(2, "runs in parallel, each in a fresh process (peak memory per run); 0 = in this process")
    quick: bool = _f(False, "1 seed, 50 steps, no LR grid (so no frontier), ablations on: under 10 minutes on 2 cores")

    def __post_init__(self):
        if self.model not in (None, "small"):  # another model's report and runs never overwrite the default's
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(self.model)).name.lstrip(".")) or "model"
            if self.report == DEFAULT_REPORT:
                self.report = f"docs/report_{slug}.md"
            if self.work_dir == DEFAULT_WORK_DIR:
                self.work_dir = f"runs/report_{slug}"
        if self.ablations is None:
            self.ablations = self.extended or self.quick
        if self.extended:
            self.p_sweep = self.p_sweep or [0.05, 0.1, 0.3, 0.5]
        if self.quick:
            self.seeds, self.steps, self.sweep, self.p_sweep = 1, min(self.steps, 50), False, []
            self.eval_every = min(self.eval_every, max(self.steps // 2, 1))
        from ..tasks import get_task

        for t in self.tasks:
            if get_task(t).kind != "adaptation":  # unknown names raise with the list of tasks
                raise ValueError(f"{t!r} is a general domain, not an adaptation task")
        if not self.budgets:
            raise ValueError("budgets must name at least one forgetting budget, e.g. budgets=[1,2,5]")
        if any(not b >= 0 for b in self.budgets):
            raise ValueError(f"budgets are forgetting in points and must be >= 0, got {self.budgets}")
        if self.seeds < 1 or self.steps < 1 or self.workers < 0:
            raise ValueError("seeds and steps must be >= 1, workers >= 0")
