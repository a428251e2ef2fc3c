"""The training recipe: a plain, linear loop (no trainer framework).

    load model -> freeze all but the plan's tensors -> pack data -> AdamW over the plan ->
    [micro-batches -> backward -> clip -> step] x steps, with validation, checkpoints, resume

Output directory:

    config.yaml            the exact config used
    checkpoints/step-N/    resumable state: fp32 trainable tensors, AdamW, step (atomic, newest kept; checkpoint.py)
    adapter/               best adapter by validation loss (esft; esft-lora and lora: a PEFT adapter), atomic
    last/                  adapter (esft) or full checkpoint (full) after the last step
    tb/                    TensorBoard logs
    train_log.jsonl        one line per logged step / evaluation
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapter.fingerprint import checkpoint_fingerprint, model_fingerprint
from ..adapter.io import save_adapter
from ..config import to_yaml
from ..data.pipeline import read_examples
from ..data.packing import Packed, pack
from ..io import MARKER, DataError, OutputError, check_output, check_replaceable, mark_output_dir, remove_stale_temps
from ..models.loading import checkpoint_dtype, input_device, load_model, load_tokenizer
from ..selection.select import read_expert_config
from .config import TrainConfig
from . import checkpoint
from .distributed import check_expert_counts, distributed_config, setup, shard_trainable
from .experts import TrainablePlan, apply_esft, check_in_memory
from .precision import MasterWeights
from .balance import LoadMeter, maxvio_summary, require_bias, update_bias

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    train_loss: float
    best_valid_loss: float | None
    trainable_params: int
    optimizer_state_bytes: int
    seconds: float
    adapter_dir: str | None
    master_weight_bytes: int = 0  # fp32 masters kept beside low-precision trainable tensors
    step_seconds: float | None = None  # median wall time of one optimizer step (forward to AdamW)
    best_dir: str | None = None  # what to evaluate: best-by-validation adapter (esft, lora) or checkpoint (full)
    data: str = ""  # what was read: examples per source and layout, rows skipped by reason


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (the local shard of a DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this process holds (its shards, for sharded tensors)."""
    return sum(_local(v).numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)


def full_plan(model: nn.Module) -> dict[str, nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(True)
    return dict(model.named_parameters())


ATTENTION_PROJ = r".*\.self_attn\.(q_proj|q_a_proj|q_b_proj|k_proj|v_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"


def lora_wrap(model: nn.Module, cfg: TrainConfig):
    """The paper's LoRA baseline via PEFT: rank r on attention projections and on the fused expert tensors."""
    from peft import LoraConfig, get_peft_model

    from ..models.registry import get_family

    fam = get_family(model)
    targets = [f"{fam.moe_attr}.{fam.experts_attr}.gate_up_proj", f"{fam.moe_attr}.{fam.experts_attr}.down_proj"]
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=ATTENTION_PROJ,
                      target_parameters=targets, task_type="CAUSAL_LM")
    # PEFT reads transformers' deprecated `is_gradient_checkpointing`, which warns once per LoRA run in
    # every log; the attribute still works in the pinned transformers, so only that notice is silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lcfg)


def _split_valid(train: Packed, fraction: float, seed: int) -> tuple[Packed, Packed | None]:
    n = len(train)
    k = int(round(n * fraction))
    if fraction <= 0 or k == 0 or n - k < 1:
        return train, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    vi, ti = perm[:k].sort().values, perm[k:].sort().values
    sub = lambda idx: Packed(train.input_ids[idx], train.labels[idx], train.attention_mask[idx], train.stats)  # noqa: E731
    return sub(ti), sub(vi)


