"""The embedded default: a small DeepSeek-V2-architecture MoE that ships with the package.

It is pretrained from scratch on the general domains of :mod:`esft.tasks` by
``python -m esft.embedded.pretrain`` and lives in ``esft/embedded/model/`` as an ordinary
Hugging Face checkpoint directory (AutoModelForCausalLM / AutoTokenizer load it offline).
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
REBUILD = "python -m esft.embedded.pretrain --out src/esft/embedded/model   (about 22 minutes on a 2-core CPU)"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class EmbeddedModelError(RuntimeError):
    pass


def embedded_model_dir(path: str | Path | None = None) -> Path:
    """The shipped checkpoint directory, checked to be complete and readable."""
    d = Path(path) if path else MODEL_DIR
    missing = [f for f in REQUIRED if not (d / f).is_file()]
    if missing:
        raise EmbeddedModelError(f"the shipped model at {d} is missing {missing}; rebuild it with:\n  {REBUILD}")
    try:
        json.loads((d / "config.json").read_text())
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as e:  # any damage: JSON, safetensors header, truncated file
        raise EmbeddedModelError(f"the shipped model at {d} is corrupted ({e}); rebuild it with:\n  {REBUILD}") from None
    return d
