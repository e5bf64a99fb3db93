"""GRPO (planner/workloads/grpo.py) against TRL's own GRPOTrainer run for real on CPU with
a tiny llama (tests/preference_loops.py: generation through transformers' ``generate``, a
Python reward function, the policy step), each peak within 2% of the plan for
``target="cpu"``, the generation's own peak too; the CLI, the schema and the Axolotl
reader follow the registry."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoConfig
from user_loops import lora_model

from qplan.api import estimate, make_workload
from qplan.errors import UsageError
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.measure import random_model
from qplan.planner.components import trace_components
from qplan.planner.emit import emit_axolotl, estimate_kwargs_of

trl = pytest.importorskip("trl")
from preference_loops import grpo_peak  # noqa: E402  (needs trl)

TOLERANCE = 0.02
# 4 completions a step: one prompt of 16 words sampled 4 times for 24 tokens.
BATCH, PROMPT, COMPLETION, GENERATIONS = 4, 16, 24, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def options(adapter: str, beta: float) -> dict:
    return dict(adapter=adapter, num_generations=GENERATIONS,
                max_completion_length=COMPLETION, beta=beta)


def assert_close(predicted: int, measured: int, what) -> None:
    error = (predicted - measured) / measured
    assert abs(error) <= TOLERANCE, (what, predicted, measured, f"{error:+.2%}")


# (arch, adapter, beta, gradient checkpointing, check the generation's own peak). beta 0.0
# is TRL's default: no reference. With beta > 0, a peft model gets a "ref" copy of its
# adapter, full fine-tuning a frozen copy of the model (TRL loads the checkpoint again).
# Nemotron-H generates with a hybrid cache (Mamba-2 conv and SSM states, attention KV);
# falcon-mamba's plan fills its cache with an untracked scan of two real tokens and trains
# through the counted scan node (planner/recurrent_scan.py, recurrent_scan_graph.py).
CASES = [
    ("llama", "lora", 0.0, False, True),
    ("llama", "lora", 0.04, True, False),
    ("llama", "full", 0.04, True, False),
    ("nemotron_h", "full", 0.0, True, True),
    ("falcon_mamba", "full", 0.0, True, True),
]


@pytest.mark.parametrize(("arch", "adapter", "beta", "gc", "generation_check"), CASES)
def test_grpo_trainer_peak(tiny_model_dir, arch, adapter, beta, gc, generation_check):
    folder = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(folder)
    report = estimate(str(folder), gpu="80GiB", mode="grpo", precisions="bf16", target="cpu",
                      batch=BATCH, seq_len=PROMPT, lora_r=8, gradient_checkpointing=gc,
                      **options(adapter, beta))
    predicted = report.candidate("bf16")
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    if adapter == "lora":
        model = lora_model(model, r=8, quantized=False)
    measured, generation = grpo_peak(model, BATCH, PROMPT, COMPLETION,
                                     num_generations=GENERATIONS, beta=beta,
                                     gradient_checkpointing=gc)
    print(arch, adapter, beta, "step", predicted.peak_allocated_bytes, measured.peak_bytes)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (arch, adapter, beta))
    # The reference, resident beside the policy: the model's weights again under full
    # fine-tuning, the adapter again under LoRA; none at beta 0.
    parts = predicted.components
    reference = parts.get("reference_model", 0)
    if beta == 0.0:
        assert reference == 0
    elif adapter == "full":
        assert reference == parts["weights"]
    else:
        assert reference == parts["adapters"] > 0
    if generation_check:
        # The generation's own peak (model.generate inside the step): prefill and the last
        # decoding step over the whole cache, beside the optimizer states.
        workload = make_workload("grpo", config, batch=BATCH, seq_len=PROMPT, lora_r=8,
                                 gradient_checkpointing=gc, **options(adapter, beta))
        outcome = trace_components(config, workload, "bf16", "bfloat16", target="cpu")
        print(arch, "generate", outcome.phase_peaks["generate"], generation)
        assert_close(outcome.phase_peaks["generate"], generation, (arch, "generate"))


def test_grpo_gradient_accumulation_peak(tiny_model_dir):
    """Two micro-steps per optimizer step: TRL generates both steps' completions at once
    (steps_per_generation = gradient_accumulation_steps), and the first micro-step's
    gradients stay through the second."""
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    report = estimate(str(folder), gpu="80GiB", mode="grpo", precisions="bf16", target="cpu",
                      batch=BATCH, seq_len=PROMPT, gradient_checkpointing=True,
                      steps_per_generation=2, **options("full", 0.0))
    predicted = report.candidate("bf16")
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    measured, _ = grpo_peak(model, BATCH, PROMPT, COMPLETION, num_generations=GENERATIONS,
                            gradient_checkpointing=True, accumulation=2)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "accumulation")
    # Every parameter's gradient (the weights less the rotary buffer) is resident.
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert predicted.components["gradients"] == params


def test_grpo_batch_is_whole_groups(tiny_model_dir):
    """The default batch is one group of completions; --solve batch searches whole groups
    (TRL refuses a generation batch that splits one)."""
    folder = str(tiny_model_dir("llama"))
    common = dict(mode="grpo", precisions="bf16", seq_len=16, num_generations=4,
                  max_completion_length=8, gradient_checkpointing=False)
    assert estimate(folder, gpu="80GiB", **common).workload["batch"] == 4
    report = estimate(folder, gpu="1GiB", solve="batch", **common)
    (solution,) = report.solutions
    assert solution.value is not None and solution.value % 4 == 0
    assert all(value % 4 == 0 for value, _ in solution.points)
    again = estimate(folder, gpu="1GiB", batch=solution.value, **common)
    assert again.candidate("bf16").fits


def test_grpo_options_are_checked(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    with pytest.raises(UsageError, match="must be a multiple of num_generations 8"):
        estimate(folder, gpu="80GiB", mode="grpo", batch=6, seq_len=16,
                 max_completion_length=8, precisions="bf16")
    with pytest.raises(UsageError, match="num_generations takes a whole number"):
        estimate(folder, gpu="80GiB", mode="grpo", num_generations="two")
    with pytest.raises(UsageError, match="needs num_generations of at least 2"):
        estimate(folder, gpu="80GiB", mode="grpo", num_generations=1)
    with pytest.raises(UsageError, match="--mode grpo takes adapter, num_generations"):
        estimate(folder, gpu="80GiB", mode="grpo", ref_model="copy")


def test_cli_plans_grpo_as_json(tiny_model_dir):
    from typer.testing import CliRunner

    from qplan.cli import app
    from qplan.report import load_schema

    jsonschema = pytest.importorskip("jsonschema")
    folder = str(tiny_model_dir("llama"))
    result = CliRunner().invoke(app, [
        "estimate", folder, "--mode", "grpo", "-O", "num_generations=4",
        "-O", "max_completion_length=16", "-O", "beta=0.04", "--batch", "4", "--gpu", "24GiB",
        "--seq-len", "32", "--precisions", "bf16", "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, load_schema())
    workload = report["workload"]
    assert workload["mode"] == "grpo"
    assert (workload["num_generations"], workload["max_completion_length"], workload["beta"],
            workload["steps_per_generation"], workload["adapter"]) == (4, 16, 0.04, 1, "lora")
    components = report["candidates"][0]["components"]
    assert components["reference_model"] == components["adapters"]


def test_axolotl_grpo_yaml(tiny_model_dir, tmp_path):
    """An Axolotl GRPO config: rl, its trl: keys, gradient accumulation (TRL's steps per
    generation); use_vllm: true is a one-line warning (generation not planned)."""
    path = tmp_path / "grpo.yml"
    path.write_text(
        f"base_model: {tiny_model_dir('llama')}\nrl: grpo\nadapter: lora\nlora_r: 8\n"
        "sequence_len: 32\nmicro_batch_size: 4\ngradient_accumulation_steps: 2\nbf16: true\n"
        "trl:\n  num_generations: 4\n  max_completion_length: 16\n  beta: 0.001\n"
        "  use_vllm: false\n  reward_funcs:\n    - rewards.length_reward\n"
    )
    plan_file = read_axolotl(path)
    kwargs = plan_file.estimate_kwargs
    assert kwargs["mode"] == "grpo"
    assert (kwargs["adapter"], kwargs["num_generations"], kwargs["max_completion_length"],
            kwargs["beta"], kwargs["steps_per_generation"]) == ("lora", 4, 16, 0.001, 2)
    assert {"rl", "trl", "gradient_accumulation_steps"} <= set(plan_file.keys.read)
    assert not plan_file.keys.not_modelled
    report = estimate(plan_file.model, gpu="A100-80GB", **kwargs)
    assert report.workload["steps_per_generation"] == 2
    # --emit axolotl writes the same keys back.
    emitted = tmp_path / "emitted.yml"
    emitted.write_text(emit_axolotl(report))
    settings = yaml.safe_load(emitted.read_text())
    assert settings["rl"] == "grpo"
    assert settings["trl"]["num_generations"] == 4
    assert settings["gradient_accumulation_steps"] == 2
    assert read_axolotl(emitted).estimate_kwargs == estimate_kwargs_of(report)

    vllm = tmp_path / "vllm.yml"
    vllm.write_text(path.read_text().replace("use_vllm: false", "use_vllm: true"))
    warned = read_axolotl(vllm)
    assert warned.estimate_kwargs["mode"] == "grpo"
    assert "vLLM" in warned.keys.not_modelled["trl"]
