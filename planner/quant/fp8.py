"""FP8 (E4M3) weights with float32 scales: fine-grained block FP8 (DeepSeek-V3, Qwen3-FP8),
per-channel FBGEMM FP8, and ModelOpt's per-tensor FP8 (nvidia/*-FP8).

What transformers' ``FineGrainedFP8HfQuantizer`` builds per Linear (``FP8Linear``):
``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale_inv`` float32
``[ceil(out / b0), ceil(in / b1)]`` for block size ``(b0, b1)`` (a 0-d scale without one),
plus a 0-d ``activation_scale`` for static activation schemes. FBGEMM FP8
(``FbgemmFp8Linear``) keeps ``weight_scale`` float32 ``[out, 1]``, an ``input_scale_ub``
float32 ``[1]`` and a float32 bias. ModelOpt FP8 stores ``weight_scale`` and
``input_scale`` 0-d float32 per Linear; transformers has no ModelOpt loader, so that one is
planned as stored (what vLLM / TensorRT-LLM load).

Per GPU: FP8 weights stay FP8 on compute capability 8.9+ (Ada, Hopper, Blackwell);
elsewhere (and on CPU) transformers dequantises them to bf16 at load. The same row is the
on-the-fly FP8 candidate for plain checkpoints (``FineGrainedFP8Config``, 128x128 blocks,
weight-only with dynamic activations), offered on 8.9+ GPUs when named in --precisions.
Checked against the tensors transformers' own FP8Linear / FP8Experts modules allocate.
"""

from __future__ import annotations

from math import ceil
from typing import Any, ClassVar

from qplan.planner.quant.base import QuantSettings, StoredFormat, StoredQuantization
from qplan.planner.quant.checkpoint_helpers import cc_tuple, names

FP8_MIN_CC = (8, 9)
FP8_STORED = "fp8"
# FineGrainedFP8Config's default block size, used when quantising on the fly.
DEFAULT_BLOCK = (128, 128)


class Fp8(StoredFormat):
    name: ClassVar[str] = "fp8"
    library: ClassVar[str] = "transformers FP8"
    # peft has no LoRA layer for FP8Linear: train on the dequantised bf16 load.
    reads: ClassVar[tuple[str, ...]] = ("fp8", "fbgemm_fp8", "modelopt")

    def read_stored(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        method = quantization_config.get("quant_method")
        if method == "fp8":
            block = quantization_config.get("weight_block_size")
            return StoredQuantization(
                quant_method="fp8", method=self.name, precision=FP8_STORED, bits=8,
                block_size=(int(block[0]), int(block[1])) if block else None,
                not_converted=names(quantization_config.get("modules_to_not_convert")),
                dequantized="bf16",
                desc_act=quantization_config.get("activation_scheme") == "static",
            )
        if method == "fbgemm_fp8":
            return StoredQuantization(
                quant_method="fbgemm_fp8", method=self.name, precision=FP8_STORED, bits=8,
                block_size=(1, 0),  # one scale per output row
                not_converted=names(quantization_config.get("modules_to_not_convert")),
                dequantized=None,
            )
        if method == "modelopt" and str(quantization_config.get("quant_algo")).upper() == "FP8":
            return StoredQuantization(
                quant_method="modelopt", method=self.name, precision=FP8_STORED, bits=8,
                # hf_quant_config.json says exclude_modules; config.json (ModelOpt 0.4x) ignore.
                not_converted=names(quantization_config.get("exclude_modules")
                                    or quantization_config.get("ignore")),
                dequantized=None, desc_act=True, source="hf_quant_config.json", loadable=False,
            )
        return None

    def gpu_note(self, stored: StoredQuantization, gpu: Any) -> tuple[bool, str] | None:
        cc = cc_tuple(getattr(gpu, "compute_capability", None))
        if not stored.loadable:
            return True, (
                "transformers has no loader for ModelOpt FP8 checkpoints: planned as stored, "
                "which is what vLLM / TensorRT-LLM load"
            )
        if cc is not None and cc < FP8_MIN_CC:
            return False, (
                f"{gpu.name} (compute capability {gpu.compute_capability} < 8.9) has no FP8: "
                "transformers dequantises the weights to bf16 at load; planned as bf16"
            )
        return True, f"on {gpu.name} the FP8 weights stay FP8 (compute capability 8.9+)"

    def replaces(self, t: Any, settings: QuantSettings | None = None) -> bool:
        # replace_with_fp8_linear: every nn.Linear it converts, and fused MoE ``*.experts``
        # weights (FP8Experts), [experts, out, in] with a scale grid per expert.
        leaf = t.name.rpartition(".")[2]
        fused = (t.kind == "parameter" and t.module.endswith(".experts") and len(t.shape) == 3
                 and not leaf.endswith("bias"))
        return t.quantizable or fused

    def stored_tensors(self, prec: Any, t: Any, settings: QuantSettings) -> tuple[int, ...]:
        if len(t.shape) != 3:
            return super().stored_tensors(prec, t, settings)
        experts, out_f, in_f = t.shape
        weight, *scales = self.layer_tensors(prec, out_f, in_f, settings)
        return (experts * weight, *(experts * s for s in scales))

    def layer_tensors(
        self, prec: Any, out_features: int, in_features: int, settings: QuantSettings
    ) -> tuple[int, ...]:
        stored = settings.stored
        block = stored.block_size if stored is not None else DEFAULT_BLOCK
        weight = out_features * in_features
        if block is None:
            scales = (4,)  # 0-d float32 scale
        elif block == (1, 0):
            # FbgemmFp8Linear: weight_scale [out, 1] and the activation bound input_scale_ub [1].
            scales = (4 * out_features, 4)
        else:
            scales = (4 * ceil(out_features / block[0]) * ceil(in_features / block[1]),)
        static = (4,) if stored is not None and stored.desc_act else ()
        return (weight, *scales, *static)

    def bias_dtype(self, prec: Any, settings: QuantSettings) -> str | None:
        # FbgemmFp8Linear creates its bias in float32, and a load keeps a parameter's dtype.
        stored = settings.stored
        return "float32" if stored is not None and stored.block_size == (1, 0) else None

    def _on_the_fly_fields(self) -> dict[str, Any]:
        return {"quant_method": "fp8", "weight_block_size": list(DEFAULT_BLOCK),
                "activation_scheme": "dynamic"}

    def load_kwargs(self, prec: Any, settings: QuantSettings) -> dict[str, Any]:
        if settings.stored is not None:
            # The checkpoint's own quantization_config applies; passing one would replace it.
            return {"dtype": settings.compute_dtype}
        return {"dtype": settings.compute_dtype, "quantization_config": self._on_the_fly_fields()}

    def config_object(self, prec: Any, settings: QuantSettings) -> Any:
        if settings.stored is not None:
            return None
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config(weight_block_size=DEFAULT_BLOCK, activation_scheme="dynamic")

    def emit_config(self, prec: Any, settings: QuantSettings) -> tuple[str, list[str]]:
        if settings.stored is not None:
            return "", []
        return "FineGrainedFP8Config", [
            "quantization_config = FineGrainedFP8Config(",
            f"    weight_block_size={DEFAULT_BLOCK!r},",
            '    activation_scheme="dynamic",',
            ")",
        ]
