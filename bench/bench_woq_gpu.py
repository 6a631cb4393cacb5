"""Low-bit Linear kernels on the GPU against bf16, at the Switchboard Conformer's shapes (issue 9, item 3).

Issue 9 asks that no exported model run slower than its bf16 twin on a GPU, through integer
kernels or weight-only low-bit kernels that dequantize inside the GEMM where torch offers
them. This times one Linear of each shape of the 12 x 256 (FFN 2048) encoder, per kernel:

- ``bf16``: ``F.linear`` on bf16 weights and activations (cuBLAS), the twin to beat;
- ``int8 dynamic``: int8 weights and per-row int8 activations through ``torch._int_mm``, the
  ``cuda-int8`` backend of ``allinone bench`` (``allinone.quant.int8.int_mm_linear``);
- ``int8 weight-only``: ``aten._weight_int8pack_mm`` (int8 weights, one scale per output
  channel, bf16 activations);
- ``int4 weight-only``: ``aten._weight_int4pack_mm`` (tinygemm: 4-bit weights packed by
  ``_convert_weight_to_int4pack``, a scale and zero point per group of input channels, bf16
  activations) through ``allinone.quant.int4.Int4WeightOnlyLinear``, the ``cuda-int4``
  backend's layer: our symmetric 4-bit codes c in [-7, 7] map onto it exactly (nibble c + 8,
  the channel's scale for every group, zero point 0).

Frames: 125 (one 5 s utterance after 4x subsampling) and 8000 (32 x 10 s). Each kernel is
captured 50 times in a CUDA graph and replayed, so the time is the GPU's, not Python's launch
cost; the median of 20 replays. Error: largest difference from the fp32 product with the same
dequantized weight, relative to the largest output. A kernel torch does not offer on this GPU
is reported as such.

Run:  python bench/bench_woq_gpu.py   (needs a GPU)
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from allinone.quant.int4 import Int4WeightOnlyLinear
from allinone.quant.int8 import int_mm_linear
from allinone.quant.quantizer import QuantizedTensor

SHAPES = [("FFN w_1", 256, 2048), ("FFN w_2", 2048, 256), ("attention", 256, 256)]


class Int8WeightOnlyLinear(torch.nn.Module):
    """``x @ (codes * scale).T + bias`` on ``aten._weight_int8pack_mm`` (bf16 activations).

    codes: int8 [out, in]; scale: [out] or [out, 1]; bias: [out] or None. Only for measuring:
    on an H200 it is 10-700x slower than bf16 at these shapes (docs/benchmarks.md 6b).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(-1).bfloat16())
        self.register_buffer("bias", None if bias is None else bias.detach().bfloat16())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).bfloat16(), self.codes, self.scale)
        y = y.reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


def kernels(w: torch.Tensor) -> dict:
    """name -> (function of bf16 activations, dequantized fp32 weight it computes with)."""
    q8 = QuantizedTensor.from_weight(w, 8, per_channel=True)
    q4 = QuantizedTensor.from_weight(w, 4, per_channel=True)
    w_bf16 = w.bfloat16()
    out = {"bf16": (lambda x: F.linear(x, w_bf16), w_bf16.float())}
    codes_t = q8.codes.t().contiguous()
    out["int8 dynamic"] = (lambda x: int_mm_linear(x, codes_t, q8.scale.reshape(-1), None), q8.dequantize())
    out["int8 weight-only"] = (Int8WeightOnlyLinear(q8.codes, q8.scale).to(w.device),
                               q8.codes * q8.scale.bfloat16().float())
    out["int4 weight-only"] = (Int4WeightOnlyLinear(q4.codes, q4.scale).to(w.device),  # packed at its first call
                               q4.codes * q4.scale.bfloat16().float())
    return out


def graph_time_ms(f, x: torch.Tensor, calls: int = 50, replays: int = 20) -> float:
    """Median GPU time of one call of ``f(x)``, from replays of a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            f(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            f(x)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[125, 8000])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_woq_gpu.py needs a GPU")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| layer | in x out | frames | kernel | us | vs bf16 | max rel. error |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, k, n in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.05
        table = kernels(w)
        for frames in args.frames:
            x = torch.randn(frames, k, device="cuda").bfloat16()
            base = None
            for kernel, (f, w_deq) in table.items():
                try:
                    ref = F.linear(x.float(), w_deq)
                    err = ((f(x).float() - ref).abs().max() / ref.abs().max()).item()
                    us = graph_time_ms(f, x) * 1000
                except RuntimeError as e:
                    print(f"| {name} | {k}x{n} | {frames} | {kernel} | failed: {str(e).splitlines()[0]} | | |")
                    continue
                base = base or us
                print(f"| {name} | {k}x{n} | {frames} | {kernel} | {us:.1f} | {us / base:.2f}x | {err:.4f} |",
                      flush=True)


if __name__ == "__main__":
    main()
