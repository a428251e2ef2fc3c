"""Memory of loading adapters into `esft serve`'s expert overlay: parameters stay base + slots, and what a
load allocates on top is the adapter's rows, one layer at a time (never a copy of the base).

On a GPU the figures are the CUDA allocator's own (peak allocated during each load minus what was allocated
before it); on the CPU, the running sum of the CPU allocator's allocations and frees as the torch profiler
records them. Printed, not asserted (tests/test_weave.py asserts the bound on the tiny model).

    python benchmarks/weave_load_memory.py [--model DIR] [--adapters 4] [--experts-per-layer 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def cpu_peak(fn) -> int:
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
        held += n.typed[1].alloc_size
        peak = max(peak, held)
    return peak


def cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base checkpoint (default: the shipped model)")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--experts-per-layer", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()

    from serve_throughput import make_adapters

    from esft.adapter.io import read_adapter
    from esft.embedded import embedded_model_dir
    from esft.models.loading import load_model
    from esft.serving.weave import Weaver, storage_bytes

    model_dir = a.model or embedded_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(model_dir, Path(tmp), a.adapters, a.experts_per_layer, 0)
        model, _ = load_model(model_dir, dtype="float32", device=a.device)
        base = storage_bytes(model)
        w = Weaver(model.eval(), max_adapters=a.adapters, max_adapter_experts=a.adapters * a.experts_per_layer)
        layer = next(iter(w.layers.values())).experts.base
        layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        peak_of = cuda_peak if a.device.startswith("cuda") else cpu_peak
        kib = 1024
        print(f"device {a.device}; base parameters {base / kib:.0f} KiB, slots {w.slot_bytes() / kib:.0f} KiB "
              f"({a.adapters * a.experts_per_layer} per layer), one layer's base experts {layer_bytes / kib:.0f} KiB")
        print("| load | adapter rows KiB | allocated during the load, peak KiB | parameters after, KiB |")
        print("|---|---|---|---|")
        for i, d in enumerate(dirs):
            ad = read_adapter(d)
            ad.tensors = {k: t.to(a.device) for k, t in ad.tensors.items()}  # the input, in place before the load
            rows = w.adapter_bytes()
            peak = peak_of(lambda ad=ad, i=i: w.load(f"a{i}", ad))
            print(f"| a{i} | {(w.adapter_bytes() - rows) / kib:.0f} | {peak / kib:.0f} | "
                  f"{storage_bytes(model) / kib:.0f} |")
        assert storage_bytes(model) == base + w.slot_bytes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
