"""Axolotl's quantisation of fused MoE experts (``quantize_moe_experts: true``).

transformers 5 stores the experts of most MoE models as fused 3-D parameters
(``experts.gate_up_proj`` [experts, 2 * inter, hidden], ``experts.down_proj``), which
bitsandbytes' ``replace_with_bnb_linear`` never reaches: a plain bnb load keeps them in
16 bits. Axolotl (src/axolotl/monkeypatch/moe_quant.py, 0.19.0) patches transformers'
``set_param_for_module`` so that every parameter of 3+ dimensions whose name holds
"expert" (and whose module is not a bnb Linear) is quantised as it lands:

* 4-bit (``load_in_4bit``): bitsandbytes' own ``nn.parametrize.replace_parameter_4bit``
  with the YAML's quant type and double quantisation: the flattened tensor quantised in
  one piece by ``F.quantize_4bit`` (packed uint8 ``[numel / 2, 1]`` whatever
  ``bnb_4bit_quant_storage`` says, absmax per 64 values, the nested statistics) kept as
  ``parametrizations.<name>.original``, the quant state on the parametrization;
* 8-bit (``load_in_8bit``): ``F.int8_vectorwise_quant`` of the fp16 tensor: int8 data of
  the same shape and a float32 ``row_stats`` per row of the flattened 2-D view (a buffer
  of the parametrization).

Every access of the parameter dequantises the whole tensor (bf16 for 4-bit, the weight's
dtype; fp16 for 8-bit), cached for the length of the owning module's forward by the
hooks both register: that transient, and whatever autograd saves of it, comes out of the
traced step, since the meta model runs the same bitsandbytes code.

``quantize_fused_experts`` is used on the meta model the planner traces and on the real
model ``qplan measure`` loads, so both hold the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Axolotl's test for an expert tensor: its name holds this (case-insensitive).
EXPERT_KEYWORD = "expert"
MIN_EXPERT_DIMS = 3


def is_fused_expert(name: str, shape: tuple[int, ...]) -> bool:
    """Whether Axolotl's load patch quantises the parameter ``name`` of ``shape``."""
    return len(shape) >= MIN_EXPERT_DIMS and EXPERT_KEYWORD in name.lower()


def expert_rows(shape: tuple[int, ...]) -> int:
    """Rows of the flattened 2-D view the 8-bit path quantises row-wise."""
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows


def int8_expert_tensors(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Byte sizes the 8-bit path keeps: int8 data (same shape), float32 row_stats."""
    numel = expert_rows(shape) * shape[-1]
    return (numel, 4 * expert_rows(shape))


class Int8RowwiseParametrization(nn.Module):
    """Dequantises row-wise int8 data on access (bitsandbytes' int8_vectorwise_dequant),
    the layout Axolotl's 8-bit expert quantisation keeps."""

    def __init__(self, row_stats: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("row_stats", row_stats)

    @torch.no_grad()
    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        shape = quantized.shape
        flat = quantized.reshape(-1, shape[-1]) if quantized.ndim > 2 else quantized
        return F.int8_vectorwise_dequant(flat, self.row_stats).reshape(shape)


def _replace_int8(module: nn.Module, name: str) -> None:
    import bitsandbytes.functional as F
    import torch.nn.utils.parametrize as P
    from bitsandbytes.nn.parametrize import (
        _disable_parametrization_cache,
        _enable_parametrization_cache,
    )

    original = getattr(module, name)
    shape = original.shape
    flat = original.data.to(torch.float16).reshape(-1, shape[-1])
    data, row_stats, _ = F.int8_vectorwise_quant(flat)
    setattr(module, name, nn.Parameter(data.reshape(shape), requires_grad=False))
    P.register_parametrization(module, name, Int8RowwiseParametrization(row_stats),
                               unsafe=True)
    if not getattr(module, "_qplan_int8_cache_hooks", False):
        # One pair per module, as Axolotl registers: the dequantised tensor is reused for
        # the whole forward of the module and dropped after it.
        module.register_forward_pre_hook(_enable_parametrization_cache)
        module.register_forward_hook(_disable_parametrization_cache, always_call=True)
        module._qplan_int8_cache_hooks = True


def fused_expert_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full name, owning module, parameter name) of every parameter Axolotl quantises."""
    import bitsandbytes as bnb

    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_fused_expert(full, tuple(param.shape)):
                found.append((full, module, name))
    return found


def quantize_fused_experts(model: nn.Module, precision: Any) -> int:
    """Quantise every fused expert parameter of ``model`` (meta or real) as Axolotl's
    load patch does for ``precision`` (a bitsandbytes row). Returns how many."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    found = fused_expert_parameters(model)
    for _, module, name in found:
        if precision.is_4bit:
            replace_parameter_4bit(module, name, compress_statistics=precision.double_quant,
                                   quant_type=precision.quant_type)
        else:
            _replace_int8(module, name)
    return len(found)


def parametrization_state(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a quantising parametrization holds outside parameters and buffers (the
    4-bit quant state: absmax, quant maps, offset, nested statistics)."""
    out: list[torch.Tensor] = []
    for plist in getattr(module, "parametrizations", {}).values():
        for parametrization in plist:
            state = getattr(parametrization, "quant_state", None)
            while state is not None:
                out.extend(v for v in vars(state).values() if isinstance(v, torch.Tensor))
                state = getattr(state, "state2", None)
    return out
