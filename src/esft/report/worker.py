"""One run of the report: train, evaluate the best checkpoint, measure its cost. Runs in a fresh process.

A fresh process per run (``maxtasksperchild=1``) makes the process's peak resident memory the
run's own peak, and lets two runs share the 2 cores of a laptop (one thread each), which is
faster than one run on two threads for a model this small.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files a user keeps: the ESFT/LoRA adapter or the fine-tuned checkpoint."""
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def peak_memory_bytes(device: str) -> tuple[int, str]:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "peak CUDA memory allocated"
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak process RSS"


def evaluate_user_task(model, tokenizer, name: str, data, metric: str, n: int, batch_size: int = 50,
                       max_new_tokens: int = 48):
    """A user task's score on at most ``n`` rows of its eval data specification, as `esft eval --data` scores
    it: prompt = the conversation up to its last assistant turn (reference template, as the report trains),
    reference = that turn or the row's answers (eval.run.read_eval_rows); greedy decoding; ``metric``."""
    from ..eval.generate import TaskResult, generate
    from ..eval.run import read_eval_rows
    from ..tasks import METRICS

    prompts, refs, _ = read_eval_rows(data, n)
    preds = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return TaskResult(name, float(METRICS[metric](preds, refs)), len(prompts), preds, refs, prompts)


def task_result(model, tokenizer, task: str, ev: dict):
    """The task score of ``model``: a suite task's eval split, or a user task's eval data (``ev`` names its
    ``data`` and ``metric``)."""
    from ..eval.generate import evaluate_task

    if "metric" in ev:
        return evaluate_user_task(model, tokenizer, task, ev["data"], ev["metric"], ev["n_eval"])
    return evaluate_task(model, tokenizer, task, ev["n_eval"], ev["data_seed"])


def execute(job: dict) -> dict:
    """``job``: {"run": Run.as_dict(), "train": TrainConfig kwargs, "eval": {...}, "threads": int,
    "cleanup": bool}. Writes ``<output_dir>/result.json`` atomically and returns it."""
    import torch

    from ..eval.generate import general_ability
    from ..eval.run import load_for_eval
    from ..io import write_json_atomic
    from ..training.config import TrainConfig
    from ..training.recipe import train

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run would drown the report's own bar
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(**job["train"])
    out = Path(cfg.output_dir)
    res = train(cfg, progress=False)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if job.get("threads") or device.startswith("cuda"):
        peak, peak_kind = peak_memory_bytes(device)  # before evaluation, so it is training's peak
    else:  # runs in the report's own process (workers=0): its peak RSS is not this run's
        peak, peak_kind = None, "not measured (workers=0)"
    best = Path(res.best_dir)
    artifact = weight_bytes(best)

    t0 = time.perf_counter()
    if cfg.method == "full":
        model, tok, _ = load_for_eval(str(best), None, dtype=cfg.dtype, device=cfg.device)
    else:
        model, tok, _ = load_for_eval(cfg.model, str(best), dtype=cfg.dtype, device=cfg.device)
    ev = job["eval"]
    task = task_result(model, tok, job["run"]["task"], ev)
    general, per_domain = general_ability(model, tok, ev["n_general"], ev["data_seed"])
    eval_s = time.perf_counter() - t0

    experts = None
    if cfg.expert_config:
        ec = json.loads(Path(cfg.expert_config).read_text())
        experts = sum(len(v) for v in ec["experts"].values())
    result = {
        **job["run"], "job_id": job.get("job_id"), "method": cfg.method, "steps": cfg.steps,
        "task_score": task.score, "general": general, "general_per_domain": per_domain,
        "best_valid_loss": res.best_valid_loss, "train_loss": res.train_loss,
        "trainable_params": res.trainable_params, "optimizer_state_bytes": res.optimizer_state_bytes,
        "train_seconds": res.seconds, "eval_seconds": eval_s, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "artifact_bytes": artifact, "artifact": best.name, "experts_trained": experts,
        "threads": torch.get_num_threads(), "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "examples": [{"prompt": p, "reference": r, "prediction": y}
                     for p, r, y in list(zip(task.prompts, task.references, task.predictions))[:5]],
    }
    if job.get("cleanup", True):  # keep the log and config, drop the weights (a full report trains ~130 models)
        for name in ("adapter", "last", "best", "checkpoints", "tb"):
            shutil.rmtree(out / name, ignore_errors=True)
    write_json_atomic(out / "result.json", result)
    return result
