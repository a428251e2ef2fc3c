"""MkDocs hook: the reference pages are generated from the code at build time, so they cannot drift from it.

- ``reference/cli.md``: every ``esft`` command and subcommand (``esft data inspect`` too) with its usage,
  description and options, walked from ``esft.cli.build_parser()``;
- ``reference/config.md``: every key of the config dataclasses with its type, default and help; the help is
  the field's ``metadata["help"]`` where the class has it, else the comment written beside (or just above)
  the field in the source, else the help of the command-line option that sets it;
- ``reference/api.md``: one mkdocstrings entry per name of ``esft._API`` (the names ``import esft`` exports);
- ``recipes/index.md`` (+ the YAML files it links): ``examples/README.md``, unchanged;
- ``changelog.md``: ``CHANGELOG.md``, unchanged.

Registered in mkdocs.yml under ``hooks:``; nothing here is written into the source tree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import html
import importlib
import inspect
import io
import re
import textwrap
import tokenize
import typing
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]  # docs/hooks/reference.py -> the repository

# (class, module, where it is used, (subcommand path, flag prefix) whose option help stands in for a key the
# class documents neither in metadata nor in a comment): every typed config of the package, in the order a
# user meets them
CONFIGS = [
    ("TrainConfig", "esft.training.config", "`esft train --config FILE key=value ...`", None),
    ("ProfileConfig", "esft.profiling.run", "`esft profile`, `esft.run_profile`", (("profile",), "")),
    ("SelectConfig", "esft.selection.select", "`esft select`, `esft.select_experts`", (("select",), "")),
    ("EvalConfig", "esft.eval.run", "`esft eval`", (("eval",), "")),
    ("HarnessConfig", "esft.eval.harness", "`esft eval --harness ...`", (("eval",), "harness-")),
    ("JudgeConfig", "esft.eval.judge", "`esft eval --judge-url ... --judge-model ...`", (("eval",), "judge-")),
    ("ServeConfig", "esft.serving.server", "`esft serve`", (("serve",), "")),
    ("Limits", "esft.serving.engine", "`esft serve`'s request limits (`ServeConfig.limits`)", (("serve",), "")),
    ("EsftVllmConfig", "esft.vllm_plugin.config", "the vLLM plugin: `additional_config[\"esft\"]`", None),
    ("ReportConfig", "esft.report.config", "`esft report --config FILE key=value ...`", None),
    ("PlanConfig", "esft.planning", "`esft plan`", (("plan",), "")),
    ("DemoConfig", "esft.demo", "`esft demo`", (("demo",), "")),
    ("InspectConfig", "esft.data.inspect", "`esft data inspect`", (("data", "inspect"), "")),
]


def cell(text) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text) -> str:
    """Inline code fit for a table cell: HTML, since a pipe escaped inside Markdown backticks shows its
    backslash."""
    text = html.escape(str(text)).replace("|", "&#124;")
    return f"<code>{text}</code>"


# ---------------------------------------------------------------------------------------------- the CLI


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, sub, helps.get(name)


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if isinstance(action, argparse._StoreTrueAction) else "on"
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return ""
    if action.default == [] and action.nargs in ("*", "+"):
        return ""
    return code(action.default)


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
            names = ", ".join(code(o + metavar) for o in action.option_strings)
        else:
            names = code(action.metavar or action.dest)
        help_ = action.help or ""
        if action.choices is not None and not isinstance(action.choices, dict):
            help_ += ("; " if help_ else "") + "one of " + ", ".join(str(c) for c in action.choices)
        if action.required and action.option_strings:
            help_ = "required. " + help_
        help_ = help_.replace("%(default)s", str(action.default)).replace("%%", "%")
        rows.append(f"| {names} | {_default(action)} | {cell(help_)} |")
    return rows


def _command_section(prog: str, parser: argparse.ArgumentParser, summary: str | None) -> list[str]:
    out = [f"## {prog}", ""]
    if summary:
        out += [summary[0].upper() + summary[1:] + ".", ""]
    usage = parser.format_usage().removeprefix("usage: ").strip().replace("\n" + " " * len("usage: "), "\n")
    out += ["```text", usage, "```", ""]
    description = (parser.description or "").strip()
    if "\nconfig keys:\n" in description:  # train / report list their config keys: those have their own page
        description = description.split("\nconfig keys:\n")[0].rstrip()
        cls = {"esft train": "trainconfig", "esft report": "reportconfig"}.get(prog)
        note = f"Config keys: [Configuration keys](config.md#{cls})." if cls else ""
    else:
        note = ""
    if description:
        if parser.formatter_class is argparse.RawDescriptionHelpFormatter or "\n" in description:
            out += ["```text", description, "```", ""]
        else:
            out += [description, ""]
    if note:
        out += [note, ""]
    rows = _option_rows(parser)
    if rows:
        out += ["| option | default | meaning |", "|---|---|---|", *rows, ""]
    for name, sub, help_ in _subcommands(parser):
        out += _command_section(f"{prog} {name}", sub, help_)
    return out


def cli_page() -> str:
    from esft.cli import build_parser

    parser = build_parser()
    parser.prog = "esft"
    out = ["# Command line", "",
           "Every command and option of `esft`, generated from the argument parser (`esft.cli.build_parser()`) "
           "when the site is built; `esft COMMAND --help` prints the same. Under `torchrun`, `python -m esft` "
           "takes the same commands (see [Several GPUs and nodes](../guides/distributed.md)).", ""]
    out += ["Commands: " + ", ".join(f"[`{name}`](#esft-{name})" for name, _, _ in _subcommands(parser)) + ".", ""]
    out += _command_section("esft", parser, None)[2:]  # the top level: no heading of its own (the page title)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- the configs


def _comments(cls) -> dict[str, str]:
    """Field name -> the comment beside it (or on the comment lines just above it) in the class's source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        found = [by_line[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in by_line]
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, by_line.get(n, ""))
            n -= 1
        text = " ".join(above + found).strip()
        if text and not text.startswith("noqa"):
            out[node.target.id] = text
    return out


