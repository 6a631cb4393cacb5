"""Weight-only 4-bit Linear on CPU through torch's int4 kernel, against fp32 (issue 9, item 3).

Issue 9 asks for weight-only low-bit inference with dequantize-in-kernel where torch offers it.
On CPU torch 2.11 offers ``aten._weight_int4pack_mm_for_cpu`` (4-bit weights packed by
``_convert_weight_to_int4pack_for_cpu``, a scale and zero point per group of input channels).
Our 4-bit codes (symmetric, one scale per output channel) map onto it exactly: code + 8 as the
unsigned nibble, the channel's scale repeated over its groups, zero point 0. Its activations
must be bf16 (with fp32 activations the kernel is about 60x slower here), so the timing
includes the casts in and out, as a drop-in replacement of an fp32 Linear would pay them.
Error: the largest difference from the fp32 product with the same dequantized 4-bit weight,
relative to the largest output (bf16 activations and scales).

Run:  python bench/bench_int4_cpu.py   (1 thread; mean of 20 calls after a warm-up call)
"""
import time

import torch


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
        scale = w.abs().amax(1) / 7  # symmetric per-channel 4-bit codes in [-7, 7]
        codes = torch.round(w / scale[:, None]).clamp(-7, 7)
        group = min(256, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes + 8).to(torch.int32), 1)
        scales_zeros = torch.stack([scale[None].expand(k // group, n), torch.zeros(k // group, n)], -1)
        scales_zeros = scales_zeros.contiguous().bfloat16()  # [groups, out, (scale, zero)]
        weight = codes * scale[:, None]
        for frames in (125, 500):  # 5 s and 20 s of speech after 4x subsampling
            x = torch.randn(frames, k)
            fp32 = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
            int4 = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                x.bfloat16(), packed, group, scales_zeros).float()
            ref = fp32()
            err = ((int4() - ref).abs().max() / ref.abs().max()).item()
            a, b = timed(fp32), timed(int4)
            print(f"| {name} | {k}x{n} | {frames} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
