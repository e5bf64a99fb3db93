"""Which model families qplan plans, and with which transformers class.

qplan plans generative models a user loads with ``AutoModelForCausalLM`` or, for
vision-language models, ``AutoModelForImageTextToText``. Like ``from_pretrained``, the
class comes from the config's ``model_type`` through transformers' own auto mappings;
``architectures`` only picks between them. Anything else (encoders, encoder-decoders,
classification heads, audio or vision-only models) gets a one-line refusal that says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qplan.errors import ConfigError

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
                return cls
    known = [a for a in archs if getattr(transformers, a, None) is not None]
    if known and len(known) == len(archs):
        # Every name is a real class, and none is generative: a head qplan does not plan.
        raise ConfigError(refusal(config, known[0]))
    if classes:
        return classes[0]
    raise ConfigError(refusal(config, known[0] if known else None))



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


def check_text_step(model: Any, mode: str) -> None:
    """Refuse, in one line, a step the model cannot run on text alone: an encoder-decoder
    whose encoder reads the image (Pix2Struct, UDOP, T5Gemma 2), or a forward that
    requires more than token ids."""
    import inspect

    if mode == "load":
        return
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
