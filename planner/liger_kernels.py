"""Liger's RMSNorm and SwiGLU kernels (Axolotl's ``liger_rms_norm`` / ``liger_glu_activation``).

Axolotl's Liger plugin calls liger-kernel's ``apply_liger_kernel_to_<model>``, which swaps
the model's RMSNorm class for ``LigerRMSNorm`` and its MLP for ``LigerSwiGLUMLP``. Their
kernels are Triton (GPU only, and the ``triton`` package qplan does not install), so what
runs here is the PyTorch code around them from liger-kernel 0.8.5, allocation for
allocation (liger_kernel/ops/rms_norm.py, swiglu.py), with the kernels' arithmetic done in
PyTorch outside the live-tensor tracker (a kernel writes into buffers allocated before it):

* RMSNorm (``LigerRMSNormFunction``, casting mode "llama" with ``in_place=True``, or
  "gemma" with offset 1.0 and ``in_place=False``): the input made contiguous; the output
  ``Y`` in the input's dtype (not promoted by a float32 weight, unlike transformers'
  Llama norm) and a float32 ``RSTD`` per row; saved: the input, the weight and ``RSTD``.
  Backward: a float32 ``_dW`` of [SMs, hidden] (one row per streaming multiprocessor:
  the GPU's SM count, 1 off CUDA), ``dX`` written into the incoming gradient in place
  (llama) or a new zeroed tensor (gemma), ``dW`` = ``_dW.sum(0)`` in the weight's dtype.
* SwiGLU (``LigerSiLUMulFunction``): the gate and up projections made contiguous, ``c``
  like them; saved: both inputs. Backward: the two input gradients written into the saved
  inputs in place; nothing new.

A GeGLU MLP (Gemma) and other norms are not swapped (the plan says so).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

# RMSNorm classes liger-kernel patches, by casting mode: (casting mode, offset, in_place).
LLAMA_STYLE = ("llama", 0.0, True)
GEMMA_STYLE = ("gemma", 1.0, False)
RMS_NORMS: dict[str, tuple[str, float, bool]] = {
    "LlamaRMSNorm": LLAMA_STYLE,
    "MistralRMSNorm": LLAMA_STYLE,
    "MixtralRMSNorm": LLAMA_STYLE,
    "Qwen2RMSNorm": LLAMA_STYLE,
    "Qwen3RMSNorm": LLAMA_STYLE,
    "Qwen3MoeRMSNorm": LLAMA_STYLE,
    "Phi3RMSNorm": LLAMA_STYLE,
    "GemmaRMSNorm": GEMMA_STYLE,
    "Gemma2RMSNorm": GEMMA_STYLE,
    "Gemma3RMSNorm": GEMMA_STYLE,
}
# SM count where the device says none (CPU, meta): rms_norm_backward's own default.
DEFAULT_SMS = 1


def _is_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


class _KernelMath:
    """Run a kernel's arithmetic outside the tracker: a GPU kernel allocates nothing."""

    def __enter__(self) -> None:
        self._modes = _disable_current_modes()
        self._modes.__enter__()
        self._grad = torch.no_grad()
        self._grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._grad.__exit__(*exc)
        self._modes.__exit__(*exc)


class LigerRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                casting: str, in_place: bool, sms: int) -> torch.Tensor:
        x = x.contiguous()  # ensure_contiguous
        shape = x.shape
        x2 = x.view(-1, shape[-1])
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        if not _is_meta(x):
            with _KernelMath():
                xf = x2.float()
                r = torch.rsqrt(xf.pow(2).mean(-1) + eps)
                rstd.copy_(r)
                if casting == "gemma":
                    y.copy_(xf * r[:, None] * (offset + weight.float()))
                else:
                    y.copy_((x2 * r[:, None].to(x2.dtype)) * (offset + weight).to(x2.dtype))
        ctx.eps, ctx.offset, ctx.casting, ctx.in_place, ctx.sms = (
            eps, offset, casting, in_place, sms)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        shape = dy.shape
        dy2 = dy.view(-1, shape[-1])
        needs_dw = ctx.needs_input_grad[1]
        partial = (torch.empty((ctx.sms, shape[-1]), dtype=torch.float32, device=weight.device)
                   if needs_dw else None)
        dx = dy2 if ctx.in_place else torch.zeros_like(dy2)
        if not _is_meta(dy):
            with _KernelMath():
                xf, g = x2.float(), dy2.float()
                r = rstd[:, None]
                w = (ctx.offset + weight.float())
                normed = xf * r
                gw = g * w
                grad_x = r * (gw - normed * (gw * normed).mean(-1, keepdim=True))
                if partial is not None:
                    partial.zero_()
                    partial[0].copy_((g * normed).sum(0))
                dx.copy_(grad_x)
        dw = partial.sum(0).to(weight.dtype) if partial is not None else None
        del partial
        return dx.view(shape), dw, None, None, None, None, None


class LigerSiLUMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()  # ensure_contiguous
        shape = a.shape
        a2, b2 = a.view(-1, shape[-1]), b.view(-1, shape[-1])
        c = torch.empty_like(a2)
        if not _is_meta(a):
            with _KernelMath():
                c.copy_(nn.functional.silu(a2.float()).to(a2.dtype) * b2)
        ctx.save_for_backward(a2, b2)
        return c.view(shape)

    @staticmethod
    def backward(ctx: Any, dc: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        a2, b2 = ctx.saved_tensors
        dc = dc.contiguous()
        shape = dc.shape
        if not _is_meta(dc):
            with _KernelMath():
                g = dc.view(-1, shape[-1]).float()
                af, bf = a2.float(), b2.float()
                sig = torch.sigmoid(af)
                silu = af * sig
                db = g * silu
                da = g * bf * (sig + silu * (1 - sig))
                a2.copy_(da)  # written into the saved inputs, as the kernel does
                b2.copy_(db)
        return a2.view(shape), b2.view(shape)


def _rms_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    casting, offset, in_place = self._liger_style
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    sms = (torch.cuda.get_device_properties(hidden_states.device).multi_processor_count
           if hidden_states.device.type == "cuda" else self._liger_sms)
    return LigerRMSNormFunction.apply(hidden_states, self.weight, eps, offset, casting,
                                      in_place, sms)


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: Any) -> bool:
    """torch's SiLU or transformers' (ACT2FN["silu"] is its own SiLUActivation)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_swiglu_mlp(module: nn.Module) -> bool:
    """A gate/up/down MLP with SiLU: what LigerSwiGLUMLP replaces (a GeGLU one is not)."""
    return (
        all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and _is_silu(getattr(module, "act_fn", None))
    )


def apply_liger_kernels(model: nn.Module, rms_norm: bool, swiglu: bool,
                        sms: int = DEFAULT_SMS) -> dict[str, int]:
    """Swap the forward of every supported RMSNorm / SwiGLU MLP of ``model`` for Liger's
    (what ``apply_liger_kernel_to_*``'s class swap does to the built model); ``sms``: the
    SM count the trace plans for (a CUDA run asks its device). Returns how many of each."""
    counts = {"rms_norm": 0, "swiglu": 0}
    for module in model.modules():
        name = type(module).__name__
        if rms_norm and name in RMS_NORMS and hasattr(module, "weight"):
            module._liger_style = RMS_NORMS[name]
            module._liger_sms = sms
            module.forward = types.MethodType(_rms_forward, module)
            counts["rms_norm"] += 1
        elif swiglu and _is_swiglu_mlp(module):
            module.forward = types.MethodType(_swiglu_forward, module)
            counts["swiglu"] += 1
    return counts
