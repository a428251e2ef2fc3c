"""`python -m esft.embedded.specialization`: figures recomputed independently from the scores it saves."""

import json

import numpy as np


def test_specialization_report_matches_an_independent_computation(tmp_path):
    from esft.embedded.specialization import main

    out = tmp_path / "spec.md"
    assert main(["--model", "small", "--tokens", "512", "--out", str(out)]) == 0
    md = out.read_text()
    res = json.loads(out.with_suffix(".json").read_text())
    assert md.startswith("# Expert specialization on `small`")
    assert "`python -m esft.embedded.specialization --model small --out " in md
    assert (tmp_path / "spec_overlap.png").stat().st_size > 0 and (tmp_path / "spec_routing.png").stat().st_size > 0
    E = res["num_experts"]
    assert res["uniform_half_mass"] == E // 2
    for name, t in res["tasks"].items():
        for layer in res["layers"]:
            s = np.sort(np.asarray(t["token_scores"][str(layer)], dtype=float))[::-1]
            # the fewest experts whose share of the selection mass reaches one half
            expect = int(np.argmax(np.cumsum(s) >= 0.5 * s.sum() - 1e-12)) + 1
            assert t["experts_for_half_mass"][str(layer)] == expect, (name, layer)
    names = list(res["tasks"])
    for a in names:
        for b in names:
            jac = np.mean([len(set(res["tasks"][a]["selected"][str(l)]) & set(res["tasks"][b]["selected"][str(l)]))
                           / max(len(set(res["tasks"][a]["selected"][str(l)]) | set(res["tasks"][b]["selected"][str(l)])), 1)
                           for l in res["layers"]])
            assert abs(res["overlap"][f"{a}|{b}"] - jac) < 1e-9, (a, b)
    assert all(res["overlap"][f"{a}|{a}"] == 1.0 for a in names)
    row = next(line for line in md.splitlines() if line.startswith("| translate_synth |"))
    half = [res["tasks"]["translate_synth"]["experts_for_half_mass"][str(l)] for l in res["layers"]]
    assert row.startswith(f"| translate_synth | adaptation | {' | '.join(map(str, half))} |")
