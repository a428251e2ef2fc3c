"""Packing tokenized examples into fixed-length rows.

Examples are placed whole, in order, into rows of ``seq_len`` tokens (first fit on the
current row, as the reference trainer concatenates); the tail of a row is padding with
label -100 and attention mask 0. An example longer than ``seq_len`` is truncated (its
first ``seq_len`` tokens kept) or dropped, and the caller is told how many.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .conversations import IGNORE, Example

log = logging.getLogger(__name__)


@dataclass
class PackStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    rows: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def describe(self) -> str:
        return (
            f"{self.examples} examples -> {self.rows} rows, {self.tokens} tokens "
            f"({self.label_tokens} in the loss); {self.truncated} truncated, {self.dropped} dropped "
            f"for exceeding the sequence length"
        )


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, seq_len] long
    labels: torch.Tensor  # [R, seq_len] long, -100 where not learned
    attention_mask: torch.Tensor  # [R, seq_len] long, 0 on padding
    stats: PackStats

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(examples, seq_len: int, pad_id: int, overlong: str = "truncate", max_rows: int | None = None) -> Packed:
    """Pack ``examples``: a list, any iterable (a stream is consumed only until ``max_rows`` rows are full), or
    a pipeline TokenTable (packed from its flat arrays, no Python object per token)."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    if hasattr(examples, "offsets"):
        return _pack_table(examples, seq_len, pad_id, overlong, max_rows)
    stats = PackStats()
    rows: list[tuple[list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    for ex in examples:
        if max_rows is not None and len(rows) >= max_rows:
            break
        stats.examples += 1
        ids, lab = ex.input_ids, ex.labels
        if len(ids) > seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, lab = ids[:seq_len], lab[:seq_len]
        if len(cur_ids) + len(ids) > seq_len:
            rows.append((cur_ids, cur_lab))
            cur_ids, cur_lab = [], []
        cur_ids = cur_ids + ids
        cur_lab = cur_lab + lab
    if cur_ids and (max_rows is None or len(rows) < max_rows):
        rows.append((cur_ids, cur_lab))
    if stats.truncated or stats.dropped:
        log.warning("%d of %d examples exceed seq_len=%d: %d truncated, %d dropped",
                    stats.truncated + stats.dropped, stats.examples, seq_len, stats.truncated, stats.dropped)
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(ids)] = 1
    stats.rows = n
    stats.tokens = int(mask.sum())
    stats.label_tokens = int((labels != IGNORE).sum())
    return Packed(input_ids, labels, mask, stats)


def _pack_table(table, seq_len: int, pad_id: int, overlong: str, max_rows: int | None) -> Packed:
    """The same first-fit-in-order packing as :func:`pack`, planned on lengths alone, then filled by slicing."""
    lengths = table.lengths().tolist()
    stats = PackStats()
    plan: list[list[tuple[int, int]]] = []  # per row: (example, kept length)
    cur: list[tuple[int, int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if max_rows is not None and len(plan) >= max_rows:
            break
        stats.examples += 1
        if n > seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            n = seq_len
        if used + n > seq_len:
            plan.append(cur)
            cur, used = [], 0
        cur.append((i, n))
        used += n
    if cur and (max_rows is None or len(plan) < max_rows):
        plan.append(cur)
    if stats.truncated or stats.dropped:
        log.warning("%d of %d examples exceed seq_len=%d: %d truncated, %d dropped",
                    stats.truncated + stats.dropped, stats.examples, seq_len, stats.truncated, stats.dropped)
    import numpy as np

    # Arrow hands out read-only buffers; torch wants writable ones (copied only if they are not)
    ids_flat, lab_flat = (torch.from_numpy(np.require(a, requirements="W")) for a in (table.ids, table.labels))
    r = len(plan)
    input_ids = torch.full((r, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((r, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((r, seq_len), dtype=torch.long)
    offsets = table.offsets
    for row, parts in enumerate(plan):
        at = 0
        for i, n in parts:
            a = int(offsets[i])
            input_ids[row, at:at + n] = ids_flat[a:a + n]
            labels[row, at:at + n] = lab_flat[a:a + n]
            at += n
        mask[row, :at] = 1
    stats.rows = r
    stats.tokens = int(mask.sum())
    stats.label_tokens = int((labels != IGNORE).sum())
    return Packed(input_ids, labels, mask, stats)
