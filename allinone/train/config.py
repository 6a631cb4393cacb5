"""Experiment configuration: plain dataclasses, read from YAML with command-line overrides.

A config file is omegaconf YAML whose keys mirror these dataclasses; unknown keys are an
error (a typo must not silently fall back to a default). ``model`` stays a plain dict and
is turned into :class:`allinone.models.asr.ASRModelConfig` once the vocabulary is known,
or, with ``model.kind: wav2vec2``, read as a :class:`Wav2Vec2Section` (a wav2vec2 /
HuBERT CTC model on raw waveforms; docs/wav2vec2.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from allinone.utils import read_yaml


@dataclass
class FbankSection:
    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80


@dataclass
class DataSection:
    train: str = "${oc.env:ALLINONE_DATA,../shared/data}/speechocean762/train"
    valid: str = "${oc.env:ALLINONE_DATA,../shared/data}/speechocean762/dev"
    fbank: FbankSection = field(default_factory=FbankSection)
    speed_perturb: list[float] = field(default_factory=lambda: [1.0])
    num_workers: int = 2
    skip_bad: bool = False
    # Where features are cached; shared between experiments with the same data and fbank.
    feat_cache_dir: str = "dump/feats"


@dataclass
class TokenizerSection:
    kind: str = "bpe"  # char | bpe | unigram
    vocab_size: int = 300


@dataclass
class SpecAugSection:
    enabled: bool = True
    time_warp: int = 5
    num_freq_masks: int = 2
    freq_mask_width: int = 27
    num_time_masks: int = 2
    time_mask_width_ratio: float = 0.05


@dataclass
class OptimSection:
    lr: float = 2e-3
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 1000
    grad_clip: float = 5.0
    accum_grad: int = 1


@dataclass
class TrainSection:
    max_epochs: int = 50
    max_frames: int = 20000  # padded input frames per batch (per GPU)
    max_samples: int = 1_600_000  # padded waveform samples per batch (per GPU) of waveform models: 100 s
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    seed: int = 0
    log_every: int = 20
    save_every_steps: int = 500
    keep_best: int = 5  # best-k epoch checkpoints (by ``select_by``) averaged at the end
    # What ranks the epochs for that average: ``loss`` (validation loss), ``wer`` or ``cer``
    # (greedy CTC decoding of the validation set, computed every epoch for models with a CTC
    # head). A CTC model's validation loss turns up (over-confidence) long before its error
    # rate stops falling, so ranking by loss can average epochs that decode worse.
    select_by: str = "loss"
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit); for smoke runs
    # Stop after this much training time (0 = no limit) and still validate, average and save;
    # for fixed-budget comparisons and machines lent for a limited time.
    time_limit_minutes: float = 0.0
    # torch.compile backend for the training forward (null = eager): "inductor" on a GPU fuses the
    # launch-bound elementwise work (docs/benchmarks.md section 5); "aot_eager" checks capture only.
    compile: Optional[str] = None
    # Worker processes that collate training batches and apply SpecAugment (0 = the main
    # process); on a GPU, 2-4 keep that CPU work off the step's critical path.
    loader_workers: int = 0
    # SortaGrad (Amodei et al. 2016; ESPnet1's --sortagrad): the first N epochs take the
    # batches shortest first instead of shuffled, so CTC aligns short utterances before long
    # ones; 0 = always shuffled.
    sortagrad_epochs: int = 0


MODEL_KINDS = ("conformer", "wav2vec2")


@dataclass
class Wav2Vec2Section:
    """``model:`` of a wav2vec2 / HuBERT CTC model (``kind: wav2vec2``).

    wav2vec2: ``Wav2Vec2Config`` fields (``vocab_size`` comes from the tokenizer). With
        ``init_from`` the architecture is the checkpoint's and only dropout / layer-drop
        fields may be given here.
    init_from: a local Hugging Face ``Wav2Vec2ForCTC`` / ``HubertForCTC`` directory or a
        fairseq wav2vec2 / HuBERT checkpoint (pretraining or fine-tuned); the CTC head is
        always new, sized for the tokenizer.
    trust_pickle: let ``init_from`` unpickle a fairseq checkpoint in full (runs code
        from the file; see allinone.interop.fairseq).
    freeze_feature_extractor: the CNN feature extractor gets no gradient (and no optimizer state).
    layer_lr_decay: layer-wise learning-rate decay: transformer layer i (0-based) of L
        trains at lr * decay ** (L - i), the CTC head (and, pre-LN, the final LayerNorm)
        at lr, the feature extractor, projection and positional convolution at
        lr * decay ** (L + 1).  1.0 = one learning rate.
    normalize_waveform: zero-mean unit-variance waveforms per utterance (the front end
        saved with the model applies it at decoding too); true for models pretrained on
        normalised audio (fairseq ``task.normalize``, HF ``do_normalize``: the large/lv60 ones).
    """

    kind: str = "wav2vec2"
    wav2vec2: dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None
    trust_pickle: bool = False
    freeze_feature_extractor: bool = True
    layer_lr_decay: float = 1.0
    normalize_waveform: bool = False


def model_kind(model: dict) -> str:
    """``model.kind`` of a config's model section (default ``conformer``); ``ValueError`` if unknown."""
    kind = model.get("kind", "conformer")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind={kind!r} is not one of {', '.join(map(repr, MODEL_KINDS))}")
    return kind


def wav2vec2_section(model: dict) -> Wav2Vec2Section:
    """The model section of a ``kind: wav2vec2`` config, keys and types checked."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Wav2Vec2Section), OmegaConf.create(dict(model)))
        section = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"invalid model section (kind: wav2vec2): {e}") from None
    if not 0.0 < section.layer_lr_decay <= 1.0:
        raise ValueError(f"model.layer_lr_decay={section.layer_lr_decay} must be in (0, 1]")
    return section


@dataclass
class ExperimentConfig:
    exp_dir: str = "exp/asr"
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    model: dict[str, Any] = field(default_factory=dict)
    specaug: SpecAugSection = field(default_factory=SpecAugSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    # Supernet training strategy (see docs/supernet.md); None trains the plain model.
    supernet: Optional[dict[str, Any]] = None


def load_config(path: str | Path | Sequence[str | Path] | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or several, merged in order: later ones win, as a supernet config
    over its float baseline's), apply ``key=value`` overrides, check keys and types.

    Returns a plain :class:`ExperimentConfig` (interpolations resolved).
    """
    schema = OmegaConf.structured(ExperimentConfig)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"override(s) {', '.join(bad)} lack a value: write key=value, e.g. train.max_steps=100")
    paths = [] if path is None else [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    path = ", ".join(map(str, paths))  # for the error message below
    try:
        parts = [schema]
        for p in paths:
            if not p.is_file():
                raise ValueError(f"config file not found: {p}")
            parts.append(OmegaConf.create(read_yaml(p, "config file") or {}))
        for o in overrides:  # omegaconf reads each value as YAML: name the one that is not
            try:
                parts.append(OmegaConf.from_dotlist([o]))
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ValueError(f"override {o}: the value is not valid YAML ({problem})") from None
        merged = OmegaConf.merge(*parts)
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # One line: the key and omegaconf's first message line (the rest repeats the key and
        # names internal schema classes), without its traceback.
        key = getattr(e, "full_key", None)
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        raise ValueError(f"invalid config{f' {path}' if path else ''}: {f'{key}: ' if key else ''}{msg}") from None


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
