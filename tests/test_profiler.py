"""ESFT scores against an independent computation from the model's own router logits."""

import pytest
import torch

from conftest import build_tiny
from esft.models.registry import moe_layers
from esft.profiling.profiler import concentration, profile_routing


def naive_scores(model, input_ids, attention_mask):
    """Per the paper: per sequence, mean over its real tokens; then mean over sequences. Plain loops."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    layers = moe_layers(model)
    B, T = input_ids.shape
    gate, token = {}, {}
    for l, logits in zip(layers, out.router_logits):
        E, K = l.num_experts, l.top_k
        probs = logits.float().softmax(-1).reshape(B, T, E)
        g_l, t_l = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        for b in range(B):
            n = int(attention_mask[b].sum())
            g_s, t_s = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
            for t in range(T):
                if not attention_mask[b, t]:
                    continue
                top = probs[b, t].topk(K).indices
                for e in top.tolist():
                    g_s[e] += float(probs[b, t, e])
                    t_s[e] += 1.0 / K
            g_l += g_s / n
            t_l += t_s / n
        gate[l.index] = (g_l / B).tolist()
        token[l.index] = (t_l / B).tolist()
    return gate, token


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "mixtral", "olmoe"])
def test_scores_match_naive_computation_with_padding(family):
    model = build_tiny(family)
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # sequences of different lengths
    mask[2, 4:] = 0
    with torch.no_grad():
        want_gate, want_tok = naive_scores(model, ids, mask)
        prof = profile_routing(model, [{"input_ids": ids, "attention_mask": mask}])
    assert prof.num_sequences == 3 and prof.num_tokens == 12 + 7 + 4
    for l in prof.layers:
        torch.testing.assert_close(torch.tensor(prof.gate_scores[l]), torch.tensor(want_gate[l]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(prof.token_scores[l]), torch.tensor(want_tok[l]), rtol=1e-5, atol=1e-6)
        assert sum(prof.token_scores[l]) == pytest.approx(1.0)


def test_batching_does_not_change_scores():
    model = build_tiny("deepseek_v2")
    torch.manual_seed(2)
    rows = [torch.randint(3, 500, (1, n)) for n in (10, 6, 9)]
    alone = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]
    padded = torch.full((3, 10), 2)
    mask = torch.zeros((3, 10), dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : r.shape[1]] = r[0]
        mask[i, : r.shape[1]] = 1
    with torch.no_grad():
        a = profile_routing(model, alone)
        b = profile_routing(model, [{"input_ids": padded, "attention_mask": mask}])
    for l in a.layers:
        torch.testing.assert_close(torch.tensor(a.token_scores[l]), torch.tensor(b.token_scores[l]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(a.gate_scores[l]), torch.tensor(b.gate_scores[l]), rtol=1e-4, atol=1e-6)


def test_deepseek_v3_gate_values_are_topk_normalised_sigmoid():
    model = build_tiny("deepseek_v3")
    ids = torch.randint(3, 500, (2, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prof = profile_routing(model, [{"input_ids": ids, "attention_mask": mask}])
    for l in prof.layers:
        # normalised over each token's top-k, so every token contributes exactly 1 to the layer's gate mass
        assert sum(prof.gate_scores[l]) == pytest.approx(1.0, abs=1e-5)
        assert sum(prof.token_scores[l]) == pytest.approx(1.0, abs=1e-9)


def test_summary_layout_and_hooks_removed(tiny_dir):
    from esft.models.loading import load_model
    from esft.profiling.run import ProfileConfig, run_profile

    model, tok = load_model(tiny_dir / "model")
    out = tiny_dir / "scores_layout.json"
    prof = run_profile(ProfileConfig(model="", data=str(tiny_dir / "train.jsonl"), out=str(out), seq_len=128,
                                     max_tokens=1000, batch_size=4), model=model, tokenizer=tok, progress=False)
    assert prof.num_tokens == 1000  # the budget is exact
    import json

    s = json.loads(out.read_text())
    assert set(s["token_scores"]) == {"1", "2"}  # the model's own layer indices (layer 0 is dense)
    assert set(s["token_scores"]["1"]) == {str(e) for e in range(16)}
    assert all(not l.router._forward_hooks for l in moe_layers(model))


def test_concentration():
    assert concentration([0.5, 0.3, 0.2], 0.5) == 1
    assert concentration([0.25] * 4, 0.5) == 2
    assert concentration([0.1, 0.6, 0.3], 0.8) == 2
