"""`esft profile`: data -> packed sequences -> router hooks -> scores summary JSON."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.pipeline import read_examples
from ..data.packing import pack
from ..io import DataError, write_json_atomic
from ..models.loading import config_context, input_device, load_model, load_tokenizer
from ..training.distributed import DistributedConfig, join
from .profiler import RoutingProfile, profile_routing

log = logging.getLogger(__name__)


@dataclass
class ProfileConfig:
    model: str = field(default="", metadata={"help": "local checkpoint directory"})
    data: str = field(default="", metadata={"help": "JSONL of conversations of the task"})
    out: str = field(default="", metadata={"help": "where to write the scores summary JSON"})
    max_tokens: int = field(default=131072, metadata={"help": "token budget (paper: 32 x 4096 = 131,072)"})
    seq_len: int | None = field(default=None, metadata={"help": "length of the packed sequences scores are averaged "
                                "over (default: the model's context, at most 4096)"})
    batch_size: int = field(default=1, metadata={"help": "packed sequences per forward pass"})
    template: str = field(default="reference", metadata={"help": "reference or chat prompt template"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32 or bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, ..."})
    device_map: str | None = field(default=None, metadata={"help": "auto, balanced or a JSON {module: device} file"})
    data_format: str | None = field(default=None, metadata={"help": "layout of the data (default: detected)"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "drop rows that cannot be converted, counted"})
    streaming: bool = field(default=False, metadata={"help": "read only the rows the token budget needs"})
    router_stage_steps: int = field(default=0, metadata={"help": "router-first selection (Router Lens / CEFT, arXiv "
                                    "2508.19594): train the routers this many AdamW steps on the task's answer "
                                    "tokens before profiling, so the scores follow the tuned routing; the tuned "
                                    "weights are discarded (ESFT trains under the checkpoint's routers). 0 = off"})
    router_stage_lr: float = field(default=5e-4, metadata={"help": "learning rate of the router stage (default "
                                   "5e-4: the RouterLens code's router-tuning script uses 5e-4 for OLMoE; the "
                                   "routers are small, 1e-4..1e-3 is the useful range)"})
    router_stage_modules: str = field(default="router", metadata={"help": "router, or router+attention (every "
                                      "decoder layer's attention trains too, as in DAS)"})
    router_stage_batch_size: int = field(default=1, metadata={"help": "packed sequences per router-stage step "
                                         "(default 1: one row of seq_len tokens; at 4096 about the RouterLens "
                                         "script's 8 x 300 tokens per step)"})

    def __post_init__(self):
        """Every value checked before anything loads."""
        from ..models.loading import check_device, resolve_dtype

        for name in ("max_tokens", "seq_len", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        from .router_stage import ROUTER_STAGE_MODULES

        for name, low in (("router_stage_steps", 0), ("router_stage_batch_size", 1)):
            v = getattr(self, name)
            if type(v) is not int or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        lr = self.router_stage_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 1:
            raise ValueError(f"router_stage_lr must be a finite number in (0, 1], got {lr!r}")
        if self.router_stage_modules not in ROUTER_STAGE_MODULES:
            raise ValueError(f"router_stage_modules must be one of {', '.join(ROUTER_STAGE_MODULES)}, "
                             f"got {self.router_stage_modules!r}")
        if self.template not in ("reference", "chat"):
            raise ValueError(f"template must be reference or chat, got {self.template!r}")
        resolve_dtype(self.dtype, "cpu")
        check_device(self.device)
        if self.data:
            from ..data.spec import parse_spec

            parse_spec(self.data, self.data_format, "--data")


def profile_batches(data_path, tokenizer, seq_len: int, max_tokens: int, batch_size: int,
                    template: str = "reference", data_format: str | None = None, skip_bad_rows: bool = False,
                    streaming: bool = False):
    """Packed rows of the task's conversations, cut to the token budget, grouped into batches.

    ``data_path`` is a data specification (see esft.data.spec); streaming reads only what the budget needs."""
    packed, rows, total = profile_rows(data_path, tokenizer, seq_len, max_tokens, template, data_format,
                                       skip_bad_rows, streaming)
    return group_rows(packed, rows, batch_size), total


def profile_rows(data_path, tokenizer, seq_len: int, max_tokens: int, template: str = "reference",
                 data_format: str | None = None, skip_bad_rows: bool = False, streaming: bool = False):
    """(packed rows, [(row, tokens kept)] within the token budget, total tokens kept)."""
    res = read_examples(data_path, tokenizer, template, data_format=data_format, skip_bad_rows=skip_bad_rows,
                        streaming=streaming, what="--data")
    if res.stats.skipped:
        log.warning("--data: skipped %d bad rows: %s", sum(res.stats.skipped.values()), res.stats.describe())
    packed = pack(res.stream if res.stream is not None else res.table, seq_len, tokenizer.pad_token_id,
                  max_rows=2 * -(-max_tokens // seq_len) if streaming else None)
    rows, total = [], 0
    for r in range(len(packed)):
        if total >= max_tokens:
            break
        n = int(packed.attention_mask[r].sum())
        keep = min(n, max_tokens - total)  # the last row is cut so the budget is exact
        rows.append((r, keep))
        total += keep
    if not rows:
        raise DataError(f"{data_path}: no tokens to profile")
    return packed, rows, total


def group_rows(packed, rows: list[tuple[int, int]], batch_size: int, labels: bool = False) -> list[dict]:
    """Batches of ``batch_size`` rows, each row cut to its kept tokens; ``labels``: with the training labels
    (-100 on prompts, padding and the cut tail), for the router stage's loss."""
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        idx = torch.tensor([r for r, _ in chunk])
        ids = packed.input_ids[idx]
        mask = packed.attention_mask[idx].clone()
        for j, (_, keep) in enumerate(chunk):
            mask[j, keep:] = 0
        width = int(mask.sum(dim=1).max())  # no compute on columns that are padding in every row
        batches.append({"input_ids": ids[:, :width], "attention_mask": mask[:, :width]})
        if labels:
            lab = packed.labels[idx].masked_fill(mask == 0, -100)
            batches[-1]["labels"] = lab[:, :width]
    return batches


