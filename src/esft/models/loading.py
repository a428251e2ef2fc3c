"""Loading a local Hugging Face checkpoint directory (never a hub download)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .registry import get_family, moe_layers


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


def load_model(path: str | os.PathLike, dtype: str = "auto", device: str = "auto", with_tokenizer: bool = True):
    """(model, tokenizer) from a local checkpoint directory; checks it is a supported MoE family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: could not load the model: {e}") from e
    get_family(model)
    moe_layers(model)
    model.to(device)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: could not load the tokenizer: {e}") from e
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
