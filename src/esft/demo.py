"""`esft demo`: the whole ESFT story on the shipped model, on a laptop CPU, in minutes.

    task data -> evaluate base -> profile -> select -> train (only the selected experts)
    -> reload base + adapter from disk -> evaluate -> table

Everything it writes goes under ``--out`` (replaced on each run): the task's JSONL splits,
scores.json, expert_cfg.json, the training directory with its adapter, predictions and a
summary.json with every figure of the final table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class DemoConfig:
    task: str = field(default="translate_synth", metadata={"help": "adaptation task to learn"})
    score_function: str = field(default="token", metadata={"help": "token (ESFT-Token) or gate (ESFT-Gate)"})
    top_p: float | None = field(default=None, metadata={"help": "selection threshold (default: 0.2 token, 0.1 gate)"})
    out: str = field(default="runs/demo", metadata={"help": "output directory (replaced)"})
    model: str | None = field(default=None, metadata={"help": "checkpoint (default: the shipped model)"})
    n_train: int = field(default=3000, metadata={"help": "training examples"})
    n_valid: int = field(default=100, metadata={"help": "validation examples"})
    n_eval: int = field(default=200, metadata={"help": "task eval examples"})
    n_general: int = field(default=50, metadata={"help": "eval examples per general domain"})
    steps: int = field(default=300, metadata={"help": "training steps"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    batch_size: int = field(default=16, metadata={"help": "packed rows per step"})
    seq_len: int = field(default=256, metadata={"help": "packed row length"})
    profile_tokens: int = field(default=32768, metadata={"help": "profiling token budget"})
    seed: int = field(default=0, metadata={"help": "seed"})


    def __post_init__(self):
        from .training.config import check_range

        for name in ("n_train", "n_valid", "n_eval", "n_general", "steps", "batch_size", "seq_len", "profile_tokens"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_range("lr", self.lr, low=0, low_open=True)
        if self.top_p is not None:
            check_range("top_p", self.top_p, low=0, high=1, low_open=True)
        if self.score_function not in ("token", "gate"):
            raise ValueError(f"score_function must be token or gate, got {self.score_function!r}")


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    import torch

    from .adapter.io import attach_adapter, read_adapter
    from .io import claim_output_dir
    from .embedded import resolve_model
    from .eval.generate import evaluate_task, general_ability
    from .models.loading import load_model
    from .models.registry import moe_layers
    from .profiling.run import ProfileConfig, run_profile
    from .selection.run import run_select
    from .selection.select import SelectConfig
    from .tasks import get_task, task_names, write_suite
    from .training.config import TrainConfig
    from .training.recipe import train

    task = get_task(cfg.task)  # unknown name -> error listing the tasks
    if task.kind != "adaptation":
        raise ValueError(f"{cfg.task!r} is a general domain; pick an adaptation task: {', '.join(task_names('adaptation'))}")
    model_dir = resolve_model(cfg.model)
    top_p = cfg.top_p if cfg.top_p is not None else (0.2 if cfg.score_function == "token" else 0.1)
    # Replaced only if an earlier demo wrote it (its marker); anything else there is refused, not deleted.
    out = claim_output_dir(cfg.out, "demo", {"model": str(model_dir)}, overwrite=True, what="--out")
    times: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        r = fn()
        times[name] = time.perf_counter() - t
        return r

    paths = timed("data", lambda: write_suite(out / "data", cfg.n_train, cfg.n_valid, cfg.n_eval, cfg.seed,
                                              tasks=[cfg.task])[cfg.task])
    base, tok = load_model(model_dir, dtype="float32", device="cpu")

    def evaluate(model):
        r = evaluate_task(model, tok, cfg.task, cfg.n_eval, cfg.seed)
        g, per = general_ability(model, tok, cfg.n_general, cfg.seed)
        return r, g, per

    before, g_before, per_before = timed("evaluate base", lambda: evaluate(base))
    timed("profile", lambda: run_profile(ProfileConfig(data=str(paths["train"]), out=str(out / "scores.json"),
                                                       max_tokens=cfg.profile_tokens, seq_len=cfg.seq_len,
                                                       batch_size=8), model=base, tokenizer=tok, progress=progress))
    sel = timed("select", lambda: run_select(str(out / "scores.json"),
                                             SelectConfig(score_function=cfg.score_function, top_p=top_p),
                                             str(out / "expert_cfg.json")))
    tcfg = TrainConfig(model=str(model_dir), train_data=str(paths["train"]), valid_data=str(paths["valid"]),
                       output_dir=str(out / "train"), method="esft", expert_config=str(out / "expert_cfg.json"),
                       seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                       eval_every=max(cfg.steps // 4, 1), save_every=max(cfg.steps // 2, 1), log_every=10,
                       dtype="float32", device="cpu", seed=cfg.seed, tensorboard=True)
    res = timed("train", lambda: train(tcfg, progress=progress))

    def after_eval():
        model, _ = load_model(model_dir, dtype="float32", device="cpu")  # fresh base + adapter from disk
        attach_adapter(model, out / "train" / "adapter")
        return evaluate(model)

    after, g_after, per_after = timed("evaluate ESFT", after_eval)

    n_sel = sum(len(v) for v in sel["experts"].values())
    layers = moe_layers(base)
    n_all = sum(l.num_experts for l in layers)
    adapter_bytes = sum(f.stat().st_size for f in (out / "train" / "adapter").iterdir())
    # The whole model as a checkpoint in the adapter's dtype (the base checkpoint's: bf16 for the shipped model).
    adapter_dtype = getattr(torch, read_adapter(out / "train" / "adapter").meta.get("dtype") or "float32")
    full_bytes = sum(p.numel() for p in base.parameters()) * torch.empty(0, dtype=adapter_dtype).element_size()
    summary = {
        "task": cfg.task, "metric": task.metric, "score_function": cfg.score_function, "top_p": top_p,
        "task_score_before": before.score, "task_score_after": after.score,
        "general_before": g_before, "general_after": g_after,
        "general_per_domain_before": per_before, "general_per_domain_after": per_after,
        "experts_trained": n_sel, "experts_total": n_all, "experts_share": n_sel / n_all,
        "experts_per_layer": {l: len(v) for l, v in sel["experts"].items()},
        "trainable_params": res.trainable_params, "best_valid_loss": res.best_valid_loss,
        "adapter_bytes": adapter_bytes, "full_checkpoint_bytes": full_bytes, "checkpoint_dtype": str(adapter_dtype).removeprefix("torch."),
        "seconds": times, "total_seconds": sum(times.values()), "config": asdict(cfg), "output_dir": str(out),
        "adapter_base_model": read_adapter(out / "train" / "adapter").meta.get("base_model"),
    }
    with open(out / "predictions.jsonl", "w") as f:
        for p, ref, b, a in zip(after.prompts, after.references, before.predictions, after.predictions):
            f.write(json.dumps({"prompt": p, "answer": ref, "base": b, "esft": a}) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ESFT demo: {s['task']} ({s['metric']}), ESFT-{s['score_function'].capitalize()} p={s['top_p']}")
    for c in ("", "base model", "after ESFT", "change"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("task score", f"{s['task_score_before']:.1f}", f"{s['task_score_after']:.1f}",
              f"{s['task_score_after'] - s['task_score_before']:+.1f}")
    t.add_row("general ability", f"{s['general_before']:.1f}", f"{s['general_after']:.1f}",
              f"{s['general_after'] - s['general_before']:+.1f}")
    t.add_section()
    t.add_row("experts trained", f"{s['experts_trained']} of {s['experts_total']}", f"{100 * s['experts_share']:.1f}%", "")
    t.add_row(f"adapter vs full checkpoint ({s['checkpoint_dtype']})", f"{s['adapter_bytes'] / 2**20:.2f} MiB",
              f"{s['full_checkpoint_bytes'] / 2**20:.1f} MiB",
              f"{100 * s['adapter_bytes'] / s['full_checkpoint_bytes']:.1f}%")
    t.add_section()
    for k, v in s["seconds"].items():
        t.add_row(f"time: {k}", f"{v:.1f} s", "", "")
    t.add_row("time: total", f"{s['total_seconds']:.1f} s", "", "")
    Console().print(t)
    print(f"outputs in {s['output_dir']}: summary.json, predictions.jsonl, scores.json, expert_cfg.json, "
          f"train/adapter/, train/tb/")
