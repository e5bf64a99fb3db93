"""Sanity checks on a model config before anything is built from it.

transformers builds many impossible configs without complaint (more key/value heads than
heads, a hidden size the heads do not divide, NaN in a float, a million layers) and the
failure, or the hang, comes later and far from the cause. These checks name the field and
the fix in one line. The bounds are far beyond any published model (the deepest decoders
have ~130 layers, the widest ~25k hidden, the largest vocabularies ~260k tokens, the
longest contexts ~10M positions) and keep a plan fast: building and tracing cost time
linear in the depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qplan.errors import ConfigError


@dataclass(frozen=True)
class SizeField:
    """An integer config field: the smallest and largest value qplan plans."""

    name: str
    low: int
    high: int


# Read through the config's attribute_map, so GPT-2's n_embd is checked as hidden_size.
SIZE_FIELDS = (
    SizeField("num_hidden_layers", 1, 1024),
    SizeField("hidden_size", 1, 1 << 17),
    SizeField("intermediate_size", 1, 1 << 20),
    SizeField("num_attention_heads", 1, 4096),
    SizeField("num_key_value_heads", 1, 4096),
    SizeField("head_dim", 1, 1 << 14),
    SizeField("vocab_size", 1, 1 << 23),
    SizeField("max_position_embeddings", 1, 1 << 26),
)
# Integer fields where 0 is legitimate ("none of these": a dense model's expert count, no
# window), with their upper bound.
COUNT_FIELDS = (
    SizeField("num_local_experts", 0, 1 << 14),
    SizeField("n_routed_experts", 0, 1 << 14),
    SizeField("num_experts", 0, 1 << 14),
    SizeField("num_experts_per_tok", 0, 1 << 14),
    SizeField("moe_intermediate_size", 0, 1 << 20),
    SizeField("sliding_window", 0, 1 << 26),
    SizeField("first_k_dense_replace", 0, 1024),
    SizeField("kv_lora_rank", 0, 1 << 17),
    SizeField("q_lora_rank", 0, 1 << 17),
)
# Far more parameters than any model (the largest published have ~2T): the tensors exist
# only on the meta device, but such a config is a typo, not a plan.
MAX_PARAMETERS = 100 * 10**12


# Names the raw config.json may use for the bounded fields before transformers maps them
# (GPT-2's n_layer, T5-style num_layers): a config class builds per-layer lists from these
# while it is constructed.
RAW_ALIASES = {"n_layer": "num_hidden_layers", "num_layers": "num_hidden_layers",
               "n_layers": "num_hidden_layers", "n_embd": "hidden_size", "d_model": "hidden_size",
               "n_head": "num_attention_heads", "n_inner": "intermediate_size"}


def check_raw_sizes(raw: Any, origin: str = "the config", path: str = "") -> None:
    """Refuse an absurdly large bounded field of a parsed config.json *before* transformers
    builds the config object from it: config classes build per-layer lists in their
    constructor (Qwen3's layer_types has num_hidden_layers entries), so a config with
    2**31 layers would allocate for minutes before ``check_config`` could see it."""
    if isinstance(raw, list):
        for item in raw:
            check_raw_sizes(item, origin, path)
        return
    if not isinstance(raw, dict):
        return
    bounds = {spec.name: spec for spec in SIZE_FIELDS + COUNT_FIELDS}
    for key, value in raw.items():
        spec = bounds.get(RAW_ALIASES.get(key, key)) if isinstance(key, str) else None
        if (spec is not None and isinstance(value, int) and not isinstance(value, bool)
                and value > spec.high):
            name = f"{path}.{key}" if path else key
            raise ConfigError(
                f"{name} is {value:,} in {origin}; qplan plans {spec.low:,} to {spec.high:,}"
                f" - {_fix(origin)}"
            )
        if isinstance(value, (dict, list)):
            check_raw_sizes(value, origin, f"{path}.{key}" if path else str(key))


def check_config(config: Any, origin: str = "the config") -> None:
    """Raise ConfigError naming the first impossible or absurd field of ``config``."""
    checked = [config]
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError as exc:  # transformers: "Multiple valid text configs were found"
        names = [k for k in (getattr(config, "sub_configs", None) or {})
                 if getattr(config, k, None) is not None]
        raise ConfigError(
            f"{origin} holds several sub-models ({', '.join(names) or exc}) and no single "
            f"text decoder ({getattr(config, 'model_type', '?')}): qplan plans causal LMs "
            "(decoder-only and image-text-to-text models)"
        ) from None
    if text is not config:
        checked.append(text)
    for part in checked:
        _check_finite(part.to_dict() if hasattr(part, "to_dict") else {}, origin, "")
    for view in _layer_views(text):
        for spec in SIZE_FIELDS + COUNT_FIELDS:
            value = getattr(view, spec.name, None)
            # A per-layer list (Gemma 3n's intermediate_size) holds one size per layer.
            for item in value if isinstance(value, list) and value else [value]:
                if item is not None:
                    _check_int(item, spec, origin)
        _check_heads(view, origin)
        _check_pad_token(view, origin)
        _check_total(view, origin)


def _layer_views(text: Any) -> list[Any]:
    """The config each layer is built from: the text config itself, or for a heterogeneous
    config (Gemma 4, dots3: per-layer head sizes, which transformers refuses to read off
    the global config) each distinct layer's config."""
    if getattr(text, "_heterogeneity_spec", None) is None:
        return [text]
    views: dict[str, Any] = {}
    for layer in getattr(text, "per_layer_config", None) or []:
        views.setdefault(repr(sorted(layer.to_dict().items(), key=str)), layer)
    return list(views.values()) or [text]


def _fix(origin: str) -> str:
    return "correct that value in the config"


def _check_finite(data: Any, origin: str, path: str) -> None:
    """Every float in the config is a number (json reads NaN and Infinity without a word).
    Infinity is a legitimate bound of a limit (Mamba-2's time_step_limit is (0, inf))."""
    if isinstance(data, float) and (
        math.isnan(data) or (math.isinf(data) and "limit" not in path)
    ):
        raise ConfigError(f"{path or 'a value'} is {data} in {origin}; {_fix(origin)} "
                          "(a config value must be a finite number)")
    if isinstance(data, dict):
        for key, value in data.items():
            _check_finite(value, origin, f"{path}.{key}" if path else str(key))
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            _check_finite(value, origin, f"{path}[{index}]")


def _check_int(value: Any, spec: SizeField, origin: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(
                f"{spec.name} is {value!r} in {origin}, not a whole number; {_fix(origin)}"
            )
    if not spec.low <= value <= spec.high:
        raise ConfigError(
            f"{spec.name} is {value:,} in {origin}; qplan plans {spec.low:,} to {spec.high:,}"
            f" - {_fix(origin)}"
        )


def _check_heads(text: Any, origin: str) -> None:
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(heads, int) or isinstance(heads, bool):
        return
    if isinstance(kv_heads, int) and not isinstance(kv_heads, bool):
        if kv_heads > heads:
            raise ConfigError(
                f"num_key_value_heads ({kv_heads}) is more than num_attention_heads ({heads}) "
                f"in {origin}; grouped-query attention shares each key/value head among "
                f"several query heads - {_fix(origin)}"
            )
        if heads % kv_heads:
            raise ConfigError(
                f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                f"({kv_heads}) in {origin}; each key/value head serves a whole group of "
                f"query heads - {_fix(origin)}"
            )
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        return
    head_dim = getattr(text, "head_dim", None)
    # An explicit head_dim (Gemma: 256 with hidden 3072 and 16 heads) frees the hidden size
    # from the heads; without one, the model splits hidden_size into equal heads.
    derived = not isinstance(head_dim, int) or head_dim == hidden // heads
    if derived and hidden % heads:
        raise ConfigError(
            f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) in "
            f"{origin}; the model splits the hidden size into equal heads - {_fix(origin)}"
        )


def _check_pad_token(text: Any, origin: str) -> None:
    """The embedding's padding row must exist (torch asserts it while building)."""
    pad, vocab = getattr(text, "pad_token_id", None), getattr(text, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and not -vocab <= pad < vocab:
        raise ConfigError(
            f"pad_token_id {pad} lies outside the vocabulary of {vocab} tokens in {origin}; "
            "correct pad_token_id or vocab_size"
        )


def _check_total(text: Any, origin: str) -> None:
    """A rough parameter count from the sizes alone, before a model is built."""
    sizes = {name: getattr(text, name, None) for name in
             ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values()):
        return
    layers, hidden = sizes["num_hidden_layers"], sizes["hidden_size"]
    counts = [getattr(text, name, None) for name in
              ("num_local_experts", "n_routed_experts", "num_experts")]
    experts = max([c for c in counts if isinstance(c, int) and c > 0] or [1])
    per_layer = 4 * hidden * hidden + 3 * hidden * sizes["intermediate_size"] * experts
    total = layers * per_layer + 2 * sizes["vocab_size"] * hidden
    if total > MAX_PARAMETERS:
        raise ConfigError(
            f"the sizes in {origin} make about {total / 1e12:,.0f}T parameters "
            f"({layers} layers of hidden size {hidden:,}), beyond any model qplan plans "
            f"(at most {MAX_PARAMETERS / 1e12:.0f}T); {_fix(origin)}"
        )
