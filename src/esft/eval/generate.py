"""Batched greedy generation (reference or chat prompt format), over-long prompt handling, task scoring.

A prompt is a conversation up to the answer to be generated (system message and earlier turns
included; its last user turn is the question), or a bare string, which stands for one user turn. It
is rendered exactly as training rendered the same messages (data/conversations.py), so the model is
conditioned on the very ids that training placed before that answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.conversations import encode_reference, prompt_text
from ..io import DataError
from ..models.loading import input_device

TEMPLATES = ("reference", "chat")
OVERLONG = ("refuse", "truncate", "skip")
_SENTINEL = "\u2063ESFT-USER-TEXT\u2063"  # stands for the user's text when splitting a rendered chat template


def as_conversation(prompt) -> list[dict]:
    """A prompt as a list of messages: a bare string is one user turn (suite tasks, the {prompt, answers} layout)."""
    return [{"role": "user", "content": str(prompt)}] if isinstance(prompt, str) else list(prompt)


@dataclass(frozen=True)
class PromptFormat:
    """How conversations become prompt ids: the reference template, or a chat template.

    ``chat_template`` is the Jinja string recorded in an adapter (None = the tokenizer's own), so a
    chat-trained adapter is prompted exactly as it was trained even if the tokenizer's template changed.
    """

    name: str = "reference"
    chat_template: str | None = None

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {self.name!r}")

    def template_for(self, tokenizer) -> str:
        t = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not t:
            raise ValueError("template 'chat' needs a chat template, but none was recorded with the adapter and "
                             "the tokenizer has none; use template 'reference'")
        return t

    def encode_chat(self, tokenizer, messages: list[dict]) -> list[int]:
        """Prompt ids for a conversation (up to the answer: its last user turn, maybe a system message after
        it), ready for the assistant's answer.

        The same rendering as training (data/conversations.py): the reference template, or the chat
        template with its generation prompt (the prefix training located each assistant span after).
        """
        if self.name == "reference":
            return encode_reference(messages, tokenizer)[0]
        out = tokenizer.apply_chat_template(messages, chat_template=self.template_for(tokenizer), tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def encode(self, tokenizer, user: str) -> list[int]:
        return self.encode_chat(tokenizer, [{"role": "user", "content": str(user)}])

    def parts(self, tokenizer, prompt) -> tuple[list[int], list[int], list[int]]:
        """(head, last user text, tail) ids of a prompt (a user text, or a conversation whose last user turn is
        the question), so that it can lose the start of its last user text but keep everything before that
        text (BOS, the system message, earlier turns, the turn's "User: " or chat header) and after it
        ("\\n\\nAssistant:" or the chat template's generation prompt)."""
        msgs = as_conversation(prompt)
        u = _last_user(msgs)
        before, last, after = msgs[:u], msgs[u], msgs[u + 1:]
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        if self.name == "reference":
            # as encode_reference renders it: earlier turns one by one, then system messages right before the
            # last user turn prefixed to its text, which is encoded as one string (prompt_text); system
            # messages after it have no user turn to go to and render as nothing
            k = max((i + 1 for i, m in enumerate(before) if m["role"] != "system"), default=0)
            system = "".join(str(m["content"]).strip() + "\n" for m in before[k:])
            head, _, tail = prompt_text(system + _SENTINEL).partition(_SENTINEL)
            return encode_reference(before[:k], tokenizer)[0] + enc(head), enc(str(last["content"]).strip()), enc(tail)
        text = tokenizer.apply_chat_template(before + [{"role": "user", "content": _SENTINEL}] + after, tokenize=False,
                                             chat_template=self.template_for(tokenizer), add_generation_prompt=True)
        head, found, tail = text.partition(_SENTINEL)
        if not found or _SENTINEL in tail:
            raise DataError("cannot left-truncate prompts: the chat template does not keep the user's text as is")
        return enc(head), enc(str(last["content"])), enc(tail)

    def truncate(self, tokenizer, prompt, budget: int) -> list[int] | None:
        """Ids of ``prompt`` in at most ``budget`` tokens, keeping its end (what matters most for the answer).

        The oldest exchanges after the system message go first (a user turn up to its assistant answer, so
        roles keep alternating for chat templates that insist), then the start of the last user text; the
        system message, the template's header and the generation prompt stay. None when those alone leave
        no room for a single token of the last user text.
        """
        msgs = as_conversation(prompt)
        ids = self.encode_chat(tokenizer, msgs)
        while len(ids) > budget:
            turns = [i for i, m in enumerate(msgs[:_last_user(msgs)]) if m["role"] != "system"]
            if not turns:
                break
            end = next((i for i in turns if msgs[i]["role"] == "assistant"), turns[-1])
            del msgs[turns[0]:end + 1]
            ids = self.encode_chat(tokenizer, msgs)
        if len(ids) <= budget:
            return ids
        head, text, tail = self.parts(tokenizer, msgs)
        keep = budget - len(head) - len(tail)
        return head + text[-keep:] + tail if keep >= 1 else None


def _last_user(msgs: list[dict]) -> int:
    u = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if u is None:
        raise DataError("a prompt needs a user turn")
    return u


def recorded_format(meta: dict) -> PromptFormat:
    """The format an ESFT adapter was trained with, from its esft_adapter.json (``{}`` = reference code)."""
    rec = meta.get("template")
    if isinstance(rec, dict):
        return PromptFormat(rec.get("name") or "reference", rec.get("chat_template"))
    # older adapters: only the training config's template name; the tokenizer's chat template was used
    return PromptFormat((meta.get("train_config") or {}).get("template") or "reference")


def choose_format(requested: str, recorded: PromptFormat | None, what: str = "the adapter") -> PromptFormat:
    """``requested`` (auto, reference, chat) against what ``what`` was trained with (None = unknown)."""
    if requested == "auto":
        return recorded or PromptFormat()
    if requested not in TEMPLATES:
        raise ValueError(f"template must be auto, reference or chat, got {requested!r}")
    if recorded is not None and recorded.name != requested:
        raise ValueError(f"--template {requested} conflicts with {what}, which was trained with template "
                         f"{recorded.name!r}; leave --template at auto (or pass --template {recorded.name})")
    return recorded or PromptFormat(requested)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and all of the generation config's (chat models
    list their end-of-turn token there too, e.g. [eos, eot])."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def context_of(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@dataclass
class Prompts:
    """Encoded prompts: ``ids[i]`` is None for a skipped one; ``overlong`` lists the over-long ones' indices."""

    ids: list[list[int] | None]
    overlong: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # untruncated prompt lengths of the over-long ones


def encode_prompts(tokenizer, prompts: list, fmt: PromptFormat | None = None, context: int | None = None,
                   max_new_tokens: int = 0, overlong: str = "refuse", sources: list[str] | None = None) -> Prompts:
    """Encode every prompt (a user text, or a conversation ending with a user turn) and deal with those
    whose tokens + max_new_tokens exceed ``context``.

    Over-long prompts are found before anything is generated: "refuse" raises naming the first of them,
    "truncate" keeps their end (see :meth:`PromptFormat.truncate`: oldest turns first, then the start of
    the last user text), "skip" leaves them out (ids None).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    fmt = fmt or PromptFormat()
    where = lambda i: sources[i] if sources else f"example {i}"  # noqa: E731
    out = Prompts([_encode_one(tokenizer, fmt, p, where(i)) for i, p in enumerate(prompts)])
    if not context:
        return out
    budget = context - max_new_tokens
    out.overlong = [i for i, ids in enumerate(out.ids) if len(ids) > budget]
    out.lengths = [len(out.ids[i]) for i in out.overlong]
    if not out.overlong:
        return out
    if overlong == "refuse":
        raise DataError(f"{len(out.overlong)} of {len(prompts)} prompts do not fit the model's context: "
                        f"{where(out.overlong[0])} has {out.lengths[0]} prompt tokens + max_new_tokens "
                        f"{max_new_tokens} > context {context}{' (the first of them)' if len(out.overlong) > 1 else ''}"
                        "; choose --overlong truncate (keep each prompt's last tokens) or --overlong skip (score the "
                        "rest), or lower --max-new-tokens")
    for i in out.overlong:
        if overlong == "skip":
            out.ids[i] = None
            continue
        out.ids[i] = fmt.truncate(tokenizer, prompts[i], budget)
        if out.ids[i] is None:
            raise ValueError(f"context {context} - max_new_tokens {max_new_tokens} leaves no room for the user text "
                             f"of {where(i)} next to its template and system message; lower --max-new-tokens or "
                             "choose --overlong skip")
    return out


def _encode_one(tokenizer, fmt: PromptFormat, prompt, where: str) -> list[int]:
    from jinja2 import TemplateError  # chat templates are rendered with jinja2 (a torch dependency)

    try:
        return fmt.encode_chat(tokenizer, as_conversation(prompt))
    except TemplateError as e:  # e.g. a chat template that refuses a system message or wants alternating roles
        raise DataError(f"{where}: the conversation does not fit the chat template ({e}); give it the roles "
                        "and order that template accepts") from None


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 64, batch_size: int = 32,
                 progress=None) -> list[str]:
    """Greedy completions of encoded prompts.

    Batches are left-padded so every row's last prompt token sits at the same position; the
    answer is decoded up to the first of any EOS id (tokenizer's or generation config's) and stripped.
    """
    model.eval()
    device = input_device(model)  # a model spread over devices (device_map) takes its inputs where it embeds them
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    outs: list[str] = []
    for i in range(0, len(prompt_ids), batch_size):
        enc = prompt_ids[i:i + batch_size]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        att = torch.zeros((len(enc), width), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, width - len(e):] = torch.tensor(e)
            att[r, width - len(e):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in eos), len(row))
            outs.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
        if progress is not None:
            progress(len(enc))
    return outs


def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size: int = 32,
             progress=None, fmt: PromptFormat | None = None, overlong: str = "refuse") -> list[str | None]:
    """Greedy completions of ``prompts`` (user texts, or conversations ending with a user turn) in ``fmt``
    (default: the reference template).

    Prompts longer than the model's context (with room for ``max_new_tokens``) are refused, truncated
    or skipped (None in the result), as ``overlong`` says; see :func:`encode_prompts`.
    """
    enc = encode_prompts(tokenizer, prompts, fmt, context_of(model), max_new_tokens, overlong)
    kept = [ids for ids in enc.ids if ids is not None]
    it = iter(generate_ids(model, tokenizer, kept, max_new_tokens, batch_size, progress))
    return [None if ids is None else next(it) for ids in enc.ids]


@dataclass
class TaskResult:
    task: str
    score: float
    n: int
    predictions: list[str]
    references: list
    prompts: list[str]


def evaluate_task(model, tokenizer, task: str, n: int = 100, seed: int = 0, batch_size: int = 50,
                  max_new_tokens: int = 48, progress=None) -> TaskResult:
    """Score ``model`` on ``n`` held-out (eval split) examples of a suite task with its local metric."""
    from ..tasks import generate_split, score

    pairs = generate_split(task, "eval", n, seed)
    prompts = [p for p, _ in pairs]
    refs = [a for _, a in pairs]
    preds = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return TaskResult(task, score(task, preds, refs), len(pairs), preds, refs, prompts)


def general_ability(model, tokenizer, n_per_task: int = 50, seed: int = 0, progress=None) -> tuple[float, dict]:
    """Mean held-out score over the general domains (what forgetting is measured on)."""
    from ..tasks import general_ability as mean_general
    from ..tasks import task_names

    per = {t: evaluate_task(model, tokenizer, t, n_per_task, seed, progress=progress).score for t in task_names("general")}
    return mean_general(per), per
