"""Whether a training step left the meta model it ran on as its workload prepared it.

Preparing a model for training (building it, its quantised layout, peft's adapters and
k-bit preparation, checkpointing) costs a tenth to a fifth of the step itself, and
``--solve``'s probes and the advice when nothing fits trace the same preparation at other
batch sizes and sequence lengths. A step on the meta device updates the parameters in
place (the same storages), sets their gradients and clears them again
(``zero_grad(set_to_none=True)``), and removes the hooks it added: the model is then as
prepared, and the next step of the same preparation can run on it.

Anything else a step could leave behind would make the next step run differently from one
on a freshly prepared model: a tensor attribute made or replaced (a quantised layer
caching a converted weight in its state, a new buffer), a parameter frozen or unfrozen, a
gradient kept, a module's training flag, a hook, an attribute or config value. ``state_of``
records all of that, so the model is built again whenever the records before and after a
step differ.
"""

from __future__ import annotations

import functools
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qplan.planner.step_runs import RUNS_KEY

# How far into plain objects held by modules and tensors (bitsandbytes' int8 state, a
# 4-bit weight's quant state and its nested state, the model's config) the record looks.
_OBJECT_DEPTH = 3
_PLAIN = frozenset((int, float, str, bool, type(None), torch.dtype, torch.device))
_SEQUENCES = (list, tuple, set, frozenset)
_TENSOR = "tensor"  # the first item of a tensor's entry in a record
# The exact types of nn.Module's own bookkeeping containers (an empty one is left out).
_CONTAINER_TYPES = frozenset((dict, list, tuple, set, frozenset, OrderedDict))


# Kept in place of a prepared model whose step left it changed: the next steps of that
# preparation are prepared afresh without recording.
CHANGES_THE_MODEL = object()


@functools.cache
def _idempotent_hooks() -> frozenset[types.CodeType]:
    """The code of hooks that make no storage and do the same however many times they
    run: transformers' ``make_inputs_require_grads`` (``enable_input_require_grads``:
    the embeddings' output requires grad, set in place). Re-enabling gradient
    checkpointing registers it again (TRL turns checkpointing off and on around every
    reference forward), and without peft the earlier one stays: such a hook is recorded
    once per hook dictionary, however often and under whichever handle it was added."""
    from transformers import PreTrainedModel

    code = PreTrainedModel.enable_input_require_grads.__code__
    return frozenset(c for c in code.co_consts if isinstance(c, types.CodeType)
                     and c.co_name == "make_inputs_require_grads")


def _idempotent(hook: Any) -> types.CodeType | None:
    if type(hook) is not types.FunctionType or hook.__closure__ \
            or hook.__code__ not in _idempotent_hooks():
        return None
    return hook.__code__


def state_of(model: nn.Module) -> tuple:
    """A record of everything a step could change on ``model`` (equal records: the same
    modules, tensors, flags, hooks and attributes)."""
    return _Recorder().model(model)


def equal_but_recast(before: tuple, after: tuple, recast: set[int]) -> bool:
    """Whether two records of ``state_of`` are equal but for the storage and dtype of the
    tensors whose ids are in ``recast`` (their data replaced by a copy in another dtype)."""
    if before == after:
        return True
    if type(before) is not tuple or type(after) is not tuple or len(before) != len(after):
        return False
    if (before and before[0] == _TENSOR and after[0] == _TENSOR
            and type(before[1]) is int and before[1] in recast):
        # _Recorder.value's tensor entry: (_TENSOR, id, id(storage), shape, dtype,
        # requires_grad, grad is None, attributes).
        return before[1] == after[1] and before[3] == after[3] and before[5:] == after[5:]
    return all(equal_but_recast(b, a, recast) for b, a in zip(before, after, strict=True))


