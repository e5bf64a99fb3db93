"""Phi-3.5-MoE's rotary embedding on the meta device.

transformers' ``PhimoeRotaryEmbedding.forward`` reads ``torch.max(position_ids) + 1`` to
pick LongRoPE's attention scale: ``long_mscale`` past the pretraining length
(``original_max_position_embeddings``), ``short_mscale`` within it. The pick is a Python
float that multiplies cos and sin, so either one makes the same tensors and the step's
memory does not depend on it; but on the meta device the read itself fails (a meta tensor
has no value), and every step of the real Phi-3.5-MoE config (``rope_scaling`` type
longrope) was refused as data-dependent.

During a trace the forward runs transformers' statements on the same tensors (the max and
the +1 still run on meta, and live as long as they do there), the scale picked from the
position ids' last dimension: qplan's steps number positions from 0, so that is the real
run's max + 1 (a packed row's max is smaller, which changes only the float). Taken only
where the installed forward's source is the one read here (its digest): another version
runs as it is, and a read of a value stays a one-line refusal.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from qplan.planner.patching import once_per_object, source_digest, swapped

MODULE = "transformers.models.phimoe.modeling_phimoe"
CLASS = "PhimoeRotaryEmbedding"
# sha256 of ``inspect.getsource`` of the forward this module mirrors (transformers 5.24),
# the function ``dynamic_rope_update`` wraps.
KNOWN_SOURCES = frozenset({
    "bdf9273d05d27d62ec0ef394c440e0117bd978f62cba06feb5b2ed4d6351ec8a",
})

@once_per_object
def _stand_in(forward: Any) -> Callable[..., Any] | None:
    """The decorated forward with the value read taken off meta tensors, where the
    installed code is the one mirrored below; None otherwise."""
    raw = getattr(forward, "__wrapped__", None)
    decorate = getattr(sys.modules.get(getattr(raw, "__module__", "")), "dynamic_rope_update",
                       None)
    stand_in = None
    if source_digest(raw) in KNOWN_SOURCES and callable(decorate):

        def mirrored(self: Any, x: torch.Tensor, position_ids: Any = None) -> Any:
            if not isinstance(position_ids, torch.Tensor) or not position_ids.is_meta:
                return raw(self, x, position_ids)
            mscale = None
            # Made, and kept to the end, as the real forward does; its value is read off
            # the shape below.
            seq_len = torch.max(position_ids) + 1  # noqa: F841
            length = position_ids.shape[-1]
            if self.config.rope_parameters["rope_type"] != "default" and length:
                mscale = (
                    self.config.rope_parameters["long_mscale"]
                    if length > self.config.rope_parameters["original_max_position_embeddings"]
                    else self.config.rope_parameters["short_mscale"]
                )
            inv_freq, attention_scaling = self.rope_init_fn(self.config)
            mscale = attention_scaling if mscale is None else mscale
            freqs = position_ids[..., None].float() * inv_freq.to(device=x.device,
                                                                  dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * mscale
            sin = emb.sin() * mscale
            return cos.to(x.dtype), sin.to(x.dtype)

        stand_in = decorate(mirrored)
    return stand_in


@contextlib.contextmanager
def longrope_scale_on_meta() -> Iterator[None]:
    """During the block, Phi-3.5-MoE's rotary embedding (where its modelling module is
    loaded and its source is the one mirrored) picks its scale without reading a meta
    tensor's value."""
    module = sys.modules.get(MODULE)
    cls = getattr(module, CLASS, None) if module is not None else None
    forward = getattr(cls, "forward", None)
    stand_in = _stand_in(forward) if forward is not None else None
    with swapped(*(((cls, "forward", stand_in),) if stand_in is not None else ())):
        yield
