"""Fused linear cross-entropy: the loss straight from the last hidden states, no logits.

Axolotl turns it on with Cut Cross Entropy (``plugins: [axolotl.integrations.
cut_cross_entropy.CutCrossEntropyPlugin]``, Apple's ``cut-cross-entropy``) or with Liger
(``liger_fused_linear_cross_entropy: true``, ``liger-kernel``). Both run Triton kernels
that need a GPU (and the ``triton`` package, about 1 GB, which this project does not
install), so their PyTorch code cannot run here. What they allocate is decided by that
PyTorch code around the kernels, and it is followed here line for line; the kernels
themselves only write into buffers allocated beforehand:

* Liger (liger_kernel/ops/fused_linear_cross_entropy.py, 0.8.5,
  ``fused_linear_cross_entropy_forward`` / ``LigerForCausalLMLoss``): labels padded by one
  and shifted (two int64 copies); ``grad_input`` like the hidden states, ``grad_weight``
  like the lm_head weight when it trains, a float32 loss per token; the tokens in chunks
  of ``next_pow2(ceil(BT / ceil(V / H)))`` rows whose logits (in the hidden states' dtype)
  live in one reused buffer on CUDA; the kernel turns each chunk's logits into their
  gradient in place, ``grad_input`` and ``grad_weight`` are filled by matmuls with
  ``out=``. The whole backward is done in the forward: the backward returns ``grad_input``.
* CCE (cut_cross_entropy/cce.py, cce_lse_forward.py, cce_backward.py, 25.1.1): the
  valid-token index (``nonzero`` of the shifted labels, int64 then int32, summed to one
  offset per token), a float32 log-sum-exp, negated target logit and lock array per token,
  and a float32 average logit per vocabulary entry (kept for the backward's vocabulary
  ordering, an int64 argsort cast to int32); the backward allocates ``de`` like the hidden
  states, ``dc`` like the lm_head weight (in the hidden states' dtype) when it trains, and
  two int32 lock arrays; logits exist only in the kernels' on-chip blocks.

On real (CPU) tensors the kernels' arithmetic is done in PyTorch a row at a time, so a
CPU step computes the true loss and gradients with row-sized temporaries only; on meta
tensors the kernels allocate nothing and are skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qplan.planner.kernel_math import is_meta

FUSED_CE = ("cce", "liger")
IGNORE_INDEX = -100


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _row_grad(logits_row: torch.Tensor, target: int, scale: float) -> tuple[torch.Tensor, Any]:
    """The loss of one row and its gradient (softmax minus one-hot) times ``scale``."""
    x = logits_row.float()
    lse = torch.logsumexp(x, 0)
    loss = (lse - x[target]) * scale
    grad = torch.exp(x - lse)
    grad[target] -= 1.0
    grad.mul_(scale)
    return grad, loss


class LigerFusedLinearCrossEntropy(torch.autograd.Function):
    """Liger's FLCE (mean reduction, no bias, no softcap) as its PyTorch code allocates."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        bt, h = hidden.shape
        v = weight.shape[0]
        inc_factor = _cdiv(v, h)
        chunk = min(_next_pow2(_cdiv(bt, inc_factor)), bt)
        grad_input = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        loss_1d = torch.zeros(bt, dtype=torch.float32, device=hidden.device)
        target_mask = target != IGNORE_INDEX
        count = 1 if is_meta(target) else max(1, int(target_mask.sum()))
        del target_mask
        # CUDA, grad disabled inside the autograd function: one reused logits buffer.
        storage = torch.empty((chunk, v), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, bt, chunk):
            end = min(start + chunk, bt)
            rows = hidden[start:end]
            logits = storage[: end - start]
            torch.mm(rows, weight.t(), out=logits)
            if not is_meta(logits):  # the Triton kernel: loss and gradient in place
                for i in range(end - start):
                    t = int(target[start + i])
                    if t == IGNORE_INDEX:
                        logits[i].zero_()
                        continue
                    grad, loss = _row_grad(logits[i], t, 1.0 / count)
                    loss_1d[start + i] = loss
                    logits[i].copy_(grad)
                    del grad, loss
            torch.mm(logits, weight, out=grad_input[start:end])
            if grad_weight is not None:
                torch.addmm(grad_weight, logits.t(), rows, out=grad_weight)
            del logits, rows
        del storage
        loss = torch.sum(loss_1d)
        ctx.save_for_backward(grad_input, grad_weight)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        # The step's loss.backward() sends 1.0, for which Liger returns its buffers as
        # they are (no element_mul kernel).
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input, grad_weight, None


