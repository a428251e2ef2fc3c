"""ESFT adapters on vLLM: many full-expert adapters over one base model, in one batch.

``register()`` is the ``vllm.general_plugins`` entry point (pyproject.toml), run by vLLM in each of its
processes. It swaps vLLM's ``RoutedExperts`` for ``EsftRoutedExperts`` (experts.py: adapter slots and the
[adapters, experts] table) and hooks the model runner and the engine core (runner.py). All of it stays
inert unless the vLLM config carries ``additional_config={"esft": {...}}`` (config.py).

    worker.py   the worker extension: esft_load / esft_unload / esft_adapters over collective_rpc
    slots.py    reading, checking and placing adapters (the project's adapter/io.py and fingerprint.py)
    http.py     the OpenAI server's middleware: the ``model`` name picks the adapter, 404s, admin routes
    serve.py    ``esft serve --engine vllm``: the vLLM OpenAI server with all of the above
    offline.py  the same for ``vllm.LLM`` in Python
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from .experts import EsftRoutedExperts
    from .runner import install

    RoutedExperts.register_oot(EsftRoutedExperts, name="RoutedExperts")
    install()


WORKER_EXTENSION = "esft.vllm_plugin.worker.EsftWorkerExtension"
MIDDLEWARE = "esft.vllm_plugin.http.EsftMiddleware"
