"""Training loop: one readable file, top to bottom (in the spirit of nanoGPT's train.py).

``train(cfg)`` prepares data (tokenizer, cached features, CMVN statistics), builds the model,
then runs epochs of bucketed batches with SpecAugment, AdamW + warmup, gradient clipping
and accumulation, bf16 autocast on GPU, a validation loss each epoch, a resumable
checkpoint every N steps, and best-k checkpoint averaging at the end. Under ``torchrun``
it trains with DistributedDataParallel (one process per GPU).

What one training step does for a batch is a *strategy* (``allinone.train.strategies``):
the plain model runs one forward/backward; supernet strategies run several subnets.

With ``model.kind: wav2vec2`` the model is a wav2vec2 / HuBERT CTC model
(``allinone.models.wav2vec2``) fed raw waveforms: the data are cached waveforms instead of
features (no CMVN, no SpecAugment), batches hold at most ``train.max_samples`` padded
samples, the model may start from a Hugging Face or fairseq checkpoint, its feature
extractor may be frozen, and its layers may train at decaying learning rates.  With a
``supernet`` section it is a wav2vec2 supernet trained by the same strategies as the
Conformer's (``build_wav2vec2``; docs/wav2vec2.md).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from allinone.elastic.subnet import FLOAT_BITS
from allinone.train.config import ExperimentConfig, config_to_yaml
from allinone.utils import atomic_open, atomic_torch_save, setup_logging

logger = logging.getLogger("allinone")

CHECKPOINT = "checkpoint.pt"  # the resumable training state, overwritten every N steps


# --------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_kind: str) -> None:
    rank, world, local_rank = dist_info()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)


def pick_device(choice: str) -> torch.device:
    _, _, local_rank = dist_info()
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if choice != "cpu":
        raise ValueError(f"train.device={choice!r}: expected auto, cuda or cpu")
    return torch.device("cpu")


# --------------------------------------------------------------------------- data


def prepare_data(cfg: ExperimentConfig, exp_dir: Path):
    """Tokenizer, features and CMVN statistics for an experiment (all cached, so reruns are fast).

    Returns (tokenizer, train_dataset, valid_dataset, cmvn_stats); for a waveform model
    the datasets hold waveforms and cmvn_stats is None.
    """
    from allinone.data import dataset as ds
    from allinone.data.features import compute_cmvn_stats, load_cmvn_stats, save_cmvn_stats
    from allinone.data.kaldi import read_data_dir
    from allinone.data.tokenizer import load_tokenizer, train_tokenizer

    fbank = front_end_config(cfg)
    waveforms = isinstance(fbank, ds.WaveformConfig)
    suffix = ".wav.pt" if waveforms else ".pt"  # the two kinds of cache must not overwrite each other
    train_utts = read_data_dir(cfg.data.train, skip_bad=cfg.data.skip_bad)
    valid_utts = read_data_dir(cfg.data.valid, skip_bad=cfg.data.skip_bad)

    tok_dir = exp_dir / "tokenizer"
    init_from = (cfg.supernet or {}).get("init_from")
    if not tok_dir.is_dir() and init_from and (Path(init_from) / "tokenizer").is_dir():
        # A supernet starting from a trained model must keep that model's vocabulary.
        shutil.copytree(Path(init_from) / "tokenizer", tok_dir)
    if tok_dir.is_dir():
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = train_tokenizer([u.text for u in train_utts], cfg.tokenizer.kind,
                                    cfg.tokenizer.vocab_size, tok_dir)
    cache = Path(cfg.data.feat_cache_dir)
    # Runs with other speed factors keep their own cache file: side by side, one would otherwise
    # overwrite the other's and each would recompute at every start.
    factors = [float(f) for f in cfg.data.speed_perturb]
    sp_tag = "" if factors == [1.0] else "_sp" + "-".join(f"{f:g}" for f in factors)
    train_feats = ds.extract_features(train_utts, fbank, cfg.data.num_workers,
                                      cache_path=cache / f"{_tag(cfg.data.train)}{sp_tag}{suffix}",
                                      skip_bad=cfg.data.skip_bad, speed_factors=cfg.data.speed_perturb)
    valid_feats = ds.extract_features(valid_utts, fbank, cfg.data.num_workers,
                                      cache_path=cache / f"{_tag(cfg.data.valid)}{suffix}", skip_bad=cfg.data.skip_bad)
    stats_path = exp_dir / "feats_stats.npz"
    if waveforms:
        stats = None  # wav2vec2 normalises inside (and per utterance with normalize_waveform)
    elif stats_path.is_file():
        stats = load_cmvn_stats(stats_path)
    else:
        # Statistics from the original (unperturbed) training utterances, as ESPnet does.
        stats = compute_cmvn_stats(train_feats[u.utt_id] for u in train_utts if u.utt_id in train_feats)
        save_cmvn_stats(stats_path, stats)
    train_set = ds.ASRDataset(train_feats, ds.speed_perturb_utts(train_utts, cfg.data.speed_perturb), tokenizer)
    valid_set = ds.ASRDataset(valid_feats, valid_utts, tokenizer)
    return tokenizer, train_set, valid_set, stats


def _tag(data_dir: str) -> str:
    """A readable cache-file name for a data directory (the cache itself checks its contents)."""
    parts = Path(data_dir).resolve().parts
    return "_".join(parts[-2:])


class AugmentingCollate:
    """``collate``, then SpecAugment on the padded CPU batch (``specaug`` None: collate only).

    Runs wherever the loader collates: in worker processes (``train.loader_workers``) the
    per-utterance SpecAugment loop overlaps the GPU step instead of delaying its launches.
    A worker reseeds the augmentation from its own seed (``get_worker_info().seed``: the
    loader's base seed, drawn from the main process's RNG each epoch, plus the worker id),
    so workers draw different masks and a run stays reproducible.
    """

    def __init__(self, specaug=None):
        self.specaug = specaug
        self._seeded_for: int | None = None

    def __call__(self, items) -> dict:
        from allinone.data.dataset import collate

        batch = collate(items)
        if self.specaug is None:
            return batch
        info = torch.utils.data.get_worker_info()
        if info is not None and self._seeded_for != info.seed:
            self.specaug.generator = torch.Generator().manual_seed(info.seed)
            self._seeded_for = info.seed
        batch["feats"], _ = self.specaug(batch["feats"], batch["feat_lens"])
        return batch


def make_loader(dataset, max_frames: int, shuffle: bool, seed: int, specaug=None, workers: int = 0,
                sorted_epochs: int = 0):
    """Bucketed batches of ``dataset`` for this rank; ``specaug`` is applied at collation,
    in ``workers`` processes (0 = in the main process); the first ``sorted_epochs`` epochs
    shortest first (SortaGrad)."""
    from allinone.data.dataset import BucketBatchSampler

    rank, world, _ = dist_info()
    sampler = BucketBatchSampler(dataset.lengths, max_frames, shuffle=shuffle, seed=seed,
                                 num_replicas=world, rank=rank, sorted_epochs=sorted_epochs)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=AugmentingCollate(specaug),
                                         num_workers=workers, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=workers > 0)
    return loader, sampler


# --------------------------------------------------------------------------- model


def build_model(cfg: ExperimentConfig, vocab_size: int, cmvn_stats):
    """The model of ``cfg``; with a ``supernet`` section, a supernet ready to train
    (quantizers from ``supernet.quant``, optional ``init_from`` weights sorted by importance,
    scales set, search space attached: see docs/supernet.md).  ``model.kind: wav2vec2``
    builds a ``Wav2Vec2CTCModel`` (``build_wav2vec2``)."""
    from allinone.models.asr import ASRModel
    from allinone.train.config import model_kind

    opts = supernet_options(cfg)
    if model_kind(cfg.model) == "wav2vec2":
        return build_wav2vec2(cfg, vocab_size, opts)
    model = ASRModel(conformer_config(cfg, vocab_size, opts))
    model.set_normalize_stats(cmvn_stats)
    if opts is not None:
        from allinone.elastic.supernet import init_supernet

        init_supernet(model, opts.space, opts.init_from, opts.reorder)
    return model


def supernet_options(cfg: ExperimentConfig):
    """The checked ``SupernetOptions`` of ``cfg``'s supernet section, or None without one."""
    if not cfg.supernet:
        return None
    from allinone.train.strategies import SupernetOptions

    return SupernetOptions.from_dict(dict(cfg.supernet))


