"""Streaming merge: a base checkpoint on disk + an expert adapter -> a standalone checkpoint on disk.

The model is never instantiated. An adapter's keys are the checkpoint's own keys (per-expert
``model.layers.5.mlp.experts.17.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.N.w1``,
or any other tensor it trained), so merging is: copy each shard, and in the shards the adapter
touches write its tensors in place of the base's, in the base tensor's dtype. Shards are handled
one at a time and tensors in 64 MiB chunks, so memory stays at the adapter plus one chunk,
whatever the checkpoint's size; untouched shards are copied byte for byte.

Everything is checked before anything is written (adapter keys, shapes, dtypes, FP8 tensors, the
index against the shards, the base-model fingerprint read from the shards), and the output
appears in one rename (``atomic_dir``), so a failure leaves no half-merged directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..io import OutputError, atomic_dir, check_output, check_replaceable, mark_output_dir, write_json_atomic
from ..models.families import NOTES
from ..models.loading import CheckpointError
from ..models.registry import meta_model, moe_layers
from .fingerprint import checkpoint_fingerprint, fingerprint_mismatch, fingerprint_version
from .io import Adapter, AdapterError, as_adapter, check_family, check_routed
from .shards import DTYPES, FLOAT_DTYPES, INDEX_FILE, Checkpoint, Shard, open_checkpoint, write_shard

log = logging.getLogger(__name__)

MERGE_RECORD = "esft_merge.json"
CASTS = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
         "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Weights in other formats would be stale copies of the unmerged base: never copied.
_OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors.index.json",
                  ".bin.index.json")


@dataclass
class MergeResult:
    out: Path
    rewritten: list[str]  # adapter keys written into the output
    shards_rewritten: list[str]
    shards_copied: list[str]
    base_check: str  # what was established about the adapter's base model
    output_bytes: int  # tensor data bytes of the output (the index's total_size)
    seconds: float


def merge_checkpoint(base: str | os.PathLike, adapter: Adapter | str | os.PathLike, out: str | os.PathLike,
                     dtype: str = "auto", overwrite: bool = False, allow_other_base: bool = False) -> MergeResult:
    """Write ``base`` + ``adapter`` to ``out`` (see the module docstring).

    dtype: "auto" keeps every tensor's own dtype (adapter tensors are cast to their base tensor's);
    "float32" / "bfloat16" / "float16" cast every floating-point tensor of the output (config.json's
    dtype follows). Raises AdapterError / CheckpointError, before writing anything, on a bad pair.
    """
    t0 = time.perf_counter()
    base, out = Path(base), Path(out)
    if dtype not in CASTS:
        raise ValueError(f"dtype must be one of {sorted(CASTS)}, got {dtype!r}")
    cast = CASTS[dtype]
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base}: not a Hugging Face checkpoint directory (no config.json)")
    check_out_apart(base, out)
    # The adapter's own training run, a directory esft did not write, the output of another command: never replaced.
    inputs = {"base checkpoint": base, "adapter": adapter.path if isinstance(adapter, Adapter) else adapter}
    check_output(out, inputs, "--out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
        if not out.is_dir():
            raise OutputError(f"--out {out} is a file, not a directory")
        check_replaceable(out, "merge", inputs, "--out")
    ckpt = open_checkpoint(base)
    from .esft_lora import is_lora_adapter, materialize_from_checkpoint, read_lora_adapter

    if not isinstance(adapter, Adapter) and is_lora_adapter(adapter):
        # ESFT-LoRA: the selected experts' rows W_e + (alpha/r) B_e A_e, from the base's shards (base checked first)
        adapter = materialize_from_checkpoint(read_lora_adapter(adapter), base, allow_other_base)
    adapter = as_adapter(adapter)  # refuses NaN / Inf tensors before anything is written
    check_family(adapter, json.loads((base / "config.json").read_text()).get("model_type"))
    check_adapter_fits(adapter, ckpt, _layouts(base))
    template = adapter_template(adapter)
    fused_rows = _fused_rows(adapter, _layouts(base))
    base_check = check_base_on_disk(adapter, base, allow_other_base)

    rewritten_shards, copied_shards, data_bytes = [], [], 0
    with atomic_dir(out) as tmp:
        for i, shard in enumerate(ckpt.shards, 1):
            mine = {k: adapter.tensors[k] for k in shard.tensors if k in adapter.tensors}
            rows = {k: fused_rows[k] for k in mine if k in fused_rows}
            if mine or _needs_cast(shard, cast):
                data_bytes += write_shard(shard, tmp / shard.path.name, mine, cast, rows)
                rewritten_shards.append(shard.path.name)
            else:
                shutil.copyfile(shard.path, tmp / shard.path.name)  # copies the bytes: the output is standalone
                data_bytes += sum(t.nbytes for t in shard.tensors.values())
                copied_shards.append(shard.path.name)
            log.info("shard %d/%d %s: %s", i, len(ckpt.shards), shard.path.name,
                     f"rewrote {len(mine)} adapter tensors" if mine else ("cast" if cast else "copied"))
        if ckpt.index is not None:
            index = dict(ckpt.index, metadata={**ckpt.index.get("metadata", {}), "total_size": data_bytes})
            write_json_atomic(tmp / INDEX_FILE, index, indent=2)
        _copy_other_files(base, tmp, {s.path.name for s in ckpt.shards})
        if cast is not None:
            _set_config_dtype(tmp / "config.json", cast)
        write_json_atomic(tmp / MERGE_RECORD, {
            "base_model": str(base), "adapter": str(adapter.path), "esft_version": __version__,
            "adapter_esft_version": adapter.meta.get("esft_version"),
            "adapter_format_version": adapter.meta.get("format_version"),
            "adapter_base_model": adapter.meta.get("base_model"), "base_check": base_check, "dtype": dtype,
            "template": template,
            "rewritten": sorted(adapter.tensors), "shards_rewritten": rewritten_shards, "shards_copied": copied_shards,
        })
        _usual_modes(tmp)
        mark_output_dir(tmp, "merge")
    return MergeResult(out, sorted(adapter.tensors), rewritten_shards, copied_shards, base_check, data_bytes,
                       time.perf_counter() - t0)


def check_out_apart(base: Path, out: Path) -> None:
    """The output must not be the base, contain it, or lie inside it: replacing ``out`` (--overwrite) would
    delete the base, and an output inside the base would be copied into later merges of it."""
    b, o = base.resolve(), out.resolve()
    if o == b:
        raise CheckpointError(f"--out {out} is the base checkpoint itself: write the merged checkpoint elsewhere")
    if o in b.parents:
        raise CheckpointError(f"--out {out} contains the base checkpoint {base}: replacing it would delete the base; "
                              "write the merged checkpoint elsewhere")
    if b in o.parents:
        raise CheckpointError(f"--out {out} lies inside the base checkpoint {base}: write the merged checkpoint "
                              "outside it")


def adapter_template(adapter: Adapter) -> dict:
    """The prompt template the adapter was trained with, as esft_adapter.json records it (older adapters: read
    from their training config; reference-code adapters: the reference template), for esft_merge.json."""
    from ..eval.generate import recorded_format

    try:
        fmt = recorded_format(adapter.meta)
    except ValueError as e:  # an unknown template name
        raise AdapterError(f"{adapter.path}: esft_adapter.json records a bad prompt template ({e})") from None
    return {"name": fmt.name, "chat_template": fmt.chat_template}


def _layouts(base: Path) -> dict:
    """layer -> ExpertLayout of the checkpoint's model, read from config.json on a weightless skeleton."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{base / 'config.json'}: cannot read the config ({e})") from None
    return {l.index: l.layout() for l in moe_layers(meta_model(config))}


