"""Quantizer math: codes and scales against numpy brute force, STE / LSQ gradients, modules."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from allinone.quant.quantizer import (
    SUPPORTED_BITS, MultiPrecisionQuantizer, NestedQuantizer, check_bits, compute_scale, dequantize,
    fake_quant, lsq_grad_scale, nested_codes, nested_scale, quant_levels, quantize_codes)

INT_BITS = [b for b in SUPPORTED_BITS if b != 32]


def test_check_bits_message():
    with pytest.raises(ValueError, match="bit-width 9 is outside the supported set"):
        check_bits(9)
    for bad in (0, 16, True, 4.0):
        with pytest.raises(ValueError):
            check_bits(bad)
    assert [quant_levels(b) for b in INT_BITS] == [1, 1, 3, 7, 15, 31, 63, 127]
    with pytest.raises(ValueError):
        quant_levels(32)


def _brute_force_codes(w: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    """Nearest level k*s for k in [-L, L], found by trying every level (float64)."""
    L = quant_levels(bits)
    levels = np.arange(-L, L + 1, dtype=np.float64)
    dist = np.abs(w.astype(np.float64)[..., None] - levels * s.astype(np.float64)[..., None])
    return levels[dist.argmin(-1)]


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(16, 24), (6, 4, 5)])
def test_codes_and_scale_match_numpy(bits, per_channel, shape):
    g = torch.Generator().manual_seed(bits * 10 + per_channel)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *(1,) * (len(shape) - 1), generator=g)
    wn = w.numpy()
    axes = tuple(range(1, wn.ndim)) if per_channel else tuple(range(wn.ndim))
    s = compute_scale(w, bits, per_channel)
    codes = quantize_codes(w, s, bits)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert s.shape == ((shape[0] if per_channel else 1),) + (1,) * (len(shape) - 1)
    if bits == 1:
        np.testing.assert_allclose(s.numpy(), np.abs(wn).mean(axis=axes, keepdims=True), rtol=1e-6)
        np.testing.assert_array_equal(codes.numpy(), np.where(wn >= 0, 1, -1))
    else:
        L = quant_levels(bits)
        np.testing.assert_allclose(s.numpy(), np.abs(wn).max(axis=axes, keepdims=True) / L, rtol=1e-6)
        want = _brute_force_codes(wn, np.broadcast_to(s.numpy(), wn.shape), bits)
        v = wn / s.numpy()
        tie = np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-4  # exact ties may round either way
        assert np.all((codes.numpy() == want) | tie)
        assert np.abs(codes.numpy()).max() == L  # the max-abs weight sits on the top level
    deq = dequantize(codes, s)
    np.testing.assert_array_equal(deq.numpy(), codes.numpy().astype(np.float32) * s.numpy())
    assert torch.equal(fake_quant(w, s, bits), deq)


def test_zero_weight_and_clamping():
    w = torch.zeros(3, 4)
    s = compute_scale(w, 4, per_channel=True)
    assert torch.all(s > 0) and torch.all(quantize_codes(w, s, 4) == 0)
    # Values beyond the range clamp to +-L.
    codes = quantize_codes(torch.tensor([[10.0, -10.0, 0.26]]), torch.tensor([[0.5]]), 3)
    assert codes.tolist() == [[3, -3, 1]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_scale_not_worse_than_max(bits):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    def err(s):
        return (dequantize(quantize_codes(w, s, bits), s) - w).pow(2).sum(1)
    s_max, s_mse = compute_scale(w, bits, True, "max"), compute_scale(w, bits, True, "mse")
    assert torch.all(s_mse <= s_max + 1e-9)
    assert torch.all(err(s_mse) <= err(s_max) + 1e-6)
    assert torch.all(err(s_mse) <= err(0.5 * s_max) + 1e-6)
    if bits == 2:  # ternary of a Gaussian: clipping helps a lot
        assert err(s_mse).sum() < 0.7 * err(s_max).sum()
    with pytest.raises(ValueError, match="unknown scale method"):
        compute_scale(w, bits, method="median")


def test_float_bits_pass_through():
    w = torch.randn(3, 3)
    assert fake_quant(w, torch.ones(1, 1), 32) is w


def test_ste_and_lsq_gradients_by_hand():
    # bits=3: L=3, s=0.5 -> v = [0.2, 1.2, 4, -6]: first two inside, last two clipped.
    w = torch.tensor([[0.1, 0.6, 2.0, -3.0]], requires_grad=True)
    s = torch.tensor([[0.5]], requires_grad=True)
    out = fake_quant(w, s, 3, learn_scale=True)
    assert out.tolist() == [[0.0, 0.5, 1.5, -1.5]]
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # d/ds = (0 - 0.2) + (1 - 1.2) + 3 + (-3) = -0.4, times g = 1/sqrt(4 * 3)
    assert s.grad.item() == pytest.approx(-0.4 / math.sqrt(12), rel=1e-6)
    # Without learn_scale the scale gets no gradient.
    s2 = torch.tensor([[0.5]], requires_grad=True)
    fake_quant(w, s2, 3, learn_scale=False).sum().backward()
    assert s2.grad is None


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradient_matches_finite_difference(bits, per_channel):
    """LSQ = derivative of s * clamp(w/s + r, -L, L) with the rounding offset r frozen."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(4, 32, generator=g, dtype=torch.float64)
    s0 = (compute_scale(w.float(), bits, per_channel).double() * 0.7).requires_grad_(True)
    u = torch.randn(4, 32, generator=g, dtype=torch.float64)  # upstream gradient
    (fake_quant(w, s0, bits, learn_scale=True) * u).sum().backward()
    L = quant_levels(bits)
    codes = quantize_codes(w, s0.detach(), bits).double()
    r = codes - w / s0.detach()  # frozen rounding offset (inside the range)

    def smooth(s):
        v = w / s
        inside = (w / s0.detach()).abs() <= L
        return (u * s * torch.where(inside, v + r, codes)).sum(dim=1 if per_channel else None)

    eps = 1e-6
    n_per_scale = w.numel() // s0.numel()
    gscale = 1 / math.sqrt(n_per_scale * L)
    assert gscale == pytest.approx(lsq_grad_scale(w.numel(), s0.numel(), L))
    fd = (smooth(s0.detach() + eps) - smooth(s0.detach() - eps)) / (2 * eps)
    if per_channel:
        # smooth() sums row i, which depends on scale i only; perturbing all scales at once is fine.
        np.testing.assert_allclose(s0.grad.reshape(-1).numpy(), gscale * fd.numpy(), rtol=1e-5, atol=1e-8)
    else:
        assert s0.grad.item() == pytest.approx(gscale * fd.item(), rel=1e-5, abs=1e-8)


