"""The run's own optimizer under DeepSpeed ZeRO: its states over ZeRO's flat fp32 partitions.

DeepSpeed's model-state estimate (18 B per trainable parameter sharded) assumes Adam's two
fp32 states. A Hugging Face / Axolotl run whose DeepSpeed config has no ``optimizer`` block
gives DeepSpeed the Trainer's optimizer (``zero_allow_untested_optimizer``), and ZeRO swaps
its parameters for flat float32 partitions of the master weights: the optimizer keeps its
states over those 1-D tensors, one per partition, whatever the parameters' shapes were. So
the states are what that optimizer allocates for a 1-D float32 tensor of the partition's
size, which differs from the single-GPU trace (Adafactor cannot factor a 1-D tensor;
torchao's low-bit states need a whole number of blocks; bitsandbytes' and torchao's keep
plain float32 states under 4,096 values).

Partitions per rank (DeepSpeed 0.16+):
* ZeRO-1/2 (``stage_1_and_2.py``): one flat tensor per parameter group, padded to a
  multiple of 2 x world size (``nccl_start_alignment_factor``), split evenly.
* ZeRO-3 (``stage3.py``): every parameter partitioned on its own (ceil(numel / world size)
  values per rank); the optimizer gets one flat tensor per sub-group of consecutive
  parameters, cut where a sub-group reaches ``sub_group_size`` values (0 in every ZeRO-3
  file Axolotl ships: one tensor per parameter; DeepSpeed's default 1e9).

The Trainer's two parameter groups (weight decay or not) come from transformers'
``get_decay_parameter_names`` (multi_gpu.py asks it on the meta model). Pure arithmetic
here; ``tests/test_parallel.py`` checks every rule against the real optimizers' states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import ceil

# Values under which bitsandbytes and torchao keep plain float32 states (min_8bit_size).
_QUANTISED_STATES_MIN = 4096
_FP32 = 4


def _adamw(n: int) -> int:
    # torch's fused AdamW (transformers' adamw_torch_fused): exp_avg, exp_avg_sq, a float32
    # step tensor.
    return 2 * _FP32 * n + _FP32


def _bnb_8bit(n: int) -> int:
    # bitsandbytes' blockwise 8-bit Adam: two uint8 states, a float32 absmax per 256 values
    # each and a 256-entry float32 quantile map each; no step tensor.
    if n < _QUANTISED_STATES_MIN:
        return 2 * _FP32 * n
    return 2 * (n + _FP32 * ceil(n / 256) + 256 * _FP32)


def _torchao(block: int, codes: Callable[[int], int], qmap: int) -> Callable[[int], int]:
    # torchao's AdamW8bit / AdamW4bit (_new_buffer): quantised only for 4,096+ values and a
    # whole number of blocks, else plain float32 states; a float32 step tensor either way.
    def states(n: int) -> int:
        if n >= _QUANTISED_STATES_MIN and n % block == 0:
            return 2 * (codes(n) + _FP32 * (n // block) + qmap * _FP32) + _FP32
        return 2 * _FP32 * n + _FP32

    return states


def _adafactor(n: int) -> int:
    # transformers' Adafactor on a 1-D tensor: no factoring, a full exp_avg_sq and an RMS
    # scalar (beta1 None: no momentum).
    return _FP32 * n + _FP32


FLAT_STATE_BYTES: dict[str, Callable[[int], int]] = {
    "adamw": _adamw,
    "adamw_8bit": _bnb_8bit,
    "paged_adamw_8bit": _bnb_8bit,
    "adamw_torch_8bit": _torchao(256, lambda n: n, 256),
    "adamw_torch_4bit": _torchao(128, lambda n: n // 2, 16),
    "sgd": lambda n: 0,  # momentum 0 (the Trainer's SGD): no state
    "adafactor": _adafactor,
}


def zero2_partitions(group_numels: Sequence[int], gpus: int) -> list[int]:
    """Values per rank of each parameter group's flat partition under ZeRO-1/2."""
    return [2 * ceil(n / (2 * gpus)) for n in group_numels if n]


def zero3_partitions(group_numels: Sequence[Sequence[int]], gpus: int,
                     sub_group_size: int) -> list[int]:
    """Values per rank of each flat sub-group partition under ZeRO-3 (parameters in order)."""
    out: list[int] = []
    for numels in group_numels:
        parts = [ceil(n / gpus) for n in numels if n]
        if not parts:
            continue
        if sub_group_size >= sum(parts):
            out.append(sum(parts))
            continue
        size = 0
        for i, part in enumerate(parts):
            size += part
            if size >= sub_group_size or i == len(parts) - 1:
                out.append(size)
                size = 0
    return out


def optimizer_state_bytes(optimizer: str, partitions: Sequence[int]) -> int:
    """The optimizer's states over these flat float32 partitions, per rank."""
    rule = FLAT_STATE_BYTES[optimizer]
    return sum(rule(n) for n in partitions)
