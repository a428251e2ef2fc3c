"""Resumable training checkpoints, one format for one process and for a torchrun job.

    checkpoints/step-N/
        state/        torch.distributed.checkpoint (DCP): "masters.<param name>" (the fp32 trainable
                      tensors) and "adam.<param name>.<exp_avg|exp_avg_sq|step>", each rank its shards
        state.json    counters, best validation loss, the run record (written last, by rank 0)

DCP stores every tensor with its global shape and reads back whatever slice a rank asks for, so a
checkpoint written by N processes resumes on M (one included): the sharded trainable copy is simply
cut differently. The optimizer state is stored per parameter *name*, not by AdamW's integer slots,
so it does not depend on the order in which a run built its optimizer.

Atomicity: every rank writes into one temporary directory (``Dist.atomic_dir``); once all have
finished, rank 0 writes state.json, syncs the tree to disk and renames the directory into place. An
interrupted save leaves the previous checkpoint as it was. Several nodes need the output directory
on a shared filesystem.

Checkpoints of earlier versions (trainable.pt + optimizer.pt, one process) are still read.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..io import DataError, write_json_atomic
from .distributed import Dist
from .precision import MasterWeights

ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


@contextmanager
def _quiet():
    """DCP warns that it assumes one process when there is no process group: that is the intent here."""
    with warnings.catch_warnings():
        if not torch.distributed.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def list_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (half-written ``.step-N.tmp`` directories are not listed)."""
    d = out / "checkpoints"
    if not d.exists():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()), key=step_of)


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def _adam_state(masters: MasterWeights, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state by parameter name, created (zeros, step 0) where a run has not stepped yet.

    A fresh optimizer creates its state at its first step; loading needs it to exist, in the right
    shapes and shards, beforehand.
    """
    out = {}
    for name, m in masters.masters.items():
        st = opt.state[m]
        if not st:
            # AdamW (foreach, not capturable) keeps `step` as a float32 scalar on the CPU.
            st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(m, memory_format=torch.preserve_format),
                      exp_avg_sq=torch.zeros_like(m, memory_format=torch.preserve_format))
        if set(st) != set(ADAM_KEYS):
            raise NotImplementedError(f"optimizer state keys {sorted(st)} (AdamW's are {ADAM_KEYS})")
        out[name] = {k: st[k] for k in ADAM_KEYS}
    return out


def _state_dict(masters: MasterWeights, opt) -> dict:
    # detach(): the same storage, but DCP may write into it without autograd objecting (leaf params)
    return {"masters": {n: m.detach() for n, m in masters.masters.items()}, "adam": _adam_state(masters, opt)}


def save(out: Path, step: int, masters: MasterWeights, opt, state: dict, keep: int, job: Dist) -> None:
    """Every rank: write checkpoint ``step`` (see the module docstring); keep the newest ``keep``."""
    import torch.distributed.checkpoint as dcp

    final = out / "checkpoints" / f"step-{step}"
    try:
        with job.atomic_dir(final) as tmp:  # one temporary directory that all ranks write into
            # With no process group (one process) DCP writes alone; under torchrun every rank writes its shards.
            with _quiet():
                dcp.save(_state_dict(masters, opt), checkpoint_id=str(tmp / "state"))
            if job.main:  # written last: a directory without it was never completed
                write_json_atomic(tmp / "state.json", {**state, "step": step})
    except (OSError, RuntimeError) as e:  # a full disk surfaces from DCP's writer as "unexpected pos ..."
        raise OSError(e.errno if isinstance(e, OSError) else None,
                      f"writing checkpoint {final} failed ({e}); is the disk full or the directory read-only? "
                      f"The previous checkpoint is intact: free space, then resume=true") from e
    if job.main:  # a step saved again (a resumed run) has replaced the older one
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    job.barrier()


def load(ckpt: Path, masters: MasterWeights, opt) -> dict:
    """Every rank: read checkpoint ``ckpt`` into the masters (then the model) and AdamW; returns state.json."""
    if (ckpt / "trainable.pt").exists():
        return _load_legacy(ckpt, masters, opt)
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(ckpt / "state")).read_metadata().state_dict_metadata
    saved = {k.removeprefix("masters."): v for k, v in meta.items() if k.startswith("masters.")}
    _check_match(ckpt, {n: tuple(v.size) for n, v in saved.items()}, masters)
    sd = _state_dict(masters, opt)
    try:
        with _quiet():
            dcp.load(sd, checkpoint_id=str(ckpt / "state"))
    except Exception as e:  # DCP's own errors name flattened keys; say which checkpoint
        raise DataError(f"{ckpt}: cannot be read into this run's trainable tensors: {e}") from e
    masters.sync()  # the model's (bf16) tensors from the loaded masters
    return read_state(ckpt)


def _check_match(ckpt: Path, shapes: dict[str, tuple], masters: MasterWeights) -> None:
    missing = set(masters.masters) - set(shapes)
    extra = set(shapes) - set(masters.masters)
    if missing or extra:
        raise DataError(f"{ckpt}: checkpoint does not match this run's trainable tensors "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    for n, m in masters.masters.items():
        if tuple(shapes[n]) != tuple(m.shape):
            raise DataError(f"{ckpt}: {n} has shape {tuple(shapes[n])}, this run's is {tuple(m.shape)}")


def _load_legacy(ckpt: Path, masters: MasterWeights, opt) -> dict:
    """Checkpoints written before DCP: one process, torch.save of the masters and of AdamW's state_dict."""
    from torch.distributed.tensor import DTensor

    tensors = torch.load(ckpt / "trainable.pt", map_location="cpu")
    _check_match(ckpt, {n: tuple(t.shape) for n, t in tensors.items()}, masters)
    if any(isinstance(m, DTensor) for m in masters.masters.values()):
        raise DataError(f"{ckpt} was written by an earlier version in one process: resume it in one process "
                        "(`esft train`), then continue under torchrun from the next checkpoint")
    masters.load_state_dict(tensors)
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu"))
    return read_state(ckpt)
