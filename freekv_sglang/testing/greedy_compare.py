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

An implementation that attends to the wrong keys moves log-probabilities by much more than
rounding does (checked on the GPU by the negative controls in ``tests/gpu/test_server_e2e.py``).
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
    def from_response(cls, resp: dict) -> "GreedyTrace":
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

    def __str__(self) -> str:
        gap = "-" if self.gap_at_divergence is None else f"{self.gap_at_divergence:.3f}"
        return (f"{'agree' if self.ok else 'DIFFER'} ({self.prefix}/{self.length} equal, max |dlogp| "
                f"{self.max_logprob_diff:.3f}, top-2 gap at divergence {gap}{'' if self.ok else ': ' + self.reason})")


def _diff(x: float, y: float) -> float:
    """``|x - y|``, with equal infinities 0 apart and NaN infinitely far from everything."""
    if math.isnan(x) or math.isnan(y):
        return math.inf
    return 0.0 if x == y else abs(x - y)


def compare_greedy(a: GreedyTrace, b: GreedyTrace, logprob_tol: float = 0.15, tie_tol: float = 0.3) -> Agreement:
    """Do ``a`` and ``b`` agree up to rounding (module docstring)? Both must have the same length; a NaN
    log-probability never agrees."""
    if len(a.tokens) != len(b.tokens):
        return Agreement(0, max(len(a.tokens), len(b.tokens)), 0.0, None, False,
                         f"lengths differ ({len(a.tokens)} vs {len(b.tokens)})")
    n = len(a.tokens)
    k = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), n)
    dl = max((_diff(x, y) for x, y in zip(a.logprobs[:k], b.logprobs[:k])), default=0.0)
    if dl > logprob_tol:
        gap = min(a.gaps[k], b.gaps[k]) if k < n else None
        return Agreement(k, n, dl, gap, False, f"log-probabilities differ by {dl:.3f} > {logprob_tol}")
    if k == n:
        return Agreement(k, n, dl, None, True, "")
    gap = min(a.gaps[k], b.gaps[k])
    if math.isnan(gap):
        return Agreement(k, n, dl, gap, False, f"NaN log-probabilities at step {k}")
    ta, tb = dict(a.top[k][:2]), dict(b.top[k][:2])
    if set(ta) != set(tb):
        return Agreement(k, n, dl, gap, False, f"at step {k} the two most likely tokens differ "
                                               f"({sorted(ta)} vs {sorted(tb)})")
    dk = max(_diff(ta[t], tb[t]) for t in ta)
    if dk > logprob_tol:
        return Agreement(k, n, max(dl, dk), gap, False, f"at step {k} the top-two log-probabilities differ by "
                                                        f"{dk:.3f} > {logprob_tol}")
    if gap > tie_tol:
        return Agreement(k, n, dl, gap, False, f"tokens differ at step {k} where the top-two gap is {gap:.3f} "
                                               f"> {tie_tol} (not a near-tie)")
    return Agreement(k, n, max(dl, dk), gap, True, "")
