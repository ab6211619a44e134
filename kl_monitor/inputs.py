"""`KLInputs`: what a model hands the monitor for one held-out batch.

This is the boundary: the constructors validate everything that does not depend on
the monitor's configuration (dtypes, shapes, the mask, pairs given together), and
the layers below trust it. Group labels are checked against ``num_groups`` by the
metric, which knows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ._utils import check_floating, check_logits, check_same_shape
from .knn import check_samples
from .sequences import valid_direction

__all__ = ["INPUT_KINDS", "InputKind", "KLInputs"]

InputKind = Literal["logits", "log_probs", "samples"]
#: The input kinds: ``KLInputs.kind``, and the keys of ``evaluator.METRIC_FOR_KIND``.
INPUT_KINDS: tuple[InputKind, ...] = ("logits", "log_probs", "samples")


@dataclass(frozen=True)
class KLInputs:
    """The contract between a user's model and ``KLMonitor``.

    Build it with one of the two constructors, from a ``kl_inputs(self, batch)``
    method on the LightningModule (or an ``inputs_fn(module, batch)`` given to the
    monitor). Everything is read under ``torch.no_grad()`` and never back-propagated.

    - ``from_logits``: exact categorical KL in both directions (preferred).
    - ``from_log_probs``: Monte Carlo forward KL from reference samples, reverse
      KL from model samples or, without them, by importance weighting.
    - ``from_samples``: samples (or features) only, for generators without a density
      (GANs, diffusion samplers): k-NN or binned KL, both directions.

    Examples:
        >>> import torch
        >>> ref, model = torch.randn(4, 10), torch.randn(4, 10)
        >>> KLInputs.from_logits(ref, model).kind
        'logits'
    """

    kind: InputKind
    reference: torch.Tensor
    model: torch.Tensor
    mask: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    model_samples_log_q: torch.Tensor | None = None
    model_samples_log_p: torch.Tensor | None = None
    model_samples_groups: torch.Tensor | None = None
    sampled_from: str = "reference"

    @classmethod
    def from_logits(
        cls,
        reference_logits: torch.Tensor,
        model_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        *,
        sampled_from: str = "reference",
    ) -> KLInputs:
        """Logits of the reference P and the model Q over the same K classes.

        Both directions are exact per row. For sequences, where the rows (token
        prefixes) came from decides which direction summed along them is a
        sequence-level KL: on reference sequences (held-out data, a teacher) the
        forward D(P‖Q), on the model's own generations the reverse D(Q‖P). The monitor
        logs that direction under its plain name and the other one as
        ``<other>_on_<source>_samples`` (a teacher-forced diagnostic).

        Args:
            reference_logits: ``(..., K)`` logits of P (a teacher, a reference policy,
                the data's known class probabilities in log space).
            model_logits: ``(..., K)`` logits of Q, same shape.
            mask: optional bool ``(...)``; False rows (padding) are ignored.
            groups: optional integer label per row ``(...)`` (class, prompt type), for
                per-group KL and coverage-gap alerts.
            sampled_from: ``"reference"`` (default: held-out data, as before) or
                ``"model"`` (sequences the model generated, e.g. with
                ``kl_monitor.generation.hf_generation_inputs``).
        """
        valid_direction(sampled_from)
        check_logits("reference_logits", reference_logits, "model_logits", model_logits, mask)
        return cls(
            "logits", reference_logits, model_logits, mask=mask, groups=groups,
            sampled_from=sampled_from,
        )

    @classmethod
    def from_log_probs(
        cls,
        reference_log_p: torch.Tensor,
        model_log_q: torch.Tensor,
        *,
        model_samples_log_q: torch.Tensor | None = None,
        model_samples_log_p: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        model_samples_groups: torch.Tensor | None = None,
    ) -> KLInputs:
        """Log-densities at samples, for forward KL and (optionally) reverse KL.

        Args:
            reference_log_p: log p(x) at held-out samples x ~ P.
            model_log_q: log q(x) at the same samples.
            model_samples_log_q: log q(y) at the model's own samples y ~ Q.
            model_samples_log_p: log p(y) at the same model samples. Give both or
                neither; without them reverse KL is importance-weighted from x ~ P.
            groups: optional integer label per reference sample (e.g. mixture mode).
            model_samples_groups: optional label per model sample (e.g. nearest mode).
        """
        check_floating("reference_log_p", reference_log_p)
        check_floating("model_log_q", model_log_q)
        check_same_shape("reference_log_p", reference_log_p, "model_log_q", model_log_q)
        if (model_samples_log_q is None) != (model_samples_log_p is None):
            raise ValueError(
                "give both `model_samples_log_q` and `model_samples_log_p` (log q and log p "
                "at samples of the model), or neither."
            )
        if model_samples_groups is not None and model_samples_log_q is None:
            raise ValueError(
                "`model_samples_groups` labels model samples, but none were passed "
                "(`model_samples_log_q`, `model_samples_log_p`)."
            )
        if model_samples_log_q is not None:
            check_floating("model_samples_log_q", model_samples_log_q)
            check_floating("model_samples_log_p", model_samples_log_p)
            check_same_shape(
                "model_samples_log_q",
                model_samples_log_q,
                "model_samples_log_p",
                model_samples_log_p,
            )
        return cls(
            "log_probs",
            reference_log_p,
            model_log_q,
            groups=groups,
            model_samples_log_q=model_samples_log_q,
            model_samples_log_p=model_samples_log_p,
            model_samples_groups=model_samples_groups,
        )

    @classmethod
    def from_samples(
        cls,
        reference_samples: torch.Tensor,
        model_samples: torch.Tensor,
        *,
        groups: torch.Tensor | None = None,
    ) -> KLInputs:
        """Samples of the reference and of the model, for a model without a density.

        The monitor keeps the samples of up to ``max_batches`` batches (at most
        ``max_samples`` rows per side per rank), gathers them across ranks and
        estimates on the union: k-NN KL (``KNNKL``, default) or binned KL over cells
        learned from the reference (``BinnedKL``), chosen by the monitor's
        ``sample_estimator``. For images, pass features from an encoder of your choice
        (low-dimensional ones: the k-NN bias grows with d).

        Args:
            reference_samples: ``(n, d)`` held-out samples (points or features) of P.
            model_samples: ``(m, d)`` samples of the model Q, same d (m may differ).
            groups: optional integer label per reference sample (class, mode), with
                ``num_groups`` on the monitor. Without labels the monitor's groups are
                k-means cells of the reference (``num_cells``).
        """
        check_samples("reference_samples", reference_samples)
        check_samples("model_samples", model_samples, d=reference_samples.shape[1])
        if groups is not None and (
            not isinstance(groups, torch.Tensor)
            or tuple(groups.shape) != (reference_samples.shape[0],)
        ):
            raise ValueError(
                f"`groups` must be a tensor of shape ({reference_samples.shape[0]},), one "
                f"label per reference sample, got {getattr(groups, 'shape', type(groups))}."
            )
        return cls("samples", reference_samples, model_samples, groups=groups)
