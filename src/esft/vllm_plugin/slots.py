"""Adapters by name in one worker: validate, write into free slots, fill a table row; unload when drained.

An adapter is read and checked by the project's own code (``adapter/io.py``: files, expert_cfg.json,
esft_adapter.json, NaN/Inf; ``adapter/fingerprint.py``: the base model, from the served checkpoint's
shards), then mapped onto vLLM's layers by its checkpoint keys (``{layer}.{expert}.{gate|up|down}.weight``,
with the layer's own projection names). Each load gets a key ``name@N`` (N counts loads), which requests
carry (``SamplingParams.extra_args["esft_adapter"]``) and which salts their prefix-cache blocks, so a
name loaded again with other weights never meets the old KV blocks.

Unloading makes the name unroutable at once; its slots and table row are freed when no request of
the worker still uses them (requests in flight finish on the weights they started with).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter.paths import AdapterPathError, resolve_adapter_dir

log = logging.getLogger("esft.vllm_plugin")

_KEY = re.compile(r"^(?P<layer>.+)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")


class EsftAdapterError(ValueError):
    """An adapter the served model cannot take (the message names the adapter and the reason)."""


@dataclass
class Loaded:
    key: str
    name: str
    path: str
    row: int
    experts: dict[str, list[int]]  # layer name -> experts it changed
    slots: dict[str, list[int]]  # layer name -> their slots (same order)
    draining: bool = False
    meta: dict = field(default_factory=dict)


def check_links(path: Path, root: Path | None) -> Path:
    """``path`` resolved, by the rule `esft serve` uses (esft.adapter.paths): inside ``root`` if given, and no
    link inside it leading out of ``root`` (or, without one, out of the adapter directory)."""
    try:
        return resolve_adapter_dir(path, root)
    except AdapterPathError as e:
        raise EsftAdapterError(str(e)) from None


class Registry:
    """The worker's adapters. ``layers``: vLLM layer name -> EsftRoutedExperts."""

    def __init__(self, layers: dict, max_adapters: int, model_dir: str, model_type: str | None,
                 adapter_root: str | None = None, allow_other_base: bool = False,
                 base_fingerprint: dict | None = None):
        self.layers = layers
        self.max_adapters = max_adapters
        self.model_dir = model_dir
        self.model_type = model_type
        self.adapter_root = Path(adapter_root) if adapter_root else None
        self.allow_other_base = allow_other_base
        self.loaded: dict[str, Loaded] = {}  # key -> adapter (routable or draining)
        self.by_name: dict[str, str] = {}  # routable name -> key
        self.free_rows = list(range(1, max_adapters + 1))
        self.free = {n: list(range(l.num_slots)) for n, l in layers.items()}
        self.loads = 0
        self._fingerprint: dict | None = base_fingerprint

    # ---- queries ---------------------------------------------------------------------------------------

    def row(self, key: str | None) -> int | None:
        """Table row of a request's adapter key (0: the base); None for a key this worker does not hold."""
        if not key:
            return 0
        a = self.loaded.get(key)
        return a.row if a is not None else None

    def listing(self) -> dict:
        slots = {n: (len(self.free[n]), l.num_slots) for n, l in self.layers.items()}
        return {"adapters": {n: {"key": k, "path": self.loaded[k].path} for n, k in self.by_name.items()},
                "draining": [k for k, a in self.loaded.items() if a.draining],
                "max_adapters": self.max_adapters,
                "free_slots_min": min((f for f, _ in slots.values()), default=0),
                "slots_per_layer": max((t for _, t in slots.values()), default=0)}

    # ---- load ------------------------------------------------------------------------------------------

    def base_fingerprint(self) -> dict:
        if self._fingerprint is None:
            from ..adapter.fingerprint import checkpoint_fingerprint

            try:
                self._fingerprint = checkpoint_fingerprint(self.model_dir)
            except Exception as e:  # noqa: BLE001 - e.g. vLLM's venv holds an older transformers than esft's
                raise EsftAdapterError(
                    f"cannot compute the served model's fingerprint here ({type(e).__name__}: {e}); give it as "
                    "additional_config['esft']['base_fingerprint'] (`esft serve --engine vllm` does), or pass "
                    "allow_other_base") from None
        return self._fingerprint

    def read(self, name: str, path: str, allow_other_base: bool | None = None):
        """(adapter, {layer name: (experts, w13 [S, 2I, H], w2 [S, H, I])}) or EsftAdapterError."""
        from ..adapter.fingerprint import fingerprint_mismatch, fingerprint_version
        from ..adapter.io import AdapterError, check_family, read_adapter

        from ..adapter.esft_lora import is_lora_adapter

        full = check_links(Path(path), self.adapter_root)
        if is_lora_adapter(full):
            raise EsftAdapterError(f"adapter {name!r} ({path}) is an ESFT-LoRA adapter (method=esft-lora), which this "
                                   "vLLM engine does not weave: serve it with `esft serve --engine esft`, merge it with "
                                   "`esft merge`, or load it with vLLM's own MoE LoRA (a PEFT adapter)")
        try:
            a = read_adapter(full)
            check_family(a, self.model_type)
        except (AdapterError, ValueError, OSError) as e:
            raise EsftAdapterError(f"adapter {name!r}: {e}") from None
        skip = self.allow_other_base if allow_other_base is None else allow_other_base
        want = a.meta.get("base_model")
        if not skip:
            if not want:
                log.warning("adapter %r (%s) records no base model (reference-code adapter?): it cannot be checked",
                            name, path)
            elif fingerprint_version(want) != 2:
                raise EsftAdapterError(f"adapter {name!r} ({path}) records a version-{fingerprint_version(want)} base "
                                       "fingerprint, which only a model loaded in transformers can check; re-save it "
                                       "with this esft, or pass allow_other_base")
            else:
                have = self.base_fingerprint()
                k = fingerprint_mismatch(want, have)
                if k:
                    raise EsftAdapterError(
                        f"adapter {name!r} ({path}) was trained on a different base model: its {k} fingerprint is "
                        f"{want.get(k)}, the served model's ({self.model_dir}) is {have.get(k)}")
        return a, self._rows(name, a)

    def _rows(self, name: str, a) -> dict[str, tuple[list[int], torch.Tensor, torch.Tensor]]:
        per: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for k, t in a.tensors.items():
            m = _KEY.match(k)
            layer = self.layers.get(m.group("layer")) if m else None
            if layer is None:
                what = ("a non-expert tensor" if ".experts." not in k else "an expert tensor of no MoE layer of the "
                        "served model")
                raise EsftAdapterError(f"adapter {name!r} ({a.path}): {k!r} is {what}; only routed-expert adapters "
                                       "can share one base model (merge this one with `esft merge` instead)")
            projs = {layer.ckpt_gate_proj_name: "gate", layer.ckpt_up_proj_name: "up", layer.ckpt_down_proj_name: "down"}
            if m.group("proj") not in projs:
                raise EsftAdapterError(f"adapter {name!r} ({a.path}): {k!r} names no projection of {m.group('layer')} "
                                       f"(expected {sorted(projs)})")
            e = int(m.group("expert"))
            if e >= layer.num_base_experts:
                raise EsftAdapterError(f"adapter {name!r} ({a.path}): {k!r}: expert {e} does not exist "
                                       f"({layer.num_base_experts} experts per layer)")
            per.setdefault(m.group("layer"), {}).setdefault(e, {})[projs[m.group("proj")]] = t
        indices = {int(_layer_index(n)) for n in self.layers}
        cfg = {l: list(es) for l, es in a.expert_cfg["experts"].items() if es}
        stray = sorted(set(cfg) - indices)
        if stray:
            raise EsftAdapterError(f"adapter {name!r} ({a.path}): expert_cfg.json lists experts of layer(s) {stray}, "
                                   "which are not MoE layers of the served model")
        out = {}
        for lname, experts in sorted(per.items()):
            layer = self.layers[lname]
            listed = cfg.get(int(_layer_index(lname)), [])
            if sorted(experts) != sorted(listed):
                raise EsftAdapterError(f"adapter {name!r} ({a.path}): layer {lname} holds experts {sorted(experts)} "
                                       f"but its expert_cfg.json lists {sorted(listed)}")
            H, I = layer.hidden_size_unpadded, layer.intermediate
            ids = sorted(experts)
            gate, up, down = [], [], []
            for e in ids:
                t = experts[e]
                miss = [p for p in ("gate", "up", "down") if p not in t]
                if miss:
                    raise EsftAdapterError(f"adapter {name!r} ({a.path}): layer {lname} expert {e} lacks {miss}")
                for p, want in (("gate", (I * layer.tp_size, H)), ("up", (I * layer.tp_size, H)),
                                ("down", (H, I * layer.tp_size))):
                    if tuple(t[p].shape) != want:
                        raise EsftAdapterError(f"adapter {name!r} ({a.path}): layer {lname} expert {e} {p} has shape "
                                               f"{tuple(t[p].shape)}, the model expects {want}")
                gate.append(t["gate"])
                up.append(t["up"])
                down.append(t["down"])
            w13 = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
            out[lname] = (ids, w13, torch.stack(down))
        missing = sorted(set(cfg) - {int(_layer_index(n)) for n in per})
        if missing:
            raise EsftAdapterError(f"adapter {name!r} ({a.path}): expert_cfg.json lists experts of layer(s) {missing} "
                                   "but the adapter has no tensors for them")
        return out

    def load(self, name: str, path: str, allow_other_base: bool | None = None) -> str:
        """Load ``path`` as ``name``; returns its key. Nothing changes unless it succeeds."""
        if name in self.by_name:
            raise EsftAdapterError(f"an adapter named {name!r} is loaded already; unload it first")
        a, rows = self.read(name, path, allow_other_base)
        if not self.free_rows:
            raise EsftAdapterError(f"adapter {name!r}: {self.max_adapters} adapters are loaded already (draining "
                                   f"ones included), the most this server holds (max_adapters); unload one first")
        for lname, (ids, _, _) in rows.items():
            if len(ids) > len(self.free[lname]):
                raise EsftAdapterError(
                    f"adapter {name!r}: layer {lname} needs {len(ids)} adapter expert slots, {len(self.free[lname])} "
                    f"of {self.layers[lname].num_slots} are free (max_adapter_experts sets the slots per layer); "
                    "unload an adapter or start the server with more")
        self.loads += 1
        key = f"{name}@{self.loads}"
        row = self.free_rows[0]
        slots = {lname: self.free[lname][:len(ids)] for lname, (ids, _, _) in rows.items()}
        # slots and row are still free (unreferenced) while written: a failure here leaves the served set as it was
        for lname, (ids, w13, w2) in rows.items():
            layer = self.layers[lname]
            for what, t in (("gate/up", w13), ("down", w2)):
                c = t.to(layer.w13_weight.dtype)
                if c.is_floating_point() and not bool(torch.isfinite(c).all()):
                    raise EsftAdapterError(f"adapter {name!r}: layer {lname} {what} overflows to Inf in the served "
                                           f"dtype {layer.w13_weight.dtype}")
            layer.write_slots(slots[lname], w13, w2)
        for lname, layer in self.layers.items():
            ids = rows[lname][0] if lname in rows else []
            layer.set_row(row, ids, slots.get(lname, []))
        self.free_rows.pop(0)
        for lname, s in slots.items():
            del self.free[lname][:len(s)]
        self.loaded[key] = Loaded(key, name, str(path), row, {l: r[0] for l, r in rows.items()}, slots, meta=a.meta)
        self.by_name[name] = key
        log.info("esft: loaded adapter %r (%s) as %s: table row %d, %d expert(s) in %d layer(s)", name, path, key, row,
                 sum(len(s) for s in slots.values()), len(slots))
        return key

    # ---- unload ----------------------------------------------------------------------------------------

    def unload(self, name: str, in_use: set[str]) -> bool:
        """Make ``name`` unroutable; free it now if no request in ``in_use`` (keys) holds it. True if freed."""
        if name not in self.by_name:
            raise KeyError(f"no adapter named {name!r} (loaded: {', '.join(self.by_name) or 'none'})")
        key = self.by_name.pop(name)
        self.loaded[key].draining = True
        return self.reap(in_use) > 0 or key not in self.loaded

    def reap(self, in_use: set[str]) -> int:
        """Free every draining adapter no request holds any more; returns how many."""
        n = 0
        for key in [k for k, a in self.loaded.items() if a.draining and k not in in_use]:
            a = self.loaded.pop(key)
            for lname, layer in self.layers.items():
                layer.set_row(a.row, [], [])
            for lname, s in a.slots.items():
                self.free[lname].extend(s)
            self.free_rows.append(a.row)
            log.info("esft: unloaded adapter %r (%s)", a.name, key)
            n += 1
        return n

    @property
    def draining(self) -> bool:
        return any(a.draining for a in self.loaded.values())


def _layer_index(layer_name: str) -> str:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", layer_name + ".")
    if not m:
        raise EsftAdapterError(f"cannot tell the layer index of MoE layer {layer_name}")
    return m.group(1)
