"""Training across several GPUs: DDP, FSDP2 full shard, DeepSpeed ZeRO-2/3, with CPU offload.

Every strategy starts from the single-GPU traced components of the candidate (weights,
adapters, gradients, optimizer_states, logits, activations, transients, allocator) and
shards what the strategy shards; the micro-batch per GPU is unchanged, so activations,
logits and transients stay per GPU as traced.

* ``ddp``: a full replica per GPU, plus DDP's gradient buckets. With torch's default
  ``gradient_as_bucket_view=False`` (accelerate and the HF Trainer keep it) the reducer
  allocates flat buckets (bucket_cap_mb 25) for every trainable gradient and copies the
  averaged values back into ``param.grad``: one more copy of the gradients.
* ``fsdp``: FSDP2 ``fully_shard`` per decoder layer and on the root. Parameters are split
  on dim 0 into N chunks padded to ``ceil(dim0 / N)`` rows (torch's ``torch.chunk`` rule,
  what every rank allocates); gradients and optimizer states follow the sharded
  parameters. On top: the all-gathered parameters in flight - the root's (embeddings,
  final norm, lm_head: FSDP2 does not reshard the root after forward), the current and the
  prefetched decoder layer - and one layer's unsharded gradients before reduce-scatter.
  Buffers and bitsandbytes quant state are not parameters: replicated. QLoRA needs
  ``bnb_4bit_quant_storage`` = the compute dtype so the packed weights shard like any
  16-bit tensor (the plan is made with that storage).
* ``zero2`` / ``zero3``: model states follow DeepSpeed's own estimate
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``):
  mixed precision with 2 B 16-bit params (replicated in ZeRO-2) and 18 B per trainable
  parameter sharded over N (16-bit and fp32 gradients, fp32 master weights, Adam's two fp32
  states); ZeRO-3 adds 4 B per parameter of the largest module (its gathered 16-bit
  parameters and gradients). Adam's 8 B of those become the run's own optimizer's states
  over ZeRO's flat fp32 partitions (planner/zero_optimizer.py; the same figure for AdamW);
  offloaded states stay DeepSpeed's Adam estimate on the host. bf16/fp16 mixed precision
  is assumed whatever the candidate's dtype. Frozen weights (the LoRA base) stay
  replicated under ZeRO-2 and are sharded under ZeRO-3.
* ``+offload``: ZeRO-2 with the optimizer on CPU; FSDP with ``fsdp_offload_params``
  (parameters, gradients and the optimizer step on CPU); ZeRO-3 with optimizer and
  parameters on CPU. Host memory is reported (DeepSpeed's own figures for ZeRO).

The single-GPU peak of a big model often falls in the optimizer step (full replicas of
weights, gradients and states), where activations are gone; once states are sharded the
peak moves into forward/backward. So the sharded strategies take, per GPU, the largest
step memory of any phase: max(logits + activations + transients at the peak, the forward
peak minus weights, adapters and optimizer states, the backward peak minus those and every
gradient), and recompute the allocator allowance on what churns (that memory and the
sharded gradients), as planner/components.py does. Gradients are then counted in full
(sharded), as the optimizer step holds them.

Every strategy adds ``communication``: an allowance for NCCL's buffers, which live outside
torch's allocator (NCCL_BUFFSIZE 4 MiB per channel, send and receive, ring and tree, up
to 32 channels on NVLink systems).

The choice is the simplest strategy that fits: nothing sharded (DDP), then gradients and
optimizer states sharded (ZeRO-2), then everything sharded (FSDP, then ZeRO-3), and only
then the CPU-offload variants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import ceil

from qplan.planner.budget import Budget
from qplan.planner.components import FRAGMENTATION_ALLOWANCE
from qplan.planner.inventory import Inventory
from qplan.planner.placement import DeviceUse, Strategy, StrategyOption
from qplan.planner.precision import DTYPE_BYTES, PRECISIONS
from qplan.planner.quant import QuantSettings
from qplan.planner.weights import load_dtype_for, method_biases, param_dtype
from qplan.planner.zero_optimizer import (
    optimizer_state_bytes,
    zero2_partitions,
    zero3_partitions,
)

MIB = 1024**2
NCCL_ALLOWANCE = 512 * MIB
DDP_BUCKET_CAP = 25 * MIB
# DeepSpeed's model-state multipliers (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py).
DS_PARAMS_16BIT = 2
DS_SHARDED_STATES = 18
DS_LARGEST_LAYER = 4
DS_BUFFER_FACTOR = 1.5
LORA_PARAM_BYTES = 4  # adapters are fp32 (peft's autocast_adapter_dtype)
# ZeRO-3's sub_group_size as every ZeRO-3 file Axolotl ships sets it (and --emit axolotl
# names): 0, one optimizer tensor per parameter.
ZERO3_SUB_GROUP_SIZE = 0

STRATEGIES = ("ddp", "zero2", "fsdp", "zero3", "zero2+offload", "fsdp+offload", "zero3+offload")
PER_GPU_PARTS = ("logits", "activations", "transients", "allocator")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as it is stored at the candidate precision."""

    module: str
    shape: tuple[int, ...]  # stored shape (packed for 4-bit)
    itemsize: int
    numel: int  # the logical weight's elements (DeepSpeed counts these)

    @property
    def bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.itemsize

    def shard_bytes(self, ranks: int) -> int:
        """What each rank allocates under FSDP2: dim 0 padded to a multiple of ``ranks``."""
        if not self.shape:
            return self.itemsize
        rest = self.bytes // max(1, self.shape[0] * self.itemsize) * self.itemsize
        return ceil(self.shape[0] / ranks) * rest


