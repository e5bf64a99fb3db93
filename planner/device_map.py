"""Inference across several GPUs: accelerate's own device map, with budgets qplan computes.

The split is ``accelerate.infer_auto_device_map`` on the meta model AT THE CANDIDATE
PRECISION (``quantize_meta_model``: real bitsandbytes layers with packed weights). The
quant-state tensors (absmax, quant maps, offsets, nested state, SCB) are attributes, not
parameters, so accelerate would not count them: ``add_quant_state_buffers`` registers each
as a non-persistent buffer of its layer, which makes every module's size (accelerate's
``compute_module_sizes``, dtype None = the tensors' own dtypes) exact and their sum equal
to ``planner.weights``' bytes.

Per-GPU budget (``max_memory``) = available - CUDA context - headroom - what the GPU holds
besides weights:

* the KV cache of the decoder layers placed on it (the traced kv_cache / decoder layers);
* the activation reserve (the traced activations + transients + allocator) on every GPU
  that runs layers: the prefill peak sits inside one decoder layer, and every GPU runs
  some, so each must have room for it;
* the logits on the GPU holding the output embedding (lm_head), where they are made.

Layers accelerate offloads to CPU or disk run on GPU 0 (its execution device), so their
KV cache, and the logits when lm_head is offloaded, are charged to GPU 0.

The KV cache depends on the placement and the placement on the budgets, so the budgets are
refined until the placement is stable. Each round may only lower a budget, so the rounds
end, and the final map is what accelerate gives for the final ``max_memory``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from qplan.planner.budget import Budget
from qplan.planner.inventory import decoder_layers
from qplan.planner.placement import DeviceUse, Strategy

__all__ = ["decoder_layers"]  # imported from here by the multi-GPU planner and tests

MAX_ROUNDS = 32
# Activation-side components every GPU that runs layers must leave room for.
ACTIVATION_PARTS = ("activations", "transients", "allocator")


@dataclass(frozen=True)
class DevicePlan:
    """A split of the model over GPUs (and CPU/disk when they do not suffice)."""

    device_map: dict[str, int | str]  # module name -> GPU index, "cpu" or "disk"
    max_memory: dict[int | str, int]  # what accelerate was given, per device
    devices: tuple[DeviceUse, ...]  # per device bytes by component, GPUs first
    offloaded: tuple[str, ...]  # modules on "cpu" or "disk"

    @property
    def fits(self) -> bool:
        """On the GPUs alone, every GPU within its limit."""
        return not self.offloaded and all(d.fits for d in self.devices)


def add_quant_state_buffers(model: nn.Module) -> nn.Module:
    """Register every bitsandbytes quant-state tensor as a non-persistent buffer of its layer.

    Meant for the placement copy of the meta model only: the buffers make accelerate's
    module sizes count what a real load allocates.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        for i, tensor in enumerate(_quant_state_tensors(weight)):
            module.register_buffer(f"_qplan_quant_state_{i}", tensor, persistent=False)
    return model


def _quant_state_tensors(weight: Any) -> list[Any]:
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Params4bit
        found = [state.absmax, state.code]
        if getattr(state, "offset", None) is not None:
            found.append(state.offset)
        nested = getattr(state, "state2", None)
        if nested is not None:
            found += [nested.absmax, nested.code]
        return found
    scb = getattr(weight, "SCB", None)  # Int8Params
    return [scb] if scb is not None else []


