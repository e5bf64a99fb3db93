"""qplan.loading.load: real CPU loads of tiny models, measured against the plan."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qplan.errors import ModelNotFoundError, QplanError, UsageError
from qplan.loading import load, read_report
from qplan.planner.emit import workload_of
from qplan.planner.precision import PRECISION_NAMES
from qplan.report import report_dict


@pytest.mark.parametrize("precision", PRECISION_NAMES)
def test_load_measures_exactly_the_planned_weights(tiny_model_dir, precision):
    folder = tiny_model_dir("llama")
    loaded = load(str(folder), gpu="24GiB", precision=precision, device="cpu", mode="load")
    measured = loaded.report.measured
    candidate = loaded.report.candidate(precision)
    assert measured["device"] == "cpu"
    assert measured["precision"] == precision
    assert measured["resident_bytes"] == candidate.weights_bytes
    assert measured["predicted_bytes"] == candidate.weights_bytes
    assert measured["error_pct"] == 0.0
    assert loaded.tokenizer is None  # the tiny folder ships no tokenizer
    # The measured report is still valid JSON of the v1 schema.
    assert json.loads(json.dumps(report_dict(loaded.report)))["measured"] == measured


def test_default_is_the_recommendation(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    loaded = load(str(folder), gpu="24GiB", device="cpu", mode="load")
    assert loaded.report.measured["precision"] == loaded.report.recommendation.precision


def _norms(model):
    return [(n, p) for n, p in model.named_parameters() if "norm" in n]


def test_lora_bf16(tiny_model_dir):
    folder = tiny_model_dir("llama")
    loaded = load(
        str(folder),
        gpu="24GiB",
        precision="bf16",
        device="cpu",
        mode="lora",
        lora_r=8,
        lora_targets=["q_proj", "v_proj"],
    )
    model, measured = loaded.model, loaded.report.measured
    trainable, total = model.get_nb_trainable_parameters()
    assert measured["trainable_parameters"] == trainable
    assert measured["all_parameters"] == total
    # Exact count from the LoRA config: r * (in + out) per adapted layer, float32.
    assert measured["predicted_adapter_bytes"] == 4 * trainable == measured["adapter_bytes"]
    assert measured["error_pct"] == 0.0
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
        if "lora_" in name:
            assert param.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for _, p in _norms(model))  # no k-bit upcast
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False


def test_qlora_nf4_dq(tiny_model_dir):
    folder = tiny_model_dir("llama")
    loaded = load(str(folder), gpu="24GiB", precision="nf4-dq", device="cpu", mode="qlora")
    model, measured = loaded.model, loaded.report.measured
    trainable, _ = model.get_nb_trainable_parameters()
    assert measured["trainable_parameters"] == trainable
    assert measured["predicted_adapter_bytes"] == 4 * trainable
    assert measured["weights_bytes"] == loaded.report.candidate("nf4-dq").weights_bytes
    assert measured["error_pct"] == 0.0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # prepare_model_for_kbit_training casts the 16-bit leftovers (norms, embeddings) to fp32.
    norms = _norms(model)
    assert norms and all(p.dtype == torch.float32 for _, p in norms)
    assert measured["training_setup_extra_bytes"] > 0
    # ...which the plan's post-setup weights (+ adapters) predict, allocator-rounded for CUDA.
    assert measured["resident_error_pct"] == 0.0
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False


def test_qlora_planned_for_cpu_is_exact_to_the_byte(tiny_model_dir):
    folder = tiny_model_dir("llama")
    loaded = load(
        str(folder), gpu="24GiB", precision="nf4", device="cpu", mode="qlora", target="cpu"
    )
    measured = loaded.report.measured
    assert measured["resident_bytes"] == measured["planned_resident_bytes"]


def test_lora_on_fused_moe_experts(tiny_model_dir):
    """peft adapts Mixtral's fused 3-D expert tensors too; the prediction uses its rules."""
    loaded = load(
        str(tiny_model_dir("mixtral")), gpu="24GiB", precision="bf16", device="cpu", mode="lora"
    )
    measured = loaded.report.measured
    trainable, _ = loaded.model.get_nb_trainable_parameters()
    assert measured["predicted_adapter_bytes"] == 4 * trainable == measured["adapter_bytes"]
    assert measured["error_pct"] == 0.0


