"""Conversations (reference JSONL ``messages`` layout) -> token ids and loss labels.

The default template is the reference code's: ``"User: {prompt}\\n\\nAssistant:"`` then
``" {answer}"`` + EOS, with a BOS token first. User turns are masked out of the loss
(label -100); assistant turns are learned unless the message carries ``"mask": 1``.
``template="chat"`` uses the tokenizer's own chat template instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..io import DataError, read_jsonl

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
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{source}: expected a non-empty 'messages' list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system") or "content" not in m:
            raise DataError(f"{source}: each message needs role user/assistant/system and content, got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{source}: conversation has no assistant turn, so nothing to learn from it")
    return msgs


def encode_reference(messages: list[dict], tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)  # nothing predicts the first token
    system = ""
    for m in messages:
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
            labels += [IGNORE] * len(toks) if m.get("mask", 0) == 1 else toks
    return ids, labels


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False)
    out = out["input_ids"] if hasattr(out, "keys") else out  # some versions return an encoding anyway
    return list(out)


def encode_chat_template(messages: list[dict], tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Tokenize with the tokenizer's chat template; assistant spans found by rendering prefixes."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("template=chat, but this tokenizer has no chat template; use template=reference")
    clean = [{"role": m["role"], "content": str(m["content"])} for m in messages]
    full = _chat_ids(tokenizer, clean)
    if not mask_prompt:
        return full, list(full)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(clean):
        if m["role"] != "assistant" or messages[i].get("mask", 0) == 1:
            continue
        prefix = _chat_ids(tokenizer, clean[:i], generation_prompt=True)
        if full[: len(prefix)] != prefix:
            raise DataError("the chat template renders earlier turns differently once later turns follow, so the "
                            "assistant spans cannot be located; use template=reference")
        start = len(prefix)
        end = min(len(_chat_ids(tokenizer, clean[: i + 1])), len(full))
        labels[start:end] = full[start:end]
    return full, labels


def load_examples(path: str, tokenizer, template: str = "reference", mask_prompt: bool = True) -> list[Example]:
    """Read a JSONL file of conversations and tokenize every one of them."""
    if template not in ("reference", "chat"):
        raise ValueError(f"template must be 'reference' or 'chat', got {template!r}")
    encode = encode_reference if template == "reference" else encode_chat_template
    out = []
    for row in read_jsonl(path):
        source = f"{path}:{row['_line']}"
        msgs = validate_messages(row, source)
        ids, labels = encode(msgs, tokenizer, mask_prompt)
        out.append(Example(ids, labels, source))
    return out
