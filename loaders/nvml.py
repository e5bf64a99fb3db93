"""Read the GPUs of this machine through NVML, for ``--gpu auto``.

NVML (``pynvml`` from the ``nvidia-ml-py`` distribution) is used rather than
``torch.cuda`` because it answers without creating a CUDA context: no memory is taken
on the device being measured, and it works in an environment whose torch is CPU-only.

Everything that can go wrong on a machine without a usable NVIDIA driver (the package
missing, ``libnvidia-ml.so`` not found, the kernel module not loaded, no devices, every
device hidden by ``CUDA_VISIBLE_DEVICES``) becomes one :class:`~qplan.errors.DeviceError`
with a one-line message that tells the user what to pass instead.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from qplan.errors import DeviceError

_FIX = "name a GPU (--gpu 4090) or a size (--gpu 24GiB) instead"


@dataclass(frozen=True)
class NvmlDevice:
    """One visible device as NVML reports it.

    ``index`` is NVML's (physical) index, which is what ``CUDA_VISIBLE_DEVICES`` refers
    to; the list returned by :func:`query_devices` is in CUDA's visible order, so the
    first entry is what CUDA will call device 0.
    """

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    compute_capability: str  # "8.9"
    driver_version: str


def _no_driver(reason: str) -> DeviceError:
    return DeviceError(f"no NVIDIA driver found for --gpu auto ({reason}); {_FIX}")


def _text(value: Any) -> str:
    """NVML strings are ``bytes`` in old bindings and ``str`` in current ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _reason(exc: BaseException) -> str:
    """A short, single-line reason from a pynvml error (its str is already human)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def visible_indices(count: int, env: str | None) -> list[int]:
    """The NVML indices CUDA would expose, in CUDA's order, for ``CUDA_VISIBLE_DEVICES``.

    Follows CUDA's rule for integer lists: devices are taken in the listed order and the
    list stops at the first index that is invalid (negative, out of range); a repeated
    index also ends it. An empty value hides every device. A value made of other tokens
    (``GPU-<uuid>``, ``MIG-...``) is not interpreted here; :func:`query_devices` resolves
    UUIDs itself, and anything else leaves every device visible.
    """
    if env is None:
        return list(range(count))
    tokens = [t.strip() for t in env.split(",")]
    if env.strip() == "":
        return []
    if not all(_is_int(t) for t in tokens):
        return list(range(count))
    chosen: list[int] = []
    for token in tokens:
        idx = int(token)
        if idx < 0 or idx >= count or idx in chosen:
            break
        chosen.append(idx)
    return chosen


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def query_devices() -> list[NvmlDevice]:
    """Every device visible to CUDA on this machine, read through NVML.

    Raises :class:`DeviceError` (one line, with the fix) when NVML cannot be loaded or
    initialised, reports no devices, or ``CUDA_VISIBLE_DEVICES`` hides them all.
    """
    try:
        import pynvml
    except ImportError:
        raise _no_driver("the nvidia-ml-py package is not installed") from None

    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        raise _no_driver(_reason(exc)) from None
    try:
        return _read_all(pynvml)
    except DeviceError:
        raise
    except Exception as exc:
        raise _no_driver(f"NVML query failed: {_reason(exc)}") from None
    finally:
        # Shutting down a half-initialised NVML must not mask the real answer.
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _read_all(pynvml: Any) -> list[NvmlDevice]:
    count = int(pynvml.nvmlDeviceGetCount())
    if count <= 0:
        raise _no_driver("the driver is loaded but reports no GPUs")
    driver = _text(pynvml.nvmlSystemGetDriverVersion())
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)}

    order = visible_indices(count, env)
    if env is not None and env.strip() and order == list(range(count)):
        order = _uuid_order(pynvml, handles, env) or order
    if not order:
        raise _no_driver(f"CUDA_VISIBLE_DEVICES={env!r} hides all {count} GPU(s)")

    devices: list[NvmlDevice] = []
    for idx in order:
        handle = handles[idx]
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        devices.append(
            NvmlDevice(
                index=idx,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                total_bytes=int(mem.total),
                free_bytes=int(mem.free),
                used_bytes=int(mem.used),
                compute_capability=f"{int(major)}.{int(minor)}",
                driver_version=driver,
            )
        )
    return devices


def _uuid_order(pynvml: Any, handles: dict[int, Any], env: str) -> list[int] | None:
    """Indices for a ``CUDA_VISIBLE_DEVICES`` of ``GPU-<uuid>`` prefixes, or None.

    CUDA accepts unique UUID prefixes; a token that matches nothing ends the list, as an
    invalid index does. None means "not a UUID list" and leaves the caller's default.
    """
    tokens = [t.strip() for t in env.split(",")]
    if not all(t.upper().startswith("GPU-") for t in tokens):
        return None
    getter = getattr(pynvml, "nvmlDeviceGetUUID", None)
    if getter is None:
        return None
    uuids = {i: _text(getter(h)).lower() for i, h in handles.items()}
    chosen: list[int] = []
    for token in tokens:
        hits = [i for i, u in uuids.items() if u.startswith(token.lower())]
        if len(hits) != 1 or hits[0] in chosen:
            break
        chosen.append(hits[0])
    return chosen
