"""Which model families qplan plans, and with which transformers class.

qplan plans generative models a user loads with ``AutoModelForCausalLM`` or, for
vision-language models, ``AutoModelForImageTextToText``. Like ``from_pretrained``, the
class comes from the config's ``model_type`` through transformers' own auto mappings;
``architectures`` only picks between them. A class whose forward fails in transformers'
own code on token ids (Llama 4's, in 5.24) gives way to the model_type's causal-LM class,
the one a user who runs the model loads. Anything else (encoders, encoder-decoders,
classification heads, audio or vision-only models) gets a one-line refusal that says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qplan.errors import ConfigError

if TYPE_CHECKING:
    from qplan.planner.workload import Workload

# The auto classes qplan builds, in the order a model_type is looked up in them.
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")
_MAPPING_NAMES = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
}
# Mappings that tell what kind of model a refused architecture is, for the refusal.
_KINDS = (
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "encoder-only model"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "encoder-decoder model"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "sequence-classification model"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification model"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering model"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "speech model"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "speech model"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio model"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "vision model"),
    ("MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", "vision model"),
    ("MODEL_FOR_MASK_GENERATION_MAPPING_NAMES", "vision model"),
)
PLANS = "qplan plans causal LMs (decoder-only and image-text-to-text models)"


@dataclass(frozen=True)
class ModelClass:
    """The transformers class a plan builds: the auto class and the model class name."""

    auto_class: str  # "AutoModelForCausalLM" | "AutoModelForImageTextToText"
    name: str  # e.g. "LlamaForCausalLM"

    def factory(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)


def _mapping(name: str) -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return dict(getattr(modeling_auto, name, {}) or {})


def _names(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (str(value),)


def generative_classes(model_type: str) -> tuple[ModelClass, ...]:
    """The classes transformers' auto mappings give ``model_type``, causal LM first."""
    found = []
    for auto in AUTO_CLASSES:
        value = _mapping(_MAPPING_NAMES[auto]).get(model_type)
        if value is not None:
            found.extend(ModelClass(auto, name) for name in _names(value))
    return tuple(found)


def auto_class_of(architecture: str) -> str:
    """The auto class that loads ``architecture`` (image-text-to-text for a VLM)."""
    for auto in AUTO_CLASSES:
        if any(architecture in _names(v) for v in _mapping(_MAPPING_NAMES[auto]).values()):
            return auto
    return AUTO_CLASSES[0]


def _kind_of(architecture: str | None, config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    for mapping, kind in _KINDS:
        table = _mapping(mapping)
        if architecture is not None:
            if any(architecture in _names(v) for v in table.values()):
                return kind
        elif model_type in table:
            return kind
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    return "model without a causal-LM or image-text-to-text class"


def refusal(config: Any, architecture: str | None = None) -> str:
    """One line saying why ``config`` (naming ``architecture``) is not planned."""
    import transformers

    model_type = getattr(config, "model_type", "?")
    kind = _kind_of(architecture, config)
    named = f"{architecture}, {model_type}" if architecture else model_type
    classes = generative_classes(model_type)
    fix = (
        f'; set "architectures": ["{classes[0].name}"] to plan its generative class'
        if classes
        else f"; transformers {transformers.__version__} has no such class for "
        f"model_type '{model_type}'"
    )
    return f"{kind} ({named}): {PLANS}{fix}"


def model_class(config: Any) -> ModelClass:
    """The class a plan builds for ``config``, resolved as from_pretrained resolves it.

    ``architectures`` naming one of the model_type's generative classes picks it; a name
    transformers does not know (PhiMoEForCausalLM for ``phimoe``) is resolved by
    model_type, as the auto classes do; a known class of another kind is refused.
    """
    import transformers

    model_type = str(getattr(config, "model_type", ""))
    classes = generative_classes(model_type)
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    for arch in archs:
        for cls in classes:
            if arch == cls.name:
                return _text_class_if_broken(cls, classes)
    known = [a for a in archs if getattr(transformers, a, None) is not None]
    if known and len(known) == len(archs):
        # Every name is a real class, and none is generative: a head qplan does not plan.
        raise ConfigError(refusal(config, known[0]))
    if classes:
        return classes[0]
    raise ConfigError(refusal(config, known[0] if known else None))


@functools.cache
def _reads_image_outputs_its_language_model_lacks(name: str) -> bool:
    """transformers 5.24's Llama4ForConditionalGeneration.forward ends with
    ``image_outputs=outputs.image_outputs`` where ``outputs`` is its Llama4ForCausalLM's
    MoeCausalLMOutputWithPast, which has no such field: every forward fails (generate,
    Trainer, with or without labels, return_dict or not) with AttributeError. True while
    the installed transformers still has that line and that output class."""
    import dataclasses
    import inspect

    import transformers
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    cls = getattr(transformers, name, None)
    if cls is None:
        return False
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    fields = {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)}
    return "outputs.image_outputs" in source and "image_outputs" not in fields


