"""The command line imports transformers' quantisers with torchao's import deferred to its
first use (qplan/deferred_torchao.py), and a torchao checkpoint's path works as before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from qplan import deferred_torchao

pytest.importorskip("torchao")


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_command_plans_without_torchao_and_torchao_works_once_used():
    out = _run("""
        import json, sys
        from qplan.startup import import_planning_libraries
        import_planning_libraries()
        imported_at_start = "torchao" in sys.modules
        import torch
        import transformers.utils.import_utils as import_utils
        from transformers.quantizers import quantizer_torchao
        real = import_utils.is_torchao_available
        # Every module that took transformers' function holds it again, none the stand-in.
        found = {name: getattr(module, "is_torchao_available", None)
                 for name, module in list(sys.modules.items())}
        ours = (real.__module__, "qplan.deferred_torchao")
        holders = [name for name, fn in found.items()
                   if getattr(fn, "__module__", None) in ours]
        wrong = [name for name in holders if found[name] is not real]
        state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
        flat = quantizer_torchao.flatten_tensor_state_dict(state)
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        # A torchao quantisation config validates as it does after a plain import.
        from transformers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig
        TorchAoConfig(quant_type=Int8WeightOnlyConfig())
        print(json.dumps({
            "imported_at_start": imported_at_start,
            "holders": len(holders), "wrong": wrong,
            "available": quantizer_torchao.is_torchao_available(),
            "same_flat": repr(flat) == repr(flatten_tensor_state_dict(state)),
        }))
    """)
    assert not out["imported_at_start"]
    assert out["holders"] >= 2  # transformers.utils and the quantiser, at least
    assert out["wrong"] == []
    assert out["available"] and out["same_flat"]


def test_only_the_one_module_level_import_is_deferred():
    # The installed source is deferred; any other (another transformers release) is
    # refused, and imported as it is.
    source = deferred_torchao._quantizer_source()
    assert source is not None and deferred_torchao._takes_only_the_deferred_name(source)
    gated = textwrap.dedent("""
        if is_torchao_available():
            from torchao.prototype.safetensors.safetensors_support import (
                flatten_tensor_state_dict,
            )
    """)
    assert deferred_torchao._takes_only_the_deferred_name(gated)
    # Imports inside functions run when called: not at import time.
    assert deferred_torchao._takes_only_the_deferred_name(
        gated + "def f():\n    import torchao.quantization\n")
    for other in ("import torchao\n",
                  "from torchao.quantization import quantize_\n",
                  "if True:\n    from torchao.utils import TorchAOBaseTensor\n"):
        assert not deferred_torchao._takes_only_the_deferred_name(gated + other)
    assert not deferred_torchao._takes_only_the_deferred_name("import torch\n")
