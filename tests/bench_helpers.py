"""A tiny saved supernet and a few real connected-digit utterances, for the bench / search tests."""

from __future__ import annotations

from pathlib import Path

import torch

from allinone.data.corpora import fsdd_connected_digits
from allinone.data.features import FbankConfig
from allinone.data.tokenizer import CharTokenizer
from allinone.elastic.space import SearchSpace
from allinone.models.saved import save_model_dir

from supernet_helpers import tiny_supernet

# 12 tokens, as tiny_supernet's vocabulary; the letters of the digit words not listed map to <unk>.
TOKENS = ["<blank>", "<unk>", "<space>", "E", "O", "N", "R", "T", "I", "H", "S", "<sos/eos>"]

# 2 depths x 2 widths x 2 head counts x 3 precisions = 24 uniform subnets, no per-block mixtures.
SMALL_SPACE = dict(depth=[4, 2], ffn=[48, 24], heads=[4, 2], bits=[32, 8, 2], num_blocks=4)


def make_supernet_dir(out: Path, space: dict | None = None, seed: int = 5, train_steps: int = 0,
                      data_dir: Path | None = None, mute: bool = False) -> Path:
    """Save ``tiny_supernet`` (40 mel bins, d=32, 4 blocks) with ``space`` as a model dir.

    train_steps > 0: a few Adam steps of the full float model on ``data_dir`` first, so that
    subnets differ in more than noise. mute: a CTC blank bias so large that every subnet
    decodes to nothing (an untrained model stuck at the blank, as real ones start).
    """
    model = tiny_supernet(seed=seed)
    model.search_space = SearchSpace(**(space or SMALL_SPACE)).for_model(model.config)
    tok = CharTokenizer(TOKENS)
    fbank = FbankConfig(n_mels=40)
    if train_steps:
        from allinone.data.dataset import ASRDataset, collate, extract_features
        from allinone.data.kaldi import read_data_dir

        utts = read_data_dir(data_dir)
        ds = ASRDataset(extract_features(utts, fbank, 1, progress=False), utts, tok)
        batch = collate([ds[i] for i in range(len(ds))])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(train_steps):
            loss = model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    if mute:
        with torch.no_grad():
            model.ctc.ctc_lo.bias[0] = 1e4
    model.eval()
    return save_model_dir(out, model, fbank, tok)


def make_digits(data_root: Path, out: Path, num_utts: int = 6, seed: int = 0) -> Path:
    """A Kaldi data dir of ``num_utts`` synthetic connected-digit utterances (2-3 FSDD test recordings each)."""
    fsdd_connected_digits(data_root / "fsdd", out, split="test", num_utts=num_utts, min_digits=2,
                          max_digits=3, seed=seed)
    return out
