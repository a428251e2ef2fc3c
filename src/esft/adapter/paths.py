"""Where an adapter may be read from: one rule for `esft serve` and the vLLM plugin.

An adapter directory must lie inside the adapter root (when one is set), and no link inside it may
lead out of the root, or, with no root, out of the adapter directory itself: reading an adapter
never reads files elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path


class AdapterPathError(ValueError):
    pass


def resolve_adapter_dir(path: str | Path, root: str | Path | None = None) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, if it is a directory that keeps the rule above."""
    root_r = Path(root).resolve() if root is not None else None
    p = Path(path)
    full = (p if p.is_absolute() or root_r is None else root_r / p).resolve()
    if root_r is not None and full != root_r and root_r not in full.parents:
        raise AdapterPathError(f"adapter path {str(path)!r} is outside the adapter root {str(root_r)!r}")
    if not full.is_dir():
        raise AdapterPathError(f"adapter path {str(path)!r} is not a directory")
    fence = root_r or full
    where = f"the adapter root {str(root_r)!r}" if root_r is not None else "the adapter directory"
    for here, dirs, files in os.walk(full):  # links are listed, never followed
        for name in dirs + files:
            entry = Path(here) / name
            if entry.is_symlink():
                target = entry.resolve()
                if target != fence and fence not in target.parents:
                    raise AdapterPathError(f"{entry.relative_to(full)} in adapter path {str(path)!r} is a link to "
                                           f"{str(target)!r}, outside {where}")
    return full
