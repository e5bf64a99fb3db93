"""Meta models built once per process and run again by every trace that leaves them as
they were.

Building a meta model (transformers' ``from_config`` under ``init_empty_weights``, then the
precision's layout, planner/quantize_meta.py) costs as much as tracing it. A step that
only runs the model (inference: ``eval()``, a forward under ``no_grad``, its hooks removed
afterwards) mostly leaves the module tree as it found it, so the traces of one model at one
precision and depth (the default plan, ``--solve``'s probes, the advice) can share one
build, for as long as its record (planner/prepared_models.state_of) stays the one taken
when it was built (a forward that keeps something on its modules, LongRoPE's
``long_inv_freq``, gets a fresh build for the next trace: planner/components.step_model).
A training step runs on the model its workload prepared (peft's adapters, k-bit
preparation, checkpointing): the prepared model is taken out (``take``) while a step runs
on it, and kept for the next step of the same preparation (``--solve``'s probes and the
advice differ only in batch and sequence length) when the step left it as prepared
(planner/prepared_models.py).

``QPLAN_REUSE=0`` (``reuse.disabled()``) builds every model afresh: the reference path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from qplan.planner import reuse

T = TypeVar("T")

# Two depths per trace group of one model are what one estimate uses; a sweep over many
# models keeps only the latest.
MAX_MODELS = 32
_MODELS: OrderedDict[tuple, Any] = OrderedDict()


def config_key(config: Any) -> str | None:
    """What identifies a config's model: its full JSON (as the trace cache keys it), or
    None when the config does not serialise (then nothing is shared)."""
    try:
        return f"{type(config).__qualname__}:{config.to_json_string(use_diff=False)}"
    except (TypeError, ValueError, AttributeError):
        return None


def shared(key: tuple, build: Callable[[], T]) -> T:
    """The model ``build`` makes for ``key``, built on the first call only."""
    if not reuse.enabled():
        return build()
    found = _MODELS.get(key)
    if found is not None:
        _MODELS.move_to_end(key)
        return found
    made = build()
    keep(key, made)
    return made


def take(key: tuple) -> Any | None:
    """The entry ``keep`` left under ``key``, removed: its user changes it while it runs,
    and gives it back with ``keep`` only if it is left as it was."""
    if not reuse.enabled():
        return None
    return _MODELS.pop(key, None)


def keep(key: tuple, value: Any) -> None:
    """Leave ``value`` under ``key`` for the next ``take``."""
    if not reuse.enabled():
        return
    _MODELS[key] = value
    _MODELS.move_to_end(key)
    if len(_MODELS) > MAX_MODELS:
        _MODELS.popitem(last=False)


def clear() -> None:
    _MODELS.clear()
