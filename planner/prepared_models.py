"""Whether a training step left the meta model it ran on as its workload prepared it.

Preparing a model for training (building it, its quantised layout, peft's adapters and
k-bit preparation, checkpointing) costs about as much as a fifth of the step itself, and
``--solve``'s probes and the advice when nothing fits trace the same preparation at other
batch sizes and sequence lengths. A step on the meta device updates the parameters in
place (the same storages), sets their gradients and clears them again
(``zero_grad(set_to_none=True)``), and removes the hooks it added: the model is then as
prepared, and the next step of the same preparation can run on it.

Anything else a step could leave behind would make the next step run differently from one
on a freshly prepared model: a tensor attribute made or replaced (a quantised layer
caching a converted weight in its state, a new buffer), a parameter frozen or unfrozen, a
gradient kept, a module's training flag, a hook, a config value. ``state_of`` records all
of that, so the model is built again whenever the records before and after a step differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# How far into plain objects held by modules and parameters (bitsandbytes' int8 state, a
# 4-bit weight's quant state and its nested state, the model's config) the record looks.
_OBJECT_DEPTH = 3
_PLAIN = (int, float, str, bool, type(None), torch.dtype, torch.device)


def state_of(model: nn.Module) -> tuple:
    """A record of everything a step could change on ``model`` (equal records: the same
    modules, tensors, flags and hooks)."""
    return tuple(
        (name, type(module), module.training,
         tuple((attr, _record(value, _OBJECT_DEPTH)) for attr, value in vars(module).items()))
        for name, module in model.named_modules(remove_duplicate=False)
    )


def _record(value: Any, depth: int) -> Any:
    if isinstance(value, torch.Tensor):
        extra = vars(value) if depth > 0 and hasattr(value, "__dict__") else {}
        return ("tensor", id(value), id(value.untyped_storage()), tuple(value.shape),
                value.dtype, value.requires_grad, value.grad is None,
                tuple((k, _record(v, depth - 1)) for k, v in extra.items()))
    if isinstance(value, nn.Module):
        return ("module", id(value))
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, dict):
        return (dict, tuple((k, _record(v, depth)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value), tuple(_record(v, depth) for v in items))
    if depth > 0 and not callable(value) and hasattr(value, "__dict__"):
        return (type(value), tuple((k, _record(v, depth - 1)) for k, v in vars(value).items()))
    # Functions (hooks), types and anything else: by identity.
    return (type(value), id(value))
