"""One source of a data specification -> ``datasets`` tables, one per file, with rows that can be named.

Files are read by ``datasets`` (``load_dataset("json" | "parquet" | "csv" | "arrow")``, ``load_from_disk``),
which converts them to Arrow once and caches the result, and reads compressed JSON/CSV transparently.
Each file is opened on its own so that an error can name the file and its row: the 1-based line for
JSON-lines files, else the 1-based record number.
"""

from __future__ import annotations

import bz2
import glob as globlib
import gzip
import json
import logging
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import DataError
from .spec import Source

log = logging.getLogger(__name__)

COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
FILE_TYPES = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".tsv": "tsv", ".arrow": "arrow"}


@dataclass
class SourceFile:
    """One readable file (or a save_to_disk folder) of a source, and how to name its rows."""

    path: str
    kind: str  # json, parquet, csv, tsv, arrow, saved
    split: str | None = None
    _lines: list[int] | None = field(default=None, repr=False)  # JSON lines: each record's line (built on demand)

    def where(self, index: int) -> str:
        """Row ``index`` (0-based) as a user finds it: ``file:LINE`` (JSON lines, 1-based) or ``file record N``."""
        if self.kind == "json":
            if self._lines is None:
                self._lines = _jsonl_lines(self.path)
            if index < len(self._lines):
                return f"{self.path}:{self._lines[index]}"
        return f"{self.path} record {index + 1}"


def file_type(path: str) -> str | None:
    name = path.lower()
    for c in COMPRESSIONS:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    return FILE_TYPES.get(Path(name).suffix)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def resolve_files(src: Source) -> list[SourceFile]:
    """The files a source names: a file, a glob, a folder of files, or a save_to_disk folder."""
    p = Path(src.path)
    if any(c in src.path for c in "*?["):
        paths = sorted(x for x in globlib.glob(src.path, recursive=True) if Path(x).is_file())
        if not paths:
            raise DataError(f"{src.path}: the pattern matches no file")
    elif is_saved_dataset(p):
        return [SourceFile(str(p), "saved", src.split)]
    elif p.is_dir():
        paths = sorted(str(x) for x in p.rglob("*") if x.is_file() and file_type(str(x))
                       and not any(part.startswith(".") for part in x.relative_to(p).parts))
        if not paths:
            raise DataError(f"{p}: the folder holds no data file ({', '.join(sorted(FILE_TYPES))}, optionally "
                            f"{'/'.join(COMPRESSIONS)}-compressed) and is no save_to_disk folder")
    elif p.is_file():
        paths = [str(p)]
    else:
        raise DataError(f"{p}: not found")
    out = []
    for f in paths:
        kind = file_type(f)
        if kind is None:
            raise DataError(f"{f}: unknown file type; known: {', '.join(sorted(FILE_TYPES))} (JSON and CSV may be "
                            f"{'/'.join(COMPRESSIONS)}-compressed)")
        out.append(SourceFile(f, kind))
    return out


def cache_dir() -> str:
    """Where datasets' Arrow copies and esft's tokenized tables go (``ESFT_DATA_CACHE``, else datasets' own)."""
    import datasets

    return os.environ.get("ESFT_DATA_CACHE") or str(Path(datasets.config.HF_DATASETS_CACHE) / "esft")


def open_file(f: SourceFile, streaming: bool = False):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when streaming) of the file's raw rows."""
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors are re-raised below, naming the file
    datasets.disable_progress_bars()
    try:
        if f.kind == "saved":
            ds = datasets.load_from_disk(f.path)
            if isinstance(ds, datasets.DatasetDict):
                split = f.split or ("train" if "train" in ds else None)
                if split not in ds:
                    raise DataError(f"{f.path}: holds the splits {sorted(ds)}; pick one with 'split' in the source")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        builder, kwargs = {"tsv": ("csv", {"sep": "\t"})}.get(f.kind, (f.kind, {}))
        if f.kind in ("csv", "tsv"):
            kwargs["keep_default_na"] = False  # an empty cell is "", not None (Alpaca's empty input)
        return datasets.load_dataset(builder, data_files=[f.path], split="train", streaming=streaming,
                                     cache_dir=None if streaming else cache_dir(), **kwargs)
    except DataError:
        raise
    except Exception as e:  # pyarrow, pandas, gzip and datasets' own errors: say which file, and why
        raise DataError(_reason(f, e)) from None


def _reason(f: SourceFile, e: Exception) -> str:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the real error
        cause = cause.__cause__ or cause.__context__
    if f.kind in ("json", "csv", "tsv") and _blank(f.path):
        return f"{f.path}: empty dataset (no rows)"
    if f.kind == "json":
        bad = _first_bad_json(f.path)
        if bad:
            return f"{f.path}{bad}"
    text = str(cause).strip().splitlines()
    return f"{f.path}: cannot be read as {f.kind}: {type(cause).__name__}: {text[0] if text else ''}"


def _open_text(path: str):
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        import io

        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _blank(path: str) -> bool:
    try:
        with _open_text(path) as fh:
            return not any(line.strip() for line in fh)
    except Exception:
        return False


def _first_bad_json(path: str) -> str | None:
    """Why a JSON file failed, as ``:LINE: reason`` (or ``: reason``): decoding, a malformed line, or a
    string no tokenizer can take (a lone UTF-16 surrogate escape, valid JSON but not text)."""
    magic = {b"\x1f\x8b": ".gz", b"BZh": ".bz2", b"\x28\xb5\x2f\xfd": ".zst", b"\xfd7zXZ": ".xz"}
    with open(path, "rb") as fh:
        start = fh.read(6)
    for sig, ext in magic.items():
        if start.startswith(sig) and not path.lower().endswith(ext):
            return f": the file is {ext[1:]}-compressed but not named so; rename it to end in {ext}"
    try:
        with _open_binary(path) as fh:
            head = fh.read(1)
            while head.isspace():
                head = fh.read(1)
        if head == b"[":
            with _open_text(path) as fh:  # one JSON array: parse it whole for the position
                try:
                    json.loads(fh.read())
                except json.JSONDecodeError as e:
                    return f":{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
                return None
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    return f":{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return f":{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                try:
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    return (f":{lineno}: a string holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is not "
                            "text; fix or drop that line")
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as e:
        return f": cannot be read: {type(e).__name__}: {e} (a damaged or mislabelled compressed file?)"
    except Exception as e:  # zstandard's errors
        return f": cannot be read: {type(e).__name__}: {e}"
    return None


def _open_binary(path: str):
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        import io

        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _jsonl_lines(path: str) -> list[int]:
    """The 1-based line of each record of a JSON-lines file (blank lines skipped); [] for a JSON array."""
    lines = []
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                s = line.strip()
                if not s:
                    continue
                if not lines and s.startswith("["):
                    return []
                lines.append(lineno)
    except Exception:  # only for messages: the record number is used instead
        return []
    return lines
