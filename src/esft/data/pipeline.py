"""Specification -> sources -> files -> rows -> conversations -> token ids and labels, through ``datasets``.

    parse_spec (spec.py) -> resolve_files / open_file (sources.py) -> detect + convert (layouts.py)
    -> encode (conversations.py) -> Examples, with per-source counts (DataStats)

Tokenization runs as ``Dataset.map`` (``num_proc`` workers), written to esft's data cache
(:func:`sources.cache_dir`) under a fingerprint of everything that decides the result: the file's own
fingerprint, layout, column mapping, template, the tokenizer (vocabulary, special tokens, chat
template) and the source code of the conversion itself. A second run with the same inputs reads the
cached table instead of tokenizing again; changing any of them (or this code) starts afresh.

Every row is converted before the caller loads any model. A bad row stops the read with an error naming
the file, the row (``file:LINE`` for JSON lines, 1-based; else ``file record N``, 1-based), the field and
what was expected against what was found; ``skip_bad_rows`` instead drops such rows and counts them by
reason (DataStats.skipped), which every command prints.

Streaming (``streaming=True``) reads rows lazily (``IterableDataset``), so memory does not grow with
the data: profiling stops at its token budget, training at the rows its steps consume (``max_examples``).
Source weights are then sampling probabilities (``interleave_datasets``) instead of row shares.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..io import DataError
from . import conversations, layouts
from .conversations import Example, encode
from .layouts import Conversation, convert, detect, row_layout
from .sources import SourceFile, cache_dir, open_file, resolve_files
from .spec import Source, parse_spec

log = logging.getLogger(__name__)
PLACEHOLDER = "\x00row\x00"  # replaced by the row's location only when an error is reported (finding a line costs a scan)


@dataclass
class SourceStats:
    path: str
    layout: str
    rows: int = 0  # rows read
    skipped: int = 0  # bad rows dropped (skip_bad_rows)
    taken: int = 0  # examples after the weight
    weight: float = 1.0


@dataclass
class DataStats:
    sources: list[SourceStats] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows

    @property
    def examples(self) -> int:
        return sum(s.taken for s in self.sources)

    def describe(self) -> str:
        parts = [f"{s.path} [{s.layout}]: {s.rows} rows" + (f", {s.skipped} skipped" if s.skipped else "")
                 + (f", weight {s.weight:g} -> {s.taken}" if s.weight != 1 else "") for s in self.sources]
        text = "; ".join(parts)
        if self.skipped:
            text += " | skipped rows by reason: " + "; ".join(f"{n} x {r}" for r, n in self.skipped.most_common())
        return text


@dataclass
class TokenTable:
    """Every example's tokens, concatenated: what packing reads without a Python object per token.

    ids, labels: [T] int64 (all examples back to back); offsets: [N + 1], example i is offsets[i]:offsets[i+1].
    """

    ids: "np.ndarray"
    labels: "np.ndarray"
    offsets: "np.ndarray"
    source: list[str] = field(default_factory=list)  # per example, the file it came from

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> "np.ndarray":
        return self.offsets[1:] - self.offsets[:-1]

    def example(self, i: int) -> Example:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Example(self.ids[a:b].tolist(), self.labels[a:b].tolist(), self.source[i] if self.source else "")

    @staticmethod
    def concat(tables: list["TokenTable"]) -> "TokenTable":
        import numpy as np

        shift = np.cumsum([0] + [int(t.offsets[-1]) for t in tables[:-1]])
        return TokenTable(np.concatenate([t.ids for t in tables]), np.concatenate([t.labels for t in tables]),
                          np.concatenate([[0]] + [t.offsets[1:] + k for t, k in zip(tables, shift)]).astype(np.int64),
                          [s for t in tables for s in t.source])


@dataclass
class DataResult:
    stats: DataStats
    table: TokenTable | None = None  # read whole (the default)
    stream: object = None  # streaming: a generator of Examples, read as they are consumed

    @property
    def examples(self):
        """The examples: the stream when streaming, else a list built from the table (for small data and tests)."""
        if self.stream is not None:
            return self.stream
        return [self.table.example(i) for i in range(len(self.table))]


# ---------------------------------------------------------------- reading rows

def _layout_of(ds, f: SourceFile, src: Source) -> tuple[str, bool]:
    """(layout, whether each row must be checked to match it): named, or detected from the first row."""
    if src.format:
        return src.format, False
    columns = list(ds.column_names or [])
    first = next(iter(ds.take(1)), None)
    if first is None:
        raise DataError(f"{f.path}: empty dataset (no rows)")
    found = row_layout(first, src.columns)
    if found is None:
        detect(columns, src.columns, f.path)  # raises, listing columns and layouts
    return found, True


def _check_row(row: dict, layout: str, mapping: dict, where: str) -> None:
    found = row_layout(row, mapping)
    if found != layout:
        raise DataError(f"{where}: this row is in the {found or 'an unknown'} layout, while the source's first row "
                        f"is {layout}; a source holds one layout (split it into two sources, or name the layout "
                        f"with format= to convert every row as {layout})")


def _locate(e: DataError, f: SourceFile, index: int) -> DataError:
    return DataError(str(e).replace(PLACEHOLDER, f.where(index)))


def iter_conversations(spec, data_format: str | None = None, skip_bad_rows: bool = False,
                       limit: int | None = None, what: str = "data", stats: DataStats | None = None):
    """Conversations of a specification, in order, converted row by row (no tokenizer; for eval and
    inspection); stops after ``limit``. Weights are ignored here (every row once)."""
    stats = stats if stats is not None else DataStats()
    n = 0
    for src in parse_spec(spec, data_format, what):
        for f in resolve_files(src):
            ds = open_file(f, streaming=True)
            layout, check = _layout_of(ds, f, src)
            st = SourceStats(f.path, layout, weight=src.weight)
            stats.sources.append(st)
            for i, row in enumerate(ds):
                st.rows += 1
                try:
                    if check:
                        _check_row(row, layout, src.columns, PLACEHOLDER)
                    conv = convert(row, layout, src.columns, PLACEHOLDER)
                except DataError as e:
                    e = _locate(e, f, i)
                    if not skip_bad_rows:
                        raise e from None
                    st.skipped += 1
                    stats.skipped[_reason(str(e))] += 1
                    continue
                conv.source = f.where(i)
                st.taken += 1
                yield conv
                n += 1
                if limit is not None and n >= limit:
                    return


def _reason(message: str) -> str:
    """An error message without its location, for counting skipped rows by kind."""
    head, sep, tail = message.partition(": ")
    text = tail if sep else message
    return text if len(text) <= 100 else text[:97] + "..."


# ---------------------------------------------------------------- tokenizing through datasets.map

def _tokenize(batch: dict, indices: list[int], *, layout: str, mapping: dict, check: bool, tokenizer, template: str,
              mask_prompt: bool, skip_bad: bool, path: str, kind: str) -> dict:
    """datasets.map function (batched): rows -> input_ids, labels and, for a skipped row, its error."""
    out = {"input_ids": [], "labels": [], "error": []}
    f = SourceFile(path, kind)
    for values, i in zip(zip(*batch.values()), indices):
        row = dict(zip(batch.keys(), values))
        try:
            if check:
                _check_row(row, layout, mapping, PLACEHOLDER)
            try:
                ids, labels = encode(convert(row, layout, mapping, PLACEHOLDER), tokenizer, template, mask_prompt)
            except DataError as e:
                raise e if PLACEHOLDER in str(e) else DataError(f"{PLACEHOLDER}: {e}") from None
            error = ""
        except DataError as e:
            e = _locate(e, f, i)
            if not skip_bad:
                raise e from None
            ids, labels, error = [], [], str(e)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["error"].append(error)
    return out


@functools.lru_cache(maxsize=8)
def _code_hash() -> str:
    """The conversion code itself is part of the cache key: changing it never reuses stale tables."""
    from . import sources, spec

    h = hashlib.sha256()
    for mod in (layouts, conversations, sources, spec):
        h.update(inspect.getsource(mod).encode())
    h.update(inspect.getsource(_tokenize).encode())
    return h.hexdigest()


def tokenizer_id(tokenizer) -> str:
    """A hash of what decides a tokenizer's output: vocabulary and merges, special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        h.update(str(getattr(tokenizer, k, None)).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def _tokenized(ds, f: SourceFile, layout: str, check: bool, src: Source, tokenizer, tok_id: str, template: str,
               mask_prompt: bool, skip_bad: bool, num_proc: int | None, streaming: bool):
    fn = functools.partial(_tokenize, layout=layout, mapping=src.columns, check=check, tokenizer=tokenizer,
                           template=template, mask_prompt=mask_prompt, skip_bad=skip_bad, path=f.path, kind=f.kind)
    columns = list(ds.column_names or [])
    if streaming:
        return ds.map(fn, batched=True, with_indices=True, remove_columns=columns)
    key = hashlib.sha256("|".join(map(str, (ds._fingerprint, layout, sorted(src.columns.items()), check, template,
                                            mask_prompt, skip_bad, tok_id, _code_hash()))).encode()).hexdigest()[:32]
    Path(cache_dir()).mkdir(parents=True, exist_ok=True)
    return ds.map(fn, batched=True, batch_size=256, with_indices=True, remove_columns=columns, num_proc=num_proc,
                  new_fingerprint=key, cache_file_name=str(Path(cache_dir()) / f"tokenized-{key}.arrow"),
                  load_from_cache_file=True, desc=f"tokenize {Path(f.path).name}")


