"""Image inputs of vision-language models (``--images``, planner/vision.py) against the
loops users run on CPU: ``model.generate`` with pixel values for inference, transformers'
``Trainer`` on image+text batches for training (LoRA through peft on the language model
only, as Axolotl's multimodal docs advise; full fine-tuning with the tower trained).
Tiny random models built from shrunk configs; every peak within 2% of the plan for
``target="cpu"``, the resident parts exact.

The batches are made here as a processor makes them: the image placeholder token repeated
once per image feature in ``input_ids`` (576 for llava-1.5 at 336 px; 16 for the tiny
tower's 56 px images with 14 px patches, the CLS token dropped) and the pixel values of
the tower's input size.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from transformers import AutoConfig
from user_loops import LoopPeak, _quiet

from qplan.api import estimate
from qplan.errors import UsageError
from qplan.loaders.measure import random_model
from qplan.loaders.resident import resident_bytes
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.steps import StepTensors, track_model

TOLERANCE = 0.02
BATCH, SEQ, IMAGES = 2, 96, 2
# Axolotl's multimodal LoRA targets: the language model's projections only.
LANGUAGE_LORA = r"model.language_model.layers.[\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"

pytestmark = pytest.mark.usefixtures("one_thread")


def plan(folder, mode, precision="bf16", **options):
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target="cpu", batch=BATCH, seq_len=SEQ, images=IMAGES, **options)
    return report, report.candidate(precision)


def assert_close(predicted: int, measured: int, what) -> None:
    error = (predicted - measured) / measured
    assert abs(error) <= TOLERANCE, (what, predicted, measured, f"{error:+.2%}")


def processor_batch(config, tokens_per_image: int, pixel_shape: tuple[int, ...]):
    """What a processor hands the model: ids with one placeholder run per image (after a
    separator token), the pixel values, and labels with the image tokens ignored."""
    image_token = config.image_token_id
    generator = torch.Generator().manual_seed(1)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, image_token, (BATCH, SEQ), generator=generator)
    for k in range(IMAGES):
        start = 1 + k * (tokens_per_image + 1)
        ids[:, start:start + tokens_per_image] = image_token
    assert image_token < vocab
    pixels = torch.rand((BATCH * IMAGES, *pixel_shape), generator=generator)
    labels = ids.masked_fill(ids == image_token, -100)
    return ids, pixels, labels


def generate_peak(model, ids, inputs) -> LoopPeak:
    tracker = LiveTensorTracker()
    track_model(model, tracker, StepTensors())
    for tensor in (ids, *inputs.values()):
        tracker.add(tensor)  # the processor's outputs are on the device before generate
    with _quiet(), tracker:
        out = model.generate(ids, **inputs, max_new_tokens=1, min_new_tokens=1,
                             do_sample=False, return_dict_in_generate=True)
    storages = {}
    for layer in out.past_key_values.layers:
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return LoopPeak(tracker.peak, sum(storages.values()))


def trainer_peak(model, rows: list[dict], collate, steps: int = 2) -> LoopPeak:
    """Trainer's defaults (fused AdamW, max_grad_norm 1.0, no autocast) with the
    multimodal collator a VLM recipe passes (pixel values of all images concatenated)."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="qplan-vlm-") as out, _quiet():
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, bf16=False,
            activation_checkpointing=True, use_cpu=True, save_strategy="no", report_to=[],
            logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        tracker = LiveTensorTracker()
        track_model(trainer.model, tracker, StepTensors())
        with tracker:
            trainer.train()
    return LoopPeak(tracker.peak)


def _collate_images(rows: list[dict]) -> dict:
    batch = {key: torch.stack([row[key] for row in rows])
             for key in rows[0] if key != "pixel_values"}
    batch["pixel_values"] = torch.cat([row["pixel_values"] for row in rows])
    return batch


def _rows(ids, pixels, labels) -> list[dict]:
    per_row = pixels.shape[0] // ids.shape[0]
    return [{"input_ids": ids[i], "labels": labels[i],
             "pixel_values": pixels[i * per_row:(i + 1) * per_row]}
            for i in range(ids.shape[0])]


def lora_on_language_model(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=LANGUAGE_LORA,
                                            task_type="CAUSAL_LM"))


# --- llava ---------------------------------------------------------------------------

