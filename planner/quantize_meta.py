"""Turn a meta model into what ``from_pretrained`` would load at a precision, still on meta.

Everything the method does not replace takes the dtype transformers would give it; then
the precision's method module (``planner/quant/``) replaces the layers its transformers
integration replaces, with meta tensors shaped exactly like a real load's. The result runs
forward and backward on meta tensors through the real backend code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qplan.planner.inventory import Inventory
from qplan.planner.precision import PRECISIONS
from qplan.planner.quant import QuantSettings
from qplan.planner.weights import load_dtype_for, param_dtype

META = torch.device("meta")


def quant_settings(
    compute_dtype: str, quant_storage: str = "uint8", skip_modules: list[str] | None = None
) -> QuantSettings:
    return QuantSettings(
        compute_dtype, quant_storage, tuple(skip_modules) if skip_modules is not None else None
    )


def bnb_config(precision: str, compute_dtype: str, quant_storage: str = "uint8",
               skip_modules: list[str] | None = None) -> Any:
    """The real ``quantization_config`` a load of ``precision`` uses (None when unquantised)."""
    prec = PRECISIONS[precision]
    return prec.method.config_object(
        prec, quant_settings(compute_dtype, quant_storage, skip_modules)
    )


def quantize_meta_model(
    model: nn.Module,
    inventory: Inventory,
    precision: str,
    compute_dtype: str,
    quant_storage: str = "uint8",
) -> nn.Module:
    """Give ``model`` (meta, from build_meta_model) the layout a real load of ``precision`` has.

    ``inventory`` must be the one taken from this model (its skip list is reused).
    """
    prec = PRECISIONS[precision]
    load_dtype = load_dtype_for(prec, compute_dtype)
    infos = {t.name: t for t in inventory.tensors}
    # Cast what stays unquantised, as the load would (tied weights are one Parameter).
    for name, param in model.named_parameters():
        info = infos.get(name)
        if info is None or (prec.quantized and info.quantizable):
            continue
        param.data = param.data.to(getattr(torch, param_dtype(info, load_dtype)))
    for name, buf in model.named_buffers():
        info = infos.get(name)
        if info is not None and buf.is_floating_point():
            target = getattr(torch, param_dtype(info, load_dtype))
            module_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            owner._buffers[leaf] = buf.to(target)
    return prec.method.quantize_meta(
        model, inventory, prec, QuantSettings(compute_dtype, quant_storage)
    )
