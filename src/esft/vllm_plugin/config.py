"""The plugin's settings, read from vLLM's own place for plugin settings: ``additional_config["esft"]``.

    vllm serve BASE --additional-config '{"esft": {"max_adapters": 8, "max_adapter_experts": 4,
                                                   "adapters": {"sql": "/adapters/sql"}}}'

Without an ``"esft"`` entry the plugin changes nothing: every MoE layer is vLLM's own, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXTRA_ARG = "esft_adapter"  # SamplingParams.extra_args key (the OpenAI body's vllm_xargs) naming the adapter
SALT_PREFIX = "esft-adapter:"  # cache_salt of an adapter's requests: its KV blocks never serve another adapter


@dataclass
class EsftVllmConfig:
    max_adapters: int = 64  # adapters loaded at once (table rows 1..max_adapters; row 0 is the base)
    max_adapter_experts: int | None = None  # slots per MoE layer (None: a quarter of the layer's experts, >= 4)
    adapters: dict[str, str] = field(default_factory=dict)  # loaded at start-up: name -> directory
    adapter_root: str | None = None  # adapters load only from directories under this one (None: anywhere)
    allow_other_base: bool = False  # skip the base-model fingerprint check (not recommended)
    # The served checkpoint's fingerprint (esft.adapter.fingerprint.checkpoint_fingerprint), computed where esft's
    # transformers runs (`esft serve --engine vllm` does); None: computed in the worker, if its transformers allows
    base_fingerprint: dict | None = None

    def __post_init__(self):
        if type(self.max_adapters) is not int or self.max_adapters < 1:
            raise ValueError(f"esft: max_adapters must be an integer >= 1, got {self.max_adapters!r}")
        if self.max_adapter_experts is not None and (type(self.max_adapter_experts) is not int
                                                     or self.max_adapter_experts < 1):
            raise ValueError(f"esft: max_adapter_experts must be an integer >= 1, got {self.max_adapter_experts!r}")
        if not isinstance(self.adapters, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in self.adapters.items()):
            raise ValueError(f"esft: adapters must map names to directories, got {self.adapters!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "EsftVllmConfig":
        if not isinstance(d, dict):
            raise ValueError(f"esft: additional_config['esft'] must be an object, got {d!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"esft: unknown setting(s) {unknown} in additional_config['esft'] (known: {sorted(known)})")
        return cls(**d)


def current() -> EsftVllmConfig | None:
    """The settings of the vLLM config being built or run, or None when the plugin is not switched on."""
    from vllm.config import get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    extra = getattr(vc, "additional_config", None) if vc is not None else None
    if not extra or "esft" not in extra:
        return None
    return EsftVllmConfig.from_dict(extra["esft"])


def default_slots(num_experts: int) -> int:
    """The same default as ``esft serve``: a quarter of the layer's experts, at least 4."""
    return max(4, num_experts // 4)