def batch_rows(n_rows: int, step: int, micro: int, batch_size: int, grad_accum: int, seed: int) -> torch.Tensor:
    """Row indices of one micro-batch; a pure function of the position, so a resumed run sees the same data."""
    start = (step * grad_accum + micro) * batch_size
    rows = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(perm[i]))
    return torch.tensor(rows)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: Packed, batch_size: int, device: str) -> float:
    """Token-weighted mean loss over all label tokens of ``data``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids = data.input_ids[i:i + batch_size].to(device)
        lab = data.labels[i:i + batch_size].to(device)
        att = data.attention_mask[i:i + batch_size].to(device)
        n = int((lab[:, 1:] != -100).sum())
        if n == 0:
            continue
        out = model(input_ids=ids, attention_mask=att, labels=lab, use_cache=False)
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / count if count else math.nan


# Settings that change the training trajectory: a resumed run must use the same ones. (steps may grow;
# logging, eval/save cadence, device and output options may change.)
TRAJECTORY_KEYS = ("method", "template", "seq_len", "overlong", "batch_size", "grad_accum", "lr", "weight_decay",
                   "beta1", "beta2", "max_grad_norm", "warmup_steps", "seed", "valid_fraction", "lora_rank",
                   "lora_alpha")


def _sha256(spec) -> str | None:
    """The data's identity for resume checks: one file's SHA-256 (as earlier versions recorded it), or one
    over the specification and every file it reads."""
    if not spec:
        return None
    from ..data.sources import resolve_files
    from ..data.spec import parse_spec

    def file_hash(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    sources = parse_spec(spec)
    files = [f for s in sources for f in resolve_files(s)]
    if len(sources) == 1 and sources[0].weight == 1 and len(files) == 1 and Path(files[0].path).is_file() \
            and isinstance(spec, str) and not spec.endswith((".yaml", ".yml")):
        return file_hash(Path(files[0].path))
    h = hashlib.sha256(json.dumps([vars(s) for s in sources], sort_keys=True).encode())
    for f in files:
        p = Path(f.path)
        for q in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if q.is_file():
                h.update(file_hash(q).encode())
    return h.hexdigest()


def run_record(cfg: TrainConfig, expert_cfg: dict | None, tokenizer, dtype: torch.dtype, base_fp: dict) -> dict:
    """Everything that decides a run's trajectory, as plain JSON (stored in every checkpoint)."""
    rec = {k: getattr(cfg, k) for k in TRAJECTORY_KEYS}
    rec["dtype"] = str(dtype).removeprefix("torch.")
    for k in ("data_format", "skip_bad_rows", "streaming", "router_bias_rate"):  # recorded when set: older records lack them
        if getattr(cfg, k):
            rec[k] = getattr(cfg, k)
    rec["train_data_sha256"] = _sha256(cfg.train_data)
    rec["valid_data_sha256"] = _sha256(cfg.valid_data)
    rec["chat_template_sha256"] = (hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
                                   if cfg.template == "chat" and getattr(tokenizer, "chat_template", None) else None)
    rec["expert_config"] = None if expert_cfg is None else {
        "experts": {str(l): sorted(es) for l, es in sorted(expert_cfg["experts"].items())},
        "shared_experts": bool(expert_cfg.get("shared_experts")),
        "non_expert_modules": bool(expert_cfg.get("non_expert_modules"))}
    rec["base_model"] = base_fp
    return rec


def _short(v, width: int = 120) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text if len(text) <= width else text[:width - 3] + "..."


def check_legacy_base(ckpt: Path, want: dict, model: nn.Module) -> None:
    """A checkpoint written before run records existed still names its base model: check that much."""
    from ..adapter.fingerprint import fingerprint_mismatch, fingerprint_version

    have = model_fingerprint(model, fingerprint_version(want))
    k = fingerprint_mismatch(want, have)
    if k:
        raise DataError(f"{ckpt}: checkpoint was made from another base model (its {k} fingerprint is "
                        f"{want.get(k)}, this model's is {have.get(k)}); pass allow_other_base=true to resume anyway")


