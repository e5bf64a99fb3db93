"""Turn a ``--gpu`` argument into a :class:`~qplan.planner.gpu.GpuTarget`.

A ``--gpu`` value is one of

* ``auto`` - the GPUs of this machine, read through NVML (:mod:`qplan.loaders.nvml`);
* a size - ``24GiB``, ``80GB``, ``81559MiB`` - for a GPU we ship no profile for;
* a name - ``4090``, ``rtx-4090``, ``NVIDIA GeForce RTX 4090``, ``a100-80gb`` - looked up
  in the profiles shipped under ``qplan/profiles/gpus``;

optionally with a count prefix, ``2x A100-80GB`` or ``4x4090``.

Name matching and ambiguity
---------------------------
Names are compared after :func:`normalize`, so case, spaces, dashes and the vendor noise
words (NVIDIA, GeForce, Tesla, Quadro, RTX) do not matter: ``4090`` == ``RTX-4090`` ==
``NVIDIA GeForce RTX 4090``. A name that matches no profile exactly is tried as a
*family* (``a100`` is the start of ``a100 80gb sxm``). When a name fits several
profiles, the policy follows from what a memory planner needs:

* if the candidates have the **same memory** (they differ only in form factor, e.g.
  ``a100-80gb`` = SXM4 or PCIe), the highest-bandwidth one (the SXM part) is used - the
  memory plan is identical either way;
* if their memory **differs** (``a100`` = 40 or 80 GB, ``v100`` = 16 or 32 GB, ``3080`` =
  10 or 12 GB, ``4060 ti`` = 8 or 16 GB), a :class:`UsageError` lists the choices,
  because guessing would make the plan wrong by up to 2x;
* a profile may claim a short name outright as an alias: ``h100`` is the H100 SXM5 80GB
  (what clouds mean by "H100"); the PCIe and NVL parts are ``h100-pcie`` / ``h100-nvl``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Iterable
from fractions import Fraction
from functools import cache
from typing import Any

from qplan.errors import QplanError, UsageError
from qplan.loaders import nvml
from qplan.planner.gpu import GpuProfile, GpuTarget
from qplan.profiles import data_dir

SCHEMA = "qplan.gpu/v1"
MAX_COUNT = 1024
MAX_SIZE_BYTES = 100 * 1024**4  # 100 TiB: far beyond any single device, so a typo
SEGMENTS = ("consumer", "workstation", "datacenter")
ARCHITECTURES = ("volta", "turing", "ampere", "ada", "hopper", "blackwell")

_NOISE = ("nvidia", "geforce", "tesla", "quadro", "rtx")
_TOKEN = re.compile(r"[a-z]+|[0-9]+")
_CC = re.compile(r"^[0-9]+\.[0-9]+$")
_COUNT = re.compile(r"^\s*([0-9]+)\s*[x×*]\s*(\S.*)$", re.IGNORECASE)
_SIZE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

# Unit spelling -> (bytes per unit, canonical spelling). GB/MB/TB are decimal, as on
# spec sheets; GiB/MiB/TiB and the docker/k8s shorthands (g, Gi, m, Mi) binary, because
# "--gpu 24g" means the 24 GB card, whose memory is 24 GiB. "t"/"Ti" are deliberately
# not units: "3060ti" and "4060 Ti" are GPU names.
_UNITS: dict[str, tuple[int, str]] = {
    "mb": (10**6, "MB"),
    "gb": (10**9, "GB"),
    "tb": (10**12, "TB"),
    "mib": (2**20, "MiB"),
    "gib": (2**30, "GiB"),
    "tib": (2**40, "TiB"),
    "m": (2**20, "MiB"),
    "g": (2**30, "GiB"),
    "mi": (2**20, "MiB"),
    "gi": (2**30, "GiB"),
}

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "key": str,
    "name": str,
    "aliases": list,
    "nvml_names": list,
    "memory_bytes": int,
    "memory_source": str,
    "compute_capability": str,
    "architecture": str,
    "bf16": bool,
    "fp8": bool,
    "bandwidth_gb_s": (int, float),
    "segment": str,
    "sources": list,
}


class ProfileError(QplanError):
    """A shipped GPU profile is malformed: a packaging bug, reported with the file name."""


class UnknownGpuError(UsageError):
    """A --gpu name that matches no shipped profile (the message suggests close ones)."""


# --------------------------------------------------------------------------- profiles


@cache
def load_profiles() -> tuple[GpuProfile, ...]:
    """Every shipped GPU profile, validated, sorted by key.

    Cached: the files are part of the installed package and cannot change under a
    running process. Raises :class:`ProfileError` naming the file on the first problem,
    and when two profiles claim the same name (which would make lookups ambiguous).
    """
    folder = data_dir("gpus")
    profiles: list[GpuProfile] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            raw = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProfileError(f"GPU profile {entry.name}: not readable JSON ({exc})") from None
        profiles.append(_profile_from_json(entry.name, raw))
    if not profiles:
        raise ProfileError("no GPU profiles found in the installed qplan/profiles/gpus folder")
    _check_unique(profiles)
    return tuple(sorted(profiles, key=lambda p: p.key))


def _profile_from_json(filename: str, raw: Any) -> GpuProfile:
    def bad(why: str) -> ProfileError:
        return ProfileError(f"GPU profile {filename}: {why}")

    if not isinstance(raw, dict):
        raise bad("top level must be a JSON object")
    missing = sorted(set(_FIELDS) - set(raw))
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)} (schema {SCHEMA})")
    for field, kind in _FIELDS.items():
        value = raw[field]
        # bool is an int subclass: keep True from passing as memory_bytes.
        if isinstance(value, bool) and kind is not bool:
            raise bad(f"{field} must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise bad(f"{field} must be {_kind_name(kind)}, got {type(value).__name__}")
    if raw["schema"] != SCHEMA:
        raise bad(f"schema is {raw['schema']!r}, expected {SCHEMA!r}")
    stem = filename.removesuffix(".json")
    if raw["key"] != stem:
        raise bad(f"key {raw['key']!r} does not match the file name {stem!r}")
    for field in ("aliases", "nvml_names", "sources"):
        if not all(isinstance(v, str) and v.strip() for v in raw[field]):
            raise bad(f"{field} must be a list of non-empty strings")
    if not raw["sources"]:
        raise bad("sources must name where the figures came from")
    if not raw["nvml_names"]:
        raise bad("nvml_names must list at least one name NVML reports")
    if raw["memory_bytes"] <= 0:
        raise bad("memory_bytes must be positive")
    if not raw["memory_source"].strip():
        raise bad("memory_source must say where memory_bytes came from")
    cc = raw["compute_capability"]
    if not _CC.match(cc):
        raise bad(f"compute_capability {cc!r} must look like '8.9'")
    if raw["bf16"] != (_cc_tuple(cc) >= (8, 0)):
        raise bad(f"bf16={raw['bf16']} contradicts compute capability {cc} (bf16 iff >= 8.0)")
    if raw["architecture"] not in ARCHITECTURES:
        raise bad(f"architecture {raw['architecture']!r} not one of {', '.join(ARCHITECTURES)}")
    if raw["segment"] not in SEGMENTS:
        raise bad(f"segment {raw['segment']!r} not one of {', '.join(SEGMENTS)}")
    if raw["bandwidth_gb_s"] <= 0:
        raise bad("bandwidth_gb_s must be positive")
    return GpuProfile(
        key=raw["key"],
        name=raw["name"],
        aliases=tuple(raw["aliases"]),
        nvml_names=tuple(raw["nvml_names"]),
        memory_bytes=raw["memory_bytes"],
        memory_source=raw["memory_source"],
        compute_capability=cc,
        architecture=raw["architecture"],
        bf16=raw["bf16"],
        fp8=raw["fp8"],
        bandwidth_gb_s=float(raw["bandwidth_gb_s"]),
        segment=raw["segment"],
        sources=tuple(raw["sources"]),
    )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return "a number"
    return {str: "a string", int: "an integer", bool: "true/false", list: "a list"}[kind]


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def _claims(profile: GpuProfile) -> set[str]:
    """Normalised names a profile owns outright (its key, display name and aliases)."""
    return {normalize(n) for n in (profile.key, profile.name, *profile.aliases)} - {""}


def _check_unique(profiles: list[GpuProfile]) -> None:
    """No duplicate keys, and no name owned by two profiles.

    NVML names may be shared - the RTX 3080 10 GB and 12 GB both report "NVIDIA GeForce
    RTX 3080" - but a key, display name or alias must point at one profile only, and
    must not equal another profile's NVML name (that would shadow it).
    """
    owner: dict[str, str] = {}
    keys: set[str] = set()
    for p in profiles:
        if p.key in keys:
            raise ProfileError(f"GPU profile {p.key}.json: duplicate key {p.key!r}")
        keys.add(p.key)
        for label in _claims(p):
            if label in owner and owner[label] != p.key:
                raise ProfileError(
                    f"GPU profile {p.key}.json: name {label!r} is also claimed by "
                    f"{owner[label]}.json"
                )
            owner[label] = p.key
    for p in profiles:
        for name in p.nvml_names:
            label = normalize(name)
            if label in owner and owner[label] != p.key:
                raise ProfileError(
                    f"GPU profile {owner[label]}.json: a name it claims equals the NVML name "
                    f"{name!r} of {p.key}.json"
                )


# --------------------------------------------------------------------------- names


def _tokens(name: str) -> tuple[str, ...]:
    """Lower-case letter runs and digit runs, vendor noise words dropped.

    Splitting letters from digits makes "a100-80gb", "A100 80 GB" and "a100_80GB" the
    same, and lets "rtx4090" shed its "rtx". "GiB" is folded into "gb" so that
    "A100 80GiB" finds the 80GB profile (names, unlike sizes, are labels).
    """
    out: list[str] = []
    for tok in _TOKEN.findall(name.lower()):
        if tok in _NOISE:
            continue
        out.append("gb" if tok == "gib" else tok)
    return tuple(out)


def normalize(name: str) -> str:
    """A comparison key for a GPU name: case, punctuation and vendor words ignored.

    >>> normalize("NVIDIA GeForce RTX 4090") == normalize("rtx-4090") == normalize("4090")
    True
    """
    return "".join(_tokens(name))


def _labels(profile: GpuProfile) -> set[str]:
    return _claims(profile) | {normalize(n) for n in profile.nvml_names}


def _label_tokens(profile: GpuProfile) -> set[tuple[str, ...]]:
    names = (profile.key, profile.name, *profile.aliases, *profile.nvml_names)
    return {_tokens(n) for n in names}


def _pick(query: str, candidates: list[GpuProfile]) -> GpuProfile:
    """Apply the ambiguity policy of the module docstring to several matches."""
    if len(candidates) == 1:
        return candidates[0]
    if len({p.memory_bytes for p in candidates}) == 1:
        # Same memory: only the form factor differs; take the fastest (SXM) part.
        return max(candidates, key=lambda p: (p.bandwidth_gb_s, p.key))
    choices = ", ".join(
        f"{p.key} ({_gib(p.memory_bytes)})"
        for p in sorted(candidates, key=lambda p: (p.memory_bytes, p.key))
    )
    raise UsageError(
        f"--gpu {query!r} is ambiguous: {choices}; name one (e.g. --gpu {candidates[-1].key})"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def find_profile(name: str) -> GpuProfile:
    """The shipped profile a user-typed GPU name refers to.

    Exact matches (after :func:`normalize`) on key, display name and aliases win, then
    NVML names, then a family match on leading name parts. See the module docstring for
    the ambiguity policy. An unknown name raises :class:`UsageError` suggesting the
    closest names.
    """
    query = normalize(name)
    if not query:
        raise UsageError(f"--gpu {name!r} names no GPU; `qplan gpus` lists the known ones")
    profiles = load_profiles()

    owned = [p for p in profiles if query in _claims(p)]
    if owned:
        return owned[0]  # claims are unique across profiles (checked at load)
    by_nvml = [p for p in profiles if query in {normalize(n) for n in p.nvml_names}]
    if by_nvml:
        return _pick(name, by_nvml)
    toks = _tokens(name)
    # A family is named by a model number or a word ("a100", "grace"): a lone letter
    # ("B" of a mistyped "24XB") would pick a whole generation by its initial.
    specific = any(t.isdigit() or len(t) >= 3 for t in toks)
    family = [
        p
        for p in profiles
        if specific
        and any(len(t) > len(toks) and t[: len(toks)] == toks for t in _label_tokens(p))
    ]
    if family:
        return _pick(name, family)
    raise UnknownGpuError(_unknown_message(name, query, profiles))


def _unknown_message(name: str, query: str, profiles: Iterable[GpuProfile]) -> str:
    label_to_key: dict[str, str] = {}
    for p in profiles:
        for label in sorted(_labels(p)):
            label_to_key.setdefault(label, p.key)
    close = difflib.get_close_matches(query, list(label_to_key), n=8, cutoff=0.5)
    # A short query ("b", "h1") is too short for difflib's ratio: names it begins.
    close += sorted(label for label in label_to_key if query and label.startswith(query))
    keys: list[str] = []
    for label in close:
        if label_to_key[label] not in keys:
            keys.append(label_to_key[label])
    hint = f"closest: {', '.join(keys[:3])}; " if keys else ""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", name.strip()) and float(name) <= 1024:
        hint += f"for a size add a unit (--gpu {name.strip()}GiB); "
    elif (number := re.match(r"\s*([0-9]+(?:\.[0-9]+)?)\s*[a-z]+\s*$", name, re.IGNORECASE)):
        hint += f"for a size write e.g. --gpu {number.group(1)}GB or {number.group(1)}GiB; "
    return f"unknown GPU {name!r}; {hint}`qplan gpus` lists the known names"


# --------------------------------------------------------------------------- sizes


def parse_size(text: str) -> int:
    """Bytes in a memory size such as ``24GiB``, ``80GB``, ``81559MiB`` or ``1.5TiB``.

    GB/MB/TB are decimal (10^9), GiB/MiB/TiB binary (2^30); a bare ``g``/``m``/``t`` (or
    ``Gi``) is binary, as in docker and kubernetes. The arithmetic is exact (no float
    rounding). Raises :class:`UsageError` naming the problem and the fix for anything
    else: no unit, an unknown unit, zero, a negative size, or more than 100 TiB.
    """
    fix = "e.g. --gpu 24GiB or --gpu 80GB"
    m = _SIZE.match(text or "")
    if not m:
        raise UsageError(f"--gpu {text!r} is not a size; {fix}")
    number, unit = m.group(1), m.group(2)
    if number.startswith("-"):
        raise UsageError(f"--gpu {text!r}: a GPU size cannot be negative; {fix}")
    if not unit:
        raise UsageError(f"--gpu {text!r}: a size needs a unit (MiB, GiB, GB, ...); {fix}")
    if unit.lower() not in _UNITS:
        known = "MB, GB, TB, MiB, GiB, TiB"
        raise UsageError(f"--gpu {text!r}: unknown size unit {unit!r} (use {known}); {fix}")
    per_unit, _ = _UNITS[unit.lower()]
    size = int(Fraction(number.lstrip("+")) * per_unit)
    if size <= 0:
        raise UsageError(f"--gpu {text!r}: a GPU size must be more than zero; {fix}")
    if size > MAX_SIZE_BYTES:
        raise UsageError(
            f"--gpu {text!r} is more than 100 TiB - not one GPU; give the per-GPU size "
            f"with a count, e.g. --gpu 8x80GB"
        )
    return size


def _looks_like_size(text: str) -> bool:
    m = _SIZE.match(text)
    return bool(m and m.group(2) and m.group(2).lower() in _UNITS)


def _size_label(text: str) -> str:
    """'24gib' -> '24 GiB': the user's number with the canonical unit spelling."""
    m = _SIZE.match(text)
    assert m is not None
    return f"{m.group(1).lstrip('+')} {_UNITS[m.group(2).lower()][1]}"


