"""GPTQ and AWQ: integer weights packed into int32 with per-group float16 scales and zeros.

What the GPTQ (gptqmodel) ``QuantLinear`` keeps per Linear of ``[out, in]`` at ``bits``
with group size ``g`` (``-1``: one group): ``qweight`` int32 ``[in * bits / 32, out]``,
``qzeros`` int32 ``[ceil(in / g), out * bits / 32]``, ``scales`` float16
``[ceil(in / g), out]`` and ``g_idx`` int32 ``[in]`` (always stored, desc_act or not).
AWQ's GEMM layout packs along the output instead: ``qweight`` int32 ``[in, out * bits / 32]``,
``qzeros`` int32 ``[ceil(in / g), out * bits / 32]``, ``scales`` float16
``[ceil(in / g), out]``, and no ``g_idx``. Everything else loads in float16 (the AWQ
quantiser forces it on CUDA). Both backends need gptqmodel, which does not pip-install
here, so both are checked against the tensors their packers store (safetensors headers of
published checkpoints). LoRA trains on top through peft's GPTQ / AWQ layers.
"""

from __future__ import annotations

from math import ceil
from typing import Any, ClassVar

from qplan.planner.quant.base import QuantMethod, QuantSettings, StoredQuantization, StoredWeight
from qplan.planner.quant.checkpoint_helpers import names


def _groups(in_features: int, group_size: int | None) -> int:
    if not group_size or group_size <= 0:
        return 1
    return ceil(in_features / group_size)


class Gptq(QuantMethod):
    name: ClassVar[str] = "gptq"
    library: ClassVar[str] = "gptqmodel"
    quantizes: ClassVar[bool] = True
    trainable: ClassVar[tuple[str, ...]] = ("lora",)
    traced_dequantized: ClassVar[bool] = True
    has_g_idx: ClassVar[bool] = True

    def read_checkpoint(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        if quantization_config.get("quant_method") != self.name:
            return None
        bits = int(quantization_config.get("bits", 4))
        skip = quantization_config.get("modules_to_not_convert")
        return StoredQuantization(
            quant_method=self.name, method=self.name, precision=self.name, bits=bits,
            group_size=int(quantization_config.get("group_size", 128)),
            not_converted=names(skip), desc_act=bool(quantization_config.get("desc_act")),
            scale_dtype="float16",
        )

    def load_dtype(self, prec: Any, compute_dtype: str) -> str:
        return "float16"

    def layer_tensors(
        self, prec: Any, out_features: int, in_features: int, settings: QuantSettings
    ) -> tuple[int, ...]:
        stored = settings.stored
        bits = stored.bits if stored is not None else 4
        groups = _groups(in_features, stored.group_size if stored is not None else 128)
        packed = self.packed_bytes(out_features, in_features, bits)
        zeros = groups * ceil(out_features * bits / 32) * 4
        scales = groups * out_features * 2
        g_idx = (in_features * 4,) if self.has_g_idx else ()
        return (packed, zeros, scales, *g_idx)

    def packed_shape(self, out_features: int, in_features: int, bits: int) -> tuple[int, int]:
        """``qweight``: int32 ``[in * bits / 32, out]`` (packed along the input)."""
        return ceil(in_features * bits / 32), out_features

    def packed_bytes(self, out_features: int, in_features: int, bits: int) -> int:
        rows, cols = self.packed_shape(out_features, in_features, bits)
        return rows * cols * 4

    def stored_weight(
        self, prec: Any, out_features: int, in_features: int, settings: QuantSettings
    ) -> StoredWeight:
        bits = settings.stored.bits if settings.stored is not None else 4
        return StoredWeight(self.packed_shape(out_features, in_features, bits), 4)

    def load_kwargs(self, prec: Any, settings: QuantSettings) -> dict[str, Any]:
        return {"dtype": "float16"}

    def check_available(self) -> None:
        from qplan.errors import QplanError

        try:
            import gptqmodel  # noqa: F401
        except Exception as exc:
            raise QplanError(
                f"loading a {self.name.upper()} checkpoint needs gptqmodel ({exc}); "
                "pip install gptqmodel on a CUDA machine"
            ) from exc


class Awq(Gptq):
    name: ClassVar[str] = "awq"
    has_g_idx: ClassVar[bool] = False

    def packed_shape(self, out_features: int, in_features: int, bits: int) -> tuple[int, int]:
        """AWQ's GEMM ``qweight``: int32 ``[in, out * bits / 32]`` (packed along the output)."""
        return in_features, ceil(out_features * bits / 32)
