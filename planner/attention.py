"""The attention implementation the planned model is built with (``--attn``).

``sdpa`` and ``eager`` are transformers' own: the meta model is built with that
``attn_implementation``, so eager's materialised scores (the [batch, heads, q, kv] product,
its fp32 softmax and the cast back, saved for backward) are traced as a real step keeps
them. SDPA's kernel choice is pinned in planner/trace.py.

``flash_attention_2`` needs the flash-attn package and a CUDA GPU; transformers refuses to
build it without the package (``ImportError: ... the package for FlashAttention2 doesn't
seem to be installed``). The trace builds the model with transformers' flash masking
(``flash_attention_mask``: no mask for an unpadded batch, sliding windows handled by the
kernel) and an attention function with flash-attn 2's documented memory
(csrc/flash_attn/flash_api.cpp, ``mha_fwd`` / ``mha_bwd``):

* forward: the output [batch, seq, heads, head_dim] in the input dtype and the softmax
  logsumexp [batch, heads, seq] in float32; both saved for backward with q, k, v (views of
  the projections), never the seq x seq scores. Keys/values with fewer heads (GQA) are
  read in place, not expanded.
* backward: dq, dk, dv; a float32 ``softmax_d`` [batch, heads, seq rounded up to 128];
  a float32 ``dq_accum`` [batch, seq rounded to 128, heads, head_dim rounded to 32 (64 above
  128)]; for GQA, dk and dv expanded to the query heads before they are summed.

Packed sequences (sample packing: position ids restarting in one row) take transformers'
varlen path (``_prepare_from_posids``: q, k, v made contiguous and flattened to
[tokens, heads, head_dim], int32 ``cu_seqlens`` of sequences + 1) and flash-attn's
``mha_varlen_fwd`` / ``mha_varlen_bwd`` (2.7+): an unpadded float32 logsumexp
[heads, tokens]; in the backward ``softmax_d`` [heads, tokens + 128 x sequences] and
``dq_accum`` [tokens + 128 x sequences, heads, head_dim rounded], both float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from qplan.errors import ConfigError

# The name the trace registers its flash-attention stand-in under. It must not contain
# "flash": transformers would then try to import the flash-attn package for it.
TRACE_FLASH = "qplan_fa2"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _FlashAttention2(torch.autograd.Function):
    """flash_attn_func's tensors: inputs and outputs [batch, seq, heads, head_dim]."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, seq_q, heads, _ = q.shape
        out = q.new_empty((batch, seq_q, heads, v.shape[-1]))
        lse = q.new_empty((batch, heads, seq_q), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, _out, _lse = ctx.saved_tensors
        batch, seq_q, heads, head_dim = q.shape
        seq_rounded = _round_up(seq_q, 128)
        dim_rounded = _round_up(head_dim, 32 if head_dim <= 128 else 64)
        dq = torch.empty_like(q)
        softmax_d = q.new_empty((batch, heads, seq_rounded), dtype=torch.float32)
        dq_accum = q.new_empty((batch, seq_rounded, heads, dim_rounded), dtype=torch.float32)
        dk, dv = _kv_grads(q, k, v, (batch, k.shape[1], heads, head_dim), k.shape[2] != heads)
        del softmax_d, dq_accum
        return dq, dk, dv


def _kv_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, expanded: tuple[int, ...],
              grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv as flash-attn's backward allocates them: under grouped-query attention it
    first writes per-query-head gradients (``expanded``) and then sums them per KV head."""
    if not grouped:
        return torch.empty_like(k), torch.empty_like(v)
    dk_expanded, dv_expanded = q.new_empty(expanded), q.new_empty(expanded)
    dk = dk_expanded.new_empty(k.shape)
    dv = dv_expanded.new_empty(v.shape)
    del dk_expanded, dv_expanded
    return dk, dv


class _FlashAttention2Varlen(torch.autograd.Function):
    """flash_attn_varlen_func's tensors: inputs and outputs [tokens, heads, head_dim]."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sequences: int) -> torch.Tensor:
        tokens, heads, _ = q.shape
        out = q.new_empty((tokens, heads, v.shape[-1]))
        lse = q.new_empty((heads, tokens), dtype=torch.float32)
        ctx.sequences = sequences
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, _out, _lse = ctx.saved_tensors
        tokens, heads, head_dim = q.shape
        padded = tokens + 128 * ctx.sequences
        dim_rounded = _round_up(head_dim, 32 if head_dim <= 128 else 64)
        dq = torch.empty_like(q)
        softmax_d = q.new_empty((heads, padded), dtype=torch.float32)
        dq_accum = q.new_empty((padded, heads, dim_rounded), dtype=torch.float32)
        dk, dv = _kv_grads(q, k, v, (k.shape[0], heads, head_dim), k.shape[1] != heads)
        del softmax_d, dq_accum
        return dq, dk, dv, None


# (sequences, tokens each) while a packed step is traced (``packed_flash``).
_PACKING: list[tuple[int, int]] = []


@contextlib.contextmanager
def packed_flash(sequences: int, length: int) -> Iterator[None]:
    """Trace flash attention on packed rows through the varlen path."""
    _PACKING.append((sequences, length))
    try:
        yield
    finally:
        _PACKING.pop()


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """transformers' ``_prepare_from_posids`` and the varlen kernel, for one packed row."""
    sequences, _ = _PACKING[-1]
    batch = q.shape[0]
    q, k, v = (t.contiguous().view(-1, t.size(-2), t.size(-1)) for t in (q, k, v))
    cu_seqlens = q.new_empty((sequences + 1,), dtype=torch.int32)
    out = _FlashAttention2Varlen.apply(q, k, v, sequences)
    del cu_seqlens
    return out.view(batch, -1, out.size(-2), out.size(-1))


def flash_attention_2_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``flash_attention_forward`` with the kernel replaced by its memory:
    the same transposes to [batch, seq, heads, dim], padding of narrower values (MLA),
    and cast of float32 inputs to the compute dtype."""
    from transformers.integrations.flash_attention import get_target_dtype

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    head_dim, v_head_dim = q.shape[-1], v.shape[-1]
    if v_head_dim != head_dim:
        v = torch.nn.functional.pad(v, [0, head_dim - v_head_dim])
    if q.dtype == torch.float32:
        target = _target_dtype(get_target_dtype, q, module)
        q, k, v = (t.to(target) for t in (q, k, v))
    out = _varlen(q, k, v) if _PACKING else _FlashAttention2.apply(q, k, v)
    if v_head_dim != head_dim:
        out = out[..., :v_head_dim]
    return out, None


def _target_dtype(get_target_dtype: Any, query: torch.Tensor, module: torch.nn.Module):
    if query.device.type != "meta":
        return get_target_dtype(query, module)
    # torch.is_autocast_enabled("meta") is an error; meta tensors never autocast. A real
    # quantised load marks its config ``_is_quantized`` and transformers then takes the
    # config dtype; the meta model is quantised without that mark, so look at the weights.
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    quantized = hasattr(module.config, "_is_quantized") or any(
        not m.weight.dtype.is_floating_point for m in linears)
    if quantized or not linears:
        dtype = module.config.dtype
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return linears[0].weight.dtype


def _flash_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' ``flash_attention_mask``, which returns no mask when the 2-D padding
    mask is all ones (``attention_mask.all()``): a meta mask (TRL's collators pass one)
    is an unpadded batch's, all ones, as ``fast_all`` decides in planner/trace.py."""
    from transformers.masking_utils import flash_attention_mask

    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.device.type == "meta":
        kv_length = kwargs["kv_length"] if "kv_length" in kwargs else args[2]
        mask = mask[:, -kv_length:]
        return None if mask.shape[1] == kv_length else mask
    return flash_attention_mask(*args, **kwargs)


def register_trace_flash() -> None:
    """Make ``TRACE_FLASH`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(TRACE_FLASH, flash_attention_2_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TRACE_FLASH, _flash_mask)


def build_attn_implementation(attn: str) -> str:
    """The ``attn_implementation`` to build the meta model with for ``--attn attn``."""
    if attn != "flash_attention_2":
        return attn
    register_trace_flash()
    return TRACE_FLASH


def check_attn_support(model: torch.nn.Module, attn: str) -> None:
    """Refuse flash_attention_2 where transformers refuses it for the model class."""
    if attn == "flash_attention_2" and not getattr(model, "_supports_flash_attn", False):
        raise ConfigError(
            f"{type(model).__name__} does not support flash_attention_2 in transformers; "
            "use --attn sdpa"
        )