def run_profile(cfg: ProfileConfig, model=None, tokenizer=None, progress: bool = True) -> RoutingProfile:
    from tqdm.auto import tqdm

    # The data is read and checked (with the tokenizer alone) before the model loads: a typo costs seconds.
    context = config_context(cfg.model) if model is None else getattr(model.config, "max_position_embeddings", None)
    if cfg.seq_len is None:
        cfg.seq_len = min(4096, context) if isinstance(context, int) else 4096
    if isinstance(context, int):
        if cfg.seq_len > context:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context ({context} tokens, "
                             f"max_position_embeddings in {cfg.model}/config.json)")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    packed, rows, total = profile_rows(cfg.data, tokenizer, cfg.seq_len, cfg.max_tokens, cfg.template,
                                       cfg.data_format, cfg.skip_bad_rows, cfg.streaming)
    batches = group_rows(packed, rows, cfg.batch_size)
    stage_batches = group_rows(packed, rows, cfg.router_stage_batch_size, labels=True) if cfg.router_stage_steps else []
    job = join(cfg.device)  # under torchrun: FSDP2 over every process, batches split over them
    if stage_batches and job.enabled:
        raise ValueError("--router-stage-steps runs in one process: start `esft profile` without torchrun "
                         "(or with --router-stage-steps 0)")
    if model is None and job.enabled:
        model, _ = load_model(cfg.model, dtype=cfg.dtype, device=job.device, with_tokenizer=False,
                              # one process under torchrun: loaded plainly onto its device
                              distributed_config=DistributedConfig(fsdp_size=job.world) if job.world > 1 else None)
    elif model is None:
        model, _ = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                              with_tokenizer=False)
    device = input_device(model)
    batches = [{k: v.to(device) for k, v in b.items()} for b in share(batches, job)]
    stage = nullcontext()
    if stage_batches:  # Router Lens / CEFT: tune the routers, score under the tuned routing, put them back
        from .router_stage import tuned_router

        stage_bar = tqdm(total=cfg.router_stage_steps, unit="step", desc="router stage", disable=not progress,
                         dynamic_ncols=True)

        def on_step(step, loss):
            stage_bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            stage_bar.update(1)

        stage = tuned_router(model, [{k: v.to(device) for k, v in b.items()} for b in stage_batches],
                             cfg.router_stage_steps, cfg.router_stage_lr, cfg.router_stage_modules, progress=on_step)
    with stage as stage_record:
        if stage_batches:
            stage_bar.close()
            stage_record["batch_size"] = cfg.router_stage_batch_size
            log.info("router stage: %d steps, loss %.4f -> %.4f", cfg.router_stage_steps,
                     stage_record["loss_before"], stage_record["loss_after"])
        t0 = time.perf_counter()
        with tqdm(total=total, unit="tok", desc="profile", disable=not (progress and job.main),
                  dynamic_ncols=True) as bar:
            prof = profile_routing(model, batches, progress=bar.update, job=job)
        seconds = time.perf_counter() - t0
    if stage_batches:
        prof.meta["router_stage"] = stage_record
    prof.meta.update({"data": str(cfg.data), "model": str(cfg.model), "seq_len": cfg.seq_len,
                      "template": cfg.template, "seconds": round(seconds, 3),
                      "tokens_per_second": round(prof.num_tokens / max(seconds, 1e-9), 1)})
    if cfg.out and job.main:
        write_json_atomic(Path(cfg.out), prof.to_summary())
    job.barrier()
    return prof


def share(batches: list[dict], job) -> list[dict]:
    """This rank's batches: round-robin, padded so that every rank runs the same number of forwards
    (FSDP's collectives need all of them); a padding batch repeats real tokens that do not count."""
    if not job.enabled:
        return batches
    mine = batches[job.rank::job.world]
    while len(mine) < -(-len(batches) // job.world):
        mine.append({**batches[0], "count_mask": torch.zeros_like(batches[0]["attention_mask"])})
    return mine
