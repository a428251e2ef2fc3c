"""vLLM's routed experts with adapter slots: the expert overlay of ``esft/overlay.py``, in vLLM's kernel.

vLLM 0.32 builds every MoE layer with ``FusedMoEFactory``, whose expert weights live in one
``RoutedExperts`` module (``w13_weight`` [E, 2I, H], ``w2_weight`` [E, H, I]) and run in one fused
kernel that takes the router's ``topk_ids``. ``RoutedExperts`` is a ``PluggableLayer``, so the plugin
registers this subclass in its place (``register_oot``). With the plugin switched on it allocates

    w13_weight [E + R, 2I, H], w2_weight [E + R, H, I]   rows 0..E-1: the base (loaded by vLLM as usual),
                                                         rows E..E+R-1: R adapter slots, zero until a load
    table      [1 + max_adapters, E] int32               row 0 = arange(E) (the base); row a = adapter a:
                                                         e, or E + its slot where it changed expert e

and after routing maps each token's expert ids through its request's table row:
``topk_ids = table[row_of_token, topk_ids]``. The routing weights stay the base's (ESFT never trains the
router), so base and adapter tokens of one batch run in the same single kernel call, which is the
difference from ``overlay.py`` (two expert calls there, because transformers' expert code cannot be
given more rows than experts). A batch of base tokens alone skips the lookup.

Slots are written in the kernel's own layout: at start-up each layer converts one base expert from
checkpoint layout with the same code that writes adapter rows and compares it with the row vLLM
produced; a kernel whose layout that code does not reproduce is refused then, naming it.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from . import config as esft_config
from .state import STATE

log = logging.getLogger("esft.vllm_plugin")

# Kernels whose weight layout the plugin writes: the checkpoint rows after intermediate padding, then
# CPU: vLLM's per-expert prepack (cpu_prepack_moe_weight, with the kernel's ISA); Triton (GPU): as is.
_CPU_KERNELS = {"CPUUnquantizedExperts", "X86CPUUnquantizedExperts", "ArmCPUUnquantizedExperts",
                "PowerCPUUnquantizedExperts"}
_PLAIN_KERNELS = {"TritonExperts"}


class EsftUnsupported(RuntimeError):
    """A model, kernel or parallel layout the plugin cannot serve adapters on (raised at start-up)."""


class EsftRoutedExperts(RoutedExperts):
    """``RoutedExperts`` + R adapter slots + an [adapters, experts] table (see the module docstring)."""

    def __init__(self, layer_name, params_dtype, moe_config, quant_config, expert_map_manager, **kwargs):
        cfg = esft_config.current()
        if cfg is None:  # plugin not switched on: vLLM's own layer
            super().__init__(layer_name, params_dtype, moe_config, quant_config, expert_map_manager, **kwargs)
            self.esft = None
            return
        E = moe_config.num_experts
        why = _unsupported(moe_config, quant_config, expert_map_manager, E)
        if why:
            raise EsftUnsupported(f"esft: cannot serve adapters on MoE layer {layer_name}: {why}")
        R = cfg.max_adapter_experts or esft_config.default_slots(E)
        # Our own copy of the config with E + R experts: the quant method allocates and runs E + R rows, while
        # the router and the runner keep the original (E logical experts, routing over E).
        wide = dataclasses.replace(moe_config, num_experts=E + R, num_local_experts=E + R)
        super().__init__(layer_name, params_dtype, wide, quant_config, expert_map_manager, **kwargs)
        # RoutedExperts rounds hidden / intermediate sizes up for some kernels and records it in its config;
        # the runner reads the original, so keep the two in step.
        moe_config.hidden_dim = wide.hidden_dim
        moe_config.intermediate_size_per_partition = wide.intermediate_size_per_partition
        self.esft = cfg
        self.num_base_experts = E
        self.num_slots = R
        self.hidden_size_unpadded = wide.hidden_dim_unpadded or wide.hidden_dim
        self.intermediate = moe_config.intermediate_size_per_partition_unpadded or moe_config.intermediate_size_per_partition
        self.tp_rank = moe_config.moe_parallel_config.tp_rank
        self.tp_size = moe_config.moe_parallel_config.tp_size
        table = torch.arange(E, dtype=torch.int32).repeat(1 + cfg.max_adapters, 1)
        self.register_buffer("esft_table", table, persistent=False)  # [1 + A, E]
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernel_kind: str | None = None
        qm = self.quant_method
        inner = qm.process_weights_after_loading

        def process(layer, _inner=inner):  # vLLM calls quant_method.process_weights_after_loading(layer)
            self._before_kernel_format()
            _inner(layer)
            self._after_kernel_format()

        qm.process_weights_after_loading = process
        STATE.layers[layer_name] = self

    # ---- start-up -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _before_kernel_format(self) -> None:
        """Weights are loaded, in checkpoint layout: zero the slots, keep base expert 0 to check the layout."""
        E = self.num_base_experts
        self.w13_weight.data[E:].zero_()
        self.w2_weight.data[E:].zero_()
        self._probe = (self.w13_weight.data[0:1].clone(), self.w2_weight.data[0:1].clone())

    @torch.no_grad()
    def _after_kernel_format(self) -> None:
        kernel = getattr(getattr(self.quant_method, "moe_kernel", None), "fused_experts", None)
        name = type(kernel).__name__ if kernel is not None else type(self.quant_method).__name__
        if name in _CPU_KERNELS and not getattr(kernel, "_use_zentorch", False):
            self._kernel_kind = "cpu"
            self._isa = kernel.isa
        elif name in _PLAIN_KERNELS:
            self._kernel_kind = "plain"
        else:
            raise EsftUnsupported(f"esft: MoE kernel {name} of layer {self.layer_name}: the plugin does not know "
                                  f"its weight layout (supported: {sorted(_CPU_KERNELS | _PLAIN_KERNELS)})")
        w13, w2 = self._probe
        self._probe = None
        a, b = self.kernel_rows(w13, w2, sharded=True)
        if not (torch.equal(a[0], self.w13_weight.data[0]) and torch.equal(b[0], self.w2_weight.data[0])):
            raise EsftUnsupported(f"esft: MoE kernel {name} of layer {self.layer_name}: converting an expert to its "
                                  "weight layout did not reproduce vLLM's own conversion; refusing to write adapter "
                                  "rows that would be wrong")

    # ---- writing adapter rows -------------------------------------------------------------------------

    def kernel_rows(self, w13: torch.Tensor, w2: torch.Tensor, sharded: bool = False):
        """Checkpoint-layout rows -> the kernel's layout.

        w13 [S, 2I, H] (gate rows then up rows, as vLLM stacks w1 and w3), w2 [S, H, I]; full-size unless
        ``sharded`` (already this tensor-parallel rank's part, as vLLM's loader leaves them).
        """
        I = self.intermediate
        dt, dev = self.w13_weight.dtype, self.w13_weight.device
        w13, w2 = w13.to(dev, dt), w2.to(dev, dt)
        if not sharded and self.tp_size > 1:  # this rank's columns of the intermediate dimension
            n = I // self.tp_size
            lo = self.tp_rank * n
            w13 = torch.cat([w13[:, lo:lo + n], w13[:, I + lo:I + lo + n]], dim=1)
            w2 = w2[:, :, lo:lo + n]
        i = w13.shape[1] // 2  # this rank's intermediate size
        ip = self.w13_weight.shape[1] // 2  # the kernel's (padded) one
        if ip != i:
            pad = w13.new_zeros(w13.shape[0], 2 * ip, w13.shape[2])
            pad[:, :i] = w13[:, :i]
            pad[:, ip:ip + i] = w13[:, i:]
            w13 = pad
            w2 = torch.nn.functional.pad(w2, (0, ip - i))
        if self._kernel_kind == "cpu":
            from vllm._custom_ops import cpu_prepack_moe_weight

            w13 = cpu_prepack_moe_weight(w13.contiguous(), self._isa)
            w2 = cpu_prepack_moe_weight(w2.contiguous(), self._isa)
        return w13.contiguous(), w2.contiguous()

    @torch.no_grad()
    def write_slots(self, slots: list[int], w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Write checkpoint-layout rows (full size) into ``slots``, in the kernel's layout, in place."""
        a, b = self.kernel_rows(w13, w2)
        idx = torch.tensor([self.num_base_experts + s for s in slots], device=self.w13_weight.device)
        self.w13_weight.data.index_copy_(0, idx, a)
        self.w2_weight.data.index_copy_(0, idx, b)

    @torch.no_grad()
    def set_row(self, row: int, experts: list[int], slots: list[int]) -> None:
        """Point table row ``row`` at ``slots`` for ``experts`` (the base everywhere else)."""
        t = self.esft_table
        t[row] = torch.arange(self.num_base_experts, dtype=t.dtype, device=t.device)
        if experts:
            t[row, torch.tensor(experts, device=t.device)] = torch.tensor(
                [self.num_base_experts + s for s in slots], dtype=t.dtype, device=t.device)

    # ---- forward --------------------------------------------------------------------------------------

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        if self.esft is not None:
            # an opaque op: when vLLM compiles the model (torch.compile traces into this method on the CPU),
            # the per-step token rows must be read when the graph runs, not baked in when it is traced
            topk_ids = torch.ops.esft.remap_topk_ids(topk_ids, self.esft_table)
        return super().forward_modular(x, topk_weights, topk_ids, shared_experts=shared_experts,
                                       shared_experts_input=shared_experts_input)


