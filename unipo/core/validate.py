"""Input checks shared by the core functions.

Bad input fails loudly and names the shapes involved: a silent broadcast between a [B] and
a [B, T] tensor trains on garbage without an error.
"""

from __future__ import annotations

import torch


def check_finite(name: str, tensor: torch.Tensor | None) -> None:
    """Raise ValueError if `tensor` holds NaN or inf (callers may skip via check_finite=False)."""
    if tensor is None or not tensor.is_floating_point():
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} holds {bad} non-finite value(s) (NaN or inf); pass check_finite=False to skip this check"
        )


def check_same_shape(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None ignored) must have one shape."""
    given = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(given.values())) > 1:
        described = ", ".join(f"{k}{list(s)}" for k, s in given.items())
        raise ValueError(f"shape mismatch: {described}")


def check_ndim(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if tensor.dim() != ndim:
        want = "[B]" if ndim == 1 else "[B, T]"
        raise ValueError(f"{name} must be {want}, got shape {list(tensor.shape)}")


def check_per_sequence(name: str, tensor: torch.Tensor, batch: int) -> None:
    """`tensor` must be [B] for the given batch size."""
    if tensor.dim() != 1 or tensor.shape[0] != batch:
        raise ValueError(f"{name} must be [B]=[{batch}], got shape {list(tensor.shape)}")


def check_group_ids(group_ids: torch.Tensor, batch: int) -> None:
    check_per_sequence("group_ids", group_ids, batch)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


def as_float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool or float mask as a float tensor of `like`'s dtype, shape-checked against it."""
    check_same_shape(mask=mask, values=like)
    return mask.to(like.dtype)


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer group ids to 0..n_groups-1 (for scatter/index_add)."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(unique.numel())
