"""Axolotl's LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``).

Axolotl 0.19.0 replaces peft's per-projection LoRA forward with its own autograd Functions
(``axolotl/kernels/lora.py``: ``LoRA_MLP``, ``LoRA_QKV``, ``LoRA_O``), patched into the
peft model by ``axolotl/monkeypatch/lora_kernels.py`` (``patch_self_attn_lora`` rewrites
the attention class's forward to call ``self.apply_qkv`` / ``self.apply_o``;
``apply_lora_kernel_patches`` binds those and the MLP's forward per layer). What runs here is
that code, allocation for allocation, with what is Triton (the SwiGLU / GeGLU activations)
or a CUDA-only C call (bitsandbytes' NF4 dequantisation through ctypes) done in PyTorch
outside the live-tensor tracker (a kernel writes into buffers allocated before it):

* ``matmul_lora``: the base weight dequantised (a 4-bit one: a float32 copy of the block
  statistics and the weight in ``quant_state.dtype``, freed after the matmul), ``X @ W``
  into a new output, ``out.addmm_(X @ A^T, B^T, alpha=s)`` (the [tokens, r] product is a
  transient; A and B cast to the input dtype, copies where the adapters are float32).
* ``LoRA_MLP``: gate and up through ``matmul_lora``, the activation (Triton: a new output
  like the gate), down through ``matmul_lora``. Saved: X twice (the same tensor without
  dropout, the dropped copy with it), gate and up, the six LoRA matrices cast to the
  input dtype. Backward: the down projection's input gradient through ``matmul_lora``
  with the weight transposed, the activation's backward *in place* (Triton: the incoming
  gradient becomes h, gate and up become their gradients), per projection ``grad @ B``
  [tokens, r], ``A @ X^T`` [r, tokens] and the two LoRA gradients (``empty_like`` of the
  transposed matrices, in the input dtype: autograd casts them to the float32 adapters),
  then dX from the dequantised up and gate weights (dX_drop apart with dropout).
* ``LoRA_QKV``: Q, K, V through ``matmul_lora``; saved X twice and the six matrices cast.
  Backward as the MLP's gate/up part, dX accumulated over the three weights.
* ``LoRA_O``: one ``matmul_lora``; saved the two matrices cast and X twice.

Axolotl's conditions, kept: only a LoRA adapter (not DoRA: qplan plans no DoRA), every
projection of the group adapted (else that group keeps peft's forward, as Axolotl's
``can_patch_*`` checks), the MLP's activation SiLU or GELU (Axolotl raises otherwise), the
attention forward holding the code Axolotl rewrites (it asserts otherwise).
No autocast: qplan plans the step without it (``bf16=False``), so Axolotl's
``torch.amp.custom_fwd/custom_bwd(device_type="cuda")`` wrappers change nothing here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qplan.errors import UsageError
from qplan.planner.kernel_math import KernelMath, is_meta

LORA_KERNELS = ("mlp", "qkv", "o")
# hidden_act values Axolotl's lora_mlp_kernel runs ("gelu*" maps to gelu: gemma's
# gelu_pytorch_tanh runs its exact-erf GeGLU kernel).
SUPPORTED_ACTIVATIONS = ("silu", "gelu")


# --------------------------------------------------------------------------------------
# Dequantisation (axolotl/kernels/quantize.py)
# --------------------------------------------------------------------------------------


def dequantize(W: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """Axolotl's ``dequantize``: W itself without a quant state; a float8 weight times its
    inverse scales (torch ops); a 4-bit weight through bitsandbytes' C kernels: with
    double quantisation (``_ctypes_nf4_dequant``) a float32 ``out_absmax`` and the weight,
    without it (``bnb.functional.dequantize_4bit``) the weight only. A packed weight with
    one row (a transposed view) comes back transposed, as bitsandbytes' convention."""
    if quant_state is None:
        return W
    if W.dtype == torch.float8_e4m3fn:
        if not W.is_contiguous() and W.dim() == 2:
            return _dequantize_fp8(W.t(), quant_state).t()
        return _dequantize_fp8(W, quant_state)
    nested = quant_state.offset is not None and quant_state.state2 is not None
    out = torch.empty(tuple(quant_state.shape), dtype=quant_state.dtype, device=W.device)
    out_absmax = (torch.empty(quant_state.absmax.numel(), dtype=torch.float32,
                              device=W.device) if nested else None)
    if not is_meta(W):
        import bitsandbytes.functional as bnb_f

        with KernelMath():
            packed = W.t() if W.shape[0] == 1 else W
            out.copy_(bnb_f.dequantize_4bit(packed, quant_state).reshape(out.shape))
    del out_absmax  # freed when the C call returns
    return out.t() if W.shape[0] == 1 else out


