"""``torch.compile(dynamic=True)`` of the ASR model: no recompilation per batch shape.

The trainer (``train.compile``) compiles the model with ``dynamic=True`` and feeds
batches whose size B and padded frame count T change every step.  This checks, with a
backend that only counts the graphs Dynamo hands it (cheap: no code generation), that
after the first batch no new graph is compiled for new (B, T) — T chosen not all equal
mod 4 and mod 8, so every shape relation of the conv2d subsampling (T' = (T-3)//4),
the relative positions (2T'-1) and ``rel_shift`` is exercised — and that the compiled
loss and gradients equal eager ones.

(The inductor-only specialisation on CPU — layout optimization turning saved 4-D
activations channels-last — happens after tracing and is not covered here.)
"""

from __future__ import annotations

import pytest
import torch

from allinone.models.asr import ASRModel, ASRModelConfig

# (B, T, U): T mod 4 = 1, 2, 1, 3, 0 and mod 8 = 1, 2, 5, 3, 4; B and U vary too.
SHAPES = [(3, 97, 5), (4, 130, 7), (2, 61, 4), (5, 203, 9), (3, 148, 6)]


def _model() -> ASRModel:
    torch.manual_seed(0)
    cfg = ASRModelConfig.from_dict({
        "vocab_size": 20, "ctc_weight": 0.3, "normalize": True,
        "encoder": {"input_size": 80, "output_size": 32, "attention_heads": 2, "linear_units": 64,
                    "num_blocks": 2, "cnn_module_kernel": 7, "dropout_rate": 0.0,
                    "positional_dropout_rate": 0.0},
        "decoder": {"attention_heads": 2, "linear_units": 64, "num_blocks": 1, "dropout_rate": 0.0,
                    "positional_dropout_rate": 0.0, "self_attention_dropout_rate": 0.0,
                    "src_attention_dropout_rate": 0.0},
    })
    model = ASRModel(cfg)
    g = torch.Generator().manual_seed(1)
    model.set_normalize_stats({"count": 100.0, "sum": torch.randn(80, generator=g) * 100,
                               "sum_square": torch.rand(80, generator=g) * 500 + 500})
    return model


def _batch(i: int, b: int, t: int, u: int):
    g = torch.Generator().manual_seed(100 + i)
    feats = torch.randn(b, t, 80, generator=g)
    lens = torch.randint(t // 2, t + 1, (b,), generator=g)
    lens[0] = t  # padded to the longest utterance, as the trainer's collation does
    tokens = torch.randint(1, 19, (b, u), generator=g)
    token_lens = torch.randint(1, u + 1, (b,), generator=g)
    token_lens[0] = u
    tokens = tokens.masked_fill(torch.arange(u)[None, :] >= token_lens[:, None], -1)
    return feats, lens, tokens, token_lens


def _loss_and_grads(model, run, batch):
    """Loss of ``run`` (the model or its compiled wrapper) and the gradients of ``model``."""
    model.zero_grad(set_to_none=True)
    loss = run(*batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_forward_backward_does_not_recompile_per_shape():
    torch._dynamo.reset()
    model = _model()
    graphs = [0]

    def count(gm, example_inputs):
        graphs[0] += 1
        return gm.forward

    compiled = torch.compile(model, backend=count, dynamic=True)
    after_batch = []
    try:
        for i, shape in enumerate(SHAPES):
            batch = _batch(i, *shape)
            loss_c, grads_c = _loss_and_grads(model, compiled, batch)
            after_batch.append(graphs[0])
            loss_e, grads_e = _loss_and_grads(model, model, batch)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
            assert grads_c.keys() == grads_e.keys()
            for name in grads_e:
                torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-5,
                                           msg=lambda m, name=name: f"{name}: {m}")
    finally:
        torch._dynamo.reset()
    assert after_batch[0] > 0
    # First batch: the graphs of every frame (split at graph breaks); at most one more
    # (dynamic) set may come with the second batch; none after that.
    assert after_batch[2:] == [after_batch[1]] * (len(SHAPES) - 2), after_batch
    assert after_batch[1] <= 2 * after_batch[0], after_batch


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
