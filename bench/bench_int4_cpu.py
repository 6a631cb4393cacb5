"""Weight-only 4-bit Linear on CPU through torch's int4 kernel, against fp32 (issue 9, item 3).

Issue 9 asks for weight-only low-bit inference with dequantize-in-kernel where torch offers it.
On CPU torch 2.11 offers ``aten._weight_int4pack_mm_for_cpu`` (4-bit weights packed by
``_convert_weight_to_int4pack_for_cpu``, a scale and zero point per group of input channels).
Our 4-bit codes (symmetric, one scale per output channel) map onto it exactly: code + 8 as the
unsigned nibble, the channel's scale repeated over its groups, zero point 0
(``allinone.quant.int4.Int4WeightOnlyLinear``, the layer of ``allinone bench``'s cuda-int4
backend, which takes the CPU kernel on a CPU). Its activations
must be bf16 (with fp32 activations the kernel is about 60x slower here), so the timing
includes the casts in and out, as a drop-in replacement of an fp32 Linear would pay them.
Error: the largest difference from the fp32 product with the same dequantized 4-bit weight,
relative to the largest output (bf16 activations and scales).

Run:  python bench/bench_int4_cpu.py   (1 thread; mean of 20 calls after a warm-up call)
"""
import time

import torch

from allinone.quant.int4 import Int4WeightOnlyLinear
from allinone.quant.quantizer import QuantizedTensor


def timed(f, repeats: int = 20) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| layer | in x out | frames | fp32 ms | int4 (bf16 activations) ms | speed-up | max rel. error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, k, n in [("FFN w_1", 256, 2048), ("FFN w_2", 2048, 256), ("attention", 256, 256)]:
        w = torch.randn(n, k) * 0.05
        q = QuantizedTensor.from_weight(w, 4, per_channel=True)  # symmetric codes in [-7, 7]
        layer = Int4WeightOnlyLinear(q.codes, q.scale)  # the cuda-int4 backend's layer, on CPU
        weight = q.dequantize()
        for frames in (125, 500):  # 5 s and 20 s of speech after 4x subsampling
            x = torch.randn(frames, k)
            fp32 = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
            int4 = lambda: layer(x).float()  # noqa: E731
            ref = fp32()
            err = ((int4() - ref).abs().max() / ref.abs().max()).item()
            a, b = timed(fp32), timed(int4)
            print(f"| {name} | {k}x{n} | {frames} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
