"""How much a call allocates on top of what is alive before it: for checking that an adapter load writes
into preallocated slots and never copies the base (tests/test_weave.py, benchmarks/weave_load_memory.py)."""

from __future__ import annotations

import torch


def allocation_peak(fn, device: str = "cpu") -> int:
    """Peak bytes held by tensors ``fn`` allocates on ``device`` ("cpu" or "cuda...") while it runs.

    CUDA: the caching allocator's own peak of allocated bytes, minus what was allocated before. CPU: torch's
    CPU allocator reports every allocation and free to the profiler (``profile_memory``); their running sum,
    in time order, is exactly what was held on top of the tensors alive before ``fn``.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    held = peak = 0
    for n in sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.typed[0] == _EventType.Allocation and n.typed[1].device.type == "cpu"),
                    key=lambda n: n.start_time_ns):
        held += n.typed[1].alloc_size  # negative for a free
        peak = max(peak, held)
    return peak
