"""The shipped recipes (examples/*.yaml): each parses as a TrainConfig, and `esft plan` gives, for the
GPU layout its row in examples/README.md states, the verdict and per-GPU memory that row states.

The recipes' model/data/expert-config paths are placeholders (/models/..., /data/..., /runs/...):
TrainConfig checks the form of every value, not that a path exists, so nothing here touches them.
The plans use the published configs of esft.models.published (no download). A recipe missing from
the README, a README command that disagrees with its YAML (GPUs, batch, sequence length, expert
parallelism, checkpointing) or a layout that does not fit fails here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from esft.cli import main
from esft.config import from_dict
from esft.models.published import PUBLISHED
from esft.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RECIPES = sorted(EXAMPLES.glob("*.yaml"))
GIB = 2**30


def _table(heading: str) -> list[list[str]]:
    """Rows (cells, stripped) of the first Markdown table under ``heading`` in examples/README.md."""
    lines = (EXAMPLES / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):  # not the separator row
                rows.append(cells)
        elif seen:
            break
    return rows[1:]  # without the header row


def _code(cell: str) -> str:
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m, f"expected one `command` in {cell!r}"
    return m.group(1)


def _recipe_rows() -> dict[str, list[str]]:
    """file stem -> [recipe, model, GPUs, plan command, verdict, launch command]."""
    out = {}
    for cells in _table("## Recipes"):
        m = re.fullmatch(r"\[`?([\w.-]+)\.yaml`?\]\(([\w.-]+)\.yaml\)", cells[0])
        assert m and m.group(1) == m.group(2), f"recipe cell {cells[0]!r}"
        assert len(cells) == 6, cells
        out[m.group(1)] = cells
    return out


ROWS = _recipe_rows()


def _plan(command: str, capsys) -> dict:
    """Run `esft plan ... --json` through the CLI's own function (no subprocess) and return its JSON."""
    argv = shlex.split(command)
    assert argv[:2] == ["esft", "plan"], command
    capsys.readouterr()
    assert main([*argv[1:], "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _option(argv: list[str], name: str, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def test_every_recipe_has_a_row_and_every_row_a_recipe():
    assert RECIPES, "no recipes shipped"
    assert sorted(ROWS) == sorted(p.stem for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_as_a_train_config(path):
    cfg = from_dict(TrainConfig, yaml.safe_load(path.read_text()), source=str(path))
    assert cfg.method == "esft" and cfg.expert_config
    # The commands in the recipe's header are the README's.
    header = {k: v.strip() for k, v in re.findall(r"^# (Plan|Launch):\s+(.*)$", path.read_text(), re.M)}
    row = ROWS[path.stem]
    assert header["Plan"] == _code(row[3])
    assert header["Launch"].removesuffix("(on every node)").strip() == _code(row[5])


@pytest.mark.parametrize("stem", sorted(ROWS))
def test_recipe_fits_its_stated_layout(stem, capsys):
    _, model, gpus_cell, plan_cell, verdict, launch_cell = ROWS[stem]
    cfg = from_dict(TrainConfig, yaml.safe_load((EXAMPLES / f"{stem}.yaml").read_text()), source=stem)
    plan_cmd, launch = _code(plan_cell), shlex.split(_code(launch_cell))
    argv = shlex.split(plan_cmd)

    # The plan command describes this recipe: its model, GPUs, per-GPU batch, sequence, parallelism.
    name = _option(argv, "--model")
    assert name in PUBLISHED and Path(cfg.model).name.lower() == name, (cfg.model, name)
    gpus = int(_option(argv, "--gpus"))
    assert re.match(rf"{gpus} x ", gpus_cell), gpus_cell
    assert int(_option(argv, "--micro-batch", 1)) * gpus == cfg.batch_size
    assert int(_option(argv, "--seq-len", 4096)) == cfg.seq_len
    assert int(_option(argv, "--ep-size", 1)) == cfg.ep_size
    assert ("--gradient-checkpointing" in argv) == cfg.gradient_checkpointing
    assert _option(argv, "--method", "esft") == cfg.method
    assert _option(argv, "--dtype", "bfloat16") in (cfg.dtype, {"bfloat16": "bf16"}.get(cfg.dtype))

    # The launch command starts that many processes on this recipe.
    assert launch[-4:] == ["esft", "train", "--config", f"examples/{stem}.yaml"], launch
    if gpus == 1:
        assert launch[0] == "esft"
    else:
        assert launch[0] == "torchrun" and launch[-5] == "-m"
        opts = dict(a.split("=", 1) for a in launch[1:-5])
        assert int(opts.get("--nnodes", 1)) * int(opts["--nproc_per_node"]) == gpus, launch

    # The verdict: what `esft plan` says for it, to the 0.1 GiB the README prints.
    m = re.fullmatch(r"fits: ([\d.]+) of ([\d.]+) GiB", verdict)
    assert m, f"{stem}: verdict {verdict!r} (recipes are shipped for layouts that fit)"
    plan = _plan(plan_cmd, capsys)
    total = plan["per_rank_bytes"]["total"] / GIB
    assert plan["fits"], f"{stem}: {total:.1f} GiB per GPU of {plan['usable_gib']} usable"
    assert f"{total:.1f}" == m.group(1) and f"{plan['usable_gib']:.1f}" == m.group(2), (total, plan["usable_gib"])
    assert name == plan["model"]
    # One process with grad_accum > 1 also holds the trainable copy's bf16 gradient between micro-batches
    # (planning.py: "add T * b"); under torchrun add its 1/N shard. The recipe must fit with it too.
    if cfg.grad_accum > 1:
        extra = plan["trainable_params"] * 2 / gpus
        assert plan["per_rank_bytes"]["total"] + extra <= plan["usable_gib"] * GIB, f"{stem}: no room for grad_accum"


def test_layouts_stated_not_to_fit_do_not(capsys):
    """The README's 'Layouts that do not fit' table: the verdict and the fewest GPUs that fit."""
    rows = _table("## Layouts that do not fit")
    assert rows
    for _, plan_cell, verdict in rows:
        m = re.fullmatch(r"does not fit: ([\d.]+) of ([\d.]+) GiB; fewest GPUs: (\d+)", verdict)
        assert m, verdict
        plan = _plan(_code(plan_cell), capsys)
        assert not plan["fits"]
        assert f"{plan['per_rank_bytes']['total'] / GIB:.1f}" == m.group(1)
        assert f"{plan['usable_gib']:.1f}" == m.group(2) and plan["min_gpus"] == int(m.group(3))


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b", "glm-4.5-air", "qwen3.5-35b-a3b"])
def test_published_configs_have_the_published_parameter_counts(name):
    """The configs added for the recipes build (meta device) to their model cards' totals (2%)."""
    from esft.models.published import published_config
    from esft.planning import meta_model

    n = sum(p.numel() for p in meta_model(published_config(name)).parameters())
    assert n == pytest.approx(PUBLISHED[name].total_params, rel=0.02), f"{n / 1e9:.2f}B"