@dataclass(frozen=True)
class ParamLayout:
    """The parameters of a candidate, grouped the way the sharding strategies need."""

    params: tuple[ParamInfo, ...]
    replicated_bytes: int  # buffers and quant state: never sharded
    layers: tuple[str, ...]  # decoder layer prefixes (the FSDP units)

    @property
    def param_bytes(self) -> int:
        return sum(p.bytes for p in self.params)

    def shard_bytes(self, ranks: int) -> int:
        return sum(p.shard_bytes(ranks) for p in self.params)

    def _layer_of(self, module: str) -> str | None:
        return next(
            (lay for lay in self.layers if module == lay or module.startswith(lay + ".")), None
        )

    def largest_layer_bytes(self) -> int:
        per: dict[str, int] = {}
        for p in self.params:
            layer = self._layer_of(p.module)
            if layer is not None:
                per[layer] = per.get(layer, 0) + p.bytes
        return max(per.values(), default=0)

    def root_bytes(self) -> int:
        return sum(p.bytes for p in self.params if self._layer_of(p.module) is None)

    def largest_module_params(self) -> int:
        """DeepSpeed's "largest layer": the most parameters one module holds directly."""
        per: dict[str, int] = {}
        for p in self.params:
            per[p.module] = per.get(p.module, 0) + p.numel
        return max(per.values(), default=0)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)


def param_layout(
    inventory: Inventory,
    precision: str,
    compute_dtype: str,
    quant_storage: str,
    layers: Sequence[str],
) -> ParamLayout:
    """Stored shapes of every parameter of ``inventory`` at ``precision`` (pure)."""
    prec = PRECISIONS[precision]
    load_dtype = load_dtype_for(prec, compute_dtype)
    settings = QuantSettings(compute_dtype, quant_storage, stored=inventory.stored,
                             moe_experts=inventory.moe_experts)
    biases = method_biases(inventory, prec, settings)
    params: list[ParamInfo] = []
    replicated = 0
    for t in inventory.tensors:
        if prec.quantized and prec.method.replaces(t, settings):
            tensors = prec.method.stored_tensors(prec, t, settings)
            stored = prec.method.stored_weight_of(prec, t, settings)
            params.append(ParamInfo(t.module, stored.shape, stored.itemsize, t.numel))
            replicated += sum(tensors[1:])
            continue
        dtype = biases.get(t.name) or param_dtype(t, load_dtype)
        if t.kind == "buffer":
            replicated += t.numel * DTYPE_BYTES[dtype]
        else:
            params.append(ParamInfo(t.module, t.shape, DTYPE_BYTES[dtype], t.numel))
    return ParamLayout(tuple(params), replicated, tuple(layers))