def check_resume(ckpt: Path, saved: dict | None, now: dict, allow_other_base: bool) -> None:
    """Refuse to resume a checkpoint with settings that differ from this run's, naming each difference."""
    if saved is None:
        log.warning("%s predates recorded run settings: resuming without checking that they match", ckpt)
        return
    diffs = []
    for k in sorted(set(saved) | set(now)):
        if k == "base_model" and allow_other_base:
            continue
        a, b = saved.get(k), now.get(k)
        if k == "base_model" and a and b:
            a, b = ({f: x.get(f) for f in ("config", "weights")} for x in (a, b))
        if a != b:
            diffs.append(f"  {k}: checkpoint {_short(saved.get(k))}, now {_short(now.get(k))}")
    if diffs:
        raise DataError(f"{ckpt}: cannot resume, this run's settings differ from the ones the checkpoint was "
                        f"trained with:\n" + "\n".join(diffs) + "\nResume with the original settings (see "
                        "config.yaml in the output directory), or start a new output_dir / overwrite=true.")


class TrainingDiverged(ValueError):
    """A non-finite loss, gradient norm or weight: the run stops instead of writing garbage."""


def run_inputs(cfg: TrainConfig) -> dict[str, str | None]:
    """The paths a run reads; its output directory may not be, hold or lie inside any of them."""
    from ..data.spec import spec_paths

    dm = cfg.device_map if cfg.device_map and str(cfg.device_map).endswith(".json") else None
    inputs = {"model": cfg.model, "expert_config": cfg.expert_config if cfg.method in ("esft", "esft-lora") else None,
              "device_map file": dm}
    for name in ("train_data", "valid_data"):
        for i, path in enumerate(spec_paths(getattr(cfg, name)) if getattr(cfg, name) else []):
            inputs[name if i == 0 else f"{name} ({path})"] = path
    return inputs


def check_inputs(cfg: TrainConfig) -> None:
    """Each input exists and is what it should be (a directory, a file), before anything loads (the data's
    files are checked by the data layer as it reads them)."""
    kinds = {"model": "dir", "expert_config": "file", "device_map file": "file"}
    for name, path in run_inputs(cfg).items():
        if not path or name not in kinds:
            continue
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{name} {path}: not found")
        if kinds[name] == "dir" and not p.is_dir():
            raise DataError(f"{name} {path}: is a file; expected a checkpoint directory")
        if kinds[name] == "file" and p.is_dir():
            raise DataError(f"{name} {path}: is a directory; expected a file")


def _has_run(out: Path) -> bool:
    """A directory holding anything but the tool's marker (a run that failed before its first file has none)."""
    return out.is_dir() and any(p.name != MARKER for p in out.iterdir())


def _check_writable(out: Path) -> None:
    """Try a file in ``out`` (or its nearest existing parent): permissions, read-only mounts, root alike."""
    here = out
    while not here.exists():
        here = here.parent
    try:
        with tempfile.TemporaryFile(dir=here):
            pass
    except OSError as e:
        raise OutputError(f"output_dir {out}: cannot write there ({e.strerror}: {here}); choose another "
                          f"output_dir") from None


def check_output_dir(cfg: TrainConfig) -> Path:
    """Every check of the output directory, changing nothing (every process; before data or model load)."""
    out = Path(cfg.output_dir)
    check_output(out, run_inputs(cfg), "output_dir")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file, not a directory")
    if _has_run(out) and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(f"{out} exists and is not empty: pass overwrite=true to replace it "
                                  f"or resume=true to continue its training")
        check_replaceable(out, "train", run_inputs(cfg), "output_dir")
    _check_writable(out)
    ckpts = checkpoint.list_checkpoints(out) if cfg.resume and out.is_dir() else []
    if ckpts:
        done = checkpoint.step_of(ckpts[-1])
        if done > cfg.steps:
            raise ValueError(f"resume: {ckpts[-1]} has already trained {done} steps, more than steps={cfg.steps}; "
                             f"pass steps>={done} (the adapter of step {done} is in {out / 'last'} if the run "
                             f"finished)")
    return out


