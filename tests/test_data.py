import itertools
import math

import numpy as np
import pytest
import torch

from suite.training.data import FileCorpus, MarkovCorpus, make_corpus


def test_batches_are_deterministic_and_seed_dependent():
    c = MarkovCorpus(64)
    a = c.batches(3, 4, 16, seed=5)
    assert a.shape == (3, 4, 17) and a.dtype == torch.long
    assert torch.equal(a, MarkovCorpus(64).batches(3, 4, 16, seed=5))
    assert not torch.equal(a, c.batches(3, 4, 16, seed=6))
    assert not torch.equal(a[:1], c.batches(1, 4, 16, seed=5, split="heldout"))


def test_sequences_follow_the_transition_table():
    c = MarkovCorpus(64, branching=4)
    seqs = c.batches(2, 8, 50, seed=0).flatten(0, 1)
    allowed = {(i, int(j)) for i in range(64) for j in c.successors[i]}
    pairs = {(int(a), int(b)) for s in seqs for a, b in itertools.pairwise(s)}
    assert pairs <= allowed


def test_successors_are_distinct_and_include_plus_one_and_two():
    c = MarkovCorpus(50, branching=6)
    for i, row in enumerate(c.successors.tolist()):
        assert len(set(row)) == 6 and i not in row
        assert {(i + 1) % 50, (i + 2) % 50} <= set(row)
    assert torch.allclose(c.probs.sum(1), torch.ones(50, dtype=torch.float64))


def _dense_transition(c: MarkovCorpus) -> np.ndarray:
    P = np.zeros((c.vocab_size, c.vocab_size))
    for i in range(c.vocab_size):
        for j, p in zip(c.successors[i].tolist(), c.probs[i].tolist(), strict=True):
            P[i, j] += p
    return P


def test_stationary_distribution_solves_pi_p_equals_pi():
    c = MarkovCorpus(40, branching=3)
    P = _dense_transition(c)
    # independent check: the left eigenvector of P for eigenvalue 1
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(abs(w - 1))])
    pi /= pi.sum()
    assert np.allclose(c.stationary.numpy(), pi, atol=1e-10)


def test_loss_floor_equals_brute_force_conditional_entropy():
    """Enumerate every path of length 3 from the stationary start: H(X3 | X1, X2) exactly.

    For a first-order chain that equals the entropy rate that `loss_floor` computes from
    pi and the rows of P; the enumeration never uses that formula.
    """
    c = MarkovCorpus(12, branching=3)
    P = _dense_transition(c)
    pi = c.stationary.numpy()
    joint3 = pi[:, None, None] * P[:, :, None] * P[None, :, :]  # p(x1, x2, x3)
    joint2 = joint3.sum(axis=2)  # p(x1, x2)
    mask = joint3 > 0
    h = -(joint3[mask] * np.log((joint3 / np.where(joint2[..., None] > 0, joint2[..., None], 1))[mask])).sum()
    assert c.loss_floor == pytest.approx(h, abs=1e-9)


def test_empirical_loss_of_the_true_model_approaches_the_floor():
    c = MarkovCorpus(32, branching=4)
    seqs = c.batches(4, 64, 256, seed=1).flatten(0, 1)
    P = _dense_transition(c)
    nll = -np.log(P[seqs[:, :-1].numpy(), seqs[:, 1:].numpy()]).mean()
    assert nll == pytest.approx(c.loss_floor, abs=0.02)
    assert c.loss_floor < math.log(4)


def test_text_file_is_byte_tokens(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(256)) * 4)
    c = FileCorpus(path)
    assert c.vocab_size == 256 and c.loss_floor is None
    b = c.batches(2, 3, 8, seed=0)
    assert b.shape == (2, 3, 9)
    assert ((b[..., 1:] - b[..., :-1]) % 256 == 1).all()  # windows of consecutive bytes
    assert torch.equal(b, FileCorpus(path).batches(2, 3, 8, seed=0))


def test_bin_file_is_uint16_tokens(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    c = FileCorpus(path)
    assert c.vocab_size == 1000
    window = c.batches(1, 1, 10, seed=0)[0, 0]
    assert torch.equal(window, torch.arange(int(window[0]), int(window[0]) + 11))  # contiguous
    with pytest.raises(ValueError, match="does not fit the model's vocabulary of 512"):
        make_corpus(str(path), 512)


@pytest.mark.parametrize(
    "content, seq_len, match",
    [(b"", 8, "empty"), (b"abc" * 10, 8, "fewer than seq_len"), (None, 8, "no such file")],
)
def test_bad_data_files_are_refused(tmp_path, content, seq_len, match):
    path = tmp_path / "d.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        FileCorpus(path).check_fits(seq_len)
