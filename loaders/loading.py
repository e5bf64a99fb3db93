"""Load a model the way a plan says, apply the planned training patches, and measure it.

This closes the loop of the planner: the same precision, compute dtype, quant storage and
training patches (``planner.training_setup``) that the estimate assumed are applied to a
real ``from_pretrained`` load, and what the loaded model really holds is measured and
compared with the prediction.

Side effects live here (disk, devices, temp folders); the decisions come from the Report.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qplan.errors import DeviceError, ModelNotFoundError, QplanError, UsageError
from qplan.loaders.host_memory import check_host_room
from qplan.loaders.resident import resident_bytes
from qplan.planner.decide import Candidate, gib
from qplan.planner.device_map import from_pretrained_max_memory
from qplan.planner.precision import PRECISIONS
from qplan.planner.spec import ModelSpec
from qplan.planner.workload import Workload
from qplan.report import Report

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)
# FlashAttention 2 kernels exist for Ampere (8.0) and newer only.
FLASH_ATTN_MIN_CC = (8, 0)
LORA_PARAM_BYTES = 4  # peft creates adapters in float32


@dataclass(frozen=True)
class LoadResult:
    """A loaded (and, for training modes, patched) model with what it measured."""

    model: Any
    tokenizer: Any | None
    measured: dict[str, Any]
    warnings: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- placement


def pick_device(device: str | None) -> str:
    """The device to load on ("cpu" or "cuda"); None: CUDA when torch sees one, else CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = device.strip().lower()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device} asked for CUDA but torch sees no CUDA device "
                f"(torch {torch.__version__}); install a CUDA build of torch or pass --device cpu"
            )
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise UsageError(f"unknown device {device!r}; pass cpu or cuda")


def device_map_for(report: Report, device: str) -> tuple[Any, dict[Any, int] | None]:
    """``device_map`` and ``max_memory`` for from_pretrained.

    One GPU: everything on device 0, so nothing is silently offloaded to CPU (an offload
    would make the measurement lie). Several GPUs (the hook for multi-GPU plans): accelerate
    spreads the layers, capped per device at what the plan counted as usable.
    """
    if device == "cpu":
        return "cpu", None
    count = report.gpu.count
    strategy = getattr(report, "strategy", None)
    if count > 1 and strategy is not None and strategy.device_map:
        return dict(strategy.device_map), planned_max_memory(report)
    if count > 1 and torch.cuda.device_count() >= count:
        return "auto", {i: report.gpu.usable_bytes for i in range(count)}
    return {"": 0}, None


def planned_max_memory(report: Report) -> dict[Any, int]:
    """The plan's max_memory as from_pretrained takes it (see planner.device_map)."""
    strategy = report.strategy
    assert strategy is not None and strategy.max_memory is not None
    rec = report.recommendation
    fraction = PRECISIONS[rec.precision].method.max_memory_fraction() if rec else 1.0
    return from_pretrained_max_memory(strategy.max_memory, fraction)


def _capability(report: Report, device: str) -> tuple[int, int] | None:
    cc = report.gpu.compute_capability
    if cc:
        major, _, minor = cc.partition(".")
        return int(major), int(minor or 0)
    if device == "cuda":
        try:
            return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]
        except Exception:
            return None
    return None