# --------------------------------------------------------------------------- targets


def _check_count(count: int, where: str) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise UsageError(f"{where} must be a whole number of GPUs, got {count!r}")
    if count < 1:
        raise UsageError(f"{where} must be at least 1, got {count}")
    if count > MAX_COUNT:
        raise UsageError(f"{where} is {count}; qplan plans for at most {MAX_COUNT} GPUs")
    return count


def _split_count(spec: str) -> tuple[int | None, str]:
    """'2x A100-80GB' -> (2, 'A100-80GB'); '4x4090' -> (4, '4090'); else (None, spec)."""
    m = _COUNT.match(spec)
    if not m:
        return None, spec.strip()
    return _check_count(int(m.group(1)), f"the count in --gpu {spec!r}"), m.group(2).strip()


def resolve_gpu(spec: str, num_gpus: int | None = None) -> GpuTarget:
    """The :class:`GpuTarget` for a ``--gpu`` value (and an optional ``--num-gpus``).

    ``spec`` is ``auto``, a size, or a profile name, each optionally prefixed by a count
    (``2x``). ``num_gpus`` overrides the count; it may not contradict a count prefix.
    A bare size assumes a modern GPU: ``bf16=True`` (every GPU since Ampere, which is
    what anyone sizing by memory alone is most likely to have), with no compute
    capability or architecture claimed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("--gpu is empty; pass auto, a name (--gpu 4090) or a size (--gpu 24GiB)")
    prefix, rest = _split_count(spec)
    if num_gpus is not None:
        _check_count(num_gpus, "--num-gpus")
        if prefix is not None and prefix != num_gpus:
            raise UsageError(
                f"--gpu {spec!r} says {prefix} GPU(s) but --num-gpus says {num_gpus}; "
                "give the count once"
            )
    count = num_gpus if num_gpus is not None else prefix

    if rest.lower() == "auto":
        return _resolve_auto(count)
    if _looks_like_size(rest):
        return GpuTarget(
            name=f"{_size_label(rest)} GPU",
            count=count or 1,
            memory_bytes=parse_size(rest),
            source="size",
            compute_capability=None,
            bf16=True,
            architecture=None,
        )
    sizeish = _SIZE.match(rest)
    if sizeish and sizeish.group(1).startswith("-"):
        parse_size(rest)  # "-24GiB": report the negative size, not an unknown GPU
    try:
        profile = find_profile(rest)
    except UnknownGpuError:
        unit = sizeish.group(2).lower() if sizeish else ""
        if unit.endswith("b") or unit.startswith("byte"):
            parse_size(rest)  # "24KB", "2PB": a size with a bad unit, say so
        if prefix is not None:
            # "24XB" was read as 24 x "B": say what was read and what comes close to it all.
            raise UnknownGpuError(
                _unknown_message(spec, normalize(rest), load_profiles())
                .replace("; ", f" (read as {prefix} x {rest!r}); ", 1)
            ) from None
        raise
    return target_from_profile(profile, count or 1)


def target_from_profile(profile: GpuProfile, count: int = 1) -> GpuTarget:
    """A target of ``count`` devices described by a shipped profile."""
    return GpuTarget(
        name=profile.name,
        count=_check_count(count, "the GPU count"),
        memory_bytes=profile.memory_bytes,
        source="profile",
        compute_capability=profile.compute_capability,
        bf16=profile.bf16,
        architecture=profile.architecture,
        profile_key=profile.key,
    )


# --------------------------------------------------------------------------- NVML


def _arch_from_cc(cc: str) -> str | None:
    major, minor = _cc_tuple(cc)
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    if major == 8:
        return "ada" if minor >= 9 else "ampere"
    return {9: "hopper", 10: "blackwell", 11: "blackwell", 12: "blackwell"}.get(major)


def match_nvml_name(name: str, total_bytes: int | None = None) -> GpuProfile | None:
    """The profile for a name NVML reported, or None.

    Several profiles may share an NVML name (RTX 3080 10/12 GB, RTX 4060 Ti 8/16 GB);
    the one whose memory is closest to the measured total is taken.
    """
    exact = [p for p in load_profiles() if name.lower() in {n.lower() for n in p.nvml_names}]
    if not exact:
        query = normalize(name)
        exact = [p for p in load_profiles() if query in {normalize(n) for n in p.nvml_names}]
    if not exact:
        return None
    if total_bytes is None or len(exact) == 1:
        return exact[0]
    return min(exact, key=lambda p: (abs(p.memory_bytes - total_bytes), p.key))


def _target_from_device(dev: nvml.NvmlDevice, count: int = 1) -> GpuTarget:
    profile = match_nvml_name(dev.name, dev.total_bytes)
    arch = profile.architecture if profile else _arch_from_cc(dev.compute_capability)
    return GpuTarget(
        name=dev.name,
        count=count,
        memory_bytes=dev.total_bytes,
        source="nvml",
        compute_capability=dev.compute_capability,
        # From the device itself, not the profile: the measured capability is the truth.
        bf16=_cc_tuple(dev.compute_capability) >= (8, 0),
        architecture=arch,
        free_bytes=dev.free_bytes,
        profile_key=profile.key if profile else None,
    )


def auto_devices() -> list[GpuTarget]:
    """One target (count 1) per visible device, in CUDA order; for mixed-GPU machines."""
    return [_target_from_device(dev) for dev in nvml.query_devices()]


def _resolve_auto(count: int | None) -> GpuTarget:
    """Device 0 and every visible device of the same model, as one target.

    ``count`` is the number of visible devices with device 0's name and total memory;
    ``free_bytes`` is the least free memory among them, so a plan that fits fits on
    every one of them. A requested count above what is visible is refused: ``auto``
    describes this machine; name the GPU to plan for a bigger one.
    """
    devices = nvml.query_devices()
    first = devices[0]
    same = [d for d in devices if d.name == first.name and d.total_bytes == first.total_bytes]
    if count is not None and count > len(same):
        raise UsageError(
            f"--gpu auto found {len(same)} {first.name}; cannot plan for {count} - name the "
            f"GPU instead (--gpu {count}x{normalize(first.name) or 'NAME'})"
        )
    target = _target_from_device(first, count or len(same))
    # Plan for the tightest device: the lowest free memory among those counted.
    return dataclasses.replace(
        target, free_bytes=min(d.free_bytes for d in same[: target.count])
    )
