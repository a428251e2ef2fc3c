"""Batched greedy generation with the reference prompt template, and task scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.conversations import prompt_text


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 32,
             progress=None) -> list[str]:
    """Greedy completions of ``prompts`` (user turns), formatted as the reference template.

    Batches are left-padded so every row's last prompt token sits at the same position; the
    answer is decoded up to the first EOS and stripped.
    """
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # Qwen tokenizers have none
        enc = [bos + tokenizer.encode(prompt_text(p), add_special_tokens=False) for p in chunk]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        att = torch.zeros((len(enc), width), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, width - len(e):] = torch.tensor(e)
            att[r, width - len(e):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        if progress is not None:
            progress(len(chunk))
    return outs


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
