"""The data specification every command takes: one source, or a mixture of sources.

A specification is one of

* a path: a file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ``.tsv``, ``.arrow``; JSON and CSV may be
  ``.gz`` / ``.bz2`` / ``.zst`` / ``.xz`` compressed), a glob (``data/*.jsonl``), a folder of such files,
  or a folder written by ``datasets``' ``save_to_disk``;
* a YAML file (``.yaml`` / ``.yml``) holding a list of sources (or ``{sources: [...]}``), whose relative
  paths are read from the YAML file's folder;
* in a YAML config, the list itself::

      train_data:
        - path: chats.jsonl                      # layout detected per source
        - path: alpaca.json.gz
          weight: 0.5                            # half its rows (a fixed subsample); 2 = each row twice
        - path: dialogs.parquet
          format: messages                       # or sharegpt, alpaca, prompt_completion, text, prompt_answers
          columns: {messages: dialog}            # internal name: the file's column
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..io import DataError

SOURCE_KEYS = ("path", "format", "columns", "weight", "split")


@dataclass
class Source:
    path: str
    format: str | None = None  # layout; None: detected from the columns
    columns: dict[str, str] = field(default_factory=dict)  # internal name -> the data's column
    weight: float = 1.0  # share of the source's rows taken (a fixed subsample below 1, repeats above)
    split: str | None = None  # for a save_to_disk folder holding several splits

    def describe(self) -> str:
        extra = [f"format={self.format}"] if self.format else []
        extra += [f"columns={self.columns}"] if self.columns else []
        extra += [f"weight={self.weight:g}"] if self.weight != 1 else []
        return self.path + (f" ({', '.join(extra)})" if extra else "")


def parse_spec(spec, data_format: str | None = None, what: str = "data") -> list[Source]:
    """A data specification (see the module docstring) -> its sources, every field checked."""
    from .layouts import LAYOUTS

    if data_format is not None and data_format not in LAYOUTS:
        raise DataError(f"data_format {data_format!r} is not a known layout; known: {', '.join(LAYOUTS)}")
    if spec is None or spec == "" or spec == []:
        raise DataError(f"{what}: no data given")
    base = Path(".")
    if isinstance(spec, (str, Path)) and str(spec).endswith((".yaml", ".yml")):
        base, spec = _read_yaml(Path(spec), what)
    items = spec if isinstance(spec, list) else [spec]
    sources = [_source(item, i, data_format, base, what, LAYOUTS) for i, item in enumerate(items)]
    if len(sources) > 1 and not any(s.weight > 0 for s in sources):
        raise DataError(f"{what}: every source has weight 0, so there is no data")
    return sources


def _read_yaml(path: Path, what: str):
    from ..config import load_yaml

    if not path.is_file():
        raise DataError(f"{what}: {path} not found (a YAML list of data sources)")
    try:
        spec = load_yaml(path.read_text())
    except Exception as e:  # yaml.YAMLError and decoding errors alike
        raise DataError(f"{path}: invalid YAML ({e})") from None
    if isinstance(spec, dict) and set(spec) == {"sources"}:
        spec = spec["sources"]
    if not isinstance(spec, list) or not spec:
        raise DataError(f"{path}: expected a list of data sources (or {{sources: [...]}}), found "
                        f"{type(spec).__name__}")
    return path.parent, spec


def _source(item, i: int, data_format, base: Path, what: str, layouts) -> Source:
    where = f"{what} source {i + 1}"
    if isinstance(item, (str, Path)):
        item = {"path": str(item)}
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a path or a mapping with keys {', '.join(SOURCE_KEYS)}, found "
                        f"{type(item).__name__} {item!r:.60}")
    unknown = sorted(set(item) - set(SOURCE_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; a source has {', '.join(SOURCE_KEYS)}")
    path = item.get("path")
    if not isinstance(path, str) or not path:
        raise DataError(f"{where}: 'path' must be a non-empty string, found {path!r}")
    fmt = item.get("format", data_format)
    if fmt is not None and fmt not in layouts:
        raise DataError(f"{where}: format {fmt!r} is not a known layout; known: {', '.join(layouts)}")
    columns = item.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise DataError(f"{where}: 'columns' must map internal names to column names (strings), found {columns!r}")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise DataError(f"{where}: 'weight' must be a finite number >= 0, found {weight!r}")
    split = item.get("split")
    if split is not None and not isinstance(split, str):
        raise DataError(f"{where}: 'split' must be a string, found {split!r}")
    p = Path(path).expanduser()
    if not p.is_absolute() and base != Path("."):
        p = base / p
    return Source(path=str(p), format=fmt, columns=dict(columns), weight=float(weight), split=split)


def spec_paths(spec) -> list[str]:
    """The files and folders a specification reads (for the output-vs-input checks), without reading them."""
    try:
        sources = parse_spec(spec)
    except DataError:
        return [str(spec)] if isinstance(spec, (str, Path)) else []
    out = [str(spec)] if isinstance(spec, (str, Path)) and str(spec).endswith((".yaml", ".yml")) else []
    for s in sources:
        if any(c in s.path for c in "*?["):
            out += [str(p) for p in sorted(Path().glob(s.path))] if not Path(s.path).is_absolute() else \
                [str(p) for p in sorted(Path("/").glob(s.path.lstrip("/")))]
        else:
            out.append(s.path)
    return out
