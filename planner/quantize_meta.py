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
from qplan.planner.weights import load_dtype_for, method_biases, param_dtype

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
    settings = QuantSettings(compute_dtype, quant_storage, stored=inventory.stored,
                             moe_experts=inventory.moe_experts)
    biases = method_biases(inventory, prec, settings)
    # Cast what stays unquantised, as the load would (tied weights are one Parameter).
    for name, param in model.named_parameters():
        info = infos.get(name)
        if info is None or (prec.quantized and info.quantizable):
            continue
        dtype = biases.get(name) or param_dtype(info, load_dtype)
        param.data = param.data.to(getattr(torch, dtype))
    for name, buf in model.named_buffers():
        info = infos.get(name)
        if info is not None and buf.is_floating_point():
            target = getattr(torch, param_dtype(info, load_dtype))
            module_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            owner._buffers[leaf] = buf.to(target)
    model = prec.method.quantize_meta(model, inventory, prec, settings)
    if prec.quantized and prec.method.traced_dequantized:
        model = _stored_placeholders(model, inventory, prec, settings)
    if prec.quantized:
        _mark_quantized(model)
    return model


def _stored_placeholders(
    model: nn.Module, inventory: Inventory, prec: Any, settings: QuantSettings
) -> nn.Module:
    """For methods whose layers cannot be built on meta here (their kernels or packages
    are missing: GPTQ, AWQ, MXFP4, FP8, compressed-tensors), each weight they replace
    becomes a uint8 meta parameter of exactly the bytes its replaced layer stores (packed
    weight, scales, zeros, g_idx...). Only for placing the model over devices: accelerate
    sizes each module by its tensors, so every module weighs what a real load allocates.
    """
    method = prec.method
    for t in inventory.tensors:
        if t.kind != "parameter" or not method.replaces(t, settings):
            continue
        nbytes = sum(method.stored_tensors(prec, t, settings))
        owner = model.get_submodule(t.module) if t.module else model
        leaf = t.name.rpartition(".")[2]
        owner._parameters[leaf] = nn.Parameter(
            torch.empty(nbytes, dtype=torch.uint8, device=META), requires_grad=False)
    return model


def _mark_quantized(model: nn.Module) -> None:
    """What from_pretrained does after a quantised load: ``config._is_quantized`` on
    every PreTrainedModel. Models read it to call a quantised Linear as a module instead
    of using its weight as a matrix (falcon-mamba's and Jamba's dt_proj)."""
    from transformers.modeling_utils import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True


# Depth of the probe model: enough for every layer kind of the hybrid patterns seen
# (Jamba repeats attention every 8 layers, MoE every 2).
_PROBE_LAYERS = 8
_PROBE_TOKENS = 4
# Tensor methods that read metadata, not values: reading them off a weight is harmless.
_METADATA = frozenset({
    "__get__", "size", "dim", "numel", "element_size", "is_floating_point", "is_complex",
    "data_ptr", "__len__", "stride", "is_contiguous", "storage_offset", "untyped_storage",
    "__hash__", "get_device", "nelement", "ndimension",
})


def weights_used_as_matrices(config: Any, trust_remote_code: bool = False,
                             every_kind_within: int | None = None) -> tuple[str, ...]:
    """See _probe_weights_used_as_matrices; remembered per config (one probe per model,
    however many precisions and workloads are planned). ``every_kind_within``: a depth
    whose first layers hold every kind of layer of the stack (the low depth of its trace
    plan, planner/depths.py), probed instead of the first ``_PROBE_LAYERS`` when smaller:
    the probe looks for module names, which a layer's repeats add nothing to."""
    probe_layers = min(_PROBE_LAYERS, every_kind_within or _PROBE_LAYERS)
    key = (config.to_json_string(use_diff=False), trust_remote_code, probe_layers)
    if key not in _PROBED:
        if len(_PROBED) >= 64:
            _PROBED.clear()
        _PROBED[key] = _probe_weights_used_as_matrices(config, trust_remote_code, probe_layers)
    return _PROBED[key]


_PROBED: dict[tuple[str, bool, int], tuple[str, ...]] = {}


def _probe_weights_used_as_matrices(config: Any, trust_remote_code: bool,
                                    probe_layers: int = _PROBE_LAYERS) -> tuple[str, ...]:
    """Linear modules bitsandbytes would quantise whose weight the model's own code uses
    as a plain matrix (Mamba's ``dt_proj.weight @ x``): a quantised load of them fails at
    the first forward, so a plan leaves them unquantised (llm_int8_skip_modules).

    Asked of the model itself: a short meta forward of its first layers, marked quantised
    as a real load marks it (some models then call the module instead), records every op
    that takes such a weight outside the module's own forward. Returns module leaf names;
    () when the probe cannot run (the trace reports what fails).
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves
    from transformers.quantizers.quantizers_utils import should_convert_module

    from qplan.planner.components import _with_layers, num_layers
    from qplan.planner.inventory import _is_bnb_replaceable, _skip_modules, build_meta_model
    from qplan.planner.trace import trace_patches, use_static_experts

    depth = num_layers(config)
    probe_config = _with_layers(config, min(depth, probe_layers)) if depth else config
    try:
        model = build_meta_model(probe_config, trust_remote_code)
    except Exception:
        return ()
    skips = _skip_modules(model, None)
    watched: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if name and _is_bnb_replaceable(module) and should_convert_module(name, skips):
            watched[id(module.weight)] = (name, module)
    active: set[int] = set()
    found: set[str] = set()

    def enter(module: nn.Module, args: Any) -> None:
        active.add(id(module))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        active.discard(id(module))

    class Probe(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") not in _METADATA:
                for leaf in tree_leaves((args, kwargs)):
                    hit = watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                    if hit is not None and id(hit[1]) not in active:
                        found.add(hit[0].rpartition(".")[2])
            return func(*args, **kwargs)

    handles = []
    for _, module in watched.values():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    _mark_quantized(model)
    use_static_experts(model)
    ids = torch.empty((1, _PROBE_TOKENS), dtype=torch.long, device=META)
    model.eval()
    try:
        with torch.no_grad(), trace_patches("cuda", "sdpa"), Probe():
            model(input_ids=ids, use_cache=False)
    except Exception:
        return tuple(sorted(found))
    finally:
        for handle in handles:
            handle.remove()
    return tuple(sorted(found))