def _fused_rows(adapter: Adapter, layouts: dict) -> dict[str, list[int]]:
    """Adapter key -> the expert rows it holds, for keys that are fused (all experts in one) checkpoint tensors."""
    out = {}
    for l, lay in layouts.items():
        for k in lay.fused_keys():
            if k in adapter.tensors:
                out[k] = list(adapter.expert_cfg["experts"].get(l, []))
    return out


def check_adapter_fits(adapter: Adapter, ckpt: Checkpoint, layouts: dict) -> None:
    """Every adapter tensor must name a tensor of the checkpoint, with its shape (rows of experts, for a fused
    checkpoint tensor) and a float dtype.

    Also refuses FP8-quantized target tensors and routed experts that disagree with the
    adapter's expert_cfg.json.
    """
    per_expert = {k: (l, e) for l, lay in layouts.items() for k, (e, _) in lay.per_expert_keys().items()}
    fused = {k: l for l, lay in layouts.items() for k in lay.fused_keys()}
    present: dict[int, set[str]] = {}
    for key, t in sorted(adapter.tensors.items()):
        if key in per_expert:
            l, e = per_expert[key]
            what = f"layer {l} expert {e} {key.rsplit('.', 2)[-2]} projection ({key})"
            present.setdefault(l, set()).add(key)
        elif key in fused:
            what = f"layer {fused[key]} experts {adapter.expert_cfg['experts'].get(fused[key], [])} rows of {key}"
            present.setdefault(fused[key], set()).add(key)
        else:
            what = repr(key)
        info = ckpt.tensors.get(key)
        if info is None:
            raise AdapterError(f"{adapter.path}: {what} is not a tensor of the checkpoint {ckpt.path}")
        if info.dtype.startswith("F8") or key + "_scale_inv" in ckpt.tensors:
            raise CheckpointError(
                f"{info.file}: {key} is FP8-quantized ({info.dtype} with block scales {key}_scale_inv). esft merge "
                "does not re-quantize experts: merge into the bf16 checkpoint the adapter was trained on (for "
                "DeepSeek-V3, one converted with DeepSeek's fp8_cast_bf16.py)")
        want = info.shape
        if key in fused:
            want = (len(adapter.expert_cfg["experts"].get(fused[key], [])), *info.shape[1:])
        if tuple(t.shape) != tuple(want):
            raise AdapterError(f"{adapter.path}: {what} has shape {list(t.shape)} in the adapter, "
                               f"the checkpoint expects {list(want)}")
        if not t.is_floating_point() or info.dtype not in FLOAT_DTYPES:
            base_dtype = DTYPES.get(info.dtype, info.dtype)
            raise AdapterError(f"{adapter.path}: cannot cast {key} from {t.dtype} to the checkpoint's {base_dtype}: "
                               "a merge only casts floating-point tensors to floating-point tensors")
    check_routed(adapter, layouts, present)