@dataclass(frozen=True)
class TrainingInput:
    """What the strategies are computed from, for one candidate."""

    components: Mapping[str, int]  # single-GPU traced, CUDA context excluded
    layout: ParamLayout  # at the candidate's own quant storage
    fsdp_layout: ParamLayout  # with quant storage = compute dtype (FSDP-QLoRA)
    lora: bool
    trainable_params: int
    phase_peaks: Mapping[str, int] = field(default_factory=dict)
    # The run's optimizer, and the trainable parameters' sizes per Trainer parameter group
    # (weight decay, no decay), in order: what ZeRO partitions for it (zero_optimizer.py).
    optimizer: str = "adamw"
    param_groups: tuple[tuple[int, ...], ...] = ()

    @property
    def step_bytes(self) -> int:
        """Activation-side memory of the step: the most any phase holds beyond model states."""
        c = self.components
        at_peak = sum(int(c.get(k, 0)) for k in ("logits", "activations", "transients"))
        states = sum(int(c.get(k, 0)) for k in ("weights", "adapters", "optimizer_states"))
        # Gradients are set to None before each forward; a backward peak of a big model is
        # at its end, with every gradient made (a peak earlier in the backward is at_peak).
        phases = [
            self.phase_peaks.get("forward", 0) - states,
            self.phase_peaks.get("backward", 0) - states - self.gradient_bytes,
        ]
        return max(at_peak, *phases)

    @property
    def gradient_bytes(self) -> int:
        """Every trainable gradient (in the parameter's dtype), as the optimizer step holds."""
        return int(self.components.get("adapters", 0)) if self.lora else self.layout.param_bytes


def ds_zero2(params: int, gpus: int, offload: bool) -> tuple[int, int]:
    """(cpu, gpu) bytes of DeepSpeed ZeRO-2 model states, as DeepSpeed estimates them."""
    if offload:
        gpu = DS_PARAMS_16BIT * params
        cpu = params * max(4 * gpus, 16) * DS_BUFFER_FACTOR
    else:
        gpu = DS_PARAMS_16BIT * params + int(DS_SHARDED_STATES * params / gpus)
        cpu = params * 4 * gpus * DS_BUFFER_FACTOR
    return int(cpu), int(gpu)


def ds_zero3(
    params: int, largest: int, gpus: int, offload_optimizer: bool, offload_params: bool
) -> tuple[int, int]:
    """(cpu, gpu) bytes of DeepSpeed ZeRO-3 model states (zero_init, one node)."""
    largest_memory = DS_LARGEST_LAYER * largest
    if offload_optimizer and offload_params:
        return int(params * 18 * DS_BUFFER_FACTOR), largest_memory
    if offload_optimizer:
        return int(params * 16 * DS_BUFFER_FACTOR), largest_memory + int(2 * params / gpus)
    gpu = largest_memory + int(DS_SHARDED_STATES * params / gpus)
    return int(largest * 4 * gpus * DS_BUFFER_FACTOR), gpu


def _div(value: int, ranks: int) -> int:
    return ceil(value / ranks)


