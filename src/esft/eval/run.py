"""`esft eval`: score a model (base, base + ESFT adapter, merged, fully fine-tuned, LoRA) locally.

Inputs: a suite task name (its held-out eval split) or a JSONL file in either layout

    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   prompt = last user turn before
                                                                          the last assistant turn
    {"prompt": "...", "answers": ["...", ...]}                           the reference eval layout

Outputs: ``predictions.jsonl`` (prompt, references, prediction, correct-or-score per example)
and ``summary.json``; ``--general`` adds the held-out general-ability score.

The prompt format is the adapter's (recorded in its esft_adapter.json at training time, and in
esft_merge.json by esft merge), the reference template for a bare checkpoint; prompts that do not fit the model's context with room
for ``max_new_tokens`` are counted and refused, left-truncated or skipped (``overlong``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import DataError, read_jsonl, write_json_atomic
from .generate import OVERLONG, TEMPLATES, PromptFormat


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
    template: str = field(default="auto", metadata={"help": "prompt format: auto (the adapter's recorded one, "
                                                    "or a merged checkpoint's; reference for a bare checkpoint), "
                                                    "reference or chat"})
    overlong: str = field(default="refuse", metadata={"help": "prompts longer than the context (minus max_new_tokens): "
                                                      "refuse, truncate (keep their last tokens) or skip"})
    device_map: str | dict | None = field(default=None, metadata={"help": "spread the model over devices: auto, cpu, "
                                                                 "cuda:0, or a JSON file {module: device}"})
    harness: str | None = field(default=None, metadata={"help": "lm-evaluation-harness tasks, comma-separated "
                                                        "(e.g. mmlu,gsm8k); see eval/harness.py"})
    harness_include: str | None = field(default=None, metadata={"help": "directory of extra harness YAML tasks"})
    harness_builtin: bool = field(default=True, metadata={"help": "index the harness's own tasks too"})
    harness_limit: int | None = field(default=None, metadata={"help": "at most this many documents per harness task"})
    harness_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (default: each task's)"})
    harness_unsafe_code: bool = field(default=False, metadata={"help": "allow harness tasks that run model code"})

    def __post_init__(self):
        if self.model:
            from ..embedded import resolve_model

            self.model = str(resolve_model(self.model))  # a shipped model's name -> its directory
        if self.task and self.data:
            raise ValueError("give exactly one of task (a suite task) or data (a JSONL file)")
        if not (self.task or self.data or self.harness):
            raise ValueError("give exactly one of task (a suite task) or data (a JSONL file), "
                             "or harness (lm-evaluation-harness tasks), or both")
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("the judge needs both judge_url and judge_model")
        if self.template not in ("auto", *TEMPLATES):
            raise ValueError(f"template must be auto, reference or chat, got {self.template!r}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, got {self.overlong!r}")


def read_eval_file(path: str, limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    prompts, refs, _ = read_eval_rows(path, limit)
    return prompts, refs


def read_eval_rows(path: str, limit: int | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """(prompts, references, "file:line" of each) of an eval file."""
    prompts, refs, sources = [], [], []
    for row in read_jsonl(path):
        src = f"{path}:{row['_line']}"
        sources.append(src)
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
    return prompts, refs, sources


def adapter_format(adapter: str) -> PromptFormat | None:
    """The prompt format an adapter directory was trained with; None when unknown (a PEFT adapter)."""
    from ..adapter.io import META_FILE
    from .generate import recorded_format

    a = Path(adapter)
    if (a / "adapter_config.json").exists():
        return None
    meta = json.loads((a / META_FILE).read_text()) if (a / META_FILE).exists() else {}
    return recorded_format(meta)  # no metadata: a reference-code adapter, trained on the reference template


def merged_format(model_dir: str) -> PromptFormat | None:
    """The prompt format recorded in a merged checkpoint's esft_merge.json (its adapter's); None when the
    directory is not an esft merge or was merged before merges recorded it (then: unknown)."""
    from ..adapter.merge import MERGE_RECORD
    from .generate import recorded_format

    f = Path(model_dir) / MERGE_RECORD if model_dir else None
    if f is None or not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not a JSON file ({e})") from None
    rec = record.get("template") if isinstance(record, dict) else None
    return recorded_format({"template": rec}) if isinstance(rec, dict) else None


def eval_format(cfg: EvalConfig) -> PromptFormat:
    """The prompt format for ``cfg``: --template against what the adapter (or, without one, the merged
    checkpoint) was trained with; a contradiction raises ValueError."""
    from .generate import choose_format

    if cfg.adapter:
        return choose_format(cfg.template, adapter_format(cfg.adapter), f"adapter {cfg.adapter}")
    return choose_format(cfg.template, merged_format(cfg.model), f"merged checkpoint {cfg.model}")


def load_for_eval(model_dir: str, adapter: str | None, device_map=None, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer, kind) for a checkpoint, optionally with an ESFT or PEFT adapter on top."""
    from ..adapter.io import attach_adapter
    from ..embedded import embedded_model_dir
    from ..models.loading import load_model

    model, tok = load_model(model_dir or embedded_model_dir(), dtype=dtype, device=device, device_map=device_map)
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
    from .generate import context_of, encode_prompts, general_ability, generate_ids

    # the format is settled before loading anything: a conflicting --template fails at once
    fmt = eval_format(cfg)
    kind = "given"
    hcfg = harness_config(cfg)  # settled (and lm-eval found) before the model is loaded
    if model is None:
        model, tokenizer, kind = load_for_eval(cfg.model, cfg.adapter, cfg.device_map)
    if hcfg is not None and not (cfg.task or cfg.data):
        summary = {"model_kind": kind, "config": asdict(cfg)}
        _add_harness(summary, model, tokenizer, hcfg, cfg.out)
        return summary
    if cfg.task:
        metric = get_task(cfg.task).metric
        pairs = generate_split(cfg.task, "eval", cfg.n, cfg.seed)
        prompts, refs = [p for p, _ in pairs], [[a] for _, a in pairs]
        sources = [f"{cfg.task} eval example {i}" for i in range(len(prompts))]
    else:
        metric = cfg.metric or "exact_match"
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        prompts, refs, sources = read_eval_rows(cfg.data, cfg.n)
    context = context_of(model)
    enc = encode_prompts(tokenizer, prompts, fmt, context, cfg.max_new_tokens, cfg.overlong, sources)
    kept = [i for i, ids in enumerate(enc.ids) if ids is not None]
    if not kept:
        raise DataError(f"all {len(prompts)} prompts are longer than the context ({context} tokens with "
                        f"max_new_tokens {cfg.max_new_tokens}): nothing left to score")
    preds = generate_ids(model, tokenizer, [enc.ids[i] for i in kept], cfg.max_new_tokens, cfg.batch_size)
    kept_prompts, kept_refs = [prompts[i] for i in kept], [refs[i] for i in kept]
    total = float(METRICS[metric](preds, kept_refs))
    action = {"truncate": "truncated", "skip": "skipped"}[cfg.overlong] if enc.overlong else "none"
    summary = {"task": cfg.task or cfg.data, "metric": metric, "score": total, "n": len(preds), "model_kind": kind,
               "template": fmt.name,
               "overlong": {"count": len(enc.overlong), "of": len(prompts), "action": action, "context": context,
                            "max_new_tokens": cfg.max_new_tokens, "first": [sources[i] for i in enc.overlong[:10]]},
               "config": asdict(cfg)}
    if cfg.general:  # the suite's general domains, always in the reference format (comparable across models)
        g, per = general_ability(model, tokenizer, cfg.n_general, cfg.seed)
        summary.update(general_ability=g, general_per_domain=per)
    grades = None
    if cfg.judge_url:
        from .judge import JudgeConfig, judge

        j = judge(kept_prompts, kept_refs, preds, JudgeConfig(cfg.judge_url, cfg.judge_model, cfg.judge_key_env))
        grades = dict(zip(kept, j.grades))
        summary.update(judge_score=j.score, judge_unparsed=j.unparsed, judge_model=cfg.judge_model)
    if hcfg is not None:
        _add_harness(summary, model, tokenizer, hcfg, cfg.out)
    if cfg.out:
        _write_outputs(Path(cfg.out), summary, prompts, refs, dict(zip(kept, preds)), set(enc.overlong), action,
                       METRICS[metric], grades)
    return summary