def prepare_output_dir(cfg: TrainConfig, writer: bool = True) -> Path:
    """Check the output directory (every process, so all refuse alike) and, in ``writer`` only, prepare it:
    a replaced run is removed (only one this tool wrote, holding none of the inputs), the marker written.

    Under torchrun only the writer checks again: every rank checked at the start (train()), and by now
    the writer may have begun writing."""
    if not writer:
        return Path(cfg.output_dir)
    out = check_output_dir(cfg)
    if _has_run(out) and cfg.resume:
        remove_stale_temps(out)
        remove_stale_temps(out / "checkpoints")
        return out
    if _has_run(out):  # overwrite=true, checked above
        shutil.rmtree(out)
    elif cfg.resume:
        log.warning("resume=true but %s holds no run yet: starting fresh", out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output_dir(out, "train")
    return out


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a run resumes from), so steps never repeat."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def nonfinite_tensors(tensors: dict[str, torch.Tensor], job) -> list[str]:
    """Names of tensors holding NaN/Inf (this process's shards); every rank learns whether any rank found one."""
    bad = [n for n, t in tensors.items() if not bool(torch.isfinite(_local(t).detach()).all())]
    if job.sum(float(len(bad))) and not bad:
        bad = ["(on another process)"]
    return bad


DEFAULT_SEQ_LEN = 4096  # the paper's packed length, when the model's context allows it


def check_context(cfg: TrainConfig, model=None) -> None:
    """seq_len must fit the model's context (config.json's max_position_embeddings), before anything loads;
    unset, it becomes the context, at most DEFAULT_SEQ_LEN."""
    from ..models.loading import config_context

    if model is not None:
        n = getattr(model.config, "max_position_embeddings", None)
    else:
        n = config_context(cfg.model)
    if cfg.seq_len is None:
        cfg.seq_len = min(DEFAULT_SEQ_LEN, n) if isinstance(n, int) else DEFAULT_SEQ_LEN
    if isinstance(n, int) and cfg.seq_len > n:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's context ({n} tokens, max_position_embeddings "
                         f"in {cfg.model}/config.json); pass seq_len<={n}")


def _name(spec) -> str:
    return str(spec) if not isinstance(spec, list) else f"({len(spec)} sources)"


def _read(cfg: TrainConfig, spec, tokenizer, what: str, max_rows: int | None = None) -> Packed:
    """A data specification -> packed rows (streaming: only ``max_rows`` rows are read and packed)."""
    res = read_examples(spec, tokenizer, cfg.template, data_format=cfg.data_format, skip_bad_rows=cfg.skip_bad_rows,
                        num_proc=cfg.data_workers if cfg.data_workers > 1 else None, streaming=cfg.streaming,
                        seed=cfg.seed, what=what)
    packed = pack(res.stream if res.stream is not None else res.table, cfg.seq_len, tokenizer.pad_token_id, cfg.overlong,
                  max_rows=max_rows if cfg.streaming else None)
    log.info("%s: %s", what, res.stats.describe())
    packed.data_stats = res.stats  # per source: layout, rows, skipped rows by reason (the summary shows them)
    return packed