class _Recorder:
    def __init__(self) -> None:
        # Objects recorded already (the config every attention layer holds): recorded
        # once, then named by their first place in the record.
        self._seen: dict[int, int] = {}

    def model(self, model: nn.Module) -> tuple:
        out: list[Any] = []
        add = out.append
        value_of = self.value
        # Every module under every name it has, parents first (named_modules with
        # remove_duplicate=False), walked with a stack: the nested generators of
        # named_modules cost more than the record itself on deep peft trees.
        stack: list[tuple[str, nn.Module]] = [("", model)]
        while stack:
            name, module = stack.pop()
            children = module._modules
            if children:
                prefix = name + "." if name else ""
                stack.extend((prefix + child, sub) for child, sub in reversed(children.items())
                             if sub is not None)
            add(name)
            add(id(module))
            for key, value in module.__dict__.items():
                cls = type(value)
                if cls in _PLAIN:
                    if key != RUNS_KEY:  # qplan's count of the steps run: each adds one
                        add(key)
                        add((cls, value))
                    continue
                if cls in _CONTAINER_TYPES and not value:
                    # nn.Module's bookkeeping is mostly empty dictionaries and sets (no
                    # hooks): leaving them out keeps the record short; one that fills
                    # adds its key, and one that empties drops it.
                    continue
                add(key)
                if key == "_modules":
                    # The children by identity, each recorded under its own name.
                    add(tuple(map(id, value.values())))
                elif isinstance(value, dict):
                    # _parameters, _buffers and the hook dictionaries (handle -> hook).
                    add(self.entries(value))
                else:
                    add(value_of(value, _OBJECT_DEPTH))
        return tuple(out)

    def entries(self, mapping: dict) -> tuple:
        """A module's dictionary, entry by entry; an idempotent hook (``_idempotent``)
        once, without its handle's number."""
        out: list[Any] = []
        idempotent: set[types.CodeType] = set()
        for key, value in mapping.items():
            code = _idempotent(value)
            if code is None:
                out.append((key, self.value(value, _OBJECT_DEPTH)))
            elif code not in idempotent:
                idempotent.add(code)
                out.append(("idempotent hook", code))
        return tuple(out)

    def value(self, value: Any, depth: int) -> Any:
        cls = type(value)
        if cls in _PLAIN:
            return (cls, value)
        if cls is functools.partial:
            # Enabling gradient checkpointing makes a new partial of the same function
            # and arguments each time: equal partials run the same.
            return (cls, self.value(value.func, depth), self.value(value.args, depth),
                    self.value(value.keywords, depth))
        if cls is RemovableHandle:
            # A handle removes its hook from its dictionary, nothing else: named by
            # both, an idempotent hook by its code (its dictionary records it once).
            hooks = value.hooks_dict_ref()
            hook = hooks.get(value.id) if hooks is not None else None
            code = _idempotent(hook)
            return (cls, id(hooks), value.id if code is None else code)
        if isinstance(value, torch.Tensor):
            extra = getattr(value, "__dict__", None) if depth > 0 else None
            return (_TENSOR, id(value), id(value.untyped_storage()), tuple(value.shape),
                    value.dtype, value.requires_grad, value.grad is None,
                    tuple([(k, self.value(v, depth - 1)) for k, v in extra.items()])
                    if extra else ())
        if isinstance(value, nn.Module):
            return ("module", id(value))
        if isinstance(value, dict):
            return (dict, tuple([(k, self.value(v, depth)) for k, v in value.items()]))
        if isinstance(value, _SEQUENCES):
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
            return (cls, tuple([self.value(v, depth) for v in items]))
        if depth > 0 and not callable(value) and hasattr(value, "__dict__"):
            first = self._seen.get(id(value))
            if first is not None:
                return ("seen", first)
            self._seen[id(value)] = len(self._seen)
            return (cls, tuple([(k, self.value(v, depth - 1)) for k, v in vars(value).items()]))
        # Functions (hooks), types and anything else: by identity.
        return (cls, id(value))
