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
    from esft.serving.loadmem import allocation_peak
    from esft.serving.weave import Weaver, storage_bytes

    model_dir = a.model or embedded_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(model_dir, Path(tmp), a.adapters, a.experts_per_layer, 0)
        model, _ = load_model(model_dir, dtype="float32", device=a.device)
        base = storage_bytes(model)
        w = Weaver(model.eval(), max_adapters=a.adapters, max_adapter_experts=a.adapters * a.experts_per_layer)
        layer = next(iter(w.layers.values())).experts.base
        layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        kib = 1024
        print(f"device {a.device}; base parameters {base / kib:.0f} KiB, slots {w.slot_bytes() / kib:.0f} KiB "
              f"({a.adapters * a.experts_per_layer} per layer), one layer's base experts {layer_bytes / kib:.0f} KiB")
        print("| load | adapter rows KiB | allocated during the load, peak KiB | parameters after, KiB |")
        print("|---|---|---|---|")
        for i, d in enumerate(dirs):
            ad = read_adapter(d)
            ad.tensors = {k: t.to(a.device) for k, t in ad.tensors.items()}  # the input, in place before the load
            rows = w.adapter_bytes()
            peak = allocation_peak(lambda ad=ad, i=i: w.load(f"a{i}", ad), a.device)
            print(f"| a{i} | {(w.adapter_bytes() - rows) / kib:.0f} | {peak / kib:.0f} | "
                  f"{storage_bytes(model) / kib:.0f} |")
        assert storage_bytes(model) == base + w.slot_bytes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
