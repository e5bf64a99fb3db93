"""What a workload is, as one module declares it: its options, how it prepares the model,
the step it runs, the roles of the storages it creates and the precisions it allows.

The registry (``planner/workloads/__init__.py``) collects the kinds; the CLI's ``--mode``
choices, ``make_workload``'s validation, the Axolotl reader (``rl:``), the emitters and the
report schema ask it instead of testing mode names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qplan.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from qplan.planner.live_tensors import LiveTensorTracker
    from qplan.planner.steps import StepTensors
    from qplan.planner.workload import Workload

# How the weights train: None (no training), or the fine-tuning method whose precisions,
# peft setup and emitted keys apply.
TUNINGS = ("lora", "qlora", "full")

Step = Callable[["nn.Module", "Workload", "LiveTensorTracker", "StepTensors"], None]
# (model, workload, quantized, **setup): setup is prepare_for_training's keyword options.
Prepare = Callable[..., "nn.Module"]


@dataclass(frozen=True)
class WorkloadOption:
    """An option of one workload kind (``--option name=value`` on the command line, a
    keyword argument of ``qplan.estimate``)."""

    name: str
    default: str | float | bool | int
    help: str
    choices: tuple[str, ...] = ()

    def parse(self, value: Any, mode: str) -> str | float | bool | int:
        """The value, checked; a bad one is a one-line UsageError naming the fix."""
        if isinstance(self.default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if isinstance(value, bool):
                return value
            raise UsageError(f"--mode {mode} option {self.name} takes true or false, not "
                             f"{value!r}")
        if isinstance(self.default, int):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if not number.is_integer():
                raise UsageError(f"--mode {mode} option {self.name} takes a whole number, not "
                                 f"{value!r}")
            return int(number)
        if isinstance(self.default, float):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise UsageError(f"--mode {mode} option {self.name} takes a number, not "
                                 f"{value!r}") from None
        text = str(value)
        if self.choices and text not in self.choices:
            raise UsageError(f"--mode {mode} option {self.name} {text!r}: choose one of "
                             f"{', '.join(self.choices)}")
        return text


@dataclass(frozen=True)
class WorkloadKind:
    """One workload: ``--mode name``.

    ``tuning(options)``: how the weights train for these options (None, lora, qlora or
    full). ``prepare``: the training patches (peft, checkpointing), None for none.
    ``step``: the workload's step under the live-tensor tracker (planner/steps.py); None
    where it runs none (``load``: its plan is the resident weights, nothing traced).
    ``roles``: components the step's own storages are counted as, beyond the common ones
    (weights, adapters, gradients, ...), e.g. a frozen reference model.
    ``weight_copies``: those roles that are a second load of the checkpoint (stored like
    the weights: a plan traced on the dequantised model swaps their bytes as the weights').
    ``check(options)``: cross-option validation, raising UsageError.
    ``axolotl_rl``: the Axolotl ``rl:`` values that mean this workload;
    ``from_axolotl(raw, adapter)``: its options from the YAML (adapter: lora, qlora or
    None); ``to_axolotl(workload)``: its YAML keys; ``replan(workload, four_bit)``: its
    options as the emitted YAML reads back (``--emit axolotl`` round-trips them).
    ``axolotl_keys``: the YAML keys ``from_axolotl`` reads beyond the common ones (listed
    as read); ``axolotl_not_modelled(raw)``: what of the YAML the workload cannot plan,
    key -> what it changes (the plan warns).
    ``batch_multiple(workload)``: the batch must be a multiple of this (``--solve batch``
    searches those), None for any batch.
    ``needs``: the Python distributions the step imports (planned only when installed).
    ``causal_lm_step``: the step is transformers' causal-LM training loop, whose levers
    (fused cross-entropy, sample packing) apply; a preference trainer's loss is its own.
    ``takes_images``: the step feeds a vision-language model's images (``--images``,
    planner/vision.py) through its vision tower and projector.
    """

    name: str
    summary: str
    tuning: Callable[[Mapping[str, Any]], str | None]
    step: Step | None
    default_seq_len: int
    prepare: Prepare | None = None
    options: tuple[WorkloadOption, ...] = ()
    roles: tuple[str, ...] = ()
    weight_copies: tuple[str, ...] = ()
    check: Callable[[str, Mapping[str, Any]], None] | None = None
    axolotl_rl: tuple[str, ...] = ()
    from_axolotl: Callable[[Mapping[str, Any], str | None], dict[str, Any]] | None = None
    to_axolotl: Callable[[Workload], dict[str, Any]] | None = None
    replan: Callable[[Workload, bool], dict[str, Any]] | None = None
    axolotl_keys: tuple[str, ...] = ()
    batch_multiple: Callable[[Workload], int] | None = None
    axolotl_not_modelled: Callable[[Mapping[str, Any]], dict[str, str]] | None = None
    needs: tuple[str, ...] = ()
    causal_lm_step: bool = True
    takes_images: bool = False

    @property
    def training(self) -> bool:
        return self.prepare is not None

    @property
    def runs_step(self) -> bool:
        return self.step is not None

    def parse_options(self, given: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """Every option of this kind with its value (given, else the default), in
        declaration order; an option this kind does not take is a UsageError."""
        known = {o.name: o for o in self.options}
        unknown = [name for name in given if name not in known]
        if unknown:
            takes = ", ".join(known) or "no workload options"
            raise UsageError(f"--mode {self.name} takes {takes}, not {', '.join(unknown)}")
        values = {
            o.name: o.parse(given[o.name], self.name) if given.get(o.name) is not None
            else o.default
            for o in self.options
        }
        if self.check is not None:
            self.check(self.name, values)
        return tuple(values.items())

    def tuning_of(self, given: Mapping[str, Any]) -> str | None:
        values = {o.name: given.get(o.name) or o.default for o in self.options}
        return self.tuning(values)


def fixed(tuning: str | None) -> Callable[[Mapping[str, Any]], str | None]:
    """A kind whose weights always train the same way."""
    return lambda _options: tuning
