"""Worker extension (``worker_extension_cls``): adapter loading over vLLM's ``collective_rpc``.

    llm.collective_rpc("esft_load", args=("sql", "/adapters/sql"))   -> ["sql@3"] (one per worker)
    llm.collective_rpc("esft_unload", args=("sql",))
    llm.collective_rpc("esft_adapters")

Errors come back as ``{"error": message}`` rather than exceptions, so a bad adapter never takes the
engine down; the callers (http.py, offline.py) turn them into 4xx answers or exceptions.
"""

from __future__ import annotations

from .runner import adapter_key
from .state import STATE


class EsftWorkerExtension:
    def _esft_registry(self):
        if STATE.registry is None:
            raise RuntimeError("esft: the plugin is not switched on in this engine (additional_config['esft'])")
        return STATE.registry

    def esft_load(self, name: str, path: str, allow_other_base: bool | None = None):
        from .slots import EsftAdapterError

        try:
            return {"key": self._esft_registry().load(name, path, allow_other_base)}
        except (EsftAdapterError, RuntimeError) as e:
            return {"error": str(e), "status": 400}

    def esft_unload(self, name: str):
        reg = self._esft_registry()
        runner = self.model_runner
        in_use = {adapter_key(s.sampling_params) for s in runner.requests.values()}
        try:
            freed = reg.unload(name, in_use)
        except KeyError as e:
            return {"error": e.args[0], "status": 404}
        return {"freed": freed}

    def esft_adapters(self):
        return self._esft_registry().listing()
