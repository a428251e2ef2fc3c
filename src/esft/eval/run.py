"""`esft eval`: score a model (base, base + ESFT adapter, merged, fully fine-tuned, LoRA) locally.

Inputs: a suite task name (its held-out eval split) or a JSONL file in either layout

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
        prompt = the whole conversation before the last assistant turn (system message and earlier
        turns too, rendered as training rendered them); reference = that last assistant turn, or the
        row's "answers" list when it has one
    {"prompt": "...", "answers": ["...", ...]}     the reference eval layout: one user turn

Outputs: ``predictions.jsonl`` (prompt = the last user turn, ``messages`` = the whole conversation when
it is more than that turn, references, prediction, score per example) and ``summary.json``; ``--general``
adds the held-out general-ability score, ``--judge-url`` an LLM judge's grades. The local results are
written as soon as they exist, so a judge or harness that fails later cannot lose them. Every value is
checked before the model is loaded; NaN or infinite numbers are written as null and listed under
``non_finite_as_null`` (JSON has no such numbers).

The prompt format is the adapter's (recorded in its esft_adapter.json at training time, and in
esft_merge.json by esft merge), the reference template for a bare checkpoint; prompts that do not fit
the model's context with room for ``max_new_tokens`` are counted and refused, left-truncated or
skipped (``overlong``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import DataError, write_json_atomic
from .generate import OVERLONG, TEMPLATES, PromptFormat


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "base or merged checkpoint directory ('' = shipped model)"})
    adapter: str | None = field(default=None, metadata={"help": "ESFT or ESFT-LoRA adapter, or PEFT (LoRA) adapter "
                                                               "directory"})
    task: str | None = field(default=None, metadata={"help": "suite task (its eval split)"})
    data: str | list | None = field(default=None, metadata={"help": "data specification to evaluate instead of a "
                                                          "suite task (any layout; see esft.data)"})
    data_format: str | None = field(default=None, metadata={"help": "layout of --data (default: detected)"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "drop rows of --data that cannot be converted"})
    metric: str | None = field(default=None, metadata={"help": "metric for --data (default exact_match)"})
    n: int = field(default=200, metadata={"help": "examples (suite tasks) / at most (files); >= 1"})
    general: bool = field(default=False, metadata={"help": "also score general ability"})
    n_general: int = field(default=50, metadata={"help": "examples per general domain"})
    batch_size: int = field(default=50, metadata={"help": "generation batch size"})
    max_new_tokens: int = field(default=48, metadata={"help": "generation length limit"})
    out: str | None = field(default=None, metadata={"help": "directory for predictions.jsonl and summary.json"})
    seed: int = field(default=0, metadata={"help": "data seed for suite tasks"})
    judge_url: str | None = field(default=None, metadata={"help": "optional OpenAI-compatible endpoint of a judge model"})
    judge_model: str | None = field(default=None, metadata={"help": "judge model name on that endpoint"})
    judge_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable with the judge's key"})
    judge_timeout: float = field(default=30.0, metadata={"help": "seconds the judge may take to connect or reply, "
                                                         "per attempt"})
    judge_retries: int = field(default=1, metadata={"help": "further attempts after a failed judge request"})
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
        # everything below is checked here, before any model is loaded: a bad value costs nothing
        for name, low in (("n", 1), ("n_general", 1), ("batch_size", 1), ("max_new_tokens", 1),
                          ("harness_limit", 1), ("harness_fewshot", 0), ("judge_retries", 0)):
            v = getattr(self, name)
            if v is None and name.startswith("harness_"):  # None: no limit / each task's own few-shot count
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        t = self.judge_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"--judge-timeout must be a number of seconds > 0, got {t!r}")
        if self.judge_url and not str(self.judge_url).startswith(("http://", "https://")):
            raise ValueError(f"--judge-url must be an http:// or https:// URL (e.g. http://localhost:8000/v1), "
                             f"got {self.judge_url!r}")
        self._check_task_and_metric()
        self._check_paths()

    def _check_task_and_metric(self):
        from ..tasks import METRICS, get_task

        if self.task:
            own = get_task(self.task).metric  # ValueError naming the known tasks
            if self.metric and self.metric != own:
                raise ValueError(f"--metric is for --data; suite task {self.task} is scored with its own metric, "
                                 f"{own}")
        elif self.metric and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(sorted(METRICS))}")

    def _check_paths(self):
        """A file where a file belongs, a directory where a directory belongs (one line naming the fix)."""
        if self.model:
            m = Path(self.model)
            if not m.exists():
                raise FileNotFoundError(f"--model {m}: no such directory; give a checkpoint directory (with "
                                        "config.json) or a shipped model's name (small, v2lite)")
            if not m.is_dir():
                raise ValueError(f"--model {m} is a file; give the checkpoint directory that holds config.json")
        if self.adapter:
            a = Path(self.adapter)
            if not a.exists():
                raise FileNotFoundError(f"--adapter {a}: no such directory; give the directory `esft train` "
                                        "wrote (or a PEFT adapter's)")
            if not a.is_dir():
                raise ValueError(f"--adapter {a} is a file; give the adapter's directory (the one `esft train` "
                                 "wrote, or a PEFT adapter's)")
        if self.data:
            from ..data.spec import parse_spec

            parse_spec(self.data, self.data_format, "--data")  # read (and checked row by row) before the model
        if self.out:
            from ..embedded import resolve_model
            from ..io import check_output

            # predictions written into the model, the adapter or over the data would change an input
            check_output(self.out, {"model": str(resolve_model(self.model or None)), "adapter": self.adapter,
                                    "data": self.data}, "--out")
            _check_out(Path(self.out))


def _check_out(out: Path) -> None:
    """``out`` can become a directory holding predictions.jsonl and summary.json (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for predictions.jsonl and summary.json")
    for name in ("predictions.jsonl", "summary.json"):
        if (out / name).is_dir():
            raise ValueError(f"--out {out} holds a directory named {name}, where the file is written; "
                             "remove it or choose another --out")
    parent = next(p for p in (out, *out.parents) if p.exists())  # the closest part that exists
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, so no directory can be made under it; "
                         "choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable by this user; choose another --out")


