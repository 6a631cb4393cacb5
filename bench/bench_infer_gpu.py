"""GPU inference latency of an exported Conformer: fp32, bf16, int8, with and without CUDA graphs (issue 9).

The model is the Switchboard-size encoder (12 x 256, 4 heads, FFN 2048, kernel 31) + CTC
over 2003 units with random weights (latency does not depend on what the weights learned).
Its int8 twin has every Linear of the encoder quantized to 8 bits per output channel and
routed to ``torch._int_mm`` (int8 weights, per-row int8 activations) exactly as the
``cuda-int8`` backend of ``allinone bench`` does (``allinone.eval.latency.int8_model``).

"int8 w-only" and "int4 w-only" route the same Linears to torch's weight-only kernels
(``aten._weight_int8pack_mm``; ``aten._weight_int4pack_mm``, tinygemm, as ``allinone bench``'s
``cuda-int4`` backend) with bf16 activations and everything else as the bf16 variant
(bench/bench_woq_gpu.py times the kernels alone).

Timed: encoder + CTC log-probabilities (what every decoder runs first), for a batch of one
5 s utterance (on-device streaming-free recognition) and a batch of 32 x 10 s (server
throughput). "compiled" rows use ``torch.compile(mode="reduce-overhead")`` (CUDA graphs),
which removes the kernel-launch overhead that dominates at batch one.

Run:  python bench/bench_infer_gpu.py            (needs a GPU; --batches 1 for batch one only)
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_train_step import timed_round_robin  # (bench/ is on sys.path when this script runs)

from bench_woq_gpu import Int8WeightOnlyLinear

from allinone.eval.latency import int4_model, int8_model, route_to_kernel
from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.conformer import ConformerConfig
from allinone.quant.quantizer import QuantizedTensor


def encoder_linears(model: ASRModel, bits: int) -> dict:
    """Per-channel ``bits``-bit codes of every encoder Linear's float weight (name -> QuantizedTensor)."""
    return {f"{name}.weight": QuantizedTensor.from_weight(mod.weight, bits, per_channel=True)
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.startswith("encoder.encoders.")}


def weight_only_twin(model: ASRModel, bits: int) -> ASRModel:
    """A copy whose encoder Linears run on torch's weight-only 8-bit kernel or on the 4-bit one
    of ``allinone bench``'s ``cuda-int4`` backend (``int4_model``)."""
    twin = copy.deepcopy(model)
    quantized = encoder_linears(twin, bits)
    if bits == 4:
        routed = int4_model(twin, quantized)
    else:
        routed = route_to_kernel(twin, quantized, (8,), Int8WeightOnlyLinear)
    assert len(routed) == len(quantized), f"every encoder Linear must be routed to int{bits}"
    return twin


def int8_twin(model: ASRModel) -> ASRModel:
    """A copy whose encoder Linears run on int8 kernels (8-bit per-channel codes of the float weights)."""
    twin = copy.deepcopy(model)
    quantized = encoder_linears(twin, 8)
    routed = int8_model(twin, quantized)
    assert len(routed) == len(quantized), "every encoder Linear must be routed to int8"
    return twin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], choices=[1, 32],
                   help="1: one 5 s utterance; 32: 32 x 10 s")
    p.add_argument("--no-compile", action="store_true", help="skip the CUDA-graph rows")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_infer_gpu.py needs a GPU")
    torch.manual_seed(0)
    enc = ConformerConfig(output_size=256, attention_heads=4, linear_units=2048, num_blocks=12, cnn_module_kernel=31)
    model = ASRModel(ASRModelConfig(encoder=enc, vocab_size=2003)).eval().cuda()
    variants = {"fp32": (model, False), "bf16": (model, True), "int8": (int8_twin(model), False)}
    for bits in (8, 4):  # where this GPU and torch offer the kernel
        try:
            variants[f"int{bits} w-only"] = (weight_only_twin(model, bits), True)
        except RuntimeError as e:
            print(f"<!-- int{bits} weight-only: not offered here: {str(e).splitlines()[0]} -->")

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; encoder 12 x 256, FFN 2048; "
          f"variants timed in turn (median of {args.repeats} rounds)\n")
    print("| batch | variant | ms (eager) | ms (CUDA graphs) | vs bf16 eager | vs bf16 (CUDA graphs) |")
    print("|---|---|---:|---:|---:|---:|")
    for batch, frames in ((b, 500 if b == 1 else 1000) for b in args.batches):
        feats = torch.randn(batch, frames, 80, device="cuda")
        lens = torch.full((batch,), frames, device="cuda")
        torch._dynamo.reset()  # every variant compiles `forward` anew: keep under dynamo's recompile limit
        eager, graphed = {}, {}
        for name, (m, bf16) in variants.items():
            def forward(f, n, m=m, bf16=bf16):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    enc_out, _ = m.encode(f, n)
                    return m.ctc_log_probs(enc_out)

            try:
                forward(feats, lens)
                eager[name] = lambda forward=forward: forward(feats, lens)
            except RuntimeError as e:  # a kernel this GPU lacks: say so, time the rest
                print(f"<!-- {name} batch {batch}: {str(e).splitlines()[0][:300]} -->")
                continue
            if not args.no_compile:
                try:
                    compiled = torch.compile(forward, mode="reduce-overhead", dynamic=False)
                    for _ in range(3):  # compile, warm up, record the CUDA graph: failures show here
                        compiled(feats, lens)
                    graphed[name] = lambda compiled=compiled: compiled(feats, lens)
                except Exception as e:  # a variant that cannot be compiled is a finding: report it
                    print(f"<!-- {name} batch {batch}: torch.compile failed: {type(e).__name__}: "
                          f"{str(e)[:300]} -->")
                    torch._dynamo.reset()
        # in turn, so that a drift of the GPU's speed spreads over every variant
        eager_ms = {k: v[0] for k, v in timed_round_robin(eager, 10, args.repeats, "cuda").items()}
        try:
            graphed_ms = {k: v[0] for k, v in timed_round_robin(graphed, 10, args.repeats, "cuda").items()}
        except Exception as e:  # should CUDA graphs of several models not replay in turn: one at a time
            print(f"<!-- batch {batch}: CUDA graphs in turn failed ({type(e).__name__}): timed one at a time -->")
            graphed_ms = {}
            for k, f in graphed.items():
                try:
                    graphed_ms[k] = timed_round_robin({k: f}, 10, args.repeats, "cuda")[k][0]
                except Exception as e2:
                    print(f"<!-- {k} batch {batch}: CUDA graphs failed: {type(e2).__name__} -->")
        nan = float("nan")
        for name in eager_ms:
            g = graphed_ms.get(name, nan)
            print(f"| {batch} x {frames / 100:.0f} s | {name} | {eager_ms[name]:.2f} | {g:.2f} | "
                  f"{eager_ms[name] / eager_ms.get('bf16', nan):.2f}x | {g / graphed_ms.get('bf16', nan):.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