def _llava(tiny_model_dir):
    folder = tiny_model_dir("llava")
    config = AutoConfig.from_pretrained(folder)
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2  # + CLS, - CLS (default)
    return folder, config, tokens, (3, vision.image_size, vision.image_size)


def test_llava_image_tokens_follow_the_tower(tiny_model_dir):
    """The plan's tokens per image are what the model's own image features have."""
    folder, config, tokens, shape = _llava(tiny_model_dir)
    report, _ = plan(folder, "inference")
    assert report.workload["images"] == IMAGES
    assert report.workload["image_tokens_per_image"] == tokens == 16
    assert report.workload["image_tokens"] == IMAGES * tokens
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=torch.rand((1, *shape)))
    pooled = getattr(features, "pooler_output", features)
    pooled = torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
    assert pooled.reshape(-1, config.text_config.hidden_size).shape[0] == tokens


def test_llava_generate_with_images(tiny_model_dir):
    folder, config, tokens, shape = _llava(tiny_model_dir)
    _, predicted = plan(folder, "inference")
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    ids, pixels, _ = processor_batch(config, tokens, shape)
    measured = generate_peak(model, ids, {"pixel_values": pixels})
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "llava generate")
    assert predicted.components["kv_cache"] == measured.kv_cache_bytes


def test_llava_lora_with_images_trains_the_language_model_only(tiny_model_dir):
    folder, config, tokens, shape = _llava(tiny_model_dir)
    report, predicted = plan(folder, "lora", lora_r=8)
    assert report.workload["vision_frozen"] is True
    model = lora_on_language_model(random_model(config, "bf16", "bfloat16", "cpu",
                                                str(folder)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert predicted.components["adapters"] == 4 * trainable  # fp32 adapters, same ones
    ids, pixels, labels = processor_batch(config, tokens, shape)
    measured = trainer_peak(model, _rows(ids, pixels, labels), _collate_images)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "llava lora")


def test_llava_full_fine_tuning_trains_the_tower(tiny_model_dir):
    folder, config, tokens, shape = _llava(tiny_model_dir)
    report, predicted = plan(folder, "full")
    assert report.workload["vision_frozen"] is False
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    ids, pixels, labels = processor_batch(config, tokens, shape)
    measured = trainer_peak(model, _rows(ids, pixels, labels), _collate_images)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "llava full")
    assert predicted.components["weights"] == resident_bytes(model).bytes
    assert all(p.requires_grad for p in model.parameters())


def test_images_grow_the_plan(tiny_model_dir):
    folder, *_ = _llava(tiny_model_dir)
    text = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16", target="cpu",
                    batch=BATCH, seq_len=SEQ).candidate("bf16")
    _, images = plan(folder, "lora")
    assert images.peak_allocated_bytes > text.peak_allocated_bytes


@pytest.mark.parametrize(("options", "message"), [
    (dict(images=-1), "--images must be a whole number"),
    (dict(images="two"), "--images must be a whole number"),
    (dict(images=1, seq_len=16), "raise --seq-len to at least 19"),
    (dict(images=1, image_size="big"), "--image-size 'big' is not a size"),
    (dict(image_size=448), "give --images too"),
    (dict(images=1, mode="dpo"), "--mode dpo plans text only"),
    (dict(images=1, mode="lora", sample_packing=True), "--sample-packing is not planned"),
    (dict(train_vision=True), "--train-vision / --freeze-vision decide what trains"),
])
def test_bad_image_options_are_one_line_errors(tiny_model_dir, options, message):
    folder, *_ = _llava(tiny_model_dir)
    options = {"mode": "inference", "seq_len": SEQ, **options}
    with pytest.raises(UsageError, match=message):
        estimate(str(folder), gpu="80GiB", precisions="bf16", target="cpu", **options)


def test_text_only_models_refuse_images(tiny_model_dir):
    with pytest.raises(UsageError, match="text-only model"):
        estimate(str(tiny_model_dir("llama")), gpu="80GiB", precisions="bf16", images=1)


def _deep_llava(tiny_model_dir):
    """Six decoder layers: traced at 2 and 4 and extrapolated, while the tower (2 layers,
    as deep as the shallow trace's decoder) is traced whole each time."""
    from tiny_models import TINY_CONFIGS

    text = {**TINY_CONFIGS["llava"]["text_config"], "num_hidden_layers": 6}
    folder = tiny_model_dir("llava", text_config=text)
    config = AutoConfig.from_pretrained(folder)
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    return folder, config, tokens, (3, vision.image_size, vision.image_size)


