"""Image inputs of vision-language models: what ``--images N`` puts through the step.

A processor turns each image into pixel values for the vision tower and a run of image
placeholder tokens in ``input_ids``, which the model replaces with the projected image
features. How many tokens an image takes, and the shape of its pixel values, is the
processor's and the model's business; this module reads both from the model's config and,
where the config does not say, from the processor's defaults in the installed transformers
(each family says which it used, and the report carries that note):

* ``llava``: the CLIP (or SigLIP) tower's ``image_size`` square (336 px for llava-1.5,
  which its processor resizes and crops every image to); one token per patch, plus the
  CLS token a CLIP tower adds, minus the one ``vision_feature_select_strategy: default``
  drops: 576 tokens at 336 px with 14 px patches.
* ``gemma3``: SigLIP at ``vision_config.image_size`` (896 px, what Gemma3ImageProcessor
  resizes to), pooled to ``mm_tokens_per_image`` (256) tokens; the processor's
  ``token_type_ids`` mark them (the training step's bidirectional mask over each image).
* ``qwen2_vl`` / ``qwen2_5_vl``: dynamic resolution. The image processor resizes each
  image to multiples of patch x merge size (28 px) within its pixel limits
  (transformers' ``smart_resize``, ``Qwen2VLImageProcessor`` defaults: 3,136 to 1,003,520
  pixels); the pixel values are flattened patches of ``3 x temporal_patch_size x 14 x 14``
  values, ``image_grid_thw`` gives each image's (1, rows, columns) of patches, and every
  2 x 2 patches merge into one token: 256 tokens for a 448 x 448 image. With no
  ``--image-size`` the plan takes 448 x 448.

Image tokens count in ``--seq-len``: each sequence is one separator token and the
image's placeholder tokens per image, then text. Families not listed here are refused in
one line (their processors differ in ways a wrong number would hide).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qplan.errors import ConfigError, UsageError

# What the plan assumes for a dynamic-resolution model when no --image-size is given.
DEFAULT_DYNAMIC_IMAGE_SIZE = (448, 448)


@dataclass(frozen=True)
class ImageLayout:
    """How one image enters the step: ``tokens`` placeholder tokens in ``input_ids`` and
    pixel values of ``pixel_shape`` (per image) for the tower; ``size`` (height, width) in
    pixels after the processor's resize; ``note``: what the numbers come from."""

    family: str
    tokens: int
    size: tuple[int, int]
    pixel_shape: tuple[int, ...]
    note: str
    # Qwen2-VL style: (temporal, rows, columns) of patches, passed as image_grid_thw.
    grid: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class VisionFamily:
    """One family of image-text models: how its processor lays an image out
    (``layout(config, image_size)``) and which extra forward inputs its processor makes
    (``extras(layout, images, token_mask, device)``)."""

    name: str
    layout: Callable[[Any, tuple[int, int] | None], ImageLayout]
    extras: Callable[[ImageLayout, int, torch.Tensor, torch.device], dict[str, torch.Tensor]]
    # The forward computes multimodal rotary positions from the data (Qwen2-VL's 3-D
    # mrope): the step passes the position ids the model's own get_rope_index makes.
    rope_index: bool = False


def _vision(config: Any) -> Any:
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ConfigError(f"{config.model_type} config has no vision_config: it takes no images")
    return vision


def _square(size: int) -> tuple[int, int]:
    return (int(size), int(size))