def conformer_config(cfg: ExperimentConfig, vocab_size: int, opts=None):
    """The ``ASRModelConfig`` of ``cfg``'s Conformer model (``opts``: its ``SupernetOptions``)."""
    from allinone.models.asr import ASRModelConfig

    if opts is not None and opts.extractor_bits != FLOAT_BITS:
        raise ValueError("supernet.extractor_bits is for wav2vec2 models (their CNN feature extractor); "
                         "a Conformer's front end stays float")
    model_cfg = {k: v for k, v in cfg.model.items() if k != "kind"}
    model_cfg["vocab_size"] = vocab_size
    model_cfg.setdefault("encoder", {})
    model_cfg["encoder"] = {**model_cfg["encoder"], "input_size": cfg.data.fbank.n_mels}
    if opts is not None and opts.quant is not None:
        model_cfg["quant"] = dict(opts.quant)
    return ASRModelConfig.from_dict(model_cfg)


def check_model_config(cfg: ExperimentConfig) -> None:
    """Raise the ``ValueError`` a bad model or supernet section would, without data or weights:
    the Conformer is built on the meta device (shapes only) with a stand-in vocabulary."""
    from allinone.models.asr import ASRModel
    from allinone.train.config import model_kind

    opts = supernet_options(cfg)
    if model_kind(cfg.model) != "wav2vec2":
        with torch.device("meta"):
            ASRModel(conformer_config(cfg, 3, opts))  # 3: blank, one symbol, <sos/eos>
        return
    from allinone.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTCModel

    section, fields, supernet_fields = wav2vec2_fields(cfg, opts)
    if section.init_from is None:
        with torch.device("meta"):
            Wav2Vec2CTCModel(Wav2Vec2Config.from_dict({**fields, "vocab_size": 3, **supernet_fields}))
    elif not Path(section.init_from).exists():
        raise ValueError(f"model.init_from {section.init_from}: not found (a Hugging Face directory or a "
                         "fairseq checkpoint file)")


