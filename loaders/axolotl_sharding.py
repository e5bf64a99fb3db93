"""Axolotl's DeepSpeed and FSDP keys: the multi-GPU strategy the YAML asks for.

``deepspeed: <file>.json`` names a DeepSpeed config: read next to the YAML (or as given)
when it is there, else one of the files Axolotl ships in ``deepspeed_configs/`` by name
(``AXOLOTL_DEEPSPEED``, read from those files). Its ZeRO stage and offload devices pick
``zero2``, ``zero3`` or their ``+offload`` variants (planner/parallel.py).

``fsdp_version`` / ``fsdp_config`` / ``fsdp:`` pick ``fsdp`` (FSDP2 ``fully_shard`` per
decoder layer) or ``fsdp+offload`` (``offload_params``); ``ddp: true`` picks ``ddp``.
What the planner has no strategy for (ZeRO-1, DeepSpeed offloading only one of optimizer
and parameters, FSDP's SHARD_GRAD_OP / HYBRID_SHARD, no reshard after forward) is planned
with the nearest strategy and listed as not modelled under the key that asks for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qplan.errors import ConfigError


@dataclass(frozen=True)
class ZeroConfig:
    """What a DeepSpeed config decides for memory: the ZeRO stage and what is offloaded."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    # The config's own ``optimizer`` block (its type): DeepSpeed builds that optimizer and
    # the Trainer's (the YAML's ``optimizer``) is not used.
    optimizer: str | None = None


# The files of Axolotl's deepspeed_configs/ (axolotl-ai-cloud/axolotl), from their content:
# zero_optimization.stage and the offload_optimizer / offload_param devices.
AXOLOTL_DEEPSPEED: dict[str, ZeroConfig] = {
    "zero1.json": ZeroConfig(1, optimizer="AdamW"),
    "zero1_torch_compile.json": ZeroConfig(1),
    "zero2.json": ZeroConfig(2, offload_optimizer=True),
    "zero2_torch_compile.json": ZeroConfig(2, offload_optimizer=True),
    "zero3.json": ZeroConfig(3),
    "zero3_bf16.json": ZeroConfig(3),
    "zero3_bf16_cpuoffload_params.json": ZeroConfig(3, offload_param=True),
    "zero3_bf16_cpuoffload_all.json": ZeroConfig(3, offload_optimizer=True, offload_param=True),
    "zero3_cpuoffload.json": ZeroConfig(3, offload_optimizer=True, offload_param=True),
}
# DeepSpeed optimizer types (an ``optimizer`` block) with AdamW's two fp32 states.
DEEPSPEED_ADAM = {"adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam"}
# FSDP sharding strategies (fsdp_config's sharding_strategy, the ``fsdp:`` list's words)
# that are not FULL_SHARD, the one FSDP2's fully_shard (reshard after forward) runs.
OTHER_FSDP_SHARDING = {
    "shard_grad_op": "parameters kept gathered between forward and backward (SHARD_GRAD_OP)",
    "hybrid_shard": "sharding within a node, replication across nodes (HYBRID_SHARD)",
    "hybrid_shard_zero2": "sharding within a node, replication across nodes (HYBRID_SHARD)",
    "no_shard": "no sharding (NO_SHARD, like DDP)",
}


@dataclass(frozen=True)
class Sharding:
    """The strategy a YAML asks for, how it was read, and what of it the plan leaves out."""

    strategy: str | None
    notes: tuple[str, ...] = ()
    not_modelled: tuple[tuple[str, str], ...] = ()  # (key, what it changes)
    # qplan's optimizer for the one the DeepSpeed config builds itself (None: the YAML's).
    optimizer: str | None = None


def read_sharding(raw: dict[str, Any], path: Path) -> Sharding:
    """The multi-GPU strategy of an Axolotl YAML (None when it asks for none)."""
    deepspeed = raw.get("deepspeed")
    fsdp = _fsdp_asked(raw)
    if _set(deepspeed) and fsdp:
        raise ConfigError(f"axolotl config {path}: sets both deepspeed and FSDP keys; "
                          "Axolotl runs one of them, keep one")
    if _set(deepspeed):
        return _deepspeed(deepspeed, path)
    if fsdp:
        return _fsdp(raw, path)
    if raw.get("ddp") is True:
        return Sharding("ddp", ("ddp: true: planned as DDP, a full replica per GPU",))
    return Sharding(None)


def _set(value: Any) -> bool:
    return value not in (None, "", [], {}, False)


def _fsdp_asked(raw: dict[str, Any]) -> bool:
    return any(_set(raw.get(key)) for key in ("fsdp", "fsdp_config", "fsdp_version"))


def zero_config_of(value: Any, path: Path) -> tuple[ZeroConfig, str]:
    """The ZeRO settings a ``deepspeed:`` value names, and where they were read."""
    if isinstance(value, dict):
        return _zero_from_json(value, path), "the inline DeepSpeed config"
    name = str(value)
    for candidate in (Path(name), path.parent / name):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"axolotl config {path}: deepspeed {name}: cannot read it "
                                  f"as JSON ({exc}); fix the file") from None
            return _zero_from_json(data, path), str(candidate)
    known = AXOLOTL_DEEPSPEED.get(Path(name).name)
    if known is None:
        raise ConfigError(
            f"axolotl config {path}: deepspeed {name} is neither next to the YAML nor one of "
            f"Axolotl's deepspeed_configs ({', '.join(AXOLOTL_DEEPSPEED)}); put the JSON "
            "file next to the YAML"
        )
    return known, f"Axolotl's deepspeed_configs/{Path(name).name}"


