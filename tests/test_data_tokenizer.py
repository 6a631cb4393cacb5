"""Tokenizers: ESPnet token-list layout, round trips, save/load, deterministic training."""

import pytest

from allinone.data import CharTokenizer, SentencePieceTokenizer, load_tokenizer, read_data_dir, train_tokenizer


@pytest.fixture(scope="module")
def texts(data_root):
    return [u.text for u in read_data_dir(data_root / "speechocean762" / "dev")]


def _check_layout(tok):
    assert tok.token_list[0] == "<blank>" and tok.token_list[1] == "<unk>"
    assert tok.token_list[-1] == "<sos/eos>" and tok.vocab_size == len(tok.token_list)
    assert len(set(tok.token_list)) == tok.vocab_size


def test_char_round_trip_and_espnet_conventions(texts, tmp_path):
    tok = train_tokenizer(texts, "char", None, tmp_path / "char")
    _check_layout(tok)
    assert "<space>" in tok.token_list and " " not in tok.token_list
    # ESPnet orders tokens by frequency: the space is the most frequent character.
    assert tok.token_list[2] == "<space>"
    for text in texts[:50]:
        ids = tok.encode(text)
        assert all(0 < i < tok.vocab_size - 1 for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("A#") == [tok.token_to_id["A"], 1]  # unknown -> <unk>
    assert tok.decode([0, tok.token_to_id["A"], 0, tok.vocab_size - 1, -1]) == "A"
    loaded = load_tokenizer(tmp_path / "char")
    assert isinstance(loaded, CharTokenizer) and loaded.token_list == tok.token_list


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_round_trip_save_load_deterministic(texts, tmp_path, kind):
    tok = train_tokenizer(texts, kind, 60, tmp_path / "a")
    _check_layout(tok)
    assert tok.vocab_size == 60
    for text in texts[:50]:
        assert tok.decode(tok.encode(text)) == text
    loaded = load_tokenizer(tmp_path / "a")
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(texts[0]) == tok.encode(texts[0])
    again = train_tokenizer(texts, kind, 60, tmp_path / "b")
    assert (tmp_path / "a" / "sentencepiece.model").read_bytes() == (tmp_path / "b" / "sentencepiece.model").read_bytes()
    assert again.token_list == tok.token_list


def test_sentencepiece_training_is_quiet(texts, capfd):
    train_tokenizer(texts[:100], "unigram", 40)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_errors(texts, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer(texts, "wordpiece", 100)
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_tokenizer(texts[:20], "bpe", 100000)
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="token list must start"):
        CharTokenizer(["a", "<unk>", "<sos/eos>"])
