"""Sequence-level KL along sampled prefixes (Rao–Blackwellized), and sampling transforms.

For sequences y = (y_1, …, y_T), the sequence-level KL is a sum of per-position KLs
averaged over the prefixes of the distribution that generated them:

    D(Q‖P) = E_{y∼Q}[ Σ_t KL(Q(·|y_<t) ‖ P(·|y_<t)) ].

Summing the *exact* per-position KL (a sum over the vocabulary, no sampling) along
prefixes drawn from Q is therefore an unbiased estimate of the sequence-level reverse KL
(the RLHF penalty): the Rao–Blackwellized estimator of Amini, Vieira & Cotterell (2025).
On prefixes drawn from the reference P, Σ_t KL(P_t‖Q_t) estimates the forward KL D(P‖Q).
The other direction summed along the same prefixes is a teacher-forced diagnostic, not a
sequence-level KL; ``sequence_kl`` returns it under a name that says so.

**``sequence_kl``.** Per sequence i, S_i = Σ_t KL(A_t ‖ B_t) (A the distribution the
rows were sampled from, B the other) is summed exactly over the vocabulary at each
counted position. E[S_i] is the sequence-level D(A‖B), so the mean over sequences is
unbiased with standard error sd(S)/√n: on model generations (``sampled_from="model"``)
it estimates D(Q‖P), on reference sequences D(P‖Q). Each term is the conditional
expectation of the sampled per-token log-ratio (k1) given its prefix, which removes the
token's own sampling noise; it usually has a much smaller variance than Σ_t k1_t, but
not always (when log Q(y)/P(y) is nearly constant, as for a Q that is P restricted to a
subset, Σ_t k1_t can have the smaller one: see docs/language_models.md).

``sequence_kl`` raises ``TypeError`` for non-floating logits or a non-bool mask, and
``ValueError`` for shapes other than ``(B, T, K)``/``(B, T)``, a bad ``sampled_from``,
or no counted position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._utils import check_floating, check_mask, check_nonfinite_mode, check_same_shape
from .estimators import categorical_kl_rows, kept_rows

__all__ = [
    "SAMPLED_FROM",
    "SamplingTransform",
    "SequenceKLEstimate",
    "valid_direction",
    "sequence_kl",
]

#: Where the rows (token prefixes) came from: the reference P or the model Q.
SAMPLED_FROM = ("reference", "model")


def valid_direction(sampled_from: str) -> str:
    """The direction whose per-position sum along these rows is a sequence-level KL.

    ``"reference"`` rows (held-out data, a teacher's generations) give ``"forward"``
    D(P‖Q); ``"model"`` rows (the model's own generations) give ``"reverse"`` D(Q‖P).

    Examples:
        >>> valid_direction("model"), valid_direction("reference")
        ('reverse', 'forward')
    """
    if sampled_from not in SAMPLED_FROM:
        raise ValueError(
            f"`sampled_from` must be 'reference' (rows drawn from the reference P: "
            f"held-out data, a teacher) or 'model' (the model's own generations), "
            f"got {sampled_from!r}."
        )
    return "forward" if sampled_from == "reference" else "reverse"


@dataclass(frozen=True)
class SamplingTransform:
    """Temperature, top-k and top-p (nucleus) applied to logits, as samplers do.

    The order is that of Hugging Face ``generate``: divide by ``temperature``, keep the
    ``top_k`` largest logits, then keep the smallest set of tokens whose probability
    reaches ``top_p`` (at least one). Removed tokens get ``-inf`` (probability 0).

    The KL of a model that samples with these settings is the KL of the *transformed*
    distribution: score the logits after this transform (the ones the tokens were drawn
    from), or the estimate is of a distribution nobody sampled.

    Args:
        temperature: > 0; 1 leaves the logits unchanged.
        top_k: keep the k most likely tokens (ties at the k-th value are kept); None: all.
        top_p: in (0, 1]; None or 1: no nucleus truncation.

    Examples:
        >>> t = SamplingTransform(temperature=2.0, top_k=2)
        >>> t(torch.tensor([2.0, 0.0, 4.0]))
        tensor([1., -inf, 2.])
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == math.inf:
            raise ValueError(f"`temperature` must be a finite number > 0, got {t!r}.")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"`top_k` must be an int >= 1 or None, got {k!r}.")
        p = self.top_p
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1
        ):
            raise ValueError(f"`top_p` must be in (0, 1] or None, got {p!r}.")

    @property
    def is_identity(self) -> bool:
        """True when the transform leaves every distribution unchanged."""
        return self.temperature == 1 and self.top_k is None and self.top_p in (None, 1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Transformed logits ``(..., K)``, in float32 (float64 kept)."""
        check_floating("logits", logits)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = logits.to(dtype)
        if self.temperature != 1:
            out = out / self.temperature
        if self.top_k is not None and self.top_k < out.shape[-1]:
            kth = torch.topk(out, self.top_k, dim=-1).values[..., -1:]
            out = out.masked_fill(out < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = torch.sort(out, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            out = out.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        return out


@dataclass(frozen=True)
class SequenceKLEstimate:
    """Sequence-level KL from exact per-position KLs summed along sampled prefixes.

    Attributes:
        sampled_from: ``"model"`` or ``"reference"``: where the rows came from.
        direction: the valid direction on these rows (``"reverse"`` on model samples,
            ``"forward"`` on reference samples).
        value: mean over sequences of Σ_t KL_t (nats per sequence); ``+inf`` when a
            sequence has a support violation in this direction.
        stderr: sd of the per-sequence sums / √n (inf below two sequences).
        token_mean: Σ_i S_i / Σ_i L_i (nats per token) over the same sequences.
        token_mean_stderr: its standard error by the delta method *over sequences* (the
            positions of one sequence are not independent).
        n_sequences: sequences with at least one counted position.
        n_tokens: counted positions.
        per_sequence: ``(B,)`` the per-sequence sums S_i in the valid direction.
        teacher_forced: ``(B,)`` the other direction summed along the same prefixes: a
            diagnostic, *not* a sequence-level KL.
        lengths: ``(B,)`` counted positions per sequence.
    """

    sampled_from: str
    direction: str
    value: float
    stderr: float
    token_mean: float
    token_mean_stderr: float
    n_sequences: int
    n_tokens: int
    per_sequence: torch.Tensor
    teacher_forced: torch.Tensor
    lengths: torch.Tensor

    @property
    def other_direction(self) -> str:
        """The teacher-forced direction's name, e.g. ``"forward_on_model_samples"``."""
        other = "reverse" if self.direction == "forward" else "forward"
        return f"{other}_on_{self.sampled_from}_samples"

    def __float__(self) -> float:
        return self.value


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    """Mean and sd/√n of a float64 vector (inf when a value is inf or n < 2)."""
    n = x.numel()
    if not torch.isfinite(x).all():
        return math.inf, math.inf
    mean = float(x.mean())
    return mean, (float(x.std(correction=1)) / math.sqrt(n) if n > 1 else math.inf)


def _ratio_se(s: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """Σs/ΣL and its delta-method stderr over sequences: sd(s − R·L) / (√n · mean L)."""
    n = s.numel()
    if not torch.isfinite(s).all():
        return math.inf, math.inf
    ratio = float(s.sum() / lengths.sum())
    if n < 2:
        return ratio, math.inf
    resid = s - ratio * lengths
    return ratio, float(resid.std(correction=1)) / (math.sqrt(n) * float(lengths.mean()))


def sequence_kl(
    reference_logits: torch.Tensor,
    model_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    sampled_from: str = "model",
    nonfinite: str = "skip",
) -> SequenceKLEstimate:
    r"""Rao–Blackwellized sequence-level KL from logits along sampled sequences.

    Rows ``(B, T, K)`` are the logits of P and Q at each position t of B sequences, given
    the prefix y_<t of a sequence drawn from ``sampled_from``. Per sequence i,

        S_i = Σ_t KL(A_t ‖ B_t)      (A = the sampling distribution, B = the other),

    exact over the vocabulary; the mean over sequences is an unbiased estimate of D(A‖B)
    (why, and its variance against Σ_t k1_t: the ``kl_monitor.sequences`` module docstring).

    Args:
        reference_logits: ``(B, T, K)`` logits of P at each position.
        model_logits: ``(B, T, K)`` logits of Q (after any sampling transform, when the
            model sampled the rows: see ``SamplingTransform``).
        mask: optional bool ``(B, T)``; False positions (prompt, padding, after EOS) uncounted.
        sampled_from: ``"model"`` (default) or ``"reference"``.
        nonfinite: ``"skip"`` (drop rows with NaN/+inf logits, one warning) or ``"raise"``.

    Returns:
        A ``SequenceKLEstimate``.

    Examples:
        >>> q = torch.zeros(2, 3, 4)             # model: uniform over 4 tokens
        >>> p = torch.zeros(2, 3, 4); p[..., 0] = math.log(2.0)
        >>> est = sequence_kl(p, q, sampled_from="model")
        >>> est.direction, round(est.value, 4), est.stderr  # 3 × D(U‖P) per sequence
        ('reverse', 0.1496, 0.0)
        >>> est.other_direction
        'forward_on_model_samples'
    """
    direction = valid_direction(sampled_from)
    check_nonfinite_mode(nonfinite)
    _check_sequence_logits(reference_logits, model_logits)
    counted = _check_mask(mask, reference_logits.shape[:2], reference_logits.device)
    fwd, rev, _, _, valid = categorical_kl_rows(reference_logits, model_logits)
    keep, _ = kept_rows(valid, counted, nonfinite)
    zero = torch.zeros((), dtype=torch.float64, device=keep.device)
    fwd = torch.where(keep, fwd.double(), zero).sum(-1)
    rev = torch.where(keep, rev.double(), zero).sum(-1)
    lengths = keep.sum(-1).double()
    has = lengths > 0
    if not bool(has.any()):
        raise ValueError("no counted position: every row is masked or non-finite.")
    main, other = (rev, fwd) if direction == "reverse" else (fwd, rev)
    value, se = _mean_se(main[has])
    tok, tok_se = _ratio_se(main[has], lengths[has])
    return SequenceKLEstimate(
        sampled_from=sampled_from, direction=direction, value=value, stderr=se,
        token_mean=tok, token_mean_stderr=tok_se, n_sequences=int(has.sum()),
        n_tokens=int(lengths.sum()), per_sequence=main, teacher_forced=other, lengths=lengths,
    )


def _check_sequence_logits(reference_logits: torch.Tensor, model_logits: torch.Tensor) -> None:
    """The logits checks of :func:`sequence_kl`: floating, one shape, ``(B, T, K)``."""
    check_floating("reference_logits", reference_logits)
    check_floating("model_logits", model_logits)
    check_same_shape("reference_logits", reference_logits, "model_logits", model_logits)
    if reference_logits.dim() != 3:
        raise ValueError(
            "sequence logits must have shape (batch, seq, K), "
            f"got {tuple(reference_logits.shape)}."
        )


def _check_mask(
    mask: torch.Tensor | None, lead: torch.Size, device: torch.device
) -> torch.Tensor:
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    return check_mask(mask, tuple(lead)).to(device)
