"""Input validation and warn-once helpers shared by every layer."""

from __future__ import annotations

import warnings

import torch

__all__: list[str] = []

_WARNED: set[str] = set()


def is_rank_zero() -> bool:
    """True outside distributed runs and on global rank 0 inside them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def warn_once(key: str, message: str, category: type[Warning] = UserWarning) -> None:
    """Warn the first time ``key`` is seen in this process, on rank zero only."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    if is_rank_zero():
        warnings.warn(message, category, stacklevel=3)


def check_floating(name: str, x: object) -> torch.Tensor:
    """Return ``x`` if it is a floating-point tensor, else raise ``TypeError``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}."
        )
    return x


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def check_nonfinite_mode(nonfinite: str) -> None:
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"`nonfinite` must be 'skip' or 'raise', got {nonfinite!r}.")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half types and float32, float64 for float64: never below float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_logits(
    name_p: str, logits_p: object, name_q: str, logits_q: object, mask: object = None
) -> tuple[int, ...]:
    """Validate two logits tensors ``(..., K)`` and an optional bool mask ``(...)``.

    The one check of categorical inputs, shared by ``KLInputs.from_logits`` and
    ``CategoricalKL.update``. Returns the leading shape (the logits' shape without K).
    """
    p = check_floating(name_p, logits_p)
    q = check_floating(name_q, logits_q)
    if p.dim() == 0 or q.dim() == 0:
        raise ValueError(
            "logits must have shape (..., K) with the K classes last, got scalars "
            f"{tuple(p.shape)} and {tuple(q.shape)}."
        )
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"`{name_p}` has {p.shape[-1]} classes and `{name_q}` has {q.shape[-1]} (shapes "
            f"{tuple(p.shape)} and {tuple(q.shape)}); both must have the same shape (..., K), "
            "over the same K classes on the last axis."
        )
    check_same_shape(name_p, p, name_q, q)
    if p.numel() == 0:
        raise ValueError(f"logits are empty (shape {tuple(p.shape)}).")
    lead = tuple(p.shape[:-1])
    if mask is not None:
        check_mask(mask, lead)
    return lead


def check_mask(mask: object, lead: tuple[int, ...]) -> torch.Tensor:
    """Return ``mask`` if it is a bool tensor of the logits' shape without the class axis."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            "`mask` must be a bool tensor (True = counted row), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}."
        )
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(
            f"`mask` must have the logits' shape without the class axis, {tuple(lead)}, "
            f"got {tuple(mask.shape)}."
        )
    return mask