def load_data(cfg: TrainConfig, tokenizer) -> tuple[Packed, Packed | None]:
    # Streaming reads the rows the steps consume (plus the held-out share), not the whole data.
    need = cfg.steps * cfg.grad_accum * cfg.batch_size
    if cfg.valid_data is None and cfg.valid_fraction > 0:
        need = math.ceil(need / (1 - cfg.valid_fraction))
    train = _read(cfg, cfg.train_data, tokenizer, "train_data", max_rows=need)
    if len(train) == 0:
        raise DataError(f"train_data {_name(cfg.train_data)}: no example left after dropping over-long ones "
                        f"({train.stats.describe()})")
    if train.stats.label_tokens == 0:
        raise DataError(f"train_data {_name(cfg.train_data)}: no token to learn ({train.stats.describe()}): the answers lie past "
                        f"seq_len={cfg.seq_len} or are all masked; raise seq_len or shorten the prompts")
    if cfg.valid_data:
        valid = _read(cfg, cfg.valid_data, tokenizer, "valid_data", max_rows=max(1, need // 10))
        if len(valid) == 0 or valid.stats.label_tokens == 0:
            raise DataError(f"valid_data {_name(cfg.valid_data)}: no validation tokens left to score "
                            f"({valid.stats.describe()})")
    else:
        stats = train.data_stats
        train, valid = _split_valid(train, cfg.valid_fraction, cfg.seed)
        train.data_stats = stats
        if int((train.labels != -100).sum()) == 0:
            raise DataError(f"train_data {_name(cfg.train_data)}: the examples left for training after holding out "
                            f"valid_fraction={cfg.valid_fraction} have no token to learn; lower valid_fraction")
    return train, valid


def adapter_dtype(cfg: TrainConfig, model: nn.Module) -> torch.dtype:
    """The adapter's dtype on disk: the base checkpoint's own (default) or float32 (``adapter_dtype=float32``)."""
    if cfg.adapter_dtype == "float32":
        return torch.float32
    found = checkpoint_dtype(cfg.model) if Path(cfg.model).is_dir() else None
    return found or next(model.parameters()).dtype


def template_meta(cfg: TrainConfig, tokenizer) -> dict:
    """How prompts were rendered in training; eval and serve render them the same way."""
    chat = getattr(tokenizer, "chat_template", None) if cfg.template == "chat" else None
    return {"name": cfg.template, "chat_template": chat}


def train(cfg: TrainConfig, model=None, tokenizer=None, progress: bool = True) -> TrainResult:
    """Run the recipe. ``model``/``tokenizer`` may be passed in (tests, benchmarks) instead of loaded."""
    from tqdm.auto import tqdm

    # Everything that can be refused is refused before the model loads: inputs, output directory, context,
    # expert config, data (tokenized with the tokenizer alone). Nothing is written until all of it passed.
    check_inputs(cfg)
    check_output_dir(cfg)
    check_context(cfg, model)
    expert_cfg = read_expert_config(cfg.expert_config) if cfg.method in ("esft", "esft-lora") else None
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    train_data, valid_data = load_data(cfg, tokenizer)
    log.info("train data: %s", train_data.stats.describe())

    job = setup(cfg)  # torchrun: join the process group; alone: world size 1, every collective a no-op
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:  # CUDA's atomics (index_add, scatter) and split-K matmuls otherwise vary run to run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if model is None and job.enabled:
        check_expert_counts(cfg.model, cfg.ep_size)
        model, _ = load_model(cfg.model, dtype=cfg.dtype, device=job.device, with_tokenizer=False,
                              distributed_config=distributed_config(cfg, job.world))
    elif model is None:
        model, _ = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                              with_tokenizer=False)
    device = input_device(model)
    # Sharded weights: the same fingerprint, read from the checkpoint's files.
    base_fp = checkpoint_fingerprint(cfg.model) if job.enabled else model_fingerprint(model)
    model_dtype = next(model.parameters()).dtype
    save_dtype = adapter_dtype(cfg, model)

    # Routing loads per step (MaxVio in the log; Loss-Free Balancing's update): hooks on the routers,
    # placed before any wrapping (PEFT keeps the same router modules).
    biases = require_bias(model, f"router_bias_rate={cfg.router_bias_rate}") if cfg.router_bias_rate > 0 else {}
    meter = LoadMeter(model)

    plan: TrainablePlan | None = None
    lplan = None  # method=esft-lora: LoRA factors on the selected experts (training/esft_lora.py)
    if cfg.method == "esft":
        # Under torchrun each layer's trainable copy is sharded over the ranks as soon as it exists.
        plan = apply_esft(model, expert_cfg, prepare=shard_trainable(job, model_dtype))  # validates the config
        params = dict(plan.params)
    elif cfg.method == "lora":
        model = lora_wrap(model, cfg)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    elif cfg.method == "esft-lora":
        from .esft_lora import apply_esft_lora

        lplan = apply_esft_lora(model, expert_cfg, cfg.lora_rank, cfg.lora_alpha, f"expert_config {cfg.expert_config}")
        params = dict(lplan.params)
    else:
        params = full_plan(model)
    check_in_memory(params)  # shared experts, non-expert modules, LoRA targets, full fine-tuning
    # Only now, with the model loaded and the plan built, is the output directory replaced or created:
    # a refusal or a failed load leaves it exactly as it was.
    out = prepare_output_dir(cfg, writer=job.main)
    job.barrier()
    record = run_record(cfg, expert_cfg, tokenizer, model_dtype, base_fp)

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    masters = MasterWeights(params)  # fp32 twins of bf16/fp16 trainable tensors; fp32 ones are their own
    opt = make_optimizer(masters.parameters(), cfg)
    # fp16 (unlike bf16) has a narrow range: small gradients flush to zero and large ones overflow, so
    # its loss is scaled (dynamically; a step with inf/NaN gradients is skipped and the scale halved).
    scaler = torch.amp.GradScaler(device.type, enabled=model_dtype == torch.float16)

    def lr_at(step: int) -> float:  # linear warmup, then constant (the paper's schedule)
        return cfg.lr * (min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)

    start, best = 0, math.inf
    state = {"best_valid_loss": None, "base_model": base_fp, "run": record}
    ckpts = checkpoint.list_checkpoints(out) if cfg.resume else []
    if ckpts:  # every rank reads its shards of the state; rank 0 alone writes files other than checkpoints
        # Checked before anything is loaded or written: a mismatch leaves the run directory as it was.
        saved = checkpoint.read_state(ckpts[-1])
        if saved.get("run") is None and saved.get("base_model") and not cfg.allow_other_base:
            check_legacy_base(ckpts[-1], saved["base_model"], model)
        check_resume(ckpts[-1], saved.get("run"), record, cfg.allow_other_base)
        state = {**checkpoint.load(ckpts[-1], masters, opt), "run": record}
        for l, b in biases.items():  # the routing bias as the checkpoint's step left it
            with torch.no_grad():
                b.copy_(torch.tensor(state["routing_bias"][str(l)], dtype=b.dtype))
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        start = state["step"]
        if start > cfg.steps:  # checked before loading too; a checkpoint written meanwhile is caught here
            raise ValueError(f"resume: {ckpts[-1]} has trained {start} steps, more than steps={cfg.steps}")
        best = state["best_valid_loss"] if state.get("best_valid_loss") is not None else math.inf
        # An eval after the last checkpoint may have written a better adapter/ before the crash.
        saved = out / "adapter" / "esft_adapter.json"
        if saved.exists():
            best = min(best, json.loads(saved.read_text()).get("valid_loss") or math.inf)
        log.info("resumed from %s at step %d", ckpts[-1], start)
        # The first run's config.yaml stays; this run's settings go beside it. Log lines the killed run
        # wrote after its last checkpoint are dropped: those steps are trained (and logged) again.
        if job.main:
            (out / f"config.resumed-at-step-{start}.yaml").write_text(to_yaml(cfg))
            trim_log(out / "train_log.jsonl", start)
    elif job.main:  # a fresh run (also resume=true with no checkpoint yet: it starts over with these settings)
        (out / "config.yaml").write_text(to_yaml(cfg))

    writer = None
    if cfg.tensorboard and job.main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"), purge_step=start or None)
    log_file = open(out / "train_log.jsonl", "a") if job.main else open(os.devnull, "w")
    meta = {"method": cfg.method, "train_config": asdict(cfg), "template": template_meta(cfg, tokenizer),
            "trained_dtype": str(model_dtype).removeprefix("torch.")}

    def check_finite(step: int, what: str):
        bad = nonfinite_tensors(masters.masters, job)
        if bad:
            raise TrainingDiverged(f"step {step}: the trainable weights hold NaN/Inf ({', '.join(bad[:3])}"
                                   f"{', ...' if len(bad) > 3 else ''}) after the update, so no {what} is written; "
                                   f"lower lr (now {cfg.lr}) and start again")

    def write_adapter(where: Path, step: int, **extra):
        check_finite(step, f"adapter {where.name}/")
        # Every rank takes part in gathering the sharded masters; rank 0 writes them.
        if job.enabled:
            job.reshard(model)
        whole = job.gather(masters.masters, save_dtype) if job.enabled else masters.masters
        if job.main:
            save_adapter(plan, where, base_fp, {**meta, "step": step, **extra}, dtype=save_dtype, source=whole)

    def write_lora(where: Path, step: int, **extra):
        """esft-lora: the selected experts' factors as a PEFT adapter (adapter/esft_lora.py)."""
        from ..adapter.esft_lora import save_lora_adapter

        check_finite(step, f"adapter {where.name}/")
        if job.main:
            save_lora_adapter(lplan, where, base_fp, {**meta, "step": step, **extra}, dtype=save_dtype,
                              source=masters.masters)

    def save_model(where: Path):
        """full: a whole checkpoint (+ tokenizer); lora: the PEFT adapter directory."""
        if job.enabled:
            job.reshard(model)
        with job.atomic_dir(where) as tmp:
            model.save_pretrained(str(tmp))  # under FSDP2 every rank gathers its shards, rank 0 writes
            if cfg.method == "full" and job.main:
                tokenizer.save_pretrained(str(tmp))

    def save_best(step: int):
        if plan is not None:
            write_adapter(out / "adapter", step, valid_loss=best)
        elif lplan is not None:
            write_lora(out / "adapter", step, valid_loss=best)
        else:  # full fine-tuning keeps its best whole checkpoint, as the others keep their best adapter
            save_model(out / ("adapter" if cfg.method == "lora" else "best"))

    model.train()
    meter.__enter__()
    t0 = time.perf_counter()
    step_times = []
    loss_ema, last_loss = None, float("nan")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train ({cfg.method})",
               disable=not (progress and job.main), dynamic_ncols=True)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            step_loss = 0.0
            t_step = time.perf_counter()
            micro_rows = [batch_rows(len(train_data), step, m, cfg.batch_size, cfg.grad_accum, cfg.seed)
                          for m in range(cfg.grad_accum)]
            # Token-weighted mean over the whole step: each micro-batch's summed loss is divided by the
            # step's total number of predicted tokens, so accumulation equals one big batch.
            n_items = sum(int((train_data.labels[r][:, 1:] != -100).sum()) for r in micro_rows)
            for rows in micro_rows:
                rows = job.rows(rows)  # this rank's share; n_items counts the whole micro-batch
                meter.begin_batch(train_data.attention_mask[rows])
                out_ = model(input_ids=train_data.input_ids[rows].to(device),
                             attention_mask=train_data.attention_mask[rows].to(device),
                             labels=train_data.labels[rows].to(device), use_cache=False,
                             num_items_in_batch=torch.tensor(max(n_items, 1), device=device))
                scaler.scale(out_.loss * job.loss_scale).backward()
                masters.accumulate()  # low-precision grads -> fp32 master grads, summed over micro-batches
                step_loss += float(out_.loss.detach())
            step_loss = job.sum(step_loss)  # each rank's loss is its share of the global token-mean
            if not math.isfinite(step_loss):  # every rank sees the same summed loss, so all stop alike
                raise TrainingDiverged(f"step {step + 1}: the training loss is {step_loss} (lr={cfg.lr}); nothing "
                                       f"of this step is kept. Lower lr, check the data and the checkpoint "
                                       f"for NaN/Inf, and start again")
            job.sum_grads(masters.parameters())  # tensors FSDP does not shard: sum their gradients over ranks
            scaler.unscale_(opt)  # fp16 only: the masters' gradients back to true scale (checks inf/NaN)
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(masters.parameters(), cfg.max_grad_norm)
                norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                # fp16's scaler skips an overflowing step by design; otherwise a NaN/Inf gradient is fatal
                if not math.isfinite(norm) and not scaler.is_enabled():
                    raise TrainingDiverged(f"step {step + 1}: the gradient norm is {norm} (loss {step_loss:.4g}); "
                                           f"nothing of this step is kept. Check the data and the checkpoint for "
                                           f"NaN/Inf, lower lr, and start again")
            scaler.step(opt)  # = opt.step(), skipped by fp16 loss scaling when a gradient overflowed
            scaler.update()
            opt.zero_grad(set_to_none=True)
            masters.sync()
            load = meter.take(job)  # the step's routing load, every rank's tokens
            for l, b in biases.items():  # Loss-Free Balancing (router_bias_rate > 0): after the step
                update_bias(b, load[l], cfg.router_bias_rate)
            last_loss = step_loss
            step_times.append(time.perf_counter() - t_step)  # float(loss) above waited for the device
            loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
            done = step + 1
            bar.set_postfix(loss=f"{loss_ema:.4f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = {"step": done, "loss": step_loss, "lr": lr_at(step),
                       "maxvio_batch": maxvio_summary(load)["mean"]}  # routing balance of this step's batch
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                if writer:
                    writer.add_scalar("train/loss", step_loss, done)
                    if rec["maxvio_batch"] is not None:
                        writer.add_scalar("train/maxvio_batch", rec["maxvio_batch"], done)
            if valid_data is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                vloss = evaluate_loss(model, valid_data, cfg.batch_size, device)
                meter.take()  # validation's routing is no training load: dropped
                # NaN = nothing to score: JSON has no NaN, so null
                log_file.write(json.dumps({"step": done, "valid_loss": vloss if math.isfinite(vloss) else None}) + "\n")
                log_file.flush()
                if writer:
                    writer.add_scalar("valid/loss", vloss, done)
                if vloss < best:  # NaN (nothing to score) never counts as best
                    best = vloss
                    save_best(done)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                check_finite(done, "checkpoint")
                state["best_valid_loss"] = None if best == math.inf else best
                state["grad_scaler"] = scaler.state_dict() if scaler.is_enabled() else None
                if biases:
                    state["routing_bias"] = {str(l): b.float().tolist() for l, b in biases.items()}
                checkpoint.save(out, done, masters, opt, state, cfg.keep_checkpoints, job)
    finally:
        meter.__exit__(None, None, None)
        bar.close()
        log_file.close()
        if writer:
            writer.close()

    # Under torchrun a low-precision model's sharded trainable copy is fp32: those shards are its masters.
    sharded_master_bytes = sum(_local(p).numel() * 4 for n, p in params.items() if ".trained." in n
                               ) if job.enabled and plan is not None and model_dtype != torch.float32 else 0
    adapter_dir = None
    if plan is not None:
        write_adapter(out / "last", cfg.steps)
        if valid_data is None or not (out / "adapter").exists():  # no validation loss ever scored: the last
            write_adapter(out / "adapter", cfg.steps)
        adapter_dir = str(out / "adapter")
    elif lplan is not None:
        write_lora(out / "last", cfg.steps)
        if valid_data is None or not (out / "adapter").exists():
            write_lora(out / "adapter", cfg.steps)
        adapter_dir = str(out / "adapter")
    else:
        save_model(out / "last")
        if cfg.method == "lora":
            if valid_data is None or not (out / "adapter").exists():
                save_model(out / "adapter")
            adapter_dir = str(out / "adapter")
    job.barrier()  # every rank returns once rank 0 has written everything
    return TrainResult(
        output_dir=str(out), steps=cfg.steps, train_loss=last_loss,
        best_valid_loss=None if best == math.inf else best,
        trainable_params=sum(p.numel() for p in params.values()),
        optimizer_state_bytes=optimizer_state_bytes(opt), seconds=time.perf_counter() - t0,
        step_seconds=statistics.median(step_times) if step_times else None,
        adapter_dir=adapter_dir,
        master_weight_bytes=masters.master_bytes() + sharded_master_bytes,
        best_dir=adapter_dir if cfg.method != "full" else str(out / ("best" if (out / "best").exists() else "last")),
        data=data_summary(train_data, valid_data),
    )


def data_summary(train: Packed, valid: Packed | None) -> str:
    """One line for the summary table: the data read, with every skipped row counted (nothing dropped silently)."""
    parts = []
    for name, packed in (("train", train), ("valid", valid)):
        st = getattr(packed, "data_stats", None)
        if st is None:
            continue
        skipped = sum(st.skipped.values())
        layouts = sorted({s.layout for s in st.sources})
        parts.append(f"{name}: {st.examples} examples ({', '.join(layouts)})"
                     + (f", {skipped} rows skipped: " + "; ".join(f"{n} x {r}" for r, n in st.skipped.most_common(3))
                        if skipped else ""))
    return " | ".join(parts)
