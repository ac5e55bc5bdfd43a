"""Compare two greedy generations of the same prompt up to floating-point rounding.

Two correct implementations of the same model (CUDA graph vs eager, two attention kernels) round
differently. On a model whose tokens depend on its KV cache (:mod:`.random_llama`) such differences
can flip a greedy choice where the top two tokens are (nearly) tied, after which the two sequences
continue from different contexts. So the runs *agree* when

- up to their first differing token, each generated token's log-probability differs by at most
  ``logprob_tol`` between the runs, and
- where they first differ (if they do), both runs have the same two most likely tokens, each with
  log-probabilities within ``logprob_tol`` across the runs, and within ``tie_tol`` of each other:
  a near-tie that rounding decided differently.

Over a batch of prompts (:func:`compare_runs`) the mean difference over all compared steps must also
stay within ``mean_tol``: a single step's rounding can be large, the average cannot.

Calibration (KV-sensitive random Llama, ``tests/test_random_llama.py`` and the GPU server tests):
bf16 vs float32 on the CPU differs by at most 0.11 nats per step (median 0.013, up to 0.18 at a
split), by 0.02-0.03 on average over a trace; two correct GPU servers (CUDA graph vs eager, overlap
scheduler on vs off) differed by up to 0.174 at a step. Replacing one page (32 tokens) of a
1000-token context moves the average by about 0.08 and single steps by 0.15-0.6; a server that
attends to the wrong pages must fail the comparison (the negative control in
``tests/gpu/test_server_e2e.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GreedyTrace:
    """One greedy generation: ``tokens[i]``, its log-probability ``logprobs[i]`` and the most likely
    tokens at that step ``top[i]`` as ``(token, logprob)`` pairs, most likely first."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]

    @property
    def gaps(self) -> list[float]:
        """Gap between the two most likely tokens at each step (nats; ``inf`` when one was returned)."""
        return [t[0][1] - t[1][1] if len(t) >= 2 else float("inf") for t in self.top]

    @classmethod
    def from_response(cls, resp: dict) -> GreedyTrace:
        """From a ``/generate`` response requested with ``return_logprob`` and ``top_logprobs_num >= 2``
        (``Server.generate(..., top_logprobs=2)``)."""
        meta = resp.get("meta_info", {})
        out = meta.get("output_token_logprobs")
        top = meta.get("output_top_logprobs")
        if out is None or top is None:
            raise ValueError("the response has no output_token_logprobs / output_top_logprobs: request it with "
                             "return_logprob=True and top_logprobs_num >= 2")
        tokens = [int(t[1]) for t in out]
        logprobs = [float(t[0]) for t in out]
        steps = [sorted(((int(t[1]), float(t[0])) for t in (step or [])), key=lambda x: -x[1]) for step in top]
        if len(steps) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(steps)} top-logprob steps")
        return cls(tokens, logprobs, steps)


@dataclass(frozen=True)
class Agreement:
    """Outcome of :func:`compare_greedy`."""

    prefix: int  # tokens equal before the first difference (= length when none)
    length: int
    max_logprob_diff: float  # over the equal prefix
    gap_at_divergence: float | None  # min over both runs of the top-two gap where they first differ
    ok: bool
    reason: str
    sum_logprob_diff: float = 0.0  # sum of |dlogp| over the equal prefix (for pooled means)

    def __str__(self) -> str:
        gap = "-" if self.gap_at_divergence is None else f"{self.gap_at_divergence:.3f}"
        return (f"{'agree' if self.ok else 'DIFFER'} ({self.prefix}/{self.length} equal, max |dlogp| "
                f"{self.max_logprob_diff:.3f}, top-2 gap at divergence {gap}{'' if self.ok else ': ' + self.reason})")


def _diff(x: float, y: float) -> float:
    """``|x - y|``, with equal infinities 0 apart and NaN infinitely far from everything."""
    if math.isnan(x) or math.isnan(y):
        return math.inf
    return 0.0 if x == y else abs(x - y)


