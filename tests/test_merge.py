"""Streaming merge (esft merge) and the fingerprint v2 computed from a loaded model or from the shard files."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import build_tiny
from esft.adapter.fingerprint import (checkpoint_fingerprint, checkpoint_key_shapes, gather_flat, model_fingerprint,
                                      sample_indices)
from esft.adapter.io import AdapterError, attach_adapter, check_base, merge_to_checkpoint, read_adapter, save_adapter
from esft.adapter.merge import merge_checkpoint
from esft.cli import main
from esft.models.loading import CheckpointError
from esft.models.registry import moe_layers
from esft.models.tiny import TINY_CONFIGS as FAMILIES
from esft.training.experts import apply_esft

SEL = {1: [2, 7], 2: [0, 11, 4]}
DENSE_KEY = "model.layers.0.self_attn.q_proj.weight"  # a non-expert tensor an adapter may train too


# ---------------------------------------------------------------------------------------------
# helpers


def _save_base(model, out, dtype, shard=None, tokenizer_from=None):
    model.to(dtype).save_pretrained(str(out), **({"max_shard_size": shard} if shard else {}))
    model.float()
    if tokenizer_from is not None:
        for f in tokenizer_from.glob("tokenizer*"):
            shutil.copyfile(f, out / f.name)
    return out


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _make_adapter(base, out, sel, extra_dense=True, round_bf16=True):
    """An adapter for ``sel`` with random trained experts (and one dense tensor), exact in bf16 if asked."""
    model = _load(base)
    fp = model_fingerprint(model)
    plan = apply_esft(model, {"experts": sel})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if round_bf16:
                p.copy_(p.bfloat16().float())  # a bf16 base stores these exactly: parity holds to 1e-5
    save_adapter(plan, out, fp)
    if extra_dense:
        tensors = load_file(str(out / "adapter.safetensors"))
        w = dict(model.named_parameters())[DENSE_KEY].detach()
        tensors[DENSE_KEY] = (w + 0.05 * torch.randn(w.shape, generator=g)).bfloat16().float()
        save_file(tensors, str(out / "adapter.safetensors"), metadata={"format": "pt"})
    return out


def _write_adapter(out, tensors, experts, meta=None):
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter.safetensors"))
    (out / "expert_cfg.json").write_text(json.dumps({"experts": {str(l): es for l, es in experts.items()}}))
    if meta is not None:
        (out / "esft_adapter.json").write_text(json.dumps(meta))
    return out


def _headers(d):
    """key -> (dtype, shape) over every safetensors file of a directory."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                out[k] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def _logits(model, probe):
    with torch.no_grad():
        return model.eval()(input_ids=probe).logits


def _old_v1_weights_fingerprint(model, samples=64):
    """The v1 formula as esft 0.1 shipped it (copied from that release), to fake an adapter in the wild."""
    h = hashlib.sha256()
    named = {n.replace(".experts.base.", ".experts."): p for n, p in model.named_parameters() if ".experts.trained." not in n}
    for name in sorted(named):
        p = named[name].detach()
        flat = p.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(samples, flat.numel()), device=flat.device).long()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat.index_select(0, idx).to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


PROBE = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------------------------------
# fingerprint v2


