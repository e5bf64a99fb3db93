"""Build a model's real module tree on the meta device and record every tensor it holds.

Nothing is allocated: parameters and buffers live on the meta device (accelerate's
``init_empty_weights(include_buffers=True)``). What bitsandbytes would quantise is decided
with transformers' own helpers (``get_keys_to_not_convert``, ``should_convert_module``,
the quantiser's type test), so the inventory follows the installed transformers.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qplan.errors import ConfigError, MissingPackageError

# Dtype the meta model is built with. Buffers built at the default dtype come out in this
# dtype, buffers created explicitly in float32 (rotary inv_freq) stay float32: that tells
# us which buffers follow the load dtype.
_BUILD_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class TensorInfo:
    """One unique tensor of the model (tied aliases folded into ``tied_names``)."""

    name: str
    module: str
    module_type: str
    kind: str  # "parameter" | "buffer"
    shape: tuple[int, ...]
    build_dtype: str  # dtype on the meta build (see _BUILD_DTYPE)
    tied_names: tuple[str, ...]  # other names for the same tensor (tied weights)
    quantizable: bool  # bitsandbytes would replace its module and this is the weight
    fp32_under_fp16: bool  # transformers keeps it float32 when loading in float16
    fp32_under_bf16: bool  # ... and when loading in bfloat16 (_keep_in_fp32_modules_strict)
    follows_load_dtype: bool  # buffers: created at the default dtype, so cast with the load

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def linear_shape(self) -> tuple[int, int]:
        """(out_features, in_features) of a quantisable weight (Conv1D stores [in, out])."""
        if self.module_type == "Conv1D":
            return (self.shape[1], self.shape[0])
        return (self.shape[0], self.shape[1])


@dataclass(frozen=True)
class Inventory:
    """Every parameter and buffer of a model, as the meta build shows them."""

    model_class: str
    model_type: str
    tensors: tuple[TensorInfo, ...]
    skip_modules: tuple[str, ...]  # modules bitsandbytes leaves unquantised by name
    layers: tuple[str, ...] = ()  # the decoder layers' module names, in order
    # The checkpoint's own quantisation (planner.quant), when it is stored quantised.
    stored: Any = None
    # Axolotl's quantize_moe_experts: the fused expert parameters are quantised too.
    moe_experts: bool = False

    @property
    def parameters(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if t.kind == "parameter")

    @property
    def buffers(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if t.kind == "buffer")

    @property
    def num_parameters(self) -> int:
        """Unique parameter count: tied weights counted once, buffers excluded."""
        return sum(t.numel for t in self.parameters)

    @property
    def quantizable_parameters(self) -> int:
        return sum(t.numel for t in self.parameters if t.quantizable)

    def unquantizable_matrices(self) -> tuple[int, tuple[str, ...]]:
        """Parameters in weight matrices bitsandbytes will not quantise, beyond embeddings
        and the output layer: e.g. MoE experts that transformers 5.x fuses into 3-D
        parameters. Returns (count, owning module types)."""
        from qplan.planner.moe_experts import is_fused_expert

        skipped = [
            t for t in self.parameters
            if not t.quantizable and len(t.shape) >= 2
            and not (self.moe_experts and is_fused_expert(t.name, t.shape))
            and t.module_type not in ("Embedding",) and not t.tied_names
            and t.module.split(".")[-1] not in ("lm_head", "embed_out", "output")
        ]
        return sum(t.numel for t in skipped), tuple(sorted({t.module_type for t in skipped}))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_class_for(config: Any, trust_remote_code: bool = False) -> tuple[Any, str]:
    """The class to build, as from_pretrained resolves it (planner/families.py).

    Returns (factory, architecture name). The factory has ``from_config``.
    """
    from qplan.planner.families import AUTO_CLASSES, model_class

    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code:
        import transformers

        for auto in AUTO_CLASSES:
            if auto in auto_map:
                return getattr(transformers, auto), archs[0] if archs else auto
    chosen = model_class(config)
    return chosen.factory(), chosen.name


def _keep_tensor(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


@contextlib.contextmanager
def _values_not_drawn() -> Iterator[None]:
    """torch's weight initialisers (``nn.init.kaiming_uniform_`` in every Linear's
    constructor, ...) return their tensor untouched while a meta model is built.

    On the meta device they draw nothing, yet each runs torch's Python decomposition of
    ``uniform_`` or ``normal_``: a fifth of building a 70B model's 560 Linears. Shapes,
    dtypes and devices are the constructor's own either way. The initialisers return the
    tensor (transformers' ``no_init_weights`` returns None) so that a constructor using
    their result keeps working. The modules patched are transformers' own list of those
    that bind the initialisers at import."""
    from transformers.initialization import TORCH_INIT_FUNCTIONS, TORCH_MODULES_TO_PATCH

    from qplan.planner.patching import swapped

    swaps = [
        (module, name, _keep_tensor)
        for module in (sys.modules.get(m) for m in TORCH_MODULES_TO_PATCH) if module is not None
        for name in TORCH_INIT_FUNCTIONS if hasattr(module, name)
    ]
    with swapped(*swaps):
        yield


def build_meta_model(config: Any, trust_remote_code: bool = False,
                     attn: str | None = None) -> nn.Module:
    """Instantiate the model with every parameter and buffer on the meta device, tied;
    with the attention implementation of ``attn`` (planner/attention.py) when given."""
    from accelerate import init_empty_weights

    from qplan.planner.attention import build_attn_implementation, check_attn_support
    from qplan.planner.quiet_logs import quiet

    factory, _ = model_class_for(config, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": _BUILD_DTYPE}
    if attn is not None:
        kwargs["attn_implementation"] = build_attn_implementation(attn)
        built = getattr(factory, "_model_mapping", {}).get(type(config), factory) \
            if hasattr(factory, "_model_mapping") else factory
        if attn == "sdpa" and not getattr(built, "_supports_sdpa", True):
            # No SDPA path (Mamba has no attention): transformers refuses "sdpa" and
            # builds such models with eager, its own default.
            kwargs["attn_implementation"] = "eager"
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        # transformers logs advice meant for real loads (e.g. legacy activation names); the
        # planner stays quiet and lets the CLI decide what to show.
        with (
            quiet("transformers"),
            init_empty_weights(include_buffers=True),
            _values_not_drawn(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            if hasattr(factory, "from_config"):
                model = factory.from_config(config, **kwargs)
            else:
                model = factory._from_config(config, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError,
            IndexError, ZeroDivisionError) as exc:
        # A config transformers accepts but cannot build from (torch asserts, divides by a
        # zero size, indexes past a list): the config's fault, said in one line.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"transformers could not build {config.model_type!r} from this config ({first}); "
            "check config.json against the model's documented fields"
        ) from exc
    except ImportError as exc:
        # transformers' requires_backends: "X requires the timm library but it was not
        # found in your environment".
        found = re.search(r"requires the (\S+) library", str(exc))
        package = found.group(1) if found else None
        raise MissingPackageError(
            f"transformers builds {config.model_type!r} with the package {package}, which is "
            f"not installed: pip install {package}"
            if package else
            f"transformers could not build {config.model_type!r}: "
            f"{' '.join(str(exc).split())[:160]}"
        ) from exc
    # Parameters a model makes as bare nn.Parameter(torch.normal(...)) (DiffLlama's
    # lambdas) escape init_empty_weights and stay on the CPU; a real load puts every
    # tensor on the device, so move the strays to meta with the rest.
    if any(t.device.type != "meta" for t in (*model.parameters(), *model.buffers())):
        model.to("meta")
    # Under init_empty_weights transformers 5.x builds tied weights untied; a real load
    # ties them, so tie here to count them once.
    model.tie_weights()
    if attn is not None:
        check_attn_support(model, attn)
    return model


def decoder_layers(model: nn.Module) -> list[str]:
    """Names of the decoder layers: the longest ModuleList of no-split blocks outside a
    vision-language model's vision tower and projector (a tower deeper than a shallow
    trace's decoder must not be taken for it)."""
    from qplan.planner.vision import vision_modules

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    tower = {id(m) for part in vision_modules(model) for m in part.modules()}
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and id(module) not in tower:
            # Through torch's checkpoint wrapper (activation offloading wraps every layer).
            blocks = [
                f"{name}.{i}" for i, child in enumerate(module)
                if type(getattr(child, "_checkpoint_wrapped_module", child)).__name__ in no_split
            ]
            if len(blocks) > len(best):
                best = blocks
    return best


def _module_types(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules(remove_duplicate=False))


def _skip_modules(model: nn.Module, skip_modules: Sequence[str] | None) -> list[str]:
    """Module names the bnb quantiser will not convert, computed as transformers does."""
    from transformers.quantizers.base import HfQuantizer

    keep = getattr(model, "_keep_in_fp32_modules", None)
    return HfQuantizer.get_modules_to_not_convert(
        model, list(skip_modules) if skip_modules is not None else None, keep
    )


def _is_bnb_replaceable(module: nn.Module) -> bool:
    """The quantiser's own test: exactly nn.Linear, or GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D) or type(module) is nn.Linear


def _fp32_matcher(model: nn.Module, dtype: torch.dtype):
    """A predicate for parameter names transformers loads in float32 under ``dtype``."""
    from transformers.core_model_loading import build_glob_alternation

    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(dtype) if get_plan is not None else {}
    if not plan:
        return lambda name: False
    pattern, _, _ = build_glob_alternation(list(plan))
    return lambda name: pattern.search(name) is not None


def take_inventory(model: nn.Module, skip_modules: Sequence[str] | None = None) -> Inventory:
    """Record every unique parameter and buffer of a (meta) model.

    ``skip_modules`` is bitsandbytes' ``llm_int8_skip_modules``: when given it replaces the
    default skips (tied weights, output embedding, last module), as in transformers.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    modules = _module_types(model)
    skips = _skip_modules(model, skip_modules)
    fp32_fp16 = _fp32_matcher(model, torch.float16)
    fp32_bf16 = _fp32_matcher(model, torch.bfloat16)

    seen: dict[int, list[str]] = {}
    ordered: list[tuple[str, str, torch.Tensor]] = []
    items: Iterable[tuple[str, str, torch.Tensor]] = [
        *(("parameter", n, p) for n, p in model.named_parameters(remove_duplicate=False)),
        *(("buffer", n, b) for n, b in model.named_buffers(remove_duplicate=False)),
    ]
    for kind, name, tensor in items:
        key = id(tensor)
        if key in seen:
            seen[key].append(name)
            continue
        seen[key] = [name]
        ordered.append((kind, name, tensor))

    tensors = []
    for kind, name, tensor in ordered:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name, model)
        quantizable = (
            kind == "parameter"
            and leaf == "weight"
            and _is_bnb_replaceable(module)
            and should_convert_module(module_name, skips)
        )
        tied = tuple(seen[id(tensor)][1:])
        tensors.append(
            TensorInfo(
                name=name,
                module=module_name,
                module_type=type(module).__name__,
                kind=kind,
                shape=tuple(int(d) for d in tensor.shape),
                build_dtype=_dtype_name(tensor.dtype),
                tied_names=tied,
                quantizable=quantizable,
                fp32_under_fp16=kind == "parameter" and fp32_fp16(name),
                fp32_under_bf16=kind == "parameter" and fp32_bf16(name),
                follows_load_dtype=kind == "buffer" and tensor.dtype == _BUILD_DTYPE,
            )
        )
    config = getattr(model, "config", None)
    return Inventory(
        model_class=type(model).__name__,
        model_type=str(getattr(config, "model_type", "")),
        tensors=tuple(tensors),
        skip_modules=tuple(sorted(skips)),
        layers=tuple(decoder_layers(model)),
    )
