"""Packed file size of one Conformer at 8/4/3/2 bits and mixed allocations, against theory.

Builds the Switchboard-size Conformer of method.md (12 blocks, d=256, 4 heads, FFN 2048,
kernel 31, 2000 BPE units + <blank>/<unk>/<sos/eos>; CTC head, no decoder) as a supernet with
quantizers for 8/4/3/2 bits, extracts uniform and mixed subnets, writes each packed file
and compares its bytes with the theory:

    theory = sum over quantized weights ceil(n * b / 8) + 4 * #scales  +  4 * #float values

Prints a markdown table (for docs/benchmarks.md). Run:

    .venv/bin/python bench/bench_packed_size.py [--per-tensor]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
import tempfile
from pathlib import Path

import torch

from allinone.data.features import FbankConfig
from allinone.data.tokenizer import CharTokenizer
from allinone.elastic.extract import extract, extracted_size
from allinone.elastic.supernet import init_supernet
from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.conformer import ConformerConfig
from allinone.models.saved import PACKED_WEIGHTS, save_extracted

SUBNETS = [
    "L12_F2048_H4_B32", "L12_F2048_H4_B8", "L12_F2048_H4_B4", "L12_F2048_H4_B3", "L12_F2048_H4_B2",
    # mixed: 8-bit first and last blocks, 4 or 2 in between; per-kind attention 8 / FFN 2 / conv 4
    "L12_F2048_H4_B8.4.4.4.4.4.4.4.4.4.4.8", "L12_F2048_H4_B8.2.2.2.2.2.2.2.2.2.2.8",
    "L12_F2048_H4_BA8_BF2_BC4", "L6_F1024_H4_B4",
]


def theory_bytes(model: ASRModel, quantized: dict) -> int:
    total = 0
    for name, tensor in model.state_dict().items():
        if name in quantized:
            q = quantized[name]
            total += math.ceil(tensor.numel() * q.bits / 8) + 4 * q.scale.numel()
        else:
            total += 4 * tensor.numel()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-tensor", action="store_true", help="one scale per tensor (default per channel)")
    args = p.parse_args()
    torch.manual_seed(0)
    vocab = 2003
    enc = ConformerConfig(output_size=256, attention_heads=4, linear_units=2048, num_blocks=12,
                          cnn_module_kernel=31)
    quant = {"bits": [8, 4, 3, 2], "per_channel": not args.per_tensor, "learn_scale": True,
             "method": "max", "mode": "independent"}
    model = ASRModel(ASRModelConfig.from_dict({"encoder": asdict(enc), "vocab_size": vocab, "quant": quant})).eval()
    space = init_supernet(model, {"depth": [12, 6], "ffn": [2048, 1024], "heads": [4], "bits": [32, 8, 4, 3, 2],
                                  "per_layer": ["bits"], "per_kind_bits": True})
    tokenizer = CharTokenizer(["<blank>", "<unk>", "A", "<sos/eos>"])
    print(f"Conformer 12x256, FFN 2048, 4 heads, kernel 31, vocab {vocab}, CTC; "
          f"{'per-tensor' if args.per_tensor else 'per-channel'} scales\n")
    print("| subnet | params | avg bits | theory bytes | accounting bytes | file tensor bytes | file bytes | ratio vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for s in SUBNETS:
            small, quantized = extract(model, space.parse(s))
            report = extracted_size(small, quantized)
            out = save_extracted(Path(tmp) / s, small, quantized, FbankConfig(), tokenizer, {"subnet": s})
            path = out / PACKED_WEIGHTS
            file_bytes = path.stat().st_size
            header = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 header length
            bits = "32" if report.quantized_params == 0 else f"{report.average_bits:.2f}"
            print(f"| {s} | {report.total_params:,} | {bits} | {theory_bytes(small, quantized):,} | "
                  f"{report.packed_bytes:,} | {file_bytes - header:,} | {file_bytes:,} | "
                  f"{report.compression_ratio:.2f}x |")


if __name__ == "__main__":
    main()
