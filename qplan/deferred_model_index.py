"""Import ``transformers.models`` without its index of every model's exports, until
something reads that index.

The package's init builds the index its lazy module answers names from
(``define_import_structure``): it reads the source of every model folder, about 1,700
files. That is 0.25 s on this repository's machine, 0.4-0.5 s in its slow stretches:
the largest single import a plan pays beyond ``import torch, transformers``
(``bench/estimate_speed.py --profile``).

A plan never reads the index. It imports what it needs by full name
(``transformers.models.llama.modeling_llama``, the auto classes' mappings). The import
system finds those through the package's path, and from then on each imported submodule
is an attribute of its package.

So, while the command line imports ``transformers.models``, the package is built with an
empty index. Its class is then ``_IndexOnFirstRead``, a subclass of transformers'
``_LazyModule``. The first time anything reads a name the module does not hold itself
(``__getattr__``) or lists its names (``__dir__``), the subclass builds the real index
with transformers' own function, and from then on it is the module an ordinary import
makes. Until then the index fields are absent from the module, so reading one
(``__all__``, ``_class_to_module``) builds the index too. Nothing is answered from an
incomplete index.

This is done only where the package init ends in the statement read here, and where
transformers' ``_LazyModule`` keeps what depends on the index in the fields named here
(checked on two small indexes, not assumed). Any other release is imported as it is.
"""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path
from typing import Any

from qplan.planner.patching import swapped

PACKAGE = "transformers.models"
# The package init's last statement, which builds its module from the index.
BUILDS_MODULE = ("sys.modules[__name__] = _LazyModule(__name__, _file, "
                 "define_import_structure(_file), module_spec=__spec__)")
# What ``_LazyModule.__init__`` derives from the index; the rest it sets from its arguments.
INDEX_FIELDS = ("_modules", "_class_to_module", "__all__", "_import_structure",
                "_object_missing_backend")

_lock = threading.Lock()


def _index_fields_are_known(lazy_module: type) -> bool:
    """Whether ``_LazyModule`` sets from its index exactly the fields of INDEX_FIELDS:
    what two small indexes make differently must be among them, and each must be set."""
    empty = lazy_module("qplan_probe", __file__, {})
    full = lazy_module("qplan_probe", __file__,
                       {frozenset(): {"sub.module": {"Name"}}})
    keys = set(vars(empty)) | set(vars(full))
    differing = {key for key in keys if vars(empty).get(key, keys) != vars(full).get(key, keys)}
    return differing <= set(INDEX_FIELDS) and all(
        field in vars(empty) and field in vars(full) for field in INDEX_FIELDS)


def _builds_module_from_index(init: Path) -> bool:
    try:
        source = init.read_text(encoding="utf-8")
    except OSError:
        return False
    return source.rstrip().endswith(BUILDS_MODULE)


def import_models_package() -> None:
    """Import ``transformers.models`` with its index built when first read, where that is
    known to be safe; as it is otherwise. Nothing changes once it is imported."""
    if PACKAGE in sys.modules:
        return
    import transformers
    from transformers.utils import import_utils

    lazy_module = getattr(import_utils, "_LazyModule", None)
    real = getattr(import_utils, "define_import_structure", None)
    init = Path(transformers.__file__).parent / "models" / "__init__.py"
    if (lazy_module is None or real is None or not _builds_module_from_index(init)
            or not _index_fields_are_known(lazy_module)):
        import transformers.models
        return
    init_path = str(init)

    def no_index_for_models(module_path: str, prefix: str | None = None) -> Any:
        if module_path == init_path and prefix is None:
            return {}
        return real(module_path, prefix)

    class _IndexOnFirstRead(lazy_module):  # type: ignore[misc, valid-type]
        """transformers' lazy module of ``transformers.models``, its index still to build."""

        def _build_index(self) -> None:
            with _lock:
                if type(self) is not _IndexOnFirstRead:
                    return  # another thread built it
                built = lazy_module(self.__name__, self.__file__, real(self.__file__),
                                    module_spec=self.__spec__)
                for field in INDEX_FIELDS:
                    self.__dict__[field] = built.__dict__[field]
                self.__class__ = lazy_module

        def __getattr__(self, name: str) -> Any:
            self._build_index()
            return getattr(self, name)

        def __dir__(self) -> list[str]:
            self._build_index()
            return dir(self)

    with swapped((import_utils, "define_import_structure", no_index_for_models)):
        import transformers.models
    module = sys.modules.get(PACKAGE)
    if type(module) is not lazy_module or any(f not in vars(module) for f in INDEX_FIELDS):
        # Not the module expected: made again as an ordinary import makes it (the package
        # init imports none of its submodules, so nothing else holds the first one).
        del sys.modules[PACKAGE]
        importlib.import_module(PACKAGE)
        return
    for field in INDEX_FIELDS:
        del module.__dict__[field]
    module.__class__ = _IndexOnFirstRead


def index_built() -> bool:
    """Whether ``transformers.models`` (if imported) holds its index of exports."""
    module = sys.modules.get(PACKAGE)
    return module is None or all(field in vars(module) for field in INDEX_FIELDS)
