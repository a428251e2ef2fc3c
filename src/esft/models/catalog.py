"""Every model type of the installed transformers with fused routed experts, and whether esft supports it.

A model type counts when its modeling code defines the fused-experts convention (a 3-D ``gate_up_proj``
``nn.Parameter``); its status is "supported" when ``families.NOTES`` has an entry without a reason
against it, else "not supported" with the reason (``check=True`` also builds each supported type's
tiny config on the meta device and reads its MoE structure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .families import NOTES

_FUSED = re.compile(r"gate_up_proj\s*=\s*nn\.Parameter\(")


@dataclass(frozen=True)
class FamilyStatus:
    model_type: str
    supported: bool
    reason: str  # why not; "" when supported
    gate: str = ""
    examples: str = ""


def fused_expert_model_types() -> list[str]:
    """Model types whose transformers modeling code defines fused experts (read from the installed source)."""
    import transformers

    root = Path(transformers.__file__).parent / "models"
    return sorted({f.parent.name for f in root.glob("*/modeling_*.py") if _FUSED.search(f.read_text(errors="ignore"))})


def family_status(check: bool = False) -> list[FamilyStatus]:
    out = []
    for t in fused_expert_model_types():
        notes = NOTES.get(t)
        if notes is None:
            out.append(FamilyStatus(t, False, "no family entry: its router's gate function has not been checked"))
        elif notes.unsupported:
            out.append(FamilyStatus(t, False, notes.unsupported))
        else:
            reason = _structure_problem(t) if check else ""
            out.append(FamilyStatus(t, not reason, reason, notes.gate, notes.examples))
    return out


def _structure_problem(model_type: str) -> str:
    from .registry import UnsupportedModelError, get_family, meta_model, moe_layers
    from .tiny import tiny_config

    try:
        model = meta_model(tiny_config(model_type))
        get_family(model)
        moe_layers(model)
    except (UnsupportedModelError, ValueError, TypeError, RuntimeError) as e:
        return f"structure not found on a tiny config: {e}"
    return ""
