"""Running the recipe on several processes (torchrun), on transformers' own FSDP2 / expert parallelism.

    torchrun --nproc_per_node=N -m esft train --config cfg.yaml [fsdp_size=..] [ep_size=..]

The model is loaded with ``DistributedConfig(fsdp_size, ep_size)``: every frozen weight is sharded
by FSDP2 (and the routed experts placed by expert parallelism), so each rank holds ~1/N of the
model. What trains is small, so it is **replicated**: every rank holds the same fp32 copy of the
selected experts (``expert_rows`` gathers only those rows from the shards once), computes it on
its own tokens, and the gradients are summed over the ranks (one all-reduce per step, the size
of the trainable copy) before the identical AdamW step on every rank. Consequences:

- memory per rank: the frozen model / N + the whole trainable copy, masters and AdamW state
  (ESFT: a few % of the model); communication per step: FSDP's all-gathers of the frozen weights
  plus one all-reduce of the selected experts' gradients;
- checkpoints and adapters hold replicated tensors, so rank 0 writes them in the single-process
  format, and a run resumes on any number of processes;
- every rank does the same forwards in the same order (no rank skips a collective), and a rank
  whose tokens never reach an expert contributes a zero gradient, so no step can hang on it.

A single process is the same code with world size 1 (every call below is then a no-op).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from transformers.distributed import DistributedConfig


@dataclass
class Dist:
    """This process's place in the job: rank, world size; collectives that are no-ops alone."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of a micro-batch's rows (the micro-batch is split evenly, in order)."""
        if not self.enabled:
            return rows
        n = len(rows) // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the replicated trainable tensors' gradients over the ranks (a missing one counts as zeros)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:  # no token of this rank reached it: still take part in the all-reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str = "auto", timeout_s: int = 600) -> Dist:
    """Join the torchrun job (gloo on CPU, NCCL on CUDA); alone, a world of one."""
    if not launched_by_torchrun():
        return Dist()
    import torch.distributed as dist

    world, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, f"cuda:{local}" if cuda else "cpu")


def setup(cfg) -> Dist:
    """``join`` for training, with the parallel layout of ``cfg`` (a TrainConfig) checked."""
    if not launched_by_torchrun() and (cfg.fsdp_size > 1 or cfg.ep_size > 1):
        raise ValueError(f"fsdp_size={cfg.fsdp_size} / ep_size={cfg.ep_size} need several processes: launch with "
                         "torchrun --nproc_per_node=N -m esft train ... (see the README)")
    job = join(cfg.device, cfg.dist_timeout_s)
    if job.enabled:
        check_layout(cfg, job.world)
    return job


def check_layout(cfg, world: int) -> None:
    fsdp = cfg.fsdp_size or world
    if fsdp != world:
        raise ValueError(f"fsdp_size={cfg.fsdp_size} does not match the {world} processes torchrun started: "
                         f"ESFT shards the frozen model over all of them (leave fsdp_size unset, or {world})")
    if cfg.ep_size < 1 or fsdp % cfg.ep_size:
        raise ValueError(f"ep_size={cfg.ep_size} must divide the number of processes ({world})")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {world} processes: each step's "
                         f"micro-batch is split evenly over them (so the result equals one process)")
    if cfg.method != "esft":
        raise NotImplementedError(f"method={cfg.method} under torchrun is not implemented yet: only ESFT trains "
                                  "distributed (its trainable part is replicated, see the README)")


def distributed_config(cfg, world: int):
    """transformers' DistributedConfig for this job (FSDP2 over every rank, expert parallelism if asked)."""
    kw = {"fsdp_size": cfg.fsdp_size or world}
    if cfg.ep_size > 1:
        kw["ep_size"] = cfg.ep_size
    return DistributedConfig(**kw)


EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")  # config.json names, by family


def check_expert_counts(model_dir: str, ep_size: int) -> None:
    """Expert parallelism needs the routed experts to split evenly over the ep ranks (checked before loading)."""
    import json
    from pathlib import Path

    if ep_size <= 1:
        return
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    n = next((config[k] for k in EXPERT_COUNT_KEYS if isinstance(config.get(k), int)), None)
    if n is not None and n % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide the model's {n} routed experts per layer")
