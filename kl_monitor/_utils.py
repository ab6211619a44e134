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