def check_base_on_disk(adapter: Adapter, base: Path, allow_other_base: bool) -> str:
    """Compare the adapter's recorded base fingerprint with the checkpoint's (read from the shards).

    Returns what was established, for the merge record. v1 fingerprints hash the loaded model's
    fused tensors, which the shards cannot give without loading it: logged and not checked.
    """
    want = adapter.meta.get("base_model")
    if allow_other_base:
        return "not checked (allow_other_base)"
    if not want:
        log.warning("%s has no esft_adapter.json (reference-code adapter?): its base model cannot be checked", adapter.path)
        return "not checked (adapter without esft_adapter.json)"
    model_type = json.loads((base / "config.json").read_text()).get("model_type")
    reason = getattr(NOTES.get(str(model_type)), "no_shard_check", None)
    if reason:
        log.warning("%s: the base model cannot be checked from a %s checkpoint's shards (%s); merging without the "
                    "check (attach_adapter / esft eval on the loaded base check it)", adapter.path, model_type, reason)
        return f"not checked ({model_type}: {reason})"
    version = fingerprint_version(want)
    if version == 1:
        log.warning("%s records a version-1 base fingerprint, which only a loaded model can give: the base model "
                    "cannot be checked from the shards; merging without the check (attach_adapter / esft eval "
                    "on the loaded base check it)", adapter.path)
        return "not checked (version-1 fingerprint)"
    have = checkpoint_fingerprint(base)
    if version != have["version"]:
        raise AdapterError(f"{adapter.path}: base fingerprint version {version} is unknown to this esft "
                           f"(it writes {have['version']}); pass --allow-other-base to merge anyway")
    k = fingerprint_mismatch(want, have)
    if k:
        raise AdapterError(f"{adapter.path} was trained on a different base model: its {k} fingerprint is "
                           f"{want.get(k)}, {base}'s is {have.get(k)} (pass --allow-other-base to merge anyway)")
    return "fingerprint matches"


def _needs_cast(shard: Shard, cast: torch.dtype | None) -> bool:
    return cast is not None and any(t.dtype in FLOAT_DTYPES and t.torch_dtype != cast for t in shard.tensors.values())


def _copy_other_files(base: Path, dst: Path, shards: set[str]) -> None:
    """Config, generation config, tokenizer, code, docs: everything but weights (links are followed)."""
    skip = lambda name: name in shards or name == MERGE_RECORD or name.endswith(_OTHER_WEIGHTS)  # noqa: E731
    for p in sorted(base.iterdir()):
        if skip(p.name) or (p.is_dir() and p.name.startswith(".")):
            if p.name not in shards and p.name != INDEX_FILE:
                log.info("not copied to the merged checkpoint: %s", p.name)
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, ignore=lambda _d, names: [n for n in names if skip(n)])
        else:
            shutil.copyfile(p, dst / p.name)


def _usual_modes(root: Path) -> None:
    """Temporary files and directories are private (0600/0700); a checkpoint is usually shared: umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def _set_config_dtype(config_file: Path, cast: torch.dtype) -> None:
    """config.json names the dtype the weights are stored in (transformers loads dtype="auto" from it)."""
    cfg = json.loads(config_file.read_text())
    name = str(cast).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = name
    write_json_atomic(config_file, cfg, indent=2)
