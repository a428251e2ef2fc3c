"""Conversations (the internal form of layouts.py) -> token ids and loss labels.

The default template is the reference code's: ``"User: {prompt}\\n\\nAssistant:"`` then
``" {answer}"`` + EOS, with a BOS token first. User turns are masked out of the loss
(label -100); assistant turns are learned unless marked otherwise (``"mask": 1`` / ``"weight": 0``
in the data). ``template="chat"`` uses the tokenizer's own chat template instead (tool calls and
tool results included); plain text (continued pretraining) is learned whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..io import DataError

IGNORE = -100
USER_TEMPLATE = "User: {}\n\n"
ASSISTANT_PREFIX = "Assistant:"  # no trailing space: the answer starts with one
ANSWER_TEMPLATE = " {}"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str = ""  # "file:line", for error messages


def prompt_text(user: str) -> str:
    """The reference prompt for one user turn (what generation is conditioned on)."""
    return USER_TEMPLATE.format(str(user).strip()) + ASSISTANT_PREFIX


def validate_messages(row: dict, source: str) -> list[dict]:
    """A row of the ``messages`` layout -> its messages in the internal form (see layouts.py), checked."""
    from .layouts import Columns, from_messages

    return from_messages(row, Columns(None), source).messages


def _learned(m: dict) -> bool:
    """Internal form ("learn"), or a raw message ("mask": 1 = not learned)."""
    return m.get("learn", m.get("mask", 0) != 1)


def encode_reference(messages: list[dict], tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)  # nothing predicts the first token
    system = ""
    for m in messages:
        if m["role"] == "tool" or m.get("tool_calls"):
            raise DataError("template=reference has no slot for tool calls or tool results; use template=chat "
                            "(the tokenizer's chat template renders them)")
        if m["role"] == "system":  # the reference template has no system slot: prefix the next user turn
            system += str(m["content"]).strip() + "\n"
            continue
        if m["role"] == "user":
            toks = tokenizer.encode(prompt_text(system + str(m["content"])), add_special_tokens=False)
            system = ""
            ids += toks
            labels += [IGNORE] * len(toks) if mask_prompt else toks
        else:
            toks = tokenizer.encode(ANSWER_TEMPLATE.format(str(m["content"]).strip()), add_special_tokens=False)
            toks = toks + [tokenizer.eos_token_id]
            ids += toks
            labels += toks if _learned(m) else [IGNORE] * len(toks)
    return ids, labels


def encode_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Plain text for continued pretraining: BOS + text + EOS, every token after the first learned."""
    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + \
        tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    labels = list(ids)
    labels[0] = IGNORE  # nothing predicts the first token
    return ids, labels


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False, tools=None) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False)
    out = out["input_ids"] if hasattr(out, "keys") else out  # some versions return an encoding anyway
    return list(out)


def has_generation_marks(tokenizer) -> bool:
    """The chat template marks assistant spans with {% generation %}: transformers can return their tokens."""
    import re

    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", getattr(tokenizer, "chat_template", None) or ""))


def chat_label_method(tokenizer) -> str:
    return "the template's {% generation %} marks" if has_generation_marks(tokenizer) else \
        "prefix rendering (the template has no {% generation %} marks)"


def _chat_messages(messages: list[dict]) -> list[dict]:
    keep = ("role", "content", "tool_calls", "name", "tool_call_id")
    return [{k: m[k] for k in keep if k in m} for m in messages]


def encode_chat_template(messages: list[dict], tokenizer, mask_prompt: bool = True,
                         tools=None) -> tuple[list[int], list[int]]:
    """Tokenize with the tokenizer's chat template. Assistant spans come from the template's
    ``{% generation %}`` marks where it has them, else from rendering each turn's prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("template=chat, but this tokenizer has no chat template; use template=reference")
    clean = _chat_messages(messages)
    try:
        if has_generation_marks(tokenizer) and mask_prompt:
            return _generation_mask_labels(messages, clean, tokenizer, tools)
        full = _chat_ids(tokenizer, clean, tools=tools)
    except DataError:
        raise
    except Exception as e:  # jinja's own errors: raise_exception() in a template, undefined variables
        raise DataError(f"the chat template refused this conversation: {type(e).__name__}: {e}") from None
    if not mask_prompt:
        return full, list(full)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(clean):
        if m["role"] != "assistant" or not _learned(messages[i]):
            continue
        prefix = _chat_ids(tokenizer, clean[:i], generation_prompt=True, tools=tools)
        if full[: len(prefix)] != prefix:
            raise DataError("the chat template renders earlier turns differently once later turns follow, so the "
                            "assistant spans cannot be located; use template=reference")
        start = len(prefix)
        end = min(len(_chat_ids(tokenizer, clean[: i + 1], tools=tools)), len(full))
        labels[start:end] = full[start:end]
    return full, labels


def _generation_mask_labels(messages, clean, tokenizer, tools) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(clean, tools=tools, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    spans, start = [], None  # contiguous runs of marked tokens, one per assistant turn
    for i, v in enumerate(mask + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    assistants = [m for m in messages if m["role"] == "assistant"]
    if len(spans) != len(assistants) and not all(_learned(m) for m in assistants):
        raise DataError(f"the chat template marks {len(spans)} assistant spans for {len(assistants)} assistant "
                        "turns, so per-turn masks cannot be applied; drop the masks or use template=reference")
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(spans):
        if k >= len(assistants) or _learned(assistants[k]):
            labels[a:b] = ids[a:b]
    return ids, labels


def encode(conv, tokenizer, template: str = "reference", mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """A Conversation (layouts.py) -> (token ids, loss labels); -100 where nothing is learned."""
    if conv.text is not None:
        return encode_text(conv.text, tokenizer)
    if template == "reference":
        if conv.tools:
            raise DataError("template=reference has no slot for tool schemas; use template=chat")
        return encode_reference(conv.messages, tokenizer, mask_prompt)
    return encode_chat_template(conv.messages, tokenizer, mask_prompt, tools=conv.tools)


def load_examples(spec, tokenizer, template: str = "reference", mask_prompt: bool = True, **options) -> list[Example]:
    """Read a data specification (a path, glob, folder, YAML list of sources; see spec.py), convert every row
    to a conversation and tokenize it. Options: data_format, skip_bad_rows (see pipeline.py)."""
    from .pipeline import read_examples

    return read_examples(spec, tokenizer, template, mask_prompt=mask_prompt, **options).examples
