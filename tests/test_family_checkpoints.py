"""Every supported model type, from a checkpoint on disk (``esft make-tiny --family X``'s): it loads; two
adapters woven over one base give, in one batch mixing base / A / B rows, each merged model's logits; the
streaming merge (shards rewritten row by row, fused checkpoint tensors included) writes what save_pretrained
writes for the merged model. Also: an adapter of one family is refused on another, naming both."""

import pytest
import torch
from safetensors import safe_open

from esft.adapter.fingerprint import model_fingerprint
from esft.adapter.io import AdapterError, merge_adapter, save_adapter
from esft.adapter.merge import merge_checkpoint
from esft.models.families import NOTES
from esft.models.loading import load_model
from esft.models.registry import FAMILIES, get_family, moe_layers
from esft.models.tiny import make_tiny_checkpoint
from esft.serving.weave import Weaver
from esft.training.experts import apply_esft, unwrap_esft

# By default a few types that cover the kinds of layout (fused checkpoint tensors with biases, renamed per-expert
# keys, shared experts, Llama 4's dense experts, a multimodal model); every other supported type with -m slow.
# (tests/test_families.py checks every supported type by default.)
DEFAULT = {"gpt_oss", "mixtral", "deepseek_v3", "llama4", "glm4v_moe"}
TYPES = [t if t in DEFAULT else pytest.param(t, marks=pytest.mark.slow) for t in sorted(FAMILIES)]
_CKPTS = {}


def _checkpoint(model_type, root):
    """One tiny checkpoint per model type for this module, as `esft make-tiny --family` writes it (its
    tokenizer trained on a few lines: the test needs token ids, not a good tokenizer)."""
    if model_type not in _CKPTS:
        _CKPTS[model_type] = make_tiny_checkpoint(root / model_type, family=model_type, texts=_TEXTS)
    return _CKPTS[model_type]


_TEXTS = ["Reverse: red green blue", "blue green red", "User: \n\nAssistant:"] * 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("family_ckpts")


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _adapter(model, out, sel, seed, fp):
    """An adapter of ``sel`` with visibly changed experts, saved to ``out``; ``model`` is left as it was."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    plan = apply_esft(model, {"experts": sel})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plan.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    save_adapter(plan, out, fp)
    unwrap_esft(model)
    model.load_state_dict(base)
    return out


@pytest.mark.parametrize("model_type", TYPES)
def test_family_checkpoint_weave_and_streaming_merge(model_type, root, tmp_path):
    ckpt = _checkpoint(model_type, root)
    model, tok = load_model(ckpt, with_tokenizer=True)
    model.eval()
    assert get_family(model).model_type.removesuffix("_text") == model_type
    layers = moe_layers(model)
    fp = model_fingerprint(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sel_a = {l.index: [0, l.num_experts - 1] for l in layers}
    sel_b = {l.index: [l.num_experts - 1, 1] for l in layers}  # shares an expert with A, other weights
    a = _adapter(model, tmp_path / "A", sel_a, 1, fp)
    b = _adapter(model, tmp_path / "B", sel_b, 2, fp)

    names = [None, "A", "B", "A", None, "B"]
    ids = torch.randint(3, len(tok), (len(names), 9), generator=torch.Generator().manual_seed(5))
    want = {}
    with torch.no_grad():
        want[None] = model(input_ids=ids, use_cache=False).logits
        for n, d in (("A", a), ("B", b)):
            merge_adapter(model, d)
            want[n] = model(input_ids=ids, use_cache=False).logits
            if n == "A":
                model.save_pretrained(tmp_path / "merged_A")
            model.load_state_dict(base)
    assert not torch.allclose(want["A"], want[None], atol=1e-3) and not torch.allclose(want["A"], want["B"], atol=1e-3)

    # the streaming merge of the checkpoint on disk = save_pretrained of the merged model, key for key
    r = merge_checkpoint(ckpt, a, tmp_path / "streamed_A")
    reason = NOTES[model_type].no_shard_check
    assert r.base_check == (f"not checked ({model_type}: {reason})" if reason else "fingerprint matches")
    streamed, saved = _tensors(tmp_path / "streamed_A"), _tensors(tmp_path / "merged_A")
    assert set(streamed) == set(saved), sorted(set(streamed) ^ set(saved))[:5]
    for k in saved:
        assert torch.equal(streamed[k], saved[k]), k

    # two adapters woven over the base: one mixed batch, row for row each merged model's logits
    if get_family(model).experts_kind != "sparse":
        with pytest.raises(NotImplementedError, match="take no expert ids"):
            Weaver(model)
        return
    w = Weaver(model, max_adapters=2)
    w.load("A", a)
    w.load("B", b)
    w.set_rows(names)
    with torch.no_grad():
        woven = model(input_ids=ids, use_cache=False).logits
    for r, n in enumerate(names):
        torch.testing.assert_close(woven[r], want[n][r], rtol=1e-5, atol=1e-5)


def test_adapter_of_one_family_is_refused_on_another(root, tmp_path):
    mixtral, _ = load_model(_checkpoint("mixtral", root))
    fp = model_fingerprint(mixtral)
    a = _adapter(mixtral, tmp_path / "mixtral_adapter", {l.index: [0] for l in moe_layers(mixtral)}, 1, fp)
    other_ckpt = _checkpoint("qwen3_moe", root)
    other, _ = load_model(other_ckpt)
    msg = "made for model type 'mixtral', this model is 'qwen3_moe'"
    for allow in (False, True):  # another family's tensors never fit, whatever the flag
        with pytest.raises(AdapterError, match=msg):
            merge_adapter(other, a, allow_other_base=allow)
    with pytest.raises(AdapterError, match=msg):
        merge_checkpoint(other_ckpt, a, tmp_path / "out", allow_other_base=True)
    with pytest.raises(AdapterError, match=msg):
        Weaver(other).load("x", a)
    assert not (tmp_path / "out").exists()


def test_make_tiny_cli_writes_a_loadable_checkpoint_of_another_family(tmp_path):
    from esft.cli import main

    assert main(["make-tiny", "--family", "gpt_oss", "--out", str(tmp_path), "--examples", "20"]) == 0
    model, tok = load_model(tmp_path / "model")
    assert get_family(model).model_type == "gpt_oss" and len(tok) == model.config.vocab_size