def _weighted(n: int, weight: float, seed: int) -> range | list[int]:
    """Row indices a weight takes: whole repeats, then a fixed random subsample (in order) for the fraction."""
    if weight == 1:
        return range(n)
    whole, frac = divmod(weight, 1.0)
    k = round(frac * n)
    part = sorted(random.Random(seed).sample(range(n), k)) if k else []
    return list(range(n)) * int(whole) + part


def read_examples(spec, tokenizer, template: str = "reference", mask_prompt: bool = True,
                  data_format: str | None = None, skip_bad_rows: bool = False, num_proc: int | None = None,
                  streaming: bool = False, max_examples: int | None = None, seed: int = 0,
                  what: str = "data") -> DataResult:
    """Every example of a specification, tokenized (see the module docstring).

    ``max_examples`` (streaming) stops reading once that many examples were produced.
    """
    if num_proc is not None and num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    sources = parse_spec(spec, data_format, what)
    tok_id = tokenizer_id(tokenizer)
    stats = DataStats()
    parts = []  # (SourceStats, tokenized dataset, weight)
    for si, src in enumerate(sources):
        for f in resolve_files(src):
            ds = open_file(f, streaming=streaming)
            layout, check = _layout_of(ds, f, src)
            st = SourceStats(f.path, layout, weight=src.weight)
            stats.sources.append(st)
            parts.append((st, _tokenized(ds, f, layout, check, src, tokenizer, tok_id, template, mask_prompt,
                                         skip_bad_rows, num_proc if not streaming else None, streaming), src.weight))
    if streaming:
        return _read_stream(parts, stats, max_examples, seed, what)
    import numpy as np
    import pyarrow.compute as pc

    tables = []
    for k, (st, ds, weight) in enumerate(parts):
        # Arrow's own kernels over the error column: no Python object per row on the common (clean) path
        errors = ds.data.table.column("error")
        st.rows = len(errors)
        bad = np.flatnonzero(pc.not_equal(errors, "").to_numpy(zero_copy_only=False))
        for i in bad.tolist():
            st.skipped += 1
            stats.skipped[_reason(errors[i].as_py())] += 1
        good = np.setdiff1d(np.arange(st.rows), bad) if len(bad) else None
        n_good = st.rows - len(bad)
        take = _weighted(n_good, weight, seed + k)
        st.taken = len(take)
        if not take:
            continue
        if good is not None or weight != 1:  # a subset or repeats: gathered by Arrow, not row by row
            rows = np.asarray(take) if good is None else good[np.asarray(take)]
            ds = ds.select(rows.tolist()).flatten_indices()
        tables.append(_table(ds, st.path))
    if not tables:
        raise DataError(f"{what}: no examples left ({stats.describe()})")
    if stats.skipped:
        log.warning("%s: skipped %d bad rows: %s", what, sum(stats.skipped.values()), stats.describe())
    return DataResult(stats, table=tables[0] if len(tables) == 1 else TokenTable.concat(tables))