@pytest.mark.parametrize("mode", ["inference", "lora"])
def test_llava_deeper_than_the_trace(tiny_model_dir, mode):
    folder, config, tokens, shape = _deep_llava(tiny_model_dir)
    _, predicted = plan(folder, mode, lora_r=8)
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    ids, pixels, labels = processor_batch(config, tokens, shape)
    if mode == "inference":
        measured = generate_peak(model, ids, {"pixel_values": pixels})
        assert predicted.components["kv_cache"] == measured.kv_cache_bytes
    else:
        measured = trainer_peak(lora_on_language_model(model), _rows(ids, pixels, labels),
                                _collate_images)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, ("deep llava", mode))


def test_llava_qlora_with_images(tiny_model_dir):
    """peft's k-bit preparation on a 4-bit vision-language model (bitsandbytes on CPU)."""
    from peft import prepare_model_for_kbit_training

    folder, config, tokens, shape = _llava(tiny_model_dir)
    _, predicted = plan(folder, "qlora", precision="nf4", lora_r=8)
    model = random_model(config, "nf4", "bfloat16", "cpu", str(folder))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = lora_on_language_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert predicted.components["adapters"] == 4 * trainable
    # At the peak the tower's 4-bit layers have swapped a few quant-state tensors (their
    # first forward): 2,304 of the resident bytes count elsewhere then.
    resident = resident_bytes(model).bytes
    assert 0 <= resident - predicted.components["weights"] - \
        predicted.components["adapters"] <= 4096
    ids, pixels, labels = processor_batch(config, tokens, shape)
    measured = trainer_peak(model, _rows(ids, pixels, labels), _collate_images)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "llava qlora")


def test_llava_lora_with_the_tower_trained(tiny_model_dir):
    """--train-vision: peft's all-linear as it is, adapters in the tower and projector."""
    from peft import LoraConfig, get_peft_model

    folder, config, tokens, shape = _llava(tiny_model_dir)
    report, predicted = plan(folder, "lora", lora_r=8, train_vision=True)
    assert report.workload["vision_frozen"] is False
    model = get_peft_model(random_model(config, "bf16", "bfloat16", "cpu", str(folder)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert predicted.components["adapters"] == 4 * trainable
    ids, pixels, labels = processor_batch(config, tokens, shape)
    measured = trainer_peak(model, _rows(ids, pixels, labels), _collate_images)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "llava lora, tower")


@pytest.mark.parametrize("kind", ["cce", "liger"])
def test_llava_fused_cross_entropy_with_images(tiny_model_dir, kind):
    """A fused linear cross-entropy runs the base model (tower, projector, language model)
    and the fused loss: the loss transformers' forward computes, no logits; the plan
    against the same step on real tensors."""
    from qplan.api import make_workload
    from qplan.loaders.measure import measure
    from qplan.planner.fused_ce import fused_ce_loss

    folder, config, tokens, shape = _llava(tiny_model_dir)
    _, predicted = plan(folder, "lora", lora_r=8, fused_ce=kind)
    assert predicted.components["logits"] == 0
    model = random_model(config, "bf16", "float32", "cpu", str(folder)).float()
    ids, pixels, labels = processor_batch(config, tokens, shape)
    with torch.no_grad():
        fused = fused_ce_loss(model, ids, kind, labels, None, {"pixel_values": pixels})
        reference = model(input_ids=ids, labels=labels, pixel_values=pixels).loss
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    workload = make_workload("lora", config, batch=BATCH, seq_len=SEQ, images=IMAGES,
                             lora_r=8, fused_ce=kind)
    measured = measure(config, workload, "bf16", predicted.compute_dtype)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, ("fused", kind))
    for part in ("weights", "adapters", "optimizer_states", "gradients"):
        assert predicted.components[part] == measured.components[part], part


# --- Qwen2.5-VL ----------------------------------------------------------------------

QWEN_SIZE = (112, 84)  # smart_resize keeps it (multiples of 28): 8 x 6 patches


def _qwen(tiny_model_dir):
    folder = tiny_model_dir("qwen2_5_vl")
    config = AutoConfig.from_pretrained(folder)
    vision = config.vision_config
    rows, cols = QWEN_SIZE[0] // vision.patch_size, QWEN_SIZE[1] // vision.patch_size
    tokens = rows * cols // vision.spatial_merge_size**2
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    return folder, config, tokens, (rows * cols, patch), (1, rows, cols)


