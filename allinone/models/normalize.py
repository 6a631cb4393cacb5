"""Global mean/variance normalisation of features, equal to ESPnet2's ``GlobalMVN``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch
from torch import nn

__all__ = ["GlobalMVN", "stats_to_mean_std", "load_stats_file"]

Stats = Union[Mapping[str, "np.ndarray | torch.Tensor | float"], str, os.PathLike]


def load_stats_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ESPnet's ``feats_stats.npz`` (keys ``count``, ``sum``, ``sum_square``).

    A Kaldi-style ``.npy`` matrix ``[2, F+1]`` (sums with the count in the last
    column, squares in the second row) is accepted too, as ESPnet does.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"normalisation stats file not found: {path}")
    loaded = np.load(path)
    if isinstance(loaded, np.ndarray):
        if loaded.ndim != 2 or loaded.shape[0] < 2:
            raise ValueError(f"{path}: expected a Kaldi-style [2, F+1] stats matrix, got {loaded.shape}")
        return {"count": loaded[0, -1], "sum": loaded[0, :-1], "sum_square": loaded[1, :-1]}
    missing = {"count", "sum", "sum_square"} - set(loaded.files)
    if missing:
        raise ValueError(f"{path}: stats file lacks key(s) {', '.join(sorted(missing))}")
    return {k: loaded[k] for k in ("count", "sum", "sum_square")}


def stats_to_mean_std(stats: Stats, eps: float = 1.0e-20) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulated stats -> (mean [F], std [F]) as float32 tensors.

    ``stats`` is a dict with ``count`` (frames), ``sum`` [F] and ``sum_square`` [F], or
    a path to ESPnet's ``feats_stats.npz``.  Computed in float64 like ESPnet, then
    ``std = sqrt(max(E[x^2] - E[x]^2, eps))``.
    """
    if isinstance(stats, (str, os.PathLike)):
        stats = load_stats_file(stats)
    missing = {"count", "sum", "sum_square"} - set(stats)
    if missing:
        raise ValueError(f"normalisation stats lack key(s) {', '.join(sorted(missing))}")

    def as_np(v) -> np.ndarray:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        return np.asarray(v, dtype=np.float64)

    count = as_np(stats["count"]).reshape(-1)[-1]
    if not count > 0:
        raise ValueError(f"normalisation stats have count={count}; expected > 0")
    mean = as_np(stats["sum"]) / count
    var = as_np(stats["sum_square"]) / count - mean * mean
    std = np.sqrt(np.maximum(var, eps))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


class GlobalMVN(nn.Module):
    """``(x - mean) / std`` per feature dimension; padded frames come out as 0.

    Buffers ``mean`` and ``std`` [F] have ESPnet's names, so the ``normalize.*``
    entries of an ESPnet state dict load directly.  Before stats are set the layer is
    the identity (mean 0, std 1).

    Args:
        feat_dim: F.
        stats: optional stats dict / ``feats_stats.npz`` path (see ``stats_to_mean_std``).
        norm_means, norm_vars: subtract the mean / divide by the std (ESPnet's flags).
        eps: variance floor.
    """

    def __init__(
        self,
        feat_dim: int = 80,
        stats: Stats | None = None,
        norm_means: bool = True,
        norm_vars: bool = True,
        eps: float = 1.0e-20,
    ):
        super().__init__()
        self.norm_means = norm_means
        self.norm_vars = norm_vars
        self.eps = eps
        self.register_buffer("mean", torch.zeros(feat_dim))
        self.register_buffer("std", torch.ones(feat_dim))
        if stats is not None:
            self.set_stats(stats)

    @classmethod
    def from_stats(cls, stats: Stats, **kwargs) -> "GlobalMVN":
        """Build from a stats dict or an ESPnet ``feats_stats.npz`` path."""
        mean, std = stats_to_mean_std(stats, kwargs.get("eps", 1.0e-20))
        mvn = cls(feat_dim=mean.numel(), **kwargs)
        mvn.mean.copy_(mean)
        mvn.std.copy_(std)
        return mvn

    def set_stats(self, stats: Stats) -> None:
        """Replace mean/std from accumulated stats (the feature dimension must match)."""
        mean, std = stats_to_mean_std(stats, self.eps)
        if mean.shape != self.mean.shape:
            raise ValueError(
                f"normalisation stats have {mean.numel()} dimensions; the model expects {self.mean.numel()}"
            )
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [batch, frame, F], lengths: [batch] -> (normalised x, lengths).

        Does not modify ``x`` in place (ESPnet's does when no gradient is needed).
        """
        if lengths is None:
            lengths = torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
        if self.norm_means:
            x = x - self.mean.to(x.dtype)
        # Zero the padding before the division, in ESPnet's order.
        pad = torch.arange(x.size(1), device=x.device)[None, :] >= lengths[:, None]
        x = x.masked_fill(pad[:, :, None], 0.0)
        if self.norm_vars:
            x = x / self.std.to(x.dtype)
        return x, lengths

    def extra_repr(self) -> str:
        return f"feat_dim={self.mean.numel()}, norm_means={self.norm_means}, norm_vars={self.norm_vars}"