def device_of(name: str, device_map: Mapping[str, int | str]) -> int | str | None:
    """The device of module ``name`` under a (cleaned) device map: its longest mapped prefix."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    return None


def _infer(model: nn.Module, max_memory: dict[int | str, int]) -> dict[str, int | str]:
    from accelerate.utils import infer_auto_device_map

    # accelerate warns when a planned GPU index is not present on this machine; planning
    # for GPUs that are elsewhere is the point, so keep it quiet.
    log = logging.getLogger("accelerate.utils.modeling")
    previous = log.level
    log.setLevel(logging.ERROR)
    try:
        found = infer_auto_device_map(
            model,
            max_memory=dict(max_memory),
            no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
        )
    finally:
        log.setLevel(previous)
    return dict(found)


def _output_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


@dataclass(frozen=True)
class _Demand:
    """What the model needs besides its weights, spread by a device map."""

    kv_per_layer: tuple[int, ...]
    layers: tuple[str, ...]
    activation: dict[str, int]
    logits: int
    output: str | None

    def on(self, device_map: Mapping[str, int | str], gpus: int) -> dict[int, dict[str, int]]:
        parts: dict[int, dict[str, int]] = {i: {} for i in range(gpus)}

        def gpu(device: int | str | None) -> int:
            # Offloaded modules run on GPU 0, accelerate's execution device.
            return device if isinstance(device, int) else 0

        for layer, kv in zip(self.layers, self.kv_per_layer, strict=True):
            target = parts[gpu(device_of(layer, device_map))]
            target["kv_cache"] = target.get("kv_cache", 0) + kv
        hosts = {gpu(d) for d in device_map.values()}
        for i in hosts:
            parts[i].update(self.activation)
        if self.logits:
            where = gpu(device_of(self.output, device_map)) if self.output else max(hosts)
            parts[where]["logits"] = self.logits
        return parts


def _demand(model: nn.Module, components: Mapping[str, int]) -> _Demand:
    layers = decoder_layers(model)
    kv = int(components.get("kv_cache", 0))
    count = max(1, len(layers))
    # Spread the total exactly: layer i gets its share of the integer total.
    shares = tuple(kv * (i + 1) // count - kv * i // count for i in range(len(layers)))
    return _Demand(
        kv_per_layer=shares,
        layers=tuple(layers),
        activation={k: int(components.get(k, 0)) for k in ACTIVATION_PARTS},
        logits=int(components.get("logits", 0)),
        output=_output_name(model),
    )


def plan_device_map(
    model: nn.Module,
    budgets: Sequence[Budget],
    components: Mapping[str, int],
    *,
    cpu_bytes: int | None = None,
) -> DevicePlan:
    """Split ``model`` (a quantised meta model; gets quant-state buffers) over ``budgets``.

    ``components`` are the single-device traced components of the workload (kv_cache,
    activations, logits, transients, allocator; weights are read from the model).
    ``cpu_bytes``: host memory for offloaded layers; None = as much as needed (qplan does
    not know the target's RAM), so disk offload only happens when it is given.
    """
    from accelerate.utils import compute_module_sizes

    add_quant_state_buffers(model)
    sizes = compute_module_sizes(model)
    demand = _demand(model, components)
    gpus = len(budgets)
    limit = {i: b.usable_bytes for i, b in enumerate(budgets)}
    reserve = sum(demand.activation.values())
    budget_now = {i: limit[i] - reserve for i in range(gpus)}
    host = cpu_bytes if cpu_bytes is not None else sizes[""]
    for _ in range(MAX_ROUNDS):
        max_memory: dict[int | str, int] = {i: max(0, v) for i, v in budget_now.items()}
        max_memory["cpu"] = host
        device_map = _infer(model, max_memory)
        extra = demand.on(device_map, gpus)
        lowered = {i: min(budget_now[i], limit[i] - sum(extra[i].values())) for i in range(gpus)}
        if lowered == budget_now:
            break
        budget_now = lowered
    devices = _devices(device_map, sizes, extra, budgets)
    offloaded = tuple(n for n, d in device_map.items() if not isinstance(d, int))
    return DevicePlan(device_map, max_memory, devices, offloaded)


def _devices(
    device_map: Mapping[str, int | str],
    sizes: Mapping[str, int],
    extra: dict[int, dict[str, int]],
    budgets: Sequence[Budget],
) -> tuple[DeviceUse, ...]:
    weights: dict[int | str, int] = {}
    for name, device in device_map.items():
        weights[device] = weights.get(device, 0) + int(sizes[name])
    out = []
    for i, budget in enumerate(budgets):
        parts = {"weights": weights.get(i, 0), **extra[i]}
        if any(parts.values()):
            parts["cuda_context"] = budget.cuda_context_bytes
        out.append(
            DeviceUse(
                f"cuda:{i}",
                parts,
                sum(parts.values()),
                budget.available_bytes - budget.headroom_bytes,
            )
        )
    for place in ("cpu", "disk"):
        if weights.get(place):
            out.append(DeviceUse(place, {"weights": weights[place]}, weights[place]))
    return tuple(out)


def device_map_strategy(plan: DevicePlan, gpu_name: str) -> Strategy:
    """The report's view of a device plan, with the reason in one sentence."""
    used = [d for d in plan.devices if d.device.startswith("cuda") and d.total_bytes]
    if plan.offloaded:
        where = sorted({d.device for d in plan.devices if not d.device.startswith("cuda")})
        name = "device_map+offload"
        reason = (
            f"the weights do not fit on the {len(plan.max_memory) - 1} x {gpu_name}, so "
            f"{len(plan.offloaded)} module(s) go to {' and '.join(where)}: it runs, but every "
            "token streams those weights to GPU 0 (much slower)"
        )
    else:
        name = "device_map"
        reason = (
            f"the layers are split across {len(used)} GPU(s) in order (accelerate's device "
            "map); each GPU keeps the KV cache of its layers and room for the prefill's "
            "activations"
        )
    return Strategy(
        name=name,
        reason=reason,
        fits=plan.fits,
        devices=plan.devices,
        device_map=dict(plan.device_map),
        max_memory={str(k): int(v) for k, v in plan.max_memory.items()},
        offloaded=plan.offloaded,
    )


# transformers' bitsandbytes quantizers shrink max_memory to 90% (adjust_max_memory)
# before inferring a device map; qplan's budgets are exact, so they are handed over
# divided by 0.9. The planned device_map (an explicit dict) is what decides the split -
# transformers uses max_memory only for string device maps - and this keeps the two
# consistent for anyone who re-plans with device_map="auto".
BNB_MAX_MEMORY_FRACTION = 0.90


def from_pretrained_max_memory(
    max_memory: dict[str, int], quantized: bool | float
) -> dict[Any, int]:
    """The plan's max_memory with int GPU keys, compensated for the quantiser's cut.

    ``quantized`` is the share the method's quantiser keeps (``max_memory_fraction``), or a
    bool for bitsandbytes (True) / no quantiser (False).
    """
    if isinstance(quantized, bool):
        fraction = BNB_MAX_MEMORY_FRACTION if quantized else 1.0
    else:
        fraction = quantized
    scale = 1 / fraction
    return {(int(k) if k.isdigit() else k): int(v * scale) for k, v in max_memory.items()}
