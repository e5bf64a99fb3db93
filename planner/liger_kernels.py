"""Liger's RMSNorm, SwiGLU, RoPE and LayerNorm kernels (Axolotl's ``liger_rms_norm``,
``liger_glu_activation``, ``liger_rope``, ``liger_layer_norm``).

Axolotl's Liger plugin calls liger-kernel's ``apply_liger_kernel_to_<model>`` (``model=None``,
before the model is built), which swaps the model's RMSNorm class for ``LigerRMSNorm``, its
MLP for ``LigerSwiGLUMLP``, its ``apply_rotary_pos_emb`` and (some families) LayerNorm. Their
kernels are Triton (GPU only, and the ``triton`` package qplan does not install), so what
runs here is the PyTorch code around them from liger-kernel 0.8.5, allocation for
allocation (liger_kernel/ops/rms_norm.py, swiglu.py, rope.py, layer_norm.py), with the
kernels' arithmetic done in PyTorch outside the live-tensor tracker (a kernel writes into
buffers allocated before it):

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

* RoPE (``LigerRopeFunction``, liger_kernel/ops/rope.py): Liger swaps the modeling module's
  ``apply_rotary_pos_emb`` for ``liger_rotary_pos_emb`` (``modeling_llama.apply_rotary_pos_emb
  = liger_rotary_pos_emb``, one module per family: ``ROPE_MODULES``). The query and key are
  transposed to [batch, seq, heads, head_dim] and made contiguous (no copy for the usual
  ``proj(x).view(...).transpose(1, 2)``: the rotation is then written into the projection's
  own output), cos and sin made contiguous; saved: cos and sin only; the outputs are views of
  the (rotated) inputs. Backward: the incoming gradients transposed the same way, made
  contiguous (a copy where they are not) and rotated in place.
* LayerNorm (``LigerLayerNormFunction``, liger_kernel/ops/layer_norm.py): input, weight and
  bias made contiguous; ``Y`` in the input's dtype, float32 ``Mean`` and ``RSTD`` per row;
  saved: the input, weight, bias, ``Mean`` and ``RSTD``. Backward: float32 ``_DW`` and
  ``_DB`` of [SMs, hidden] (where the weight / bias need a gradient), a new ``DX`` in the
  input's dtype, ``DW`` / ``DB`` = their row sums cast to the parameter's dtype. Liger swaps
  LayerNorm only for the families in ``LAYER_NORM_TYPES``, and only as Axolotl calls it
  (``model=None``): ``modeling_siglip.nn.LayerNorm = LigerLayerNorm`` and the like rebind
  ``torch.nn.LayerNorm`` itself, so every ``nn.LayerNorm`` the model builds is Liger's (in
  practice the vision towers: no supported text decoder has a LayerNorm).

A GeGLU MLP (Gemma) and other norms are not swapped (the plan says so).
"""

from __future__ import annotations

import inspect
import sys
import types
from types import ModuleType
from typing import Any

import torch
from torch import nn

from qplan.errors import UsageError
from qplan.planner.kernel_math import KernelMath, is_meta
from qplan.planner.patching import swapped

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


class LigerRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                casting: str, in_place: bool, sms: int) -> torch.Tensor:
        x = x.contiguous()  # ensure_contiguous
        shape = x.shape
        x2 = x.view(-1, shape[-1])
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        if not is_meta(x):
            with KernelMath():
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
        if not is_meta(dy):
            with KernelMath():
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
        if not is_meta(a):
            with KernelMath():
                c.copy_(nn.functional.silu(a2.float()).to(a2.dtype) * b2)
        ctx.save_for_backward(a2, b2)
        return c.view(shape)

    @staticmethod
    def backward(ctx: Any, dc: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        a2, b2 = ctx.saved_tensors
        dc = dc.contiguous()
        shape = dc.shape
        if not is_meta(dc):
            with KernelMath():
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
                        sms: int = DEFAULT_SMS, *, rope: bool = False,
                        layer_norm: bool = False) -> dict[str, int]:
    """Swap the forward of every supported RMSNorm / SwiGLU MLP of ``model`` for Liger's
    (what ``apply_liger_kernel_to_*``'s class swap does to the built model), and with
    ``rope`` / ``layer_norm`` its RoPE helper and LayerNorms where Liger's apply function
    for the model's family swaps them; ``sms``: the SM count the trace plans for (a CUDA run
    asks its device). Returns how many of each (rope / layer_norm only when asked)."""
    counts = {"rms_norm": 0, "swiglu": 0}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if rope:
        check_liger(model_type, rope, False)
        counts["rope"] = 0
    if layer_norm:
        counts["layer_norm"] = 0
    rope_modules = ROPE_MODULES.get(model_type, ()) if rope else ()
    swap_layer_norms = layer_norm and model_type in LAYER_NORM_TYPES
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
        elif swap_layer_norms and type(module) is nn.LayerNorm:
            if module.weight is None or module.bias is None:
                raise UsageError(f"--liger-layer-norm: {model_type} has a LayerNorm without "
                                 f"weight or bias, which Liger's LigerLayerNorm does not "
                                 f"build the same (not modelled); drop --liger-layer-norm")
            module._liger_sms = sms
            module.forward = types.MethodType(_layer_norm_forward, module)
            counts["layer_norm"] += 1
        if rope_modules:
            holder = _calls_rope_helper(module)
            if holder is not None and holder.__name__ in rope_modules:
                module._liger_rope_module = holder
                module._liger_rope_forward = module.forward
                module.forward = types.MethodType(_rope_patched_forward, module)
                counts["rope"] += 1
    return counts


# --- RoPE -----------------------------------------------------------------------------

# model_type -> the transformers modeling modules whose ``apply_rotary_pos_emb`` Liger
# replaces with ``liger_rotary_pos_emb`` (monkey_patch.py's apply_liger_kernel_to_<family>,
# called by Axolotl's plugin with ``rope=cfg.liger_rope``; mistral3 / ministral3 by the
# plugin's own branch). PaliGemma's language model is Gemma or Gemma 2: both are patched.
_MODELS = "transformers.models"
ROPE_MODULES: dict[str, tuple[str, ...]] = {
    model_type: tuple(f"{_MODELS}.{m}.modeling_{m}" for m in modules)
    for model_type, modules in {
        "llama": ("llama",), "mistral": ("mistral",), "mixtral": ("mixtral",),
        "ministral": ("ministral",), "mistral3": ("ministral3",),
        "ministral3": ("ministral3",), "qwen2": ("qwen2",), "qwen3": ("qwen3",),
        "qwen3_moe": ("qwen3_moe",), "qwen3_next": ("qwen3_next",), "phi3": ("phi3",),
        "gemma": ("gemma",), "gemma2": ("gemma2",), "gemma3_text": ("gemma3",),
        "gemma3": ("gemma3",), "paligemma": ("gemma", "gemma2"), "granite": ("granite",),
        "smollm3": ("smollm3",), "olmo2": ("olmo2",), "olmo3": ("olmo3",),
        "exaone4": ("exaone4",), "hunyuan_v1_dense": ("hunyuan_v1_dense",),
        "hunyuan_v1_moe": ("hunyuan_v1_moe",), "falcon_h1": ("falcon_h1",),
        "mllama": ("mllama",), "mllama_text_model": ("mllama",), "pixtral": ("pixtral",),
        "muse_glimmer": ("muse_glimmer",), "jamba": ("jamba",),
    }.items()
}
# Families where liger_rope is another kernel or fails: refused rather than planned wrong.
_NOT_AVAILABLE = "liger-kernel raises NotImplementedError (liger_rotary_pos_emb is not " \
                 "available for this family): the run fails"
