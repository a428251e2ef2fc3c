"""Dataset layouts -> the one internal conversation form.

Every layout users bring (OpenAI ``messages``, ShareGPT, Alpaca, TRL prompt/completion, plain
``text``, the reference eval files' ``prompt`` + ``answers``) is a registry entry: the columns that
identify it and a function that turns one row into a :class:`Conversation`. Everything downstream
(tokenizing, packing, profiling, training, evaluation) sees only conversations, so the same
conversations in any layout give the same token ids and loss labels.

Internal form (``Conversation.messages``), one dict per turn::

    {"role": "system" | "user" | "assistant" | "tool", "content": str,
     "learn": bool,                 # assistant turns only: in the loss (False: masked)
     "tool_calls": [...], "name": str, "tool_call_id": str}   # when present, for chat templates

``Conversation.text`` instead holds plain text for continued pretraining (every token learned).
A column mapping renames the columns a layout reads (``{"messages": "dialog"}``); for ShareGPT it
may also rename the speaker tags (``{"user_tag": "user", "assistant_tag": "bot"}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from ..io import DataError


@dataclass
class Conversation:
    messages: list[dict] | None = None  # the turns (see the module docstring)
    text: str | None = None  # plain text: every token learned
    tools: list | None = None  # tool schemas for the chat template
    references: list[str] | None = None  # reference answers (eval files); else the last assistant turn
    source: str = ""  # "file:line" or "file record N" for error messages


@dataclass(frozen=True)
class Layout:
    name: str
    keys: tuple[str, ...]  # internal column names that must be present (and non-null) to detect it
    convert: Callable[[dict, "Columns", str], Conversation]
    example: str  # one line for the README / error messages
    optional: tuple[str, ...] = ()  # other columns it reads


class Columns:
    """A layout's column names after the user's mapping (``{internal: user's column}``)."""

    def __init__(self, mapping: dict[str, str] | None):
        self.mapping = dict(mapping or {})

    def __call__(self, key: str) -> str:
        return self.mapping.get(key, key)

    def get(self, row: dict, key: str):
        return row.get(self(key))


def _fail(source: str, field_: str, expected: str, found) -> DataError:
    shown = json.dumps(found, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return DataError(f"{source}: field {field_!r}: expected {expected}, found {type(found).__name__} {shown}")


def _text(value, source: str, field_: str) -> str:
    """Message content as text: a string, or OpenAI's list of parts ({"type": "text", "text": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for i, p in enumerate(value):
            if p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                raise _fail(source, f"{field_}[{i}]", "a text part {'type': 'text', 'text': str} (only text is "
                            "trained)", p)
            parts.append(p["text"])
        return "".join(parts)
    raise _fail(source, field_, "a string or a list of text parts", value)


def _learn(m: dict, source: str, where: str) -> bool:
    """An assistant turn is learned unless ``mask: 1`` (esft) or ``weight: 0`` (OpenAI fine-tuning) says not."""
    learn = True
    if m.get("mask") is not None:
        if m["mask"] not in (0, 1):
            raise _fail(source, f"{where}.mask", "0 or 1 (1 = not learned)", m["mask"])
        learn = learn and m["mask"] == 0
    if m.get("weight") is not None:
        if m["weight"] not in (0, 1):
            raise _fail(source, f"{where}.weight", "0 or 1 (0 = not learned)", m["weight"])
        learn = learn and m["weight"] == 1
    return learn


ROLES = ("system", "user", "assistant", "tool")


def _finish(messages: list[dict], source: str, tools=None, references=None) -> Conversation:
    if not messages:
        raise DataError(f"{source}: empty conversation")
    if not any(m["role"] == "assistant" for m in messages) and references is None:
        raise DataError(f"{source}: conversation has no assistant turn, so nothing to learn from it")
    if tools is not None and not isinstance(tools, list):
        if isinstance(tools, str):  # LLaMA-Factory stores tools as a JSON string
            try:
                tools = json.loads(tools)
            except ValueError:
                raise _fail(source, "tools", "a list of tool schemas (or its JSON text)", tools) from None
        if not isinstance(tools, list):
            raise _fail(source, "tools", "a list of tool schemas", tools)
    return Conversation(messages=messages, tools=tools or None, references=references, source=source)


def from_messages(row: dict, col: Columns, source: str) -> Conversation:
    out = _messages(col.get(row, "messages"), col("messages"), source)
    return _finish(out, source, tools=col.get(row, "tools"), references=_references(row, col, source))


def _messages(msgs, name: str, source: str) -> list[dict]:
    """OpenAI-style messages -> the internal form (checked; no conversation-level checks)."""
    if not isinstance(msgs, list) or not msgs:
        raise _fail(source, name, "a non-empty list of messages", msgs)
    out = []
    for i, m in enumerate(msgs):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _fail(source, where, "a message object {role, content}", m)
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{source}: field '{where}.role': unknown role {role!r}; known roles: {', '.join(ROLES)}")
        if "content" not in m and not m.get("tool_calls"):
            raise DataError(f"{source}: field '{where}': a message needs content (or tool_calls)")
        msg = {"role": role, "content": "" if m.get("content") is None else _text(m["content"], source,
                                                                                    f"{where}.content")}
        if role == "assistant":
            msg["learn"] = _learn(m, source, where)
        for k in ("tool_calls", "name", "tool_call_id"):
            if m.get(k) is not None:
                msg[k] = m[k]
        out.append(msg)
    return out


def _references(row: dict, col: Columns, source: str) -> list[str] | None:
    answers = col.get(row, "answers")
    if answers is None:
        return None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise _fail(source, col("answers"), "a non-empty list of reference answers", answers)
    return [str(a) for a in answers]


# ShareGPT as LLaMA-Factory reads it: speaker tags -> roles (the mapping may rename each tag)
SHAREGPT_TAGS = {"user_tag": ("human", "user"), "assistant_tag": ("gpt", "assistant"),
                 "system_tag": ("system", "system"), "function_tag": ("function_call", "assistant"),
                 "observation_tag": ("observation", "tool")}


def from_sharegpt(row: dict, col: Columns, source: str) -> Conversation:
    turns = col.get(row, "conversations")
    if not isinstance(turns, list) or not turns:
        raise _fail(source, col("conversations"), "a non-empty list of {from, value} turns", turns)
    role_tag, content_tag = col("role_tag") if "role_tag" in col.mapping else "from", \
        col("content_tag") if "content_tag" in col.mapping else "value"
    tags = {col.mapping.get(k, default): role for k, (default, role) in SHAREGPT_TAGS.items()}
    kinds = {col.mapping.get(k, default): k for k, (default, _) in SHAREGPT_TAGS.items()}
    out = []
    system = col.get(row, "system")
    if system is not None:
        out.append({"role": "system", "content": _text(system, source, col("system"))})
    for i, t in enumerate(turns):
        where = f"{col('conversations')}[{i}]"
        if not isinstance(t, dict):
            raise _fail(source, where, f"a turn object {{{role_tag}, {content_tag}}}", t)
        tag = t.get(role_tag)
        if tag not in tags:
            raise DataError(f"{source}: field '{where}.{role_tag}': unknown speaker tag {tag!r}; known tags: "
                            f"{', '.join(map(repr, tags))} (rename them with columns: {{user_tag: ..., "
                            f"assistant_tag: ...}})")
        value = t.get(content_tag)
        if kinds[tag] == "function_tag":  # the assistant calls tool(s): JSON {"name", "arguments"} or a list
            out.append({"role": "assistant", "content": "", "learn": True,
                        "tool_calls": _tool_calls(value, source, f"{where}.{content_tag}")})
            continue
        msg = {"role": tags[tag], "content": _text(value, source, f"{where}.{content_tag}")}
        if msg["role"] == "assistant":
            msg["learn"] = _learn(t, source, where)
        out.append(msg)
    return _finish(out, source, tools=col.get(row, "tools"))


def _tool_calls(value, source: str, where: str) -> list[dict]:
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raise _fail(source, where, 'a JSON tool call {"name": ..., "arguments": {...}}', value) from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise _fail(source, where, 'a tool call {"name": ..., "arguments": {...}}', c)
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass  # kept as text; the chat template renders it as given
        out.append({"type": "function", "function": {"name": c["name"], "arguments": args}})
    return out


def from_alpaca(row: dict, col: Columns, source: str) -> Conversation:
    instruction = _text(col.get(row, "instruction"), source, col("instruction"))
    extra = col.get(row, "input")
    user = instruction + ("\n" + _text(extra, source, col("input")) if extra not in (None, "") else "")
    out = []
    system = col.get(row, "system")
    if system not in (None, ""):
        out.append({"role": "system", "content": _text(system, source, col("system"))})
    history = col.get(row, "history")
    for i, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _fail(source, f"{col('history')}[{i}]", "a [user, assistant] pair", pair)
        out += [{"role": "user", "content": _text(pair[0], source, f"{col('history')}[{i}][0]")},
                {"role": "assistant", "content": _text(pair[1], source, f"{col('history')}[{i}][1]"), "learn": True}]
    if history is not None and not isinstance(history, list):
        raise _fail(source, col("history"), "a list of [user, assistant] pairs", history)
    out += [{"role": "user", "content": user},
            {"role": "assistant", "content": _text(col.get(row, "output"), source, col("output")), "learn": True}]
    return _finish(out, source)


def from_prompt_completion(row: dict, col: Columns, source: str) -> Conversation:
    """TRL's prompt / completion: strings (a user turn and its answer) or lists of messages."""
    prompt, completion = col.get(row, "prompt"), col.get(row, "completion")
    if isinstance(prompt, str):
        head = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        head = _messages(prompt, col("prompt"), source)
    else:
        raise _fail(source, col("prompt"), "a string or a list of messages", prompt)
    if isinstance(completion, str):
        tail = [{"role": "assistant", "content": completion, "learn": True}]
    elif isinstance(completion, list):
        tail = _messages(completion, col("completion"), source)
    else:
        raise _fail(source, col("completion"), "a string or a list of messages", completion)
    return _finish(head + tail, source)


def from_prompt_answers(row: dict, col: Columns, source: str) -> Conversation:
    """The reference code's eval files: a prompt and its accepted answers (the first one is trained on)."""
    refs = _references(row, col, source)
    prompt = _text(col.get(row, "prompt"), source, col("prompt"))
    return _finish([{"role": "user", "content": prompt}, {"role": "assistant", "content": refs[0], "learn": True}],
                   source, references=refs)


def from_text(row: dict, col: Columns, source: str) -> Conversation:
    text = col.get(row, "text")
    if not isinstance(text, str) or not text.strip():
        raise _fail(source, col("text"), "non-empty text", text)
    return Conversation(text=text, source=source)


LAYOUTS: dict[str, Layout] = {l.name: l for l in (
    Layout("messages", ("messages",), from_messages,
           '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}',
           optional=("tools", "answers")),
    Layout("sharegpt", ("conversations",), from_sharegpt,
           '{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "system": "..."}',
           optional=("system", "tools")),
    Layout("alpaca", ("instruction", "output"), from_alpaca,
           '{"instruction": "Add the numbers.", "input": "2 2", "output": "4"}',
           optional=("input", "system", "history")),
    Layout("prompt_completion", ("prompt", "completion"), from_prompt_completion,
           '{"prompt": "2+2?", "completion": "4"}'),
    Layout("prompt_answers", ("prompt", "answers"), from_prompt_answers, '{"prompt": "2+2?", "answers": ["4"]}'),
    Layout("text", ("text",), from_text, '{"text": "Domain text to continue pretraining on; every token is learned."}'),
)}


def detect(columns: list[str], mapping: dict | None, where: str) -> str:
    """The layout whose identifying columns are all present (the first in LAYOUTS order), or a DataError
    that lists the columns found and the layouts known."""
    col = Columns(mapping)
    for layout in LAYOUTS.values():
        if all(col(k) in columns for k in layout.keys):
            return layout.name
    known = "; ".join(f"{l.name} ({', '.join(l.keys)})" for l in LAYOUTS.values())
    raise DataError(f"{where}: cannot tell the data layout from its columns {sorted(columns)}; known layouts "
                    f"(and the columns that identify them): {known}. Name the layout with data_format= (or "
                    f"'format' per source) and map differently named columns with columns: {{messages: dialog}}")


def row_layout(row: dict, mapping: dict | None) -> str | None:
    """The layout a single row looks like (its identifying columns non-null), for a source's uniformity check."""
    col = Columns(mapping)
    for layout in LAYOUTS.values():
        if all(row.get(col(k)) is not None for k in layout.keys):
            return layout.name
    return None


def convert(row: dict, layout: str, mapping: dict | None, source: str) -> Conversation:
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout].convert(row, Columns(mapping), source)


def conversation_to_json(conv: Conversation) -> dict:
    """A plain-JSON copy (stored by datasets' cache, shown by `esft data inspect`)."""
    return {k: v for k, v in conv.__dict__.items() if v is not None}

