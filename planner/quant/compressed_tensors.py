"""compressed-tensors checkpoints (llm-compressor): FP8, INT8 W8A8, W4A16 (pack-quantized),
NVFP4 and the other schemes its ``config_groups`` describe.

Which Linears are replaced and what each stores is decided by transformers' own
``CompressedTensorsHfQuantizer`` on a copy of the meta model: it applies the checkpoint's
quantisation config and compresses the layers with compressed-tensors' own compressor
(``weight_packed`` int32 / uint8, ``weight_scale``, ``weight_zero_point``,
``weight_global_scale``, ``weight_shape``...), exactly as a real load prepares the model
before the checkpoint tensors arrive. qplan reads those tensors' sizes per module, so every
scheme compressed-tensors knows is covered without a formula here. Needs the
``compressed-tensors`` package (the same one transformers needs to load the checkpoint).
Checked against a real CPU ``from_pretrained`` of tiny checkpoints in each format.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, ClassVar

from qplan.planner.quant.base import QuantSettings, StoredFormat, StoredQuantization
from qplan.planner.quant.checkpoint_helpers import cc_tuple, names

CT_FP8_MIN_CC = (8, 9)


class CompressedTensors(StoredFormat):
    name: ClassVar[str] = "compressed-tensors"
    library: ClassVar[str] = "compressed-tensors"
    # peft has no LoRA layer for compressed modules: train on the dequantised bf16 load.
    reads: ClassVar[tuple[str, ...]] = ("compressed-tensors",)

    def read_stored(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        groups = quantization_config.get("config_groups") or {}
        weights = next((g.get("weights") for g in groups.values() if g.get("weights")), {}) or {}
        return StoredQuantization(
            quant_method="compressed-tensors", method=self.name, precision="ct",
            bits=int(weights.get("num_bits") or 0),
            group_size=weights.get("group_size"),
            not_converted=names(quantization_config.get("ignore")),
            dequantized="bf16", scheme=str(quantization_config.get("format") or ""),
            scale_dtype=str(weights.get("type") or ""),
        )

    def resolve_layout(self, stored: StoredQuantization, model: Any) -> StoredQuantization:
        from dataclasses import replace

        return replace(stored, layouts=_layouts(model, getattr(model.config,
                                                               "quantization_config", None)))

    def gpu_note(self, stored: StoredQuantization, gpu: Any) -> tuple[bool, str] | None:
        cc = cc_tuple(getattr(gpu, "compute_capability", None))
        fp8 = stored.scale_dtype == "float" and stored.bits == 8
        if fp8 and cc is not None and cc >= CT_FP8_MIN_CC:
            return True, (f"on {gpu.name} FP8 matmuls can run natively "
                          "(CompressedTensorsConfig(use_optimized_inference=True))")
        return True, (f"loaded compressed ({stored.scheme}); compressed-tensors decompresses "
                      "layers when they run, or load with dequantize=True for the bf16 candidate")

    def replaces(self, t: Any, settings: QuantSettings | None = None) -> bool:
        stored = settings.stored if settings is not None else None
        return t.kind == "parameter" and t.name.endswith(".weight") and t.module in _table(stored)

    def stored_tensors(self, prec: Any, t: Any, settings: QuantSettings) -> tuple[int, ...]:
        return _table(settings.stored)[t.module]

    def check_available(self) -> None:
        from qplan.errors import QplanError

        try:
            import compressed_tensors  # noqa: F401
        except Exception as exc:
            raise QplanError(f"loading a compressed-tensors checkpoint needs the "
                             f"compressed-tensors package ({exc}); pip install compressed-tensors"
                             ) from exc


@functools.lru_cache(maxsize=8)
def _table(stored: StoredQuantization | None) -> dict[str, tuple[int, ...]]:
    return dict(stored.layouts) if stored is not None else {}


def _layouts(model: Any, quantization_config: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Per module the quantiser replaces, the byte sizes of its stored tensors (no bias)."""
    from transformers import CompressedTensorsConfig
    from transformers.quantizers.quantizer_compressed_tensors import (
        CompressedTensorsHfQuantizer,
    )

    from qplan.errors import ConfigError

    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ConfigError(
            "this checkpoint is stored with compressed-tensors; pip install compressed-tensors "
            "(transformers needs it to load the checkpoint too)"
        ) from None
    qc = quantization_config if isinstance(quantization_config, dict) else (
        quantization_config.to_dict())
    quantizer = CompressedTensorsHfQuantizer(
        CompressedTensorsConfig.from_dict(dict(qc)), pre_quantized=True)
    quantizer.use_fp8_kernel = False
    prepared = copy.deepcopy(model)
    quantizer._process_model_before_weight_loading(prepared)
    found = []
    for name, module in prepared.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        tensors = [
            (leaf, t) for leaf, t in (*module.named_parameters(recurse=False),
                                      *module.named_buffers(recurse=False))
            if leaf != "bias"
        ]
        if not tensors:
            continue
        # The weight (packed or not) first, as the other methods list it.
        tensors.sort(key=lambda item: not item[0].startswith("weight_packed")
                     and item[0] != "weight")
        found.append((name, tuple(t.numel() * t.element_size() for _, t in tensors)))
    return tuple(found)