def _llava_layout(config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
    vision = _vision(config)
    side, patch = int(vision.image_size), int(vision.patch_size)
    cls = 1 if vision.model_type == "clip_vision_model" else 0
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    tokens = (side // patch) ** 2 + cls - (1 if strategy == "default" else 0)
    note = (f"llava: every image resized to the tower's {side} px square ({side // patch}^2 "
            f"patches of {patch} px{', + CLS' if cls else ''}"
            f"{', CLS dropped' if strategy == 'default' and cls else ''}) = {tokens} tokens")
    return ImageLayout("llava", tokens, _square(side),
                       (int(getattr(vision, "num_channels", 3)), side, side), note)


def _gemma3_layout(config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
    vision = _vision(config)
    side = int(vision.image_size)
    tokens = int(config.mm_tokens_per_image)
    note = (f"gemma3: every image resized to {side} px (SigLIP, {vision.patch_size} px "
            f"patches) and pooled to mm_tokens_per_image = {tokens} tokens")
    return ImageLayout("gemma3", tokens, _square(side),
                       (int(getattr(vision, "num_channels", 3)), side, side), note)


def _qwen_processor_limits() -> tuple[int, int]:
    """Qwen2VLImageProcessor's default pixel limits in the installed transformers."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    size = Qwen2VLImageProcessorPil.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


def _qwen_layout(config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vision = _vision(config)
    patch = int(vision.patch_size)
    merge = int(vision.spatial_merge_size)
    temporal = int(vision.temporal_patch_size)
    channels = int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3)))
    low, high = _qwen_processor_limits()
    asked = image_size or DEFAULT_DYNAMIC_IMAGE_SIZE
    height, width = smart_resize(asked[0], asked[1], factor=patch * merge,
                                 min_pixels=low, max_pixels=high)
    rows, columns = height // patch, width // patch
    tokens = rows * columns // merge**2
    given = "" if image_size else " (no --image-size: 448 x 448 assumed)"
    note = (f"{config.model_type}: {asked[0]} x {asked[1]} px{given} resized to "
            f"{height} x {width} (multiples of {patch * merge} px within {low:,} to "
            f"{high:,} pixels, Qwen2VLImageProcessor's defaults) = {rows} x {columns} "
            f"patches, {merge} x {merge} merged = {tokens} tokens")
    return ImageLayout(config.model_type, tokens, (height, width),
                       (rows * columns, channels * temporal * patch * patch), note,
                       grid=(1, rows, columns))


def _no_extras(layout: ImageLayout, images: int, token_mask: torch.Tensor,
               device: torch.device) -> dict[str, torch.Tensor]:
    return {}


def _gemma3_extras(layout: ImageLayout, images: int, token_mask: torch.Tensor,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Gemma3Processor's token_type_ids: 1 on image tokens (the training mask lets each
    image attend to itself both ways)."""
    return {"token_type_ids": token_mask.long().to(device)}


def _qwen_extras(layout: ImageLayout, images: int, token_mask: torch.Tensor,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """image_grid_thw, one row per image; on meta it stays on the CPU: the vision tower
    reads its values (window and sequence bookkeeping, the split of the features)."""
    grid = torch.tensor([layout.grid] * images, dtype=torch.long)
    return {"image_grid_thw": grid if device.type == "meta" else grid.to(device)}


FAMILIES: dict[str, VisionFamily] = {
    family.name: family for family in (
        VisionFamily("llava", _llava_layout, _no_extras),
        VisionFamily("gemma3", _gemma3_layout, _gemma3_extras),
        VisionFamily("qwen2_vl", _qwen_layout, _qwen_extras, rope_index=True),
        VisionFamily("qwen2_5_vl", _qwen_layout, _qwen_extras, rope_index=True),
    )
}


def family_of(config: Any) -> VisionFamily:
    """The image family of ``config``, or a one-line refusal."""
    model_type = str(getattr(config, "model_type", ""))
    family = FAMILIES.get(model_type)
    if family is not None:
        return family
    if getattr(config, "vision_config", None) is None:
        raise UsageError(f"--images: {model_type} is a text-only model (no vision tower); "
                         "leave --images out")
    raise UsageError(
        f"--images: qplan does not lay out {model_type}'s image inputs (its processor's "
        f"tokens per image are not modelled); image inputs are planned for "
        f"{', '.join(FAMILIES)}; leave --images out to plan text only"
    )


def takes_images(config: Any) -> bool:
    """Whether qplan lays out this model's image inputs."""
    return str(getattr(config, "model_type", "")) in FAMILIES


def image_layout(config: Any, image_size: tuple[int, int] | None = None) -> ImageLayout:
    family = family_of(config)
    return family.layout(config, image_size)


def image_token_id(config: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{config.model_type} config names no image token (image_token_id)")


def special_token_ids(config: Any) -> set[int]:
    """Every id the config names (``*_token_id``, ``*_token_index``): random text must not
    hit one (an extra image or video token would not match the features)."""
    found = set()
    for source in (config, config.get_text_config()):
        for name, value in vars(source).items():
            if name.endswith(("_token_id", "_token_index")) and isinstance(value, int):
                found.add(value)
    return found


def image_positions(images: int, tokens: int) -> list[tuple[int, int]]:
    """[start, end) of each image's placeholder run: one separator token before each."""
    return [(1 + k * (tokens + 1), 1 + k * (tokens + 1) + tokens) for k in range(images)]


def min_seq_len(images: int, tokens: int) -> int:
    """The shortest sequence that holds the images and one text token after them."""
    return images * (tokens + 1) + 2


def check_fits(images: int, layout: ImageLayout, seq_len: int) -> None:
    need = min_seq_len(images, layout.tokens)
    if seq_len < need:
        raise UsageError(
            f"--images {images} puts {images} x {layout.tokens} image tokens in each "
            f"sequence, more than --seq-len {seq_len} holds; raise --seq-len to at least "
            f"{need} or use fewer images"
        )


@dataclass(frozen=True)
class ImageBatch:
    """The forward's image inputs for a batch, and the ids with their placeholders."""

    input_ids: torch.Tensor
    inputs: dict[str, torch.Tensor]
    # (3, rows, length) multimodal rotary positions (Qwen2-VL style), else None.
    position_ids: torch.Tensor | None = None


def _layout_ids(config: Any, rows: int, length: int, images: int, tokens: int) -> torch.Tensor:
    """A CPU copy of the ids' layout: image placeholders where the step puts them, 0
    elsewhere (what the model's own data-dependent code reads)."""
    layout = torch.zeros((rows, length), dtype=torch.long)
    token = image_token_id(config)
    for start, end in image_positions(images, tokens):
        layout[:, start:end] = token
    return layout


def image_batch(model: Any, ids: torch.Tensor, images: int,
                image_size: tuple[int, int] | None) -> ImageBatch:
    """Put ``images`` images per row into ``ids`` (in place: their placeholder runs) and
    make the pixel values and extras the model's processor would, on ``ids``' device
    (random values on a real device, none on meta)."""
    config = model.config
    family = family_of(config)
    layout = family.layout(config, image_size)
    rows, length = ids.shape
    device = ids.device
    token = image_token_id(config)
    if device.type != "meta":
        # Random text must not name a special token (an extra image or video token).
        for special in special_token_ids(config):
            ids.masked_fill_(ids == special, 0)
    for start, end in image_positions(images, layout.tokens):
        ids[:, start:end] = token
    shape = (rows * images * layout.pixel_shape[0], *layout.pixel_shape[1:]) \
        if layout.grid is not None else (rows * images, *layout.pixel_shape)
    if device.type == "meta":
        pixels = torch.empty(shape, dtype=torch.float32, device=device)
    else:
        generator = torch.Generator(device="cpu").manual_seed(0)
        pixels = torch.rand(shape, generator=generator, dtype=torch.float32).to(device)
    with _host_bookkeeping():
        # The layout on the host, out of the tracker's sight: what a processor makes on the
        # CPU before the batch goes to the device.
        layout_ids = _layout_ids(config, rows, length, images, layout.tokens)
        token_mask = layout_ids == token
        rope = None
        if family.rope_index:
            # The model's own get_rope_index on the CPU layout (it reads ids and grid
            # values), as the forward computes it.
            grid = torch.tensor([layout.grid] * (rows * images), dtype=torch.long)
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            rope, _ = base.model.get_rope_index(
                layout_ids, image_grid_thw=grid, mm_token_type_ids=token_mask.int())
    inputs = {"pixel_values": pixels,
              **family.extras(layout, rows * images, token_mask, device)}
    position_ids = rope.to(device) if rope is not None else None
    return ImageBatch(ids, inputs, position_ids)


def _host_bookkeeping() -> Any:
    """Run with the live-tensor tracker (a dispatch mode) suspended."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def vision_modules(model: Any) -> tuple[Any, ...]:
    """The vision tower and projector modules (``vision_module_prefixes``), of a plain or
    a peft-wrapped model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return tuple(base.get_submodule(prefix) for prefix in vision_module_prefixes(base))


def vision_module_prefixes(model: Any) -> tuple[str, ...]:
    """Names of the modules outside the language model and the head: the vision tower and
    the projector (``model.vision_tower``, ``model.multi_modal_projector``,
    ``model.visual``), what Axolotl's ``freeze_mm_modules`` freezes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "vision_config", None) is None:
        return ()  # no vision tower
    inner = getattr(base, "model", None)
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return ()
    if not isinstance(inner, torch.nn.Module) or decoder is None or inner is decoder:
        return ()
    return tuple(
        f"model.{name}" for name, child in inner.named_children()
        if child is not decoder and any(True for _ in child.parameters())
    )