def _table(ds, source: str) -> TokenTable:
    """A tokenized dataset's two list columns as flat arrays (Arrow buffers, no Python object per token)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = ds.data.table
    out = {}
    for name in ("input_ids", "labels"):
        col = t.column(name).combine_chunks() if t.column(name).num_chunks != 1 else t.column(name).chunk(0)
        col = col.cast(pa.list_(pa.int64())) if col.type.value_type != pa.int64() else col
        out[name] = col.flatten().to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenTable(out["input_ids"], out["labels"], offsets, [source] * len(lengths))


def _read_stream(parts, stats: DataStats, max_examples: int | None, seed: int, what: str) -> DataResult:
    import datasets

    live = [(st, ds, w) for st, ds, w in parts if w > 0]
    if not live:
        raise DataError(f"{what}: every source has weight 0")
    total = sum(w for _, _, w in live)
    mixed = live[0][1] if len(live) == 1 else datasets.interleave_datasets(
        [ds for _, ds, _ in live], probabilities=[w / total for _, _, w in live], seed=seed,
        stopping_strategy="all_exhausted")
    for st, _, _ in parts:
        st.layout += " (streamed)"

    def examples():
        n = 0
        for row in mixed:
            if row["error"]:
                stats.skipped[_reason(row["error"])] += 1
                continue
            stats.sources[0].taken += 1  # streamed sources are interleaved: counted together
            yield Example(row["input_ids"], row["labels"], "stream")
            n += 1
            if max_examples is not None and n >= max_examples:
                return
        if n == 0:
            raise DataError(f"{what}: no examples left ({stats.describe()})")

    return DataResult(stats, stream=examples())
