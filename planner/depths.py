"""Which depths to trace a deep model at, so that extrapolating in depth stays exact.

Tracing every decoder layer of a 70B model would be slow, so deep models are traced at two
shallow depths and the line through them is extended to the real depth. That is exact
only when every layer added between the two depths costs what the layers of the real
model cost — and decoder layers are not always alike:

* Gemma 2 and gpt-oss alternate sliding-window and global attention; Gemma 3 has five
  sliding layers to one global one (``config.layer_types``);
* DeepSeek-V3 and GLM-4.5 keep their first ``first_k_dense_replace`` layers dense and make
  the rest MoE; Qwen-MoE lists ``mlp_only_layers``; Llama 4 interleaves MoE layers and
  leaves every fourth layer without RoPE (``no_rope_layers``).

Each layer gets a signature: its tensors (names relative to the layer, module types,
shapes, dtypes, what bitsandbytes would quantise), read off the full model's inventory
(the same decoder layers the multi-GPU planner and the step's layer hooks use),
and its entry in every per-layer list of the config. The sequence of signatures is read as
a prefix of ``s`` layers followed by a block of ``p`` layers that repeats to the end (a
homogeneous model is s=0, p=1). With ``L = s + n*p + r`` layers, tracing at
``d1 = s + r + k*p`` (k >= 2) and ``d2 = d1 + m*p`` keeps the prefix, whole blocks and the same
partial block at the end, so ``L`` lies on the line through the two traces, block for
block. A model with no such structure short of its full depth is traced at full depth.

A stack may also end in a few layers that break the period (Nemotron-H-56B: a block of 11
from layer 0, but its last layer is an MLP where the block has attention). The sequence is
then read as ``L = s + n*p + r + t``, a suffix of ``t <= p`` layers after the partial block,
and the traces keep the prefix, whole blocks, the partial block and the real stack's last
``t`` layers (``kept_layers``), at ``d1 = s + r + k*p + t`` and ``d2 = d1 + m*p``. Such a
reading is taken only where its deeper trace is strictly shallower than that of every
reading without a suffix, so a stack without one is traced as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qplan.planner.inventory import Inventory

# The smallest depths a deep model is traced at; a homogeneous model gets (2, 4).
MIN_LOW_DEPTH = 2
MIN_BLOCK_LAYERS = 2

# Fields that give the decoder's depth where ``num_hidden_layers`` is something else, looked
# up in this order: the encoder's depth (BART, Whisper, ... alias num_hidden_layers to
# encoder_layers, T5-style configs to num_layers; their causal-LM classes build the decoder
# alone), or a count derived from the depth (HRM's num_hidden_layers is one cache slot per
# attention call of its recurrent forward).
DECODER_DEPTH_FIELDS = ("decoder_layers", "num_decoder_layers", "num_layers_per_stack")
# num_hidden_layers as a config derives it from its depth field (HrmTextConfig.__post_init__).
DERIVED_LAYER_COUNTS: dict[str, Callable[[Any], int]] = {
    "num_layers_per_stack": lambda t: t.num_layers_per_stack * t.H_cycles * (t.L_cycles + 1),
}


# Config fields counting the last layers of the stack (Gemma 3n and Gemma 4's layers that
# reuse an earlier layer's keys and values).
TRAILING_LAYER_COUNTS = ("num_kv_shared_layers",)


def depth_field(text: Any) -> str:
    """The field of text config ``text`` that sets the depth of the decoder a plan builds."""
    for name in DECODER_DEPTH_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name
    return "num_hidden_layers"


def set_depth(text: Any, layers: int) -> None:
    """Give text config ``text`` a decoder of ``layers`` layers, and what it derives from it."""
    name = depth_field(text)
    setattr(text, name, layers)
    if name in DERIVED_LAYER_COUNTS:
        text.num_hidden_layers = DERIVED_LAYER_COUNTS[name](text)


def num_layers(config: Any) -> int:
    text = config.get_text_config()
    return int(getattr(text, depth_field(text), 0) or 0)


# Config lists that name layers by index (not one entry per layer): truncating the model
# keeps the indices below the new depth (Llama 4's moe_layers, full_attn_idxs).
INDEX_LIST_SUFFIXES = ("layers", "idxs", "layer_ids", "indices")


def is_index_list(name: str, value: Sequence[Any], depth: int) -> bool:
    return (
        name.endswith(INDEX_LIST_SUFFIXES)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in value)
        and list(value) == sorted(set(value))
    )


@dataclass(frozen=True)
class LayerPattern:
    prefix_layers: int  # s: leading layers that do not repeat
    period: int  # p: layers in the repeating block
    # t: trailing layers after the last (partial) block that do not follow the period; a
    # shallow trace keeps the real stack's last t layers.
    suffix_layers: int = 0


def kept_layers(depth: int, layers: int, suffix: int = 0) -> list[int]:
    """The indices, in a stack of ``depth`` layers, of the ``layers`` layers a shallow trace
    keeps: the first ``layers - suffix`` and the last ``suffix``."""
    return list(range(layers - suffix)) + list(range(depth - suffix, depth))


def shallow_suffix(layers: int | None, pattern: LayerPattern) -> int:
    """How many of the stack's last layers a trace of ``layers`` layers keeps: the
    pattern's suffix for a shallow trace, none for a whole one (``layers`` None)."""
    return pattern.suffix_layers if layers is not None else 0