def read_eval_file(path, limit: int | None = None, data_format: str | None = None):
    prompts, refs, _ = read_eval_rows(path, limit, data_format)
    return prompts, refs


def read_eval_rows(path, limit: int | None = None, data_format: str | None = None,
                   skip_bad_rows: bool = False) -> tuple[list[list[dict]], list[list[str]], list[str]]:
    """(conversations, references, location of each) of an eval data specification, at most ``limit``.

    Any layout the data layer reads (esft.data.layouts); a conversation is what the model is prompted
    with: every message before the last assistant turn, system message and earlier turns included
    (training saw them). The reference is the row's ``answers`` list if it has one (the reference code's
    ``{prompt, answers}`` files), else that last assistant turn.
    """
    from ..data.pipeline import iter_conversations

    convs, refs, sources = [], [], []
    for conv in iter_conversations(path, data_format, skip_bad_rows, limit=limit, what="--data"):
        src = conv.source
        if conv.messages is None:
            raise DataError(f"{src}: plain text has no question and answer to evaluate; give conversations")
        msgs = conv.messages
        if not any(m["role"] == "assistant" for m in msgs):
            if conv.references is None:
                raise DataError(f"{src}: needs an assistant turn (the reference answer) after a user turn")
            last_a = len(msgs)
        else:
            last_a = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if not any(m["role"] == "user" for m in msgs[:last_a]):
            raise DataError(f"{src}: needs a user turn before the last assistant turn (the reference answer)")
        # as training renders them: role and content (tool calls kept for chat templates)
        convs.append([{k: v for k, v in m.items() if k != "learn"} for m in msgs[:last_a]])
        refs.append(conv.references or [str(msgs[last_a]["content"])])
        sources.append(src)
    if not convs:
        raise DataError(f"{path}: no examples (the data is empty)")
    return convs, refs, sources