def strategy_parts(name: str, data: TrainingInput, gpus: int) -> tuple[dict[str, int], int]:
    """Per-GPU components (CUDA context excluded) and host bytes of one strategy."""
    c = data.components
    if name == "ddp":
        # The single-GPU step as traced, plus the reducer's flat gradient buckets.
        parts = {k: int(v) for k, v in c.items() if k != "kv_cache"}
        parts["gradients"] = int(c.get("gradients", 0)) + data.gradient_bytes
        parts["communication"] = NCCL_ALLOWANCE
        return parts, 0
    step = data.step_bytes
    at_peak = {k: int(c.get(k, 0)) for k in PER_GPU_PARTS if k != "allocator"}
    # What the step needs beyond the peak's own activation-side tensors counts as activations.
    at_peak["activations"] += step - sum(at_peak.values())
    grads = _div(data.gradient_bytes, gpus)
    base = {
        **at_peak,
        "allocator": int((step + grads) * FRAGMENTATION_ALLOWANCE),
        "communication": NCCL_ALLOWANCE,
    }
    if name.startswith("fsdp"):
        return _fsdp(data, gpus, base, offload=name.endswith("+offload"))
    return _zero(name, data, gpus, base)


def _fsdp(
    data: TrainingInput, gpus: int, base: dict[str, int], offload: bool
) -> tuple[dict[str, int], int]:
    c, layout = data.components, data.fsdp_layout
    weights, adapters = int(c.get("weights", 0)), int(c.get("adapters", 0))
    grads, states = data.gradient_bytes, int(c.get("optimizer_states", 0))
    # What the trace holds beyond the stored parameters (k-bit preparation's fp32 casts,
    # buffers, quant state) is not sharded.
    unsharded = max(0, weights - layout.param_bytes)
    layers = max(1, len(layout.layers))
    layer_grads = _div(adapters, layers) if data.lora else layout.largest_layer_bytes()
    gathered = layout.root_bytes() + 2 * layout.largest_layer_bytes() + layer_grads
    if data.lora:
        gathered += 2 * _div(adapters, layers)
    sharded = layout.shard_bytes(gpus)
    if offload:
        # CPUOffloadPolicy: sharded params, their gradients and the optimizer step on CPU.
        parts = {"weights": unsharded, "gathered": gathered, **base}
        host = gpus * (sharded + _div(adapters, gpus) + _div(grads, gpus) + _div(states, gpus))
        return parts, host
    return {
        "weights": sharded + unsharded,
        "adapters": _div(adapters, gpus),
        "gradients": _div(grads, gpus),
        "optimizer_states": _div(states, gpus),
        "gathered": gathered,
        **base,
    }, 0


def _zero(
    name: str, data: TrainingInput, gpus: int, base: dict[str, int]
) -> tuple[dict[str, int], int]:
    c, layout = data.components, data.layout
    weights = int(c.get("weights", 0))
    trainable = data.trainable_params
    offload = name.endswith("+offload")
    # DeepSpeed's cpu figure without offload is host memory during model init, not during
    # training: only offloaded states are reported as host memory.
    # Frozen tensors: the LoRA base, or only buffers/quant state in full fine-tuning.
    frozen = weights if data.lora else max(0, weights - layout.param_bytes)
    if name.startswith("zero2"):
        cpu, gpu = ds_zero2(trainable, gpus, offload)
        if not offload:
            gpu += _optimizer_delta(data, zero2_partitions(
                [sum(group) for group in _groups(data)], gpus))
        replicated = DS_PARAMS_16BIT * trainable
        parts = {"weights": frozen + replicated, "model_states": gpu - replicated, **base}
        return parts, cpu if offload else 0
    largest = layout.largest_module_params()
    cpu, gpu = ds_zero3(trainable, largest, gpus, offload, offload)
    if not offload:
        gpu += _optimizer_delta(data, zero3_partitions(_groups(data), gpus, ZERO3_SUB_GROUP_SIZE))
    if data.lora:
        kept = layout.replicated_bytes + (0 if offload else _div(layout.param_bytes, gpus))
        frozen = kept + max(0, weights - layout.param_bytes - layout.replicated_bytes)
    gathered = DS_LARGEST_LAYER * largest
    parts = {"weights": frozen, "model_states": gpu - gathered, "gathered": gathered, **base}
    return parts, cpu if offload else 0


def _groups(data: TrainingInput) -> tuple[tuple[int, ...], ...]:
    return data.param_groups or ((data.trainable_params,),)


