"""The resolved model handed from loaders/ to the planner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A model the planner can build on the meta device.

    ``config`` is a ``transformers.PretrainedConfig`` (typed ``Any`` so this module stays
    import-light). ``source`` is one of "path", "catalog", "cache", "hub".
    """

    id: str
    source: str
    config: Any
    config_path: str | None = None  # the config.json that was read, when there was a file
    revision: str | None = None
    trust_remote_code: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Folder holding the weights (and maybe a tokenizer) when the model is local.
    weights_dir: str | None = None
