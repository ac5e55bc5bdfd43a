"""The paired agreement difference that the real-model GPU test uses to judge "within noise"."""

import random

import pytest

from freekv_sglang.testing.teacher_forcing import agreement, agreement_difference


def _flip(seq, p, rng, vocab=50):
    return [rng.randrange(vocab) if rng.random() < p else t for t in seq]


def test_difference_is_the_difference_of_agreements_and_its_error_shrinks_with_steps():
    rng = random.Random(0)
    ref = [rng.randrange(50) for _ in range(4000)]
    a1, b1, a2, b2 = (_flip(ref, p, rng) for p in (0.08, 0.03, 0.08, 0.0))
    mean, se = agreement_difference(a1, b1, a2, b2)
    assert mean == pytest.approx(agreement(a1, b1) - agreement(a2, b2))
    _, se_short = agreement_difference(a1[:400], b1[:400], a2[:400], b2[:400])
    assert 0 < se < se_short
    # bf16-like flips on both sides: equal within a few standard errors
    assert abs(mean) < 4 * se


def test_a_real_loss_of_agreement_stands_out_of_the_noise():
    rng = random.Random(1)
    ref = [rng.randrange(50) for _ in range(1500)]
    dense_s, dense_c = _flip(ref, 0.03, rng), _flip(ref, 0.0, rng)
    fk_c = _flip(ref, 0.08, rng)
    fk_s = _flip(fk_c, 0.06, rng)  # the server's FreeKV strays 6% further from dense than its reference
    mean, se = agreement_difference(fk_s, dense_s, fk_c, dense_c)
    assert mean < -3 * se


def test_bad_lengths():
    with pytest.raises(ValueError):
        agreement_difference([1], [1, 2], [1], [1])
    with pytest.raises(ValueError):
        agreement_difference([], [], [], [])
