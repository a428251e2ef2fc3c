"""Per worker process: the MoE layers with adapter slots, and which table row each token of the running step uses.

The model runner fills ``rows`` once per step from its requests (``runner.py``); every MoE layer of that
step's forward reads it. It is None while a step holds only base requests, so such steps pay nothing.
"""

from __future__ import annotations

import numpy as np
import torch


class _State:
    def __init__(self):
        self.layers: dict = {}  # layer name -> EsftRoutedExperts
        self.rows: np.ndarray | None = None  # [tokens of this step] table rows; None: all base
        self._rows_t: torch.Tensor | None = None
        self.registry = None  # slots.Registry, once the model is loaded

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def set_rows(self, rows: np.ndarray | None) -> None:
        self.rows = rows if rows is not None and rows.any() else None
        self._rows_t = None

    def token_rows(self, n: int, device) -> torch.Tensor | None:
        """[n] table rows for a forward over ``n`` tokens (tokens past the step's real ones are padding: base)."""
        if self.rows is None:
            return None
        if self._rows_t is None or self._rows_t.shape[0] != n or self._rows_t.device != torch.device(device):
            m = self.rows.shape[0]
            if n < m:
                raise RuntimeError(f"esft: an MoE forward over {n} tokens in a step of {m}: token-to-adapter mapping "
                                   "unknown (sequence or data parallel MoE is not supported)")
            r = np.zeros(n, dtype=np.int64)
            r[:m] = self.rows
            self._rows_t = torch.from_numpy(r).to(device)
        return self._rows_t


STATE = _State()