def test_sample_indices_are_exact_above_2_pow_24():
    t = torch.arange(4097 * 4097, dtype=torch.int64).reshape(4097, 4097)  # > 2^24 elements
    n = t.numel()
    idx = sample_indices(n)
    assert idx[0] == 0 and idx[-1] == n - 1
    assert idx == [i * (n - 1) // 15 for i in range(16)]
    assert gather_flat(t, idx).tolist() == idx  # the elements read are exactly those indices (no float rounding)
    f = torch.randn(4097, 4097)
    assert torch.equal(gather_flat(f, idx), f.reshape(-1)[torch.tensor(idx)])
    assert sample_indices(1) == [0] and sample_indices(5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_key_view_is_what_save_pretrained_writes(family, tmp_path):
    """The keys and shapes the fingerprint hashes are the checkpoint's (only persistent buffers are not hashed)."""
    model = build_tiny(family)
    model.save_pretrained(str(tmp_path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    ours = checkpoint_key_shapes(skeleton)
    written = {k: shape for k, (_, shape) in _headers(tmp_path).items()}
    assert all(written[k] == s for k, s in ours.items())
    assert {k for k in written if k not in ours} == {k for k, _ in model.named_buffers() if k in written}


@pytest.mark.parametrize("family", ["deepseek_v2", "mixtral", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_checkpoint_fingerprint_equals_model_fingerprint(family, tmp_path):
    model = build_tiny(family)
    bf16 = _save_base(model, tmp_path / "bf16", torch.bfloat16, shard="100KB")
    fp32 = _save_base(model, tmp_path / "fp32", torch.float32)
    from_files = checkpoint_fingerprint(bf16)
    assert from_files["version"] == 2
    for dtype in (torch.float32, torch.bfloat16):  # an fp32 and a bf16 load of the bf16 checkpoint agree
        loaded = AutoModelForCausalLM.from_pretrained(str(bf16), dtype=dtype)
        assert model_fingerprint(loaded) == from_files
    assert checkpoint_fingerprint(fp32)["config"] == from_files["config"]
    assert checkpoint_fingerprint(fp32) == model_fingerprint(_load(fp32))
    wrapped = _load(bf16)
    apply_esft(wrapped, {"experts": {moe_layers(wrapped)[0].index: [0, 3]}})
    assert model_fingerprint(wrapped) == from_files  # an ESFT-wrapped model hashes as its base


def test_v1_adapter_still_passes_check_base(tiny_dir, tmp_path):
    model = _load(tiny_dir / "model")
    old = {"config": model_fingerprint(model)["config"], "weights": _old_v1_weights_fingerprint(model)}
    adapter = read_adapter(_make_adapter(tiny_dir / "model", tmp_path / "a", SEL, extra_dense=False))
    adapter.meta["base_model"] = old  # as an adapter written by esft 0.1
    check_base(model, adapter)
    check_base(model, adapter, model_fingerprint(model))  # a precomputed v2 value is not used for a v1 adapter
    adapter.meta["base_model"] = {**old, "weights": "0" * 16}
    with pytest.raises(AdapterError, match="different base model: its weights fingerprint"):
        check_base(model, adapter)


# ---------------------------------------------------------------------------------------------
# streaming merge: parity


@pytest.mark.parametrize("dtype,shard", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "100KB")])
def test_merged_checkpoint_equals_attach_adapter(tiny_dir, tmp_path, dtype, shard):
    base = _save_base(_load(tiny_dir / "model"), tmp_path / "base", dtype, shard, tokenizer_from=tiny_dir / "model")
    adapter = _make_adapter(base, tmp_path / "adapter", SEL)
    out = merge_to_checkpoint(str(base), str(adapter), str(tmp_path / "merged"))

    want = _load(base)
    attach_adapter(want, adapter)
    torch.testing.assert_close(_logits(_load(out), PROBE), _logits(want, PROBE), rtol=1e-5, atol=1e-5)

    assert _headers(out) == _headers(base)  # same keys, shapes and dtypes: bf16 stays bf16
    base_files = sorted(p.name for p in base.iterdir())
    # .esft-output.json: the ownership marker esft.io writes into every output directory it makes
    assert sorted(p.name for p in out.iterdir() if p.name != ".esft-output.json") == sorted(base_files + ["esft_merge.json"])
    for name in base_files:
        a, b = base / name, out / name
        if name.endswith(".safetensors"):
            assert a.stat().st_size == b.stat().st_size, name  # output size = base size
        elif name != "model.safetensors.index.json":  # rewritten (total_size), compared below
            assert a.read_bytes() == b.read_bytes(), name
        assert b.stat().st_mode & 0o044 == 0o044, name  # readable by others, like the files save_pretrained writes
    assert out.stat().st_mode & 0o055 == 0o055
    record = json.loads((out / "esft_merge.json").read_text())
    rewritten = sorted(load_file(str(adapter / "adapter.safetensors")))
    assert record["rewritten"] == rewritten and DENSE_KEY in rewritten
    assert record["base_check"] == "fingerprint matches"
    if shard:
        assert record["shards_copied"] and record["shards_rewritten"]
        for name in record["shards_copied"]:
            assert (base / name).read_bytes() == (out / name).read_bytes()
        idx_base = json.loads((base / "model.safetensors.index.json").read_text())
        idx_out = json.loads((out / "model.safetensors.index.json").read_text())
        assert idx_out["weight_map"] == idx_base["weight_map"]
        assert idx_out["metadata"]["total_size"] == idx_base["metadata"]["total_size"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_mixtral_keys_merge(tmp_path):
    base = _save_base(build_tiny("mixtral"), tmp_path / "base", torch.float32)
    adapter = _make_adapter(base, tmp_path / "adapter", {0: [1], 2: [3, 5]}, extra_dense=False, round_bf16=False)
    assert "model.layers.0.block_sparse_moe.experts.1.w1.weight" in load_file(str(adapter / "adapter.safetensors"))
    out = merge_to_checkpoint(str(base), str(adapter), str(tmp_path / "merged"))
    want = _load(base)
    attach_adapter(want, adapter)
    torch.testing.assert_close(_logits(_load(out), PROBE), _logits(want, PROBE), rtol=1e-5, atol=1e-5)


def test_dtype_option_casts_floating_tensors_through_the_cli(tiny_dir, tmp_path, capsys):
    base = _save_base(_load(tiny_dir / "model"), tmp_path / "base", torch.bfloat16, tokenizer_from=tiny_dir / "model")
    adapter = _make_adapter(base, tmp_path / "adapter", SEL)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "float32"]) == 0
    assert "fingerprint matches" in capsys.readouterr().out
    assert {d for d, _ in _headers(out).values()} == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(str(out))  # dtype from config.json
    assert merged.dtype == torch.float32
    want = _load(base)
    attach_adapter(want, adapter)
    torch.testing.assert_close(_logits(merged, PROBE), _logits(want, PROBE), rtol=1e-5, atol=1e-5)
    # --overwrite semantics as before: refused without, replaced with
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 0
    assert {d for d, _ in _headers(out).values()} == {"BF16"}


# ---------------------------------------------------------------------------------------------
# streaming merge: bad input, refused before anything is written


def _refused(base, adapter, out, exc, match, **kw):
    with pytest.raises(exc, match=match):
        merge_checkpoint(base, adapter, out, **kw)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_adapters_are_refused(tiny_dir, tmp_path):
    base, out = tiny_dir / "model", tmp_path / "merged"
    key = "model.layers.1.mlp.experts.2.{}_proj.weight"
    good = {key.format("gate"): torch.zeros(32, 64), key.format("up"): torch.zeros(32, 64),
            key.format("down"): torch.zeros(64, 32)}
    a = _write_adapter(tmp_path / "absent", {**good, "model.layers.1.mlp.experts.99.gate_proj.weight": torch.zeros(32, 64)},
                       {1: [2, 99]})
    _refused(base, a, out, AdapterError, r"'model\.layers\.1\.mlp\.experts\.99"
             r"\.gate_proj\.weight' is not a tensor of the checkpoint")
    a = _write_adapter(tmp_path / "dense", {**good, "model.layers.0.self_attn.nope.weight": torch.zeros(3)}, {1: [2]})
    _refused(base, a, out, AdapterError, "'model.layers.0.self_attn.nope.weight' is not a tensor of the checkpoint")
    a = _write_adapter(tmp_path / "shape", {**good, key.format("up"): torch.zeros(5, 5)}, {1: [2]})
    _refused(base, a, out, AdapterError, r"layer 1 expert 2 up_proj projection .* has shape \[5, 5\] in the adapter, "
             r"the checkpoint expects \[32, 64\]")
    for bad in (torch.zeros(32, 64, dtype=torch.int32), torch.zeros(32, 64, dtype=torch.complex64)):
        a = _write_adapter(tmp_path / f"dtype_{bad.dtype}", {**good, key.format("gate"): bad}, {1: [2]})
        _refused(base, a, out, AdapterError, rf"cannot cast {key.format('gate')} from {bad.dtype} to the checkpoint's "
                 r"torch.float32")
    a = _write_adapter(tmp_path / "cfg", good, {1: [3]})
    _refused(base, a, out, AdapterError, "holds layer 1 expert 2, which its expert_cfg.json does not list")


def test_inconsistent_shards_and_index_are_refused(tiny_dir, tmp_path):
    base = _save_base(_load(tiny_dir / "model"), tmp_path / "base", torch.float32, "200KB")
    adapter = _make_adapter(base, tmp_path / "adapter", SEL, extra_dense=False)
    index_file = base / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    out = tmp_path / "merged"

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(base, d)
        idx = json.loads(json.dumps(index))
        edit(d, idx)
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return d

    d = broken("missing_file", lambda d, idx: (d / second).unlink())
    _refused(d, adapter, out, CheckpointError, rf"maps .* keys .* to {second}, which is not a file in")
    d = broken("missing_key", lambda d, idx: idx["weight_map"].__setitem__("model.layers.9.extra.weight", first))
    _refused(d, adapter, out, CheckpointError, rf"{first} lacks 'model.layers.9.extra.weight', which "
             "model.safetensors.index.json maps to it")
    some_key = next(k for k, f in index["weight_map"].items() if f == second)
    d = broken("unlisted_key", lambda d, idx: idx["weight_map"].pop(some_key))
    _refused(d, adapter, out, CheckpointError, rf"{second} holds '{some_key}', which model.safetensors.index.json "
             "does not map to it")


def test_base_model_check_from_the_shards(tiny_dir, tmp_path, caplog):
    from esft.models.tiny import make_tiny_checkpoint

    adapter = _make_adapter(tiny_dir / "model", tmp_path / "adapter", SEL, extra_dense=False)
    other = make_tiny_checkpoint(tmp_path / "other", seed=123)
    _refused(other, adapter, tmp_path / "m1", AdapterError, "trained on a different base model: its weights fingerprint")
    r = merge_checkpoint(other, adapter, tmp_path / "m2", allow_other_base=True)
    assert r.base_check == "not checked (allow_other_base)"
    # a v1 adapter (no "version"): its base cannot be checked from the shards; warned, merged
    meta = json.loads((adapter / "esft_adapter.json").read_text())
    meta["base_model"] = {"config": meta["base_model"]["config"], "weights": "0123456789abcdef"}
    (adapter / "esft_adapter.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="esft.adapter.merge"):
        r = merge_checkpoint(tiny_dir / "model", adapter, tmp_path / "m3")
    assert r.base_check == "not checked (version-1 fingerprint)"
    assert "version-1 base fingerprint" in caplog.text and "cannot be checked from the shards" in caplog.text


def test_fp8_checkpoint_is_refused(tmp_path):
    """A DeepSeek-V3-style FP8 checkpoint: float8_e4m3fn weights with weight_scale_inv block scales."""
    base = tmp_path / "fp8"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    key = "model.layers.1.mlp.experts.0.{}_proj.weight"
    shapes = {"gate": (256, 128), "up": (256, 128), "down": (128, 256)}
    tensors = {"model.norm.weight": torch.ones(128, dtype=torch.bfloat16)}
    for part, shape in shapes.items():
        tensors[key.format(part)] = torch.randn(shape).to(torch.float8_e4m3fn)
        tensors[key.format(part) + "_scale_inv"] = torch.ones(shape[0] // 128, shape[1] // 128)
    save_file(tensors, str(base / "model.safetensors"))
    adapter = _write_adapter(tmp_path / "adapter", {key.format(p): torch.zeros(s) for p, s in shapes.items()}, {1: [0]})
    _refused(base, adapter, tmp_path / "merged", CheckpointError,
             r"experts\.0\.down_proj\.weight is FP8-quantized \(F8_E4M3 with block scales .*weight_scale_inv\)\. "
             "esft merge does not re-quantize experts: merge into the bf16 checkpoint")


# ---------------------------------------------------------------------------------------------
# dtypes esft cannot interpret, the output's place, the prompt template


def _with_extra_tensors(src, dst, extra):
    """A copy of checkpoint ``src`` whose single model.safetensors also holds (or replaces) ``extra``."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({**tensors, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _raw(path, key):
    """(dtype name, shape, raw bytes) of one tensor, read from the file itself."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    h = json.loads(data[8:8 + n])[key]
    begin, end = h["data_offsets"]
    return h["dtype"], h["shape"], data[8 + n + begin:8 + n + end]


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_tensors_of_unknown_dtypes_next_to_the_experts_are_copied_byte_for_byte(tiny_dir, tmp_path, dtype):
    counts = torch.tensor([0, 1, 2**31 + 5, 2**32 - 1], dtype=torch.int64).to(torch.uint32)
    extra = {"model.layers.1.mlp.expert_counts": counts,
             "model.layers.1.mlp.scales_e8m0": torch.tensor([0.5, 1.0, 4.0]).to(torch.float8_e8m0fnu),
             "model.layers.1.mlp.u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
             "model.layers.1.mlp.u64": torch.tensor([2**40, 3], dtype=torch.int64).to(torch.uint64)}
    base = _with_extra_tensors(tiny_dir / "model", tmp_path / "base", extra)
    adapter = _make_adapter(tiny_dir / "model", tmp_path / "adapter", SEL, extra_dense=False)
    r = merge_checkpoint(base, adapter, tmp_path / "merged", dtype=dtype)
    assert r.shards_rewritten == ["model.safetensors"]  # the shard holding the experts and the odd tensors
    out = tmp_path / "merged" / "model.safetensors"
    for key in extra:
        assert _raw(out, key) == _raw(base / "model.safetensors", key), key
    merged = load_file(str(out))
    assert merged["model.layers.1.mlp.expert_counts"].dtype == torch.uint32
    assert merged["model.layers.1.mlp.expert_counts"].to(torch.int64).tolist() == [0, 1, 2**31 + 5, 2**32 - 1]
    k = "model.layers.1.mlp.experts.2.gate_proj.weight"
    want = load_file(str(adapter / "adapter.safetensors"))[k]
    torch.testing.assert_close(merged[k].float(), want.to(merged[k].dtype).float())


def test_a_tensor_of_an_unknown_dtype_that_must_be_read_is_refused_naming_it(tiny_dir, tmp_path):
    from esft.adapter.shards import open_checkpoint, read_elements

    key = "model.norm.weight"  # sampled by the base fingerprint: its elements must be interpreted
    shape = load_file(str(tiny_dir / "model" / "model.safetensors"))[key].shape
    base = _with_extra_tensors(tiny_dir / "model", tmp_path / "base", {key: torch.ones(shape, dtype=torch.uint32)})
    adapter = _make_adapter(tiny_dir / "model", tmp_path / "adapter", SEL, extra_dense=False)
    match = rf"{tmp_path / 'base' / 'model.safetensors'}: '{key}' is stored as U32, a safetensors dtype esft cannot"
    _refused(base, adapter, tmp_path / "merged", CheckpointError, match)
    info = open_checkpoint(base).tensors[key]
    with pytest.raises(CheckpointError, match=match):
        _ = info.torch_dtype
    with pytest.raises(CheckpointError, match=match):
        read_elements(0, info, [0])


def test_out_containing_or_inside_the_base_is_refused(tiny_dir, tmp_path, capsys):
    adapter = _make_adapter(tiny_dir / "model", tmp_path / "adapter", SEL, extra_dense=False)
    root = tmp_path / "root"
    base = root / "ckpts" / "base"
    shutil.copytree(tiny_dir / "model", base)
    before = sorted(p.name for p in base.iterdir())
    for out in (root, root / "ckpts", root / "ckpts" / ".." / "ckpts"):
        with pytest.raises(CheckpointError, match=r"contains the base checkpoint .*would delete the base"):
            merge_checkpoint(base, adapter, out, overwrite=True)
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(root), "--overwrite"]) == 2
    assert "contains the base checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="lies inside the base checkpoint"):
        merge_checkpoint(base, adapter, base / "merged")
    with pytest.raises(CheckpointError, match="is the base checkpoint itself"):
        merge_checkpoint(base, adapter, root / "ckpts" / "base", overwrite=True)
    assert sorted(p.name for p in base.iterdir()) == before  # the base is untouched, nothing written into it
    merge_checkpoint(base, adapter, root / "ckpts" / "base-merged")  # a sibling whose name extends the base's: fine


def test_the_adapters_prompt_template_is_recorded_in_the_merge(tiny_dir, tmp_path):
    chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
    adapter = _make_adapter(tiny_dir / "model", tmp_path / "adapter", SEL, extra_dense=False)
    meta_file = adapter / "esft_adapter.json"
    meta = json.loads(meta_file.read_text())
    cases = [({"template": {"name": "chat", "chat_template": chat_template}}, {"name": "chat", "chat_template": chat_template}),
             ({"train_config": {"template": "chat"}}, {"name": "chat", "chat_template": None}),  # older adapters
             ({"template": {"name": "reference", "chat_template": None}}, {"name": "reference", "chat_template": None})]
    for i, (edit, want) in enumerate(cases):
        m = {k: v for k, v in meta.items() if k not in ("template", "train_config")}
        meta_file.write_text(json.dumps({**m, **edit}))
        out = merge_checkpoint(tiny_dir / "model", adapter, tmp_path / f"m{i}").out
        assert json.loads((out / "esft_merge.json").read_text())["template"] == want
    meta_file.unlink()  # reference-code adapter: trained on the reference template
    out = merge_checkpoint(tiny_dir / "model", adapter, tmp_path / "ref").out
    assert json.loads((out / "esft_merge.json").read_text())["template"] == {"name": "reference", "chat_template": None}