def _zero_from_json(data: Any, path: Path) -> ZeroConfig:
    zero = data.get("zero_optimization") if isinstance(data, dict) else None
    if not isinstance(zero, dict):
        return ZeroConfig(0)
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"axolotl config {path}: DeepSpeed zero_optimization.stage "
                          f"{stage!r} is not 0, 1, 2 or 3")
    block = data.get("optimizer")
    optimizer = str(block.get("type")) if isinstance(block, dict) and block.get("type") else None
    return ZeroConfig(stage, _offloaded(zero.get("offload_optimizer")),
                      _offloaded(zero.get("offload_param")), optimizer)


def _offloaded(section: Any) -> bool:
    return isinstance(section, dict) and str(section.get("device", "none")).lower() in (
        "cpu", "nvme")


def _deepspeed(value: Any, path: Path) -> Sharding:
    zero, source = zero_config_of(value, path)
    sharding = _zero_strategy(zero, source)
    if zero.optimizer is None:
        return sharding
    if zero.optimizer.lower() not in DEEPSPEED_ADAM:
        return replace(sharding, not_modelled=(*sharding.not_modelled, ("deepspeed", (
            f"the DeepSpeed config's own {zero.optimizer} optimizer (planned with the YAML's "
            "optimizer)"))))
    return replace(sharding, optimizer="adamw", notes=(*sharding.notes, (
        f"deepspeed: {source} builds its own {zero.optimizer} (its optimizer block), which "
        "replaces the YAML's optimizer: planned with AdamW's states")))


def _zero_strategy(zero: ZeroConfig, source: str) -> Sharding:
    read = f"deepspeed: ZeRO-{zero.stage} from {source}"
    if zero.stage == 0:
        return Sharding("ddp", (f"{read}: no sharding, planned as DDP",))
    offload = zero.offload_optimizer or zero.offload_param
    if zero.stage in (1, 2):
        name = "zero2+offload" if zero.offload_optimizer else "zero2"
        notes = (f"{read}" + (", optimizer offloaded to the host" if offload else "")
                 + f": planned as {name}",)
        if zero.stage == 1:
            return Sharding(name, notes, (("deepspeed", (
                "ZeRO-1 keeps every GPU's 16-bit gradients whole (planned as ZeRO-2, which "
                "shards them: 2 B per trainable parameter per GPU less)")),))
        return Sharding(name, notes)
    if not offload:
        return Sharding("zero3", (f"{read}: planned as zero3",))
    notes = (f"{read}, offloaded to the host: planned as zero3+offload",)
    if zero.offload_optimizer and zero.offload_param:
        return Sharding("zero3+offload", notes)
    only = "optimizer states" if zero.offload_optimizer else "parameters"
    return Sharding("zero3+offload", notes, (("deepspeed", (
        f"ZeRO-3 offloading only the {only} (planned with both optimizer states and "
        "parameters on the host)")),))


def _fsdp(raw: dict[str, Any], path: Path) -> Sharding:
    config = raw.get("fsdp_config") or {}
    if not isinstance(config, dict):
        raise ConfigError(f"axolotl config {path}: fsdp_config must be a mapping")
    words = raw.get("fsdp") or []
    if isinstance(words, str):
        words = words.split()
    if not isinstance(words, list):
        raise ConfigError(f"axolotl config {path}: fsdp must be a list such as "
                          "[full_shard, auto_wrap]")
    words = [str(w).lower() for w in words]
    version = raw.get("fsdp_version") or config.get("fsdp_version") or config.get("version")
    offload = ("offload" in words
               or any(config.get(k) is True for k in ("offload_params", "fsdp_offload_params")))
    name = "fsdp+offload" if offload else "fsdp"
    what = f"FSDP{version}" if version else "FSDP"
    notes = [f"{what}{', parameters offloaded to the host' if offload else ''}: planned as "
             f"{name} (FSDP2 fully_shard per decoder layer)"]
    if str(version) != "2":
        notes.append("FSDP1's flat parameters are planned as FSDP2's per-parameter shards")
    missing: list[tuple[str, str]] = []
    sharding = str(config.get("fsdp_sharding_strategy") or config.get("sharding_strategy")
                   or "").lower()
    for word in (sharding, *words):
        if word in OTHER_FSDP_SHARDING:
            key = "fsdp_config" if word == sharding else "fsdp"
            missing.append((key, f"{OTHER_FSDP_SHARDING[word]}: planned as FULL_SHARD"))
            break
    if config.get("reshard_after_forward") is False:
        missing.append(("fsdp_config", "reshard_after_forward: false keeps every layer "
                        "gathered until backward (planned resharded)"))
    return Sharding(name, tuple(notes), tuple(missing))
