"""A slot KV cache for continuous batching: one preallocated row ("slot") of keys/values per running request.

Per attention layer the cache holds

    keys    [S, Hk, L, Dk]   S slots (= the engine's max batch), L positions (grown on demand)
    values  [S, Hv, L, Dv]   (shapes are whatever the layer hands to ``update``: DeepSeek's MLA caches its
                             compressed latent as one "head", other families their key/value heads)

Before every forward the engine calls :meth:`SlotCache.plan` with, for each batch row b, its slot and the
position ``starts[b]`` of its first new token. ``update`` (the transformers ``Cache`` call every supported
attention layer makes) writes the T new tokens of row b at positions starts[b] .. starts[b]+T-1 of its
slot and returns rows [B, H, K, D] of the batch's slots up to K = max(starts) + T; :meth:`mask` is the
matching additive mask [B, 1, T, K]: row b's query t sees positions <= starts[b] + t, i.e. exactly its
own past. Positions beyond a row's length hold zeros or values of padding; the mask hides them, and a
slot is rewritten from position 0 by the next request that takes it. A masked position still enters the
product softmax(q k + mask) v, so it must be finite: the engine zeroes a slot when its request ends
(:meth:`clear`), else a request that wrote NaN (a damaged adapter) would poison the slot's next request.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, num_slots: int, max_positions: int, min_capacity: int = 64):
        self.num_slots, self.max_positions = num_slots, max_positions
        self.capacity = 0
        self.min_capacity = min_capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots: list[int] = []
        self.starts: list[int] = []
        self.width = 0
        self.length = 0
        self._index: dict[torch.device, tuple] = {}

    def plan(self, slots: list[int], starts: list[int], width: int) -> None:
        """The next forward: batch row b is slot ``slots[b]``; its ``width`` tokens start at ``starts[b]``."""
        if len(slots) != len(starts) or not slots or width < 1:
            raise ValueError(f"bad cache plan: slots {slots}, starts {starts}, width {width}")
        need = max(starts) + width
        if need > self.max_positions:
            raise ValueError(f"the cache holds {self.max_positions} positions per slot; {need} were asked for")
        if need > self.capacity:  # grow every layer at once (amortised: at least doubling)
            self._grow(min(self.max_positions, max(need, 2 * self.capacity, self.min_capacity)))
        self.slots, self.starts, self.width, self.length = list(slots), list(starts), width, need
        self._index = {}

    def _grow(self, capacity: int) -> None:
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[layer] = new
        self.capacity = capacity

    def _indices(self, device: torch.device) -> tuple:
        """(slots [B, 1], positions [B, T], contiguous) on ``device``; built once per forward and device."""
        if device not in self._index:
            slots = torch.tensor(self.slots, device=device)
            pos = torch.tensor(self.starts, device=device)[:, None] + torch.arange(self.width, device=device)
            self._index[device] = (slots[:, None], pos, self.slots == list(range(len(self.slots))))
        return self._index[device]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """Write the batch's new key/value states ([B, H, T, D]) into their slots; return every row's
        keys/values up to the planned length ([B, H, K, D])."""
        out = []
        for store, x in ((self.keys, key), (self.values, value)):
            buf = store.get(layer_idx)
            if buf is None:  # zeros, never uninitialised memory: a masked-out NaN would still poison p @ V
                buf = store[layer_idx] = x.new_zeros(self.num_slots, x.shape[1], self.capacity, x.shape[3])
            slots, pos, contiguous = self._indices(x.device)
            buf[slots, :, pos] = x.transpose(1, 2).to(buf.dtype)  # [B, T, H, D] into (slot, position)
            # the batch's rows are slots 0..B-1 most of the time (slots are handed out lowest first): a view
            out.append(buf[: len(self.slots), :, : self.length] if contiguous
                       else buf[slots[:, 0], :, : self.length])
        return out[0], out[1]

    def clear(self, slot: int) -> None:
        """Zero every layer's keys and values of ``slot`` (its request ended; see the module docstring)."""
        for store in (self.keys, self.values):
            for buf in store.values():
                buf[slot].zero_()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - self.width

    def mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive attention mask [B, 1, T, K]: 0 where row b's query t may look (positions <= starts[b] + t)."""
        _, pos, _ = self._indices(device)
        visible = torch.arange(self.length, device=device)[None, None, :] <= pos[:, :, None]  # [B, T, K]
        m = torch.zeros(visible.shape, dtype=dtype, device=device)
        m.masked_fill_(~visible, torch.finfo(dtype).min)
        return m[:, None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in (self.keys, self.values) for t in s.values())
