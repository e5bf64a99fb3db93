"""Preference workloads (planner/workloads/dpo.py, preference.py) against TRL's own
trainers run for real on CPU with a tiny llama (tests/preference_loops.py), each peak
within 2% of the plan for ``target="cpu"``; the registry the CLI, the Axolotl reader, the
emitter and the schema derive from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig
from user_loops import lora_model, record_repeats

from qplan.api import estimate
from qplan.errors import UsageError
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.measure import random_model
from qplan.planner.emit import emit_axolotl, estimate_kwargs_of, workload_of
from qplan.planner.workloads import AXOLOTL_RL, MODES, WORKLOADS, option_names

trl = pytest.importorskip("trl")
from preference_loops import concatenated_peak, dpo_peak, kto_peak  # noqa: E402  (needs trl)

TOLERANCE = 0.02
PAIRS, PROMPT, COMPLETION = 2, 40, 55
SEQ = PROMPT + COMPLETION + 1  # TRL appends EOS to each completion

pytestmark = pytest.mark.usefixtures("one_thread")


def plan(folder, mode, precision, **options):
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target="cpu", batch=PAIRS, seq_len=SEQ, lora_r=8, **options)
    return report.candidate(precision)


def assert_close(predicted: int, measured: int, what) -> None:
    error = (predicted - measured) / measured
    assert abs(error) <= TOLERANCE, (what, predicted, measured, f"{error:+.2%}")


# (mode, adapter, ref_model, gradient checkpointing): LoRA's reference is the policy with
# its adapter disabled; full fine-tuning's a frozen copy (TRL loads the checkpoint again:
# here the same weights, passed in); precomputed log-probs keep no reference at all.
CASES = [
    ("dpo", "lora", "auto", False),
    ("dpo", "full", "auto", True),
    ("dpo", "full", "precomputed", True),
    ("ipo", "lora", "auto", True),
    ("dpo", "qlora", "auto", True),  # nf4 base: bitsandbytes runs 4-bit on CPU
]


@pytest.mark.parametrize(("mode", "adapter", "ref", "gc"), CASES)
def test_dpo_trainer_peak(tiny_model_dir, mode, adapter, ref, gc):
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    precision = "nf4" if adapter == "qlora" else "bf16"
    predicted = plan(folder, mode, precision, adapter=adapter, ref_model=ref,
                     gradient_checkpointing=gc)
    model = random_model(config, precision, "bfloat16", "cpu", str(folder))
    ref_model = None
    if adapter != "full":
        model = lora_model(model, r=8, quantized=adapter == "qlora")
    elif ref == "auto":
        ref_model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    loss = {"dpo": "sigmoid", "ipo": "ipo"}[mode]
    measured = dpo_peak(model, PAIRS, PROMPT, COMPLETION, loss_type=loss, ref_model=ref_model,
                        precompute=ref == "precomputed", gradient_checkpointing=gc)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (mode, adapter, ref))
    # The frozen copy is resident beside the policy, exactly its weights.
    reference = predicted.components.get("reference_model", 0)
    if adapter == "full" and ref == "auto":
        assert reference == predicted.components["weights"]
    else:
        assert reference == 0


def test_dpo_trainer_peak_moe(tiny_model_dir):
    """Mixtral: TRL's DPO adds the router's load-balancing loss (router_aux_loss_coef);
    the trace routes statically, a real run by the data."""
    folder = tiny_model_dir("mixtral")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "dpo", "bf16", adapter="lora", gradient_checkpointing=False)
    model = lora_model(random_model(config, "bf16", "bfloat16", "cpu", str(folder)), r=8,
                       quantized=False)
    measured = dpo_peak(model, PAIRS, PROMPT, COMPLETION, gradient_checkpointing=False)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "mixtral")


def test_dpo_trainer_peak_hybrid(tiny_model_dir):
    """Nemotron-H (Mamba-2, attention and MLP layers): its Mamba layers skip the padding
    mask of an unpadded batch (``torch.all(attention_mask == 1)``), which the trace
    decides as the real run does; full fine-tuning with a frozen copy."""
    folder = tiny_model_dir("nemotron_h")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "dpo", "bf16", adapter="full", gradient_checkpointing=True)
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    ref_model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    measured = dpo_peak(model, PAIRS, PROMPT, COMPLETION, ref_model=ref_model,
                        gradient_checkpointing=True)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "nemotron_h")


@pytest.mark.parametrize(("mode", "gc"), [("dpo", True), ("kto", False)])
def test_derived_double_quant_plans_against_trl(tiny_model_dir, mode, gc):
    """QLoRA DPO and KTO at nf4-dq, whose steps are derived from nf4's recorded ones
    (planner/derived_double_quant.py), against TRL's trainers on a double-quantised
    model."""
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, mode, "nf4-dq", adapter="qlora", gradient_checkpointing=gc)
    model = lora_model(random_model(config, "nf4-dq", "bfloat16", "cpu", str(folder)), r=8,
                       quantized=True)
    peak = {"dpo": lambda: dpo_peak(model, PAIRS, PROMPT, COMPLETION, loss_type="sigmoid",
                                    ref_model=None, precompute=False,
                                    gradient_checkpointing=gc),
            "kto": lambda: kto_peak(model, PAIRS, PROMPT, COMPLETION, ref_model=None,
                                    gradient_checkpointing=gc)}[mode]
    measured = peak()
    print(f"{mode} qlora nf4-dq gc={gc}: predicted {predicted.peak_allocated_bytes} "
          f"measured {measured.peak_bytes}")
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (mode, "nf4-dq"))


@pytest.mark.parametrize(("adapter", "gc"), [("lora", False), ("full", True)])
def test_kto_trainer_peak(tiny_model_dir, adapter, gc):
    """KTO: ``--batch`` unpaired examples, each with its KL row scored without gradients
    by the policy and by the reference (a frozen copy under full fine-tuning)."""
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "kto", "bf16", adapter=adapter, gradient_checkpointing=gc)
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    ref_model = None
    if adapter == "lora":
        model = lora_model(model, r=8, quantized=False)
    else:
        ref_model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    measured = kto_peak(model, PAIRS, PROMPT, COMPLETION, ref_model=ref_model,
                        gradient_checkpointing=gc)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, ("kto", adapter))


@pytest.mark.parametrize(("mode", "adapter", "gc"), [
    ("orpo", "lora", False), ("orpo", "full", True), ("simpo", "lora", True),
])
def test_concatenated_forward_trainer_peak(tiny_model_dir, mode, adapter, gc):
    """ORPO and SimPO (TRL's CPO trainer): chosen and rejected rows in one forward with the
    full logits, no reference model."""
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, mode, "bf16", adapter=adapter, gradient_checkpointing=gc)
    assert "reference_model" not in predicted.components
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    if adapter == "lora":
        model = lora_model(model, r=8, quantized=False)
    measured = concatenated_peak(mode, model, PAIRS, PROMPT, COMPLETION,
                                 gradient_checkpointing=gc)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (mode, adapter))


def test_schema_and_cli_follow_the_registry():
    from typer.testing import CliRunner

    from qplan.cli import app

    schema = json.loads((Path(__file__).parents[1] / "qplan/schema/report.v1.json").read_text())
    workload = schema["properties"]["workload"]["properties"]
    assert tuple(workload["mode"]["enum"]) == MODES
    for name in option_names():
        assert name in workload
    for kind in WORKLOADS.values():
        for option in kind.options:
            if option.choices:
                assert tuple(workload[option.name]["enum"]) == option.choices
    assert set(AXOLOTL_RL) == {"dpo", "ipo", "kto", "orpo", "simpo", "grpo"}
    text = CliRunner().invoke(app, ["estimate", "--help"], env={"COLUMNS": "400"}).output
    for mode in MODES:
        assert mode in text


def test_bad_workload_options_are_one_line(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    with pytest.raises(UsageError, match="adapter 'dora': choose one of lora, qlora, full"):
        estimate(folder, gpu="80GiB", mode="dpo", adapter="dora")
    with pytest.raises(UsageError, match="--mode lora takes no workload options, not ref_model"):
        estimate(folder, gpu="80GiB", mode="lora", ref_model="copy")
    with pytest.raises(UsageError, match="--fused-ce is a lever of the causal-LM training step"):
        estimate(folder, gpu="80GiB", mode="dpo", fused_ce="cce")
    with pytest.raises(UsageError, match="--mode orpo takes adapter, not ref_model"):
        estimate(folder, gpu="80GiB", mode="orpo", ref_model="precomputed")
    # The candidates follow the adapter, the GPU's own rows (fp8 on an RTX 4090) too.
    report = estimate(folder, gpu="4090", mode="dpo", adapter="qlora", seq_len=32)
    assert [c.precision for c in report.candidates] == ["fp4", "nf4", "fp4-dq", "nf4-dq"]
    with pytest.raises(UsageError, match="--mode dpo plans only fp32, bf16, fp16"):
        estimate(folder, gpu="80GiB", mode="dpo", adapter="full", precisions="nf4")
    # A stored format peft cannot train with the mode's adapter: the message names the
    # mode asked for and the option that changes it.
    with pytest.raises(UsageError, match=r"--mode dpo \(adapter=qlora\) cannot train this "
                                         r"format: .* plan -O adapter=lora instead"):
        estimate("openai/gpt-oss-20b", gpu="H100", mode="dpo", adapter="qlora", attn="eager")


@pytest.mark.parametrize("options", [
    dict(mode="dpo", precisions="nf4", adapter="lora", kbit_upcast=False),
    dict(mode="ipo", precisions="bf16", adapter="full", ref_model="precomputed"),
    dict(mode="kto", precisions="bf16", adapter="lora"),
    dict(mode="orpo", precisions="nf4-dq", adapter="qlora", kbit_upcast=False),
])
def test_axolotl_rl_round_trip(tiny_model_dir, tmp_path, options):
    # On a 4-bit base the original is planned with Axolotl's dtypes (kbit_upcast=False):
    # Axolotl's loader casts norms and embeddings back after peft's k-bit preparation, so
    # that is what its YAML plans (test_emit's round trips do the same).
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="A100-80GB", seq_len=64, **options)
    text = emit_axolotl(report)
    settings = yaml.safe_load(text)
    assert settings["rl"] == options["mode"]
    path = tmp_path / "axolotl.yml"
    path.write_text(text)
    plan_file = read_axolotl(path)
    assert plan_file.estimate_kwargs == estimate_kwargs_of(report)
    assert "rl" in plan_file.keys.read
    again = estimate(plan_file.model, gpu="A100-80GB", **plan_file.estimate_kwargs)
    precision = report.recommendation.precision
    # LoRA on a 4-bit base reads back as Axolotl's qlora: the same step and plan.
    replanned = dict(workload_of(again).extra)
    assert replanned == {k: plan_file.estimate_kwargs[k] for k in replanned}
    if "ref_model" in replanned:
        assert replanned["ref_model"] == options.get("ref_model", "auto")
    assert again.candidate(precision) == report.candidate(precision)


def test_axolotl_dpo_yaml(tiny_model_dir, tmp_path):
    """An Axolotl DPO config: rl, its coefficient (no memory), the reference's key."""
    path = tmp_path / "dpo.yml"
    path.write_text(f"base_model: {tiny_model_dir('llama')}\nrl: dpo\nrl_beta: 0.1\n"
                    "precompute_ref_log_probs: true\nsequence_len: 64\nbf16: true\n")
    plan_file = read_axolotl(path)
    assert plan_file.estimate_kwargs["mode"] == "dpo"
    assert plan_file.estimate_kwargs["adapter"] == "full"
    assert plan_file.estimate_kwargs["ref_model"] == "precomputed"
    assert {"rl", "precompute_ref_log_probs"} <= set(plan_file.keys.read)
    assert "rl_beta" in plan_file.keys.ignored


def test_axolotl_rl_not_planned_is_a_warning(tiny_model_dir, tmp_path):
    path = tmp_path / "ppo.yml"
    path.write_text(f"base_model: {tiny_model_dir('llama')}\nrl: ppo\nadapter: lora\n")
    plan_file = read_axolotl(path)
    assert plan_file.estimate_kwargs["mode"] == "lora"
    assert "rl" in plan_file.keys.not_modelled


def test_cli_plans_a_preference_mode_as_json(tiny_model_dir):
    from typer.testing import CliRunner

    from qplan.cli import app

    folder = str(tiny_model_dir("llama"))
    result = CliRunner().invoke(app, [
        "estimate", folder, "--mode", "dpo", "-O", "adapter=full", "--gpu", "24GiB",
        "--seq-len", "64", "--precisions", "bf16", "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["workload"]["mode"] == "dpo"
    assert report["workload"]["adapter"] == "full"
    assert report["workload"]["ref_model"] == "auto"
    candidate = report["candidates"][0]
    assert candidate["components"]["reference_model"] == candidate["components"]["weights"]
    bad = CliRunner().invoke(app, ["estimate", folder, "--mode", "dpo", "-O", "adapter"])
    assert bad.exit_code == 2
    assert "write NAME=VALUE" in bad.output


# The second optimizer step's forward and backward are counted from the first's log
# (planner/repeated_steps.py: the losses read the policy, the reference and a fixed
# batch; ORPO/CPO keep their metric scalars): TRL's two real steps against such plans.
# LLM.int8 bases too: their layers' step scratch is put back before the count.
@pytest.mark.parametrize(("mode", "adapter", "gc", "precision"), [
    ("dpo", "lora", True, "bf16"), ("kto", "full", False, "bf16"),
    ("simpo", "lora", True, "bf16"), ("dpo", "lora", True, "int8"),
    ("orpo", "lora", True, "int8"),
])
def test_preference_plans_whose_second_step_was_counted(tiny_model_dir, monkeypatch, mode,
                                                        adapter, gc, precision):
    repeated = record_repeats(monkeypatch)
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, mode, precision, adapter=adapter, gradient_checkpointing=gc)
    assert repeated and all(repeated), "the second step was run, not counted"
    model = random_model(config, precision, "bfloat16", "cpu", str(folder))
    ref_model = None
    if adapter == "lora":
        model = lora_model(model, r=8, quantized=precision == "int8")
    elif mode != "simpo":
        ref_model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    if mode == "dpo":
        measured = dpo_peak(model, PAIRS, PROMPT, COMPLETION, ref_model=ref_model,
                            gradient_checkpointing=gc)
    elif mode == "kto":
        measured = kto_peak(model, PAIRS, PROMPT, COMPLETION, ref_model=ref_model,
                            gradient_checkpointing=gc)
    else:
        measured = concatenated_peak(mode, model, PAIRS, PROMPT, COMPLETION,
                                     gradient_checkpointing=gc)
    print(mode, adapter, precision, predicted.peak_allocated_bytes, measured.peak_bytes,
          f"{(predicted.peak_allocated_bytes - measured.peak_bytes) / measured.peak_bytes:+.4%}")
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (mode, adapter))
