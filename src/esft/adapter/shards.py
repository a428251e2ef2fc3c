"""A safetensors checkpoint on disk, read and written without loading it.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON ``{"__metadata__": {...}, key: {"dtype": "BF16", "shape": [..], "data_offsets":
[begin, end]}}`` (offsets relative to the data that follows the header), then the tensors'
bytes, row-major. A sharded checkpoint adds ``model.safetensors.index.json`` whose
``weight_map`` says which shard holds each key.

Only headers are parsed here; tensor bytes are read a few elements or one chunk at a time, so
neither the fingerprint nor the merge ever holds a whole shard in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.loading import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_CHUNK = 64 << 20  # bytes copied or cast per read: bounds the merge's memory, whatever the tensor size

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # what a merge may cast to and from (not FP8: it needs scales)


@dataclass
class TensorInfo:
    """One tensor of a shard: where its bytes are (absolute offsets in ``file``)."""

    key: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the tensor's elements; CheckpointError for a dtype esft cannot interpret."""
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise CheckpointError(f"{self.file}: {self.key!r} is stored as {self.dtype}, a safetensors dtype esft "
                                  f"cannot interpret (known: {', '.join(DTYPES)}); it can only be copied "
                                  "unchanged") from None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Shard:
    path: Path
    metadata: dict  # the header's "__metadata__" (e.g. {"format": "pt"}), kept on rewrite
    tensors: dict[str, TensorInfo]  # in data order


@dataclass
class Checkpoint:
    path: Path
    shards: list[Shard]
    index: dict | None = None  # the parsed index file, None for a single model.safetensors
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self):
        self.tensors = {k: t for s in self.shards for k, t in s.tensors.items()}


