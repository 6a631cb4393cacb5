"""Tiny supernets and batches shared by the elastic / supernet tests (not a test module)."""

from __future__ import annotations

import torch

from allinone.elastic.quant import QuantConfig, init_quantizers
from allinone.elastic.space import SearchSpace
from allinone.models import ASRModel, ASRModelConfig, ConformerConfig

VOCAB = 12


def tiny_encoder(**overrides) -> ConformerConfig:
    base = dict(input_size=40, output_size=32, attention_heads=4, linear_units=48, num_blocks=4,
                cnn_module_kernel=7, dropout_rate=0.0, positional_dropout_rate=0.0)
    base.update(overrides)
    return ConformerConfig(**base)


def tiny_supernet(seed: int = 0, quant: dict | None = None, **enc) -> ASRModel:
    """A 4-block, d=32 supernet with 8/4/2-bit per-channel quantizers, scales set."""
    torch.manual_seed(seed)
    q = QuantConfig.from_dict(quant if quant is not None else {"bits": [8, 4, 2]})
    model = ASRModel(ASRModelConfig(encoder=tiny_encoder(**enc), vocab_size=VOCAB, quant=q))
    randomize_batchnorm(model, seed)
    init_quantizers(model)
    return model


def tiny_space(**overrides) -> SearchSpace:
    d = dict(depth=[4, 2], ffn=[48, 24], heads=[4, 2], bits=[32, 8, 4, 2],
             per_layer=["ffn", "heads", "bits"], per_kind_bits=True, num_blocks=4)
    d.update(overrides)
    return SearchSpace(**d)


def randomize_batchnorm(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial running stats, so eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def tiny_batch(seed: int = 0, batch: int = 3, frames: int = 57) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, frames, 40, generator=g)
    feat_lens = torch.tensor([frames] + [frames - 7 * (i + 1) for i in range(batch - 1)])
    token_lens = torch.tensor([4] + [3] * (batch - 1))
    tokens = torch.randint(1, VOCAB - 1, (batch, 4), generator=g)
    tokens[1:, 3] = -1
    return {"feats": feats, "feat_lens": feat_lens, "tokens": tokens, "token_lens": token_lens}


def aten_ops_of_a_step(model: torch.nn.Module, forward) -> list[tuple]:
    """The ATen operators, in order, with their outputs' shapes and dtypes, of ``forward(model)``
    (a loss) and its backward, on a copy of ``model`` in training mode (dropout, batch
    statistics; the original is left as it was), after one unrecorded step (a first call fills
    caches, such as the relative positional encodings), with fresh gradients."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outputs = tuple((tuple(t.shape), t.dtype) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            self.ops.append((str(func.overloadpacket), outputs))
            return out

    model = copy.deepcopy(model).train()
    torch.manual_seed(0)
    forward(model).backward()
    model.zero_grad(set_to_none=True)
    recorder = Recorder()
    torch.manual_seed(0)
    with recorder:
        forward(model).backward()
    return recorder.ops


def assert_largest_float_step_is_the_plain_step(plain, supernet, largest, quantized, batch: dict) -> None:
    """A training step of ``supernet`` with no subnet or its ``largest`` float one runs ``plain``'s
    ATen operators one for one (same outputs' shapes and dtypes); with a ``quantized`` subnet it
    does not (the recorder sees it)."""
    def ops(model, subnet=None):
        return aten_ops_of_a_step(model, lambda m: m(batch["feats"], batch["feat_lens"], batch["tokens"],
                                                     batch["token_lens"], subnet=subnet)["loss"])

    want = ops(plain)
    assert ops(supernet) == want and ops(supernet, largest) == want
    assert ops(supernet, quantized) != want
