"""The interface every quantisation method implements; the rest of qplan uses only this.

A method is one module in ``planner/quant/`` holding one ``QuantMethod`` subclass. The
precision table (``planner/precision.py``) names a method per row, with the row's own
settings (bits, quant type, double quantisation); everything a method needs beyond the row
comes in ``QuantSettings``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from qplan.planner.inventory import Inventory
    from qplan.planner.precision import Precision


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

    # ----------------------------------------------------------------- sizes (pure)
    def layer_tensors(
        self, prec: Precision, out_features: int, in_features: int, settings: QuantSettings
    ) -> tuple[int, ...]:
        """Byte sizes of the tensors one replaced Linear stores, weight first; bias excluded."""
        raise NotImplementedError(f"{self.name} replaces no layers")

    def stored_weight(
        self, prec: Precision, out_features: int, in_features: int, settings: QuantSettings
    ) -> StoredWeight:
        raise NotImplementedError(f"{self.name} replaces no layers")

    # ----------------------------------------------------------------- loading
    def load_kwargs(self, prec: Precision, settings: QuantSettings) -> dict[str, Any]:
        """from_pretrained keyword arguments, JSON-able."""
        return {"dtype": prec.full_dtype or settings.compute_dtype}

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

    # ----------------------------------------------------------------- snippets
    def emit_config(self, prec: Precision, settings: QuantSettings) -> tuple[str, list[str]]:
        """(import line, Python lines binding ``quantization_config``); empty when none."""
        return "", []

    def axolotl_keys(self, prec: Precision, settings: QuantSettings, lora: bool) -> dict[str, Any]:
        """The Axolotl keys that load this precision (adapter included)."""
        return {"adapter": "lora"} if lora else {}
