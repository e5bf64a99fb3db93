"""A training trace's second optimizer step, its forward and backward counted from the
first's log (planner/repeated_steps.py), equals the step run: every component at the peak
and at every phase and part peak, as on the reference path (``QPLAN_REUSE=0``), which runs
both steps. Where the second step could run differently, it runs."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import make_config

from qplan.api import make_workload
from qplan.planner import repeated_steps, reuse
from qplan.planner.components import trace_components

OPTIONS = dict(quant_storage="uint8", skip_modules=None, trust_remote_code=False)


@pytest.fixture
def repeats(monkeypatch) -> list[bool]:
    """What every StepRepeater.repeat answered."""
    answers: list[bool] = []
    real = repeated_steps.StepRepeater.repeat

    def repeat(self) -> bool:
        answers.append(real(self))
        return answers[-1]

    monkeypatch.setattr(repeated_steps.StepRepeater, "repeat", repeat)
    return answers


def _both(config, mode: str, precision: str, layers: int | None = None, seq_len: int = 48,
          **options):
    workload = make_workload(mode, config, batch=2, seq_len=seq_len, **options)
    kwargs = dict(OPTIONS, target="cuda", layers=layers)
    fast = trace_components(config, workload, precision, "bfloat16", **kwargs)
    with reuse.disabled():
        reference = trace_components(config, workload, precision, "bfloat16", **kwargs)
    return fast, reference


CASES = [
    ("llama", "lora", "bf16", {}),
    ("llama", "qlora", "nf4", {}),
    ("llama", "qlora", "fp4-dq", {"gradient_checkpointing": False}),
    ("llama", "full", "bf16", {"gradient_checkpointing": False}),
    ("llama", "full", "bf16", {"optimizer": "adamw_8bit"}),
    ("llama", "lora", "bf16", {"fused_ce": "liger"}),
    ("llama", "lora", "bf16", {"sample_packing": True, "attn": "flash_attention_2"}),
    ("mixtral", "lora", "bf16", {}),
    ("gemma3", "full", "bf16", {}),
    ("deepseek_v3", "qlora", "nf4", {}),
    ("qwen2_5_vl", "lora", "bf16", {"images": 1, "seq_len": 300}),
    ("nemotron_h", "qlora", "nf4", {}),
    # Biased 4-bit layers: bitsandbytes casts each float32 bias to the input's dtype on
    # the first step only (planner/quant: first_forward_casts).
    ("qwen2", "qlora", "nf4", {}),
    ("qwen2", "qlora", "fp4-dq", {"gradient_checkpointing": False}),
    ("falcon_mamba", "qlora", "fp4", {}),
]


@pytest.mark.parametrize(("arch", "mode", "precision", "options"), CASES,
                         ids=[f"{a}-{m}-{p}-{'-'.join(o) or 'default'}"
                              for a, m, p, o in CASES])
@pytest.mark.parametrize("layers", [None, 1])
def test_repeated_steps_equal_the_steps_run(arch, mode, precision, options, layers, repeats):
    # layers=1: a shallow trace of a deeper model, whose phase and part peaks are kept
    # for extrapolating; None: the whole (tiny) model.
    fast, reference = _both(make_config(arch), mode, precision, layers, **options)
    assert repeats == [True], "the second step was run, not counted from the first"
    assert fast == reference


def test_int8_layers_repeat_once_their_step_scratch_is_put_back(repeats):
    # bitsandbytes' int8 layers set their matmul state on every call (the training flag,
    # the input's outlier columns) before reading it: once put back as prepared, the
    # model's record is the first step's, and the second step is counted.
    fast, reference = _both(make_config("llama"), "lora", "int8")
    assert repeats == [True]
    assert fast == reference


def test_biased_int8_layers_equal_the_steps_run(repeats):
    fast, reference = _both(make_config("qwen2"), "lora", "int8")
    assert repeats == [True]
    assert fast == reference


def test_bias_casts_are_taken_only_from_the_forwards_read(monkeypatch, repeats):
    import bitsandbytes as bnb

    from qplan.planner.quant import bnb as bnb_method

    assert bnb_method._casts_bias_first(bnb.nn.Linear4bit.forward)
    assert bnb_method._casts_bias_first(bnb.nn.Linear8bitLt.forward)

    def other(self, x):
        return x

    assert not bnb_method._casts_bias_first(other)
    # Another version's layers: nothing declared, so the second step runs.
    monkeypatch.setattr(bnb_method, "_casts_bias_first", lambda forward: False)
    fast, reference = _both(make_config("qwen2"), "qlora", "nf4")
    assert repeats == [False]
    assert fast == reference


def _flagging(real):
    # Sets an attribute on its first call: a flag the next call may read.
    def forward(self, hidden):
        self.called = True
        return real(self, hidden)
    return forward


def _keeping(real):
    # Keeps something its forward made (a cache): the first step's storages are not all
    # freed, and the model's record changed.
    def forward(self, hidden):
        out = real(self, hidden)
        self.kept = out.detach()
        return out
    return forward


def _casting(real):
    # Casts a frozen tensor on its first call, by code no quantisation method vouches for
    # (it might be read before the cast, or cast again).
    def forward(self, hidden):
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.to(torch.float32)
        return real(self, hidden)
    return forward


NORMS = {"llama": "LlamaRMSNorm", "qwen2": "Qwen2RMSNorm"}
FIRST_CALL_CHANGES = [
    ("llama", "lora", "bf16", _flagging),
    ("llama", "lora", "bf16", _keeping),
    ("llama", "lora", "bf16", _casting),
    # The biases' declared casts are set aside, a flag set beside them is not.
    ("qwen2", "qlora", "nf4", _flagging),
]


@pytest.mark.parametrize(("arch", "mode", "precision", "change"), FIRST_CALL_CHANGES,
                         ids=[f"{a}-{p}-{c.__name__.strip('_')}"
                              for a, _, p, c in FIRST_CALL_CHANGES])
def test_a_layer_that_changes_on_its_first_call_runs_the_next_step(
        monkeypatch, repeats, arch, mode, precision, change):
    # The second step may run differently from the first, so it runs.
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    norm = getattr(module, NORMS[arch])
    monkeypatch.setattr(norm, "forward", change(norm.forward))
    fast, reference = _both(make_config(arch), mode, precision)
    assert repeats == [False]
    assert fast == reference


def test_workloads_with_their_own_loss_or_gradient_hooks_run_every_step():
    workload = make_workload("lora", make_config("llama"), batch=1, seq_len=8)
    with torch.device("meta"):
        param = torch.nn.Parameter(torch.empty(4))
    assert repeated_steps.repeatable([param], workload, own_loss=False)
    # A trainer's or a reference model's state lives outside the model.
    assert not repeated_steps.repeatable([param], workload, own_loss=True)
    with reuse.disabled():
        assert not repeated_steps.repeatable([param], workload, own_loss=False)
    # An optimizer in the backward: code the log does not hold.
    param.register_post_accumulate_grad_hook(lambda p: None)
    assert not repeated_steps.repeatable([param], workload, own_loss=False)
    offloading = make_workload("lora", make_config("llama"), batch=1, seq_len=8,
                               activation_offloading=True)
    assert not repeated_steps.repeatable([], offloading, own_loss=False)


# TRL's preference losses (planner/workloads/): DPO and KTO read the policy, their
# reference (the adapter-disabled policy, or a frozen copy beside it) and a fixed batch;
# ORPO and SimPO (the CPO trainer) keep their metrics, scalar tensors appended to lists.
PREFERENCE_CASES = [
    ("llama", "dpo", "bf16", {"adapter": "lora"}),
    ("llama", "dpo", "bf16", {"adapter": "full"}),
    ("llama", "dpo", "nf4", {"adapter": "qlora", "gradient_checkpointing": False}),
    ("llama", "ipo", "bf16", {"adapter": "lora"}),
    ("llama", "kto", "bf16", {"adapter": "lora"}),
    ("llama", "kto", "bf16", {"adapter": "full", "gradient_checkpointing": False}),
    ("llama", "orpo", "bf16", {"adapter": "lora"}),
    ("llama", "simpo", "bf16", {"adapter": "full"}),
    ("nemotron_h", "dpo", "bf16", {"adapter": "lora"}),
    ("deepseek_v3", "kto", "bf16", {"adapter": "lora"}),
    # TRL asks Mixtral for its router logits: transformers' output-capturing hooks,
    # installed before the step on the fast path (preference.capture_hooks_first), at the
    # start of the first forward on the reference path.
    ("mixtral", "dpo", "bf16", {"adapter": "lora"}),
    ("mixtral", "kto", "bf16", {"adapter": "full"}),
]


@pytest.mark.parametrize(("arch", "mode", "precision", "options"), PREFERENCE_CASES,
                         ids=[f"{a}-{m}-{p}-{'-'.join(map(str, o.values()))}"
                              for a, m, p, o in PREFERENCE_CASES])
@pytest.mark.parametrize("layers", [None, 1])
def test_preference_losses_repeat_their_second_step(arch, mode, precision, options, layers,
                                                    repeats):
    pytest.importorskip("trl")
    fast, reference = _both(make_config(arch), mode, precision, layers, **options)
    assert repeats == [True], "the second step was run, not counted from the first"
    assert fast == reference


def test_grpo_runs_every_step(repeats):
    # Its loss generates and buffers a batch, which the next generation replaces.
    pytest.importorskip("trl")
    fast, reference = _both(make_config("llama"), "grpo", "bf16", num_generations=2)
    assert repeats == []
    assert fast == reference


def test_a_record_names_what_re_enabling_checkpointing_makes_again():
    # TRL turns gradient checkpointing off and on around every reference forward
    # (trl.models.utils.disable_gradient_checkpointing): a new partial of the same function
    # and arguments, and transformers' input-grads hook again (without peft the earlier
    # one stays). Neither changes what a step makes: the record stays.
    from transformers import AutoModelForCausalLM

    from qplan.planner.prepared_models import state_of

    def model() -> torch.nn.Module:
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(make_config("llama"))
        net.gradient_checkpointing_enable({"use_reentrant": False})
        return net

    net = model()
    before = state_of(net)
    for _ in range(2):
        net.gradient_checkpointing_disable()
        net.gradient_checkpointing_enable({"use_reentrant": False})
    assert len(net.get_input_embeddings()._forward_hooks) == 3
    assert state_of(net) == before
    # Other arguments, or another hook (even one registered twice): a change.
    def twice(m: torch.nn.Module) -> None:
        def hook(*args) -> None: ...

        m.get_input_embeddings().register_forward_hook(hook)

    changes = [
        lambda m: m.gradient_checkpointing_enable({"use_reentrant": True}),
        lambda m: m.get_input_embeddings().register_forward_hook(lambda *a: None),
        twice,
    ]
    for change in changes:
        net = model()
        twice(net)
        before = state_of(net)
        change(net)
        assert state_of(net) != before
