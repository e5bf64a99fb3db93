"""Activation offloading: saved activations in pinned host memory, not on the GPU.

Axolotl turns it on with ``activation_offloading: true`` (or the older
``gradient_checkpointing: offload``, which its config validation rewrites to
``gradient_checkpointing: true`` + ``activation_offloading: true``). What the run does
(axolotl/core/builders/base.py, loaders/model.py, core/trainers/mixins/
activation_checkpointing.py):

* transformers' gradient checkpointing is left off (``gradient_checkpointing=False`` in the
  TrainingArguments); instead every ``GradientCheckpointingLayer`` is wrapped with torch's
  ``checkpoint_wrapper`` (``apply_activation_checkpointing``: non-reentrant
  ``torch.utils.checkpoint``). A k-bit base still gets peft's
  ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)``, which turns
  transformers' checkpointing on inside the wrapper as well.
* each training step (forward and backward) runs under TRL's ``OffloadActivations``
  (trl/models/activation_offloading.py, from torchtune), a ``saved_tensors_hooks`` that
  moves every tensor autograd saves to pinned host memory and brings it back in the
  backward, with ``use_streams=True``, ``min_offload_size=1024``, ``max_fwd_stash_size=5``.
  Full fine-tuning builds it with TRL's ``get_act_offloading_ctx_manager`` (lm_head and
  ``liger`` modules not offloaded, parameter storages skipped); a peft model with
  Axolotl's ``get_lora_act_offloading_ctx_manager`` (lm_head not offloaded, nor anything
  inside a checkpoint-wrapped layer: its hooks are no-ops there, so the layers keep what
  they save on the GPU, without recomputation, and only the checkpoints' saved inputs and
  what lies outside the layers go to the host).

``HostOffload`` follows OffloadActivations' pack/unpack line for line for what it
allocates and how long it keeps it (TRL 1.16): tensors under 1024 bytes, parameters, and a
storage already offloaded within the stash window stay on the device; a non-contiguous or
offset view is first copied on the device; the host copy is ``empty_like`` (the whole
storage for a broadcast view); the device tensor stays alive in the forward stash until
five more tensors have been packed, and the last ones until the first backward node that
unpacks; a tensor brought back is a new device tensor kept until the next node that brings
one back has run (or dropped after its own node when a view of it outlives it), and all
of them at the end of the backward. Streams and events only order copies, they allocate
nothing. Host copies are counted as host memory by the LiveTensorTracker.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from qplan.planner.live_tensors import LiveTensorTracker

MIN_OFFLOAD_BYTES = 1024
MAX_FWD_STASH = 5


def wrap_layers_for_checkpointing(model: nn.Module) -> None:
    """Axolotl's ``ac_wrap_hf_model``: torch's non-reentrant checkpoint wrapper around
    every transformers ``GradientCheckpointingLayer``."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.modeling_layers import GradientCheckpointingLayer

    apply_activation_checkpointing(
        model, auto_wrap_policy=ModuleWrapPolicy({GradientCheckpointingLayer})
    )


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, torch.dtype]:
    # TRL keys by data_ptr + storage_offset; meta storages have no address, so the
    # storage object's identity stands for it (the tracker relies on the same identity).
    return (id(tensor.untyped_storage()), tensor.storage_offset(), tensor.dtype)


