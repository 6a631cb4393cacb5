"""``train.compile=inductor`` computes what eager training computes.

tests/test_compile_dynamic.py checks graph counts with a backend that generates no code;
this one runs Inductor's generated kernels, the way the trainer calls the compiled model:
``torch.compile(model, backend="inductor", dynamic=True, options={"layout_optimization":
False})``, training forward/backward on batches whose (B, T) change, then a validation
pass through the same wrapper (``model.eval()``, ``no_grad``, ``return_ctc_log_probs``, as
``allinone.train.trainer.validate``), then training again (a graph specialised on
``self.training`` that was reused would show there, as would BatchNorm running statistics
that a compiled step failed to update).  Model: CTC with intermediate CTC and GlobalMVN,
dropout 0 (masks of Inductor's RNG differ from eager's).

On a GPU, the same comparison under bf16 autocast (the trainer's default on CUDA): the
compiled gradients' distance from an fp32 eager reference must be of the order of eager
bf16's own (``test_inductor_bf16_gradients_as_close_as_eager_bf16_cuda``, skipped without
a GPU).  ``python tests/test_compile_inductor.py --report`` prints the per-parameter
numbers instead of asserting (on the GPU if there is one).  The CPU test compiles for minutes
on a 2-core machine and runs only with ``ALLINONE_INDUCTOR_TESTS=1``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from allinone.models.asr import ASRModel, ASRModelConfig

from test_compile_dynamic import _batch as dynamic_batch

# (B, T, U); T mod 4 = 1, 2, 1: the subsampling, rel_shift and padding-mask shapes all change.
TRAIN_SHAPES = [(3, 97, 5), (4, 130, 7), (2, 61, 4)]
VALID_SHAPE = (5, 113, 6)
# Gradients that are zero in exact arithmetic (softmax is invariant to the key bias; the
# depthwise conv bias is followed by BatchNorm in training mode): only rounding noise is
# left, so relative differences mean nothing there.
NULL_GRADS = ("self_attn.linear_k.bias", "conv_module.depthwise_conv.bias")


def _model(device="cpu") -> ASRModel:
    torch.manual_seed(0)
    cfg = ASRModelConfig.from_dict({
        "vocab_size": 20, "ctc_weight": 1.0, "interctc_weight": 0.3, "normalize": True,
        "encoder": {"input_size": 80, "output_size": 32, "attention_heads": 2, "linear_units": 64,
                    "num_blocks": 2, "cnn_module_kernel": 7, "dropout_rate": 0.0,
                    "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0,
                    "interctc_layer_idx": [1]},
    })
    model = ASRModel(cfg)
    g = torch.Generator().manual_seed(1)
    model.set_normalize_stats({"count": 100.0, "sum": torch.randn(80, generator=g) * 100,
                               "sum_square": torch.rand(80, generator=g) * 500 + 500})
    return model.to(device).train()


def _batch(i: int, b: int, t: int, u: int, device="cpu"):
    """test_compile_dynamic's batch (padded to its longest utterance, as the trainer's
    collation does) with features of log-mel scale, on ``device``."""
    feats, lens, tokens, token_lens = dynamic_batch(i, b, t, u)
    return tuple(x.to(device) for x in (feats * 10, lens, tokens, token_lens))


def _compile(model):
    return torch.compile(model, backend="inductor", dynamic=True, options={"layout_optimization": False})


def _train_step(model, run, batch, bf16=False):
    """Loss, gradients and BatchNorm buffers after one training forward/backward of ``run``."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(batch[0].device.type, dtype=torch.bfloat16, enabled=bf16):
        out = run(*batch)
    out["loss"].backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach().float(), grads, {n: b.detach().clone() for n, b in model.named_buffers()}


def _set_buffers(model, buffers):
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])


