"""bitsandbytes 0.50: LLM.int8 and 4-bit (fp4 / nf4, optionally double-quantised).

The storage layout is what a real ``from_pretrained(..., quantization_config=...)`` leaves
in memory, tensor by tensor, so that sums of these sizes equal sums of real storages:

* LLM.int8: the int8 weight [out, in] and ``SCB`` float32 [out].
* 4-bit (fp4 and nf4 store the same): the packed weight ``ceil(n / (2 * itemsize))``
  elements of ``quant_storage`` (uint8 by default), ``absmax`` float32 ``ceil(n / 64)``,
  and a per-layer 16-entry float32 quant map (``code``).
* 4-bit with double quantisation (``compress_statistics``): ``absmax`` becomes uint8,
  plus a 0-d float32 ``offset``, a nested float32 absmax of ``ceil(ceil(n / 64) / 256)``
  values and a nested 256-entry float32 quant map, all separate tensors per layer.

Which Linears are replaced is transformers' own ``replace_with_bnb_linear`` with the skip
list its quantiser computes; the meta layers carry meta tensors shaped like a real load's,
so the model runs forward and backward on meta through the real bitsandbytes code.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from math import ceil
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qplan.planner.patching import once_per_object, source_digest, swapped
from qplan.planner.quant.base import (
    QuantMethod,
    QuantSettings,
    StoredQuantization,
    StoredWeight,
)

if TYPE_CHECKING:
    from torch import nn

    from qplan.planner.inventory import Inventory
    from qplan.planner.precision import Precision

# bitsandbytes 0.50 uses a blocksize of 64 for 4-bit quantisation on every backend.
BNB_4BIT_BLOCKSIZE = 64
# Double quantisation quantises absmax in blocks of 256.
BNB_NESTED_BLOCKSIZE = 256
# transformers' bitsandbytes quantisers shrink max_memory to 90% (adjust_max_memory).
BNB_MAX_MEMORY_FRACTION = 0.90

_ITEMSIZE = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4}
META = torch.device("meta")


def int8_layer_tensors(out_features: int, in_features: int) -> tuple[int, ...]:
    """Byte sizes of the tensors one LLM.int8 Linear stores (weight, SCB); bias excluded."""
    return (out_features * in_features, 4 * out_features)


def four_bit_layer_tensors(
    numel: int, *, double_quant: bool, quant_storage_bytes: int = 1
) -> tuple[int, ...]:
    """Byte sizes of the tensors one 4-bit Linear of ``numel`` weights stores; bias excluded.

    The packed weight holds two 4-bit values per byte, stored in elements of
    ``quant_storage`` (so a bf16 quant storage packs four values per element).
    """
    packed = ceil(numel / (2 * quant_storage_bytes)) * quant_storage_bytes
    blocks = ceil(numel / BNB_4BIT_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return (packed, 4 * blocks, code)
    nested_blocks = ceil(blocks / BNB_NESTED_BLOCKSIZE)
    # absmax (uint8), offset (0-d float32), nested absmax (float32), nested code, code
    return (packed, blocks, 4, 4 * nested_blocks, 256 * 4, code)


def _fused_expert(t: Any) -> bool:
    from qplan.planner.moe_experts import is_fused_expert

    return t.kind == "parameter" and is_fused_expert(t.name, t.shape)


def _meta(shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


# sha256 of the source of the layer forwards that cast their bias before reading it
# (bitsandbytes 0.50.2: Linear4bit.forward, Linear8bitLt.forward); another version's
# layers are not assumed to (planner/repeated_steps.py then runs every step).
BIAS_CASTING_FORWARDS = frozenset({
    "d52cf63457717cc718ca0a449dad0967171e679be90d5d2adcafe2e8a141093d",
    "d3f4146d34e7100027694d30fa36bac6c8691c244f865a15ff55e3c462b12665",
})


@once_per_object
def _casts_bias_first(forward: Any) -> bool:
    return source_digest(forward) in BIAS_CASTING_FORWARDS


class BitsAndBytes(QuantMethod):
    name: ClassVar[str] = "bitsandbytes"
    library: ClassVar[str] = "bitsandbytes"
    quantizes: ClassVar[bool] = True
    # peft trains LoRA on Linear4bit / Linear8bitLt; the packed weights themselves cannot be.
    trainable: ClassVar[tuple[str, ...]] = ("lora",)
    # Linear4bit / Linear8bitLt hold other tensors and run other ops in their forward;
    # everything around them runs as in the compute dtype's model.
    replaces_linear_only: ClassVar[bool] = True

    # ----------------------------------------------------------------- checkpoints
    def read_checkpoint(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        """A checkpoint bitsandbytes already quantised (e.g. unsloth's *-bnb-4bit)."""
        from qplan.planner.precision import find_precision

        qc = quantization_config
        if qc.get("quant_method") != "bitsandbytes":
            return None
        skips = qc.get("llm_int8_skip_modules")
        skip_names = tuple(skips) if skips else None
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            quant_type = str(qc.get("bnb_4bit_quant_type", "fp4"))
            double = bool(qc.get("bnb_4bit_use_double_quant", False))
            row = find_precision(self.name, bits=4, quant_type=quant_type, double_quant=double)
            storage = str(qc.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
            return StoredQuantization(
                quant_method="bitsandbytes", method=self.name, precision=row or "nf4", bits=4,
                group_size=BNB_4BIT_BLOCKSIZE, not_converted=skip_names,
                quant_storage=storage, desc_act=double,
            )
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            return StoredQuantization(
                quant_method="bitsandbytes", method=self.name, precision="int8", bits=8,
                not_converted=skip_names,
            )
        return None

    # ----------------------------------------------------------------- sizes
    def replaces(self, t: Any, settings: QuantSettings | None = None) -> bool:
        return t.quantizable or (settings is not None and settings.moe_experts
                                 and _fused_expert(t))

    def stored_tensors(
        self, prec: Precision, t: Any, settings: QuantSettings
    ) -> tuple[int, ...]:
        if not (settings.moe_experts and _fused_expert(t)):
            return super().stored_tensors(prec, t, settings)
        from qplan.planner.moe_experts import int8_expert_tensors

        if prec.quant_type == "int8":
            return int8_expert_tensors(t.shape)
        # replace_parameter_4bit packs into uint8 whatever bnb_4bit_quant_storage says.
        return four_bit_layer_tensors(t.numel, double_quant=prec.double_quant)

    def stored_weight_of(self, prec: Precision, t: Any, settings: QuantSettings) -> StoredWeight:
        if not (settings.moe_experts and _fused_expert(t)):
            return super().stored_weight_of(prec, t, settings)
        packed = self.stored_tensors(prec, t, settings)[0]
        return StoredWeight(t.shape if prec.quant_type == "int8" else (packed, 1), 1)

    def layer_tensors(
        self, prec: Precision, out_features: int, in_features: int, settings: QuantSettings
    ) -> tuple[int, ...]:
        if prec.quant_type == "int8":
            return int8_layer_tensors(out_features, in_features)
        return four_bit_layer_tensors(
            out_features * in_features,
            double_quant=prec.double_quant,
            quant_storage_bytes=_ITEMSIZE[settings.quant_storage],
        )

    def stored_weight(
        self, prec: Precision, out_features: int, in_features: int, settings: QuantSettings
    ) -> StoredWeight:
        if prec.quant_type == "int8":
            return StoredWeight((out_features, in_features), 1)
        itemsize = _ITEMSIZE[settings.quant_storage]
        packed = self.layer_tensors(prec, out_features, in_features, settings)[0] // itemsize
        return StoredWeight((packed, 1), itemsize)

    # ----------------------------------------------------------------- loading
    def _config_fields(self, prec: Precision, settings: QuantSettings) -> dict[str, Any]:
        """BitsAndBytesConfig arguments, JSON-able (dtypes as names)."""
        fields: dict[str, Any]
        if prec.quant_type == "int8":
            fields = {"load_in_8bit": True}
        else:
            fields = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": prec.quant_type,
                "bnb_4bit_use_double_quant": prec.double_quant,
                "bnb_4bit_compute_dtype": settings.compute_dtype,
                "bnb_4bit_quant_storage": settings.quant_storage,
            }
        if settings.skip_modules is not None:
            fields["llm_int8_skip_modules"] = list(settings.skip_modules)
        return fields

    def load_kwargs(self, prec: Precision, settings: QuantSettings) -> dict[str, Any]:
        return {
            "dtype": settings.compute_dtype,
            "quantization_config": self._config_fields(prec, settings),
        }

    def config_object(self, prec: Precision, settings: QuantSettings) -> Any:
        from transformers import BitsAndBytesConfig

        fields = self._config_fields(prec, settings)
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if key in fields:
                fields[key] = getattr(torch, fields[key])
        return BitsAndBytesConfig(**fields)

    def check_available(self) -> None:
        from qplan.errors import QplanError

        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:
            raise QplanError(
                f"bitsandbytes is not usable ({type(exc).__name__}: {exc}); install "
                "bitsandbytes>=0.50 or pick an unquantised precision (bf16, fp16, fp32)"
            ) from exc

    def fsdp_quant_storage(self, prec: Precision, settings: QuantSettings) -> str:
        # FSDP flattens parameters of one dtype; packed 4-bit weights must share the
        # compute dtype to shard with the rest (bnb_4bit_quant_storage).
        return settings.compute_dtype if prec.is_4bit else settings.quant_storage

    def max_memory_fraction(self) -> float:
        return BNB_MAX_MEMORY_FRACTION

    # ----------------------------------------------------------------- meta model
    def quantize_meta(
        self, model: nn.Module, inventory: Inventory, prec: Precision, settings: QuantSettings
    ) -> nn.Module:
        from qplan.planner.bnb_import import import_bitsandbytes

        import_bitsandbytes()  # before transformers' integration imports it the slow way
        import bitsandbytes as bnb
        from torch import nn
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        skips = list(inventory.skip_modules)
        config = self.config_object(prec, QuantSettings(
            settings.compute_dtype, settings.quant_storage, tuple(skips)))
        replace_with_bnb_linear(model, modules_to_not_convert=skips, quantization_config=config)
        compute = getattr(torch, settings.compute_dtype)
        storage = getattr(torch, settings.quant_storage)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.weight = _four_bit_weight(module, prec, compute, storage)
                module.compute_dtype = compute
            elif isinstance(module, bnb.nn.Linear8bitLt):
                module.weight = _int8_weight(module)
            else:
                continue
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.data.to(compute), requires_grad=False)
        if settings.moe_experts:
            from qplan.planner.moe_experts import quantize_fused_experts

            quantize_fused_experts(model, prec)  # Axolotl's quantize_moe_experts
        # What transformers sets after a bnb load; peft reads these to pick its k-bit paths.
        model.is_loaded_in_4bit = prec.is_4bit
        model.is_loaded_in_8bit = prec.quant_type == "int8"
        model.is_quantized = True
        model.quantization_method = "bitsandbytes"
        model.config.quantization_config = config
        return model

    @contextlib.contextmanager
    def trace_patches(self, target: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_int8_quant_without_outliers())
            if target == "cpu":
                stack.enter_context(_int8_cpu_training_path())
            yield

    def clear_step_scratch(self, model: nn.Module) -> None:
        # LLM.int8's forward first sets its matmul state's training flag (a prepared
        # state reads the class default), then stores its input's outlier columns
        # (``state.idx = outlier_cols``, with a threshold), read only by its own backward:
        # neither value of the previous step is ever read.
        if not getattr(model, "is_loaded_in_8bit", False):  # set by quantize_meta
            return
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                module.state.__dict__.pop("is_training", None)
                module.state.idx = None

    def first_forward_casts(self, model: nn.Module) -> list[torch.Tensor]:
        # Linear4bit and Linear8bitLt set ``bias.data = bias.data.to(x.dtype)`` where the
        # bias's dtype is not their input's, before anything reads the bias (k-bit
        # preparation makes biases float32, the input is the compute dtype): once, on
        # their first forward. Only the forwards read here are taken at their word.
        if not (getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False)):  # set by quantize_meta
            return []
        import bitsandbytes as bnb

        return [module.bias for module in model.modules()
                if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
                and module.bias is not None and not module.bias.requires_grad
                and _casts_bias_first(type(module).forward)]

    # ----------------------------------------------------------------- snippets
    def emit_config(self, prec: Precision, settings: QuantSettings) -> tuple[str, list[str]]:
        skip = (
            [f"    llm_int8_skip_modules={json.dumps(list(settings.skip_modules))},"]
            if settings.skip_modules is not None else []
        )
        if prec.quant_type == "int8":
            if not skip:
                return "BitsAndBytesConfig", [
                    "quantization_config = BitsAndBytesConfig(load_in_8bit=True)"
                ]
            return "BitsAndBytesConfig", [
                "quantization_config = BitsAndBytesConfig(", "    load_in_8bit=True,", *skip, ")"
            ]
        return "BitsAndBytesConfig", [
            "quantization_config = BitsAndBytesConfig(",
            "    load_in_4bit=True,",
            f'    bnb_4bit_quant_type="{prec.quant_type}",',
            f"    bnb_4bit_use_double_quant={prec.double_quant},",
            f"    bnb_4bit_compute_dtype=torch.{settings.compute_dtype},",
            f"    bnb_4bit_quant_storage=torch.{settings.quant_storage},",
            *skip,
            ")",
        ]

    def axolotl_keys(self, prec: Precision, settings: QuantSettings, lora: bool) -> dict[str, Any]:
        if prec.quant_type == "int8":
            return {"load_in_8bit": True, "adapter": "lora"}
        # Axolotl's QLoRA defaults are nf4, double quant and bf16 quant storage; spell out
        # what the plan used so Axolotl loads exactly that.
        kwargs: dict[str, Any] = {
            "bnb_4bit_quant_type": prec.quant_type,
            "bnb_4bit_use_double_quant": prec.double_quant,
            "bnb_4bit_quant_storage": settings.quant_storage,
        }
        if settings.skip_modules is not None:
            kwargs["llm_int8_skip_modules"] = list(settings.skip_modules)
        return {"load_in_4bit": True, "adapter": "qlora", "bnb_config_kwargs": kwargs}


