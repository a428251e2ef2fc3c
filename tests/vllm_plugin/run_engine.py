"""One vLLM engine in its own process, driven by a JSON job; the tests compare the results of several.

    python run_engine.py JOB.json OUT.json

JOB: {"model": DIR, "esft": {plugin settings} | null, "dtype": "float32", "steps": [...]} with steps
    {"load": NAME, "path": DIR}              -> {"key": KEY} or {"error": message}
    {"unload": NAME}                         -> {"freed": bool} or {"error": message}
    {"adapters": true}                       -> the worker's listing
    {"generate": [{"prompt": str, "adapter": NAME|null}, ...], "max_tokens": N}
                                             -> [{"tokens": [...], "logprobs": [{id: lp}, ...]}, ...], all in one
                                                llm.generate call (one concurrent, mixed batch)
    {"overlap_unload": NAME, "generate": [...]} -> generate with the engine stepped by hand, unloading NAME
                                                after the first step (requests of NAME in flight)
A start-up failure is written as {"startup_error": message}. Each engine runs in its own process because
vLLM's worker processes and global state are not meant to be torn down and rebuilt in one.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# The engine core in this process: llm.generate() adds all its requests before the first engine step, so
# they are scheduled together, the same way in every run. With the core in its own process (vLLM's default)
# it may start a step before the last request arrives, and how the batch is split then depends on timing;
# on a kernel that is not batch-invariant (DeepSeek-V2's CPU MLA path) results then vary from run to run.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _result(out) -> dict:
    c = out.outputs[0]
    lps = [{str(t): float(lp.logprob) for t, lp in d.items()} for d in (c.logprobs or [])]
    return {"tokens": list(c.token_ids), "text": c.text, "logprobs": lps}


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    from vllm import LLM, SamplingParams

    from esft.vllm_plugin import offline

    kw = dict(dtype=job.get("dtype", "float32"), max_model_len=job.get("max_model_len", 512),
              max_num_seqs=job.get("max_num_seqs", 32), seed=0, enforce_eager=job.get("enforce_eager", True),
              enable_prefix_caching=job.get("prefix_caching", True))
    results: list = []
    try:
        if job.get("esft") is not None:
            llm = LLM(**offline.engine_args(job["model"], **job["esft"], **kw))
        else:
            llm = LLM(model=job["model"], **kw)
    except Exception as e:  # noqa: BLE001 - reported to the test
        json.dump({"startup_error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}, open(out_path, "w"))
        return
    keys: dict[str, str] = {}
    for step in job["steps"]:
        try:
            if "load" in step:
                keys[step["load"]] = offline.load_adapter(llm, step["load"], step["path"],
                                                          step.get("allow_other_base"))
                results.append({"key": keys[step["load"]]})
            elif "unload" in step:
                results.append({"freed": offline.unload_adapter(llm, step["unload"])})
            elif "adapters" in step:
                results.append(offline.adapters(llm))
            elif "generate" in step:
                def params(r):
                    key = keys.get(r["adapter"], r["adapter"]) if r.get("adapter") else None
                    p = dict(max_tokens=step.get("max_tokens", 16), temperature=0.0, logprobs=step.get("logprobs", 5),
                             ignore_eos=True)
                    return offline.sampling(key, **p) if job.get("esft") is not None else SamplingParams(**p)

                reqs = step["generate"]
                if "overlap_unload" in step:
                    results.append(_overlap(llm, reqs, [params(r) for r in reqs], step["overlap_unload"]))
                else:
                    outs = llm.generate([r["prompt"] for r in reqs], [params(r) for r in reqs], use_tqdm=False)
                    results.append([_result(o) for o in outs])
        except Exception as e:  # noqa: BLE001 - reported to the test
            results.append({"error": f"{type(e).__name__}: {e}"})
    json.dump({"results": results}, open(out_path, "w"))
    # os._exit alone would orphan the engine-core and worker processes (they outlive this one): shut them down
    llm.llm_engine.engine_core.shutdown()


def _overlap(llm, prompts_reqs, params, name):
    """Step the engine by hand; unload ``name`` once its requests are running, then finish every request."""
    from esft.vllm_plugin import offline

    eng = llm.llm_engine
    for i, (r, p) in enumerate(zip(prompts_reqs, params)):
        eng.add_request(str(i), r["prompt"], p)
    done, steps, unloaded = {}, 0, None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = _result(o)
        steps += 1
        if steps == 2 and unloaded is None:
            unloaded = offline.unload_adapter(llm, name)
    return {"outputs": [done[str(i)] for i in range(len(prompts_reqs))], "freed_at_unload": unloaded,
            "after": offline.adapters(llm)}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