def wav2vec2_fields(cfg: ExperimentConfig, opts=None) -> tuple:
    """(``model`` section, ``model.wav2vec2`` fields, supernet fields) of a wav2vec2 run, checked.

    The supernet fields are ``quant`` / ``extractor_bits`` from ``opts`` (a supernet section's
    ``SupernetOptions``; {} without one). With ``model.init_from`` the fields may only be
    training-time settings (dropouts, layer drop, masking): the architecture is the checkpoint's.
    """
    import dataclasses

    from allinone.elastic.quant import QuantConfig
    from allinone.models.wav2vec2 import Wav2Vec2Config
    from allinone.train.config import wav2vec2_section

    section = wav2vec2_section(cfg.model)
    fields = dict(section.wav2vec2)
    if "vocab_size" in fields:
        raise ValueError("model.wav2vec2.vocab_size is set by the tokenizer; remove it")
    if opts is not None and ("quant" in fields or "extractor_bits" in fields):
        raise ValueError("a wav2vec2 supernet takes quant and extractor_bits from the supernet section "
                         "(supernet.quant, supernet.extractor_bits), not from model.wav2vec2")
    supernet_fields: dict = {}
    if opts is not None:
        if opts.init_from and section.init_from:
            raise ValueError("model.init_from and supernet.init_from both given: start the supernet from one")
        supernet_fields = {"quant": QuantConfig.from_dict(dict(opts.quant)) if opts.quant is not None else None,
                           "extractor_bits": int(opts.extractor_bits)}
    if section.init_from is not None:
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Wav2Vec2Config)})
        if unknown:
            raise ValueError(f"unknown Wav2Vec2Config fields: {unknown}")
        # Only training-time settings may differ from the checkpoint's architecture.
        tunable = ("encoder_layer_drop", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                   "mask_feature_prob", "mask_feature_length", "mask_feature_min_masks")
        not_tunable = sorted(k for k in fields if not (k.endswith("_dropout") or k in tunable))
        if not_tunable:
            raise ValueError(f"model.wav2vec2 {not_tunable}: with model.init_from the architecture is the "
                             f"checkpoint's; only *_dropout and {', '.join(tunable)} can be set")
    return section, fields, supernet_fields