def adapter_format(adapter: str) -> PromptFormat | None:
    """The prompt format an adapter directory was trained with; None when unknown (a PEFT adapter)."""
    from ..adapter.io import META_FILE
    from .generate import recorded_format

    from ..adapter.esft_lora import is_lora_adapter

    a = Path(adapter)
    if (a / "adapter_config.json").exists() and not is_lora_adapter(a):  # an ESFT-LoRA adapter records its format
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
        from ..adapter.esft_lora import is_lora_adapter, materialize, read_lora_adapter
        from ..adapter.io import merge_adapter

        a = Path(adapter)
        if is_lora_adapter(a):  # ESFT-LoRA: W_e + (alpha/r) B_e A_e written into the selected experts (base checked)
            merge_adapter(model, materialize(read_lora_adapter(a), model))
            kind = "esft-lora"
        elif (a / "adapter_config.json").exists():  # a PEFT adapter (LoRA baseline)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
            kind = "lora"
        else:
            attach_adapter(model, a)
            kind = "esft"
    return model.eval(), tok, kind


@dataclass
class Examples:
    """What is scored: prompts (conversations), their references and where each came from."""

    metric: str
    prompts: list[list[dict]]
    refs: list[list[str]]
    sources: list[str]


def read_examples(cfg: EvalConfig) -> Examples:
    """The suite task's eval split or the --data file (read before the model loads: bad data fails at once)."""
    from ..tasks import generate_split, get_task

    if cfg.task:
        pairs = generate_split(cfg.task, "eval", cfg.n, cfg.seed)
        return Examples(get_task(cfg.task).metric, [[{"role": "user", "content": p}] for p, _ in pairs],
                        [[a] for _, a in pairs], [f"{cfg.task} eval example {i}" for i in range(len(pairs))])
    return Examples(cfg.metric or "exact_match", *read_eval_rows(cfg.data, cfg.n, cfg.data_format, cfg.skip_bad_rows))


def require_openai() -> None:
    try:
        import openai  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--judge-url needs the openai client, which is not installed ({e}); install the 'eval' "
                         "extra: pip install 'esft[eval]'") from None


def question(conv: list[dict]) -> str:
    """What the judge is shown as the question: the user's text, or the whole conversation when it has more."""
    if len(conv) == 1:
        return conv[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in conv)


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    from ..tasks import METRICS
    from .generate import context_of, encode_prompts, general_ability, generate_ids

    # settled before loading anything: a conflicting --template, a missing lm-eval or openai, bad data
    fmt = eval_format(cfg)
    hcfg = harness_config(cfg)
    if cfg.judge_url:
        require_openai()
    ex = read_examples(cfg) if (cfg.task or cfg.data) else None
    kind = "given"
    if model is None:
        model, tokenizer, kind = load_for_eval(cfg.model, cfg.adapter, cfg.device_map)
    if ex is None:  # harness tasks only
        summary = {"model_kind": kind, "config": asdict(cfg)}
        samples = _add_harness(summary, model, tokenizer, hcfg)
        if cfg.out:
            write_samples_and_summary(Path(cfg.out), summary, samples)
        return summary
    context = context_of(model)
    enc = encode_prompts(tokenizer, ex.prompts, fmt, context, cfg.max_new_tokens, cfg.overlong, ex.sources)
    kept = [i for i, ids in enumerate(enc.ids) if ids is not None]
    if not kept:
        raise DataError(f"all {len(ex.prompts)} prompts are longer than the context ({context} tokens with "
                        f"max_new_tokens {cfg.max_new_tokens}): nothing left to score")
    generated = generate_ids(model, tokenizer, [enc.ids[i] for i in kept], cfg.max_new_tokens, cfg.batch_size)
    metric = METRICS[ex.metric]
    preds = dict(zip(kept, generated))
    action = {"truncate": "truncated", "skip": "skipped"}[cfg.overlong] if enc.overlong else "none"
    rows = []  # one per input, in order; a skipped prompt has prediction null
    for i, (conv, r) in enumerate(zip(ex.prompts, ex.refs)):
        last_user = next(m for m in reversed(conv) if m["role"] == "user")
        row = {"prompt": last_user["content"], "answers": r, "prediction": preds.get(i)}
        if len(conv) > 1:  # a system message or earlier turns: the whole conversation the model saw
            row["messages"] = conv
        if i in preds:
            row["score"] = float(metric([preds[i]], [r]))
        if i in enc.overlong:
            row["overlong"] = action
        rows.append(row)
    score = float(metric(generated, [ex.refs[i] for i in kept]))
    summary = {"task": cfg.task or cfg.data, "metric": ex.metric, "score": score, "n": len(generated),
               "model_kind": kind, "template": fmt.name,
               "overlong": {"count": len(enc.overlong), "of": len(ex.prompts), "action": action, "context": context,
                            "max_new_tokens": cfg.max_new_tokens, "first": [ex.sources[i] for i in enc.overlong[:10]]},
               "config": asdict(cfg)}
    out = Path(cfg.out) if cfg.out else None
    if out:  # on disk now: the general score, the judge and the harness come later and can fail or hang
        write_outputs(out, summary, rows)
    if cfg.general:  # the suite's general domains, always in the reference format (comparable across models)
        g, per = general_ability(model, tokenizer, cfg.n_general, cfg.seed)
        summary.update(general_ability=g, general_per_domain=per)
    if cfg.judge_url:
        from .judge import JudgeConfig, judge

        jcfg = JudgeConfig(cfg.judge_url, cfg.judge_model, api_key_env=cfg.judge_key_env, timeout=cfg.judge_timeout,
                           retries=cfg.judge_retries)
        j = judge([question(ex.prompts[i]) for i in kept], [ex.refs[i] for i in kept], generated, jcfg)
        for i, grade, error in zip(kept, j.grades, j.errors):
            rows[i]["judge_grade"] = grade
            if error is not None:
                rows[i]["judge_error"] = error
        failures = [{"example": ex.sources[i], "error": e} for i, e in zip(kept, j.errors) if e is not None]
        # the count, and the first few errors; every example's error is in predictions.jsonl
        summary.update(judge_score=j.score, judge_unparsed=j.unparsed, judge_model=cfg.judge_model,
                       judge_failures={"count": len(failures), "of": len(kept), "first": failures[:10]})
    if out:
        write_outputs(out, summary, rows)
    if hcfg is not None:
        samples = _add_harness(summary, model, tokenizer, hcfg)
        if out:
            write_samples_and_summary(out, summary, samples)
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