class _StorageKeys(dict):
    """TRL's storage -> tensor id map, keyed by storage identity. A key can outlive its
    storage (the stash keeps the contiguous copy of an offset view, not the view's
    storage); TRL's address key then matches whatever the allocator puts there next,
    which no plan can know, so a key only matches the storage it was made for."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[Any, weakref.ref] = {}

    def track(self, key: Any, tensor_id: int, storage: Any) -> None:
        self[key] = tensor_id
        self.storages[key] = weakref.ref(storage)

    def holds(self, key: Any, storage: Any) -> bool:
        ref = self.storages.get(key)
        return key in self and ref is not None and ref() is storage


class HostOffload(saved_tensors_hooks):
    """OffloadActivations(use_pin_memory=True, use_streams=True) as it allocates."""

    def __init__(self, tracker: LiveTensorTracker | None, param_storages: set[int]) -> None:
        self.tracker = tracker
        self.param_storages = param_storages
        self.saved: dict[int, tuple[torch.Tensor, bool, Any]] = {}
        self.tensor_id = 0
        self.first_forward_call = True
        self.first_backward_call = True
        self.storage_to_id = _StorageKeys()
        self.key_of_id: dict[int, Any] = {}
        self.fwd_stash: dict[int, torch.Tensor] = {}
        self.bwd_stash: dict[int, torch.Tensor] = {}
        self.graph_id: int | None = None
        self.node: Any = None
        super().__init__(self._pack, self._unpack)

    # -- helpers -------------------------------------------------------------------------
    def _track_key(self, key: Any, tensor_id: int, storage: Any) -> None:
        self.storage_to_id.track(key, tensor_id, storage)
        self.key_of_id[tensor_id] = key

    def _release_key(self, tensor_id: int) -> None:
        key = self.key_of_id.pop(tensor_id, None)
        if key is not None and self.storage_to_id.get(key) == tensor_id:
            del self.storage_to_id[key]
            self.storage_to_id.storages.pop(key, None)

    @contextlib.contextmanager
    def _on_host(self) -> Iterator[None]:
        if self.tracker is None:
            yield
            return
        self.tracker.on_host = True
        try:
            yield
        finally:
            self.tracker.on_host = False

    def _keep(self, tensor_id: int, activation: torch.Tensor) -> int:
        self.saved[tensor_id] = (activation, False, None)
        return tensor_id

    # -- pack ----------------------------------------------------------------------------
    def _pack(self, activation: torch.Tensor) -> int:
        if self.first_forward_call:
            self.first_forward_call = False
            self.first_backward_call = True
            self.storage_to_id, self.key_of_id = _StorageKeys(), {}
        num_bytes = activation.element_size() * activation.nelement()
        self.tensor_id += 1
        tensor_id = self.tensor_id
        key = _storage_key(activation)
        storage = activation.untyped_storage()
        if self.storage_to_id.holds(key, storage):  # offloaded within the stash window
            self._keep(tensor_id, activation)
            self._track_key(key, tensor_id, storage)
            return tensor_id
        if (
            num_bytes < MIN_OFFLOAD_BYTES
            or isinstance(activation, nn.Parameter)
            or id(activation.untyped_storage()) in self.param_storages
        ):
            return self._keep(tensor_id, activation)
        broadcast = 0 in activation.stride()
        if not broadcast and (not activation.is_contiguous() or activation.storage_offset()):
            if activation.storage_offset():
                activation = activation.clone(memory_format=torch.contiguous_format)
            else:
                activation = activation.contiguous()
        for old in list(self.fwd_stash):
            if old > tensor_id - MAX_FWD_STASH:
                break
            del self.fwd_stash[old]
            self._release_key(old)
        layout = (activation.shape, activation.stride(), activation.storage_offset())
        with self._on_host():
            if broadcast:
                count = activation.untyped_storage().nbytes() // activation.element_size()
                host = torch.empty(count, dtype=activation.dtype, device=activation.device)
                host.copy_(torch.as_strided(activation, (count,), (1,), 0))
            else:
                host = torch.empty_like(activation)
                host.copy_(activation)
        self.saved[tensor_id] = (host, True, layout)
        self.fwd_stash[tensor_id] = activation
        self._track_key(key, tensor_id, storage)
        return tensor_id

    # -- unpack --------------------------------------------------------------------------
    def _unpack(self, tensor_id: int) -> torch.Tensor:
        if self.first_backward_call:
            self.graph_id = torch._C._current_graph_task_id()
            torch.autograd.variable.Variable._execution_engine.queue_callback(
                self.bwd_stash.clear
            )
            self.first_backward_call = False
        tensor, offloaded, layout = self.saved[tensor_id]
        if offloaded:
            graph_id = torch._C._current_graph_task_id()
            node = torch._C._current_autograd_node()
            previous: list[int] = []
            if graph_id == self.graph_id and self.node is not node:
                self.node = node
                previous = list(self.bwd_stash)
            brought_back = tensor_id not in self.fwd_stash
            if not brought_back:
                tensor = self.fwd_stash[tensor_id]
            else:
                # The host-to-device copy: a new device tensor (on a GPU ``.to("cuda")``;
                # here a clone, since host and "device" are one on CPU and on meta).
                shape, stride, offset = layout
                tensor = torch.as_strided(tensor.clone(), shape, stride, offset)
                self.bwd_stash[tensor_id] = tensor
                refcount = torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)

            def after_node(outputs: Any, inputs: Any, tensor_id: int = tensor_id) -> None:
                if brought_back and tensor_id in self.bwd_stash:
                    stashed = self.bwd_stash[tensor_id]
                    uses = torch._C._storage_Use_Count(stashed.untyped_storage()._cdata)
                    if uses > refcount:  # a view outlives the node: record_stream, drop
                        del self.bwd_stash[tensor_id]
                    del stashed
                for old in list(self.fwd_stash):
                    del self.fwd_stash[old]
                    self._release_key(old)
                for old in previous:
                    self.bwd_stash.pop(old, None)

            if node is not None:
                node.register_hook(after_node)
        del self.saved[tensor_id]
        self._release_key(tensor_id)
        if not self.saved:
            self.first_forward_call = True
        return tensor


def _noop() -> saved_tensors_hooks:
    """TRL's NoOpManager: saved tensors stay where they are (the innermost hooks win)."""
    return saved_tensors_hooks(lambda t: t, lambda t: t)