def read_shard(path: str | os.PathLike) -> Shard:
    """Parse one safetensors file's header; a damaged file raises CheckpointError naming it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: damaged safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: damaged safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    ends = [h["data_offsets"][1] for h in header.values() if isinstance(h, dict)
            and isinstance(h.get("data_offsets"), list) and len(h["data_offsets"]) == 2]
    if ends and isinstance(max(ends), int) and max(ends) > data_size:  # a copy cut short
        raise CheckpointError(f"{path}: truncated ({size} bytes, its header describes {data_start + max(ends)}); "
                              "copy it again")
    tensors = []
    for key, h in header.items():
        try:
            dtype, shape, (begin, end) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: damaged header entry for {key!r}: {h}") from None
        info = TensorInfo(key, path, dtype, shape, data_start + begin, end - begin)
        if (dtype in DTYPES and info.numel * DTYPES[dtype].itemsize != end - begin) or not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{path}: damaged header entry for {key!r}: {dtype} {list(shape)} at bytes [{begin}, {end}) "
                                  f"of {data_size}")
        tensors.append(info)
    tensors.sort(key=lambda t: t.start)
    return Shard(path, metadata, {t.key: t for t in tensors})


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """All shards' headers of a checkpoint directory, checked against its index.

    ``model.safetensors`` is used when present (as transformers does), else the index file. A
    shard file the index names but that is missing, a key the index maps to a shard that lacks
    it, and a key a shard holds but the index does not list all raise CheckpointError.
    """
    path = Path(path)
    if (path / SINGLE_FILE).is_file():
        return Checkpoint(path, [read_shard(path / SINGLE_FILE)])
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints can be merged)")
    try:
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from None
    by_file: dict[str, set[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(fname, set()).add(key)
    shards = []
    for fname in sorted(by_file):
        f = path / fname
        if Path(fname).name != fname or not f.is_file():
            raise CheckpointError(f"{index_path} maps {len(by_file[fname])} keys (e.g. {min(by_file[fname])!r}) "
                                  f"to {fname}, which is not a file in {path}")
        shard = read_shard(f)
        missing = sorted(by_file[fname] - set(shard.tensors))
        if missing:
            raise CheckpointError(f"{f} lacks {missing[0]!r}, which {index_path.name} maps to it"
                                  + (f" (and {len(missing) - 1} more keys)" if len(missing) > 1 else ""))
        extra = sorted(set(shard.tensors) - by_file[fname])
        if extra:
            raise CheckpointError(f"{f} holds {extra[0]!r}, which {index_path.name} does not map to it"
                                  + (f" (and {len(extra) - 1} more keys)" if len(extra) > 1 else ""))
        shards.append(shard)
    return Checkpoint(path, shards, index)


def read_elements(fd: int, info: TensorInfo, flat_indices: list[int]) -> torch.Tensor:
    """The elements at ``flat_indices`` of a tensor, read one by one from an open file -> [k] in its dtype."""
    size = info.torch_dtype.itemsize
    raw = b"".join(os.pread(fd, size, info.start + i * size) for i in flat_indices)
    if len(raw) != size * len(flat_indices):
        raise CheckpointError(f"{info.file}: truncated file (reading {info.key!r})")
    return torch.frombuffer(bytearray(raw), dtype=info.torch_dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's raw bytes, without a copy (numpy has no bfloat16, bytes do)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _copy_range(fin, fout, info: TensorInfo, out_dtype: torch.dtype | None = None) -> None:
    """Copy one tensor's bytes in chunks; with ``out_dtype`` each chunk is cast (elementwise, so chunks suffice).

    ``out_dtype=None`` copies the bytes unchanged, whatever the dtype (also ones esft cannot interpret).
    """
    src = info.torch_dtype if out_dtype is not None else None
    chunk = _CHUNK - _CHUNK % src.itemsize if src is not None else _CHUNK
    fin.seek(info.start)
    left = info.nbytes
    while left:
        buf = fin.read(min(chunk, left))
        if not buf:
            raise CheckpointError(f"{info.file}: truncated file (reading {info.key!r})")
        left -= len(buf)
        if src is None or out_dtype == src:
            fout.write(buf)
        else:
            fout.write(tensor_bytes(torch.frombuffer(bytearray(buf), dtype=src).to(out_dtype)))


def write_shard(shard: Shard, out: Path, replace: dict[str, torch.Tensor], cast: torch.dtype | None = None,
                rows: dict[str, list[int]] | None = None) -> int:
    """Write ``shard`` to ``out`` with the tensors in ``replace`` substituted; returns the data bytes.

    ``rows``: for a key in it, ``replace[key]`` [len(ids), ...] holds only rows ``ids`` (dim 0) of the
    tensor (experts fused in one checkpoint tensor); the other rows are copied from the base.

    Keys, order and metadata are kept. A replacement is written in the base tensor's dtype (or
    ``cast``); with ``cast`` every floating-point tensor is cast too. Every other tensor is copied
    byte for byte, whatever its dtype (U32, F8_E8M0, ... included). Memory: one chunk or one
    replacement tensor at a time.
    """
    plan = []  # (info, output dtype; None = copy the bytes unchanged)
    for info in shard.tensors.values():
        if info.key in replace:
            plan.append((info, cast if cast is not None else info.torch_dtype))
        elif cast is not None and info.dtype in FLOAT_DTYPES and info.torch_dtype != cast:
            plan.append((info, cast))
        else:
            plan.append((info, None))
    header, offset = {}, 0
    if shard.metadata:
        header["__metadata__"] = shard.metadata
    for info, dt in plan:
        n = info.nbytes if dt is None else info.numel * dt.itemsize
        name = info.dtype if dt is None else DTYPE_NAMES[dt]
        header[info.key] = {"dtype": name, "shape": list(info.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors itself writes it
    with open(shard.path, "rb") as fin, open(out, "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)))
        fout.write(raw)
        for info, dt in plan:
            if info.key in (rows or {}):
                _write_rows(fin, fout, info, dt, dict(zip(rows[info.key], replace[info.key])))
            elif info.key in replace:
                fout.write(tensor_bytes(replace[info.key].detach().to("cpu", dt)))
            else:
                _copy_range(fin, fout, info, dt)  # dt None: the bytes as they are
    return offset


def _write_rows(fin, fout, info: TensorInfo, out_dtype: torch.dtype, new_rows: dict[int, torch.Tensor]) -> None:
    """Copy a tensor row by row (dim 0) in ``out_dtype``, writing ``new_rows`` {row: tensor} in place of the base's."""
    n_rows = info.shape[0]
    row_bytes = info.nbytes // n_rows
    for r in range(n_rows):
        if r in new_rows:
            fout.write(tensor_bytes(new_rows[r].detach().to("cpu", out_dtype)))
        else:
            part = TensorInfo(info.key, info.file, info.dtype, info.shape[1:], info.start + r * row_bytes, row_bytes)
            _copy_range(fin, fout, part, out_dtype)
