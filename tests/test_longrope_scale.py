"""planner/longrope_scale.py takes Phi-3.5-MoE's rotary embedding only where its source is
the one mirrored (tests/test_user_loops.py measures the plans against generate and Trainer)."""

from __future__ import annotations

import importlib

from qplan.planner import longrope_scale


def test_only_the_mirrored_source_is_taken(monkeypatch):
    module = importlib.import_module(longrope_scale.MODULE)
    forward = getattr(module, longrope_scale.CLASS).forward
    assert longrope_scale._stand_in(forward) is not None

    def other(self, x, position_ids=None):
        return x

    changed = module.dynamic_rope_update(other)
    assert longrope_scale._stand_in(changed) is None
    # Nothing is swapped where the modelling module was never imported.
    monkeypatch.setattr(longrope_scale, "MODULE", "transformers.models.no_such_model")
    with longrope_scale.longrope_scale_on_meta():
        assert getattr(module, longrope_scale.CLASS).forward is forward
