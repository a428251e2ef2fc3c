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
USER_TASK_KEYS = ("name", "train", "valid", "eval", "metric")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a task name is a directory name of its runs and selections


def check_user_tasks(user_tasks) -> list[dict]:
    """``user_tasks`` checked without reading any data: each a mapping of USER_TASK_KEYS, its name unique and
    no suite task's, its data specifications well formed, its metric a local one. Returns them normalized
    ({name, train, valid (None: held out of train), eval, metric})."""
    from ..data.spec import parse_spec
    from ..tasks import METRICS, task_names

    if not isinstance(user_tasks, list):
        raise ValueError(f"user_tasks must be a list of mappings {{name, train, valid, eval, metric}}, got {user_tasks!r}")
    out, seen = [], set()
    for i, u in enumerate(user_tasks):
        where = f"user_tasks[{i}]"
        if not isinstance(u, dict):
            raise ValueError(f"{where} must be a mapping {{name, train, valid, eval, metric}}, got {u!r}")
        unknown = sorted(set(u) - set(USER_TASK_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {list(USER_TASK_KEYS)}")
        missing = [k for k in ("name", "train", "eval", "metric") if u.get(k) in (None, "", [])]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (a user task needs name, train, eval and metric; "
                             "valid is optional)")
        name = u["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}: name must be letters, digits, '_', '-' or '.' (it names the task's run "
                             f"directories), got {name!r}")
        where = f"user_tasks[{i}] ({name})"
        if name in task_names():
            raise ValueError(f"{where}: {name!r} is a suite task's name; give the user task another name")
        if name in seen:
            raise ValueError(f"{where}: two user tasks are named {name!r}; names must be unique")
        seen.add(name)
        if not isinstance(u["metric"], str) or u["metric"] not in METRICS:
            raise ValueError(f"{where}: unknown metric {u['metric']!r}; known: {', '.join(sorted(METRICS))}")
        for k in ("train", "valid", "eval"):
            if u.get(k) is not None:
                parse_spec(u[k], None, f"{where}.{k}")  # DataError (a ValueError) naming the field
        spec = lambda v: str(v) if isinstance(v, Path) else v  # noqa: E731 - kept as given, a Path as its string
        out.append({"name": name, "train": spec(u["train"]), "valid": spec(u.get("valid")), "eval": spec(u["eval"]),
                    "metric": u["metric"]})
    return out


@dataclass
class ReportConfig:
    report: str = _f(DEFAULT_REPORT, "Markdown report to write (PNG plots, results JSON and the ledger of finished "
                                     "runs, <report>.runs.json, go beside it; commit the ledger and a fresh clone "
                                     "resumes); with another model: docs/report_<model name>.md")
    work_dir: str = _f(DEFAULT_WORK_DIR, "run directories and the result cache (a rerun reuses finished runs); "
                                         "with another model: runs/report_<model name>")
    model: str | None = _f(None, "base checkpoint directory, or a shipped model: small (default), v2lite")
    tasks: list[str] = _f(None, "the suite's adaptation tasks to compare on ([] with user_tasks: only the user's)",
                          lambda: list(ADAPTATION_TASKS))
    user_tasks: list[dict] = _f(None, "your own tasks, each {name, train, valid, eval, metric}: train/valid/eval are data "
                                      "specifications (a path, glob, folder, save_to_disk folder, YAML file of sources "
                                      "or a list of sources, any layout; valid optional: else the training recipe's "
                                      "valid_fraction of train is held out), metric one of exact_match, intent_json, "
                                      "json_match, numeric, chrf; each is profiled, trained and scored like a suite "
                                      "task (prompt = the conversation up to its last assistant turn, reference = "
                                      "that turn or the row's answers, at most n_eval rows, as `esft eval --data`)",
                                list)
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
    sweep: bool = _f(True, "train every method of `methods` (default ESFT-Token, FFT and LoRA) at every LR of its grid "
                           "(seed 0), then more seeds at the LRs on each method's frontier; the headline is task skill at matched forgetting, and the "
                           "LR with the best validation loss gives the second view")
    sweep_esft: list[float] = _f(None, "ESFT learning rates (the grid of the frontier and of the LR choice)",
                                 lambda: [1e-3, 2e-3, 3e-3, 5e-3, 1e-2])
    sweep_full: list[float] = _f(None, "full fine-tuning learning rates", lambda: [1e-4, 2e-4, 3e-4, 5e-4, 1e-3])
    sweep_lora: list[float] = _f(None, "LoRA learning rates (every rank: alpha = 2 x rank keeps the update's scale)",
                                 lambda: [3e-4, 1e-3, 2e-3, 3e-3, 6e-3])
    sweep_esft_lora: list[float] = _f(None, "ESFT-LoRA learning rates (LoRA on ESFT-Token's experts only). The grid "
                                            "reaches lower than LoRA's: at 1e-3 rank 32 already forgot 17 general "
                                            "points on verdict_json (small model)",
                                      lambda: [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2])
    lr_esft_lora: float = _f(5e-3, "ESFT-LoRA learning rate when the LR grid is off")
    methods: list[str] | None = _f(None, "the methods on the matched-forgetting front, each trained over its LR grid "
                                         "with more seeds at its front: full, lora (r=8), esft (ESFT-Token), "
                                         "esft-shared (+ shared experts), esft-router (router-first selection, then "
                                         "ESFT-Token under the original routers), lora-r<N> (LoRA of rank N), "
                                         "esft-lora-r<N> (LoRA of rank N on ESFT-Token's experts only), "
                                         "esft-lora-r<N>-p<P> (the same on ESFT-Token's selection at top_p P). Default: "
                                         "[full, lora, esft]; --extended: [full, lora, lora-r2, lora-r1, esft, "
                                         "esft-shared, esft-router, esft-lora-r8, esft-lora-r32, esft-lora-r8-p0.5]. "
                                         "Needs the LR grid "
                                         "(sweep)")
    router_stage_steps: int = _f(16, "esft-router: AdamW steps of the router-only stage before profiling (16 x 8 "
                                     "rows x 256 tokens = the 32,768 profiled tokens seen once, 16% of a run's "
                                     "training tokens)")
    router_stage_lr: float = _f(5e-4, "esft-router: learning rate of the router stage (the RouterLens code's)")
    router_stage_batch_size: int = _f(8, "esft-router: packed rows per router-stage step (the training batch)")
    budgets: list[float] = _f(None, "forgetting budgets in general-ability points: the headline table gives each "
                                    "method's task score at this much forgetting (its Pareto front's height)",
                              lambda: [1.0, 2.0, 5.0])
    extended: bool = _f(False, "also run the ablations (random experts, + shared, + non-expert) and the p sweep "
                               "(88 more runs with 3 seeds: 65 minutes on a 2-core VM after the default report), "
                               "and put every method of the --extended `methods` list on the front (about 255 more "
                               "runs, about 3.7 hours more on a 2-core VM, estimated from the runs' recorded times)")
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
        self._resolve_methods()
        from ..tasks import get_task

        if not self.tasks and not self.user_tasks:
            raise ValueError("no tasks: name suite tasks (tasks=[...]) or your own (user_tasks=[{name, train, eval, "
                             "metric}])")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks names a task twice: {self.tasks}")
        self.user_tasks = check_user_tasks(self.user_tasks)
        for t in self.tasks:
            if get_task(t).kind != "adaptation":  # unknown names raise with the list of tasks
                raise ValueError(f"{t!r} is a general domain, not an adaptation task")
        if not self.budgets:
            raise ValueError("budgets must name at least one forgetting budget, e.g. budgets=[1,2,5]")
        if any(not b >= 0 for b in self.budgets):
            raise ValueError(f"budgets are forgetting in points and must be >= 0, got {self.budgets}")
        if self.seeds < 1 or self.steps < 1 or self.workers < 0:
            raise ValueError("seeds and steps must be >= 1, workers >= 0")

    def _resolve_methods(self) -> None:
        from .plan import DEFAULT_METHODS, EXTENDED_METHODS, canonical_method, front_variant

        explicit = self.methods is not None
        if not explicit:
            self.methods = list(EXTENDED_METHODS if self.extended else DEFAULT_METHODS)
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError(f"methods must name at least one front method, e.g. {DEFAULT_METHODS}, got {self.methods!r}")
        self.methods = [canonical_method(m) for m in self.methods]
        for m in self.methods:
            front_variant(m)  # an unknown id raises with the list of ids
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods names a method twice: {self.methods} (lora-r8 is lora)")
        if not self.sweep:  # no LR grid, so no front: the paper's layout alone (run.report_runs)
            extra = [m for m in self.methods if m not in DEFAULT_METHODS]
            if extra and explicit:
                raise ValueError(f"methods {extra} are compared on the matched-forgetting front, which needs the LR "
                                 "grid: drop quick=true / sweep=false, or leave them out")
            self.methods = [m for m in self.methods if m in DEFAULT_METHODS]
        for name in ("router_stage_steps", "router_stage_batch_size"):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")

    def grid(self, method: str) -> list[float]:
        """The LR grid of a front method (its family's sweep_* list)."""
        from .plan import GRIDS, method_grid

        return list(getattr(self, GRIDS[method_grid(method)]))

    def fixed_lr(self) -> dict[str, float]:
        """Each LR family's learning rate when the grid is off (and before it has chosen)."""
        return {"esft": self.lr_esft, "full": self.lr_full, "lora": self.lr_lora, "esft_lora": self.lr_esft_lora}

    @property
    def all_tasks(self) -> list[str]:
        """The suite's tasks, then the user's: every task the report compares on."""
        return list(self.tasks) + [u["name"] for u in self.user_tasks]

    def user_task(self, name: str) -> dict | None:
        return next((u for u in self.user_tasks if u["name"] == name), None)
