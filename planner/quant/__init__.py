"""Quantisation methods, one module each, behind the ``QuantMethod`` interface (base.py).

How to add a method (the on-the-fly FP8 candidate is a worked example):

1. Write ``planner/quant/<method>.py`` with one ``QuantMethod`` subclass. Override what
   differs from "nothing replaced": ``layer_tensors`` (byte size of every tensor one
   replaced Linear stores, weight first, as a real load leaves it), ``stored_weight`` (the
   tensor FSDP shards), ``load_kwargs`` / ``config_object`` (the from_pretrained kwargs as
   JSON and as transformers' real config), ``quantize_meta`` (replace the layers on the meta
   model with transformers' own integration for the method, meta tensors shaped as loaded),
   ``trainable``, ``trace_patches`` (what the kernels need to run on meta),
   ``emit_config`` / ``axolotl_keys`` (snippets) and ``check_available``.
2. Register the class in ``METHODS`` below.
3. Add its rows to ``PRECISIONS`` in ``planner/precision.py`` (bits, variant, preference,
   whether the recommendation picks it unasked, the GPU capability it needs), and the names
   to the precision enums of ``qplan/schema/report.v1.json``.
4. Test it against a real ``from_pretrained`` of a tiny model on CPU (tests/
   test_weights_exact.py pattern), or against a checkpoint its own packer wrote where the
   backend does not load on CPU.

Nothing outside this package and the table tests a precision or method by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from qplan.planner.quant.base import QuantMethod, QuantSettings, StoredQuantization, StoredWeight
from qplan.planner.quant.bnb import BitsAndBytes
from qplan.planner.quant.compressed_tensors import CompressedTensors
from qplan.planner.quant.fp8 import Fp8
from qplan.planner.quant.gptq import Awq, Gptq
from qplan.planner.quant.mxfp4 import Mxfp4
from qplan.planner.quant.unquantized import Unquantized

METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in (Unquantized(), BitsAndBytes(), Mxfp4(), Fp8(), Gptq(), Awq(), CompressedTensors())
}


def method_named(name: str) -> QuantMethod:
    return METHODS[name]


def read_checkpoint(quantization_config: Any) -> StoredQuantization | None:
    """The checkpoint's stored format, asked of every method; None when none reads it."""
    if quantization_config is None:
        return None
    qc = quantization_config if isinstance(quantization_config, dict) else (
        quantization_config.to_dict())
    for method in METHODS.values():
        found = method.read_checkpoint(qc)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def all_trace_patches(target: str) -> Iterator[None]:
    """Every method's meta-trace patches; each only touches its own backend's calls."""
    with contextlib.ExitStack() as stack:
        for method in METHODS.values():
            stack.enter_context(method.trace_patches(target))
        yield


def clear_step_scratch(model: Any) -> None:
    """Every method's ``clear_step_scratch``; each only touches its own layers."""
    for method in METHODS.values():
        method.clear_step_scratch(model)


def first_forward_casts(model: Any) -> list[Any]:
    """Every method's ``first_forward_casts``; each only names its own layers' tensors."""
    return [tensor for method in METHODS.values()
            for tensor in method.first_forward_casts(model)]


__all__ = [
    "METHODS",
    "QuantMethod",
    "QuantSettings",
    "StoredQuantization",
    "StoredWeight",
    "all_trace_patches",
    "clear_step_scratch",
    "first_forward_casts",
    "method_named",
    "read_checkpoint",
]