ROPE_REFUSED: dict[str, str] = {
    "llama4": "Liger's Llama 4 RoPE (llama4_rope.py, complex rotary table) is another "
              "kernel, not modelled",
    "llama4_text": "Liger's Llama 4 RoPE (llama4_rope.py, complex rotary table) is another "
                   "kernel, not modelled",
    **{t: "Liger's multimodal RoPE kernel (qwen2vl_mrope.py) is not modelled"
       for t in ("qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text")},
    **{t: "Liger's vision RoPE (liger_rotary_pos_emb_vision) is not modelled"
       for t in ("qwen3_vl", "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text")},
    "gpt_oss": "Liger's half-width GPT-OSS RoPE (liger_rotary_pos_emb_gpt_oss) is not "
               "modelled",
    # Axolotl runs its own Qwen3.5 patch (no RoPE) for qwen3_5 / qwen3_5_moe, but liger's,
    # which raises, for their _text model types.
    **{t: _NOT_AVAILABLE for t in ("glm4", "glm4v", "glm4v_moe", "qwen3_5_text",
                                    "qwen3_5_moe_text")},
}
# Axolotl's plugin passes rope=True for these when liger_rope is unset (its Qwen-VL default).
AXOLOTL_ROPE_DEFAULT = frozenset({
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_vl_text", "qwen2_5_vl_text",
    "qwen3_vl_text", "qwen3_vl_moe_text",
})
ROPE_HELPER = "apply_rotary_pos_emb"


