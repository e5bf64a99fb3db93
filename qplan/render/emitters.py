"""``--emit``: the plan as code or config people run (text generators live in planner/)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _transformers(report: Any) -> str:
    from qplan.planner.emit import emit_transformers

    return emit_transformers(report)


def _peft(report: Any) -> str:
    from qplan.planner.emit import emit_peft, emit_transformers

    # The loading snippet first, so what is printed runs as a whole.
    return emit_transformers(report) + "\n" + emit_peft(report)


def _axolotl(report: Any) -> str:
    from qplan.planner.emit import emit_axolotl

    return emit_axolotl(report)


def _accelerate(report: Any) -> str:
    from qplan.planner.emit_accelerate import emit_accelerate

    return emit_accelerate(report)


# name -> (text generator, the language of its output, for a code block's label)
EMITTERS: dict[str, tuple[Callable[[Any], str], str]] = {
    "transformers": (_transformers, "python"),
    "peft": (_peft, "python"),
    "axolotl": (_axolotl, "yaml"),
    "accelerate": (_accelerate, "yaml"),
}


def emit_text(kind: str, report: Any) -> str:
    return EMITTERS[kind][0](report)


def applicable_snippets(report: Any) -> list[tuple[str, str, str]]:
    """(name, language, text) of every emitter that applies to this plan.

    An emitter that does not apply (peft for an inference plan, anything when nothing
    fits) raises a QplanError saying so; those are left out.
    """
    from qplan.errors import QplanError

    snippets = []
    for name, (emit, language) in EMITTERS.items():
        try:
            snippets.append((name, language, emit(report)))
        except QplanError:
            continue
    return snippets
