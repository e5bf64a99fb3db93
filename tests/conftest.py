from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# No trace cache across tests (tests patch the planner); tests of the cache turn it on.
os.environ.setdefault("QPLAN_CACHE", "0")
# Plans made in this process only: tests count what a plan runs (patched functions, the
# models it builds), which forked plan workers would do out of sight. The tests of the
# workers (tests/test_plan_workers.py) turn them on.
os.environ.setdefault("QPLAN_WORKERS", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# The suite's worker processes (pyproject's `-n auto`): each imports torch, transformers,
# peft, TRL and bitsandbytes (about 0.9 GB resident measured for one running the TRL, user
# loop and fast-path tests), so at most this many, and no more than the usable cores.
MAX_TEST_WORKERS = 4


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_TEST_WORKERS, cores))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Return a function giving the folder of a saved tiny random model of an architecture."""
    from tiny_models import save_tiny_model

    cache: dict[tuple, Path] = {}

    def get(arch: str, dtype: str = "bfloat16", **overrides) -> Path:
        key = (arch, dtype, repr(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-{dtype}")
            save_tiny_model(arch, folder, dtype, **overrides)
            cache[key] = folder
        return cache[key]

    return get


@pytest.fixture
def one_thread():
    """Tiny CPU steps run fastest on one thread (and keep a shared machine responsive)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
