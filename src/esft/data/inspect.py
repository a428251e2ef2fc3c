"""`esft data inspect`: what a data specification holds, as the run will see it, before any GPU time.

Without a model: each source's detected layout and rows, and one example conversation. With ``--model``
(its tokenizer and template only, no weights): token lengths (histogram), how many exceed ``seq_len``
(and would be truncated or dropped), the loss tokens, and the example rendered with its learned spans
marked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..io import DataError
from .conversations import IGNORE, chat_label_method, encode
from .pipeline import DataStats, iter_conversations, read_examples


@dataclass
class InspectConfig:
    data: str | list
    data_format: str | None = None
    skip_bad_rows: bool = False
    model: str | None = None  # tokenizer + template to measure tokens (no weights are read)
    template: str = "reference"
    seq_len: int | None = None  # default: the model's context, at most 4096
    example: int = 1  # which conversation to render (1-based)

    def __post_init__(self):
        if self.template not in ("reference", "chat"):
            raise ValueError(f"--template must be reference or chat, got {self.template!r}")
        if self.example < 1:
            raise ValueError(f"--example must be >= 1, got {self.example}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {self.seq_len}")


def histogram(lengths: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) over equal-width bins of ``lengths`` (inclusive bounds)."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * math.ceil((hi - lo + 1) / width)
    for n in lengths:
        counts[(n - lo) // width] += 1
    return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts)]


def inspect_data(cfg: InspectConfig) -> dict:
    """The report as plain data (the CLI prints it; --json prints this)."""
    stats = DataStats()
    convs = list(iter_conversations(cfg.data, cfg.data_format, cfg.skip_bad_rows, what="data", stats=stats))
    if not convs:
        raise DataError(f"data: no conversations ({stats.describe()})")
    k = min(cfg.example, len(convs)) - 1
    report = {
        "sources": [{"path": s.path, "layout": s.layout, "rows": s.rows, "skipped": s.skipped, "weight": s.weight}
                    for s in stats.sources],
        "skipped_by_reason": dict(stats.skipped),
        "conversations": len(convs),
        "example": {"index": k + 1, "source": convs[k].source,
                    "messages": convs[k].messages, "text": convs[k].text, "tools": convs[k].tools},
    }
    if cfg.model is None:
        return report
    from ..models.loading import config_context, load_tokenizer

    tok = load_tokenizer(cfg.model)
    context = config_context(cfg.model)
    seq_len = cfg.seq_len or (min(4096, context) if context else 4096)
    res = read_examples(cfg.data, tok, cfg.template, data_format=cfg.data_format, skip_bad_rows=cfg.skip_bad_rows)
    t = res.table
    lengths = t.lengths().tolist()
    in_loss = (t.labels != IGNORE).cumsum()  # learned tokens per example, from the flat arrays
    ends = [int(in_loss[o - 1]) if o else 0 for o in t.offsets.tolist()]
    learned = [b - a for a, b in zip(ends[:-1], ends[1:])]
    ids, labels = encode(convs[k], tok, cfg.template)
    report["tokens"] = {
        "template": cfg.template, "seq_len": seq_len, "context": context,
        "labels_from": chat_label_method(tok) if cfg.template == "chat" else "the reference template's turns",
        "examples": len(lengths), "total": sum(lengths), "in_loss": sum(learned),
        "min": min(lengths), "median": sorted(lengths)[len(lengths) // 2], "max": max(lengths),
        "over_seq_len": sum(n > seq_len for n in lengths),
        "no_loss_token": sum(n == 0 for n in learned),
        "histogram": histogram(lengths),
    }
    report["example"]["spans"] = _spans(tok, ids, labels)
    return report


def _spans(tok, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The example's text cut where learning starts or stops: [(text, learned), ...]."""
    spans: list[tuple[list[int], bool]] = []
    for t, lab in zip(ids, labels):
        learned = lab != IGNORE
        if spans and spans[-1][1] == learned:
            spans[-1][0].append(t)
        else:
            spans.append(([t], learned))
    return [(tok.decode(s, skip_special_tokens=False), learned) for s, learned in spans]


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console()
    t = Table(title=f"{report['conversations']} conversations")
    for c in ("source", "layout", "rows", "skipped", "weight"):
        t.add_column(c)
    for s in report["sources"]:
        t.add_row(s["path"], s["layout"], str(s["rows"]), str(s["skipped"]), f"{s['weight']:g}")
    con.print(t)
    for reason, n in report["skipped_by_reason"].items():
        con.print(f"[yellow]skipped {n} row(s):[/yellow] {reason}")
    tok = report.get("tokens")
    if tok:
        con.print(f"tokens ({tok['template']} template; loss labels from {tok['labels_from']}): {tok['total']:,} in "
                  f"{tok['examples']:,} examples, {tok['in_loss']:,} in the loss; length min {tok['min']}, median "
                  f"{tok['median']}, max {tok['max']}; [bold]{tok['over_seq_len']} over seq_len={tok['seq_len']}"
                  f"[/bold] (truncated or dropped in training); {tok['no_loss_token']} with no token in the loss")
        h = Table(title="token lengths")
        h.add_column("tokens")
        h.add_column("examples", justify="right")
        h.add_column("")
        top = max(c for _, _, c in tok["histogram"]) or 1
        for lo, hi, c in tok["histogram"]:
            mark = " > seq_len" if lo > tok["seq_len"] else ""
            h.add_row(f"{lo}-{hi}{mark}", str(c), "█" * max(1 if c else 0, round(30 * c / top)))
        con.print(h)
    ex = report["example"]
    con.print(f"\nexample {ex['index']} ({ex['source']}):")
    if "spans" in ex:
        text = Text()
        for s, learned in ex["spans"]:
            text.append(s, style="bold green" if learned else "dim")
        con.print(text)
        con.print("[dim](dim: context, not learned; [/dim][bold green]green: learned[/bold green][dim])[/dim]")
    elif ex["text"] is not None:
        con.print(ex["text"])
    else:
        for m in ex["messages"]:
            learn = "" if m.get("learn", True) else " (not learned)"
            con.print(f"[bold]{m['role']}{learn}:[/bold] {m['content']}" + (f" [tool_calls {m['tool_calls']}]"
                                                                          if m.get("tool_calls") else ""))
