"""The from_pretrained kwargs `qplan load` builds for GPU-only choices, without a GPU.

CUDA is simulated (torch.cuda.is_available patched) and from_pretrained is replaced by a
recorder that stops the load, so nothing runs on a device.
"""

from __future__ import annotations

import importlib.util

import bitsandbytes  # noqa: F401  (imported before CUDA is faked: it probes CUDA on import)
import pytest
import torch
import transformers

from qplan.api import estimate
from qplan.loading import load
from qplan.report import report_dict


class Stop(Exception):
    """Raised by the fake from_pretrained once it has recorded its kwargs."""


@pytest.fixture
def recorded(monkeypatch):
    calls: list[tuple[str, dict]] = []

    def fake(source, **kwargs):
        calls.append((source, kwargs))
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    return calls


def _flash_attn_importable(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "flash_attn":
            return object()
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _kwargs_for(folder, gpu, precision, calls, **load_options):
    # Plan first (no patches in the way), then load from that report.
    report = estimate(folder, gpu=gpu, mode="load")
    with pytest.raises(Stop):
        load(
            None,
            from_report=report_dict(report),
            precision=precision,
            device="cuda",
            **load_options,
        )
    source, kwargs = calls[-1]
    assert source == folder
    return kwargs


@pytest.mark.parametrize(("gpu", "compute"), [("T4", torch.float16), ("A100-80GB", torch.bfloat16)])
def test_4bit_compute_dtype_follows_the_gpu(tiny_model_dir, recorded, gpu, compute):
    folder = str(tiny_model_dir("llama"))
    kwargs = _kwargs_for(folder, gpu, "nf4-dq", recorded)
    quant = kwargs["quantization_config"]
    assert isinstance(quant, transformers.BitsAndBytesConfig)
    assert quant.load_in_4bit and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_quant_type == "nf4"
    assert quant.bnb_4bit_compute_dtype == compute
    assert quant.bnb_4bit_quant_storage == torch.uint8
    assert kwargs["dtype"] == compute
    assert kwargs["device_map"] == {"": 0}
    assert "max_memory" not in kwargs


def test_unquantised_has_no_quantization_config(tiny_model_dir, recorded):
    kwargs = _kwargs_for(str(tiny_model_dir("llama")), "A100-80GB", "fp16", recorded)
    assert "quantization_config" not in kwargs
    assert kwargs["dtype"] == torch.float16


def test_int8_config(tiny_model_dir, recorded):
    kwargs = _kwargs_for(str(tiny_model_dir("llama")), "T4", "int8", recorded)
    assert kwargs["quantization_config"].load_in_8bit


def test_flash_attention_on_ampere_when_importable(tiny_model_dir, recorded, monkeypatch):
    folder = str(tiny_model_dir("llama"))
    report_a100 = estimate(folder, gpu="A100-80GB", mode="load")
    report_t4 = estimate(folder, gpu="T4", mode="load")
    _flash_attn_importable(monkeypatch)
    for report, expected in ((report_a100, "flash_attention_2"), (report_t4, "sdpa")):
        with pytest.raises(Stop):
            load(None, from_report=report_dict(report), precision="bf16", device="cuda")
        assert recorded[-1][1]["attn_implementation"] == expected


def test_sdpa_on_ampere_without_flash_attn(tiny_model_dir, recorded, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "flash_attn" else real(name, *a, **k),
    )
    kwargs = _kwargs_for(str(tiny_model_dir("llama")), "A100-80GB", "bf16", recorded)
    assert kwargs["attn_implementation"] == "sdpa"


def test_explicit_attention_is_respected(tiny_model_dir, recorded, monkeypatch):
    from qplan.loaders.loading import load_kwargs

    _flash_attn_importable(monkeypatch)
    report = estimate(str(tiny_model_dir("llama")), gpu="A100-80GB", mode="load")
    kwargs = load_kwargs(report, report.candidate("bf16"), "cuda", attn="eager")
    assert kwargs["attn_implementation"] == "eager"


def test_cpu_load_uses_cpu_device_map(tiny_model_dir, recorded):
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="A100-80GB", mode="load")
    with pytest.raises(Stop):
        load(None, from_report=report_dict(report), precision="nf4", device="cpu")
    kwargs = recorded[-1][1]
    assert kwargs["device_map"] == "cpu"
    assert kwargs["attn_implementation"] == "sdpa"


def test_multi_gpu_plan_loads_with_the_planned_device_map(tiny_model_dir, recorded, monkeypatch):
    from qplan.loaders.loading import device_map_for

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    report = estimate(str(tiny_model_dir("llama")), gpu="2xA100-80GB", mode="load")
    device_map, max_memory = device_map_for(report, "cuda")
    # Multi-GPU plans carry their own split (planner/device_map.py): loaded as planned.
    assert device_map == report.strategy.device_map
    assert max_memory == {
        (int(k) if k.isdigit() else k): v for k, v in report.strategy.max_memory.items()
    }


def test_flash_attention_on_cpu_is_refused(tiny_model_dir):
    from qplan.errors import DeviceError
    from qplan.loaders.loading import attn_for

    report = estimate(str(tiny_model_dir("llama")), gpu="A100-80GB", mode="load")
    with pytest.raises(DeviceError, match="CUDA"):
        attn_for(report, "cpu", "flash_attention_2")
