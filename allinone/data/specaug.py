"""SpecAugment (Park et al., 2019): time warp, frequency masks and time masks on padded batches.

Unlike ESPnet's ``SpecAug``, every mask and the warp stay inside each utterance's valid
length, so padding frames are never touched (they stay whatever the collate function put
there), and the module is the identity in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpecAugment(nn.Module):
    """Random time warp plus frequency and time masks.

    Args:
        num_freq_masks: frequency masks per utterance.
        freq_mask_width: maximum width of a frequency mask, in bins (width is uniform in [0, max]).
        num_time_masks: time masks per utterance.
        time_mask_width: maximum width of a time mask, in frames.
        time_mask_width_ratio: if given, the maximum time-mask width is this fraction of each
            utterance's length instead (ESPnet's ``time_mask_width_ratio_range=(0, ratio)``).
        time_warp_window: maximum shift of the warp point in frames; 0 disables time warp.
        replace_with_zero: masked values become 0 (ESPnet's default); otherwise the
            utterance's mean over its valid frames.
        seed: if given, the module draws from its own ``torch.Generator`` seeded with it, so a
            run is reproducible regardless of other random calls.
    """

    def __init__(
        self,
        num_freq_masks: int = 2,
        freq_mask_width: int = 27,
        num_time_masks: int = 2,
        time_mask_width: int = 40,
        time_mask_width_ratio: float | None = None,
        time_warp_window: int = 5,
        replace_with_zero: bool = True,
        seed: int | None = None,
    ):
        super().__init__()
        if min(num_freq_masks, freq_mask_width, num_time_masks, time_mask_width, time_warp_window) < 0:
            raise ValueError("SpecAugment mask counts, widths and the warp window must be >= 0")
        if time_mask_width_ratio is not None and not 0.0 <= time_mask_width_ratio <= 1.0:
            raise ValueError(f"time_mask_width_ratio must be in [0, 1], got {time_mask_width_ratio}")
        self.num_freq_masks = num_freq_masks
        self.freq_mask_width = freq_mask_width
        self.num_time_masks = num_time_masks
        self.time_mask_width = time_mask_width
        self.time_mask_width_ratio = time_mask_width_ratio
        self.time_warp_window = time_warp_window
        self.replace_with_zero = replace_with_zero
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def extra_repr(self) -> str:
        time_width = (f"time_mask_width_ratio={self.time_mask_width_ratio}" if self.time_mask_width_ratio is not None
                      else f"time_mask_width={self.time_mask_width}")
        return (f"num_freq_masks={self.num_freq_masks}, freq_mask_width={self.freq_mask_width}, "
                f"num_time_masks={self.num_time_masks}, {time_width}, time_warp_window={self.time_warp_window}")

    def _randint(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high]`` (inclusive), from the module's generator (on CPU)."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator).item())

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a padded batch.

        Args:
            feats: ``[batch, frame, feat]``.
            lengths: ``[batch]`` valid frames per utterance.
        Returns:
            ``(feats [batch, frame, feat], lengths [batch])``; lengths are unchanged (the time
            warp keeps each utterance's length). Eval mode returns the input as is.
        """
        if not self.training:
            return feats, lengths
        if feats.dim() != 3 or lengths.dim() != 1 or lengths.size(0) != feats.size(0):
            raise ValueError(f"SpecAugment expects feats [batch, frame, feat] and lengths [batch], "
                             f"got {tuple(feats.shape)} and {tuple(lengths.shape)}")
        out = feats.clone()
        for b, length in enumerate(lengths.tolist()):
            if length <= 0:
                continue
            x = out[b, :length]  # a view: edits land in `out`, padding is never touched
            if self.time_warp_window > 0:
                x.copy_(self._time_warp(x))
            fill = 0.0 if self.replace_with_zero else x.mean()
            for _ in range(self.num_freq_masks):
                lo, hi = self._mask_span(x.size(1), self.freq_mask_width)
                x[:, lo:hi] = fill
            max_time = self.time_mask_width
            if self.time_mask_width_ratio is not None:
                max_time = int(length * self.time_mask_width_ratio)
            for _ in range(self.num_time_masks):
                lo, hi = self._mask_span(length, max_time)
                x[lo:hi, :] = fill
        return out, lengths

    def _mask_span(self, size: int, max_width: int) -> tuple[int, int]:
        """A random ``[lo, hi)`` with ``hi - lo <= min(max_width, size)``."""
        width = self._randint(0, min(max_width, size))
        lo = self._randint(0, size - width)
        return lo, lo + width

    def _time_warp(self, x: torch.Tensor) -> torch.Tensor:
        """Move a random point ``c`` of ``x [frame, feat]`` to ``c + shift``, stretching both sides.

        Returns ``[frame, feat]``: the same length, so labels stay aligned.
        """
        length, window = x.size(0), self.time_warp_window
        if length <= 2 * window + 1:
            return x  # too short to warp without moving a boundary
        centre = self._randint(window + 1, length - window - 1)
        warped = self._randint(centre - window, centre + window)
        if warped == centre:
            return x
        # Bicubic interpolation over [1, 1, frame, feat] as in ESPnet's TimeWarp.
        img = x[None, None]
        left = F.interpolate(img[:, :, :centre], size=(warped, x.size(1)), mode="bicubic", align_corners=False)
        right = F.interpolate(img[:, :, centre:], size=(length - warped, x.size(1)), mode="bicubic",
                              align_corners=False)
        return torch.cat([left, right], dim=2)[0, 0]
