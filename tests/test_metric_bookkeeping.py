"""The monitor's path into the metrics keeps torchmetrics' own update bookkeeping."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from kl_monitor import CategoricalKL, KLInputs


def _inputs(seed: int) -> KLInputs:
    g = torch.Generator().manual_seed(seed)
    return KLInputs.from_logits(torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g))


def test_update_from_counts_as_an_update_and_drops_a_cached_compute():
    metric = CategoricalKL()
    metric.update_from(_inputs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics warns on compute before update
        first = float(metric.compute()["forward"])
    metric.update_from(_inputs(1))  # must invalidate torchmetrics' cached result
    second = float(metric.compute()["forward"])
    assert metric._update_count == 2
    assert second != first


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_update_from_survives_copies(copier):
    metric = copier(CategoricalKL())
    metric.update_from(_inputs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(metric.compute()["forward"]) > 0
