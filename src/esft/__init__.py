"""Expert-Specialized Fine-Tuning (ESFT) for Mixture-of-Experts language models.

The Python API mirrors the CLI's steps (imported lazily, so ``import esft`` is cheap)::

    from esft import load_model, profile_routing, select_experts, apply_esft, train
    from esft import save_adapter, read_adapter, attach_adapter, merge_adapter, merge_to_checkpoint
"""

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version


def package_version() -> str:
    """The installed distribution's version (importlib.metadata); ``__version__`` when esft runs from a
    source tree that was never installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("esft")
    except PackageNotFoundError:
        return __version__


_API = {
    "load_model": "esft.models.loading",
    "moe_layers": "esft.models.registry",
    "FAMILIES": "esft.models.registry",
    "ProfileConfig": "esft.profiling.run",
    "run_profile": "esft.profiling.run",
    "profile_routing": "esft.profiling.profiler",
    "tune_router": "esft.profiling.router_stage",
    "RouterObserver": "esft.profiling.profiler",
    "SelectConfig": "esft.selection.select",
    "select_experts": "esft.selection.select",
    "expert_config": "esft.selection.select",
    "read_scores": "esft.selection.select",
    "read_expert_config": "esft.selection.select",
    "apply_esft": "esft.training.experts",
    "unwrap_esft": "esft.training.experts",
    "ESFTExperts": "esft.training.experts",
    "TrainConfig": "esft.training.config",
    "MasterWeights": "esft.training.precision",
    "checkpoint_fingerprint": "esft.adapter.fingerprint",
    "merge_checkpoint": "esft.adapter.merge",
    "train": "esft.training.recipe",
    "save_adapter": "esft.adapter.io",
    "read_adapter": "esft.adapter.io",
    "attach_adapter": "esft.adapter.io",
    "merge_adapter": "esft.adapter.io",
    "merge_to_checkpoint": "esft.adapter.io",
    "model_fingerprint": "esft.adapter.fingerprint",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'esft' has no attribute {name!r}")


__all__ = sorted(_API)
