"""The multi-GPU step of an estimate: per precision, how the candidate spreads over the GPUs.

Inference and ``load`` split the layers with a device map (planner/device_map.py); training
picks a parallel strategy (planner/parallel.py). Both start from the single-device traced
components of the candidate, so deep models are still traced at two shallow depths only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qplan.planner.budget import Budget, Headroom, budget_for
from qplan.planner.components import ComponentPlan
from qplan.planner.device_map import decoder_layers, device_map_strategy, plan_device_map
from qplan.planner.gpu import GpuTarget
from qplan.planner.inventory import Inventory, build_meta_model, take_inventory
from qplan.planner.parallel import (
    LORA_PARAM_BYTES,
    STRATEGIES,
    TrainingInput,
    param_layout,
    plan_training,
)
from qplan.planner.placement import Strategy
from qplan.planner.precision import PRECISIONS
from qplan.planner.quant import QuantSettings
from qplan.planner.workload import Workload


def device_budgets(
    target: GpuTarget, headroom: Headroom, devices: Sequence[GpuTarget] | None = None
) -> list[Budget]:
    """One budget per GPU: each listed device with its own memory, else ``count`` alike."""
    if devices:
        return [budget_for(d, headroom) for d in devices]
    return [budget_for(target, headroom)] * target.count


@dataclass
class MultiGpuPlanner:
    """Strategies per precision for one model, workload and GPU set (cached per precision)."""

    config: Any
    inventory: Inventory
    meta: Any  # the unquantised meta model the inventory was taken from
    workload: Workload
    budgets: list[Budget]
    gpu_name: str
    compute_dtype: str
    quant_storage: str = "uint8"
    skip_modules: list[str] | None = None
    trust_remote_code: bool = False
    # Training: the strategies tried, in order (one when the run names its own, e.g. the
    # DeepSpeed or FSDP config of an Axolotl YAML).
    strategies: tuple[str, ...] = STRATEGIES
    found: dict[str, Strategy] = field(default_factory=dict)
    # The Trainer's parameter groups of ``meta`` (the same for every precision).
    _param_groups: tuple[tuple[int, ...], ...] | None = None

    def strategy(self, precision: str, plan: ComponentPlan) -> Strategy:
        if precision not in self.found:
            if self.workload.is_training:
                self.found[precision] = self._training(precision, plan)
            else:
                self.found[precision] = self._inference(precision, plan)
        return self.found[precision]

    def _inference(self, precision: str, plan: ComponentPlan) -> Strategy:
        from qplan.planner.quantize_meta import quantize_meta_model

        # A fresh meta model per precision: quantising and the quant-state buffers change it.
        model = build_meta_model(copy.deepcopy(self.config), self.trust_remote_code)
        # The checkpoint's stored format (if any) sizes the layers it replaces.
        inventory = replace(take_inventory(model, self.skip_modules),
                            stored=self.inventory.stored,
                            moe_experts=self.inventory.moe_experts)
        model = quantize_meta_model(
            model, inventory, precision, self.compute_dtype, self.quant_storage
        )
        device_plan = plan_device_map(model, self.budgets, plan.components)
        return device_map_strategy(device_plan, self.gpu_name)

    def _training(self, precision: str, plan: ComponentPlan) -> Strategy:
        layers = decoder_layers(self.meta)
        storage = self.quant_storage
        layout = param_layout(self.inventory, precision, self.compute_dtype, storage, layers)
        prec = PRECISIONS[precision]
        fsdp_storage = prec.method.fsdp_quant_storage(
            prec, QuantSettings(self.compute_dtype, storage)
        )
        fsdp_layout = (
            layout
            if fsdp_storage == storage
            else param_layout(self.inventory, precision, self.compute_dtype, fsdp_storage, layers)
        )
        lora = self.workload.is_lora
        adapters = int(plan.components.get("adapters", 0))
        trainable = adapters // LORA_PARAM_BYTES if lora else layout.num_params
        data = TrainingInput(
            components=plan.components,
            layout=layout,
            fsdp_layout=fsdp_layout,
            lora=lora,
            trainable_params=trainable,
            phase_peaks=plan.phase_peaks,
            optimizer=self.workload.optimizer,
            # Adapters (no decay exemption: lora_A/B weights) as one group; their shapes are
            # not in the layout, so ZeRO-3 partitions them as one tensor.
            param_groups=((trainable,),) if lora else self._trainer_param_groups(),
        )
        layer_class = type(self.meta.get_submodule(layers[0])).__name__ if layers else None
        strategy = plan_training(data, self.budgets, strategies=self.strategies)
        return replace(strategy, layer_class=layer_class)

    def _trainer_param_groups(self) -> tuple[tuple[int, ...], ...]:
        if self._param_groups is None:
            self._param_groups = _trainer_param_groups(self.meta)
        return self._param_groups


def _trainer_param_groups(model: Any) -> tuple[tuple[int, ...], ...]:
    """The sizes of the parameters in the Trainer's two optimizer groups (weight decay, no
    weight decay, each in the model's order), as transformers' Trainer splits them."""
    from transformers import Trainer

    # get_decay_parameter_names does not use the Trainer instance.
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    named = list(model.named_parameters())  # tied parameters once, as the Trainer sees them
    return (tuple(p.numel() for n, p in named if n in decay),
            tuple(p.numel() for n, p in named if n not in decay))
