"""What the command line does before a plan: import the libraries every plan uses with the
cyclic garbage collector paused, then take their objects out of its sight.

Importing torch, transformers' modelling core and bitsandbytes creates millions of
long-lived objects (modules, functions, classes) and almost no garbage. Each collection of
the older generations walks them all again: with the collector running, those imports
cost a plan 0.8 to 1 s of CPU in collections that free nothing (measured on Llama-2-70B's
default plan: bench/estimate_speed.py). Imported with the collector paused, then frozen
(``gc.freeze``: moved to a generation no collection walks), they cost nothing more; the
collector is back on, at the command line's thresholds, before anything is planned, so
the garbage planning makes (trace bookkeeping, meta models) is collected as before.

Two imports a plan never uses are put off until something uses them: the index of every
model's exports that ``transformers.models`` reads from ~1,700 source files
(qplan/deferred_model_index.py), and torchao, which transformers' quantisers import
(qplan/deferred_torchao.py).

A command that needs none of this (``qplan gpus``, ``--help``) does not call it.
"""

from __future__ import annotations

import gc
import importlib
import sys

from qplan.deferred_model_index import import_models_package
from qplan.deferred_torchao import import_transformers_quantizers

# Imported by every plan: torch; transformers' configuration and modelling core (its
# config classes pull torch.distributed.tensor through the weight-loading helpers, its
# masks torch._dynamo); the planner.
_EVERY_PLAN = (
    "torch",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "transformers.models.auto.modeling_auto",
    "qplan.api",
)


def import_planning_libraries() -> None:
    """Import what every plan imports, collector paused; freeze what they made.

    Only in a process that has not imported torch yet (a command line's): there the
    objects frozen are the imports' own and the little the command made before. A process
    that already holds torch (a notebook, a test session calling the CLI in-process) has
    paid for its imports, and its garbage is not to be frozen: nothing changes there."""
    if "torch" in sys.modules:
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        # transformers' model package with its index of exports built when first read,
        # then its quantisers, with torchao's import deferred to its use.
        import_models_package()
        import_transformers_quantizers()
        for name in _EVERY_PLAN:
            importlib.import_module(name)
        # bitsandbytes the way every trace imports it (without torch's compiler).
        from qplan.planner.bnb_import import import_bitsandbytes

        import_bitsandbytes()
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
