"""Measure a workload's real peak: random weights, real bitsandbytes load, real steps.

The model is built from its config with random weights (optionally shrunk to its first
``layers`` decoder layers), saved to a temporary folder and loaded back through
``from_pretrained`` with the plan's BitsAndBytesConfig, so quantisation is bitsandbytes'
own. The training patches are the planner's (planner/training_setup.py) and the steps are
the planner's (planner/steps.py): only the tensors are real.

* CPU: a LiveTensorTracker counts every storage (the model's, and every op output) and
  takes the peak; the components are split as the planner splits its prediction.
* CUDA: torch.cuda.max_memory_allocated / max_memory_reserved and NVML's used memory for
  the device, besides the tracker.
"""

from __future__ import annotations

import copy
import gc
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from qplan.errors import DeviceError, QplanError
from qplan.planner.components import classify, num_layers
from qplan.planner.inventory import model_class_for
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.precision import PRECISIONS
from qplan.planner.quantize_meta import bnb_config
from qplan.planner.steps import run_workload
from qplan.planner.trace import vocab_tagger
from qplan.planner.weights import load_dtype_for
from qplan.planner.workload import Workload


@dataclass(frozen=True)
class Measurement:
    device: str
    precision: str
    layers: int
    peak_bytes: int  # tensor level: tracker on CPU, max_memory_allocated on CUDA
    components: dict[str, int]  # tracker's split of the peak
    reserved_bytes: int | None = None  # CUDA: max_memory_reserved
    nvml_used_bytes: int | None = None  # CUDA: NVML used for the device after the run
    host_bytes: int = 0  # peak host memory the step held (activation offloading's copies)


def shrink(config: Any, layers: int | None) -> Any:
    """A copy of ``config`` keeping only the first ``layers`` decoder layers."""
    from qplan.planner.components import _with_layers

    if layers is None:
        return copy.deepcopy(config)
    if layers < 1:
        raise QplanError(f"--layers must be at least 1, not {layers}")
    return _with_layers(config, min(layers, num_layers(config)))


def save_random_weights(config: Any, folder: str, dtype: str = "bfloat16") -> str:
    """Random weights from ``config`` saved as a checkpoint in ``folder``."""
    torch.manual_seed(0)
    model = model_class_for(config)[0].from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def random_model(config: Any, precision: str, compute_dtype: str, device: str,
                 weights_dir: str | None = None, attn: str = "sdpa",
                 skip_modules: list[str] | None = None, moe_experts: bool = False) -> Any:
    """Random weights from ``config`` (or the checkpoint in ``weights_dir``), loaded back
    through from_pretrained at ``precision`` so bitsandbytes quantises them itself, with
    the attention implementation ``attn``; ``moe_experts``: the fused experts then
    quantised by bitsandbytes as Axolotl's quantize_moe_experts does at load."""
    if weights_dir is None:
        with tempfile.TemporaryDirectory(prefix="qplan-random-") as folder:
            save_random_weights(config, folder)
            return random_model(config, precision, compute_dtype, device, folder, attn,
                                skip_modules, moe_experts)
    load_dtype = getattr(torch, load_dtype_for(PRECISIONS[precision], compute_dtype))
    quant = bnb_config(precision, compute_dtype, skip_modules=skip_modules)
    device_map: Any = {"": 0} if device == "cuda" else "cpu"
    factory = model_class_for(config)[0]
    if attn == "sdpa" and not getattr(factory._model_mapping.get(type(config), None),
                                      "_supports_sdpa", True):
        attn = "eager"  # no SDPA path (Mamba): from_pretrained's own default
    model = factory.from_pretrained(
        weights_dir, dtype=load_dtype, quantization_config=quant, device_map=device_map,
        attn_implementation=attn,
    )
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights into an AVX512-BF16 layout at the first CPU
        # inference forward; a GPU never does, so measure the code path the plan is for.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    prec = PRECISIONS[precision]
    if moe_experts and prec.quantized and prec.method.name == "bitsandbytes":
        from qplan.planner.moe_experts import quantize_fused_experts

        quantize_fused_experts(model, prec)
    return model


def _nvml_used(index: int) -> int | None:
    try:
        from qplan.loaders.nvml import query_devices

        devices = query_devices()
    except QplanError:
        return None
    return next((d.used_bytes for d in devices if d.index == index), None)


def measure(
    config: Any,
    workload: Workload,
    precision: str,
    compute_dtype: str,
    *,
    layers: int | None = None,
    device: str = "cpu",
    weights_dir: str | None = None,
    skip_modules: list[str] | None = None,
) -> Measurement:
    """Run ``workload`` for real at ``precision`` and measure its peak.

    ``weights_dir``: a checkpoint of ``config`` (already shrunk) to load instead of fresh
    random weights, so several measurements share one set. ``skip_modules``: the plan's
    llm_int8_skip_modules (report.workload["skip_modules"]).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("no CUDA device for --device cuda; run on a GPU or use --device cpu")
    if workload.attn == "flash_attention_2" and device != "cuda":
        raise DeviceError("flash_attention_2 runs only on CUDA GPUs; measure on --device cuda "
                          "or pass --attn sdpa")
    config = shrink(config, layers)
    model = random_model(config, precision, compute_dtype, device, weights_dir, workload.attn,
                         skip_modules, workload.quantize_moe_experts)
    if workload.kind.prepare is not None:
        model = workload.kind.prepare(model, workload, PRECISIONS[precision].quantized,
                                      target=device)
    vocab = config.get_text_config().vocab_size
    tracker = LiveTensorTracker(tagger=vocab_tagger(vocab))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seen = run_workload(model, workload, tracker)
    components = classify(tracker.peak_snapshot(), seen, rounded=device == "cuda")
    reserved = nvml = None
    peak = tracker.peak
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        nvml = _nvml_used(torch.cuda.current_device())
    result = Measurement(
        device=device,
        precision=precision,
        layers=num_layers(config),
        peak_bytes=peak,
        components=components,
        reserved_bytes=reserved,
        nvml_used_bytes=nvml,
        host_bytes=seen.host_peak,
    )
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result
