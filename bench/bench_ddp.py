"""Multi-GPU data-parallel throughput of a training step (issue 9, item 2).

Runs under torchrun, one process per GPU, torch DDP over NCCL (gloo on CPU), the same
per-GPU batch on every rank (weak scaling, as training with a per-GPU frame budget does).
Model: the Switchboard-size Conformer (12 x 256, FFN 2048) + CTC over 2003 units, or the
so762 size with --preset so762; bf16 autocast; AdamW. Prints one markdown row (from rank
0): GPUs, ms per step (median), utterances/s over all ranks, peak GPU memory of rank 0.
With --supernet the step is the all-in-one sandwich step (largest + smallest + 1 random
subnet, in-place distillation; space: depth 12/6, FFN 2048/1024, 4 heads, bits 32/8/4/2) and
every step checks, by all-gathering the subnet strings, that all ranks trained the same
subnets (the row says how many steps were checked and how many disagreed).

Run:
    torchrun --standalone --nproc_per_node=1 bench/bench_ddp.py
    torchrun --standalone --nproc_per_node=2 bench/bench_ddp.py
    torchrun --standalone --nproc_per_node=4 bench/bench_ddp.py --supernet     (issue 10)
Scaling = utterances/s on N GPUs / utterances/s on one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from allinone.elastic.supernet import init_supernet
from allinone.models.asr import ASRModel, ASRModelConfig
from allinone.models.conformer import ConformerConfig
from allinone.train.strategies import build_strategy
from bench_train_step import PRESETS  # (bench/ is on sys.path when this script runs)

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="swbd")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--supernet", action="store_true", help="time the sandwich supernet step")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)

    enc_kwargs, batch, frames, vocab = PRESETS[args.preset]
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    enc = ConformerConfig(**enc_kwargs)
    quant = None
    if args.supernet:
        quant = {"bits": [8, 4, 2], "per_channel": True, "learn_scale": True, "method": "max",
                 "mode": "independent"}
    model = ASRModel(ASRModelConfig.from_dict({"encoder": asdict(enc), "vocab_size": vocab, "quant": quant}))
    strategy = None
    if args.supernet:
        space = init_supernet(model, {"depth": [enc.num_blocks, enc.num_blocks // 2],
                                      "ffn": [enc.linear_units, enc.linear_units // 2],
                                      "heads": [enc.attention_heads], "bits": [32, 8, 4, 2]})
        strategy = build_strategy({"space": space.to_dict(), "strategy": "sandwich", "num_random": 1}, model, seed=0)
    model = model.to(dev)
    ddp = DistributedDataParallel(model, device_ids=[local] if cuda else None,
                                  find_unused_parameters=strategy is not None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)  # each rank its own data
    feats = torch.randn(batch, frames, 80, generator=g).to(dev)
    lens = torch.full((batch,), frames, dtype=torch.long, device=dev)
    tokens = torch.randint(1, vocab - 1, (batch, frames // 40), generator=g).to(dev)
    tok_lens = torch.full((batch,), tokens.shape[1], dtype=torch.long, device=dev)
    batch_dict = {"feats": feats, "feat_lens": lens, "tokens": tokens, "token_lens": tok_lens}
    checked = disagreed = 0

    def step() -> None:
        nonlocal checked, disagreed
        if strategy is None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = ddp(feats, lens, tokens, tok_lens)["loss"]
            loss.backward()
        else:
            # The subnets this rank is about to train; every rank must pick the same ones.
            mine = " ".join(strategy.space.format(s) for s, _ in strategy.subnets(strategy.calls))
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            checked += 1
            disagreed += any(o != mine for o in everyone)
            strategy.step(ddp, model, batch_dict, use_bf16=cuda, loss_scale=1.0, sync_grads=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    # A step is as slow as its slowest rank.
    med = torch.tensor(statistics.median(times), device=dev)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        ms = 1000 * med.item()
        mem = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f}" if cuda else "-"
        kind = "supernet sandwich" if strategy is not None else "plain"
        same = f"{checked - disagreed}/{checked} steps same subnets" if strategy is not None else "-"
        print(f"| {args.preset} {kind} | {world} x {name} | {ms:.1f} | {world * batch / med.item():.0f} | {mem} | {same} |",
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
