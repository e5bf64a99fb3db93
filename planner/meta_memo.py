"""Remember what a meta op returns, so a trace runs each distinct op once per process.

On the meta device an op's outputs depend only on its inputs' metadata (dtype, shape,
strides) and its other arguments; most of a trace's time goes to PyTorch's Python
meta kernels (``torch._refs``, decompositions, bitsandbytes' fake kernels) recomputing the
same answers: every decoder layer repeats the previous one's ops, the deeper trace repeats
the shallower one's, and precisions that share activations repeat each other's.

An op is remembered only when the answer can be replayed exactly, every input a meta
tensor or a plain hashable value, and either
- a functional op (its schema neither mutates an argument nor returns an alias), every
  output a fresh meta tensor whose storage ``empty_strided`` recreates byte for byte (offset
  0, the storage just large enough, no two outputs sharing one, none sharing an input's):
  the replayed outputs are new storages, so the tracker counts them exactly as it counts
  the real kernel's; or
- an in-place op writing one argument and returning it (``exponential_``, ``add_``, an
  ``out=`` variant), not one that changes its view (``inplace_view``: ``resize_``,
  ``squeeze_``, ``set_``), whose first run left that argument's shape, strides, offset,
  dtype and storage as they were: on meta such an op makes nothing, so the replay
  returns the argument itself. Its meta kernel is what it costs: Phi-3.5-MoE's router
  samples with ``exponential_``, a 1 ms Python reference kernel on meta, thousands of
  times per plan. Autograd's version counter is bumped above the dispatch mode that asks
  the memo, so it moves as before.
Anything else runs as before.

``QPLAN_REUSE=0`` (or ``reuse.disabled()``) turns the memo off: the reference path the
tests compare against.
"""

from __future__ import annotations

from typing import Any

import torch

from qplan.planner import reuse

# (op, argument key, default dtype) -> output specs, _IN_PLACE or _UNCACHEABLE.
_MEMO: dict[tuple, Any] = {}
_UNCACHEABLE = object()
_IN_PLACE = object()  # an in-place op's answer: the argument it writes, unchanged
# Keeps the memo bounded across a long process (a sweep over many models).
MAX_ENTRIES = 200_000

_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
            torch.memory_format)
_SCALAR_TYPES = frozenset(_SCALARS)
# id(op) -> (op, how it may be remembered: _FUNCTIONAL_OP, the position of the one argument
# an in-place op writes and returns, or None).
_KINDS: dict[int, tuple[Any, Any]] = {}
_FUNCTIONAL_OP = "functional"
_PLAIN_TYPES: dict[type, bool] = {}
_TENSOR = torch.Tensor
_STRIDED = torch.strided


class _Unhashable(Exception):
    """An argument the memo cannot key on (a generator, a symbolic size, a real tensor)."""


def _plain(cls: type) -> bool:
    """A tensor class without its own dispatch (Parameter, bitsandbytes' Params4bit)."""
    found = _PLAIN_TYPES.get(cls)
    if found is None:
        found = getattr(cls, "__torch_dispatch__", None) is torch.Tensor.__torch_dispatch__
        _PLAIN_TYPES[cls] = found
    return found


def _tensor_key(value: torch.Tensor, cls: type) -> tuple:
    plain = True if cls is _TENSOR else _PLAIN_TYPES.get(cls)
    if plain is None:
        plain = _plain(cls)
    if (not plain or not value.is_meta
            or value.layout != _STRIDED or value.is_conj() or value.is_neg()):
        raise _Unhashable
    # torch.Size hashes and compares as the tuple of its sizes. No storage offset: a
    # functional op's fresh outputs (the only ones replayed) take their shape, strides
    # and dtype from the inputs' shapes, strides and dtypes, never from where a view
    # starts in its storage (TensorIterator and the meta kernels read no pointer). A
    # per-token loop over slices (the Mamba selective scan's reference path,
    # ``discrete_A[:, :, i] * state``) is then one entry, not one per token.
    return (value.dtype, value.shape, value.stride(), value.requires_grad)


# No item is this object: the "item before" of the first item.
_NOTHING = object()


def _items_key(values: tuple | list) -> tuple:
    """``tuple(_key(v) for v in values)``, the commonest items (a plain tensor, a scalar)
    keyed in the loop itself: an op's arguments are keyed at every dispatch."""
    keys = []
    # An item that is the item before has its key (the list ``torch.stack`` reads after a
    # Mamba scan holds one view for all its counted tokens' outputs: thousands of times).
    last: Any = _NOTHING
    key: Any = None
    for value in values:
        if value is last:
            keys.append(key)
            continue
        cls = type(value)
        if cls is _TENSOR:
            key = _tensor_key(value, cls)
        elif cls in _SCALAR_TYPES:
            key = (cls, value)
        else:
            key = _key(value)
        keys.append(key)
        last = value
    return tuple(keys)


def _key(value: Any) -> Any:
    # The commonest kinds first, by exact type (a scan loop keys millions of arguments):
    # the tests below are exclusive, so the order changes no key.
    cls = type(value)
    if cls in _SCALAR_TYPES:
        # 1, 1.0 and True hash alike but may type an output differently.
        return (cls, value)
    if cls is tuple or cls is list:
        return (cls, _items_key(value))
    if cls is _TENSOR or isinstance(value, torch.Tensor):
        return _tensor_key(value, cls)
    if isinstance(value, _SCALARS):
        return (cls, value)
    if isinstance(value, (tuple, list)):
        return (cls, tuple([_key(v) for v in value]))
    if isinstance(value, dict):
        return (dict, tuple((k, _key(v)) for k, v in value.items()))
    raise _Unhashable