def _four_bit_weight(module: Any, prec: Any, compute: torch.dtype, storage: torch.dtype) -> Any:
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    out_f, in_f = module.out_features, module.in_features
    numel = out_f * in_f
    itemsize = _ITEMSIZE[str(storage).removeprefix("torch.")]
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


@contextlib.contextmanager
def _int8_cpu_training_path() -> Iterator[None]:
    """bitsandbytes trains LLM.int8 layers on CPU through MatMul8bitFp (dequantise, then
    matmul); on meta it would take the CUDA path, so route meta tensors the CPU way."""
    try:
        import bitsandbytes
        from bitsandbytes.autograd import _functions
    except ImportError:
        yield
        return
    original = bitsandbytes.matmul

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        if A.device.type == "meta" and state is not None and state.is_training:
            return _functions.MatMul8bitFp.apply(A, B, out, bias, state)
        return original(A, B, out=out, state=state, threshold=threshold, bias=bias)

    with swapped((bitsandbytes, "matmul", matmul)):
        yield


@contextlib.contextmanager
def _int8_quant_without_outliers() -> Iterator[None]:
    """LLM.int8's activation quantiser returns the outlier columns, a data-dependent
    count; the trace assumes none (outliers add only small temporaries)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        yield
        return
    original = bnb_functional.int8_vectorwise_quant

    def quantize(A: torch.Tensor, threshold: float = 0.0):
        if A.device.type != "meta":
            return original(A, threshold)
        rows = A.numel() // A.shape[-1]
        outliers = None if threshold == 0.0 else A.new_empty(0, dtype=torch.int64)
        return (torch.empty(A.shape, dtype=torch.int8, device=A.device),
                torch.empty(rows, dtype=torch.float32, device=A.device), outliers)

    namespace = torch.ops.bitsandbytes
    original_mixed = namespace.int8_mixed_scaled_mm

    def mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
        if A.device.type != "meta":
            return original_mixed(A, CA, CB, SCA, SCB, outlier_cols, bias)
        out = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias,
                                                            dtype=A.dtype)
        return out, None

    with swapped((bnb_functional, "int8_vectorwise_quant", quantize),
                 (namespace, "int8_mixed_scaled_mm", mixed_scaled_mm)):
        yield
