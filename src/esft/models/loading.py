"""Loading a local Hugging Face checkpoint directory (never a hub download)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .registry import UnsupportedModelError, check_model_type, get_family, model_class, moe_layers


class CheckpointError(ValueError):
    """The model directory is missing, incomplete or unreadable."""


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU that has it, float32 otherwise (CPU bf16 matmuls are slow)."""
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be auto or one of {sorted(table)}, got {name!r}")
    return table[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The floating dtype most tensors of a checkpoint directory are stored in, read from the safetensors
    headers only (no weights are read); None when there are no safetensors files."""
    from collections import Counter

    from safetensors import safe_open

    counts: Counter = Counter()  # elements per dtype: the weights decide, not the many small scale tensors
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                dt = _FLOAT_DTYPES.get(sl.get_dtype())
                if dt is not None:
                    counts[dt] += math.prod(sl.get_shape())
    return counts.most_common(1)[0][0] if counts else None


def parse_device_map(spec) -> str | dict | None:
    """A device map from the command line: None, "auto"/"balanced"/"cpu"/"cuda:0"/..., a dict, or a JSON file.

    A JSON file holds {module name: device}, e.g. {"model.embed_tokens": 0, "model.layers.0": 0, ...,
    "model.layers.20": 1, "lm_head": 1} or "disk" for layers to offload (their weights stay on disk and
    are read at each forward; such layers can be profiled and run through, but not trained). When GPUs
    are in the map, accelerate also offloads "cpu" entries (kept in host RAM, moved per forward):
    trained experts must then be on a GPU.
    """
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        return spec
    spec = str(spec)
    if spec.endswith(".json"):
        f = Path(spec)
        if not f.is_file():
            raise CheckpointError(f"device map file {f} not found")
        try:
            dm = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f}: malformed device map JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(dm, dict) or not dm:
            raise CheckpointError(f"{f}: a device map must be a non-empty JSON object {{module: device}}")
        return dm
    return spec


def input_device(model) -> torch.device:
    """Where input ids must go: the device that runs the input embeddings (also when it is offloaded)."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return emb.weight.device


def load_model(path: str | os.PathLike, dtype: str = "auto", device: str = "auto", with_tokenizer: bool = True,
               device_map=None, offload_folder: str | None = None, distributed_config=None):
    """(model, tokenizer) from a local checkpoint directory; checks it is a supported MoE family.

    Weights are loaded straight onto their device(s): ``device_map`` (see :func:`parse_device_map`)
    spreads the model over several devices, otherwise everything goes to ``device``; transformers
    then places each tensor as it reads the shards, so no full copy of the model is held in host RAM
    first. ``dtype="auto"`` is bf16 when a CUDA device with bf16 is used, fp32 otherwise.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..embedded import resolve_model

    path = resolve_model(path)  # a shipped model's name ("small", "v2lite") or a directory
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    device = resolve_device(device)
    dm = parse_device_map(device_map)
    torch_dtype = resolve_dtype(dtype, device if dm is None else resolve_device("auto"))
    kwargs = {"device_map": dm if dm is not None else device}
    if distributed_config is not None:  # torchrun: transformers shards the model itself (FSDP2 / EP)
        kwargs = {"distributed_config": distributed_config}
    if isinstance(dm, dict) and "disk" in dm.values():
        kwargs["offload_folder"] = offload_folder or _offload_dir()
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        check_model_type(config)  # before loading any weight: a clear error for an unsupported family
        model = model_class(config).from_pretrained(str(path), dtype=torch_dtype, local_files_only=True, **kwargs)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: could not load the model: {e}") from e
    get_family(model)
    moe_layers(model)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: could not load the tokenizer: {e}") from e
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _offload_dir() -> str:
    """A private folder for weights a device map sends to "disk", removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="esft-offload-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d
