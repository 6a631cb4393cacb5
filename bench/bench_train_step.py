"""Training-step cost: our Conformer vs ESPnet's, and the supernet's overhead (issue 9).

Switchboard-size encoder (12 x 256, 4 heads, FFN 2048, kernel 31) + CTC over 2000 units,
a batch of 32 utterances of 10 s (1000 fbank frames), bf16 autocast, AdamW. Every row is
measured in the same process on the same device; median of --repeats steps after --warmup.

Rows:
  espnet eager / compiled   ESPnet's ConformerEncoder + a CTC head
  ours eager / compiled     allinone's ASRModel (same numerics as ESPnet's)
  supernet largest float    the supernet (quantizers attached) on subnet=None
  supernet 4-bit            the largest width/depth at 4 bits (fake quantization)
  sandwich (n subnets)      one SupernetStrategy step, against the sum of its single steps

Run on a GPU:   python bench/bench_train_step.py --device cuda
Smoke test:     python bench/bench_train_step.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict

import torch

from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.conformer import ConformerConfig


def timed(step, warmup: int, repeats: int, device: str) -> float:
    """Median milliseconds of ``step()``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def make_step(forward, params, device: str):
    """One training step: forward under bf16 autocast, backward, AdamW update."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke test")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    dev = args.device
    torch.manual_seed(0)

    if args.tiny:
        enc = ConformerConfig(output_size=64, attention_heads=4, linear_units=256, num_blocks=2, cnn_module_kernel=7)
        batch, frames, vocab = 4, 200, 50
    else:
        enc = ConformerConfig(output_size=256, attention_heads=4, linear_units=2048, num_blocks=12, cnn_module_kernel=31)
        batch, frames, vocab = 32, 1000, 2003
    feats = torch.randn(batch, frames, enc.input_size, device=dev)
    lens = torch.full((batch,), frames, dtype=torch.long, device=dev)
    tokens = torch.randint(1, vocab - 1, (batch, frames // 40), device=dev)
    tok_lens = torch.full((batch,), tokens.shape[1], dtype=torch.long, device=dev)

    rows: list[tuple[str, float]] = []

    # ESPnet's encoder + CTC, the reference.
    from espnet2.asr.ctc import CTC
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder as EspnetEncoder

    esp_enc = EspnetEncoder(**enc.espnet_kwargs()).to(dev)
    esp_ctc = CTC(vocab, enc.output_size).to(dev)

    def espnet_forward(encoder=esp_enc):
        h, hl, _ = encoder(feats, lens)
        return esp_ctc(h, hl, tokens, tok_lens)

    params = list(esp_enc.parameters()) + list(esp_ctc.parameters())
    rows.append(("espnet eager", timed(make_step(espnet_forward, params, dev), args.warmup, args.repeats, dev)))
    if args.compile:
        compiled = torch.compile(esp_enc)
        rows.append(("espnet compiled", timed(make_step(lambda: espnet_forward(compiled), params, dev),
                                              args.warmup, args.repeats, dev)))

    plain = ASRModel(ASRModelConfig(encoder=enc, vocab_size=vocab)).to(dev)
    rows.append(("ours eager", timed(make_step(lambda: plain(feats, lens, tokens, tok_lens)["loss"],
                                               plain.parameters(), dev), args.warmup, args.repeats, dev)))
    if args.compile:
        compiled_plain = torch.compile(plain)
        rows.append(("ours compiled", timed(make_step(lambda: compiled_plain(feats, lens, tokens, tok_lens)["loss"],
                                                      plain.parameters(), dev), args.warmup, args.repeats, dev)))

    from allinone.elastic.supernet import init_supernet

    quant = {"bits": [8, 4, 2], "per_channel": True, "learn_scale": True, "method": "max", "mode": "independent"}
    sup = ASRModel(ASRModelConfig.from_dict({"encoder": asdict(enc), "vocab_size": vocab, "quant": quant})).to(dev)
    space = init_supernet(sup, {"depth": [enc.num_blocks, enc.num_blocks // 2],
                                "ffn": [enc.linear_units, enc.linear_units // 2],
                                "heads": [enc.attention_heads], "bits": [32, 8, 4, 2]})
    largest, smallest = space.largest(), space.smallest()
    b4 = space.parse(space.format(largest).rsplit("_B", 1)[0] + "_B4")
    for name, subnet in (("supernet largest float", None), ("supernet largest 4-bit", b4),
                         ("supernet smallest", smallest)):
        rows.append((name, timed(make_step(lambda s=subnet: sup(feats, lens, tokens, tok_lens, subnet=s)["loss"],
                                           sup.parameters(), dev), args.warmup, args.repeats, dev)))

    from allinone.train.strategies import build_strategy

    strategy = build_strategy({"space": space.to_dict(), "strategy": "sandwich", "num_random": 1}, sup, seed=0)
    opt = torch.optim.AdamW(sup.parameters(), lr=1e-4)
    batch_dict = {"feats": feats, "feat_lens": lens, "tokens": tokens, "token_lens": tok_lens}

    def sandwich_step():
        strategy.step(sup, sup, batch_dict, use_bf16=dev == "cuda", loss_scale=1.0, sync_grads=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows.append(("sandwich (largest + smallest + 1 random)",
                 timed(sandwich_step, args.warmup, args.repeats, dev)))

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; batch {batch} x {frames} frames; "
          f"encoder {enc.num_blocks} x {enc.output_size}, FFN {enc.linear_units}; vocab {vocab}\n")
    base = dict(rows)["ours eager"]
    print("| step | ms | vs ours eager | utterances/s |")
    print("|---|---:|---:|---:|")
    for row, ms in rows:
        print(f"| {row} | {ms:.1f} | {ms / base:.2f}x | {1000 * batch / ms:.0f} |")
    if dev == "cuda":
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
