"""What every chart draws, taken from a Report once: stacked bars and solve curves.

The terminal bars, the matplotlib plot and the HTML's SVG all draw these, so the three
agree on the order of the components, the scale and where the usable line sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qplan.render.fmt import component_rank


@dataclass(frozen=True)
class Segment:
    component: str
    bytes: int


@dataclass(frozen=True)
class Bar:
    """One stacked bar: a candidate (its busiest GPU on several) or one device of a plan.

    The bar's full length is ``scale_bytes`` (the device's memory); the total must stay
    under ``limit_bytes`` (memory, or NVML's free memory, minus the headroom), which is the
    usable line; ``headroom_bytes`` above it are kept free on purpose.
    """

    label: str
    segments: tuple[Segment, ...]
    total_bytes: int
    scale_bytes: int
    limit_bytes: int
    headroom_bytes: int
    fits: bool
    chosen: bool = False
    detail: str = ""  # e.g. the strategy a multi-GPU candidate takes

    @property
    def left_bytes(self) -> int:
        """Room left under the usable line (negative: short by)."""
        return self.limit_bytes - self.total_bytes


@dataclass(frozen=True)
class BarGroup:
    title: str
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Curve:
    """One precision's traced totals against the solved variable, and the answer."""

    precision: str
    points: tuple[tuple[int, int], ...]
    value: int | None
    needed_bytes: int | None


@dataclass(frozen=True)
class Sweep:
    variable: str  # "batch" | "seq_len"
    limit_bytes: int
    memory_bytes: int
    curves: tuple[Curve, ...]

    @property
    def option(self) -> str:
        return "--seq-len" if self.variable == "seq_len" else "--batch"


def _segments(components: dict[str, int]) -> tuple[Segment, ...]:
    names = sorted((n for n, v in components.items() if v > 0), key=component_rank)
    return tuple(Segment(n, components[n]) for n in names)


def limit_of(report: Any) -> int:
    """What a device's total may reach: usable memory plus the CUDA context it includes."""
    return int(report.gpu.usable_bytes + report.gpu.cuda_context_bytes)


def candidate_bars(report: Any) -> BarGroup:
    gpu = report.gpu
    chosen = report.recommendation.precision if report.recommendation else None
    limit = limit_of(report)
    bars = tuple(
        Bar(
            label=c.precision,
            segments=_segments(c.components),
            total_bytes=c.total_bytes,
            scale_bytes=gpu.memory_bytes,
            limit_bytes=limit,
            headroom_bytes=gpu.headroom_bytes,
            fits=bool(c.fits),
            chosen=c.precision == chosen,
            detail=c.strategy or "",
        )
        for c in report.candidates
    )
    where = f"busiest of {gpu.count} x {gpu.name}" if gpu.count > 1 else gpu.name
    return BarGroup(f"memory per candidate ({where})", bars)


def device_bars(report: Any) -> BarGroup | None:
    """Several GPUs: each GPU's share of the chosen plan, the busiest (least room) first."""
    gpus = [d for d in report.devices if d.device.startswith("cuda")]
    if not gpus:
        return None
    gpu = report.gpu
    fallback = limit_of(report)
    bars = [
        Bar(
            label=d.device,
            segments=_segments(d.components),
            total_bytes=d.total_bytes,
            scale_bytes=gpu.memory_bytes,
            limit_bytes=d.limit_bytes if d.limit_bytes is not None else fallback,
            headroom_bytes=gpu.headroom_bytes,
            fits=d.limit_bytes is None or d.total_bytes <= d.limit_bytes,
        )
        for d in gpus
    ]
    bars.sort(key=lambda b: (b.left_bytes, b.label))
    which = report.recommendation.precision if report.recommendation else "closest candidate"
    name = report.strategy.name if report.strategy is not None else "plan"
    return BarGroup(f"per device ({which}, {name}), busiest first", tuple(bars))


def bar_groups(report: Any) -> tuple[BarGroup, ...]:
    devices = device_bars(report)
    return (candidate_bars(report),) + ((devices,) if devices is not None else ())


def host_shares(report: Any) -> tuple[tuple[str, int], ...]:
    """What a multi-GPU plan puts on cpu or disk (offload), as (device, bytes)."""
    return tuple((d.device, d.total_bytes) for d in report.devices
                 if not d.device.startswith("cuda") and d.total_bytes)


def sweeps(report: Any) -> tuple[Sweep, ...]:
    """The --solve results grouped by variable, each precision's traced points as a curve."""
    by_variable: dict[str, list[Curve]] = {}
    for s in report.solutions:
        points = tuple((int(x), int(y)) for x, y in s.points)
        if not points and s.value is not None and s.needed_bytes is not None:
            points = ((s.value, s.needed_bytes),)  # a report from before points were kept
        by_variable.setdefault(s.variable, []).append(
            Curve(s.precision, points, s.value, s.needed_bytes)
        )
    return tuple(
        Sweep(variable, limit_of(report), report.gpu.memory_bytes, tuple(curves))
        for variable, curves in by_variable.items()
    )


def components_present(report: Any) -> tuple[str, ...]:
    """Every component some bar draws, in stacking order (the legend)."""
    names = {s.component for g in bar_groups(report) for b in g.bars for s in b.segments}
    return tuple(sorted(names, key=component_rank))
