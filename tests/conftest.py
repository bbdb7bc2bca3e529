"""Global torch state, owned here and reset for every test.

Every test starts with the same torch threads, RNG seed and deterministic-algorithms flag, and whatever a
test changes is restored afterwards, so no test depends on which file was collected or ran before it.

Threads: ``LACO_TEST_THREADS`` (default 2, the CI machine's cores); a test module may set a module-level
``TORCH_THREADS`` (e.g. 1 for tiny models, where a second thread only adds synchronisation).
"""

from __future__ import annotations

import os

import pytest
import torch

THREADS = int(os.environ.get("LACO_TEST_THREADS", "2"))
SEED = 0


def _threads_for(module) -> int:
    return int(getattr(module, "TORCH_THREADS", THREADS)) if module is not None else THREADS


@pytest.fixture(scope="module", autouse=True)
def _module_torch_threads(request):
    """Module-scoped fixtures (a trained tiny model, a smoke run) build under the module's thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(_threads_for(request.module))
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _torch_state(request):
    """Per test: threads, seed 0 (torch's global RNG), deterministic flag off; all restored afterwards."""
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(_threads_for(request.module))
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(False)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip (reason "needs a CUDA device") where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