def attn_for(report: Report, device: str, explicit: str | None) -> str:
    """The attention implementation: the user's choice, else FA2 where it can run, else sdpa."""
    if explicit is not None:
        if explicit == "flash_attention_2" and device != "cuda":
            raise DeviceError(
                "attn flash_attention_2 needs a CUDA device; pass --attn sdpa for a CPU load"
            )
        return explicit
    cc = _capability(report, device)
    if (
        device == "cuda"
        and cc is not None
        and cc >= FLASH_ATTN_MIN_CC
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


# --------------------------------------------------------------------------- from_pretrained kwargs


def _supports_sdpa(report: Report) -> bool:
    import transformers

    cls = getattr(transformers, report.model.architecture, None)
    return bool(getattr(cls, "_supports_sdpa", True))


def load_kwargs(
    report: Report,
    candidate: Candidate,
    device: str,
    attn: str | None = None,
) -> dict[str, Any]:
    """Real ``from_pretrained`` kwargs (torch dtypes, the method's config object)."""
    from qplan.planner.quantize_meta import bnb_config

    prec = PRECISIONS[candidate.precision]
    quant_storage = str(report.workload.get("quant_storage") or "uint8")
    skip = report.workload.get("skip_modules")
    device_map, max_memory = device_map_for(report, device)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, candidate.compute_dtype),
        "device_map": device_map,
        "attn_implementation": attn_for(report, device, attn),
    }
    if kwargs["attn_implementation"] == "sdpa" and not _supports_sdpa(report):
        # Models without attention (Mamba) or without an SDPA path refuse "sdpa";
        # from_pretrained then takes its own default, eager.
        kwargs["attn_implementation"] = "eager"
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    stored = getattr(report.model, "quantization", None) or {}
    if candidate.precision == stored.get("dequantizes_to"):
        # A pre-quantised checkpoint planned dequantised: its own config, dequantize=True.
        from transformers.quantizers.auto import AutoQuantizationConfig

        kwargs["quantization_config"] = AutoQuantizationConfig.from_dict(
            {"quant_method": stored["method"], "dequantize": True})
    elif prec.quantized:
        prec.method.check_available()
        kwargs["quantization_config"] = bnb_config(
            candidate.precision,
            candidate.compute_dtype,
            quant_storage,
            list(skip) if skip else None,
        )
    return kwargs


# --------------------------------------------------------------------------- weights


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def weights_source(spec: ModelSpec, random_weights: bool) -> str | None:
    """The folder or Hub id from_pretrained reads; None when random weights are built."""
    if random_weights:
        return None
    fix = "download the weights (e.g. `hf download {id}`) or pass --random-weights"
    if spec.weights_dir is not None:
        folder = Path(spec.weights_dir)
        if not _has_weights(folder):
            raise ModelNotFoundError(
                f"{folder} holds a config.json but no *.safetensors / *.bin weights; "
                + fix.format(id=spec.id)
            )
        return str(folder)
    if spec.source == "hub":
        return spec.id
    where = "a bundled catalog config" if spec.source == "catalog" else f"{spec.source} config"
    raise ModelNotFoundError(
        f"'{spec.id}' is {where} without weights on this machine; " + fix.format(id=spec.id)
    )


def _save_random_model(spec: ModelSpec, candidate: Candidate, folder: Path) -> None:
    """A randomly initialised model of ``spec.config``, saved to ``folder``.

    Why save and reload rather than quantise the in-memory model: bitsandbytes quantises
    while ``from_pretrained`` loads a checkpoint (the HfQuantizer replaces Linears, then
    quantises each weight as it arrives). Going through the same from_pretrained path as a
    real checkpoint gives the very layout (packed weights, quant state, skip list, dtypes)
    the plan predicted, instead of a hand-made imitation of it.
    """
    import copy

    config = copy.deepcopy(spec.config)
    dtype = getattr(torch, candidate.compute_dtype)
    model = _auto_class(spec).from_config(
        config, dtype=dtype, trust_remote_code=spec.trust_remote_code
    )
    try:
        model.save_pretrained(folder)
    finally:
        del model
        gc.collect()


def _local_folder(spec: ModelSpec) -> str | None:
    """The folder next to the config (weights or not): where a tokenizer would be."""
    if spec.weights_dir is not None:
        return spec.weights_dir
    if spec.source in ("path", "cache") and spec.config_path:
        return str(Path(spec.config_path).parent)
    return None


