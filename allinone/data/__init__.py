"""Data pipeline: Kaldi data dirs, audio, fbank/CMVN, SpecAugment, tokenizers, batching, corpora."""

from allinone.data.audio import audio_info, load_audio, speed_perturb
from allinone.data.corpora import fsdd_connected_digits, librispeech_to_data_dir
from allinone.data.dataset import (
    ASRDataset,
    BucketBatchSampler,
    FeatureDict,
    WaveformConfig,
    collate,
    extract_features,
    speed_perturb_utts,
)
from allinone.data.features import (
    FbankConfig,
    compute_cmvn_stats,
    compute_fbank,
    compute_fbank_batch,
    load_cmvn_stats,
    mel_filterbank,
    save_cmvn_stats,
)
from allinone.data.kaldi import DataError, Utterance, UtteranceList, parse_wav_entry, read_data_dir, write_data_dir
from allinone.data.specaug import SpecAugment
from allinone.data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "ASRDataset", "BucketBatchSampler", "CharTokenizer", "DataError", "FbankConfig", "FeatureDict",
    "SentencePieceTokenizer", "SpecAugment", "Tokenizer", "Utterance", "UtteranceList", "WaveformConfig", "audio_info",
    "collate", "compute_cmvn_stats", "compute_fbank", "compute_fbank_batch", "extract_features",
    "fsdd_connected_digits", "librispeech_to_data_dir", "load_audio", "load_cmvn_stats", "load_tokenizer",
    "mel_filterbank", "parse_wav_entry", "read_data_dir", "save_cmvn_stats", "speed_perturb",
    "speed_perturb_utts", "train_tokenizer", "write_data_dir",
]
