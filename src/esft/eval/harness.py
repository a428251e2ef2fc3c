"""`esft eval --harness TASKS`: general ability measured with lm-evaluation-harness, on our own model objects.

The model is whatever ``esft eval`` loaded: a base checkpoint, a base with an ESFT adapter *attached*
(the selected experts' trained copies sit beside the frozen originals; no second model is built), a
merged checkpoint, or a base with a PEFT (LoRA) adapter merged in. It is handed to the harness's own
Hugging Face wrapper (``lm_eval.models.huggingface.HFLM``) as a pre-built object, so the harness's
batching, tokenisation and scoring (loglikelihood, rolling loglikelihood, greedy generation) are used
unchanged, and nothing is loaded a second time.

Tasks are the harness's by name (``mmlu``, ``gsm8k``, ``ifeval``, ...; its datasets come from the
Hugging Face Hub, so a first run needs the network or a filled ``HF_DATASETS_CACHE``), or your own
YAML task files in a directory given as ``include`` (the harness reads local JSON/JSONL through
``dataset_path: json``). lm-eval is an optional dependency: ``pip install 'esft[harness]'``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EXTRA = "harness"
LIST_HINT = ("list the harness's tasks with `lm-eval ls tasks` (add `--include_path DIR` for your own YAML "
             "tasks), or define a task in a YAML file and pass its directory with --harness-include")


class HarnessNotInstalled(ImportError):
    """lm-evaluation-harness is not importable; the message says which extra installs it."""


@dataclass
class HarnessConfig:
    tasks: list[str]
    include: str | None = None  # a directory of extra YAML task files
    builtin: bool = True  # also index the harness's own tasks (a minute to scan on a slow CPU)
    limit: int | None = None  # at most this many documents per task
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 16
    unsafe_code: bool = False  # let tasks that execute the model's code run (humaneval, mbpp)

    def __post_init__(self):
        self.tasks = [t.strip() for t in self.tasks if t and t.strip()]
        if not self.tasks:
            raise ValueError("--harness needs at least one task name, e.g. --harness mmlu,gsm8k")
        if self.include is not None and not Path(self.include).is_dir():
            raise FileNotFoundError(f"--harness-include {self.include}: not a directory of YAML task files")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--harness-limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")


def require_lm_eval():
    """Import lm_eval, or raise HarnessNotInstalled naming the extra that installs it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise HarnessNotInstalled(
            f"--harness needs lm-evaluation-harness, which is not installed ({e}); install the "
            f"'{EXTRA}' extra: pip install 'esft[{EXTRA}]' (or `make install`, which includes it)") from None
    return lm_eval


def task_manager(cfg: HarnessConfig):
    """The harness's TaskManager over its own tasks (unless ``builtin`` is off) and ``cfg.include``;
    an unknown task name raises ValueError saying how to find the available ones."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=cfg.include, include_defaults=cfg.builtin)
    known = set(tm.all_tasks)
    unknown = [t for t in cfg.tasks if t not in known and not tm.match_tasks([t])]
    if unknown:
        where = ("the harness's tasks" if cfg.builtin else "") + (
            (" and " if cfg.builtin else "") + f"the YAML tasks in {cfg.include}" if cfg.include else "")
        raise ValueError(f"unknown harness task(s) {', '.join(unknown)} (not among {where or 'no tasks'}); "
                         f"{LIST_HINT}")
    return tm


def wrap_model(model, tokenizer, batch_size: int):
    """Our model object as the harness's HFLM, used as it is (no copy, no reload)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_harness(model, tokenizer, cfg: HarnessConfig) -> dict:
    """Evaluate ``model`` on ``cfg.tasks`` with lm-evaluation-harness.

    Returns ``{"results": {task: {metric: value}}, "n": {task: documents}, "samples": {task: [per-document
    records]}, "versions": ..., "lm_eval": version}``; metric keys are the harness's (``acc,none``, ...).
    """
    lm_eval = require_lm_eval()
    tm = task_manager(cfg)
    lm = wrap_model(model, tokenizer, cfg.batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=tm, limit=cfg.limit,
                                  num_fewshot=cfg.num_fewshot, log_samples=True, bootstrap_iters=0,
                                  confirm_run_unsafe_code=cfg.unsafe_code)
    if out is None:  # only on a non-zero rank under torch.distributed
        return {}
    results = {t: {k: v for k, v in r.items() if k not in ("alias", "name")} for t, r in out["results"].items()}
    n = {t: int(v.get("effective", v.get("original", 0))) if isinstance(v, dict) else int(v)
         for t, v in out.get("n-samples", {}).items()}
    return {"results": results, "n": n, "samples": out.get("samples", {}), "versions": out.get("versions", {}),
            "lm_eval": getattr(lm_eval, "__version__", "?")}


def write_samples(out_dir: Path, samples: dict) -> list[Path]:
    """One ``harness_<task>.jsonl`` per task: the harness's per-document record (document, prompts,
    responses, scores); NaN or infinite numbers are written as null, listed under ``non_finite_as_null``."""
    from .run import finite

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, rows in samples.items():
        p = out_dir / f"harness_{task}.jsonl"
        with open(p, "w") as f:
            for r in rows:
                found: list[str] = []
                r = finite(r, found=found)
                if found and isinstance(r, dict):
                    r["non_finite_as_null"] = found
                f.write(json.dumps(r, default=str, allow_nan=False) + "\n")
        paths.append(p)
    return paths
