"""Fixtures shared by the test modules."""

from __future__ import annotations

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