def _optimizer_delta(data: TrainingInput, partitions: list[int]) -> int:
    """DeepSpeed's estimate counts Adam's two fp32 states per parameter; the run's own
    optimizer keeps its states over the flat fp32 partitions instead (zero_optimizer.py).
    Zero for AdamW, so the estimate stays DeepSpeed's own there."""
    return (optimizer_state_bytes(data.optimizer, partitions)
            - optimizer_state_bytes("adamw", partitions))


def plan_training(
    data: TrainingInput, budgets: Sequence[Budget], *, strategies: Sequence[str] = STRATEGIES
) -> Strategy:
    """Try ``strategies`` in order; the first that fits every GPU is chosen."""
    gpus = len(budgets)
    options: list[StrategyOption] = []
    found: dict[str, tuple[tuple[DeviceUse, ...], int]] = {}
    for name in strategies:
        parts, host = strategy_parts(name, data, gpus)
        devices = tuple(_device(i, parts, b) for i, b in enumerate(budgets)) + (
            (DeviceUse("cpu", {"offloaded": host}, host),) if host else ()
        )
        fits = all(d.fits for d in devices)
        busiest = max(d.total_bytes for d in devices if d.device.startswith("cuda"))
        options.append(StrategyOption(name, busiest, host, fits))
        found[name] = (devices, host)
    chosen = next((o for o in options if o.fits), None)
    pick = chosen or min(options, key=lambda o: o.per_gpu_bytes)
    devices, _ = found[pick.name]
    notes = _notes(pick.name, data)
    return Strategy(
        name=pick.name,
        reason=_reason(pick, options, gpus, chosen is not None),
        fits=pick.fits,
        devices=devices,
        options=tuple(options),
        notes=notes,
    )


def _device(index: int, parts: dict[str, int], budget: Budget) -> DeviceUse:
    full = {**{k: v for k, v in parts.items() if v}, "cuda_context": budget.cuda_context_bytes}
    return DeviceUse(
        f"cuda:{index}", full, sum(full.values()), budget.available_bytes - budget.headroom_bytes
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.2f} GiB"


def _reason(pick: StrategyOption, options: Sequence[StrategyOption], gpus: int, fits: bool) -> str:
    if not fits:
        return (
            f"no strategy fits {gpus} GPUs; {pick.name} needs the least, "
            f"{_gib(pick.per_gpu_bytes)} per GPU"
        )
    before = options[: [o.name for o in options].index(pick.name)]
    host = f" and {_gib(pick.cpu_bytes)} of host RAM" if pick.cpu_bytes else ""
    if not before:
        return (
            f"{pick.name} needs {_gib(pick.per_gpu_bytes)} per GPU{host}: a full replica "
            "per GPU fits, so nothing needs sharding"
        )
    last = before[-1]
    return (
        f"{pick.name} needs {_gib(pick.per_gpu_bytes)} per GPU{host}; {last.name} "
        f"would need {_gib(last.per_gpu_bytes)}: the simplest strategy that fits"
    )


def _notes(name: str, data: TrainingInput) -> tuple[str, ...]:
    notes = []
    if name.startswith("zero"):
        notes.append(
            "DeepSpeed model states per DeepSpeed's estimate (16-bit params; 16- and 32-bit "
            "gradients and fp32 master weights sharded)"
            + ("" if name.endswith("+offload") else
               f", with {data.optimizer}'s states over ZeRO's flat fp32 partitions")
            + ("; host memory as DeepSpeed estimates it for Adam" if name.endswith("+offload")
               else "")
        )
    if name.endswith("+offload"):
        notes.append(
            "CPU offload moves the optimizer step (and for fsdp/zero3 the parameters) "
            "to the host: expect much slower steps"
        )
    if name.startswith("fsdp") and data.layout != data.fsdp_layout:
        notes.append(
            "FSDP with a 4-bit base needs bnb_4bit_quant_storage = the compute dtype (planned so)"
        )
    return tuple(notes)