def _qwen_inputs(config, tokens, shape, grid):
    """What Qwen2_5_VLProcessor returns: flattened patches of every image, one grid row
    per image and the mm_token_type_ids the model's 3-D positions are computed from."""
    ids, pixels, labels = processor_batch(config, tokens, shape)
    pixels = pixels.reshape(-1, shape[-1])
    grids = torch.tensor([grid] * (BATCH * IMAGES))
    kinds = (ids == config.image_token_id).int()
    return ids, pixels, labels, grids, kinds


def test_qwen2_5_vl_generate_with_images(tiny_model_dir):
    folder, config, tokens, shape, grid = _qwen(tiny_model_dir)
    report, predicted = plan(folder, "inference", image_size="112x84")
    assert report.workload["image_tokens_per_image"] == tokens == 12
    assert report.workload["image_pixels"] == list(QWEN_SIZE)
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    ids, pixels, _, grids, kinds = _qwen_inputs(config, tokens, shape, grid)
    measured = generate_peak(model, ids, {"pixel_values": pixels, "image_grid_thw": grids,
                                          "mm_token_type_ids": kinds})
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "qwen2.5-vl generate")
    assert predicted.components["kv_cache"] in (0, measured.kv_cache_bytes)


def _collate_qwen(rows: list[dict]) -> dict:
    batch = {key: torch.stack([row[key] for row in rows])
             for key in ("input_ids", "labels", "mm_token_type_ids")}
    for key in ("pixel_values", "image_grid_thw"):
        batch[key] = torch.cat([row[key] for row in rows])
    return batch


def _qwen_rows(ids, pixels, labels, grids, kinds) -> list[dict]:
    images = grids.shape[0] // ids.shape[0]
    patches = pixels.shape[0] // ids.shape[0]
    return [{"input_ids": ids[i], "labels": labels[i], "mm_token_type_ids": kinds[i],
             "pixel_values": pixels[i * patches:(i + 1) * patches],
             "image_grid_thw": grids[i * images:(i + 1) * images]}
            for i in range(ids.shape[0])]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_qwen2_5_vl_training_with_images(tiny_model_dir, mode):
    folder, config, tokens, shape, grid = _qwen(tiny_model_dir)
    report, predicted = plan(folder, mode, image_size="112x84", lora_r=8)
    assert report.workload["vision_frozen"] is (mode == "lora")
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    if mode == "lora":
        model = lora_on_language_model(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert predicted.components["adapters"] == 4 * trainable
    inputs = _qwen_inputs(config, tokens, shape, grid)
    measured = trainer_peak(model, _qwen_rows(*inputs), _collate_qwen)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, ("qwen2.5-vl", mode))


# --- Gemma 3 -------------------------------------------------------------------------

def _gemma3(tiny_model_dir):
    folder = tiny_model_dir("gemma3_vlm")
    config = AutoConfig.from_pretrained(folder)
    side = config.vision_config.image_size
    return folder, config, config.mm_tokens_per_image, (3, side, side)


def _gemma3_rows(ids, pixels, labels, kinds) -> list[dict]:
    rows = _rows(ids, pixels, labels)
    for i, row in enumerate(rows):
        row["token_type_ids"] = kinds[i]
    return rows


def test_gemma3_generate_with_images(tiny_model_dir):
    """Gemma3Processor's token_type_ids go with the prompt: the prefill's mask lets each
    image attend to itself both ways."""
    folder, config, tokens, shape = _gemma3(tiny_model_dir)
    report, predicted = plan(folder, "inference")
    assert report.workload["image_tokens_per_image"] == tokens == 16
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    ids, pixels, _ = processor_batch(config, tokens, shape)
    kinds = (ids == config.image_token_id).long()
    measured = generate_peak(model, ids, {"pixel_values": pixels, "token_type_ids": kinds})
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "gemma3 generate")
    assert predicted.components["kv_cache"] == measured.kv_cache_bytes


