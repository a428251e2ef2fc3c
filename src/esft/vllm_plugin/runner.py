"""The three places where the plugin meets vLLM's engine (installed by ``register()`` in every vLLM process).

1. The model runner's ``load_model``: once the model is built, refuse a model with no MoE layer the
   plugin hooked (naming its class), then create the worker's adapter registry and load the start-up
   adapters.
2. The model runner's ``_prepare_inputs`` (where vLLM also lays out LoRA's token mapping): each step,
   each token's table row, from its request's ``extra_args["esft_adapter"]`` key, for the MoE layers.
3. ``Request.from_engine_core_request`` in the engine core: a request naming an adapter gets the
   cache salt ``esft-adapter:<key>`` (before any salt of its own), so the prefix cache, which keys blocks
   by salt, never gives one adapter's KV to another or to the base.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from . import config as esft_config
from .config import EXTRA_ARG, SALT_PREFIX
from .state import STATE

log = logging.getLogger("esft.vllm_plugin")


def adapter_key(sampling_params) -> str | None:
    extra = getattr(sampling_params, "extra_args", None) if sampling_params is not None else None
    if not extra:
        return None
    key = extra.get(EXTRA_ARG)
    return str(key) if key else None


def _after_load(runner) -> None:
    extra = getattr(runner.vllm_config, "additional_config", None) or {}
    if "esft" not in extra:
        return
    cfg = esft_config.EsftVllmConfig.from_dict(extra["esft"])
    model = runner.model
    cls = type(model).__name__
    from .experts import EsftRoutedExperts, EsftUnsupported

    layers = {n: l for n, l in STATE.layers.items() if isinstance(l, EsftRoutedExperts) and l.esft is not None}
    if not layers:
        archs = getattr(runner.model_config.hf_config, "architectures", None)
        raise EsftUnsupported(f"esft: model class {cls} ({archs}) builds no MoE layer through vLLM's fused MoE "
                              "(FusedMoEFactory / RoutedExperts), so the plugin cannot hook its experts; serve its "
                              "adapters merged (`esft merge`) instead")
    from .slots import Registry

    STATE.registry = Registry(layers, cfg.max_adapters, str(runner.model_config.model),
                              getattr(runner.model_config.hf_config, "model_type", None),
                              adapter_root=cfg.adapter_root, allow_other_base=cfg.allow_other_base,
                              base_fingerprint=cfg.base_fingerprint)
    r = layers[next(iter(layers))]
    log.info("esft: %s: %d MoE layers hooked, %d adapter slots each (%d base experts), %d adapter rows; slot "
             "memory %.1f MiB", cls, len(layers), r.num_slots, r.num_base_experts, cfg.max_adapters,
             sum(l.num_slots * (l.w13_weight[0].nbytes + l.w2_weight[0].nbytes) for l in layers.values()) / 2**20)
    for name, path in cfg.adapters.items():
        STATE.registry.load(name, path)


def _step_rows(runner, num_scheduled_tokens: np.ndarray) -> None:
    reg = STATE.registry
    if reg is None:
        return
    n = runner.input_batch.num_reqs
    keys = []
    for req_id in runner.input_batch.req_ids[:n]:
        st = runner.requests.get(req_id)
        keys.append(adapter_key(st.sampling_params) if st is not None else None)
    if reg.draining:
        reg.reap({adapter_key(s.sampling_params) for s in runner.requests.values()})
    if not any(keys):
        STATE.set_rows(None)
        return
    rows = np.zeros(n, dtype=np.int64)
    for i, k in enumerate(keys):
        r = reg.row(k)
        if r is None:
            log.error("esft: a request names adapter key %r, which this server does not hold (unloaded, or never "
                      "loaded); it runs on the base model", k)
            r = 0
        rows[i] = r
    STATE.set_rows(np.repeat(rows, num_scheduled_tokens[:n]))


def install() -> None:
    """Patch the runner(s) and the engine core's Request (idempotent)."""
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except Exception:  # noqa: BLE001 - a build without the CPU runner
        pass
    for cls in runners:
        if "load_model" in cls.__dict__ and not getattr(cls.__dict__["load_model"], "_esft", False):
            inner = cls.__dict__["load_model"]

            @functools.wraps(inner)
            def load_model(self, *a, _inner=inner, **kw):
                out = _inner(self, *a, **kw)
                if not getattr(self, "_esft_loaded", False):
                    self._esft_loaded = True
                    _after_load(self)
                return out

            load_model._esft = True
            cls.load_model = load_model
    if not getattr(GPUModelRunner._prepare_inputs, "_esft", False):
        inner = GPUModelRunner._prepare_inputs

        @functools.wraps(inner)
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *a, _inner=inner, **kw):
            out = _inner(self, scheduler_output, num_scheduled_tokens, *a, **kw)
            if STATE.enabled:
                _step_rows(self, num_scheduled_tokens)
            return out

        _prepare_inputs._esft = True
        GPUModelRunner._prepare_inputs = _prepare_inputs
    if not getattr(GPUModelRunner.execute_model, "_esft", False):
        inner = GPUModelRunner.execute_model

        @functools.wraps(inner)
        def execute_model(self, *a, _inner=inner, **kw):
            STATE.set_rows(None)  # a dummy or empty step must never see the last step's rows
            try:
                return _inner(self, *a, **kw)
            finally:
                STATE.set_rows(None)

        execute_model._esft = True
        GPUModelRunner.execute_model = execute_model
    raw = Request.__dict__["from_engine_core_request"]
    if not getattr(raw.__func__, "_esft", False):
        inner = raw.__func__

        def from_engine_core_request(cls, request, *a, _inner=inner, **kw):
            key = adapter_key(request.sampling_params)
            if key:
                import msgspec

                salt = SALT_PREFIX + key + (":" + request.cache_salt if request.cache_salt else "")
                request = msgspec.structs.replace(request, cache_salt=salt)
            return _inner(cls, request, *a, **kw)

        from_engine_core_request._esft = True
        Request.from_engine_core_request = classmethod(from_engine_core_request)
