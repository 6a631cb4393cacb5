"""Training-step cost: our Conformer vs ESPnet's, and the supernet's overhead (issue 9).

Presets (--preset): ``swbd`` = the issue's Switchboard-size encoder (12 x 256, 4 heads,
FFN 2048, kernel 31) + CTC over 2003 units, 32 utterances of 10 s (1000 fbank frames);
``so762`` = the speechocean762 baseline's encoder (12 x 176, FFN 704, kernel 15) + CTC over
300 units, 28 utterances of 4.5 s; ``tiny`` = a CPU smoke test. bf16 autocast on CUDA,
AdamW. Every row is measured in the same process on the same device: after --warmup steps
of each, --repeats rounds that time one step of every row in turn (round robin, so that a
drift of the machine's speed spreads over all rows); the median per row. Per row: peak GPU
memory of that step and model FLOPs utilisation (FLOPs of one step counted by
torch.utils.flop_counter, over the GPU's dense bf16 peak, --peak-tflops, 989 for an H100/H200
SXM).

Rows:
  espnet eager / compiled   ESPnet's ConformerEncoder + a CTC head
  ours eager / compiled     allinone's ASRModel (same numerics as ESPnet's)
  supernet largest float    the supernet (quantizers attached) on subnet=None
  supernet 4-bit            the largest width/depth at 4 bits (fake quantization)
  supernet ... compiled     (--compile) the supernet under torch.compile, float and 4-bit
  sandwich (n subnets)      one SupernetStrategy step, against the sum of its single steps
  one-stage mixed precision one MixedPrecisionStrategy step (labels only): 8/4/2-bit
                            candidates mixed per layer, against the 4-bit row

Run on a GPU:   python bench/bench_train_step.py --device cuda --compile [--preset so762]
Smoke test:     python bench/bench_train_step.py --preset tiny --device cpu
Op counts:      add --profile: one more step per row under torch.profiler, which prints per row
                the operator calls (top-level aten ops, all aten ops including nested ones),
                the CUDA kernels launched, and the host-device synchronisations of one step
                (on CUDA the cudaStreamSynchronize / cudaDeviceSynchronize /
                cudaEventSynchronize calls, on the CPU the item / is_nonzero calls that would
                synchronise on a GPU); the optimizer's operators are counted apart.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict

import torch

from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.conformer import ConformerConfig


PRESETS = {  # encoder kwargs, batch, frames, vocab
    "swbd": (dict(output_size=256, attention_heads=4, linear_units=2048, num_blocks=12, cnn_module_kernel=31),
             32, 1000, 2003),
    "so762": (dict(output_size=176, attention_heads=4, linear_units=704, num_blocks=12, cnn_module_kernel=15),
              28, 450, 300),
    "tiny": (dict(output_size=64, attention_heads=4, linear_units=256, num_blocks=2, cnn_module_kernel=7),
             4, 200, 50),
}


def step_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def timed(step, warmup: int, repeats: int, device: str) -> float:
    """Median milliseconds of one ``step()`` timed alone (``timed_round_robin`` of one row)."""
    return timed_round_robin({"step": step}, warmup, repeats, device)["step"][0]


def timed_round_robin(steps: dict, warmup: int, repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """Median milliseconds and peak GiB of each named ``step()``, timing the rows in turn.

    Every row is warmed up first; then ``repeats`` rounds each time one step of every row
    (row 1, row 2, ..., row 1, ...). A drift of the machine's speed during the run (clocks,
    other tenants of a lent GPU) then spreads over all rows instead of landing on the last
    ones, which made ratios between early and late rows unreliable when rows were timed one
    after another. Peak memory: the highest of the row's timed steps (the other rows' models
    and optimizer states are resident too, as before).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    peaks = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
            times[name].append(1000 * (time.perf_counter() - t))
    return {name: (statistics.median(times[name]), peaks[name] if device == "cuda" else float("nan"))
            for name in steps}


