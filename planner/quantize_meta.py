"""Turn a meta model into what ``from_pretrained`` would load at a precision, still on meta.

Linear layers are replaced with transformers' own ``replace_with_bnb_linear`` (the same
skip list a real load uses), then each bitsandbytes weight gets meta tensors shaped exactly
like a real load's: the packed 4-bit weight and its ``QuantState`` (absmax, quant map, and
for double quantisation the offset and nested state), or LLM.int8's int8 weight and SCB.
Everything else takes the dtype transformers would give it. The result runs forward and
backward on meta tensors through the real bitsandbytes code (its ops have fake kernels).
"""

from __future__ import annotations

from math import ceil
from typing import Any

import torch
from torch import nn

from qplan.planner.inventory import Inventory
from qplan.planner.precision import (
    BNB_4BIT_BLOCKSIZE,
    BNB_NESTED_BLOCKSIZE,
    DTYPE_BYTES,
    PRECISIONS,
)
from qplan.planner.weights import load_dtype_for, param_dtype

META = torch.device("meta")


def bnb_config(precision: str, compute_dtype: str, quant_storage: str = "uint8",
               skip_modules: list[str] | None = None) -> Any:
    """The BitsAndBytesConfig a real load of ``precision`` uses (None when unquantised)."""
    from transformers import BitsAndBytesConfig

    prec = PRECISIONS[precision]
    if not prec.quantized:
        return None
    if prec.quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=prec.quant_type,
        bnb_4bit_use_double_quant=prec.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
        llm_int8_skip_modules=skip_modules,
    )


def _meta(shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _four_bit_weight(module: Any, prec: Any, compute: torch.dtype, storage: torch.dtype) -> Any:
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    out_f, in_f = module.out_features, module.in_features
    numel = out_f * in_f
    itemsize = DTYPE_BYTES[str(storage).removeprefix("torch.")]
    blocks = ceil(numel / BNB_4BIT_BLOCKSIZE)
    code = _meta(16, torch.float32)
    if prec.double_quant:
        nested = QuantState(
            absmax=_meta(ceil(blocks / BNB_NESTED_BLOCKSIZE), torch.float32),
            code=_meta(256, torch.float32),
            blocksize=BNB_NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
        state = QuantState(
            absmax=_meta(blocks, torch.uint8), shape=torch.Size([out_f, in_f]), code=code,
            blocksize=BNB_4BIT_BLOCKSIZE, quant_type=prec.quant_type, dtype=compute,
            offset=_meta((), torch.float32), state2=nested,
        )
    else:
        state = QuantState(
            absmax=_meta(blocks, torch.float32), shape=torch.Size([out_f, in_f]), code=code,
            blocksize=BNB_4BIT_BLOCKSIZE, quant_type=prec.quant_type, dtype=compute,
        )
    packed = _meta((ceil(numel / (2 * itemsize)), 1), storage)
    return bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=BNB_4BIT_BLOCKSIZE,
        compress_statistics=prec.double_quant, quant_type=prec.quant_type,
        quant_storage=storage, bnb_quantized=True, module=module,
    )


def _int8_weight(module: Any) -> Any:
    import bitsandbytes as bnb

    out_f, in_f = module.out_features, module.in_features
    weight = bnb.nn.Int8Params(_meta((out_f, in_f), torch.int8), requires_grad=False,
                               has_fp16_weights=False)
    weight.SCB = _meta(out_f, torch.float32)
    # What Linear8bitLt.init_8bit_state leaves after the first forward of a real load:
    # the int8 weight and its scales referenced from the matmul state.
    module.state.CB = weight.data
    module.state.SCB = weight.SCB
    return weight


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
    if not prec.quantized:
        return model

    from qplan.planner.bnb_import import import_bitsandbytes

    import_bitsandbytes()  # before transformers' integration imports it the slow way
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    config = bnb_config(precision, compute_dtype, quant_storage, list(inventory.skip_modules))
    replace_with_bnb_linear(model, modules_to_not_convert=list(inventory.skip_modules),
                            quantization_config=config)
    compute = getattr(torch, compute_dtype)
    storage = getattr(torch, quant_storage)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = _four_bit_weight(module, prec, compute, storage)
            module.compute_dtype = compute
        elif isinstance(module, bnb.nn.Linear8bitLt):
            module.weight = _int8_weight(module)
        else:
            continue
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data.to(getattr(torch, load_dtype)),
                                       requires_grad=False)
    # What transformers sets after a bnb load; peft reads these to pick its k-bit paths.
    model.is_loaded_in_4bit = prec.is_4bit
    model.is_loaded_in_8bit = prec.quant_type == "int8"
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    model.config.quantization_config = config
    _mark_quantized(model)
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


def weights_used_as_matrices(config: Any, trust_remote_code: bool = False) -> tuple[str, ...]:
    """See _probe_weights_used_as_matrices; remembered per config (one probe per model,
    however many precisions and workloads are planned)."""
    key = (config.to_json_string(use_diff=False), trust_remote_code)
    if key not in _PROBED:
        if len(_PROBED) >= 64:
            _PROBED.clear()
        _PROBED[key] = _probe_weights_used_as_matrices(config, trust_remote_code)
    return _PROBED[key]


_PROBED: dict[tuple[str, bool], tuple[str, ...]] = {}


def _probe_weights_used_as_matrices(config: Any, trust_remote_code: bool) -> tuple[str, ...]:
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
    probe_config = _with_layers(config, min(depth, _PROBE_LAYERS)) if depth else config
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