def harness_config(cfg: EvalConfig):
    """The HarnessConfig of ``cfg`` (None without --harness); raises HarnessNotInstalled without lm-eval."""
    if not cfg.harness:
        return None
    from .harness import HarnessConfig, require_lm_eval

    h = HarnessConfig(tasks=cfg.harness.split(","), include=cfg.harness_include, builtin=cfg.harness_builtin,
                      limit=cfg.harness_limit, num_fewshot=cfg.harness_fewshot, batch_size=cfg.batch_size,
                      unsafe_code=cfg.harness_unsafe_code)
    require_lm_eval()
    return h


def _add_harness(summary: dict, model, tokenizer, hcfg, out: str | None) -> None:
    """Run the harness on the loaded model (as it is: an attached adapter stays attached) into ``summary``;
    with ``out``, write summary.json and one harness_<task>.jsonl per task there."""
    from .harness import run_harness, write_samples

    r = run_harness(model, tokenizer, hcfg)
    summary["harness"] = {"results": r["results"], "n": r["n"], "versions": r["versions"], "lm_eval": r["lm_eval"]}
    if out:
        write_samples(Path(out), r["samples"])
        write_json_atomic(Path(out) / "summary.json", summary)


def _write_outputs(out: Path, summary: dict, prompts, refs, preds: dict, overlong: set, action: str, metric,
                   grades: dict | None) -> None:
    """predictions.jsonl (one row per input, in order; a skipped prompt has prediction null) and summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for i, (p, r) in enumerate(zip(prompts, refs)):
            row = {"prompt": p, "answers": r, "prediction": preds.get(i)}
            if i in preds:
                row["score"] = float(metric([preds[i]], [r]))
            if i in overlong:
                row["overlong"] = action
            if grades is not None and i in grades:
                row["judge_grade"] = grades[i]
            f.write(json.dumps(row) + "\n")
    write_json_atomic(out / "summary.json", summary)