LOGPROB_TOL = 0.3  # nats, one step
TIE_TOL = 0.3  # nats, top-two gap where two runs may split
MEAN_TOL = 0.05  # nats, mean over the compared steps of a batch of prompts


def compare_greedy(a: GreedyTrace, b: GreedyTrace, logprob_tol: float = LOGPROB_TOL,
                   tie_tol: float = TIE_TOL) -> Agreement:
    """Do ``a`` and ``b`` agree up to rounding (module docstring)? Both must have the same length; a NaN
    log-probability never agrees."""
    if len(a.tokens) != len(b.tokens):
        return Agreement(0, max(len(a.tokens), len(b.tokens)), 0.0, None, False,
                         f"lengths differ ({len(a.tokens)} vs {len(b.tokens)})")
    n = len(a.tokens)
    k = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), n)
    diffs = [_diff(x, y) for x, y in zip(a.logprobs[:k], b.logprobs[:k])]
    dl, total = max(diffs, default=0.0), sum(diffs)

    def result(max_diff, gap, ok, reason=""):
        return Agreement(k, n, max_diff, gap, ok, reason, total)

    if dl > logprob_tol:
        return result(dl, min(a.gaps[k], b.gaps[k]) if k < n else None, False,
                      f"log-probabilities differ by {dl:.3f} > {logprob_tol}")
    if k == n:
        return result(dl, None, True)
    gap = min(a.gaps[k], b.gaps[k])
    if math.isnan(gap):
        return result(dl, gap, False, f"NaN log-probabilities at step {k}")
    ta, tb = dict(a.top[k][:2]), dict(b.top[k][:2])
    if set(ta) != set(tb):
        return result(dl, gap, False, f"at step {k} the two most likely tokens differ ({sorted(ta)} vs {sorted(tb)})")
    dk = max(_diff(ta[t], tb[t]) for t in ta)
    if dk > logprob_tol:
        return result(max(dl, dk), gap, False, f"at step {k} the top-two log-probabilities differ by {dk:.3f} > "
                                               f"{logprob_tol}")
    if gap > tie_tol:
        return result(dl, gap, False, f"tokens differ at step {k} where the top-two gap is {gap:.3f} > {tie_tol} "
                                      f"(not a near-tie)")
    return result(max(dl, dk), gap, True)


@dataclass(frozen=True)
class RunsAgreement:
    """Outcome of :func:`compare_runs`: one :class:`Agreement` per prompt and the pooled mean."""

    results: list[Agreement]
    mean_logprob_diff: float  # over every compared step of every prompt
    ok: bool
    reason: str

    def __str__(self) -> str:
        head = (f"{'agree' if self.ok else 'DIFFER'}: mean |dlogp| {self.mean_logprob_diff:.4f} over "
                f"{sum(r.prefix for r in self.results)} steps{'' if self.ok else ' (' + self.reason + ')'}")
        return "\n  ".join([head, *map(str, self.results)])


def compare_runs(got: list[GreedyTrace], want: list[GreedyTrace], logprob_tol: float = LOGPROB_TOL,
                 tie_tol: float = TIE_TOL, mean_tol: float = MEAN_TOL) -> RunsAgreement:
    """Two runs of the same prompts agree when every prompt agrees (:func:`compare_greedy`) and the mean
    |log-probability difference| over all compared steps is at most ``mean_tol``."""
    if len(got) != len(want):
        return RunsAgreement([], math.inf, False, f"{len(got)} vs {len(want)} prompts")
    res = [compare_greedy(g, w, logprob_tol, tie_tol) for g, w in zip(got, want)]
    steps = sum(r.prefix for r in res)
    mean = sum(r.sum_logprob_diff for r in res) / steps if steps else 0.0
    if not all(r.ok for r in res):
        return RunsAgreement(res, mean, False, f"{sum(not r.ok for r in res)} of {len(res)} prompts differ")
    if not mean <= mean_tol:  # NaN fails too
        return RunsAgreement(res, mean, False, f"mean |dlogp| {mean:.4f} > {mean_tol}")
    return RunsAgreement(res, mean, True, "")
