"""The command line imports the libraries every plan uses with the cyclic collector paused,
then freezes what they made (qplan/startup.py)."""

from __future__ import annotations

import gc
import subprocess
import sys


def test_a_fresh_process_imports_with_the_collector_paused_then_freezes():
    code = (
        "import gc, sys\n"
        "collections = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and collections.append(1))\n"
        "from qplan.startup import import_planning_libraries\n"
        "before = len(collections)\n"
        "import_planning_libraries()\n"
        "print(len(collections) - before, gc.get_freeze_count() > 100_000, gc.isenabled(),\n"
        "      all(m in sys.modules for m in ('torch', 'transformers.modeling_utils',\n"
        "                                     'bitsandbytes', 'qplan.api')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    # No collection ran while torch, transformers and bitsandbytes were imported; their
    # objects were frozen, and the collector is on again for what planning makes.
    assert out == ["0", "True", "True", "True"]


def test_a_process_holding_torch_is_left_as_it_is():
    import torch  # noqa: F401  (the test session holds it already)

    from qplan.startup import import_planning_libraries

    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    import_planning_libraries()
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)
