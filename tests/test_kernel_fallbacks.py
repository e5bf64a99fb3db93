"""Functions transformers takes from optional kernel packages (mamba-ssm, causal-conv1d, ...)
are traced on their PyTorch code, also where the package is installed, and the report says
so (planner/kernel_fallbacks.py).

The packages need CUDA; here they are stood in for by packages of the same import names
whose every kernel raises, as a CUDA kernel does when handed meta tensors, imported by a
fresh process before transformers (its wrappers pick the package at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import make_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

# transformers' default config of a model_type, cut to 2 layers.
from arch_matrix import tiny_config

from qplan.api import estimate
from qplan.report import report_json

TESTS = Path(__file__).resolve().parent
RAISES = textwrap.dedent(
    """
    def _kernel(*args, **kwargs):
        raise RuntimeError("a CUDA kernel was called on the meta device")
    """
)
FAKE_PACKAGES = {
    "mamba_ssm/__init__.py": "",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/selective_scan_interface.py":
        RAISES + "selective_scan_fn = mamba_inner_fn = _kernel\n",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/selective_state_update.py": RAISES + "selective_state_update = _kernel\n",
    "mamba_ssm/ops/triton/ssd_combined.py":
        RAISES + "mamba_chunk_scan_combined = mamba_split_conv1d_scan_combined = _kernel\n",
    "causal_conv1d/__init__.py": RAISES + "causal_conv1d_fn = causal_conv1d_update = _kernel\n",
    "fla/__init__.py": "",
    "fla/ops/__init__.py": "",
    "fla/ops/gated_delta_rule.py":
        RAISES + "chunk_gated_delta_rule = fused_recurrent_gated_delta_rule = _kernel\n",
}
PLAN = textwrap.dedent(
    """
    import json, sys
    from qplan.api import estimate
    from qplan.planner import kernel_fallbacks
    from qplan.report import report_json

    reports = {mode: json.loads(report_json(estimate(sys.argv[1], gpu="24GiB", mode=mode,
                                                     seq_len=32)))
               for mode in sys.argv[2:]}
    # After the plans, the wrappers call the packages' kernels again.
    import transformers.models.{arch}.modeling_{arch} as modeling
    kernels = sorted(
        kernel_fallbacks.closure(w)["implementation"].__module__
        for w in kernel_fallbacks._wrappers(((modeling.__name__,), (modeling,))))
    print(json.dumps({"reports": reports, "kernels": kernels}))
    """
)


def _without_notes(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("notes", "model")}


def _config(arch: str):
    # Qwen3-Next: linear attention (flash-linear-attention's gated delta rule).
    return tiny_config(arch) if arch == "qwen3_next" else make_config(arch)


@pytest.mark.parametrize("arch,modes", [("falcon_mamba", ("inference", "lora")),
                                        ("nemotron_h", ("inference",)),
                                        ("qwen3_next", ("inference",))])
def test_installed_kernel_packages_plan_as_their_pytorch_code(arch, modes, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("QPLAN_CACHE", "0")
    for name, text in FAKE_PACKAGES.items():
        (tmp_path / "fake" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fake" / name).write_text(text)
    model = tmp_path / "model"
    _config(arch).save_pretrained(model)
    done = subprocess.run(
        [sys.executable, "-c", PLAN.replace("{arch}", arch), str(model), *modes],
        capture_output=True, text=True, check=False,
        env={**os.environ,
             "PYTHONPATH": f"{tmp_path / 'fake'}:{TESTS}", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["kernels"] and all(k.split(".")[0] in ("mamba_ssm", "causal_conv1d", "fla")
                                    for k in found["kernels"])
    for mode in modes:
        with_packages = found["reports"][mode]
        here = json.loads(report_json(estimate(str(model), gpu="24GiB", mode=mode,
                                               seq_len=32)))
        # The same plan as where the packages are not installed, figure for figure.
        assert _without_notes(with_packages) == _without_notes(here)
        [installed] = [n for n in with_packages["notes"] if "PyTorch code" in n]
        [absent] = [n for n in here["notes"] if "PyTorch code" in n]
        package = "flash-linear-attention" if arch == "qwen3_next" else "mamba-ssm"
        assert package in installed and "installed here" in installed, installed
        assert "a run with" in absent and "installed here" not in absent, absent


def test_load_plans_say_nothing_of_kernels(tmp_path):
    """Weights do not depend on the kernels: a load plan has no such note."""
    model = tmp_path / "model"
    make_config("falcon_mamba").save_pretrained(model)
    report = estimate(str(model), gpu="24GiB", mode="load")
    assert not [n for n in report.notes if "PyTorch code" in n]
