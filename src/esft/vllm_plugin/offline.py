"""ESFT adapters with ``vllm.LLM`` in Python.

    from vllm import LLM, SamplingParams
    from esft.vllm_plugin import offline

    llm = LLM(**offline.engine_args("base/", max_adapters=8, max_adapter_experts=4))
    key = offline.load_adapter(llm, "sql", "adapters/sql")          # "sql@1"
    llm.generate(prompts, [offline.sampling(key, max_tokens=32, temperature=0), ...])
    offline.unload_adapter(llm, "sql")
"""

from __future__ import annotations

from . import MIDDLEWARE, WORKER_EXTENSION  # noqa: F401
from .config import EXTRA_ARG, EsftVllmConfig


def engine_args(model: str, max_adapters: int = 64, max_adapter_experts: int | None = None,
                adapters: dict[str, str] | None = None, base_fingerprint: dict | None = None,
                adapter_root: str | None = None, allow_other_base: bool = False, **kw) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs`` with the plugin switched on."""
    cfg = EsftVllmConfig(max_adapters=max_adapters, max_adapter_experts=max_adapter_experts,
                         adapters=dict(adapters or {}), adapter_root=adapter_root, allow_other_base=allow_other_base,
                         base_fingerprint=base_fingerprint)
    extra = dict(kw.pop("additional_config", None) or {})
    extra["esft"] = {k: v for k, v in vars(cfg).items()}
    return {"model": model, "additional_config": extra, "worker_extension_cls": WORKER_EXTENSION, **kw}


class EsftError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _one(results: list) -> dict:
    r = results[0]  # every worker (tensor-parallel rank) answers alike
    if isinstance(r, dict) and "error" in r:
        raise EsftError(r["error"], r.get("status", 400))
    return r


def load_adapter(llm, name: str, path: str, allow_other_base: bool | None = None) -> str:
    """Load an adapter while serving; returns the key its requests carry (``sampling(key)``)."""
    return _one(llm.collective_rpc("esft_load", args=(name, str(path), allow_other_base)))["key"]


def unload_adapter(llm, name: str) -> bool:
    """Unroute ``name``; its slots are freed once its requests in flight end. True if freed at once."""
    return _one(llm.collective_rpc("esft_unload", args=(name,)))["freed"]


def adapters(llm) -> dict:
    return _one(llm.collective_rpc("esft_adapters"))


def sampling(key: str | None, **kw):
    """``SamplingParams`` for a request on adapter ``key`` (None: the base model)."""
    from vllm import SamplingParams

    extra = dict(kw.pop("extra_args", None) or {})
    if key:
        extra[EXTRA_ARG] = key
    return SamplingParams(extra_args=extra or None, **kw)