def _dequantize_fp8(W: torch.Tensor, scale_inv: torch.Tensor,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dequantize_fp8`` (plain torch ops, as Axolotl's)."""
    W_float = W.to(dtype)
    if scale_inv.numel() == 1:
        return W_float * scale_inv.to(dtype)
    if scale_inv.dim() == 2 and W.dim() == 2:
        sr, sc = scale_inv.shape
        br = W.shape[0] // sr
        bc = W.shape[1] // sc
        if sr * br == W.shape[0] and sc * bc == W.shape[1]:
            return (W_float.reshape(sr, br, sc, bc)
                    * scale_inv[:, None, :, None].to(dtype)).reshape(W.shape)
        br_ceil = -(-W.shape[0] // sr)
        bc_ceil = -(-W.shape[1] // sc)
        scale_expanded = (scale_inv.to(dtype).repeat_interleave(br_ceil, dim=0)
                          .repeat_interleave(bc_ceil, dim=1))[: W.shape[0], : W.shape[1]]
        return W_float * scale_expanded
    return W_float * scale_inv.to(dtype)


# --------------------------------------------------------------------------------------
# The activations (axolotl/kernels/swiglu.py, geglu.py: Triton)
# --------------------------------------------------------------------------------------


def _silu_f32(gate: torch.Tensor) -> torch.Tensor:
    return gate * torch.sigmoid(gate)


def _gelu_partial(gate: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.erf(gate * 0.7071067811865476) + 1.0)


def _glu_forward(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """``swiglu_forward`` / ``geglu_forward``: a new output like the gate (3-D, as the
    kernel's wrapper allocates it); activation in float32, cast to up's dtype, times up."""
    batch, seq_len, hidden = gate.shape
    out = torch.empty((batch, seq_len, hidden), dtype=gate.dtype, device=gate.device)
    if not is_meta(gate):
        with KernelMath():
            g = gate.float()
            f = _silu_f32(g) if act == "silu" else _gelu_partial(g) * g
            out.copy_(f.to(up.dtype) * up)
    return out


def _glu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``swiglu_backward`` / ``geglu_backward``: in place, nothing new; the incoming
    gradient becomes h, gate its gradient, up its gradient."""
    if not is_meta(grad):
        with KernelMath():
            g = gate.float()
            if act == "silu":
                sig = torch.sigmoid(g)
                f = (sig * g).to(grad.dtype)
                dgate = sig * (1.0 + g * (1.0 - sig))
            else:
                partial = _gelu_partial(g)
                f = (partial * g).to(grad.dtype)
                dgate = partial + 0.3989422804014327 * g * torch.exp(-0.5 * g * g)
            h = f * up
            grad_up = grad * f
            grad_gate = ((grad * up).float() * dgate).to(grad.dtype)
            grad.copy_(h)
            gate.copy_(grad_gate)
            up.copy_(grad_up)
    return grad, gate, up


# --------------------------------------------------------------------------------------
# The LoRA matmul and the autograd Functions (axolotl/kernels/lora.py)
# --------------------------------------------------------------------------------------


def matmul_lora(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, W_quant: Any,
                A: torch.Tensor | None, B: torch.Tensor | None, s: float | None,
                X_drop: torch.Tensor | None = None) -> torch.Tensor:
    """``matmul_lora`` (no LoRA bias: qplan plans ``bias="none"``)."""
    dtype = X.dtype
    W = dequantize(W.t(), W_quant)
    reshape = False
    if X.dim() == 3:
        batch, seq_len, _ = X.shape
        X = X.view(-1, X.shape[-1])
        if X_drop is not None:
            X_drop = X_drop.view(-1, X_drop.shape[-1])
        reshape = True
    out = torch.matmul(X, W)
    if W_quant is not None:
        del W
    if A is not None:
        X_lora = X_drop if X_drop is not None else X
        A, B = A.t().to(dtype), B.t().to(dtype)  # type: ignore[union-attr]
        out.addmm_(X_lora @ A, B, alpha=s)  # type: ignore[arg-type]
    if b is not None:
        out += b
    return out.view(batch, seq_len, -1) if reshape else out


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None else None


def _lora_grads(grad: torch.Tensor, X_lora_t: torch.Tensor, A: torch.Tensor | None,
                B: torch.Tensor | None, s: float) -> tuple[Any, Any, Any]:
    """One projection's ``grad @ B`` (kept for dX) and its two LoRA gradients, as the
    Functions' backward computes them (A [r, in], B [out, r], both in the input dtype)."""
    if A is None or B is None:
        return None, None, None
    grad_B = grad @ B
    d_A = torch.empty_like(A.t())
    d_B = torch.empty_like(B.t())
    d_A.addmm_(X_lora_t, grad_B, alpha=s, beta=0)
    d_B.addmm_(A @ X_lora_t, grad, alpha=s, beta=0)
    return grad_B, d_A, d_B


class LoRA_MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X: torch.Tensor, X_drop: torch.Tensor | None,
                gate_weight: torch.Tensor, gate_bias: Any, gate_quant: Any, gate_A: Any,
                gate_B: Any, gate_scale: float,
                up_weight: torch.Tensor, up_bias: Any, up_quant: Any, up_A: Any, up_B: Any,
                up_scale: float,
                down_weight: torch.Tensor, down_bias: Any, down_quant: Any, down_A: Any,
                down_B: Any, down_scale: float, act: str) -> torch.Tensor:
        has_dropout = X_drop is not None
        dtype = X.dtype
        gate = matmul_lora(X, gate_weight, gate_bias, gate_quant, gate_A, gate_B, gate_scale,
                           X_drop=X_drop)
        up = matmul_lora(X, up_weight, up_bias, up_quant, up_A, up_B, up_scale, X_drop=X_drop)
        hidden = _glu_forward(gate, up, act)
        output = matmul_lora(hidden, down_weight, down_bias, down_quant, down_A, down_B,
                             down_scale)
        ctx.save_for_backward(
            X, X_drop if has_dropout else X, gate, up,
            _cast(gate_A, dtype), _cast(gate_B, dtype), _cast(up_A, dtype),
            _cast(up_B, dtype), _cast(down_A, dtype), _cast(down_B, dtype),
        )
        ctx.scales = (gate_scale, up_scale, down_scale)
        ctx.quants = (gate_quant, up_quant, down_quant)
        ctx.weights = (gate_weight, up_weight, down_weight)
        ctx.act = act
        ctx.has_dropout = has_dropout
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        gate_scale, up_scale, down_scale = ctx.scales
        gate_quant, up_quant, down_quant = ctx.quants
        gate_weight, up_weight, down_weight = ctx.weights
        (X, X_lora, gate, up, gate_A, gate_B, up_A, up_B, down_A,
         down_B) = ctx.saved_tensors
        down_A_t = down_A.t() if down_A is not None else None
        down_B_t = down_B.t() if down_B is not None else None
        batch, seq_len, hd = X.shape
        grad_output = grad_output.view(-1, grad_output.shape[-1])
        X = X.view(-1, X.shape[-1])
        X_lora = X_lora.view(-1, X_lora.shape[-1])
        gate = gate.view(-1, gate.shape[-1])
        up = up.view(-1, up.shape[-1])
        grad_down = matmul_lora(grad_output, down_weight.t(), None, down_quant, down_B_t,
                                down_A_t, down_scale)
        h, grad_gate, grad_up = _glu_backward(grad_down, gate, up, ctx.act)
        # Down's LoRA gradients take h (the forward's activation, rebuilt in place).
        _, d_down_A, d_down_B = _lora_grads(grad_output, h.t(), down_A, down_B, down_scale)
        X_lora_t = X_lora.t()
        grad_B_up, d_up_A, d_up_B = _lora_grads(grad_up, X_lora_t, up_A, up_B, up_scale)
        grad_B_gate, d_gate_A, d_gate_B = _lora_grads(grad_gate, X_lora_t, gate_A, gate_B,
                                                      gate_scale)
        dX = dX_drop = None
        if ctx.needs_input_grad[0]:
            up_weight_deq = dequantize(up_weight.t(), up_quant)
            dX = torch.matmul(grad_up, up_weight_deq.t())
            del up_weight_deq
            gate_weight_deq = dequantize(gate_weight, gate_quant)
            dX.addmm_(grad_gate, gate_weight_deq)
            del gate_weight_deq
            into = dX
            if ctx.has_dropout:
                dX_drop = torch.zeros_like(X_lora)
                into = dX_drop
            if grad_B_up is not None:
                into.addmm_(grad_B_up, up_A, alpha=up_scale)
            if grad_B_gate is not None:
                into.addmm_(grad_B_gate, gate_A, alpha=gate_scale)
            if dX_drop is not None:
                dX_drop = dX_drop.view(batch, seq_len, hd)
            dX = dX.view(batch, seq_len, hd)

        def t(x: Any) -> Any:
            return x.t() if x is not None else None

        return (dX, dX_drop,
                None, None, None, t(d_gate_A), t(d_gate_B), None,
                None, None, None, t(d_up_A), t(d_up_B), None,
                None, None, None, t(d_down_A), t(d_down_B), None,
                None)


class LoRA_QKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X: torch.Tensor, X_drop: torch.Tensor | None, *params: Any
                ) -> tuple[torch.Tensor, ...]:
        # params: (weight, bias, quant, A, B, scale) for q, k, v.
        groups = [params[i:i + 6] for i in range(0, 18, 6)]
        has_dropout = X_drop is not None
        outs = [matmul_lora(X, W, b, quant, A, B, s, X_drop=X_drop)
                for W, b, quant, A, B, s in groups]
        dtype = X.dtype
        ctx.save_for_backward(
            X, X_drop if has_dropout else X,
            *[c for _, _, _, A, B, _ in groups for c in (_cast(A, dtype), _cast(B, dtype))],
        )
        ctx.scales = tuple(g[5] for g in groups)
        ctx.quants = tuple(g[2] for g in groups)
        ctx.weights = tuple(g[0] for g in groups)
        ctx.has_dropout = has_dropout
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, q_grad: torch.Tensor, k_grad: torch.Tensor,  # type: ignore[override]
                 v_grad: torch.Tensor) -> tuple[Any, ...]:
        X, X_lora, A_q, B_q, A_k, B_k, A_v, B_v = ctx.saved_tensors
        batch, seq_len = X.shape[:2]
        grads = (q_grad.view(-1, q_grad.shape[-1]), k_grad.reshape(-1, k_grad.shape[-1]),
                 v_grad.view(-1, v_grad.shape[-1]))
        X = X.view(-1, X.shape[-1])
        X_lora = X_lora.view(-1, X_lora.shape[-1])
        X_lora_t = X_lora.t()
        mats = ((A_q, B_q), (A_k, B_k), (A_v, B_v))
        lora = [_lora_grads(g, X_lora_t, A, B, s)
                for g, (A, B), s in zip(grads, mats, ctx.scales, strict=True)]
        grad_X: torch.Tensor | None = None
        for g, W, quant in zip(grads, ctx.weights, ctx.quants, strict=True):
            W_t = dequantize(W, quant)
            if grad_X is None:
                grad_X = torch.mm(g, W_t)
            else:
                grad_X.addmm_(g, W_t)
            del W_t
        assert grad_X is not None
        grad_X_drop = torch.zeros_like(X_lora) if ctx.has_dropout else None
        into = grad_X_drop if grad_X_drop is not None else grad_X
        for (grad_B, _, _), (A, _), s in zip(lora, mats, ctx.scales, strict=True):
            if grad_B is not None:
                into.addmm_(grad_B, A, alpha=s)
        out: list[Any] = [grad_X.view(batch, seq_len, -1),
                          grad_X_drop.view(batch, seq_len, -1)
                          if grad_X_drop is not None else None]
        for _, d_A, d_B in lora:
            out += [None, None, None, d_A.t() if d_A is not None else None,
                    d_B.t() if d_B is not None else None, None]
        return tuple(out)


class LoRA_O(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X: torch.Tensor, X_drop: torch.Tensor | None, W: torch.Tensor,
                b: Any, W_quant: Any, A: Any, B: Any, s: float) -> torch.Tensor:
        has_dropout = X_drop is not None
        XW = matmul_lora(X, W, b, W_quant, A, B, s, X_drop=X_drop)
        dtype = X.dtype
        ctx.save_for_backward(_cast(A, dtype), _cast(B, dtype), X,
                              X_drop if has_dropout else X)
        ctx.custom_saved_tensors = (W, W_quant, s)
        ctx.has_dropout = has_dropout
        return XW

    @staticmethod
    def backward(ctx: Any, dY: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        W, W_quant, s = ctx.custom_saved_tensors
        A, B, X, X_lora = ctx.saved_tensors
        batch, seq_len, hd = X.shape
        dY = dY.reshape(-1, dY.shape[-1])
        X = X.reshape(-1, X.shape[-1])
        X_lora = X_lora.reshape(-1, X_lora.shape[-1])
        grad_B, d_A, d_B = _lora_grads(dY, X_lora.t(), A, B, s)
        W_deq = dequantize(W.t(), W_quant)
        dX = dY @ W_deq.t()
        del W_deq
        dX_drop = None
        if grad_B is not None:
            if ctx.has_dropout:
                dX_drop = (grad_B @ A * s).view(batch, seq_len, hd)
            else:
                dX.addmm_(grad_B, A, alpha=s)
        return (dX.view(batch, seq_len, hd), dX_drop, None, None, None,
                d_A.t() if d_A is not None else None, d_B.t() if d_B is not None else None,
                None)


# --------------------------------------------------------------------------------------
# What the patched modules call (axolotl/kernels/lora.py apply_*)
# --------------------------------------------------------------------------------------


def lora_parameters(proj: nn.Module) -> tuple[Any, ...]:
    """``get_lora_parameters`` (LoRA bias and DoRA aside: not planned):
    (W, b, quant_state, A, B, s, dropout); A, B, s None with the adapter disabled or
    merged (a reference pass of a preference trainer)."""
    base = proj.base_layer if hasattr(proj, "base_layer") else proj
    W = base.weight
    b = base.bias
    quant = getattr(W, "quant_state", None)
    if quant is None and W.dtype == torch.float8_e4m3fn:
        quant = getattr(base, "weight_scale_inv", None)
    if not hasattr(proj, "disable_adapters") or proj.disable_adapters or proj.merged:
        return W, b, quant, None, None, None, None
    adapter = (proj.active_adapters[0] if hasattr(proj, "active_adapters")
               else proj.active_adapter)
    # nn.ModuleDict has no get().
    dropout = proj.lora_dropout[adapter] if adapter in proj.lora_dropout else None  # noqa: SIM401
    return (W, b, quant, proj.lora_A[adapter].weight, proj.lora_B[adapter].weight,
            proj.scaling[adapter], dropout)


def _apply_dropout(dropout: nn.Module | None, X: torch.Tensor,
                   training: bool) -> torch.Tensor | None:
    if dropout is None or isinstance(dropout, nn.Identity) or not training:
        return None
    return dropout(X)


def _apply_lora_mlp(self: nn.Module, X: torch.Tensor, act: str) -> torch.Tensor:
    gate = lora_parameters(self.gate_proj)
    up = lora_parameters(self.up_proj)
    down = lora_parameters(self.down_proj)
    X_drop = _apply_dropout(gate[6], X, self.training)
    return LoRA_MLP.apply(X, X_drop, *gate[:6], *up[:6], *down[:6], act)


def apply_lora_mlp_swiglu(self: nn.Module, X: torch.Tensor) -> torch.Tensor:
    return _apply_lora_mlp(self, X, "silu")


def apply_lora_mlp_geglu(self: nn.Module, X: torch.Tensor) -> torch.Tensor:
    return _apply_lora_mlp(self, X, "gelu")


def apply_lora_qkv(self: nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k, v = (lora_parameters(p) for p in (self.q_proj, self.k_proj, self.v_proj))
    X_drop = _apply_dropout(q[6], X, self.training)
    return LoRA_QKV.apply(X, X_drop, *q[:6], *k[:6], *v[:6])


def apply_lora_o(self: nn.Module, X: torch.Tensor) -> torch.Tensor:
    o = lora_parameters(self.o_proj)
    X_drop = _apply_dropout(o[6], X, self.training)
    return LoRA_O.apply(X, X_drop, *o[:6])


def original_apply_qkv(self: nn.Module, hidden_states: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)


def original_apply_o(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return self.o_proj(hidden_states)


# --------------------------------------------------------------------------------------
# The patches (axolotl/monkeypatch/lora_kernels.py)
# --------------------------------------------------------------------------------------

# patch_self_attn_lora's source rewrite: (original, patched) QKV blocks, then the O line.
QKV_PATCHES = [
    (
        "    query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n"
        "    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n"
        "    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "    query_states, key_states, value_states = self.apply_qkv(hidden_states)\n"
        "    query_states = query_states.view(hidden_shape).transpose(1, 2)\n"
        "    key_states = key_states.view(hidden_shape).transpose(1, 2)\n"
        "    value_states = value_states.view(hidden_shape).transpose(1, 2)\n",
    ),
    (
        "    query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape))"
        ".transpose(1, 2)\n"
        "    key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape))"
        ".transpose(1, 2)\n"
        "    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "    query_states, key_states, value_states = self.apply_qkv(hidden_states)\n"
        "    query_states = self.q_norm(query_states.view(hidden_shape)).transpose(1, 2)\n"
        "    key_states = self.k_norm(key_states.view(hidden_shape)).transpose(1, 2)\n"
        "    value_states = value_states.view(hidden_shape).transpose(1, 2)\n",
    ),
    (
        "    query_states, gate = torch.chunk(\n"
        "        self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2), 2, "
        "dim=-1\n"
        "    )\n"
        "    gate = gate.reshape(*input_shape, -1)\n"
        "    query_states = self.q_norm(query_states.view(hidden_shape)).transpose(1, 2)\n"
        "    key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape))"
        ".transpose(1, 2)\n"
        "    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "    query_states, key_states, value_states = self.apply_qkv(hidden_states)\n"
        "    query_states, gate = torch.chunk(\n"
        "        query_states.view(*input_shape, -1, self.head_dim * 2), 2, dim=-1\n"
        "    )\n"
        "    gate = gate.reshape(*input_shape, -1)\n"
        "    query_states = self.q_norm(query_states.view(hidden_shape)).transpose(1, 2)\n"
        "    key_states = self.k_norm(key_states.view(hidden_shape)).transpose(1, 2)\n"
        "    value_states = value_states.view(hidden_shape).transpose(1, 2)\n",
    ),
]
ORIGINAL_O_CODE = "    attn_output = self.o_proj(attn_output)\n"
PATCHED_O_CODE = "    attn_output = self.apply_o(attn_output)\n"


class LoraKernelError(UsageError):
    """A LoRA kernel Axolotl 0.19 itself refuses for this model or base."""


@functools.cache
def patched_attention_forward(cls: type) -> Callable[..., Any]:
    """``patch_self_attn_lora``'s rewrite of ``cls.forward``: the same source edits, the
    function built in the class's module namespace (so the trace's patches of that
    module's helpers reach it) and bound per instance instead of set on the class."""
    source = inspect.getsource(cls.forward)
    spaces = re.match(r"[\s\t]+", source)
    if spaces is not None:
        source = re.sub("^" + spaces.group(0), "", source, flags=re.MULTILINE)
    if not any(orig in source for orig, _ in QKV_PATCHES) or ORIGINAL_O_CODE not in source:
        raise LoraKernelError(
            f"Axolotl's lora_qkv_kernel / lora_o_kernel cannot patch {cls.__name__} (its "
            "forward lacks the q/k/v and o_proj code Axolotl 0.19 rewrites: it fails with "
            "'Original QKV code not found'); plan without --lora-qkv-kernel/--lora-o-kernel"
        )
    for orig, patched in QKV_PATCHES:
        if orig in source:
            source = source.replace(orig, patched)
            break
    source = source.replace(ORIGINAL_O_CODE, PATCHED_O_CODE)
    module = importlib.import_module(cls.__module__)
    scope: dict[str, Any] = {}
    exec(compile(source, f"<axolotl lora kernels: {cls.__qualname__}>", "exec"),
         module.__dict__, scope)
    return scope["forward"]  # type: ignore[no-any-return]


# get_attention_cls_from_config's special cases: model type -> (module, class).
ATTENTION_CLASSES: dict[str, tuple[str, str]] = {
    "qwen2": ("qwen2", "Qwen2Attention"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLTextAttention"),
    "mllama": ("mllama", "MllamaTextSelfAttention"),
    "llama4": ("llama4", "Llama4TextAttention"),
    "mistral3": ("mistral", "MistralAttention"),
    "gemma3_text": ("gemma3", "Gemma3Attention"),
}
# Axolotl's own fused Gemma 4 attention calls apply_qkv / apply_o (not planned here).
FUSED_ATTENTION_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")


def axolotl_attention_class(config: Any) -> type:
    """``get_attention_cls_from_config``: the class Axolotl rewrites, found by the model
    type alone (``transformers.models.<type>.modeling_<type>.<Prefix>Attention``, the
    prefix from the type's causal-LM class); one it cannot import fails the run."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = str(getattr(config, "model_type", ""))
    if model_type in FUSED_ATTENTION_TYPES:
        raise LoraKernelError(
            f"lora_qkv_kernel / lora_o_kernel on {model_type} run through Axolotl's fused "
            "Gemma 4 attention, which qplan does not plan; plan without "
            "--lora-qkv-kernel/--lora-o-kernel"
        )
    if model_type in ATTENTION_CLASSES:
        module_name, cls_name = ATTENTION_CLASSES[model_type]
    else:
        causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if causal is not None:
            prefix = causal
            for suffix in ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel",
                           "GenerationDecoder"):
                prefix = prefix.replace(suffix, "")
        else:
            prefix = "".join(part.capitalize() for part in model_type.split("_"))
        module_name, cls_name = model_type, f"{prefix}Attention"
    try:
        module = importlib.import_module(f"transformers.models.{module_name}."
                                         f"modeling_{module_name}")
        return getattr(module, cls_name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        raise LoraKernelError(
            f"Axolotl's lora_qkv_kernel / lora_o_kernel find no {cls_name} for model type "
            f"{model_type!r} (Axolotl 0.19: 'could not import attention class'); plan "
            "without --lora-qkv-kernel/--lora-o-kernel"
        ) from None


def _layers(model: nn.Module) -> Any:
    """``get_layers``: the decoder layers of the peft model's base model (a language model
    without ``layers`` of its own, Llama 4's, fails there as it does in Axolotl)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    found = None
    if inner is not None and hasattr(inner, "language_model"):
        found = getattr(inner.language_model, "layers", None)
    elif hasattr(base, "language_model"):
        found = getattr(base.language_model, "layers", None)
    elif inner is not None:
        found = getattr(inner, "layers", None)
    if found is not None:
        return found
    raise LoraKernelError(
        f"Axolotl's LoRA kernels find no decoder layers in {type(base).__name__} (its "
        "get_layers raises NotImplementedError); plan without the --lora-*-kernel options"
    )


def _activation(model: nn.Module) -> str | None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    act = None
    for name in ("hidden_act", "hidden_activation", "mlp_hidden_act"):
        if hasattr(text, name):
            act = getattr(text, name)
            break
    if act and "gelu" in act:
        act = "gelu"
    return act


def _self_attns(layer: nn.Module) -> Iterator[nn.Module]:
    attn = getattr(layer, "self_attn", None)
    if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj",
                                                            "o_proj")):
        yield attn


def _mlps(layer: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """``find_mlp_in_layer``: (the MLP, the module whose forward is replaced): the dense
    MLP, and Llama 4's shared expert (Axolotl replaces ``layer.mlp.forward`` for both)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        yield mlp, mlp
    feed = getattr(layer, "feedforward", None)
    if feed is not None and hasattr(feed, "shared_expert"):
        yield feed.shared_expert, mlp


@dataclass(frozen=True)
class Patched:
    """How many layers each kernel took, and what Axolotl left on peft's forward."""

    mlp: int = 0
    qkv: int = 0
    o: int = 0
    skipped: tuple[str, ...] = ()


def apply_lora_kernels(model: nn.Module, mlp: bool, qkv: bool, o: bool) -> Patched:
    """``patch_self_attn_lora`` + ``apply_lora_kernel_patches`` on the peft ``model``."""
    counts = {"mlp": 0, "qkv": 0, "o": 0}
    skipped: list[str] = []
    activation = _activation(model)
    rewritten: type | None = None
    forward: Callable[..., Any] | None = None
    if qkv or o:
        rewritten = axolotl_attention_class(model.config)
        forward = patched_attention_forward(rewritten)
    for layer in _layers(model):
        for attn in _self_attns(layer):
            attn.apply_qkv = types.MethodType(original_apply_qkv, attn)
            attn.apply_o = types.MethodType(original_apply_o, attn)
            # Axolotl sets the rewritten forward on the class: its instances (and
            # subclasses keeping its forward) call apply_qkv / apply_o, no other.
            if rewritten is None or type(attn).forward is not rewritten.forward:
                continue
            attn.forward = types.MethodType(forward, attn)
            if qkv:
                if all(hasattr(getattr(attn, p), "lora_A") for p in ("q_proj", "k_proj",
                                                                      "v_proj")):
                    attn.apply_qkv = types.MethodType(apply_lora_qkv, attn)
                    counts["qkv"] += 1
                elif "qkv" not in skipped:
                    skipped.append("qkv")
            if o:
                if hasattr(attn.o_proj, "lora_A"):
                    attn.apply_o = types.MethodType(apply_lora_o, attn)
                    counts["o"] += 1
                elif "o" not in skipped:
                    skipped.append("o")
        if not mlp:
            continue
        for block, owner in _mlps(layer):
            if activation not in SUPPORTED_ACTIVATIONS:
                raise LoraKernelError(
                    f"Axolotl's lora_mlp_kernel runs SiLU or GELU MLPs, not {activation!r} "
                    "(Axolotl 0.19 raises NotImplementedError); plan without --lora-mlp-kernel"
                )
            if all(hasattr(getattr(block, p), "lora_A") for p in ("gate_proj", "up_proj",
                                                                  "down_proj")):
                fn = apply_lora_mlp_swiglu if activation == "silu" else apply_lora_mlp_geglu
                # Axolotl binds the found MLP to layer.mlp's forward (the shared expert's
                # forward then replaces the dense MLP's): the same here.
                owner.forward = types.MethodType(fn, block)
                counts["mlp"] += 1
            elif "mlp" not in skipped:
                skipped.append("mlp")
    return Patched(counts["mlp"], counts["qkv"], counts["o"], tuple(skipped))


def kernel_base_refusal(precision: str, kbit_upcast: bool) -> str | None:
    """Why Axolotl's LoRA kernels cannot run on a ``precision`` base, or None when they can:
    an unquantised base or a bitsandbytes 4-bit one (its quant state dequantised). Axolotl
    refuses them on an 8-bit LoRA base (``check_lora_kernels_8bit``); other packed formats
    hold no ``weight`` the kernels read. On a 4-bit base peft's float32 upcast of norms
    and embeddings feeds the kernels float32 inputs that ``torch.matmul`` refuses against
    the dequantised 16-bit weight (a real step fails: "expected m1 and m2 to have the same
    dtype"); Axolotl casts them back (``--no-kbit-upcast``) before the kernels run."""
    from qplan.planner.precision import PRECISIONS

    prec = PRECISIONS[precision]
    if not prec.quantized:
        return None
    if prec.quant_type == "int8":
        return ("Axolotl 0.19 refuses lora_*_kernel on an 8-bit LoRA base "
                "(check_lora_kernels_8bit)")
    if prec.quant_type not in ("nf4", "fp4"):
        return f"Axolotl's LoRA kernels are planned on 16-bit and 4-bit bases, not {precision}"
    if kbit_upcast:
        return ("peft's float32 norms feed the kernels float32 inputs that their matmul with "
                "the dequantised weight refuses; add --no-kbit-upcast (Axolotl casts them back)")
    return None


def _targeted(targets: str | list[str], names: tuple[str, ...]) -> bool | None:
    """Whether LoRA targets adapt every one of ``names`` (None: a regex, decided by peft)."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return None
    return all(n in targets for n in names)


def lora_kernel_note(model: nn.Module, workload: Any) -> str:
    """What the kernels take on ``model`` (the meta model before peft), the checks Axolotl
    makes on the model itself done now, in its order (the attention class rewritten before
    the model loads, then the layers its get_layers finds, the MLP's activation): one line
    where Axolotl fails."""
    parts: list[str] = []
    targets = workload.target_modules
    attns: list[nn.Module] = []
    if workload.lora_qkv_kernel or workload.lora_o_kernel:
        rewritten = axolotl_attention_class(model.config)
        patched_attention_forward(rewritten)
    layers = _layers(model)
    if workload.lora_qkv_kernel or workload.lora_o_kernel:
        attns = [a for layer in layers for a in _self_attns(layer)
                 if type(a).forward is rewritten.forward]
    if workload.lora_mlp_kernel:
        mlps = [m for layer in layers for m, _ in _mlps(layer)]
        act = _activation(model)
        if mlps and act not in SUPPORTED_ACTIVATIONS:
            raise LoraKernelError(
                f"Axolotl's lora_mlp_kernel runs SiLU or GELU MLPs, not {act!r} (Axolotl "
                "0.19 raises NotImplementedError); plan without --lora-mlp-kernel"
            )
        kind = "SwiGLU" if act == "silu" else "GeGLU"
        parts.append(f"LoRA_MLP ({kind}) on {len(mlps)} MLPs")
    if workload.lora_qkv_kernel:
        parts.append(f"LoRA_QKV on {len(attns)} attention layers")
    if workload.lora_o_kernel:
        parts.append(f"LoRA_O on {len(attns)} attention layers")
    groups = {"mlp": ("gate_proj", "up_proj", "down_proj"),
              "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",)}
    missing = [g for g, names in groups.items()
               if getattr(workload, f"lora_{g}_kernel") and _targeted(targets, names) is False]
    tail = ("; a group whose projections are not all adapted keeps peft's forward, as "
            "Axolotl skips it" + (f" ({', '.join(missing)} here)" if missing else ""))
    return ("Axolotl's LoRA kernels (axolotl/kernels/lora.py 0.19.0): "
            + ", ".join(parts) + tail)