def _type_name(hint) -> str:
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin is typing.Union or (origin is not None and type(hint).__name__ == "UnionType"):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]" if args else getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return code(repr(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return code(repr(f.default_factory()))
    return "required"


# Keys whose option is not named --PREFIX-KEY
FLAG_ALIASES = {("HarnessConfig", "tasks"): "--harness", ("HarnessConfig", "batch_size"): "--batch-size",
                ("PlanConfig", "gpu_memory_gib"): "--gpu-memory", ("InspectConfig", "data"): "data"}


def _flag_help(root: argparse.ArgumentParser, cls: str, path: tuple[str, ...], prefix: str) -> dict[str, str]:
    """Key -> the help of the command's option that sets it (``--PREFIX-KEY``, ``_`` as ``-``, or
    FLAG_ALIASES), for keys documented nowhere else: the option sets the key, so its help describes it."""
    parser = root
    for step in path:
        parser = next(sub for name, sub, _ in _subcommands(parser) if name == step)
    by_flag = {}
    for action in parser._actions:
        if action.help and action.help != argparse.SUPPRESS:
            for flag in action.option_strings or [action.dest]:
                # the option's own default may differ from the class's (the table's default column)
                by_flag[flag] = re.sub(r"\s*\(default:? [^()]*\)", "", action.help)
    aliases = {key: flag for (c, key), flag in FLAG_ALIASES.items() if c == cls}
    return {key: by_flag[flag] for key, flag in aliases.items() if flag in by_flag} | {
        flag[2 + len(prefix):].replace("-", "_"): text for flag, text in by_flag.items()
        if flag.startswith("--" + prefix) and flag[2 + len(prefix):].replace("-", "_") not in aliases}


def config_page() -> str:
    out = ["# Configuration keys", "",
           "Every key of every typed config, generated from the config dataclasses when the site is built: "
           "type, default and help as the code states them. YAML files and `key=value` overrides are checked "
           "against these types strictly (`\"false\"` is not false, `2.5` is not an integer, `true` is not 1; "
           "YAML's `3e-5` is a number) and unknown keys are refused by name "
           "(see [Troubleshooting](../troubleshooting.md#config-errors)).", ""]
    from esft.cli import build_parser

    root = build_parser()
    for name, module, where, cli in CONFIGS:
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls)
        comments = _comments(cls)
        flags = _flag_help(root, name, *cli) if cli else {}
        out += [f"## {name}", "", f"`{module}.{name}`, used by {where}.", ""]
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(f"{name}("):
            out += [doc.split("\n\n")[0].replace("\n", " "), ""]
        out += ["| key | type | default | help |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            help_ = f.metadata.get("help") or comments.get(f.name) or flags.get(f.name, "")
            out.append(f"| `{f.name}` | {code(_type_name(hints.get(f.name, f.type)))} | {_field_default(f)} | "
                       f"{cell(help_)} |")
        out.append("")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------- the API


def api_page() -> str:
    import esft

    out = ["# Python API", "",
           "The names `import esft` exports (`esft._API`; imported lazily, so `import esft` is cheap), rendered "
           "from their docstrings when the site is built. Each lives in the module shown under its name; "
           "`esft.NAME` and `from esft import NAME` reach it as well.", "",
           "```python",
           "import esft",
           "",
           "model, tok = esft.load_model(\"path/to/checkpoint\")                 # any supported family",
           "prof = esft.run_profile(esft.ProfileConfig(data=\"task.jsonl\", seq_len=4096), model=model, tokenizer=tok)",
           "selected = esft.select_experts(prof.token_scores, esft.SelectConfig(score_function=\"token\", top_p=0.2))",
           "plan = esft.apply_esft(model, {\"experts\": selected})               # freezes all but the selected experts",
           "```", "",
           "A longer walk through these steps: [Getting started](../getting-started.md#python-api).", ""]
    by_module: dict[str, list[str]] = {}
    for name, module in esft._API.items():
        by_module.setdefault(module, []).append(name)
    for module, names in by_module.items():
        out += [f"## `{module}`", ""]
        for name in names:
            out += [f"::: {module}.{name}", ""]
            if name.endswith("Config"):  # a config's keys: the table of the Configuration keys page
                out[-1:] = ["    options:", "      members: false", "",
                            f"Its keys, with type, default and help: [Configuration keys](config.md#{name.lower()}).", ""]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- mkdocs


def _generated(config, files, uri: str, content: str | bytes) -> None:
    old = files.get_file_from_path(uri)
    if old is not None:
        files.remove(old)
    files.append(File.generated(config, uri, content=content))


def on_files(files, config):
    _generated(config, files, "reference/cli.md", cli_page())
    _generated(config, files, "reference/config.md", config_page())
    _generated(config, files, "reference/api.md", api_page())
    examples = ROOT / "examples"
    _generated(config, files, "recipes/index.md", (examples / "README.md").read_text())
    for path in sorted(examples.glob("*.yaml")):
        _generated(config, files, f"recipes/{path.name}", path.read_bytes())
    _generated(config, files, "changelog.md", (ROOT / "CHANGELOG.md").read_text())
    return files