def _rel_errors(grads, ref):
    return {n: ((grads[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item()
            for n in ref if not n.endswith(NULL_GRADS)}


def _compare_train(model, compiled, batch, where: str):
    before = {n: b.clone() for n, b in model.named_buffers()}
    loss_c, grads_c, bufs_c = _train_step(model, compiled, batch)
    _set_buffers(model, before)
    loss_e, grads_e, bufs_e = _train_step(model, model, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-4, msg=lambda m: f"{where}: loss: {m}")
    assert grads_c.keys() == grads_e.keys(), where
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{where}: gradient of {name}: {m}")
    for name in bufs_e:  # BatchNorm running statistics (and num_batches_tracked) moved alike
        torch.testing.assert_close(bufs_c[name], bufs_e[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{where}: buffer {name}: {m}")
    assert any(not torch.equal(bufs_e[n], before[n]) for n in bufs_e if "running_mean" in n), \
        f"{where}: a training step left the BatchNorm running statistics alone"


def _compare_valid(model, compiled, batch, where: str):
    model.eval()
    try:
        with torch.no_grad():
            out_c = compiled(*batch, subnet=None, return_ctc_log_probs=True)
            out_e = model(*batch, subnet=None, return_ctc_log_probs=True)
    finally:
        model.train()
    torch.testing.assert_close(out_c["loss"], out_e["loss"], rtol=1e-5, atol=1e-4,
                               msg=lambda m: f"{where}: validation loss: {m}")
    torch.testing.assert_close(out_c["ctc_log_probs"], out_e["ctc_log_probs"], rtol=1e-5, atol=1e-4,
                               msg=lambda m: f"{where}: validation log-probabilities: {m}")
    assert torch.equal(out_c["enc_lens"], out_e["enc_lens"]), where


# Inductor's C++ code generation for these graphs takes ~50 s with a warm cache and 2-3 min cold
# on a 2-core machine, too slow for every run of the suite: opt in with ALLINONE_INDUCTOR_TESTS=1.
CPU_INDUCTOR = pytest.mark.skipif(os.environ.get("ALLINONE_INDUCTOR_TESTS") != "1",
                                  reason="slow (Inductor C++ compilation): set ALLINONE_INDUCTOR_TESTS=1")


@CPU_INDUCTOR
@pytest.mark.usefixtures("one_thread")
def test_inductor_training_and_validation_match_eager_cpu():
    torch._dynamo.reset()
    model = _model()
    compiled = _compile(model)
    optim = torch.optim.SGD(model.parameters(), lr=1e-3)
    try:
        for i, shape in enumerate(TRAIN_SHAPES):
            _compare_train(model, compiled, _batch(i, *shape), f"train {shape}")
            optim.step()  # the weights change between steps, as in training
        _compare_valid(model, compiled, _batch(50, *VALID_SHAPE), f"validation {VALID_SHAPE}")
        # Training after the validation pass: the train-mode graph, not the eval one.
        _compare_train(model, compiled, _batch(7, *TRAIN_SHAPES[0]), "train after validation")
        optim.step()
        _compare_valid(model, compiled, _batch(51, *VALID_SHAPE), "validation after more training")
    finally:
        torch._dynamo.reset()


def _bf16_report(device: str, shapes=TRAIN_SHAPES):
    """Per batch: max over parameters of |g - g_fp32_eager| / |g_fp32_eager| for eager bf16
    and for compiled bf16 (and compiled fp32), plus the losses."""
    torch._dynamo.reset()
    model = _model(device)
    compiled = _compile(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for i, shape in enumerate(shapes):
        batch = _batch(i, *shape, device=device)
        res = {}
        for name, run, bf16 in (("eager_fp32", model, False), ("eager_bf16", model, True),
                                ("compiled_bf16", compiled, True), ("compiled_fp32", compiled, False)):
            model.load_state_dict(state)
            res[name] = _train_step(model, run, batch, bf16)
        ref = res["eager_fp32"][1]
        rows.append({"shape": shape, **{f"loss_{k}": v[0].item() for k, v in res.items()},
                     **{f"rel_{k}": _rel_errors(v[1], ref) for k, v in res.items() if k != "eager_fp32"}})
    torch._dynamo.reset()
    return rows


class _no_tf32:
    """TF32 off for matmuls and convolutions (restored on exit)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_training_and_validation_match_eager_cuda_fp32():
    torch._dynamo.reset()
    model = _model("cuda")
    compiled = _compile(model)
    try:
        with _no_tf32():  # fp32 matmuls, so eager and compiled can be held to fp32 tolerances
            for i, shape in enumerate(TRAIN_SHAPES):
                _compare_train(model, compiled, _batch(i, *shape, device="cuda"), f"train {shape}")
            _compare_valid(model, compiled, _batch(50, *VALID_SHAPE, device="cuda"), "validation")
            _compare_train(model, compiled, _batch(7, *TRAIN_SHAPES[0], device="cuda"), "train after validation")
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_bf16_gradients_as_close_as_eager_bf16_cuda():
    with _no_tf32():
        rows = _bf16_report("cuda")
    for row in rows:
        eager = max(row["rel_eager_bf16"].values())
        for name, err in row["rel_compiled_bf16"].items():
            assert err <= 3 * eager + 1e-2, (
                f"{row['shape']}: compiled bf16 gradient of {name} is {err:.3g} (relative) from fp32 eager; "
                f"eager bf16 is at most {eager:.3g}")
        assert abs(row["loss_compiled_bf16"] - row["loss_eager_fp32"]) <= \
            3 * abs(row["loss_eager_bf16"] - row["loss_eager_fp32"]) + 1e-2 * abs(row["loss_eager_fp32"]), row


if __name__ == "__main__":
    if "--report" in sys.argv:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with _no_tf32():
            rows = _bf16_report(device)
        for row in rows:
            print(row["shape"], {k: round(v, 5) for k, v in row.items() if k.startswith("loss_")})
            for k in ("rel_eager_bf16", "rel_compiled_bf16", "rel_compiled_fp32"):
                worst = sorted(row[k].items(), key=lambda kv: -kv[1])[:3]
                print(f"  {k}: max {worst[0][1]:.3g}; worst " + ", ".join(f"{n} {v:.3g}" for n, v in worst))
    else:
        pytest.main([__file__, "-q"])