def _tokenizer(folder: str | None) -> tuple[Any | None, str | None]:
    """The tokenizer of a local folder that ships one (never the network)."""
    if folder is None or not Path(folder).is_dir():
        return None, None
    if not any((Path(folder) / name).exists() for name in TOKENIZER_FILES):
        return None, None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True), None
    except Exception as exc:
        return None, f"tokenizer in {folder} could not be loaded ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- failure


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(
        t
        for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError)
        if isinstance(t, type)
    )
    if isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_message(report: Report, candidate: Candidate) -> str:
    gpu = report.gpu
    fitting = [c for c in report.candidates if c.fits]
    rec = report.recommendation
    if rec is not None and rec.precision != candidate.precision:
        hint = f"the plan recommends {rec.precision}; load that instead"
    elif fitting:
        smallest = min(fitting, key=lambda c: c.total_bytes)
        hint = f"{smallest.precision} ({gib(smallest.total_bytes)}) fits; load that instead"
    else:
        hint = "no candidate fits this GPU; use a bigger GPU or more of them"
    free = f", {gib(gpu.free_bytes)} free" if gpu.free_bytes is not None else ""
    return (
        f"CUDA ran out of memory loading {report.model.id} at {candidate.precision}: "
        f"predicted {gib(candidate.total_bytes)} on {gpu.name} ({gib(gpu.memory_bytes)}{free}); "
        f"{hint}"
    )


# --------------------------------------------------------------------------- measurement


def lora_parameter_count(spec: ModelSpec, workload: Workload) -> int:
    """Adapter parameters the workload's LoraConfig creates, counted before any load.

    For a dense model this is r * (in + out) per adapted Linear (lora_A [r, in], lora_B
    [out, r]); peft 0.18+ also adapts fused MoE expert tensors (``target_parameters``), whose
    shapes follow other rules. So peft itself applies the config to a meta-device build
    of the model (nothing allocated) and the trainable elements are counted.
    """
    import copy

    from peft import get_peft_model

    from qplan.planner.inventory import build_meta_model
    from qplan.planner.training_setup import lora_config

    meta = build_meta_model(copy.deepcopy(spec.config), spec.trust_remote_code)
    meta.requires_grad_(False)
    adapted = get_peft_model(meta, lora_config(workload, meta))
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def _adapter_bytes(model: nn.Module) -> int:
    return sum(
        p.untyped_storage().nbytes()
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" in n
    )


def _nvml_used() -> int | None:
    try:
        from qplan.loaders.nvml import query_devices

        devices = query_devices()
    except Exception:
        return None
    return devices[0].used_bytes if devices else None


