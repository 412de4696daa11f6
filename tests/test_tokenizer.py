"""SentencePiece and byte tokenizers: lossless round trips, fixed special ids, save/load."""

import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from transformer.data import load_corpus, split_documents
from transformer.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, ByteTokenizer, Tokenizer,
                                   load_tokenizer)

TRICKY = [
    "", "\n", "\n\n\n", "  two leading spaces", "trailing  \n", "tab\tand\r\nCRLF",
    "HAMLET:\nTo be, or not to be: that is the question:\n\nOPHELIA:\n",
    "emoji 😀🎭 and 中文字符, Ελληνικά, עברית", "\u2581 the SentencePiece space mark \u2581\u2581",
    "ﬁ ligature and e\u0301 combining", "\x00 nul \x7f del", "a" * 5000,
]


@pytest.fixture(scope="module")
def corpus():
    return split_documents(load_corpus(), 0.1, seed=0)


@pytest.fixture(scope="module")
def bpe(corpus):
    start = time.perf_counter()
    tok = Tokenizer.train(corpus[0], vocab_size=2048, model_type="bpe")
    tok.train_seconds = time.perf_counter() - start
    return tok


def test_bpe_trains_in_seconds_with_fixed_special_ids(bpe):
    assert bpe.train_seconds < 20
    assert bpe.vocab_size == len(bpe) == 2048
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert bpe.id_to_piece(4) == "\n"


def test_round_trip_on_held_out_plays(bpe, corpus):
    text = "".join(d.text for d in corpus[1])
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert not {PAD_ID, BOS_ID, EOS_ID, UNK_ID} & set(ids)
    assert 2.0 < len(text) / len(ids) < 5.0          # real subwords, not bytes


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert UNK_ID not in ids and bpe.decode(ids) == text


def test_bos_eos_and_decode_skips_specials(bpe):
    ids = bpe.encode("Exit.\n", add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert bpe.decode(ids) == "Exit.\n"
    assert bpe.decode(torch.tensor(ids)) == "Exit.\n"
    with pytest.raises(ValueError, match="2048"):
        bpe.decode([5, 2048])
    with pytest.raises(TypeError, match="str"):
        bpe.encode(b"bytes")


def test_save_load_and_errors(bpe, tmp_path):
    path = bpe.save(tmp_path / "tok")
    assert path.name == "tokenizer.model"
    for source in (tmp_path / "tok", path):
        again = Tokenizer.load(source)
        assert again.encode("Good night, sweet prince\n") == bpe.encode("Good night, sweet prince\n")
    assert isinstance(load_tokenizer(tmp_path / "tok"), Tokenizer)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"definitely not a protobuf" * 10)
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer.load(bad)


def test_training_is_deterministic_and_unigram_works(corpus):
    small = corpus[0][:3]
    assert Tokenizer.train(small, 600)._proto == Tokenizer.train(small, 600)._proto
    uni = Tokenizer.train(small, 600, model_type="unigram", out_dir=None)
    text = "Now is the winter of our discontent\n\n  😀"
    assert uni.decode(uni.encode(text)) == text
    assert Tokenizer.train(["just one string\nwith two lines"] * 50, 300).vocab_size == 300
    with pytest.raises(ValueError, match="model_type='wordpiece'"):
        Tokenizer.train(small, 600, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(small, 100)


def test_byte_tokenizer(tmp_path):
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.encode("A") == [ord("A") + 4]
    assert tok.encode("中", add_bos=True, add_eos=True) == [1] + [b + 4 for b in "中".encode()] + [2]
    assert tok.decode([1, 4 + 0xE4, 2]) == "\ufffd"            # half a character: replaced, no crash
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(ValueError, match="260"):
        tok.decode([260])
    (tmp_path / "x.json").write_text('{"type": "words"}')
    with pytest.raises(ValueError, match="expected a ByteTokenizer"):
        ByteTokenizer.load(tmp_path / "x.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(tmp_path / "empty")
