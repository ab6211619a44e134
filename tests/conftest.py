"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kl_monitor import _utils


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of thousands of tiny tensor ops, restored after.

    On a loaded 2-core machine the hand-off between two intra-op threads made some tiny
    ops (log1p in the Pareto fit) hundreds of times slower.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fresh_warnings():
    """warn_once remembers keys process-wide; forget them so each test sees its warning."""
    _utils._WARNED.clear()
    yield
    _utils._WARNED.clear()


@contextlib.contextmanager
def global_state_restored() -> Iterator[None]:
    """The demo seeds the global RNGs (``seed_everything``); give other tests theirs back."""
    env = os.environ.get("PL_GLOBAL_SEED")
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002
            if env is None:
                os.environ.pop("PL_GLOBAL_SEED", None)
            else:
                os.environ["PL_GLOBAL_SEED"] = env