def _device_memory(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    return {
        "allocated_bytes": int(torch.cuda.memory_allocated(0)),
        "reserved_bytes": int(torch.cuda.memory_reserved(0)),
        "max_allocated_bytes": int(torch.cuda.max_memory_allocated(0)),
        "nvml_used_bytes": _nvml_used(),
    }


def _error_pct(measured: int, predicted: int) -> float | None:
    if predicted <= 0:
        return None
    return round(100.0 * (measured - predicted) / predicted, 4)


# --------------------------------------------------------------------------- the load


def _auto_class(spec: ModelSpec) -> Any:
    """The auto class the plan built (causal LM, or image-text-to-text for a VLM)."""
    from qplan.planner.inventory import model_class_for

    return model_class_for(spec.config, spec.trust_remote_code)[0]


def _from_pretrained(source: str, kwargs: dict[str, Any], spec: ModelSpec) -> nn.Module:
    extra: dict[str, Any] = {}
    if spec.source == "hub" and spec.revision:
        extra["revision"] = spec.revision
    if spec.trust_remote_code:
        extra["trust_remote_code"] = True
    return _auto_class(spec).from_pretrained(source, **kwargs, **extra)


def load_planned(
    spec: ModelSpec,
    report: Report,
    precision: str,
    workload: Workload,
    *,
    device: str | None = None,
    random_weights: bool = False,
    attn: str | None = None,
    progress: Progress | None = None,
) -> LoadResult:
    """Load ``spec`` at ``precision`` as ``report`` planned it, patch it, and measure it.

    Raises a QplanError for every failure the user can fix (missing weights, no CUDA, no
    bitsandbytes, out of memory); on any failure nothing stays loaded.
    """
    say = progress or (lambda _msg: None)
    names = {c.precision for c in report.candidates}
    if precision not in names:
        raise UsageError(
            f"precision {precision!r} is not in the plan (it has {', '.join(sorted(names))}); "
            "pick one of those or re-run the estimate with it in --precisions"
        )
    candidate = report.candidate(precision)
    prec = PRECISIONS[precision]
    if workload.tuning == "full" and not prec.trainable("full"):
        raise UsageError(
            f"full fine-tuning cannot train {precision} ({prec.method.library}) weights; "
            "use --mode qlora, or an unquantised precision (bf16, fp16, fp32)"
        )
    where = pick_device(device)
    source = weights_source(spec, random_weights)
    if where == "cpu":
        check_host_room(
            candidate.weights_bytes,
            candidate.weights_bytes if source is None else 0,
            f"loading {spec.id} at {precision} on CPU",
            "load on a GPU, pick a smaller precision, or a machine with more memory",
        )
    kwargs = load_kwargs(report, candidate, where, attn)

    warnings: list[str] = []
    model: nn.Module | None = None
    temp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if source is None:
            temp = tempfile.TemporaryDirectory(prefix="qplan-random-")
            say("building random weights from the config")
            _save_random_model(spec, candidate, Path(temp.name))
            source = temp.name
        say(f"loading {spec.id} at {precision} on {where}")
        if where == "cuda":
            torch.cuda.reset_peak_memory_stats(0)
        model = _from_pretrained(source, kwargs, spec)
        after_load = _resident(model)
        measured: dict[str, Any] = {
            "device": where,
            "precision": precision,
            "attn_implementation": kwargs["attn_implementation"],
            "resident_bytes": after_load,
            "weights_bytes": after_load,
        }
        predicted = candidate.weights_bytes
        if workload.is_training:
            say(f"preparing for {workload.mode} training")
            predicted_adapters = 0
            if workload.is_lora:
                predicted_adapters = LORA_PARAM_BYTES * lora_parameter_count(spec, workload)
            model = workload.kind.prepare(model, workload, prec.quantized, target=where)
            resident = resident_bytes(model)
            measured["resident_bytes"] = resident.bytes
            planned = _planned_resident(report, candidate)
            if planned is not None:
                # The plan's weights after the training patches (k-bit preparation casts
                # leftovers to fp32) plus adapters; CUDA plans count allocator rounding.
                rounded = report.workload.get("target", "cuda") == "cuda"
                seen = resident.allocated_bytes if rounded else resident.bytes
                measured["planned_resident_bytes"] = planned
                measured["resident_error_pct"] = _error_pct(seen, planned)
            if workload.is_lora:
                trainable, total = model.get_nb_trainable_parameters()
                measured.update(
                    trainable_parameters=int(trainable),
                    all_parameters=int(total),
                    adapter_bytes=_adapter_bytes(model),
                    predicted_adapter_bytes=predicted_adapters,
                )
                predicted += predicted_adapters
        measured.update(_device_memory(where))
        compared = after_load + int(measured.get("adapter_bytes", 0))
        measured["predicted_bytes"] = predicted
        # The plan's whole-process figure (CUDA context, allocator, and for training or
        # inference the step's peak): compare with nvml_used_bytes after running a step.
        measured["planned_total_bytes"] = candidate.total_bytes
        measured["error_pct"] = _error_pct(compared, predicted)
        if workload.is_training and measured["resident_bytes"] != compared:
            # k-bit preparation casts 16-bit non-quantised weights to float32: the bytes
            # grow after the load, which the weights prediction does not cover.
            measured["training_setup_extra_bytes"] = measured["resident_bytes"] - compared
        tokenizer, problem = _tokenizer(_local_folder(spec))
        if problem:
            warnings.append(problem)
        if random_weights:
            warnings.append("weights are random (--random-weights): memory is real, outputs not")
        return LoadResult(
            model=model, tokenizer=tokenizer, measured=measured, warnings=tuple(warnings)
        )
    except BaseException as exc:
        model = None
        _free(where)
        if _is_oom(exc):
            raise QplanError(oom_message(report, candidate)) from None
        raise
    finally:
        if temp is not None:
            # Loaded tensors are copies or mmaps of unlinked files; both outlive the folder.
            temp.cleanup()


def _resident(model: nn.Module) -> int:
    return resident_bytes(model).bytes


def _planned_resident(report: Report, candidate: Candidate) -> int | None:
    parts = candidate.components
    if "weights" not in parts or "adapters" not in parts:
        return None
    return int(parts["weights"]) + int(parts["adapters"])