def _kind(func: Any) -> Any:
    """How ``func`` may be remembered: ``_FUNCTIONAL_OP``; for an in-place op writing one
    argument and returning it (and not changing its view), where that argument is:
    ``(index, name)``; else None."""
    # Keyed by the op's id, not the op: an OpOverload hashes in Python (a tenth of the
    # memo's own time in a scan loop). The op is kept in the value, so its id stays its own.
    found = _KINDS.get(id(func))
    if found is None:
        found = _KINDS[id(func)] = (func, _schema_kind(func))
    return found[1]


def _schema_kind(func: Any) -> Any:
    schema = getattr(func, "_schema", None)
    if schema is None:
        return None
    written = [(index, argument) for index, argument in enumerate(schema.arguments)
               if argument.alias_info is not None and argument.alias_info.is_write]
    if not written and not any(r.alias_info is not None for r in schema.returns):
        return _FUNCTIONAL_OP
    if len(written) != 1 or len(schema.returns) != 1:
        return None
    index, argument = written[0]
    returned = schema.returns[0].alias_info
    if (returned is None or not returned.is_write
            or set(returned.before_set) != set(argument.alias_info.before_set)
            or torch.Tag.inplace_view in getattr(func, "tags", ())):
        return None
    return (index, argument.name)


def _written(where: tuple[int, str], args: tuple, kwargs: dict) -> Any:
    index, name = where
    return args[index] if index < len(args) else kwargs.get(name)


def _layout(tensor: torch.Tensor) -> tuple:
    return (tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset(),
            tensor.untyped_storage().nbytes(), tensor.device)


def _spec(tensor: Any, inputs: set[int]) -> tuple | None:
    """How to recreate ``tensor`` with ``empty_strided``, or None when that is not exact."""
    if (type(tensor) is not torch.Tensor or tensor.device.type != "meta"
            or tensor.layout != torch.strided or tensor.is_conj() or tensor.is_neg()
            or tensor.requires_grad or tensor.storage_offset() != 0):
        return None
    storage = tensor.untyped_storage()
    if id(storage) in inputs:
        return None
    shape, stride = tuple(tensor.shape), tensor.stride()
    if 0 in shape:
        needed = 0
    else:
        needed = (1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)))
        needed *= tensor.element_size()
    if storage.nbytes() != needed:
        return None
    return (shape, stride, tensor.dtype)


def _specs(out: Any, args: Any, kwargs: dict) -> Any:
    inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
    if isinstance(out, torch.Tensor):
        spec = _spec(out, inputs)
        return None if spec is None else ("one", spec)
    if not isinstance(out, (tuple, list)):
        return None
    specs = []
    seen: set[int] = set()
    for item in out:
        if item is None:
            specs.append(None)
            continue
        if not isinstance(item, torch.Tensor):
            return None
        storage = id(item.untyped_storage())
        spec = _spec(item, inputs)
        if spec is None or storage in seen:
            return None
        seen.add(storage)
        specs.append(spec)
    return ("many", type(out), tuple(specs))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


_META = torch.device("meta")


def _make(spec: tuple) -> torch.Tensor:
    shape, stride, dtype = spec
    return torch.empty_strided(shape, stride, dtype=dtype, device=_META)


def _replay(specs: tuple) -> Any:
    if specs[0] == "one":
        return _make(specs[1])
    _, container, items = specs
    return container(None if s is None else _make(s) for s in items)


def call(func: Any, args: tuple, kwargs: dict, enabled: bool | None = None) -> Any:
    """``func(*args, **kwargs)``, answered from the memo when it has seen the same call.
    ``enabled``: ``reuse.enabled()`` as the caller read it (a trace reads it once, not at
    every op), read here when None."""
    if enabled is None:
        enabled = reuse.enabled()
    found = _KINDS.get(id(func))
    kind = found[1] if found is not None else _kind(func)
    if not enabled or kind is None:
        return func(*args, **kwargs)
    try:
        # ``_key(args)``, args being the tuple a dispatch passes.
        key = (func, (tuple, _items_key(args)) if type(args) is tuple else _key(args),
               _key(kwargs) if kwargs else None, torch.get_default_dtype())
    except _Unhashable:
        return func(*args, **kwargs)
    specs = _MEMO.get(key)
    if specs is _UNCACHEABLE:
        return func(*args, **kwargs)
    if specs is not None:
        return _written(kind, args, kwargs) if specs is _IN_PLACE else _replay(specs)
    if kind is _FUNCTIONAL_OP:
        out = func(*args, **kwargs)
        specs = _specs(out, args, kwargs)
    else:
        target = _written(kind, args, kwargs)
        if not isinstance(target, torch.Tensor):
            return func(*args, **kwargs)
        before = _layout(target)
        out = func(*args, **kwargs)
        # Replayed as "the argument, unchanged" only where this run did exactly that.
        specs = _IN_PLACE if out is target and _layout(target) == before else None
    if len(_MEMO) >= MAX_ENTRIES:
        _MEMO.clear()
    _MEMO[key] = _UNCACHEABLE if specs is None else specs
    return out


def clear() -> None:
    _MEMO.clear()
