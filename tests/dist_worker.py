"""Run under torchrun by tests/test_distributed.py: ESFT training on every rank, then per-rank checks.

    torchrun --nproc_per_node=2 tests/dist_worker.py RESULT_DIR MODE key=value ...

MODE "profile": run_profile with ProfileConfig keys. MODE "train": train, then check that every frozen
tensor's local shard is bit-identical to before and that a gradient missing on one rank still sums
without a hang; writes RESULT_DIR/rank-R.json. MODE "crash": rank 1 raises during its 3rd training
forward. MODE "starve": as "train", but no token of rank 1 ever reaches a selected expert.
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def main():
    from esft.config import build_config
    from esft.models.loading import load_model
    from esft.training.config import TrainConfig
    from esft.training.distributed import distributed_config, setup
    from esft.training.recipe import train

    result_dir, mode, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if mode == "profile":  # `esft profile` under torchrun: ranks split the batches, scores are summed
        from esft.profiling.run import ProfileConfig, run_profile

        run_profile(build_config(ProfileConfig, None, overrides), progress=False)
        return
    cfg = build_config(TrainConfig, None, overrides)
    job = setup(cfg)
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=job.device,
                            distributed_config=distributed_config(cfg, job.world))
    before = {n: local(p).detach().clone() for n, p in model.named_parameters()}
    if mode == "crash" and job.rank == 1:
        calls = {"n": 0}
        orig = model.forward

        def crash(*a, **k):
            if model.training:
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("rank 1 crashed on purpose")
            return orig(*a, **k)

        model.forward = crash
    if mode == "starve" and job.rank == 1:
        # Rank 1's tokens never reach a selected expert: its router choices are moved to expert 15, which
        # is not selected. Every collective on the trainable copy must still match rank 0's.
        from esft.training.experts import ESFTExperts

        orig_forward = ESFTExperts.forward

        def starved(self, hidden, top_k_index, top_k_weights):
            return orig_forward(self, hidden, top_k_index.masked_fill(self.slot_of[top_k_index] >= 0, 15),
                                top_k_weights)

        ESFTExperts.forward = starved
    res = train(cfg, model=model, tokenizer=tok, progress=False)

    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # the root keeps its weights gathered after the last forward: shard back
        if isinstance(m, FSDPModule):
            m.reshard()
    changed = []
    for n, p in model.named_parameters():
        if ".experts.trained." in n:
            continue
        key = n.replace(".experts.base.", ".experts.")
        now = local(p).detach()
        if now.shape != before[key].shape or not torch.equal(now, before[key]):
            changed.append(f"{key} {tuple(before[key].shape)} -> {tuple(now.shape)}")
    # A replicated (not sharded) tensor that got no gradient on one rank: the sum must not hang. Rank 0's
    # gradient is of the loss scaled by the world size, as in training, so the sum is 2 / 2.
    g = torch.nn.Parameter(torch.zeros(3))
    g.grad = None if job.rank == 1 else torch.full((3,), 2.0)
    job.sum_grads([g])
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / f"rank-{job.rank}.json").write_text(json.dumps({
        "rank": job.rank, "world": job.world, "frozen_changed": changed, "frozen_checked": len(before),
        "sum_with_missing_grad": g.grad.tolist(), "train_loss": res.train_loss,
        "optimizer_state_bytes": res.optimizer_state_bytes, "trainable_params": res.trainable_params,
        "master_weight_bytes": res.master_weight_bytes,
        "trained_sharded": [type(p).__name__ for n, p in model.named_parameters() if ".experts.trained." in n],
        "sharded": sum(hasattr(p, "to_local") for p in model.parameters()),
    }))


if __name__ == "__main__":
    main()
