"""SpecAugment properties: bounded masks, padding untouched, eval identity, seeded."""

import pytest
import torch

from allinone.data import SpecAugment


def _batch():
    torch.manual_seed(0)
    lengths = torch.tensor([100, 60, 37])
    feats = torch.randn(3, 100, 80) + 10.0  # no exact zeros in the input
    for b, n in enumerate(lengths.tolist()):
        feats[b, n:] = -5.0  # recognisable padding
    return feats, lengths


def test_eval_is_identity():
    feats, lengths = _batch()
    aug = SpecAugment(seed=0).eval()
    out, out_lens = aug(feats, lengths)
    assert torch.equal(out, feats) and torch.equal(out_lens, lengths)


@pytest.mark.parametrize("seed", range(5))
def test_masks_are_bounded_and_padding_untouched(seed):
    feats, lengths = _batch()
    aug = SpecAugment(num_freq_masks=2, freq_mask_width=10, num_time_masks=3, time_mask_width=7,
                      time_warp_window=0, seed=seed).train()
    out, out_lens = aug(feats, lengths)
    assert torch.equal(out_lens, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], feats[b, n:])  # padding untouched
        zero = out[b, :n] == 0
        full_cols = zero.all(dim=0)   # frequency bins masked over every frame
        full_rows = zero.all(dim=1)   # frames masked over every bin
        # Every zero comes from a mask, and the masks cover at most count * width.
        assert (zero == (full_cols[None, :] | full_rows[:, None])).all()
        assert int(full_cols.sum()) <= 2 * 10 or bool(full_rows.all())
        assert int(full_rows.sum()) <= 3 * 7 or bool(full_cols.all())
        # Untouched values are unchanged (no warp here).
        assert torch.equal(out[b, :n][~zero], feats[b, :n][~zero])


def test_time_mask_ratio_scales_with_length():
    feats, lengths = _batch()
    aug = SpecAugment(num_freq_masks=0, num_time_masks=1, time_mask_width_ratio=0.1, time_warp_window=0,
                      seed=3).train()
    for _ in range(20):
        out, _ = aug(feats, lengths)
        for b, n in enumerate(lengths.tolist()):
            assert int((out[b, :n] == 0).all(dim=1).sum()) <= int(0.1 * n)


def test_seeded_and_time_warp_keeps_shape():
    feats, lengths = _batch()
    a = SpecAugment(time_warp_window=5, seed=7).train()(feats, lengths)[0]
    b = SpecAugment(time_warp_window=5, seed=7).train()(feats, lengths)[0]
    c = SpecAugment(time_warp_window=5, seed=8).train()(feats, lengths)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == feats.shape
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(a[i, n:], feats[i, n:])


def test_bad_arguments():
    with pytest.raises(ValueError):
        SpecAugment(freq_mask_width=-1)
    with pytest.raises(ValueError, match="feats"):
        SpecAugment().train()(torch.zeros(2, 10), torch.tensor([10, 10]))