@torch.library.custom_op("esft::remap_topk_ids", mutates_args=())
def remap_topk_ids(topk_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [N, K] -> table[row of token n, ids[n, k]] (this step's rows, state.py); a copy of ids when all base."""
    rows = STATE.token_rows(topk_ids.shape[0], topk_ids.device)
    if rows is None:
        return topk_ids.clone()
    return table[rows.unsqueeze(1), topk_ids.long()].to(topk_ids.dtype)


@remap_topk_ids.register_fake
def _(topk_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(topk_ids)


def _unsupported(moe_config, quant_config, expert_map_manager, E: int) -> str | None:
    """Why the plugin cannot hook this layer, or None."""
    if quant_config is not None:
        return (f"its experts are quantized ({type(quant_config).__name__}); the plugin writes unquantized adapter "
                "rows only")
    par = moe_config.moe_parallel_config
    if par.use_ep or par.dp_size > 1 or getattr(par, "pcp_size", 1) > 1:
        return "expert / data / context parallelism is not supported (tensor parallelism is)"
    if par.enable_eplb or moe_config.num_logical_experts != E:
        return "redundant experts (EPLB) are not supported"
    if getattr(expert_map_manager, "num_fused_shared_experts", 0):
        return "shared experts fused into the routed kernel are not supported"
    if not moe_config.is_act_and_mul:
        return "only gated (gate/up/down) experts are supported"
    return None