def test_gemma3_lora_with_images(tiny_model_dir):
    folder, config, tokens, shape = _gemma3(tiny_model_dir)
    _, predicted = plan(folder, "lora", lora_r=8)
    model = lora_on_language_model(random_model(config, "bf16", "bfloat16", "cpu",
                                                str(folder)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert predicted.components["adapters"] == 4 * trainable
    ids, pixels, labels = processor_batch(config, tokens, shape)
    kinds = (ids == config.image_token_id).long()
    measured = trainer_peak(model, _gemma3_rows(ids, pixels, labels, kinds), _collate_images)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "gemma3 lora")


# --- command line --------------------------------------------------------------------

def test_cli_images_json_follows_the_schema(tiny_model_dir):
    import json

    from test_cli import estimate as cli_estimate
    from test_cli import validate

    result = cli_estimate(str(tiny_model_dir("qwen2_5_vl")), "--gpu", "24GiB", "-m", "lora",
                          "-p", "bf16", "-s", "96", "--images", "2", "--image-size", "112x84",
                          "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    validate(report)
    workload = report["workload"]
    assert (workload["images"], workload["image_tokens_per_image"], workload["image_tokens"],
            workload["image_pixels"], workload["vision_frozen"]) == (2, 12, 24, [112, 84], True)
    assert "model\\.visual" in workload["lora_exclude_regex"]


@pytest.mark.parametrize(("args", "needle"), [
    (("--images", "-2"), "--images must be a whole number"),
    (("--images", "x"), "--images"),
    (("--images", "1", "--image-size", "0"), "--image-size '0' is not a size"),
])
def test_cli_bad_images_are_one_line(tiny_model_dir, args, needle):
    from test_cli import assert_one_line_error
    from test_cli import estimate as cli_estimate

    result = cli_estimate(str(tiny_model_dir("llava")), "--gpu", "24GiB", "-s", "96", *args)
    assert_one_line_error(result, 2, needle)


# --- Axolotl -------------------------------------------------------------------------

def test_axolotl_multimodal_keys_plan_images_and_round_trip(tiny_model_dir, tmp_path):
    """processor_type: one image per sample (the YAML does not say how many),
    image_size, freeze_mm_modules; --emit axolotl writes them back."""
    from qplan.api import estimate_axolotl
    from qplan.loaders.axolotl import read_axolotl
    from qplan.planner.emit import emit_axolotl, estimate_kwargs_of

    folder = tiny_model_dir("qwen2_5_vl")
    path = tmp_path / "vlm.yml"
    path.write_text(
        f"base_model: {folder}\nprocessor_type: AutoProcessor\nskip_prepare_dataset: true\n"
        "remove_unused_columns: false\nsample_packing: false\nimage_size: 112\n"
        "image_resize_algorithm: bilinear\nfreeze_mm_modules: true\nadapter: lora\n"
        "lora_r: 8\nlora_target_linear: true\nsequence_len: 64\nmicro_batch_size: 2\n"
        # Axolotl's auto-enabled LoRA kernels find no Qwen-VL attention class to rewrite.
        "lora_mlp_kernel: false\nlora_qkv_kernel: false\nlora_o_kernel: false\n")
    plan_file = read_axolotl(path)
    assert plan_file.estimate_kwargs["images"] == 1
    assert plan_file.estimate_kwargs["image_size"] == (112, 112)
    assert plan_file.estimate_kwargs["train_vision"] is False
    report = estimate_axolotl(str(path), gpu="80GiB", precisions="bf16", target="cpu")
    workload = report.workload
    assert (workload["images"], workload["image_tokens"], workload["vision_frozen"]) == \
        (1, 16, True)
    assert {"processor_type", "image_size", "freeze_mm_modules"} <= set(report.axolotl["read"])
    assert not report.axolotl["unknown"]
    again = read_axolotl(_write(tmp_path / "again.yml", emit_axolotl(report, "bf16")))
    assert again.estimate_kwargs == estimate_kwargs_of(report, "bf16")


def test_axolotl_processor_on_a_model_without_image_layout_plans_text(tiny_model_dir,
                                                                       tmp_path):
    from qplan.api import estimate_axolotl

    path = _write(tmp_path / "text.yml",
                  f"base_model: {tiny_model_dir('llama')}\nprocessor_type: AutoProcessor\n"
                  "adapter: lora\nsequence_len: 64\n")
    report = estimate_axolotl(str(path), gpu="80GiB", precisions="bf16", target="cpu")
    assert report.workload["images"] == 0
    assert any("planned on text only" in w for w in report.warnings)


def _write(path, text):
    path.write_text(text)
    return path
