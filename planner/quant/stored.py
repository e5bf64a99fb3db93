"""Planning a checkpoint in the format it is stored in (pure; no I/O).

A checkpoint that carries a ``quantization_config`` loads as stored, or dequantised where
transformers offers it (MXFP4 and FP8 -> bf16); transformers refuses to re-quantise it
with another method, so those are the only candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qplan.errors import UsageError
from qplan.planner.quant import method_named
from qplan.planner.quant.base import StoredQuantization


def offered(stored: StoredQuantization) -> list[str]:
    """The rows the checkpoint can load as, stored first."""
    return [stored.precision, *([stored.dequantized] if stored.dequantized else [])]


def candidates(
    stored: StoredQuantization, model: str, mode: str, requested: Sequence[str], explicit: bool,
    asked: str | None = None,
) -> list[str]:
    """The candidate rows for ``mode`` (a tuning: lora, qlora, full; or a mode without
    one); a UsageError names what can be planned instead. ``asked``: the ``--mode`` the
    user gave, when it trains by an option (a preference mode's adapter)."""
    from qplan.planner.precision import PRECISIONS

    rows = offered(stored)
    if explicit:
        refused = [n for n in requested if n not in rows]
        if refused:
            raise UsageError(
                f"{model} is stored as {stored.quant_method} ({stored.bits}-bit); it loads only "
                f"as {' or '.join(rows)} (transformers does not re-quantise a quantised "
                f"checkpoint); drop {', '.join(refused)} from --precisions"
            )
        rows = [n for n in rows if n in requested]
    if mode in ("lora", "qlora", "full"):
        trainable = [n for n in rows if PRECISIONS[n].trainable(mode)]
        if not trainable:
            library = method_named(stored.method).library
            other = [m for m in ("lora", "full") if m != mode and any(
                PRECISIONS[n].trainable(m) for n in offered(stored))]
            # A preference mode trains by its adapter option: name the mode asked for,
            # and the option that changes the tuning.
            asked = asked or mode
            what = f"--mode {asked}" if asked == mode else f"--mode {asked} (adapter={mode})"
            hint = "; plan --mode inference, or train from the unquantised checkpoint"
            if other:
                switch = f"--mode {other[0]}" if asked == mode else f"-O adapter={other[0]}"
                hint = f"; plan {switch} instead"
            raise UsageError(
                f"{what} cannot train this format: {model} is stored as "
                f"{stored.quant_method} ({library}), which peft cannot train with {mode}{hint}"
            )
        rows = trainable
    return rows


def skip_modules(stored: StoredQuantization, model: Any) -> list[str] | None:
    """The inventory's skip list for the checkpoint: its own list where it has one; AWQ
    adds transformers' default skips to it (``add_default_skips=True``)."""
    if stored.not_converted is None:
        return None
    names = list(stored.not_converted)
    if stored.method == "awq":
        from transformers.quantizers.base import get_keys_to_not_convert

        names = sorted(set(names) | set(get_keys_to_not_convert(model)))
    return names


def resolve_layout(stored: StoredQuantization, model: Any) -> StoredQuantization:
    """The stored format with what only the meta model tells (compressed-tensors layouts)."""
    return method_named(stored.method).resolve_layout(stored, model)


def gpu_notes(stored: StoredQuantization, gpu: Any) -> tuple[bool, tuple[str, ...]]:
    """(the stored format runs on ``gpu``, notes saying what transformers does there)."""
    found = method_named(stored.method).gpu_note(stored, gpu)
    if found is None:
        return True, ()
    return found[0], (found[1],)