def _rope_cos_sin(cos: torch.Tensor, sin: torch.Tensor,
                  unsqueeze_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_forward's reshaping of cos / sin to (1 or batch, seq, width)."""
    if cos.ndim == 4:
        if cos.shape[unsqueeze_dim] == 1:
            cos, sin = cos.squeeze(unsqueeze_dim), sin.squeeze(unsqueeze_dim)
        elif cos.shape[1] == 1:
            cos, sin = cos.squeeze(1), sin.squeeze(1)
        else:
            cos, sin = cos.squeeze(), sin.squeeze()
    if cos.ndim == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return cos, sin


def _rope_run(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              unsqueeze_dim: int, rotary_dim: int | None,
              backward: bool) -> tuple[torch.Tensor, ...]:
    """rope_forward / rope_backward: the tensors rotated in place by _triton_rope."""
    cos, sin = _rope_cos_sin(cos, sin, unsqueeze_dim)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    head_dim = q.shape[-1]
    rd = min(cos.shape[-1], head_dim) if rotary_dim is None else rotary_dim
    q, k = q.contiguous(), k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if not is_meta(q):
        with KernelMath():
            half = rd // 2
            # One row per (batch, position): cos / sin of [1 or batch, seq, width].
            c = cos[..., :half].float().unsqueeze(2)
            s = sin[..., :half].float().unsqueeze(2)
            sign = -1.0 if backward else 1.0
            for t in (q, k):
                x1, x2 = t[..., :half].float(), t[..., half:rd].float()
                new1 = x1 * c - sign * x2 * s
                new2 = x2 * c + sign * x1 * s
                t[..., :half].copy_(new1)
                t[..., half:rd].copy_(new2)
    return q.transpose(1, 2), k.transpose(1, 2), cos, sin


class LigerRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, position_ids: Any = None, unsqueeze_dim: int = 1,
                rotary_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, cos, sin = _rope_run(q, k, cos, sin, unsqueeze_dim, rotary_dim, False)
        ctx.save_for_backward(cos, sin)
        ctx.rotary_dim = rotary_dim
        return q, k

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor,  # type: ignore[override]
                 dk: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        dq, dk, _, _ = _rope_run(dq, dk, cos, sin, 1, ctx.rotary_dim, True)
        return dq, dk, None, None, None, None, None


def liger_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, position_ids: Any = None,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """liger_kernel/transformers/rope.py's function (its Triton implementation)."""
    return LigerRopeFunction.apply(q, k, cos, sin, position_ids, unsqueeze_dim, None)


def _rope_patched_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # Liger rebinds the modeling module's helper for the whole process; here it is rebound
    # while this attention runs (the gradient-checkpointing recompute included).
    with swapped((self._liger_rope_module, ROPE_HELPER, liger_rotary_pos_emb)):
        return self._liger_rope_forward(*args, **kwargs)


def _calls_rope_helper(module: nn.Module) -> ModuleType | None:
    """The modeling module whose ``apply_rotary_pos_emb`` this module's forward calls."""
    forward = getattr(type(module), "forward", None)
    # transformers wraps attention forwards in decorators: the helper is named in the body.
    code = getattr(inspect.unwrap(forward), "__code__", None) if forward else None
    if code is None or ROPE_HELPER not in code.co_names:
        return None
    return sys.modules.get(type(module).__module__)


# --- LayerNorm ------------------------------------------------------------------------

# Families whose apply function (as Axolotl calls it, model=None) rebinds LayerNorm:
# ``modeling_<m>.nn.LayerNorm = LigerLayerNorm`` (torch.nn's own attribute: every
# nn.LayerNorm built afterwards) for Gemma 3 and PaliGemma (SigLIP), Mllama, InternVL,
# SmolVLM; Axolotl's own branches for Jamba, Gemma4Unified, CohereCompass;
# ``modeling_qwen2_vl.LayerNorm`` (its vision blocks' and merger's, all of Qwen2-VL's).
# Elsewhere liger_layer_norm changes nothing: Llama 4's and MuseGlimmer's functions patch
# only a passed model (Axolotl's MuseGlimmer branch is never reached: liger's table has the
# family, and the plugin calls liger's function first).
LAYER_NORM_TYPES = frozenset({
    "gemma3", "paligemma", "mllama", "mllama_text_model", "internvl", "smolvlm", "jamba",
    "gemma4_unified", "gemma4_unified_text", "cohere_compass", "qwen2_vl", "qwen2_vl_text",
})


class LigerLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float, sms: int) -> torch.Tensor:
        # ensure_contiguous
        x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
        shape = x.shape
        x2 = x.view(-1, shape[-1])
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        if not is_meta(x):
            with KernelMath():
                xf = x2.float()
                m = xf.mean(-1)
                centred = xf - m[:, None]
                r = torch.rsqrt((centred * centred).mean(-1) + eps)
                mean.copy_(m)
                rstd.copy_(r)
                y.copy_(centred * r[:, None] * weight.float() + bias.float())
        ctx.sms = sms
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        dy = dy.contiguous()  # ensure_contiguous
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        shape = dy.shape
        dy2 = dy.view(-1, shape[-1])
        rows, cols = dy2.shape
        needs_dw, needs_db = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        partial_w = (torch.empty((ctx.sms, cols), dtype=torch.float32, device=weight.device)
                     if needs_dw else None)
        partial_b = (torch.empty((ctx.sms, cols), dtype=torch.float32, device=weight.device)
                     if needs_db else None)
        dx = torch.empty((rows, cols), dtype=x2.dtype, device=x2.device)
        if not is_meta(dy):
            with KernelMath():
                xhat = (x2.float() - mean[:, None]) * rstd[:, None]
                g = dy2.float()
                wdy = weight.float() * g
                c1 = (xhat * wdy).mean(-1, keepdim=True)
                c2 = wdy.mean(-1, keepdim=True)
                dx.copy_((wdy - (xhat * c1 + c2)) * rstd[:, None])
                if partial_w is not None:
                    partial_w.zero_()
                    partial_w[0].copy_((g * xhat).sum(0))
                if partial_b is not None:
                    partial_b.zero_()
                    partial_b[0].copy_(g.sum(0))
        dw = partial_w.sum(0).to(weight.dtype) if partial_w is not None else None
        db = partial_b.sum(0).to(bias.dtype) if partial_b is not None else None
        del partial_w, partial_b
        return dx.view(shape), dw, db, None, None


def _layer_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    sms = (torch.cuda.get_device_properties(hidden_states.device).multi_processor_count
           if hidden_states.device.type == "cuda" else self._liger_sms)
    return LigerLayerNormFunction.apply(hidden_states, self.weight, self.bias, self.eps, sms)


def check_liger(model_type: str | None, rope: bool, layer_norm: bool) -> list[str]:
    """Notes on what Liger's RoPE / LayerNorm swap in this family; a UsageError where the
    run would use a kernel not modelled here or fail."""
    notes: list[str] = []
    if rope:
        if model_type in ROPE_REFUSED:
            raise UsageError(f"--liger-rope on {model_type}: {ROPE_REFUSED[model_type]}; "
                             f"drop --liger-rope (Axolotl's liger_rope)")
        if model_type not in ROPE_MODULES:
            notes.append(f"liger_rope: liger-kernel 0.8.5 swaps no RoPE for {model_type} "
                         f"(planned with transformers' own)")
    if layer_norm and model_type not in LAYER_NORM_TYPES:
        notes.append(f"liger_layer_norm: liger-kernel 0.8.5, as Axolotl applies it, swaps no "
                     f"LayerNorm for {model_type} (planned with the model's own)")
    return notes
