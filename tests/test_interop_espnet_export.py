"""Export to ESPnet2 experiments, checked by loading them with ESPnet's own ``Speech2Text``."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml

from allinone.data.features import FbankConfig, compute_fbank, load_cmvn_stats
from allinone.data.tokenizer import CharTokenizer
from allinone.eval.ctc_decode import ctc_greedy
from allinone.interop.espnet import export_espnet_asr, load_espnet_asr
from allinone.models import ASRModel, ASRModelConfig, ConformerConfig
from allinone.models.saved import load_model_dir, save_model_dir
from supernet_helpers import VOCAB, randomize_batchnorm, tiny_space, tiny_supernet

pytest.importorskip("espnet2.tasks.asr")
from espnet2.bin.asr_inference import Speech2Text  # noqa: E402
from espnet2.tasks.asr import ASRTask  # noqa: E402

CHARS = list("abcdefghijklmnopq")


def _set_stats(model: ASRModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model.normalize.mean.copy_(torch.randn(model.normalize.mean.shape, generator=g) - 5)
    model.normalize.std.copy_(torch.rand(model.normalize.std.shape, generator=g) * 2 + 0.5)


def _peaked_ctc(model: ASRModel) -> None:
    """Sharpen the CTC posteriors so that ESPnet's beam-1 prefix search is the best path."""
    with torch.no_grad():
        model.ctc.ctc_lo.weight.mul_(100.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random CTC + attention model directory with a char tokenizer."""
    tok = CharTokenizer(["<blank>", "<unk>", *CHARS, "<sos/eos>"])
    torch.manual_seed(0)
    enc = ConformerConfig(input_size=80, output_size=32, attention_heads=4, linear_units=64, num_blocks=2,
                          cnn_module_kernel=7, interctc_layer_idx=[1])
    model = ASRModel(ASRModelConfig(encoder=enc, vocab_size=tok.vocab_size, ctc_weight=0.3, interctc_weight=0.2,
                                    decoder={"attention_heads": 2, "linear_units": 32, "num_blocks": 1}))
    randomize_batchnorm(model)
    _set_stats(model)
    _peaked_ctc(model)
    return save_model_dir(tmp_path_factory.mktemp("allinone") / "model", model.eval(), FbankConfig(), tok)


def _speech2text(exp) -> Speech2Text:
    return Speech2Text(asr_train_config=str(exp / "config.yaml"), asr_model_file=str(exp / "valid.acc.ave.pth"),
                       device="cpu", ctc_weight=1.0, beam_size=1, lm_weight=0.0, penalty=0.0, nbest=1)


def _check_same(ours: ASRModel, exp, fbank: FbankConfig, seconds=(1.0, 0.7)) -> None:
    """(a) encoder output equal within 1e-4 on the same waveform; (b) same greedy CTC tokens."""
    s2t = _speech2text(exp)
    ref = s2t.asr_model
    # Every exported tensor reaches ESPnet's model (it loads with strict=False, so check).
    state = torch.load(exp / "valid.acc.ave.pth", weights_only=True)
    assert set(state) == set(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    for sec in seconds:
        wave = torch.randn(int(sec * fbank.sample_rate), generator=g)
        feats = compute_fbank(wave, fbank)
        with torch.no_grad():
            enc_ref, lens_ref = ref.encode(wave[None], torch.tensor([wave.numel()]))
            enc, lens = ours.encode(feats[None], torch.tensor([feats.size(0)]))
            assert torch.equal(lens, lens_ref)
            assert (enc - enc_ref).abs().max().item() <= 1e-4
            ours_tokens = ctc_greedy(ours.ctc_log_probs(enc)[0])
            espnet_best_path = [int(t) for t in torch.unique_consecutive(ref.ctc.argmax(enc_ref)[0]) if t != 0]
        assert ours_tokens == espnet_best_path
        assert len(ours_tokens) > 0
        text, tokens, token_ids, _ = s2t(wave)[0]  # ESPnet's decoder end to end
        assert token_ids == ours_tokens


def test_export_matches_espnet(model_dir, tmp_path):
    exp = export_espnet_asr(model_dir, tmp_path / "exp")
    loaded = load_model_dir(model_dir)
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["token_list"] == loaded.tokenizer.token_list
    assert (cfg["token_type"], cfg["frontend"], cfg["normalize"], cfg["specaug"]) == ("char", "default",
                                                                                      "global_mvn", None)
    assert cfg["frontend_conf"] == {"fs": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80}
    assert cfg["encoder_conf"]["linear_units"] == 64 and "input_size" not in cfg["encoder_conf"]
    assert cfg["model_conf"]["ctc_weight"] == 0.3 and cfg["decoder"] == "transformer"
    # intermediate CTC is training only: not exported, so Speech2Text returns its plain n-best list
    assert "interctc_weight" not in cfg["model_conf"] and "interctc_layer_idx" not in cfg["encoder_conf"]
    assert set(load_cmvn_stats(exp / "feats_stats.npz")) >= {"count", "sum", "sum_square"}
    assert not list(exp.glob(".*.tmp"))
    _check_same(loaded.model, exp, loaded.fbank)

    # ESPnet's model recomputes our normalisation from the stats file alone.
    ref, _ = ASRTask.build_model_from_file(exp / "config.yaml", None, "cpu")
    assert torch.allclose(ref.normalize.mean.float(), loaded.model.normalize.mean, atol=1e-6)
    assert torch.allclose(ref.normalize.std.float(), loaded.model.normalize.std, atol=1e-6)
    # Our exported mel matrix is ESPnet's.
    assert torch.allclose(ref.frontend.logmel.melmat, torch.load(exp / "valid.acc.ave.pth")["frontend.logmel.melmat"],
                          atol=1e-6)

    # And our importer reads the export back to the same weights.
    back, info = load_espnet_asr(exp)
    assert info["token_list"] == loaded.tokenizer.token_list
    assert info["config"] == dataclasses.replace(
        loaded.model.config, interctc_weight=0.0,
        encoder=dataclasses.replace(loaded.model.config.encoder, interctc_layer_idx=[]))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_self_conditioned_model_exports_with_its_conditioning(tmp_path):
    """Self-conditioned CTC changes the model function, so the export keeps the taps and the
    conditioning layer: ESPnet's model built from the export computes our encoder output, and
    our importer reads it back unchanged."""
    tok = CharTokenizer(["<blank>", "<unk>", *CHARS, "<sos/eos>"])
    torch.manual_seed(0)
    enc = ConformerConfig(input_size=80, output_size=32, attention_heads=4, linear_units=64, num_blocks=2,
                          cnn_module_kernel=7, interctc_layer_idx=[1], interctc_use_conditioning=True)
    model = ASRModel(ASRModelConfig(encoder=enc, vocab_size=tok.vocab_size, ctc_weight=1.0, interctc_weight=0.2))
    randomize_batchnorm(model)
    _set_stats(model)
    src = save_model_dir(tmp_path / "model", model.eval(), FbankConfig(), tok)
    exp = export_espnet_asr(src, tmp_path / "exp")
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["encoder_conf"]["interctc_use_conditioning"] is True and cfg["encoder_conf"]["interctc_layer_idx"] == [1]
    ref, _ = ASRTask.build_model_from_file(exp / "config.yaml", exp / "valid.acc.ave.pth", "cpu")
    assert "encoder.conditioning_layer.weight" in ref.state_dict()
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(1))
    feats = compute_fbank(wave, FbankConfig())
    with torch.no_grad():
        (enc_ref, _), _ = ref.eval().encode(wave[None], torch.tensor([wave.numel()]))
        ours, _ = model.encode(feats[None], torch.tensor([feats.size(0)]))
    assert (ours - enc_ref).abs().max().item() <= 1e-4
    back, info = load_espnet_asr(exp)
    assert info["config"].encoder == model.config.encoder
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.fixture(scope="module")
def supernet_dir(tmp_path_factory):
    tok = CharTokenizer(["<blank>", "<unk>", *CHARS[: VOCAB - 3], "<sos/eos>"])
    model = tiny_supernet()
    _set_stats(model, seed=2)
    _peaked_ctc(model)
    model.search_space = tiny_space().for_model(model.config)
    return save_model_dir(tmp_path_factory.mktemp("allinone") / "supernet", model.eval(), FbankConfig(n_mels=40),
                          tok)


@pytest.mark.parametrize("subnet", ["L2_F24_H4_B32", "L4_F48_H4_B32", None])
def test_export_supernet_subnet(supernet_dir, tmp_path, subnet):
    from allinone.elastic.extract import extract

    exp = export_espnet_asr(supernet_dir, tmp_path / "exp", subnet=subnet)
    loaded = load_model_dir(supernet_dir)
    state = torch.load(exp / "valid.acc.ave.pth", weights_only=True)
    assert not any("quantizer" in k for k in state)
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    if subnet is None:
        ours = copy.deepcopy(loaded.model)
        assert cfg["encoder_conf"]["num_blocks"] == 4
    else:
        ours, _ = extract(loaded.model, loaded.model.search_space.parse(subnet))
        depth, ffn = (2, 24) if subnet.startswith("L2") else (4, 48)
        assert (cfg["encoder_conf"]["num_blocks"], cfg["encoder_conf"]["linear_units"]) == (depth, ffn)
    assert cfg["decoder"] is None and cfg["model_conf"]["ctc_weight"] == 1.0
    _check_same(ours, exp, loaded.fbank)


@pytest.mark.parametrize(
    "subnet, match",
    [
        ("L2_F24_H4_B8", "quantized"),
        ("L4_F48_H2_B32", "head width"),
    ],
)
def test_refused_subnets(supernet_dir, tmp_path, subnet, match):
    with pytest.raises(ValueError, match=match):
        export_espnet_asr(supernet_dir, tmp_path / "exp", subnet=subnet)
    assert not (tmp_path / "exp" / "config.yaml").exists()


def test_refused_packed_quantized_model(supernet_dir, tmp_path):
    from allinone.elastic.extract import extract_to_dirs

    extract_to_dirs(supernet_dir, ["L2_F24_H4_B4"], tmp_path / "packed")
    with pytest.raises(ValueError, match="quantized weights"):
        export_espnet_asr(tmp_path / "packed", tmp_path / "exp")


def test_float_packed_subnet_and_cli(supernet_dir, tmp_path, capsys):
    """An extracted float subnet (stored packed, no low-bit tensors) exports; so does the CLI."""
    from allinone.cli import main
    from allinone.elastic.extract import extract_to_dirs

    extract_to_dirs(supernet_dir, ["L2_F24_H4_B32"], tmp_path / "float")
    loaded = load_model_dir(tmp_path / "float")
    exp = export_espnet_asr(tmp_path / "float", tmp_path / "exp")
    _check_same(loaded.model, exp, loaded.fbank, seconds=(0.8,))

    assert main(["export-espnet", str(supernet_dir), "--out", str(tmp_path / "cli"), "--subnet", "L2_F24_H4_B32"]) == 0
    assert "L2_F24_H4_B32" in capsys.readouterr().out
    a = torch.load(exp / "valid.acc.ave.pth", weights_only=True)
    b = torch.load(tmp_path / "cli" / "valid.acc.ave.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export-espnet", str(supernet_dir), "--out", str(tmp_path / "q"), "--subnet", "L2_F24_H4_B2"]) == 2
    assert "quantized" in capsys.readouterr().err
