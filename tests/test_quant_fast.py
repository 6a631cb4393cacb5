"""The fast fake quantization (``_FakeQuantFast``) against the original ``_FakeQuant`` (issue 9).

Values and weight gradients must be identical; the scale gradient may differ in the last
bit (the LSQ factor multiplies the sum instead of every term). Also: no host-device
synchronisation in a quantizer's forward once its scales are initialised.
"""

import pytest
import torch

from allinone.quant.quantizer import (
    SUPPORTED_BITS, MultiPrecisionQuantizer, NestedQuantizer, compute_scale, fake_quant, fake_quant_mixture,
    fake_quant_reference)

INT_BITS = [b for b in SUPPORTED_BITS if b != 32]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _weights(shape, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *(1,) * (len(shape) - 1), generator=g)
    w.view(-1)[:3] = 0.0  # exact zeros (the 1-bit sign convention)
    return w.to(device=device, dtype=dtype)


def _run(fn, w0, s0, bits, learn_scale, upstream):
    w = w0.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    out = fn(w, s, bits, learn_scale)
    (out * upstream).sum().backward()
    return out.detach(), w.grad, s.grad


def _assert_same(fast, ref, learn_scale):
    out_f, gw_f, gs_f = fast
    out_r, gw_r, gs_r = ref
    assert out_f.dtype == out_r.dtype and torch.equal(out_f, out_r)
    assert torch.equal(out_f.signbit(), out_r.signbit())  # bit for bit: no -0.0 where int8 gives +0
    assert torch.equal(gw_f, gw_r)
    if learn_scale:
        assert gs_f.dtype == gs_r.dtype and gs_f.shape == gs_r.shape
        torch.testing.assert_close(gs_f, gs_r, rtol=1e-5, atol=1e-7)
    else:
        assert gs_f is None and gs_r is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize("shape", [(16, 24), (6, 4, 5)])
