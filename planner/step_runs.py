"""How many traced steps ran on a meta model, kept on the model itself.

A step may change its modules (a layer's first call sets its compute type), so what was
read off them before a step is stale after it (planner/derived_traces.py). The count is
qplan's own bookkeeping, not the model's state: the record of a prepared model
(planner/prepared_models.py) leaves it out, or every step would look like a change.
"""

from __future__ import annotations

from typing import Any

RUNS_KEY = "_qplan_steps_run"


def mark_run(model: Any) -> None:
    model.__dict__[RUNS_KEY] = model.__dict__.get(RUNS_KEY, 0) + 1


def runs_on(model: Any) -> int:
    return model.__dict__.get(RUNS_KEY, 0)
