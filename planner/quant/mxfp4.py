"""MXFP4 (gpt-oss): MoE expert weights stored as 4-bit E2M1 values in blocks of 32 with
one shared E8M0 exponent per block.

What transformers' ``Mxfp4HfQuantizer`` keeps per expert projection (``[experts, out, in]``):
``*_blocks`` uint8 ``[experts, out, in / 32, 16]`` (two values a byte) and ``*_scales``
uint8 ``[experts, out, in / 32]``; attention, router, embeddings and lm_head stay in the
load dtype (the checkpoint's ``modules_to_not_convert``). Only ``GptOssExperts`` weights are
replaced (``replace_with_mxfp4_linear``).

Per GPU: the quantiser keeps MXFP4 on CUDA GPUs of compute capability 7.5 or newer when
triton >= 3.4 and the ``kernels`` package are installed; otherwise it dequantises the experts
to bf16 at load. The kernels do not run on meta, so the workload is traced on the
dequantised model and the weights swapped for the stored ones. Checked against: the
published checkpoint size (stored layout); the dequantised bf16 load against a real CPU load.
"""

from __future__ import annotations

from math import ceil
from typing import TYPE_CHECKING, Any, ClassVar

from qplan.planner.quant.base import QuantSettings, StoredFormat, StoredQuantization
from qplan.planner.quant.checkpoint_helpers import cc_tuple, names

if TYPE_CHECKING:
    from qplan.planner.inventory import TensorInfo
    from qplan.planner.precision import Precision

MXFP4_BLOCK = 32
# Mxfp4HfQuantizer.validate_environment: CUDA compute capability for the triton kernels.
MXFP4_MIN_CC = (7, 5)
EXPERT_MODULES = ("GptOssExperts",)
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


class Mxfp4(StoredFormat):
    name: ClassVar[str] = "mxfp4"
    library: ClassVar[str] = "transformers MXFP4 (triton kernels)"
    # peft has no LoRA layer for Mxfp4GptOssExperts: train on the dequantised bf16 load.
    reads: ClassVar[tuple[str, ...]] = ("mxfp4",)

    def read_stored(self, quantization_config: dict[str, Any]) -> StoredQuantization | None:
        return StoredQuantization(
            quant_method="mxfp4", method=self.name, precision="mxfp4", bits=4,
            group_size=MXFP4_BLOCK,
            not_converted=names(quantization_config.get("modules_to_not_convert")),
            dequantized="bf16", scale_dtype="uint8",
        )

    def gpu_note(self, stored: StoredQuantization, gpu: Any) -> tuple[bool, str] | None:
        cc = cc_tuple(getattr(gpu, "compute_capability", None))
        if cc is not None and cc < MXFP4_MIN_CC:
            return False, (
                f"{gpu.name} (compute capability {gpu.compute_capability} < 7.5): transformers "
                "dequantises the MXFP4 experts to bf16 at load; planned as bf16"
            )
        return True, (
            f"on {gpu.name} the experts stay MXFP4 when triton >= 3.4 and the `kernels` "
            "package are installed (pip install kernels triton); without them transformers "
            "dequantises them to bf16 at load: see the bf16 candidate"
        )

    def replaces(self, t: TensorInfo, settings: QuantSettings | None = None) -> bool:
        leaf = t.name.rpartition(".")[2]
        return t.module_type in EXPERT_MODULES and leaf in EXPERT_WEIGHTS and len(t.shape) == 3

    def stored_tensors(
        self, prec: Precision, t: TensorInfo, settings: QuantSettings
    ) -> tuple[int, ...]:
        experts, a, b = t.shape
        # GptOssExperts keeps [experts, in, out]; the checkpoint packs along "in" per row.
        in_f, out_f = a, b
        groups = ceil(in_f / MXFP4_BLOCK)
        return (experts * out_f * groups * MXFP4_BLOCK // 2, experts * out_f * groups)

    def layer_tensors(
        self, prec: Precision, out_features: int, in_features: int, settings: QuantSettings
    ) -> tuple[int, ...]:
        groups = ceil(in_features / MXFP4_BLOCK)
        return (out_features * groups * MXFP4_BLOCK // 2, out_features * groups)