def test_fast_fake_quant_equals_reference(device, bits, per_channel, learn_scale, shape):
    w = _weights(shape, bits + 100 * per_channel, device)
    # 0.6 x the max scale: a good share of the weights is clipped (outside the range).
    s = compute_scale(w, bits, per_channel) * (0.6 if bits > 1 else 1.0)
    u = _weights(shape, 7, device)
    fast = _run(fake_quant, w, s, bits, learn_scale, u)
    ref = _run(fake_quant_reference, w, s, bits, learn_scale, u)
    _assert_same(fast, ref, learn_scale)
    assert (fast[1] == 0).any() or bits == 1  # some weights are outside the range


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fast_fake_quant_bf16_weight_and_ties(device, bits):
    # bf16 weights (the output keeps the weight's dtype) and weights on exact half-steps.
    w = _weights((8, 32), bits, device, torch.bfloat16)
    s = compute_scale(w, bits, per_channel=True)
    ties = (torch.arange(-8, 8, device=device).float() + 0.5) * s[:1]  # v = k + 0.5 exactly
    w[0, :16] = ties.to(torch.bfloat16)
    u = _weights((8, 32), 3, device)
    _assert_same(_run(fake_quant, w, s, bits, True, u), _run(fake_quant_reference, w, s, bits, True, u), True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["independent", "nested"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("learn_scale", [False, True])
def test_quantizer_modules_fast_equals_reference(device, mode, per_channel, learn_scale):
    cls = MultiPrecisionQuantizer if mode == "independent" else NestedQuantizer
    bits_all = (32, 8, 6, 4, 3, 2, 1)
    latent0 = _weights((12, 10), 5, device)
    for bits in bits_all[1:]:
        for rows, cols in ((12, 10), (6, 10), (6, 5)):
            results = []
            for fwd in ("forward", "forward_reference"):
                torch.manual_seed(0)
                latent = torch.nn.Parameter(latent0.clone())
                q = cls(bits_all, latent.shape, per_channel=per_channel, learn_scale=learn_scale).to(device)
                q.init_scales(latent.detach())
                with torch.no_grad():  # move the scales off the max-abs init: some weights clip
                    for p in q.scales.values():
                        p.mul_(0.7)
                out = getattr(q, fwd)(latent[:rows, :cols], bits)
                (out * _weights(out.shape, 9, device)).sum().backward()
                grads = {k: p.grad for k, p in q.scales.items()}
                results.append((out.detach(), latent.grad, grads))
            (out_f, gw_f, gs_f), (out_r, gw_r, gs_r) = results
            assert torch.equal(out_f, out_r) and torch.equal(gw_f, gw_r)
            assert torch.equal(out_f.signbit(), out_r.signbit())
            assert gs_f.keys() == gs_r.keys()
            for k in gs_f:
                if gs_r[k] is None:
                    assert gs_f[k] is None or not gs_f[k].any()
                else:
                    torch.testing.assert_close(gs_f[k], gs_r[k], rtol=1e-5, atol=1e-7)


def test_quantizer_forward_does_not_synchronise():
    latent = torch.nn.Parameter(torch.randn(12, 10))
    for cls in (MultiPrecisionQuantizer, NestedQuantizer):
        q = cls((32, 8, 4, 2), latent.shape, per_channel=True)
        q(latent, 4)  # the first call initialises the scales
        with torch.profiler.profile() as prof:
            for b in (8, 4, 2):
                q(latent[:6], b).sum().backward()
        names = {e.name for e in prof.events()}
        assert not names & {"aten::is_nonzero", "aten::item", "aten::_local_scalar_dense"}, names
        # The flag is re-read after load_state_dict: an uninitialised state refuses slices again.
        fresh = cls((32, 8, 4, 2), latent.shape, per_channel=True)
        q.load_state_dict(fresh.state_dict())
        with pytest.raises(ValueError, match="not initialised"):
            q(latent[:6], 4)


def test_quantizer_first_used_in_inference_mode_then_trained():
    from allinone.quant import quantizer as qmod

    qmod._ZEROS.clear()  # the cached zero must not become an inference tensor
    latent = torch.nn.Parameter(torch.randn(8, 4))
    q = MultiPrecisionQuantizer((32, 4), latent.shape, per_channel=True)
    with torch.inference_mode():
        q(latent, 4)
    q(latent, 4).sum().backward()
    assert latent.grad.abs().sum() > 0 and q.scale(4).grad is not None


def test_float_nested_codes_equal_integer_ones():
    from allinone.quant.quantizer import _float_nested_codes, nested_codes, quant_levels

    for hi in range(2, 9):
        top = torch.arange(-quant_levels(hi), quant_levels(hi) + 1)
        for lo in range(1, hi):
            assert torch.equal(_float_nested_codes(top.float(), hi, lo), nested_codes(top, hi, lo).float())


# ----------------------------------------------------------------------------- candidate mixture


def _loop_mixture(w, scales, bits, probs, learn_scale):
    """The reference: one ``fake_quant_reference`` per candidate, weighted and summed."""
    out = 0
    for s, b, p in zip(scales, bits, probs):
        out = out + p * fake_quant_reference(w, s, b, learn_scale)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [(8, 4, 2), (4, 3), (8, 2, 1)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize("probs", ["soft", "one_hot"])
def test_fake_quant_mixture_equals_the_loop(device, bits, per_channel, learn_scale, probs):
    w0 = _weights((12, 5, 3), 7, device)
    s0 = [compute_scale(w0, b, per_channel, "max") * 0.7 for b in bits]  # 0.7: some weights clip
    if probs == "soft":
        p0 = torch.softmax(torch.randn(len(bits), generator=torch.Generator().manual_seed(1)), 0).to(device)
    else:
        p0 = torch.zeros(len(bits), device=device)
        p0[1] = 1.0
    up = _weights((12, 5, 3), 8, device)
    results = []
    for fn in (fake_quant_mixture, _loop_mixture):
        w = w0.clone().requires_grad_(True)
        s = [x.clone().requires_grad_(learn_scale) for x in s0]
        p = p0.clone().requires_grad_(True)
        out = fn(w, s, bits, p, learn_scale)
        (out * up).sum().backward()
        results.append((out.detach(), w.grad, p.grad, [x.grad for x in s]))
    (out_f, gw_f, gp_f, gs_f), (out_r, gw_r, gp_r, gs_r) = results
    torch.testing.assert_close(out_f, out_r, rtol=1e-6, atol=1e-7)
    if probs == "one_hot":
        assert torch.equal(out_f, out_r)  # adding exact zeros: bit for bit the chosen candidate
    torch.testing.assert_close(gw_f, gw_r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gp_f, gp_r, rtol=1e-5, atol=1e-5)
    for f, r in zip(gs_f, gs_r):
        if learn_scale:
            assert f.shape == r.shape
            torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-6)
        else:
            assert f is None and r is None


def test_fake_quant_mixture_of_a_sliced_weight_and_bad_input():
    q = MultiPrecisionQuantizer([8, 4, 2], (10, 6), per_channel=True)
    latent = _weights((10, 6), 3, "cpu")
    q.init_scales(latent)
    w = latent[:7, :4]
    p = torch.tensor([0.2, 0.5, 0.3])
    mixed = fake_quant_mixture(w, [q.scale(b)[:7] for b in (8, 4, 2)], (8, 4, 2), p, True)
    expected = sum(pi * q(w, b) for pi, b in zip(p, (8, 4, 2)))
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="32"):
        fake_quant_mixture(w, [q.scale(8)[:7]] * 2, (8, 32), p[:2])
    with pytest.raises(ValueError, match="as many scales"):
        fake_quant_mixture(w, [q.scale(8)[:7]], (8, 4), p[:2])
    with pytest.raises(ValueError, match="outside the supported set"):
        fake_quant_mixture(w, [q.scale(8)[:7]] * 2, (8, 9), p[:2])


def test_mixed_quantizer_uses_the_fused_mixture_without_host_syncs():
    """A searchable quantizer's mixture goes through ``fake_quant_mixture`` and, once its
    constants are cached, copies nothing from the host (the CPU stand-in for a sync check:
    no new tensor constructor call per step)."""
    from allinone.elastic import mixed_precision as mp

    q = MultiPrecisionQuantizer([8, 4, 2], (10, 6), per_channel=True)
    q.init_scales(_weights((10, 6), 3, "cpu"))
    q.__class__ = mp.MixedMultiPrecisionQuantizer
    q.mix_bits, q.mix_probs = (8, 4, 2), torch.tensor([0.2, 0.5, 0.3])
    w = _weights((10, 6), 3, "cpu")
    loop = mp._BitMixture.mixture(q, w)
    torch.testing.assert_close(q(w, mp.MIXED_BITS), loop, rtol=1e-6, atol=1e-7)
    calls = []
    real = torch.tensor
    try:
        torch.tensor = lambda *a, **k: calls.append(a) or real(*a, **k)
        q(w, mp.MIXED_BITS)
    finally:
        torch.tensor = real
    assert calls == []


def test_fake_quant_mixture_gradients_under_torch_compile():
    """Compiled, the mixture gives the eager gradients (an unconditional same-dtype ``.to`` on
    the Function's output once made every compiled gradient zero, silently)."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        w = _weights((16, 8), 5, "cpu").requires_grad_(True)
        scales = [compute_scale(w.detach(), b, True, "max").requires_grad_(True) for b in (8, 4, 2)]
        logits = torch.zeros(3, requires_grad=True)
        x = _weights((5, 8), 6, "cpu")

        def f(x, w, logits, *scales):
            mixed = fake_quant_mixture(w, list(scales), (8, 4, 2), torch.softmax(logits, -1), True)
            return torch.nn.functional.linear(x, mixed)

        fn = torch.compile(f, backend="aot_eager") if compiled else f
        (fn(x, w, logits, *scales) ** 2).sum().backward()
        results.append([w.grad, logits.grad] + [s.grad for s in scales])
    for eager, comp in zip(*results):
        assert eager.abs().sum() > 0
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
