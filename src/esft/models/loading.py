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


def check_device(name: str) -> None:
    """Refuse a device this machine does not have (before anything loads), naming what it has."""
    import re

    if name in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", str(name))
    if m is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA GPU visible to torch "
                         f"(torch {torch.__version__}); use device=cpu or auto")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def resolve_device(name: str) -> str:
    check_device(name)
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
    from transformers import AutoConfig

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
    check_safetensors(path)
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
    return model, (load_tokenizer(path) if with_tokenizer else None)


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer alone (seconds, no weights): data can be read and checked before the model."""
    from transformers import AutoTokenizer

    from ..embedded import resolve_model

    path = resolve_model(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: could not load the tokenizer: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def config_context(path: str | os.PathLike) -> int | None:
    """The model's context length from its config.json alone (``max_position_embeddings``), or None."""
    from ..embedded import resolve_model

    f = resolve_model(path) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f.parent}: not a Hugging Face checkpoint directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None
    for c in (cfg, cfg.get("text_config") or {}):
        n = c.get("max_position_embeddings") if isinstance(c, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse truncated or damaged ``*.safetensors`` files of a checkpoint directory, naming the file.

    Reads only each file's header and compares the byte ranges it promises with the file's size, so a
    copy cut short is found before transformers fails on it deep inside loading.
    """
    from ..adapter.shards import read_shard

    for f in sorted(Path(path).glob("*.safetensors")):
        read_shard(f)


def _offload_dir() -> str:
    """A private folder for weights a device map sends to "disk", removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="esft-offload-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d
