"""Training a draft on text its target wrote: ``teacher_continuations`` and ``MixedBatches``.

What is checked:

* the teacher's sequences start with a window of the training stream, continue with exactly
  the teacher's own greedy tokens (temperature-0 group), are reproducible from the seed, and
  are split evenly over the temperatures;
* a mixed batch holds whole teacher sequences in its first rows and stream windows in the
  rest, ``y`` is ``x`` shifted by one, and a saved state resumes the same batches;
* bad arguments get errors that name them.

train.py's ``--teacher-samples`` (including an exact resume) is tested end to end in
tests/test_train_generate.py.
"""

import pytest
import torch

from helpers import tiny_decoder
from transformer import training as T
from transformer.data import MixedBatches, TokenDataset


@pytest.fixture(scope="module")
def teacher():
    return tiny_decoder("gqa", "rope", seed=3)


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 61, (500,), generator=torch.Generator().manual_seed(0))


def _is_window(row: torch.Tensor, stream: torch.Tensor) -> bool:
    return bool((stream.unfold(0, len(row), 1) == row).all(-1).any())


def test_greedy_group_is_the_teachers_own_continuation(teacher, stream):
    seqs = T.teacher_continuations(teacher, stream, 5, 20, prompt_len=6, temperatures=[0.0], batch_size=2)
    assert seqs.shape == (5, 20) and seqs.dtype == torch.long
    for row in seqs:
        assert _is_window(row[:6], stream)                       # the prompt: real training text
        expected = teacher.generate(row[None, :6], 14, eos_token_id=None)[0]
        assert torch.equal(row, expected)                        # the rest: what the teacher says


def test_sequences_are_seeded_and_split_over_temperatures(teacher, stream):
    temps = (0.0, 1.0, 5.0)
    a = T.teacher_continuations(teacher, stream, 7, 16, prompt_len=4, temperatures=temps, seed=11, batch_size=3)
    b = T.teacher_continuations(teacher, stream, 7, 16, prompt_len=4, temperatures=temps, seed=11, batch_size=3)
    c = T.teacher_continuations(teacher, stream, 7, 16, prompt_len=4, temperatures=temps, seed=12, batch_size=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # 7 = 3 greedy + 2 at T=1 + 2 at T=5: the greedy ones are deterministic continuations of
    # their prompts, the sampled ones (almost surely) are not.
    greedy = teacher.generate(a[:, :4], 12, eos_token_id=None)
    same = (greedy == a).all(-1).tolist()
    assert same[:3] == [True] * 3 and not all(same[3:])
    seen = []
    T.teacher_continuations(teacher, stream, 7, 16, prompt_len=4, temperatures=temps, batch_size=3,
                            progress=seen.append)
    assert seen[-1] == 7 and seen == sorted(seen)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num=0), "num must be a positive int, got 0"),
    (dict(length=4, prompt_len=4), "prompt_len=4 must be < length=4"),
    (dict(temperatures=[]), "temperatures must be a non-empty list"),
    (dict(temperatures=[0.0, -1.0]), "temperatures must be a non-empty list of numbers >= 0"),
    (dict(batch_size=True), "batch_size must be a positive int, got True"),
])
def test_teacher_continuations_errors(teacher, stream, kwargs, match):
    args = dict(num=2, length=8, prompt_len=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        T.teacher_continuations(teacher, stream, args.pop("num"), args.pop("length"), **args)


def test_mixed_batches_rows_shapes_and_resume(stream):
    seqs = torch.randint(100, 200, (9, 13), generator=torch.Generator().manual_seed(1))  # ids the stream lacks
    data = MixedBatches(TokenDataset(stream, 16, 5, seed=2), seqs, rows=3, seed=4)
    x, y = data.next_batch()
    assert x.shape == y.shape == (5, 12)
    assert torch.equal(x[:, 1:], y[:, :-1])                      # y is x shifted by one token
    for i in range(3):                                           # whole teacher sequences first
        assert any(torch.equal(torch.cat([x[i], y[i, -1:]]), s) for s in seqs)
    for i in range(3, 5):                                        # then stream windows, cut to 12
        assert _is_window(torch.cat([x[i], y[i, -1:]]), stream)
    state = data.state_dict()
    expected = [data.next_batch() for _ in range(3)]
    again = MixedBatches(TokenDataset(stream, 16, 5, seed=99), seqs, rows=3, seed=98)
    again.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (again.next_batch() for _ in range(3))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    # rows=0: the stream's own batch, cut to the sequence length
    plain = MixedBatches(TokenDataset(stream, 16, 5, seed=2), seqs, rows=0)
    ref = TokenDataset(stream, 16, 5, seed=2).next_batch()[0]
    assert torch.equal(plain.next_batch()[0], ref[:, :12])
    with pytest.raises(ValueError, match="resuming needs the same mix"):
        MixedBatches(TokenDataset(stream, 16, 5), seqs, rows=2).load_state_dict(state)


@pytest.mark.parametrize("seqs, rows, match", [
    (torch.zeros(3, 8, dtype=torch.long), 6, r"rows must be an int in \[0, batch_size=5\], got 6"),
    (torch.zeros(3, 8), 1, r"sequences must be a \(N >= 1, L >= 2\) LongTensor, got \(3, 8\)"),
    (torch.zeros(3, 1, dtype=torch.long), 1, "LongTensor"),
    (torch.zeros(3, 40, dtype=torch.long), 1, "longer than the stream's block_size=16"),
])
def test_mixed_batches_errors(stream, seqs, rows, match):
    with pytest.raises(ValueError, match=match):
        MixedBatches(TokenDataset(stream, 16, 5), seqs, rows)