def _add_harness(summary: dict, model, tokenizer, hcfg) -> dict:
    """Run the harness on the loaded model (as it is: an attached adapter stays attached) into ``summary``;
    returns its per-task samples."""
    from .harness import run_harness

    r = run_harness(model, tokenizer, hcfg)
    summary["harness"] = {"results": r["results"], "n": r["n"], "versions": r["versions"], "lm_eval": r["lm_eval"]}
    return r["samples"]


def write_samples_and_summary(out: Path, summary: dict, samples: dict) -> None:
    """One harness_<task>.jsonl per task, then summary.json."""
    from .harness import write_samples

    write_samples(out, samples)
    write_summary(out, summary)


def finite(obj, where: str = "", found: list | None = None):
    """``obj`` with every NaN or infinite number replaced by None (JSON has no such numbers: strict parsers
    reject the NaN/Infinity that json.dump writes by default); their paths are appended to ``found``."""
    if isinstance(obj, dict):
        return {k: finite(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):  # float, numpy floats
        if not math.isfinite(obj):
            if found is not None:
                found.append(where or "(value)")
            return None
        return float(obj)
    return obj


def json_line(row: dict) -> str:
    """One JSONL line with non-finite numbers as null, listed under the row's ``non_finite_as_null``."""
    found: list[str] = []
    row = finite(row, found=found)
    if found:
        row["non_finite_as_null"] = found
    return json.dumps(row, allow_nan=False) + "\n"


def write_summary(out: Path, summary: dict) -> None:
    found: list[str] = []
    clean = finite(summary, found=found)
    if found:
        clean["non_finite_as_null"] = found
    write_json_atomic(out / "summary.json", clean)


def write_outputs(out: Path, summary: dict, rows: list[dict]) -> None:
    """predictions.jsonl (one row per input, in order) and summary.json, each replaced whole (written
    beside, then renamed): they are rewritten as the judge and harness add to them."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        f.writelines(json_line(r) for r in rows)
    os.replace(tmp, out / "predictions.jsonl")
    write_summary(out, summary)
