"""The shipped models: small DeepSeek-V2-architecture MoEs that come with the package.

Each is pretrained from scratch on the general domains of :mod:`esft.tasks` by
``python -m esft.embedded.pretrain`` and lives in ``esft/embedded/<dir>/`` as an ordinary
Hugging Face checkpoint directory (AutoModelForCausalLM / AutoTokenizer load it offline).
Wherever a command takes a model directory, the names below select a shipped model instead
(a directory of that name in the working directory wins).

- ``small`` (the default): 1 dense + 3 MoE layers, 32 routed experts, top-4, 1 shared.
- ``v2lite``: DeepSeek-V2-Lite's proportions: 1 dense + 8 MoE layers, 64 fine-grained routed
  experts, top-6, 2 shared.
- ``small-lfb``: ``small``'s shape, data and schedule, balanced by Loss-Free Balancing instead of an
  auxiliary loss, hence DeepSeek-V3's router (sigmoid gating with ``e_score_correction_bias``).
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
SHIPPED = {"small": MODEL_DIR, "v2lite": MODEL_DIR.parent / "model_v2lite", "small-lfb": MODEL_DIR.parent / "model_lfb"}
REBUILD = "python -m esft.embedded.pretrain --out src/esft/embedded/model   (about 22 minutes on a 2-core CPU)"
REBUILD_BY_NAME = {  # keyed by directory name, so a copy of a shipped directory still says how to rebuild it
    "model": REBUILD,
    "model_v2lite": "python -m esft.embedded.pretrain --shape v2lite --threads 2 --out src/esft/embedded/model_v2lite"
                       "   (about 2 hours on a 2-core CPU; resumable)",
    "model_lfb": "python -m esft.embedded.pretrain --balance loss-free --out src/esft/embedded/model_lfb"
                 "   (about 25 minutes on a 2-core CPU; resumable)",
}
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class EmbeddedModelError(RuntimeError):
    pass


def embedded_model_dir(path: str | Path | None = None) -> Path:
    """The shipped checkpoint directory, checked to be complete and readable."""
    d = Path(path) if path else MODEL_DIR
    rebuild = REBUILD_BY_NAME.get(d.name, REBUILD)
    missing = [f for f in REQUIRED if not (d / f).is_file()]
    if missing:
        raise EmbeddedModelError(f"the shipped model at {d} is missing {missing}; rebuild it with:\n  {rebuild}")
    try:
        json.loads((d / "config.json").read_text())
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as e:  # any damage: JSON, safetensors header, truncated file
        raise EmbeddedModelError(f"the shipped model at {d} is corrupted ({e}); rebuild it with:\n  {rebuild}") from None
    return d


def resolve_model(value: str | Path | None) -> Path:
    """A model argument as a directory: None -> the default shipped model; an existing path -> itself;
    a shipped model's name (``small``, ``v2lite``) -> its checked directory; anything else -> the path
    as given (loading it then says what is wrong)."""
    if value is None:
        return embedded_model_dir()
    p = Path(value)
    if not p.exists() and str(value) in SHIPPED:
        return embedded_model_dir(SHIPPED[str(value)])
    return p