def test_multi_precision_quantizer_slicing_and_scales():
    torch.manual_seed(0)
    latent = torch.nn.Parameter(torch.randn(12, 10))
    q = MultiPrecisionQuantizer((32, 8, 4, 2), latent.shape, per_channel=True)
    opt = torch.optim.SGD(list(q.parameters()) + [latent], lr=0.1)  # built before any forward
    with pytest.raises(ValueError, match="not initialised"):
        q(latent[:6, :5], 4)
    full = q(latent, 4)
    assert bool(q.initialized)
    for b in (8, 4, 2):
        assert torch.equal(q.scale(b).detach(), compute_scale(latent, b, per_channel=True))
    assert torch.equal(full, fake_quant(latent, q.scale(4), 4))
    assert q(latent, 32) is latent
    # A sliced weight uses the first k channel scales.
    out = q(latent[:6, :5], 2)
    assert torch.equal(out, fake_quant(latent[:6, :5], q.scale(2)[:6], 2))
    out.sum().backward()
    assert latent.grad[6:].abs().sum() == 0 and latent.grad[:, 5:].abs().sum() == 0
    assert q.scale(2).grad[:6].abs().sum() > 0 and q.scale(2).grad[6:].abs().sum() == 0
    assert q.scale(4).grad is None or q.scale(4).grad.abs().sum() == 0  # other bit-widths untouched
    before = q.scale(2).detach().clone()
    opt.step()
    assert not torch.equal(before, q.scale(2).detach())
    with pytest.raises(ValueError, match="not among"):
        q(latent, 3)
    with pytest.raises(ValueError, match="not a slice"):
        q(torch.randn(13, 10), 4)
    # Scales and the initialised flag survive a state_dict round trip.
    q2 = MultiPrecisionQuantizer((32, 8, 4, 2), latent.shape, per_channel=True)
    q2.load_state_dict(q.state_dict())
    assert bool(q2.initialized) and torch.equal(q2(latent, 2), q(latent, 2))
    qt = q.quantize(latent[:6], 4)
    assert qt.codes.shape == (6, 10) and qt.scale.shape == (6, 1) and qt.mode == "per_channel"
    assert torch.equal(qt.dequantize(), q(latent[:6], 4))


def _round_half_away(x: Fraction) -> int:
    return int(math.floor(abs(x) + Fraction(1, 2))) * (1 if x >= 0 else -1)


@pytest.mark.parametrize("bits_hi", [3, 4, 8])
def test_nested_codes_brute_force(bits_hi):
    L_hi = quant_levels(bits_hi)
    c = torch.arange(-L_hi, L_hi + 1)
    for bits_lo in range(1, bits_hi + 1):
        got = nested_codes(c, bits_hi, bits_lo).tolist()
        if bits_lo == 1:
            want = [1 if x >= 0 else -1 for x in c.tolist()]
        else:
            d, L_lo = bits_hi - bits_lo, quant_levels(bits_lo)
            want = [max(-L_lo, min(L_lo, _round_half_away(Fraction(x, 2 ** d)))) for x in c.tolist()]
        assert got == want, (bits_hi, bits_lo)
        assert got == [-x for x in reversed(got)] or bits_lo == 1  # symmetric
        if bits_lo >= 2:
            # Unsaturated codes are reconstructed within half a low-precision step.
            d = bits_hi - bits_lo
            s_lo = nested_scale(torch.ones(1, 1), bits_hi, bits_lo).item()
            assert s_lo == 2 ** d
            recon = torch.tensor(got) * s_lo
            unsat = c.abs() < (quant_levels(bits_lo) + 0.5) * 2 ** d
            assert (recon - c).abs()[unsat].max() <= 2 ** (d - 1)


def test_nested_quantizer_is_a_bit_shift():
    torch.manual_seed(1)
    latent = torch.nn.Parameter(torch.randn(8, 16))
    nq = NestedQuantizer((32, 8, 4, 2), latent.shape, per_channel=True)
    top = nq.quantize(latent, 8)
    assert list(nq.scales.keys()) == ["b8"]
    for b in (4, 2):
        low = nq.quantize(latent, b)
        assert torch.equal(low.codes, nested_codes(top.codes, 8, b))
        assert torch.equal(low.scale, top.scale * 2 ** (8 - b))
        assert torch.equal(nq(latent, b), low.dequantize())
    assert torch.equal(nq(latent, 8), fake_quant(latent, nq.scale(8), 8))
    nq(latent, 2).sum().backward()
    assert nq.scale(8).grad is not None and nq.scale(8).grad.abs().sum() > 0
    assert latent.grad.abs().sum() > 0
    assert nq(latent, 32) is latent
