"""The documentation site builds strictly, and a link to a page or anchor that does not exist fails the build.

`make docs` runs the same strict build (mkdocs.yml: `strict: true` and `validation:` warnings). The docs extra
is installed by `make install`; without it these tests fail, they do not skip, so CI cannot lose the check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
        import material  # noqa: F401
    except ImportError as e:  # pragma: no cover - a venv without the docs extra
        pytest.fail(f"the docs extra is not installed ({e}): pip install -e '.[docs]' (make install does)")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_docs_build_strictly(tmp_path):
    r = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "WARNING" not in out, out
    site = tmp_path / "site"
    # the generated reference pages are there, with what they are generated from
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "esft data inspect" in cli and "--max-adapter-experts" in cli
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "TrainConfig" in config and "router_bias_rate" in config and "InspectConfig" in config
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "select_experts" in api and "merge_adapter" in api
    assert (site / "recipes" / "deepseek-v2-lite-1xh100.yaml").is_file()
    # nothing is fetched from the internet: no web fonts, Material's assets are in the site
    home = (site / "index.html").read_text()
    assert "fonts.googleapis.com" not in home and "fonts.gstatic.com" not in home
    assert list((site / "assets" / "stylesheets").glob("main.*.min.css"))


def test_broken_link_and_anchor_fail_the_build(tmp_path):
    """A copy of the docs with one link to a missing page and one to a missing anchor: the build fails, naming
    both."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("*.json", "hooks"))
    page = docs / "getting-started.md"
    page.write_text(page.read_text() + "\n\nSee [a page that is not there](guides/no-such-page.md) and "
                    "[an anchor that is not there](guides/data.md#no-such-anchor).\n")
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    cfg["docs_dir"] = str(docs)
    cfg["hooks"] = [str(ROOT / h) for h in cfg["hooks"]]  # the real hook: it reads examples/ and CHANGELOG.md
    for plugin in cfg["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [str(ROOT / p) for p in python["paths"]]
    config = tmp_path / "mkdocs.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = _mkdocs_build(config, tmp_path / "site")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "'guides/no-such-page.md', but the target is not found" in out, out
    assert "does not contain an anchor '#no-such-anchor'" in out, out
    assert "Aborted with 2 warnings in strict mode" in out, out
