"""The greedy comparison used by the GPU server tests: equal up to rounding, or not."""

import math

import pytest

from freekv_sglang.testing.greedy_compare import (
    GreedyTrace,
    compare_greedy,
    compare_runs,
)


def trace(tokens, logprobs=None, gaps=None, runner_up=None):
    """Steps where ``tokens[i]`` has ``logprobs[i]`` and the runner-up ``runner_up[i]`` (default 999) is
    ``gaps[i]`` below it."""
    n = len(tokens)
    lps, gs, ru = list(logprobs or [-1.0] * n), list(gaps or [2.0] * n), list(runner_up or [999] * n)
    return GreedyTrace(list(tokens), lps, [[(t, lp), (r, lp - g)] for t, lp, g, r in zip(tokens, lps, gs, ru)])


def test_identical_runs_agree():
    a = trace([5, 6, 7], [-0.5, -1.0, -0.2])
    r = compare_greedy(a, a)
    assert r.ok and r.prefix == 3 and r.gap_at_divergence is None and r.max_logprob_diff == 0


def test_split_at_a_tie_after_close_logprobs_agrees():
    a = trace([5, 6, 7, 8], [-0.5, -1.0, -0.70, -0.2], [2.0, 1.5, 0.0, 1.0], runner_up=[1, 1, 9, 1])
    b = trace([5, 6, 9, 3], [-0.52, -0.95, -0.66, -4.0], [2.0, 1.5, 0.06, 3.0], runner_up=[1, 1, 7, 1])
    r = compare_greedy(a, b)
    assert r.ok and r.prefix == 2 and math.isclose(r.gap_at_divergence, 0.0)


def test_split_where_the_choice_was_clear_differs():
    a = trace([5, 6, 7], [-0.1, -0.1, -0.2], gaps=[2.0, 2.0, 1.2], runner_up=[1, 1, 9])
    b = trace([5, 6, 9], [-0.1, -0.1, -0.2], gaps=[2.0, 2.0, 1.2], runner_up=[1, 1, 7])
    r = compare_greedy(a, b)
    assert not r.ok and "top-two log-probabilities differ" in r.reason and r.prefix == 2
    a = trace([5, 7], [-0.1, -0.70], gaps=[2.0, 0.10], runner_up=[1, 9])
    b = trace([5, 9], [-0.1, -0.72], gaps=[2.0, 0.06], runner_up=[1, 7])  # swapped, each within 0.08
    assert compare_greedy(a, b).ok
    assert "not a near-tie" in compare_greedy(a, b, tie_tol=0.01).reason


def test_split_between_other_candidates_differs():
    """A different context: a small gap, but not between the same two tokens."""
    a = trace([5, 7], [-0.1, -0.7], gaps=[2.0, 0.05], runner_up=[1, 8])
    b = trace([5, 9], [-0.1, -0.7], gaps=[2.0, 0.05], runner_up=[1, 7])
    r = compare_greedy(a, b)
    assert not r.ok and "two most likely tokens differ" in r.reason


def test_same_tokens_with_moved_logprobs_differ():
    a = trace([5, 6, 7], [-0.5, -1.0, -0.2])
    b = trace([5, 6, 7], [-0.5, -1.4, -0.2])
    r = compare_greedy(a, b)
    assert not r.ok and "log-probabilities" in r.reason and r.prefix == 3


def test_lengths_must_match():
    assert not compare_greedy(trace([1, 2]), trace([1])).ok


def test_from_response_reads_sglang_meta_info():
    resp = {"meta_info": {"output_token_logprobs": [[-0.1, 11, None], [-0.7, 12, None]],
                          "output_top_logprobs": [[[-0.1, 11, None], [-2.5, 40, None]],
                                                  [[-0.7, 12, None], [-0.8, 13, None]]]}}
    t = GreedyTrace.from_response(resp)
    assert t.tokens == [11, 12] and t.logprobs == [-0.1, -0.7]
    assert t.gaps == pytest.approx([2.4, 0.1]) and t.top[1] == [(12, -0.7), (13, -0.8)]


def test_from_response_without_logprobs_says_how_to_ask():
    with pytest.raises(ValueError, match="top_logprobs_num"):
        GreedyTrace.from_response({"meta_info": {"output_ids": [1, 2]}})


def test_nan_logprobs_never_agree():
    nan = float("nan")
    a = trace([5, 6], [-0.1, nan])
    assert not compare_greedy(a, a).ok
    b = trace([5, 7], [-0.1, nan], gaps=[2.0, nan], runner_up=[1, 6])
    c = trace([5, 6], [-0.1, nan], gaps=[2.0, nan], runner_up=[1, 7])
    assert not compare_greedy(b, c).ok


def test_runs_agree_when_every_prompt_agrees_and_the_mean_is_small():
    a = [trace([5, 6, 7], [-0.5, -1.0, -0.2]), trace([1, 2], [-0.3, -0.4])]
    b = [trace([5, 6, 7], [-0.52, -1.01, -0.2]), trace([1, 2], [-0.3, -0.41])]
    r = compare_runs(a, b)
    assert r.ok and r.mean_logprob_diff == pytest.approx(0.04 / 5) and len(r.results) == 2
    assert "agree: mean |dlogp| 0.0080 over 5 steps" in str(r)


def test_runs_with_every_step_moved_a_little_differ():
    """Each step within the per-step tolerance, but all moved the same way: not rounding."""
    a = [trace([5, 6, 7, 8], [-0.5, -1.0, -0.2, -0.9])]
    b = [trace([5, 6, 7, 8], [-0.6, -1.1, -0.3, -1.0])]
    assert compare_greedy(a[0], b[0]).ok
    r = compare_runs(a, b)
    assert not r.ok and "mean |dlogp| 0.1000 > 0.05" in r.reason


def test_runs_differ_when_one_prompt_differs_or_counts_differ():
    a = [trace([5, 6]), trace([1, 2])]
    b = [trace([5, 6]), trace([1, 2], [-1.0, -2.0])]
    r = compare_runs(a, b)
    assert not r.ok and "1 of 2 prompts differ" in r.reason
    assert not compare_runs(a, a[:1]).ok
    assert not compare_runs([trace([5, 6], [-0.1, float("nan")])], [trace([5, 6], [-0.1, float("nan")])]).ok
