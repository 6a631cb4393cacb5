"""Cheaper Conformer paths (issue 9) against the straightforward ones they replace."""

import torch

from allinone.models.conformer import PaddingMask, RelPositionalEncoding, RelPositionSelfAttention


def _gather_rel_shift(x: torch.Tensor) -> torch.Tensor:
    """The previous rel_shift: out[..., i, j] = x[..., i, T-1-i+j] with a gather."""
    t = x.size(-2)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    return x.gather(-1, (t - 1 - i + j).expand(*x.shape[:-1], t))


def test_rel_shift_view_equals_gather_values_and_gradients():
    for t in (1, 2, 7):
        x0 = torch.randn(3, 2, t, 2 * t - 1)
        for make in (lambda a: a, lambda a: a.transpose(0, 1).contiguous().transpose(0, 1)):  # any strides
            xa, xb = make(x0.clone()).requires_grad_(), make(x0.clone()).requires_grad_()
            ya, yb = RelPositionSelfAttention.rel_shift(xa), _gather_rel_shift(xb)
            assert torch.equal(ya, yb)
            u = torch.randn_like(ya)
            (ya * u).sum().backward()
            (yb * u).sum().backward()
            assert torch.equal(xa.grad, xb.grad)


def test_padding_mask_object_equals_bool_mask():
    torch.manual_seed(0)
    att = RelPositionSelfAttention(4, 32, 0.0)
    x = torch.randn(3, 9, 32)
    pos = RelPositionalEncoding(32, 0.0).position_embeddings(9)
    pad = torch.arange(9)[None, :] >= torch.tensor([9, 4, 0])[:, None]  # the last one is empty
    a = att(x, pos, pad)
    b = att(x, pos, PaddingMask(pad))
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    # Against an explicit softmax with masked_fill (ESPnet's order), padded keys get no weight.
    heads, d_k = 4, 8
    q = att.linear_q(x).view(3, 9, heads, d_k)
    k = att.linear_k(x).view(3, 9, heads, d_k).transpose(1, 2)
    v = att.linear_v(x).view(3, 9, heads, d_k).transpose(1, 2)
    p = att.linear_pos(pos).view(1, -1, heads, d_k).transpose(1, 2)
    ac = (q + att.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
    bd = _gather_rel_shift((q + att.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1))
    scores = ((ac + bd) / d_k ** 0.5).masked_fill(pad[:, None, None, :], torch.finfo(torch.float32).min)
    attn = torch.softmax(scores, -1).masked_fill(pad[:, None, None, :], 0.0)
    ref = att.linear_out((attn @ v).transpose(1, 2).reshape(3, 9, 32))
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)


def test_cached_position_embeddings_equal_fresh_ones():
    pe = RelPositionalEncoding(16, 0.0)
    for n in (5, 12, 3, 12, 1):  # grows, then slices of the longer table
        assert torch.equal(pe.cached_position_embeddings(n), pe.position_embeddings(n))
    assert pe.cached_position_embeddings(7, dtype=torch.float64).dtype == torch.float64


def test_rel_shift_compile_branch_equals_gather(monkeypatch):
    # Under torch.compile rel_shift uses plain views (storage_offset() would break the graph).
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for t in (1, 2, 7):
        x = torch.randn(3, 2, t, 2 * t - 1)
        assert torch.equal(RelPositionSelfAttention.rel_shift(x), _gather_rel_shift(x))


def test_position_cache_made_in_inference_mode_serves_training():
    from allinone.models.conformer import ConformerConfig, ConformerEncoder

    enc = ConformerEncoder(ConformerConfig(output_size=16, attention_heads=2, linear_units=32, num_blocks=1,
                                           cnn_module_kernel=3))
    x, lens = torch.randn(2, 40, 80), torch.tensor([40, 30])
    with torch.inference_mode():
        enc.eval()(x, lens)
    enc.train()(x[:, :32], lens.clamp(max=32))[0].sum().backward()  # a slice of the cached table
    assert enc.encoders[0].self_attn.linear_pos.weight.grad is not None