_OPT_REGION = "bench::optimizer_step"
_SYNC_OPS = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense")
_SYNC_RUNTIME = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def step_op_counts(step, device: str) -> dict[str, int]:
    """Operator calls, CUDA kernels and host-device synchronisations of one ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    top = total = kernels = opt_ops = 0
    item_ops = runtime_syncs = 0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            continue
        parent, in_opt = e.cpu_parent, False
        while parent is not None and not in_opt:
            in_opt, parent = parent.name == _OPT_REGION, parent.cpu_parent
        if in_opt:  # the optimizer (its CPU step counters' item() are no device syncs)
            opt_ops += name.startswith("aten::")
            continue
        if name.startswith("aten::"):
            total += 1
            parent = e.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                top += 1
                item_ops += name in _SYNC_OPS
        elif name in _SYNC_RUNTIME:
            runtime_syncs += 1
    # On CUDA every synchronising runtime call counts (also those inside other operators,
    # such as nonzero for boolean indexing), less the profiler's own synchronize() above;
    # on the CPU, where nothing waits, the item()-like calls that would synchronise.
    syncs = runtime_syncs - 1 if device == "cuda" else item_ops
    return {"aten_top": top, "aten_all": total, "cuda_kernels": kernels, "syncs": syncs,
            "optimizer_aten": opt_ops}


def make_step(forward, params, device: str):
    """One training step: forward under bf16 autocast, backward, AdamW update."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = forward()
        loss.backward()
        with torch.profiler.record_function(_OPT_REGION):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="swbd")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-espnet", action="store_true", help="leave out the ESPnet rows (also when espnet is missing)")
    p.add_argument("--profile", action="store_true",
                   help="also count operator calls, CUDA kernels and synchronisations of one step per row")
    args = p.parse_args()
    dev = args.device
    torch.manual_seed(0)

    enc_kwargs, batch, frames, vocab = PRESETS["tiny" if args.tiny else args.preset]
    enc = ConformerConfig(**enc_kwargs)
    feats = torch.randn(batch, frames, enc.input_size, device=dev)
    lens = torch.full((batch,), frames, dtype=torch.long, device=dev)
    tokens = torch.randint(1, vocab - 1, (batch, frames // 40), device=dev)
    tok_lens = torch.full((batch,), tokens.shape[1], dtype=torch.long, device=dev)

    steps: dict = {}  # row name -> one training step, timed together at the end

    def add(name: str, step) -> None:
        steps[name] = step

    # ESPnet's encoder + CTC, the reference.
    try:
        if args.no_espnet:
            raise ImportError("--no-espnet")
        from espnet2.asr.ctc import CTC
        from espnet2.asr.encoder.conformer_encoder import ConformerEncoder as EspnetEncoder
    except ImportError as e:
        print(f"(no ESPnet rows: {e})")
    else:
        esp_enc = EspnetEncoder(**enc.espnet_kwargs()).to(dev)
        esp_ctc = CTC(vocab, enc.output_size).to(dev)

        def espnet_forward(encoder=esp_enc):
            h, hl, _ = encoder(feats, lens)
            return esp_ctc(h, hl, tokens, tok_lens)

        params = list(esp_enc.parameters()) + list(esp_ctc.parameters())
        add("espnet eager", make_step(espnet_forward, params, dev))
        if args.compile:
            compiled = torch.compile(esp_enc)
            add("espnet compiled", make_step(lambda: espnet_forward(compiled), params, dev))

    plain = ASRModel(ASRModelConfig(encoder=enc, vocab_size=vocab)).to(dev)
    plain_step = make_step(lambda: plain(feats, lens, tokens, tok_lens)["loss"], plain.parameters(), dev)
    add("ours eager", plain_step)
    flops = step_flops(plain_step)
    if args.compile:
        compiled_plain = torch.compile(plain)
        add("ours compiled", make_step(lambda: compiled_plain(feats, lens, tokens, tok_lens)["loss"],
                                       plain.parameters(), dev))

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
        add(name, make_step(lambda s=subnet: sup(feats, lens, tokens, tok_lens, subnet=s)["loss"],
                            sup.parameters(), dev))
    if args.compile:
        # Compiled, fake quantization fuses into the graph's kernels instead of a chain of
        # small eager ones per weight (one graph per subnet: Dynamo specialises on it).
        compiled_sup = torch.compile(sup)
        for name, subnet in (("supernet largest float compiled", None), ("supernet largest 4-bit compiled", b4)):
            add(name, make_step(lambda s=subnet: compiled_sup(feats, lens, tokens, tok_lens, subnet=s)["loss"],
                                sup.parameters(), dev))

    from allinone.train.strategies import build_strategy

    batch_dict = {"feats": feats, "feat_lens": lens, "tokens": tokens, "token_lens": tok_lens}

    def strategy_step(strategy, model):
        """One trainer step of ``strategy`` (its forwards and backwards) and an AdamW update."""
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            strategy.step(model, model, batch_dict, use_bf16=dev == "cuda", loss_scale=1.0, sync_grads=True)
            with torch.profiler.record_function(_OPT_REGION):
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step

    sandwich = build_strategy({"space": space.to_dict(), "strategy": "sandwich", "num_random": 1}, sup, seed=0)
    add("sandwich (largest + smallest + 1 random)", strategy_step(sandwich, sup))

    # One-stage mixed precision (issue 6): every weight computes all three candidates'
    # fake quantization and mixes them with its group's Gumbel-softmax sample. Against
    # "supernet largest 4-bit" (one candidate), this row is the mixture's overhead, which
    # decides one-stage's compression time against two-stage's. Labels only (kl_weight 0),
    # as in the 4-bit row.
    mixed = ASRModel(ASRModelConfig.from_dict({"encoder": asdict(enc), "vocab_size": vocab, "quant": quant})).to(dev)
    mixed_space = init_supernet(mixed, {"depth": [enc.num_blocks], "ffn": [enc.linear_units],
                                        "heads": [enc.attention_heads], "bits": [32, 8, 4, 2],
                                        "per_layer": ["bits"], "per_kind_bits": True})
    mixed_strategy = build_strategy({"space": mixed_space.to_dict(), "strategy": "mixed_precision",
                                     "kl_weight": 0.0, "target_bits": 4.0}, mixed, seed=0, base_lr=1e-4)
    add("one-stage mixed precision (8/4/2 per layer)", strategy_step(mixed_strategy, mixed))

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}: batch {batch} x {frames} frames; "
          f"encoder {enc.num_blocks} x {enc.output_size}, FFN {enc.linear_units}; vocab {vocab}; "
          f"{flops / 1e9:.0f} GFLOP per plain step\n")
    timings = timed_round_robin(steps, args.warmup, args.repeats, dev)
    # After the warmup: a compiled row's first call compiles.
    op_counts = {name: step_op_counts(step, dev) for name, step in steps.items()} if args.profile else {}
    rows = [(name, ms, mem) for name, (ms, mem) in timings.items()]
    ms_of = {row: ms for row, ms, _ in rows}
    base = ms_of["ours eager"]
    print("| step | ms | vs ours eager | utterances/s | peak GiB | MFU (plain-step FLOPs) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row, ms, mem in rows:
        mfu = flops / (ms / 1000) / (args.peak_tflops * 1e12)
        print(f"| {row} | {ms:.1f} | {ms / base:.2f}x | {1000 * batch / ms:.0f} | {mem:.2f} | {100 * mfu:.1f}% |")
    if op_counts:
        print("\nOne step, profiled; aten ops and syncs of the forward + backward (the optimizer's "
              "aten ops apart), CUDA kernels of the whole step:")
        print("| step | aten ops (top-level) | aten ops (all) | syncs | optimizer aten ops | CUDA kernels |")
        print("|---|---:|---:|---:|---:|---:|")
        for row, c in op_counts.items():
            kern = c["cuda_kernels"] if dev == "cuda" else "-"
            print(f"| {row} | {c['aten_top']} | {c['aten_all']} | {c['syncs']} | {c['optimizer_aten']} | {kern} |")
    # The sandwich's random subnet changes every step; its expected cost is taken as the mean
    # of the largest and smallest steps.
    single = ms_of["supernet largest float"] + ms_of["supernet smallest"]
    single += 0.5 * single
    print(f"\nsandwich {ms_of['sandwich (largest + smallest + 1 random)']:.1f} ms vs sum of its single "
          f"steps {single:.1f} ms (largest + smallest + their mean for the random one)")
    print(f"one-stage mixed-precision step {ms_of['one-stage mixed precision (8/4/2 per layer)']:.1f} ms = "
          f"{ms_of['one-stage mixed precision (8/4/2 per layer)'] / ms_of['supernet largest 4-bit']:.2f}x "
          f"the 4-bit step")


if __name__ == "__main__":
    main()
