"""CPU latency of int8 Linear layers (allinone.quant.int8) against float32 nn.Linear.

Conformer-sized layers (d=256, FFN 2048, 4 heads) on [frames, features] inputs.
Prints a markdown table; run e.g.

    .venv/bin/python bench/bench_int8_linear.py --threads 2 --frames 1 100 500
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from allinone.quant.int8 import Int8Linear
from allinone.quant.quantizer import QuantizedTensor

# (name, in_features, out_features) of the linears in one Conformer block (d=256, FFN 2048).
LAYERS = [("FFN w_1", 256, 2048), ("FFN w_2", 2048, 256), ("attention q/k/v/out", 256, 256),
          ("conv pointwise_conv1", 256, 512)]


def time_ms(fn, x, repeats: int, warmup: int = 5) -> float:
    """Median wall time of ``fn(x)`` in milliseconds."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 100, 500],
                    help="rows of the input (batch x frames after subsampling)")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, quantized engine {torch.backends.quantized.engine}\n")
    print("| layer | in x out | frames | fp32 ms | int8 fbgemm ms | speed-up | int8 _int_mm ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, d_in, d_out in LAYERS:
        lin = nn.Linear(d_in, d_out)
        q = QuantizedTensor.from_weight(lin.weight, 8, per_channel=True)
        fbgemm = Int8Linear.from_quantized(q, lin.bias, backend="fbgemm")
        int_mm = Int8Linear.from_quantized(q, lin.bias, backend="int_mm")
        for frames in args.frames:
            x = torch.randn(frames, d_in)
            t32 = time_ms(lin, x, args.repeats)
            t8 = time_ms(fbgemm, x, args.repeats)
            tmm = time_ms(int_mm, x, args.repeats)
            print(f"| {name} | {d_in}x{d_out} | {frames} | {t32:.3f} | {t8:.3f} | {t32 / t8:.2f}x | {tmm:.3f} |")


if __name__ == "__main__":
    main()