def layer_signatures(inventory: Inventory, config: Any) -> list[tuple] | None:
    """One hashable signature per decoder layer, or None when the inventory's decoder
    layers (``Inventory.layers``) are not the config's depth (``num_layers``)."""
    text = config.get_text_config()
    depth = num_layers(config)
    if depth <= 0 or len(inventory.layers) != depth:
        return None
    index = {name: i for i, name in enumerate(inventory.layers)}
    layers: list[list[tuple]] = [[] for _ in range(depth)]
    for tensor in inventory.tensors:
        # The decoder layer owning the tensor: the longest listed prefix of its module.
        owner = next((name for name in _prefixes(tensor.module) if name in index), None)
        if owner is None:
            continue
        rest = tensor.name[len(owner) + 1:]
        layers[index[owner]].append((
            rest, tensor.module_type, tensor.kind, tensor.shape, tensor.build_dtype,
            tensor.quantizable, tensor.fp32_under_fp16, tensor.fp32_under_bf16,
        ))
    per_layer_lists = []
    for name, value in sorted(vars(text).items()):
        if not isinstance(value, (list, tuple)):
            continue
        if is_index_list(name, value, depth):
            # Which layers it names (Llama 4's moe_layers lists all 48 of Scout's): each
            # layer's entry is whether it is named, not its own index.
            named = set(value)
            per_layer_lists.append((name, [i in named for i in range(depth)]))
        elif len(value) == depth:
            per_layer_lists.append((name, value))
    for name in TRAILING_LAYER_COUNTS:
        count = getattr(text, name, None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            # The last ``count`` layers are of another kind (they keep no cache of their own).
            per_layer_lists.append((name, [i >= depth - count for i in range(depth)]))
    return [
        (tuple(sorted(layers[i], key=repr)),
         tuple((name, repr(value[i])) for name, value in per_layer_lists))
        for i in range(depth)
    ]


def _prefixes(module: str) -> list[str]:
    """``a.b.c`` -> ["a.b.c", "a.b", "a"]."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def _depths_for(pattern: LayerPattern, depth: int) -> tuple[int, int]:
    s, p, t = pattern.prefix_layers, pattern.period, pattern.suffix_layers
    r = (depth - t - s) % p
    # The low trace holds every layer of the block twice. A kind of layer's first
    # occurrence runs beside what the step makes once, at the first layer after the
    # embedding or the first layer of its kind (buffers shared by a kind of layer, Gemma
    # 3's global rotary table; gpt-oss's step holds more at its layer 0 than at any later
    # sliding layer): a part's peak grows linearly in depth only from the second
    # occurrence on, so neither trace may hold a block layer's top at its first occurrence.
    # With one block, gpt-oss-20b's prefill was extrapolated 228 MB above its whole-model
    # trace, Gemma 3 12B's 21 MB (bench and tests/test_depths.py).
    # The suffix follows the blocks at both depths, as it follows them in the real stack.
    low = s + r + 2 * p + t
    while low < MIN_LOW_DEPTH:
        low += p
    step = p
    while step < MIN_BLOCK_LAYERS:
        step += p
    return low, low + step


def _repeats(keys: Sequence[int], pattern: LayerPattern) -> bool:
    """The layers between the prefix and the suffix repeat with the pattern's period."""
    s, p = pattern.prefix_layers, pattern.period
    end = len(keys) - pattern.suffix_layers
    return all(keys[i] == keys[i + p] for i in range(s, end - p))


@dataclass(frozen=True)
class TracePlan:
    """How to trace a model: at ``depths`` (two of them) and extrapolate, or at full depth
    (``depths`` None). ``pattern`` is the layer structure the depths keep."""

    pattern: LayerPattern
    depths: tuple[int, int] | None


HOMOGENEOUS = LayerPattern(0, 1)


def trace_plan(signatures: Sequence[tuple] | None, depth: int) -> TracePlan:
    """The two depths to trace at, or a full-depth trace.

    Among the (prefix, period) readings of the layer sequence, the one whose deeper trace
    is shallowest wins; a homogeneous model is (2, 4). Without signatures every layer is
    taken to be alike. A reading with a suffix wins only where its deeper trace is
    shallower still.
    """
    if signatures is None:
        depths = _depths_for(HOMOGENEOUS, depth)
        return TracePlan(HOMOGENEOUS, depths if depths[1] < depth else None)
    keys = _layer_keys(signatures)
    best = _periodic_plan(keys, depth)
    bound = best.depths[1] if best.depths is not None else depth
    for high, low, pattern in _suffix_candidates(depth, bound):
        if _repeats(keys, pattern):
            return TracePlan(pattern, (low, high))
    return best


def _layer_keys(signatures: Sequence[tuple]) -> list[int]:
    """One small int per layer: equal signatures, equal ints."""
    ids: dict[tuple, int] = {}
    return [ids.setdefault(sig, len(ids)) for sig in signatures]


def _periodic_plan(keys: Sequence[int], depth: int) -> TracePlan:
    """The plan among the readings without a suffix (a prefix, then a block repeating to
    the last layer)."""
    candidates = sorted(
        ((depths[1], depths[0]), p, s)
        for p in range(1, depth + 1)
        for s in range(depth - p + 1)
        for depths in [_depths_for(LayerPattern(s, p), depth)]
    )
    for (high, low), p, s in candidates:
        if high >= depth:
            break
        if _repeats(keys, LayerPattern(s, p)):
            return TracePlan(LayerPattern(s, p), (low, high))
    return TracePlan(HOMOGENEOUS, None)


def _suffix_candidates(depth: int, bound: int) -> list[tuple[int, int, LayerPattern]]:
    """The readings with a suffix of 1 to p layers whose deeper trace is under ``bound``,
    shallowest first (then the shallower low trace, the shorter suffix, period, prefix).
    The low trace holds the prefix, two whole blocks and the suffix, the deeper one a
    block more: at least ``s + 3p + t`` layers, which bounds the search."""
    found = []
    for p in range(1, depth + 1):
        if 3 * p + 1 >= bound:
            break
        for t in range(1, p + 1):
            for s in range(depth - t - p + 1):
                if s + 3 * p + t >= bound:
                    break
                pattern = LayerPattern(s, p, t)
                low, high = _depths_for(pattern, depth)
                if high < bound:
                    found.append((high, low, pattern))
    return sorted(found, key=lambda c: (c[0], c[1], c[2].suffix_layers, c[2].period,
                                        c[2].prefix_layers))


def segment_keys(index: int, depth: int, pattern: LayerPattern) -> tuple[str, ...]:
    """Names for the part of a phase that layer ``index`` of ``depth`` layers runs in.

    A part's peak must be the same moment, structurally, at every depth, so that it is
    linear in depth: a prefix layer is named by its index; a repeating layer by its place
    in the block, as the block's topmost or bottommost occurrence (both, when it occurs
    once). The occurrences between lie on the line between those two (per block, the
    gradients made grow and the activations kept shrink by the same amounts), so they are
    named ``middle`` and left out of the extrapolation. A suffix layer is named by its
    distance from the last layer, and the blocks end where the suffix begins.
    """
    s, p, t = pattern.prefix_layers, pattern.period, pattern.suffix_layers
    if index < s:
        return (f"prefix{index}",)
    if index >= depth - t:
        return (f"suffix{depth - 1 - index}",)
    place = (index - s) % p
    bottom = s + place
    top = bottom + (depth - t - 1 - bottom) // p * p
    keys = []
    if index == top:
        keys.append(f"block{place}-top")
    if index == bottom:
        keys.append(f"block{place}-bottom")
    return tuple(keys) or (f"block{place}-middle",)
