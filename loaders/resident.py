"""Measure what a loaded model really holds: the unique storages of all its tensors.

``model.get_memory_footprint()`` ignores bitsandbytes' quant-state tensors (absmax, quant
maps, nested statistics), so it is no ground truth. This walks parameters, buffers, every
``QuantState`` (and its nested state) and LLM.int8's ``SCB``, and counts each storage once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qplan.planner.precision import alloc_size


@dataclass(frozen=True)
class ResidentBytes:
    """Unique tensor storages of a model, split by device."""

    bytes: int
    allocated_bytes: int  # each storage rounded up to the CUDA allocator's 512 bytes
    storages: int
    by_device: dict[str, int]


def _quant_state_tensors(state: object) -> Iterator[torch.Tensor]:
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested)


def model_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the model keeps alive: parameters, buffers and quantisation state."""
    for param in model.parameters(recurse=True):
        yield param
        state = getattr(param, "quant_state", None)
        if state is not None:
            yield from _quant_state_tensors(state)
        for attr in ("SCB", "CB"):
            extra = getattr(param, attr, None)
            if isinstance(extra, torch.Tensor):
                yield extra
    yield from model.buffers(recurse=True)
    for module in model.modules():
        # Linear8bitLt keeps its outlier statistics on module.state as well.
        state = getattr(module, "state", None)
        for attr in ("SCB", "CB"):
            extra = getattr(state, attr, None) if state is not None else None
            if isinstance(extra, torch.Tensor):
                yield extra


def resident_bytes(model: nn.Module) -> ResidentBytes:
    """Sum the unique storages of every tensor ``model`` keeps alive (meta tensors skipped)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in model_tensors(model):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen.setdefault((str(tensor.device), storage.data_ptr()), storage.nbytes())
    by_device: dict[str, int] = {}
    for (device, _), size in seen.items():
        by_device[device] = by_device.get(device, 0) + size
    return ResidentBytes(
        bytes=sum(seen.values()),
        allocated_bytes=sum(alloc_size(s) for s in seen.values()),
        storages=len(seen),
        by_device=by_device,
    )
