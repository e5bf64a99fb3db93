"""What a checkpoint's safetensors files hold, read from their headers (never the data).

A safetensors file starts with an 8-byte little-endian header length and a JSON header
naming every tensor's dtype, shape and byte range; summing the ranges gives the stored
bytes without reading a tensor. For a Hub id, huggingface_hub's
``get_safetensors_metadata`` fetches the same headers (HTTP range requests), unless
HF_HUB_OFFLINE is set. The planned resident bytes decide; this is a second check that
catches a layout qplan does not know.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class StoredBytes:
    bytes: int
    tensors: int
    source: str  # "safetensors headers" | "hub safetensors metadata"


def _header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def local_stored_bytes(folder: str | Path) -> StoredBytes | None:
    """Sum of the tensors in ``folder``'s *.safetensors headers (None without any)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = count = 0
    for path in files:
        try:
            header = _header(path)
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            total += end - start
            count += 1
    return StoredBytes(total, count, "safetensors headers")


def hub_stored_bytes(repo_id: str, revision: str | None) -> StoredBytes | None:
    """From the Hub's safetensors metadata; None when offline or unavailable."""
    if any(os.environ.get(v, "").upper() in _TRUE
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo_id, revision=revision, timeout=10)
    except Exception:  # no network, gated repo, no safetensors: the check is optional
        return None
    total = count = 0
    for file_meta in meta.files_metadata.values():
        for info in file_meta.tensors.values():
            start, end = info.data_offsets
            total += end - start
            count += 1
    return StoredBytes(total, count, "hub safetensors metadata")


def stored_bytes_of(spec: object) -> StoredBytes | None:
    """The stored bytes of a resolved model: its weights folder, or the Hub for Hub ids."""
    folder = getattr(spec, "weights_dir", None)
    found = local_stored_bytes(folder) if folder else None
    if found is not None:
        return found
    if getattr(spec, "source", None) in ("hub", "cache"):
        return hub_stored_bytes(str(spec.id), getattr(spec, "revision", None))
    return None
