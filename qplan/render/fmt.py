"""Formatting shared by every renderer: byte sizes, and the components' order, names,
colours and ASCII glyphs (one table, so the terminal, the plot and the HTML agree)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


def gib(nbytes: int | None) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    if nbytes is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:,.2f} {unit}"
    return f"{nbytes} B"


def signed_gib(nbytes: int) -> str:
    return gib(nbytes) if nbytes >= 0 else f"-{gib(-nbytes)}"


@dataclass(frozen=True)
class ComponentStyle:
    """How one memory component is drawn: its label, colour (hex) and ASCII glyph."""

    label: str
    color: str
    glyph: str


# In the order a bar stacks them: what is loaded first, then what a step adds, then the
# per-process fixed cost. Colours: Tableau-like, distinct in print and for most colour-blind
# readers; glyphs: distinct ASCII for terminals without colour.
COMPONENTS: dict[str, ComponentStyle] = {
    "weights": ComponentStyle("weights", "#4e79a7", "#"),
    # A preference workload's frozen reference model (planner/workloads/preference.py).
    "reference_model": ComponentStyle("reference model", "#76b7b2", "r"),
    "adapters": ComponentStyle("adapters", "#a0cbe8", "a"),
    "gradients": ComponentStyle("gradients", "#f28e2b", "g"),
    "optimizer_states": ComponentStyle("optimizer states", "#ffbe7d", "o"),
    "model_states": ComponentStyle("model states", "#8cd17d", "m"),
    "gathered": ComponentStyle("gathered", "#b6992d", "G"),
    "kv_cache": ComponentStyle("KV cache", "#59a14f", "="),
    "logits": ComponentStyle("logits", "#e15759", "L"),
    "activations": ComponentStyle("activations", "#f1ce63", "+"),
    "transients": ComponentStyle("transients", "#b07aa1", "*"),
    "allocator": ComponentStyle("allocator", "#d4a6c8", "~"),
    "communication": ComponentStyle("communication", "#9d7660", "<"),
    "offloaded": ComponentStyle("offloaded", "#d7b5a6", ">"),
    "cuda_context": ComponentStyle("CUDA context", "#79706e", "c"),
}
_OTHER = ComponentStyle("other", "#bab0ac", "?")

# The parts of a bar that are not components.
FREE_GLYPH = "."
HEADROOM_GLYPH = "/"
LIMIT_GLYPH = "|"
OVER_GLYPH = ">"
HEADROOM_COLOR = "#d9d9d9"
LIMIT_COLOR = "#c0392b"


def component_rank(name: str) -> int:
    """Stacking order; components this table does not know go last."""
    order = list(COMPONENTS)
    return order.index(name) if name in COMPONENTS else len(order)


def style_of(name: str) -> ComponentStyle:
    known = COMPONENTS.get(name)
    return known if known is not None else ComponentStyle(name, _OTHER.color, _OTHER.glyph)
