"""`esft eval`: score a model (base, base + ESFT adapter, merged, fully fine-tuned, LoRA) locally.

Inputs: a suite task name (its held-out eval split) or a JSONL file in either layout

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   prompt = last user turn before
                                                                          the last assistant turn
    {"prompt": "...", "answers": ["...", ...]}                           the reference eval layout

Outputs: ``predictions.jsonl`` (prompt, references, prediction, correct-or-score per example)
and ``summary.json``; ``--general`` adds the held-out general-ability score.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import DataError, read_jsonl, write_json_atomic


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "base or merged checkpoint directory ('' = shipped model)"})
    adapter: str | None = field(default=None, metadata={"help": "ESFT adapter or PEFT (LoRA) adapter directory"})
    task: str | None = field(default=None, metadata={"help": "suite task (its eval split)"})
    data: str | None = field(default=None, metadata={"help": "JSONL to evaluate instead of a suite task"})
    metric: str | None = field(default=None, metadata={"help": "metric for --data (default exact_match)"})
    n: int = field(default=200, metadata={"help": "examples (suite tasks) / at most (files)"})
    general: bool = field(default=False, metadata={"help": "also score general ability"})
    n_general: int = field(default=50, metadata={"help": "examples per general domain"})
    batch_size: int = field(default=50, metadata={"help": "generation batch size"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation length limit"})
    out: str | None = field(default=None, metadata={"help": "directory for predictions.jsonl and summary.json"})
    seed: int = field(default=0, metadata={"help": "data seed for suite tasks"})
    judge_url: str | None = field(default=None, metadata={"help": "optional OpenAI-compatible endpoint of a judge model"})
    judge_model: str | None = field(default=None, metadata={"help": "judge model name on that endpoint"})
    judge_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable with the judge's key"})

    def __post_init__(self):
        if bool(self.task) == bool(self.data):
            raise ValueError("give exactly one of task (a suite task) or data (a JSONL file)")
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("the judge needs both judge_url and judge_model")


def read_eval_file(path: str, limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    prompts, refs = [], []
    for row in read_jsonl(path):
        src = f"{path}:{row['_line']}"
        if "prompt" in row:
            answers = row.get("answers")
            if not isinstance(answers, list) or not answers:
                raise DataError(f"{src}: 'answers' must be a non-empty list next to 'prompt'")
            prompts.append(str(row["prompt"]))
            refs.append([str(a) for a in answers])
        elif "messages" in row:
            msgs = row["messages"]
            last_a = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            users = [i for i, m in enumerate(msgs) if m.get("role") == "user" and (last_a is None or i < last_a)]
            if last_a is None or not users:
                raise DataError(f"{src}: needs a user turn followed by an assistant turn")
            prompts.append(str(msgs[users[-1]]["content"]))
            refs.append(row.get("answers") or [str(msgs[last_a]["content"])])
        else:
            raise DataError(f"{src}: expected 'messages' or 'prompt' + 'answers'")
        if limit and len(prompts) >= limit:
            break
    return prompts, refs


def load_for_eval(model_dir: str, adapter: str | None):
    """(model, tokenizer, kind) for a checkpoint, optionally with an ESFT or PEFT adapter on top."""
    from ..adapter.io import attach_adapter
    from ..embedded import embedded_model_dir
    from ..models.loading import load_model

    model, tok = load_model(model_dir or embedded_model_dir(), dtype="auto", device="auto")
    kind = "base"
    if adapter:
        a = Path(adapter)
        if (a / "adapter_config.json").exists():  # a PEFT adapter (LoRA baseline)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
            kind = "lora"
        else:
            attach_adapter(model, a)
            kind = "esft"
    return model.eval(), tok, kind


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    from ..tasks import METRICS, generate_split, get_task
    from .generate import general_ability, generate

    kind = "given"
    if model is None:
        model, tokenizer, kind = load_for_eval(cfg.model, cfg.adapter)
    if cfg.task:
        metric = get_task(cfg.task).metric
        pairs = generate_split(cfg.task, "eval", cfg.n, cfg.seed)
        prompts, refs = [p for p, _ in pairs], [[a] for _, a in pairs]
    else:
        metric = cfg.metric or "exact_match"
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        prompts, refs = read_eval_file(cfg.data, cfg.n)
    preds = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    total = float(METRICS[metric](preds, refs))
    summary = {"task": cfg.task or cfg.data, "metric": metric, "score": total, "n": len(preds), "model_kind": kind,
               "config": asdict(cfg)}
    if cfg.general:
        g, per = general_ability(model, tokenizer, cfg.n_general, cfg.seed)
        summary.update(general_ability=g, general_per_domain=per)
    grades = None
    if cfg.judge_url:
        from .judge import JudgeConfig, judge

        j = judge(prompts, refs, preds, JudgeConfig(cfg.judge_url, cfg.judge_model, cfg.judge_key_env))
        grades = j.grades
        summary.update(judge_score=j.score, judge_unparsed=j.unparsed, judge_model=cfg.judge_model)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as f:
            for i, (p, r, y) in enumerate(zip(prompts, refs, preds)):
                row = {"prompt": p, "answers": r, "prediction": y, "score": float(METRICS[metric]([y], [r]))}
                if grades is not None:
                    row["judge_grade"] = grades[i]
                f.write(json.dumps(row) + "\n")
        write_json_atomic(out / "summary.json", summary)
    return summary
