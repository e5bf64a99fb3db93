"""The interface every quantisation method implements; the rest of qplan uses only this.

A method is one module in ``planner/quant/`` holding one ``QuantMethod`` subclass. The
precision table (``planner/precision.py``) names a method per row, with the row's own
settings (bits, quant type, double quantisation); everything a method needs beyond the row
comes in ``QuantSettings``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qplan.planner.inventory import Inventory, TensorInfo
    from qplan.planner.precision import Precision


@dataclass(frozen=True)
class StoredQuantization:
    """A checkpoint's own quantisation, read from its ``quantization_config`` (config.json)
    or ModelOpt's ``hf_quant_config.json``: what it loads as, without re-quantising.

    ``precision`` is the table row it loads as stored; ``dequantized`` the row transformers
    can dequantise it to at load (None: it cannot). ``not_converted`` is the checkpoint's
    list of modules kept unquantised (None: the method's defaults).
    """

    quant_method: str  # as the checkpoint names it ("awq", "fp8", "mxfp4", ...)
    method: str  # the method module that stores it
    precision: str
    bits: int
    group_size: int | None = None
    block_size: tuple[int, int] | None = None
    not_converted: tuple[str, ...] | None = None
    dequantized: str | None = None
    desc_act: bool = False
    quant_storage: str | None = None  # bitsandbytes 4-bit packing dtype
    scale_dtype: str = "float32"
    source: str = "config.json"
    loadable: bool = True  # False: transformers has no loader for it (plan is as stored)
    scheme: str | None = None  # the method's own format name (compressed-tensors "format")
    # Per replaced module: byte sizes of what it stores, when the method reads them off the
    # meta model its transformers quantiser prepared (``resolve_layout``).
    layouts: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.quant_method,
            "bits": self.bits,
            "group_size": self.group_size,
            "block_size": list(self.block_size) if self.block_size else None,
            "desc_act": self.desc_act,
            "unquantized_modules": list(self.not_converted) if self.not_converted else [],
            "source": self.source,
            "loads_as": self.precision,
            "dequantizes_to": self.dequantized,
            "transformers_loads_it": self.loadable,
            "format": self.scheme,
        }


@dataclass(frozen=True)
class QuantSettings:
    """How one candidate is loaded, beyond its precision row.

    ``compute_dtype`` is the dtype from_pretrained gets for quantised loads;
    ``quant_storage`` the dtype 4-bit values are packed in; ``skip_modules`` replaces the
    method's default list of modules left unquantised (None keeps transformers' default).
    """

    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] | None = None
    stored: StoredQuantization | None = None  # the checkpoint's own format, when it has one
    # Axolotl's quantize_moe_experts: fused 3-D expert parameters quantised too
    # (planner/moe_experts.py); only bitsandbytes reads it.
    moe_experts: bool = False


@dataclass(frozen=True)
class StoredWeight:
    """The tensor a replaced layer keeps in place of its weight (what FSDP shards)."""

    shape: tuple[int, ...]
    itemsize: int


class QuantMethod:
    """One way of storing Linear weights; subclasses override what differs.

    The defaults describe a method that replaces nothing (every weight stays in the load
    dtype), so an unquantised precision needs no overrides beyond ``name``.
    """

    name: ClassVar[str]
    # Library name shown to users and in errors (e.g. "bitsandbytes").
    library: ClassVar[str] = ""
    # Whether layers are replaced at all (False: plain dtype loads).
    quantizes: ClassVar[bool] = False
    # Training modes that can run on top of weights in this format.
    trainable: ClassVar[tuple[str, ...]] = ("lora", "full")

    # Pre-quantised formats without meta kernels: the workload is traced on the dequantised
    # model (same activations), and only the weights are swapped for the stored ones.
    traced_dequantized: ClassVar[bool] = False
    # Its replaced layers differ from plain Linears only in the tensors they hold and in
    # what their forward does inside: an inference step at a precision of this method is
    # derived from the plain row's (planner/derived_traces.py), not traced.
    replaces_linear_only: ClassVar[bool] = False

    # ----------------------------------------------------------------- checkpoints
    def read_checkpoint(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        """The stored format, when ``quantization_config`` is this method's (else None)."""
        return None

    def resolve_layout(self, stored: StoredQuantization, model: Any) -> StoredQuantization:
        """Fill in what needs the (meta) model; most methods need nothing."""
        return stored

    def gpu_note(self, stored: StoredQuantization, gpu: Any) -> tuple[bool, str] | None:
        """(stays quantised on ``gpu``, the sentence saying which) for formats transformers
        dequantises on some GPUs; None where the GPU does not matter."""
        return None

    # ----------------------------------------------------------------- sizes (pure)
    def replaces(self, t: TensorInfo, settings: QuantSettings | None = None) -> bool:
        """Whether the method stores tensor ``t`` (a module's weight) in its own layout."""
        return t.quantizable

    def stored_tensors(
        self, prec: Precision, t: TensorInfo, settings: QuantSettings
    ) -> tuple[int, ...]:
        """Byte sizes of what the method keeps in place of ``t``, the packed weight first."""
        out_f, in_f = t.linear_shape
        return self.layer_tensors(prec, out_f, in_f, settings)

    def bias_dtype(self, prec: Precision, settings: QuantSettings) -> str | None:
        """The dtype the replaced layers give their bias (None: the load dtype)."""
        return None

    def load_dtype(self, prec: Precision, compute_dtype: str) -> str:
        """The dtype everything the method leaves alone is loaded in."""
        return prec.full_dtype or compute_dtype

    def layer_tensors(
        self, prec: Precision, out_features: int, in_features: int, settings: QuantSettings
    ) -> tuple[int, ...]:
        """Byte sizes of the tensors one replaced Linear stores, weight first; bias excluded.
        The default is a method that replaces nothing: the weight in the load dtype."""
        return (out_features * in_features * self._load_itemsize(prec, settings),)

    def stored_weight(
        self, prec: Precision, out_features: int, in_features: int, settings: QuantSettings
    ) -> StoredWeight:
        """The tensor FSDP shards in place of a Linear's weight (default: the weight)."""
        return StoredWeight((out_features, in_features), self._load_itemsize(prec, settings))

    def stored_weight_of(self, prec: Precision, t: TensorInfo,
                         settings: QuantSettings) -> StoredWeight:
        """``stored_weight`` for the module weight ``t`` (layouts read off the model)."""
        out_f, in_f = t.linear_shape
        return self.stored_weight(prec, out_f, in_f, settings)

    def _load_itemsize(self, prec: Precision, settings: QuantSettings) -> int:
        from qplan.planner.precision import DTYPE_BYTES

        return DTYPE_BYTES[self.load_dtype(prec, settings.compute_dtype)]

    # ----------------------------------------------------------------- loading
    def load_kwargs(self, prec: Precision, settings: QuantSettings) -> dict[str, Any]:
        """from_pretrained keyword arguments, JSON-able."""
        return {"dtype": prec.full_dtype or settings.compute_dtype}

    def dequantize_kwargs(self, stored: StoredQuantization, dtype: str) -> dict[str, Any]:
        """from_pretrained kwargs (JSON-able) that load a checkpoint of this method dequantised."""
        return {"dtype": dtype, "quantization_config": {
            "quant_method": stored.quant_method, "dequantize": True}}

    def config_object(self, prec: Precision, settings: QuantSettings) -> Any:
        """The real ``quantization_config`` object (None when nothing is quantised)."""
        return None

    def check_available(self) -> None:
        """Raise a QplanError naming the fix when the backend cannot be imported."""

    def fsdp_quant_storage(self, prec: Precision, settings: QuantSettings) -> str:
        """The quant storage dtype FSDP needs to shard the stored weights like the rest."""
        return settings.quant_storage

    def max_memory_fraction(self) -> float:
        """The share of ``max_memory`` transformers' quantiser keeps (adjust_max_memory)."""
        return 1.0

    # ----------------------------------------------------------------- meta model
    def quantize_meta(
        self, model: nn.Module, inventory: Inventory, prec: Precision, settings: QuantSettings
    ) -> nn.Module:
        """Give the (already dtype-cast) meta model the layers a real load has."""
        return model

    @contextlib.contextmanager
    def trace_patches(self, target: str) -> Iterator[None]:
        """Patches the method's kernels need to run on meta tensors as on ``target``."""
        yield

    def clear_step_scratch(self, model: nn.Module) -> None:
        """Put back what a step leaves on the method's layers that every later step sets
        before reading it (scratch of the layer's last forward), as the layers held it when
        prepared: the prepared model then reads as unchanged and serves the next step of
        the same preparation (planner/prepared_models.py), which compares it in full."""

    def first_forward_casts(self, model: nn.Module) -> list[torch.Tensor]:
        """The frozen tensors of the method's layers whose data the layer's first forward
        replaces by a copy in another dtype, before anything reads them, and never again
        (bitsandbytes casts a bias to its input's dtype): a later optimizer step runs as
        the first one less those casts (planner/repeated_steps.py)."""
        return []

    # ----------------------------------------------------------------- snippets
    def emit_config(self, prec: Precision, settings: QuantSettings) -> tuple[str, list[str]]:
        """(import line, Python lines binding ``quantization_config``); empty when none."""
        return "", []

    def axolotl_keys(self, prec: Precision, settings: QuantSettings, lora: bool) -> dict[str, Any]:
        """The Axolotl keys that load this precision (adapter included)."""
        return {"adapter": "lora"} if lora else {}