def build_wav2vec2(cfg: ExperimentConfig, vocab_size: int, opts=None):
    """A ``Wav2Vec2CTCModel`` from ``model.wav2vec2`` (random weights), or from the checkpoint
    ``model.init_from`` with a new CTC head of ``vocab_size`` outputs; the feature extractor
    is frozen with ``model.freeze_feature_extractor``.

    opts: the ``SupernetOptions`` of a ``supernet`` section, or None.  With them the model is a
    supernet: ``supernet.quant`` and ``supernet.extractor_bits`` become ``Wav2Vec2Config.quant`` /
    ``extractor_bits``; weights come from ``model.init_from`` (a pretrained / fine-tuned
    checkpoint) or ``supernet.init_from`` (a trained allinone model dir or Hugging Face CTC
    directory of the same architecture), are sorted by importance (``supernet.reorder``),
    then the quantizer scales are set and the space attached (``init_supernet``).
    """
    import dataclasses

    from allinone.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTCModel

    section, fields, supernet_fields = wav2vec2_fields(cfg, opts)
    if section.init_from is None:
        model = Wav2Vec2CTCModel(Wav2Vec2Config.from_dict({**fields, "vocab_size": vocab_size,
                                                           **supernet_fields}))
    else:
        source, info = load_pretrained_wav2vec2(section.init_from, vocab_size, section.trust_pickle,
                                                fields.get("mask_time_prob"))
        model = Wav2Vec2CTCModel(dataclasses.replace(source.config, vocab_size=vocab_size, **fields,
                                                     **supernet_fields))
        # The masking vector follows mask_time_prob: dropped when masking is turned off, new
        # (uniform, as transformers initialises it) when turned on for a checkpoint without one.
        own = model.state_dict()
        state = {k: v for k, v in source.state_dict().items()
                 if not k.startswith("aux.") and (k in own or not k.startswith("encoder.time_masking."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".quantizer." not in k and not k.startswith("encoder.time_masking.")]
        if sorted(missing) != ["aux.bias", "aux.weight"] or unexpected:  # cannot happen: same config
            raise RuntimeError(f"init_from did not fit: missing {missing}, unexpected {unexpected}")
        if info.get("normalize") is not None and info["normalize"] != section.normalize_waveform:
            logger.warning("%s was trained with normalize=%s but model.normalize_waveform=%s",
                           section.init_from, info["normalize"], section.normalize_waveform)
        logger.info("initialised from %s (%s); new CTC head of %d outputs", section.init_from,
                    info.get("model_name") or info.get("architecture"), vocab_size)
    if section.freeze_feature_extractor:
        # No gradient: autograd builds no graph through the convolutions (the waveform
        # needs none), which also saves most of their activation memory.
        model.feature_extractor.requires_grad_(False)
    if opts is not None:
        from allinone.elastic.importance import reorder_by_importance
        from allinone.elastic.supernet import init_supernet

        if section.init_from is not None and opts.reorder:
            # Pretrained weights: "the first k" FFN units / heads should be the most important k.
            reorder_by_importance(model)
        init_supernet(model, opts.space, opts.init_from, opts.reorder)
    return model


def load_pretrained_wav2vec2(path: str, vocab_size: int, trust_pickle: bool,
                             mask_time_prob: float | None = None):
    """(model, info) of a local Hugging Face directory or fairseq checkpoint file (``ValueError``
    naming the problem otherwise); ``info["normalize"]``: whether it expects normalised audio.
    mask_time_prob: the masking the run asks for (None: the checkpoint's own); the checkpoint's
    masking vector (``mask_emb`` / ``masked_spec_embed``) is kept for it."""
    p = Path(path)
    if p.is_dir():
        from allinone.interop.huggingface import load_hf_ctc

        model, info = load_hf_ctc(p, mask_time_prob=mask_time_prob)
        pre = p / "preprocessor_config.json"  # HF keeps do_normalize with the feature extractor
        info["normalize"] = bool(json.loads(pre.read_text()).get("do_normalize")) if pre.is_file() else None
        return model, info
    if p.is_file():
        from allinone.interop.fairseq import load_fairseq_ctc

        return load_fairseq_ctc(p, vocab_size=vocab_size, trust_pickle=trust_pickle,
                                mask_time_prob=mask_time_prob)
    raise ValueError(f"model.init_from {path} is neither a Hugging Face directory nor a fairseq checkpoint file")


def param_groups(model, cfg: ExperimentConfig) -> list[dict]:
    """AdamW parameter groups: no weight decay on norms and biases (parameters of < 2 dims),
    frozen parameters left out, and for wav2vec2 models with ``model.layer_lr_decay`` < 1 one
    group per learning-rate scale.  Each group's ``lr_scale`` multiplies the scheduled lr;
    a group with ``scheduled: False`` (the mixed-precision logits under
    ``supernet.logit_schedule: constant``) takes the peak lr from the first step on."""
    from allinone.train.config import model_kind, wav2vec2_section

    decay_rate = 1.0
    if model_kind(cfg.model) == "wav2vec2":
        decay_rate = wav2vec2_section(cfg.model).layer_lr_decay
    constant_logits = (cfg.supernet or {}).get("logit_schedule") == "constant"
    groups: dict[tuple[float, bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = decay_rate ** wav2vec2_lr_depth(model, name) if decay_rate != 1.0 else 1.0
        scheduled = not (constant_logits and name.startswith("bit_search."))
        groups.setdefault((scale, p.ndim < 2, scheduled), []).append(p)
    order = sorted(groups, key=lambda k: (-k[0], k[1], not k[2]))  # (scale, no_decay, scheduled)
    return [{"params": groups[k], "lr_scale": k[0], "scheduled": k[2],
             "weight_decay": 0.0 if k[1] else cfg.optim.weight_decay} for k in order]


def wav2vec2_lr_depth(model, name: str) -> int:
    """How many decay steps below the top the parameter ``name`` of a ``Wav2Vec2CTCModel``
    sits: 0 for the CTC head, L - i for transformer layer i of L, L + 1 for everything
    below the first layer (extractor, projection, positional convolution)."""
    import re

    n = model.config.encoder_num_layers
    m = re.match(r"encoder\.transformer\.layers\.(\d+)\.", name)
    if m:
        return n - int(m.group(1))
    if name.startswith(("aux.", "bit_search.")):  # the CTC head; mixed-precision logits
        return 0
    if name.startswith("encoder.transformer.layer_norm."):
        # Pre-LN applies it after the last layer; post-LN right after the positional embedding.
        return 0 if model.config.encoder_layer_norm_first else n + 1
    return n + 1


def set_learning_rates(optim: torch.optim.Optimizer, peak_lr: float, factor: float) -> None:
    """Each group's lr: ``peak_lr * factor * lr_scale`` (``factor``: the schedule's value this
    step), or ``peak_lr * lr_scale`` for a group with ``scheduled: False`` (``param_groups``)."""
    for g in optim.param_groups:  # (checkpoints of older runs have no lr_scale / scheduled)
        g["lr"] = peak_lr * (factor if g.get("scheduled", True) else 1.0) * g.get("lr_scale", 1.0)


def warmup_lr(step: int, warmup: int) -> float:
    """ESPnet's WarmupLR factor: linear rise to 1 at ``warmup`` steps, then 1/sqrt decay."""
    step = max(step, 1)
    return warmup ** 0.5 * min(step ** -0.5, step * warmup ** -1.5)


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of model state dicts (integer buffers are taken from the last)."""
    avg: dict[str, torch.Tensor] = {}
    for p in paths:
        state = torch.load(p, map_location="cpu", weights_only=True)["model"]
        for k, v in state.items():
            if v.is_floating_point():
                avg[k] = avg.get(k, 0) + v.double() / len(paths)
            else:
                avg[k] = v
    return {k: v.float() if v.is_floating_point() else v for k, v in avg.items()}


# --------------------------------------------------------------------------- loop


# train.select_by -> the history key that ranks epochs for the final average (lower is better).
SELECT_BY = {"loss": "valid_loss", "wer": "valid_wer", "cer": "valid_cer"}


@torch.no_grad()
def validate(model, loader, device, use_bf16: bool, tokenizer=None,
             references: dict[str, str] | None = None, subnet=None) -> dict[str, float]:
    """Validation loss and, with ``tokenizer`` and ``references``, greedy-CTC error rates.

    Returns ``{"valid_loss": mean per-utterance loss}``, plus ``valid_wer`` and
    ``valid_cer`` (%, ``allinone.eval.wer.score``: word and whitespace-free character edit
    distance of the greedy CTC hypotheses against ``references``, utterance id -> text, the
    transcripts as ``allinone decode`` scores them: the tokens would spell characters the
    tokenizer never saw as ``<unk>``). The model must then have a CTC head. Under DDP each
    rank scores its shard and the counts are summed. ``subnet``: the system to validate
    (None = the whole model; the trainer passes its strategy's ``validation_subnet``).
    """
    from allinone.eval.ctc_decode import ctc_greedy_batch
    from allinone.eval.wer import score

    model.eval()
    # loss * utterances, utterances, word errors, reference words, char errors, reference chars
    sums = torch.zeros(6, device=device, dtype=torch.float64)
    decode = tokenizer is not None and references is not None
    hyps: dict[str, str] = {}
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"],
                        subnet=subnet, return_ctc_log_probs=decode)
        n = batch["feats"].shape[0]
        sums[0] += out["loss"].double() * n
        sums[1] += n
        if decode:
            best = ctc_greedy_batch(out["ctc_log_probs"], out["enc_lens"])
            hyps.update((u, tokenizer.decode(h)) for u, h in zip(batch["utt_ids"], best))
    refs = {u: references[u] for u in hyps}
    if any(r.split() for r in refs.values()):
        result = score(refs, hyps)
        sums[2:] += torch.tensor([result.errors, result.ref_words, result.char_errors, result.ref_chars],
                                 device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    loss, n, word_err, words, char_err, chars = sums.tolist()
    metrics = {"valid_loss": loss / max(n, 1.0)}
    if decode:  # NaN when the references hold no words (the rate is undefined)
        metrics["valid_wer"] = 100.0 * word_err / words if words else math.nan
        metrics["valid_cer"] = 100.0 * char_err / chars if chars else math.nan
    return metrics


def has_ctc_head(model) -> bool:
    """Whether greedy CTC can decode ``model`` (a wav2vec2 model always has one)."""
    return getattr(model, "ctc", True) is not None


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: ExperimentConfig, resume: bool = False) -> Path:
    """Train the model of ``cfg``; returns the directory of the final (averaged) model."""
    from allinone.models.saved import save_model_dir
    from allinone.train.config import model_kind
    from allinone.train.strategies import build_strategy

    if cfg.train.select_by not in SELECT_BY:
        raise ValueError(f"train.select_by={cfg.train.select_by!r}; expected one of {', '.join(SELECT_BY)}")
    if cfg.train.sortagrad_epochs < 0:
        raise ValueError(f"train.sortagrad_epochs={cfg.train.sortagrad_epochs} must be >= 0")
    select_key = SELECT_BY[cfg.train.select_by]
    # What can be checked without reading audio is checked before exp_dir is written to.
    for key, d in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        missing = [f for f in ("wav.scp", "text") if not (Path(d) / f).is_file()]
        if missing:
            raise ValueError(f"{key}={d}: not a data directory (no {' or '.join(missing)})")
    if cfg.train.compile:
        from torch._dynamo import list_backends

        if cfg.train.compile not in list_backends(exclude_tags=()):
            raise ValueError(f"train.compile={cfg.train.compile!r} is not a torch.compile backend; "
                             f"known: {', '.join(list_backends(exclude_tags=()))}")
    check_model_config(cfg)
    exp_dir = Path(cfg.exp_dir)
    rank, world, _ = dist_info()
    device = pick_device(cfg.train.device)
    init_distributed(device.type)
    is_main = rank == 0
    exp_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(exp_dir / "train.log" if is_main else None)
    if not is_main:
        logger.setLevel(logging.WARNING)
    ckpt_path = exp_dir / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another exp_dir")
    if is_main:
        with atomic_open(exp_dir / "config.yaml") as f:
            f.write(config_to_yaml(cfg))
    seed_everything(cfg.train.seed)

    # Rank 0 prepares tokenizer, features and statistics first; the others then read the caches.
    if world > 1 and not is_main:
        dist.barrier()
    tokenizer, train_set, valid_set, stats = prepare_data(cfg, exp_dir)
    if world > 1 and is_main:
        dist.barrier()

    model = build_model(cfg, tokenizer.vocab_size, stats).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, vocabulary %d (%s)", n_params / 1e6, tokenizer.vocab_size,
                cfg.tokenizer.kind)
    # Built before the optimizer: the mixed_precision strategy adds its logits to the model.
    strategy = build_strategy(cfg.supernet, model, seed=cfg.train.seed, base_lr=cfg.optim.lr)
    ddp_model = DistributedDataParallel(model, find_unused_parameters=strategy.skips_parameters) \
        if world > 1 else model
    if cfg.train.compile:
        # Compiles the module that the strategies call; checkpoints still come from ``model``
        # (no "_orig_mod." prefixes). dynamic=True: batch and length change every step.
        # Inductor's layout optimisation re-strides convolution activations with concrete
        # strides in the backward graph, which recompiles for every new length; off, one graph
        # serves all lengths (tests/test_compile_dynamic.py).
        options = {"layout_optimization": False} if cfg.train.compile == "inductor" else None
        ddp_model = torch.compile(ddp_model, backend=cfg.train.compile, dynamic=True, options=options)
        logger.info("training forward compiled with torch.compile(backend=%r)", cfg.train.compile)
    # Fused AdamW takes a ``found_inf`` flag (the mechanism torch's GradScaler uses): a step with
    # a non-finite gradient norm is skipped on the device, without reading the norm back
    # (a host sync per step that would stall the next step's kernel launches).
    optim = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                              fused=True)
    waveforms = model_kind(cfg.model) == "wav2vec2"
    specaug = build_specaug(cfg) if cfg.specaug.enabled and not waveforms else None
    if cfg.specaug.enabled and waveforms:
        logger.info("specaug is for fbank features: not applied to the waveforms of a wav2vec2 model")
    use_bf16 = cfg.train.bf16 and device.type == "cuda"

    budget = cfg.train.max_samples if waveforms else cfg.train.max_frames
    train_loader, train_sampler = make_loader(train_set, budget, True, cfg.train.seed, specaug,
                                              cfg.train.loader_workers, cfg.train.sortagrad_epochs)
    valid_loader, _ = make_loader(valid_set, budget, False, cfg.train.seed)
    # Greedy CTC decoding of the validation set every epoch (error rates in the log and history).
    valid_texts = {u.utt_id: u.text for u in valid_set.utts} if has_ctc_head(model) else None
    if select_key != "valid_loss" and valid_texts is None:
        raise ValueError(f"train.select_by={cfg.train.select_by} needs a CTC head to decode the validation "
                         "set; this model has ctc_weight=0")

    state = {"epoch": 0, "step": 0, "history": [], "elapsed_s": 0.0}
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"])
        # A run recorded before valid_wer / valid_cer existed cannot be ranked by them: refuse
        # now rather than after another epoch of training.
        best_epochs(state["history"], 1, select_key)
        logger.info("resumed from %s at epoch %d, step %d", ckpt_path, state["epoch"], state["step"])

    def save_checkpoint(batch_in_epoch: int) -> None:
        if is_main:
            atomic_torch_save({"model": model.state_dict(), "optim": optim.state_dict(),
                               "state": {**state, "batch_in_epoch": batch_in_epoch},
                               "rng": torch.get_rng_state()}, ckpt_path)

    skipped = torch.zeros((), device=device)  # updates skipped since the last count_skipped()

    def count_skipped() -> None:
        nonlocal skipped
        n = int(skipped.item())
        if n:
            state["skipped_steps"] = state.get("skipped_steps", 0) + n
            logger.warning("%d update(s) before step %d skipped: non-finite gradient norm", n, state["step"])
            skipped = torch.zeros((), device=device)

    accum = cfg.optim.accum_grad
    start_time = time.time() - state["elapsed_s"]
    done = False
    for epoch in range(state["epoch"], cfg.train.max_epochs):
        train_sampler.set_epoch(epoch)
        skip = state.get("batch_in_epoch", 0) if epoch == state["epoch"] else 0
        model.train()
        bar = tqdm(total=len(train_sampler), initial=skip, desc=f"epoch {epoch + 1}", disable=not is_main,
                   dynamic_ncols=True, leave=False)
        window = {"utts": 0, "t": time.time()}
        for i, batch in enumerate(train_loader):
            if i < skip:
                continue  # resuming mid-epoch: the sampler's order is deterministic per epoch
            # (SpecAugment was applied at collation, on the CPU batch: on the GPU it would be
            # hundreds of tiny kernels and a host sync, lengths.tolist(), per step.)
            batch = to_device(batch, device)
            sync = (i + 1) % accum == 0
            logs = strategy.step(ddp_model, model, batch, use_bf16=use_bf16, loss_scale=1.0 / accum,
                                 sync_grads=sync or world == 1)
            window["utts"] += batch["feats"].shape[0]
            if not sync:
                continue
            factor = warmup_lr(state["step"] + 1, cfg.optim.warmup_steps)
            lr = cfg.optim.lr * factor
            set_learning_rates(optim, cfg.optim.lr, factor)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optim.found_inf = (~torch.isfinite(grad_norm)).float()
            optim.step()  # a no-op on the device when found_inf is 1
            skipped = skipped + optim.found_inf
            optim.zero_grad(set_to_none=True)
            state["step"] += 1
            bar.update(accum)
            if state["step"] % cfg.train.log_every == 0:
                count_skipped()
                dt = time.time() - window["t"]
                msg = " ".join(f"{k}={float(v):.3f}" for k, v in logs.items())
                bar.set_postfix_str(f"{msg} lr={lr:.2e}")
                logger.info("epoch %d step %d %s lr=%.2e %.1f utt/s", epoch + 1, state["step"], msg, lr,
                            window["utts"] * world / max(dt, 1e-9))
                window = {"utts": 0, "t": time.time()}
            if state["step"] % cfg.train.save_every_steps == 0:
                state["elapsed_s"] = time.time() - start_time
                count_skipped()
                save_checkpoint(i + 1)
            out_of_time = False
            if cfg.train.time_limit_minutes and state["step"] % cfg.train.log_every == 0:
                # Ranks must agree on stopping, or DDP would wait forever for the one that went on.
                flag = torch.tensor(float(time.time() - start_time > 60 * cfg.train.time_limit_minutes),
                                    device=device)
                if dist.is_initialized():
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            if (cfg.train.max_steps and state["step"] >= cfg.train.max_steps) or out_of_time:
                done = True
                break
        bar.close()
        count_skipped()
        metrics = validate(ddp_model, valid_loader, device, use_bf16, tokenizer, valid_texts,
                           strategy.validation_subnet(model))
        state["history"].append({"epoch": epoch + 1, "step": state["step"], **metrics})
        state["epoch"] = epoch + 1
        state["batch_in_epoch"] = 0
        state["elapsed_s"] = time.time() - start_time
        logger.info("epoch %d done: %s (%.0f s so far, %d updates skipped for non-finite gradients)",
                    epoch + 1, " ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items()),
                    state["elapsed_s"], state.get("skipped_steps", 0))
        if is_main:
            atomic_torch_save({"model": model.state_dict()}, exp_dir / f"epoch{epoch + 1}.pt")
            prune_epoch_checkpoints(exp_dir, state["history"], cfg.train.keep_best, select_key)
        save_checkpoint(0)
        if done:
            break

    final_dir = exp_dir / "final"
    if is_main:
        best = best_epochs(saved_epochs(exp_dir, state["history"]), cfg.train.keep_best, select_key)
        paths = [exp_dir / f"epoch{h['epoch']}.pt" for h in best]
        model.load_state_dict(average_checkpoints(paths))
        if hasattr(strategy, "finalize"):  # e.g. mixed precision: allocation.json, timing.json
            strategy.finalize(model, exp_dir, train_seconds=state["elapsed_s"], world_size=world)
        save_model_dir(final_dir, model, front_end_config(cfg), tokenizer,
                       extra={"averaged_epochs": [h["epoch"] for h in best], "selected_by": select_key,
                              "train_seconds": state["elapsed_s"], "steps": state["step"]})
        with atomic_open(exp_dir / "history.json") as f:
            json.dump(state["history"], f, indent=1)
        logger.info("averaged epochs %s -> %s", [h["epoch"] for h in best], final_dir)
    if dist.is_initialized():
        dist.barrier()
        # DDP's reducer holds the process group: free it while the interpreter is fully alive, since
        # a gloo group torn down during interpreter shutdown can abort the process (SIGABRT,
        # "terminate called without an active exception": seen once in CI on rank 1 at exit).
        del ddp_model
        gc.collect()
        dist.destroy_process_group()
    return final_dir


def build_specaug(cfg: ExperimentConfig):
    from allinone.data.specaug import SpecAugment

    a = cfg.specaug
    return SpecAugment(num_freq_masks=a.num_freq_masks, freq_mask_width=a.freq_mask_width,
                       num_time_masks=a.num_time_masks, time_mask_width_ratio=a.time_mask_width_ratio,
                       time_warp_window=a.time_warp, seed=cfg.train.seed)


def fbank_config(cfg: ExperimentConfig):
    from allinone.data.features import FbankConfig

    return FbankConfig(**asdict(cfg.data.fbank))


def front_end_config(cfg: ExperimentConfig):
    """What the model reads: ``FbankConfig``, or for ``model.kind: wav2vec2`` a
    ``WaveformConfig`` at ``data.fbank.sample_rate``."""
    from allinone.data.dataset import WaveformConfig
    from allinone.train.config import model_kind, wav2vec2_section

    if model_kind(cfg.model) == "wav2vec2":
        return WaveformConfig(cfg.data.fbank.sample_rate, wav2vec2_section(cfg.model).normalize_waveform)
    return fbank_config(cfg)


def best_epochs(history: list[dict], keep: int, key: str = "valid_loss") -> list[dict]:
    """The ``keep`` history entries with the lowest ``key``.

    Ties are broken by the lower validation loss, then the earlier epoch: a model that does
    not recognise anything yet scores 100% WER every epoch, and of those the loss still
    tells which epochs learned most (the earliest would be the worst).
    """
    missing = [h["epoch"] for h in history if key not in h]
    if missing:
        raise ValueError(f"epochs {missing} of this run have no {key!r} to be ranked by "
                         "(resumed from a run that did not record it?): choose another train.select_by")
    # NaN (an undefined rate) ranks last.
    def rank(h: dict) -> tuple:
        loss = h.get("valid_loss", math.inf)
        return math.isnan(h[key]), h[key], math.isnan(loss), loss, h["epoch"]

    return sorted(history, key=rank)[:keep]


def saved_epochs(exp_dir: Path, history: list[dict]) -> list[dict]:
    """The history entries whose epoch checkpoint is still on disk.

    Ranking only these keeps a resumed run consistent with the pruning done before it
    (an earlier version, or another ``keep_best``, may have pruned by another order).
    """
    return [h for h in history if (exp_dir / f"epoch{h['epoch']}.pt").is_file()]


def prune_epoch_checkpoints(exp_dir: Path, history: list[dict], keep: int, key: str = "valid_loss") -> None:
    """Keep only the epoch checkpoints that can still be among the best ``keep``."""
    best = {h["epoch"] for h in best_epochs(saved_epochs(exp_dir, history), keep, key)}
    for h in history:
        if h["epoch"] not in best:
            (exp_dir / f"epoch{h['epoch']}.pt").unlink(missing_ok=True)


__all__ = ["train", "validate", "best_epochs", "SELECT_BY", "warmup_lr", "average_checkpoints", "prepare_data",
           "build_model", "build_wav2vec2", "load_pretrained_wav2vec2", "param_groups", "set_learning_rates",
           "front_end_config"]