def test_full_fine_tuning_trains_everything(tiny_model_dir):
    folder = tiny_model_dir("llama")
    loaded = load(
        str(folder),
        gpu="24GiB",
        precision="bf16",
        device="cpu",
        mode="full",
        gradient_checkpointing=False,
    )
    assert all(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.is_gradient_checkpointing
    assert loaded.report.measured["resident_bytes"] == loaded.report.candidate("bf16").weights_bytes


def test_random_weights_from_config_only_folder(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("qwen2")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    loaded = load(
        str(tmp_path), gpu="24GiB", precision="nf4", device="cpu", mode="load", random_weights=True
    )
    candidate = loaded.report.candidate("nf4")
    assert loaded.report.measured["resident_bytes"] == candidate.weights_bytes
    assert any("random" in w for w in loaded.report.warnings)


def test_random_weights_from_catalog_entry():
    loaded = load(
        "openai-community/gpt2",
        gpu="24GiB",
        precision="int8",
        device="cpu",
        mode="load",
        random_weights=True,
    )
    assert loaded.report.measured["error_pct"] == 0.0


def test_missing_weights_is_one_line_error(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError) as info:
        load(str(tmp_path), gpu="24GiB", precision="bf16", device="cpu", mode="load")
    message = str(info.value)
    assert "\n" not in message and "--random-weights" in message


def test_catalog_entry_without_weights_is_an_error():
    with pytest.raises(ModelNotFoundError, match="--random-weights"):
        load("openai-community/gpt2", gpu="24GiB", precision="bf16", device="cpu", mode="load")


def test_from_report_round_trip(tiny_model_dir, tmp_path):
    from qplan.api import estimate

    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="T4", mode="lora", lora_r=4, precisions="nf4,bf16")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(report_dict(report)))
    # JSON has lists where the report has tuples: compare the JSON forms.
    assert report_dict(read_report(path)) == report_dict(report)
    loaded = load(folder, from_report=path, device="cpu")
    assert loaded.report.recommendation == report.recommendation
    assert workload_of(loaded.report) == workload_of(report)
    assert loaded.report.measured["precision"] == report.recommendation.precision
    assert loaded.report.measured["error_pct"] == 0.0
    # The model may be left out: the report names it.
    again = load(None, from_report=report_dict(report), precision="nf4", device="cpu")
    assert again.report.measured["precision"] == "nf4"


def test_from_report_of_another_model(tiny_model_dir):
    from qplan.api import estimate

    report = estimate(str(tiny_model_dir("llama")), gpu="24GiB", mode="load")
    with pytest.raises(UsageError, match="plans"):
        load(str(tiny_model_dir("gpt2")), from_report=report_dict(report), device="cpu")


def test_from_report_rejects_other_schema_and_workload_kwargs(tiny_model_dir):
    from qplan.api import estimate

    folder = str(tiny_model_dir("llama"))
    data = report_dict(estimate(folder, gpu="24GiB", mode="load"))
    with pytest.raises(QplanError, match="schema"):
        load(folder, from_report={**data, "schema": "other/v9"}, device="cpu")
    with pytest.raises(UsageError, match="from_report"):
        load(folder, from_report=data, device="cpu", mode="lora")


def test_precision_not_planned(tiny_model_dir):
    with pytest.raises(UsageError, match="not in the plan"):
        load(
            str(tiny_model_dir("llama")),
            gpu="24GiB",
            precision="nf4",
            device="cpu",
            mode="load",
            precisions="bf16",
        )


def test_nothing_fits_without_forced_precision(tiny_model_dir):
    with pytest.raises(QplanError, match="nothing to load"):
        load(str(tiny_model_dir("llama")), gpu="1MiB", device="cpu", mode="load")


def test_cuda_without_cuda_is_device_error(tiny_model_dir, monkeypatch):
    from qplan.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA"):
        load(
            str(tiny_model_dir("llama")), gpu="24GiB", precision="bf16", device="cuda", mode="load"
        )


def test_oom_frees_and_names_what_fits(tiny_model_dir, monkeypatch):
    import transformers

    folder = str(tiny_model_dir("llama"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(QplanError) as info:
        load(folder, gpu="24GiB", precision="fp32", device="cpu", mode="load")
    message = str(info.value)
    assert "predicted" in message and "recommends bf16" in message and "\n" not in message


def _save_tiny_tokenizer(folder):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)


def test_tokenizer_is_loaded_when_the_folder_has_one(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path / "config.json")
    _save_tiny_tokenizer(tmp_path)
    loaded = load(
        str(tmp_path), gpu="24GiB", precision="bf16", device="cpu", mode="load", random_weights=True
    )
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("hello world")["input_ids"] == [1, 2]