class StoredFormat(QuantMethod, abc.ABC):
    """A checkpoint format peft has no LoRA layer for, whose kernels do not run on meta
    (MXFP4, FP8, compressed-tensors): training runs on its dequantised load, the workload
    is traced on the dequantised model and only the weights are the stored ones.

    Subclasses name the ``quant_method`` values they read (``reads``) and turn such a
    ``quantization_config`` into a ``StoredQuantization`` in ``read_stored``.
    """

    quantizes: ClassVar[bool] = True
    trainable: ClassVar[tuple[str, ...]] = ()
    traced_dequantized: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ()

    def read_checkpoint(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        if quantization_config.get("quant_method") not in self.reads:
            return None
        return self.read_stored(quantization_config)

    @abc.abstractmethod
    def read_stored(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        """The stored format a ``quantization_config`` of one of ``reads`` describes."""

    def stored_weight_of(self, prec: Precision, t: TensorInfo,
                         settings: QuantSettings) -> StoredWeight:
        # What sharding needs is the packed weight's size; stored formats know it per
        # module (compressed-tensors reads it off the meta model), not always by shape.
        return StoredWeight((self.stored_tensors(prec, t, settings)[0],), 1)

    def load_kwargs(self, prec: Precision, settings: QuantSettings) -> dict[str, Any]:
        # The checkpoint's own quantization_config applies; passing one would replace it.
        return {"dtype": settings.compute_dtype}
