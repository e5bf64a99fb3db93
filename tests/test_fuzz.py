"""A short property-based fuzz of ``qplan estimate`` (the long one is bench/fuzz.py): real
catalog configs shrunk and mutated, command lines at and past their limits. No traceback,
no hang, stdout always the report or the error JSON, a failure always one line with exit
1 or 2 (never an unexpected exit 3)."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("jsonschema")

from fuzz_inputs import check, command, config_text, seed_files
from hypothesis import HealthCheck, Phase, given, seed, settings

SEEDS = seed_files()


@seed(9)
@settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(config=config_text(SEEDS), args=command(fast=True))
def test_fuzzed_configs_and_options(tmp_path_factory, config, args):
    name, text = config
    outcome = check(text, args, tmp_path_factory.mktemp("fuzz"), bound_s=60)
    assert not outcome.problems, (name, args, outcome.problems, text[:500])