def _exempt(module: nn.Module, noop: saved_tensors_hooks) -> list[Any]:
    return [
        module.register_forward_pre_hook(lambda *_: noop.__enter__()),
        module.register_forward_hook(lambda *_: noop.__exit__(), always_call=True),
    ]


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "base_model") and hasattr(model, "peft_config")


def _output_head(model: nn.Module) -> nn.Module | None:
    """The module TRL / Axolotl exempt as the output head, in their order of checks."""
    output = getattr(model, "output", None)
    if output is not None:
        if isinstance(output, nn.Module):
            return output
        linear = getattr(output, "linear", None)
        return linear if isinstance(linear, nn.Module) else None
    for name in ("lm_head",):
        if hasattr(model, name):
            return getattr(model, name)
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        return getattr(decoder, "output", None) or getattr(decoder, "lm_head", None)
    final = getattr(model, "final_layer_norm", None) or getattr(model, "ln_f", None)
    if final is not None:
        return final
    head = getattr(model, "head", None)
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def offload_step(model: nn.Module, tracker: LiveTensorTracker | None) -> Iterator[HostOffload]:
    """The context one training step (forward and backward) runs under, with the modules
    TRL / Axolotl exempt from offloading; the hooks are removed afterwards."""
    peft = _is_peft(model)
    unwrapped = model.base_model if peft else model
    # TRL's update_model_params (full fine-tuning only: Axolotl's LoRA variant skips it).
    params = set() if peft else {id(p.untyped_storage()) for p in model.parameters()}
    noop = _noop()
    handles: list[Any] = []
    head = _output_head(unwrapped)
    if head is not None:
        handles += _exempt(head, noop)
    for name, module in unwrapped.named_modules():
        if "liger" in name.lower():
            handles += _exempt(module, noop)
        if peft and name.endswith("._checkpoint_wrapped_module"):
            for sub in module.modules():
                handles += _exempt(sub, noop)
    context = HostOffload(tracker, params)
    try:
        with context:
            yield context
    finally:
        context.fwd_stash.clear()
        context.bwd_stash.clear()
        context.saved.clear()
        for handle in handles:
            handle.remove()
