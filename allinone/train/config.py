"""Experiment configuration: plain dataclasses, read from YAML with command-line overrides.

A config file is omegaconf YAML whose keys mirror these dataclasses; unknown keys are an
error (a typo must not silently fall back to a default). ``model`` stays a plain dict and
is turned into :class:`allinone.models.asr.ASRModelConfig` once the vocabulary is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


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
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    seed: int = 0
    log_every: int = 20
    save_every_steps: int = 500
    keep_best: int = 5  # best-k (by validation loss) epoch checkpoints averaged at the end
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit); for smoke runs
    # Stop after this much training time (0 = no limit) and still validate, average and save;
    # for fixed-budget comparisons and machines lent for a limited time.
    time_limit_minutes: float = 0.0


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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply ``key=value`` overrides, check keys and types.

    Returns a plain :class:`ExperimentConfig` (interpolations resolved).
    """
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        parts = [schema]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"config file not found: {path}")
            parts.append(OmegaConf.load(path))
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*parts)
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # omegaconf's message names the key and the expected type; drop its traceback.
        raise ValueError(f"invalid config{f' {path}' if path else ''}: {e}") from None


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
