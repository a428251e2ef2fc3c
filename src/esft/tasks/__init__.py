"""A deterministic, seeded multi-domain synthetic corpus (reference JSONL ``messages`` layout).

General domains pretrain a small MoE and measure general ability; adaptation tasks are the
ESFT targets. See :mod:`esft.tasks.suite` for splits, writing and scoring.
"""

from .base import KINDS, TASKS, Task, get_task, register, task_names
from .metrics import METRICS
from .suite import SPLITS, general_ability, generate_split, score, split_of, to_row, write_suite

__all__ = ["KINDS", "METRICS", "SPLITS", "TASKS", "Task", "general_ability", "generate_split", "get_task",
           "register", "score", "split_of", "task_names", "to_row", "write_suite"]