def _valid_offsets(targets: torch.Tensor) -> torch.Tensor:
    """CCE's ``_build_flat_valids`` with shift=True: one flat offset per predicted token."""
    shifted = targets[..., 1:]
    mask = shifted != IGNORE_INDEX
    if is_meta(mask):  # nonzero is data dependent: every token of the batch is valid
        valids = torch.empty((mask.numel(), mask.dim()), dtype=torch.int64, device=mask.device)
    else:
        valids = mask.nonzero()
    del mask
    valids = valids.to(torch.int32)
    for i in range(shifted.dim() - 1):
        valids[:, i] *= shifted.stride(i)
    return valids.sum(1)


class CutCrossEntropy(torch.autograd.Function):
    """CCE's LinearCrossEntropyFunction (shift, mean reduction, filter_eps set)."""

    @staticmethod
    def forward(ctx: Any, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                valids: torch.Tensor) -> torch.Tensor:
        n = valids.numel()
        v = c.shape[0]
        lse = e.new_full((n,), float("-inf"), dtype=torch.float32)
        locks = e.new_full((_cdiv(n, 128),), 0, dtype=torch.uint32)
        logit_avg = e.new_full((v,), 0.0, dtype=torch.float32)
        neg_dot = e.new_zeros((n,), dtype=torch.float32)
        flat_targets = targets.flatten()
        if not is_meta(e):  # the forward kernels: log-sum-exp and the target logits
            for i in range(n):
                row = int(valids[i])
                x = (e[row] @ c.t()).float()
                lse[i] = torch.logsumexp(x, 0)
                neg_dot[i] = -x[int(flat_targets[row + 1])]
                logit_avg.add_(x, alpha=1.0 / n)
                del x
        del locks
        nll = neg_dot.add_(lse)
        loss = nll.mean()
        ctx.save_for_backward(e, c, lse, flat_targets, valids, logit_avg)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        e, c, lse, flat_targets, valids, logit_avg = ctx.saved_tensors
        vocab_ordering = torch.argsort(logit_avg).to(torch.int32)
        n = lse.numel()
        de = torch.zeros_like(e)
        dc = torch.zeros_like(c, dtype=e.dtype) if ctx.needs_input_grad[1] else None
        nd_locks = _cdiv(c.shape[1], 64)
        de_locks = e.new_zeros((_cdiv(n, nd_locks), nd_locks), dtype=torch.int32)
        dc_locks = c.new_zeros((_cdiv(c.shape[0], nd_locks), nd_locks), dtype=torch.int32)
        if not is_meta(e):  # the backward kernel, a token at a time
            scale = float(grad_out) / n
            for i in range(n):
                row = int(valids[i])
                grad, _ = _row_grad(e[row] @ c.t(), int(flat_targets[row + 1]), scale)
                grad = grad.to(e.dtype)
                torch.mm(grad[None, :], c, out=de[row:row + 1])
                if dc is not None:
                    torch.addmm(dc, grad[:, None], e[row:row + 1], out=dc)
                del grad
        del vocab_ordering, de_locks, dc_locks
        return de, dc.to(c.dtype) if dc is not None else None, None, None


def fused_ce_loss(model: nn.Module, input_ids: torch.Tensor, kind: str,
                  labels: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None,
                  images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss of ``model`` on ``input_ids`` (``labels``: the inputs unless
    given, as a tensor of their own the way Trainer's collator makes them) through the decoder
    and a fused linear cross-entropy (``kind``: cce or liger): what Axolotl's patched
    causal-LM forward computes, with no logits tensor. ``images``: a vision-language
    model's image inputs (planner/vision.py), which its base model (tower, projector and
    language model) takes, as the patched forward of such a model calls it."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal.model if images else causal.get_decoder()
    weight = causal.get_output_embeddings().weight
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                     **(images or {}))[0]
    labels = input_ids if labels is None else labels
    if kind == "liger":
        padded = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
        shift_labels = padded[..., 1:].contiguous()
        del padded
        return LigerFusedLinearCrossEntropy.apply(
            hidden.view(-1, hidden.shape[-1]), weight, shift_labels.view(-1)
        )
    if kind == "cce":
        valids = _valid_offsets(labels)
        e = hidden.contiguous().flatten(0, -2)
        return CutCrossEntropy.apply(e, weight, labels.contiguous(), valids)
    raise ValueError(f"unknown fused cross-entropy {kind!r}")
