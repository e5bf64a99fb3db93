"""Keep what a packer wrote, without the weights: its configs and its safetensors header.

Shared by the scripts that made the checkpoints in tests/data (make_gptqmodel_checkpoint.py,
modelopt-fp8-tiny-llama/make.py).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path


def keep(written: Path, target: Path, configs: tuple[str, ...]) -> None:
    """Copy ``configs`` from ``written`` to ``target`` and save model.safetensors' header
    (names, dtypes, shapes; no tensor data) as model.safetensors.header.json."""
    target.mkdir(exist_ok=True)
    for name in configs:
        shutil.copy(written / name, target / name)
    with open(written / "model.safetensors", "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    meta = header.pop("__metadata__", None)
    kept = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(header.items())}
    (target / "model.safetensors.header.json").write_text(
        json.dumps({"__metadata__": meta, **kept}, indent=1))
