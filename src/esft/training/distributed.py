"""Running the recipe on several processes (torchrun), on transformers' own FSDP2 / expert parallelism.

    torchrun --nproc_per_node=N -m esft train --config cfg.yaml [fsdp_size=..] [ep_size=..]

The model is loaded with ``DistributedConfig(fsdp_size, ep_size)``: every frozen weight is sharded
by FSDP2 (and the routed experts placed by expert parallelism), so each rank holds ~1/N of the
model. The trainable copy of the selected experts is **sharded too**, by FSDP2 over all ranks
(:func:`shard_trainable`): each rank keeps 1/N of it as fp32 (these shards *are* the fp32 master
weights), FSDP2 all-gathers a layer's copy in the model's dtype just before its forward, and
reduce-scatters its gradients in fp32 after its backward. Consequences:

- memory per rank: (frozen model + trainable copy, fp32 masters, gradients and AdamW state) / N,
  plus one layer's gathered copy at a time; communication per step: FSDP's all-gathers of the
  frozen weights, plus per layer one all-gather and one reduce-scatter of the selected experts;
- every rank runs every layer's trained half in every forward (``ESFTExperts`` adds one
  zero-weighted row per selected expert), so no rank skips a collective, whatever its tokens;
- FSDP2 averages gradients over the ranks, while each rank's loss is its share of the step's
  token mean (whose sum is the one-process loss): the loss is scaled by N before backward;
- the adapter is gathered tensor by tensor and written by rank 0 in the single-process format;
  checkpoints are written with torch.distributed.checkpoint (every rank its shards), which any
  number of processes, one included, can read back: a run resumes on another world size.

A single process is the same code with world size 1 (every call below is then a no-op).
"""

from __future__ import annotations

import datetime
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.distributed import DistributedConfig


@dataclass
class Dist:
    """This process's place in the job: rank, world size; collectives that are no-ops alone."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    joined: bool = False  # launched by torchrun and in its process group (also with one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True under torchrun, even with one process (then FSDP2, DCP and NCCL run with a world of one)."""
        return self.joined

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of a micro-batch's rows (the micro-batch is split evenly, in order)."""
        if not self.enabled:
            return rows
        n = len(rows) // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    @property
    def loss_scale(self) -> int:
        """Backward runs on loss x world size: FSDP2 averages gradients over the ranks, the step needs their sum."""
        return self.world

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of replicated (plain, not FSDP-sharded) tensors over the ranks.

        FSDP2 has already reduced a sharded tensor's gradient; a plain one is all-reduced here and
        divided by :attr:`loss_scale` (a missing gradient counts as zeros, so no rank skips the call).
        """
        if not self.enabled:
            return
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        for p in params:
            if isinstance(p, DTensor):
                continue
            if p.grad is None:  # no token of this rank reached it: still take part in the all-reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.loss_scale)

    @contextmanager
    def atomic_dir(self, final):
        """``io.atomic_dir`` for a directory every rank writes into (DCP shards, an FSDP model's save).

        All ranks get the same temporary path; once every rank has left the block, rank 0 publishes it.
        """
        from ..io import atomic_dir, publish_dir

        if not self.enabled:
            with atomic_dir(final) as tmp:
                yield tmp
            return
        final = Path(final)
        tmp = final.with_name(f".{final.name}.tmp")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was interrupted
            tmp.mkdir(parents=True)
        self.barrier()
        yield tmp
        self.barrier()
        if self.main:
            publish_dir(tmp, final)
        self.barrier()

    @staticmethod
    def reshard(model: torch.nn.Module) -> None:
        """Put every FSDP2 module of ``model`` back in its sharded state.

        An FSDP2 root keeps its weights gathered after a forward (for the backward that usually follows);
        after a validation forward, reading the trainable copy by its (sharded) parameters needs them back.
        """
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def gather(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors (on CPU, in ``dtype``) on rank 0, one at a time; {} on the other ranks.

        A sharded tensor is all-gathered (every rank must call this), converted and moved to the host
        before the next one, so a rank holds one whole tensor at a time besides its shards.
        """
        from torch.distributed.tensor import DTensor

        out = {}
        for name, t in tensors.items():
            t = t.detach()
            full = t.full_tensor() if isinstance(t, DTensor) else t
            if self.main:
                out[name] = full.to(device="cpu", dtype=dtype or full.dtype)
            del full
        return out

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
    """torchrun (torch.distributed.run) sets TORCHELASTIC_RUN_ID for every worker it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def shard_trainable(job: Dist, compute_dtype: torch.dtype):
    """``prepare(wrapper)`` for ``apply_esft``: shard each layer's trainable copy over all ranks with FSDP2.

    The copy ([S, 2I, H] and [S, H, I], S selected experts) is made fp32 and split along dim 1 (2I and
    H: even shards however few experts a layer selects; along dim 0, a layer with one selected expert
    would sit whole on one rank). FSDP2's mixed-precision policy gathers it in ``compute_dtype`` for
    the forward and reduces gradients in fp32, so the fp32 shards are the master weights and AdamW
    steps them directly. None alone (one process keeps a plain copy).
    """
    if not job.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh(job.device.split(":")[0], (job.world,))
    # cast_forward_inputs=False: the routing weights reach the experts in the dtype the model gives them (fp32
    # for some families), as in one process; FSDP's default would round them to the compute dtype first.
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)

    def prepare(wrapper) -> None:
        wrapper.trained.float()
        fully_shard(wrapper.trained, mesh=mesh, mp_policy=policy, shard_placement_fn=lambda p: Shard(1))

    return prepare


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
        kw = {"device_id": torch.device(f"cuda:{local}")} if cuda else {}  # NCCL binds the GPU at once
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return Dist(rank, world, f"cuda:{local}" if cuda else "cpu", joined=True)


def setup(cfg) -> Dist:
    """``join`` for training, with the parallel layout of ``cfg`` (a TrainConfig) checked."""
    if not launched_by_torchrun() and (cfg.fsdp_size > 1 or cfg.ep_size > 1):
        raise ValueError(f"fsdp_size={cfg.fsdp_size} / ep_size={cfg.ep_size} need several processes: launch with "
                         "torchrun --nproc_per_node=N -m esft train ... (docs: guides/distributed.md)")
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
    if cfg.method in ("lora", "esft-lora"):
        raise NotImplementedError(f"method={cfg.method} under torchrun is not implemented yet: ESFT and full "
                                  "fine-tuning train distributed (docs: guides/distributed.md)")
    if cfg.method == "full" and cfg.ep_size > 1:
        raise NotImplementedError(f"method=full with ep_size={cfg.ep_size} is not implemented: full fine-tuning "
                                  "under torchrun shards everything with FSDP2 alone (leave ep_size=1)")


def distributed_config(cfg, world: int):
    """transformers' DistributedConfig for this job (FSDP2 over every rank, expert parallelism if asked).

    None for a world of one: transformers then leaves the model whole and ignores the device (it would
    load onto the CPU), so the model is loaded plainly onto the job's device instead.
    """
    if world == 1:
        return None
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