# Image-text-to-text classes whose text step fails in transformers' own code, each with the
# check that the installed transformers still has the fault (planned on the class again as
# soon as a release fixes it).
_BROKEN_TEXT_STEP: dict[str, Callable[[str], bool]] = {
    "Llama4ForConditionalGeneration": _reads_image_outputs_its_language_model_lacks,
}


def _text_class_if_broken(chosen: ModelClass, classes: tuple[ModelClass, ...]) -> ModelClass:
    """The model_type's causal-LM class instead of ``chosen`` when ``chosen`` cannot run a
    step on token ids in this transformers version: what a user who runs the model loads
    (``AutoModelForCausalLM.from_pretrained`` on the composite config builds the text class
    from its text_config and keeps the checkpoint's language-model weights only)."""
    broken = _BROKEN_TEXT_STEP.get(chosen.name)
    if broken is None or not broken(chosen.name):
        return chosen
    for cls in classes:
        if cls.auto_class == "AutoModelForCausalLM" and cls.name != chosen.name:
            return cls
    return chosen


def text_class_note(config: Any) -> str | None:
    """The report's note when the plan builds the causal-LM class in place of the one
    ``architectures`` names (``_text_class_if_broken``); None otherwise."""
    import transformers

    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    try:
        chosen = model_class(config)
    except ConfigError:
        return None
    if not archs or chosen.name in archs or archs[0] not in _BROKEN_TEXT_STEP:
        return None
    return (
        f"text only: transformers {transformers.__version__}'s {archs[0]} fails in its own "
        f"code on every forward, so this plans {chosen.name}, what "
        f"{chosen.auto_class}.from_pretrained loads (the language model's weights; the "
        "vision tower and projector are not loaded)"
    )



# Forward arguments a text-only step passes (planner/steps.py), or that a model makes itself.
_TEXT_STEP_INPUTS = ("self", "input_ids")


def inputs_a_text_step_lacks(model: Any) -> tuple[str, ...]:
    """The arguments ``model.forward`` requires (no default) beyond the token ids: images
    (BLIP's pixel_values), a Q-Former's prompt (InstructBLIP's qformer_input_ids)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters.values()
    return tuple(
        p.name for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in _TEXT_STEP_INPUTS
    )


# Forward arguments that carry an image into a vision encoder.
_IMAGE_INPUTS = ("pixel_values", "flattened_patches")


def check_text_step(model: Any, workload: Workload) -> None:
    """Refuse, in one line, a step the model cannot run on text alone: an encoder-decoder
    whose encoder reads the image (Pix2Struct, UDOP, T5Gemma 2), or a forward that
    requires more than token ids."""
    import inspect

    if not workload.runs_step:
        return
    mode = workload.mode
    params = inspect.signature(type(model).forward).parameters
    images = [name for name in _IMAGE_INPUTS if name in params]
    if getattr(model.config, "is_encoder_decoder", False) and images:
        raise ConfigError(
            f"encoder-decoder vision model ({type(model).__name__}): its encoder reads the "
            f"image ({images[0]}), and qplan plans the {mode} step of a decoder on token ids "
            "alone; plan --mode load for its weights"
        )
    lacking = inputs_a_text_step_lacks(model)
    if lacking:
        raise ConfigError(
            f"{type(model).__name__} needs {', '.join(lacking)} in every forward (it has no "
            f"text-only step): qplan plans the {mode} step on token ids alone; plan "
            "--mode load for its weights"
        )
