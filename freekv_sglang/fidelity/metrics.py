"""Per-step comparisons against the dense row, and retrieval statistics.

Row 0 of every batch is dense. For each decode step and row ``r``:

* top-1 agreement: ``argmax logits[r] == argmax logits[0]``;
* ``KL(dense || r)`` of the next-token distributions (nats);
* ``nll[r]`` of the true next token (teacher forcing only) -> perplexity ratio
  ``exp(mean nll[r] - mean nll[0])`` = ppl(mode) / ppl(dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def compare_step(logits: torch.Tensor, target: int | None = None):
    """Compare every row with row 0.

    Args:
        logits: ``[B, V]``; target: the true next token, or None.
    Returns:
        ``(agree bool [B], kl float [B], nll float [B] or None)``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.argmax(dim=-1)
    agree = top == top[0]
    p0 = logp[0].exp()
    kl = (p0[None] * (logp[0][None] - logp)).sum(-1).clamp_min(0.0)
    nll = None if target is None else -logp[:, target]
    return agree, kl, nll


@dataclass
class TeacherForcedAcc:
    """Running sums over the steps of one text, per row."""

    n_rows: int
    steps: int = 0
    agree: torch.Tensor = None
    kl: torch.Tensor = None
    nll: torch.Tensor = None
    kl_max: torch.Tensor = None

    def __post_init__(self):
        z = torch.zeros(self.n_rows, dtype=torch.float64)
        self.agree, self.kl, self.nll, self.kl_max = z.clone(), z.clone(), z.clone(), z.clone()

    def add(self, logits: torch.Tensor, target: int) -> None:
        agree, kl, nll = compare_step(logits, target)
        self.steps += 1
        self.agree += agree.double()
        self.kl += kl.double()
        self.nll += nll.double()
        self.kl_max = torch.maximum(self.kl_max, kl.double())

    def row(self, r: int) -> dict:
        s = max(self.steps, 1)
        return {
            "steps": self.steps,
            "top1_agreement": float(self.agree[r] / s),
            "kl_mean": float(self.kl[r] / s),
            "kl_max": float(self.kl_max[r]),
            "nll_mean": float(self.nll[r] / s),
            "ppl": math.exp(float(self.nll[r] / s)),
            "ppl_ratio": math.exp(float((self.nll[r] - self.nll[0]) / s)),
        }


@dataclass
class RetrievalCounts:
    """Sums of ``StepStats`` over (layer, step), first decode step of each sequence excluded
    (it always reselects every head: there is no previous query yet)."""

    layer_steps: int = 0  # (layer, step) pairs counted
    steps: int = 0  # decode steps counted
    head_steps: int = 0  # (layer, KV head, step) triples
    corrected: int = 0
    recalled: int = 0
    sparse_layer_steps: int = 0
    per_step_recalled: list = field(default_factory=list)

    def add_sequence(self, layer_stats: list[list]) -> None:
        """``layer_stats[layer]`` = that layer's ``StepStats`` list for one decoded sequence."""
        layer_stats = [s for s in layer_stats if s]  # dense layers keep no stats
        if not layer_stats:
            return
        n_steps = len(layer_stats[0])
        for t in range(1, n_steps):
            total = 0
            for stats in layer_stats:
                s = stats[t]
                self.layer_steps += 1
                self.head_steps += s.kv_heads
                self.corrected += s.corrected_heads
                self.recalled += s.recalled_pages
                self.sparse_layer_steps += int(s.sparse)
                total += s.recalled_pages
            self.steps += 1
            self.per_step_recalled.append(total)

    def summary(self) -> dict:
        return {
            "retrieval_steps": self.steps, "layer_steps": self.layer_steps, "head_steps": self.head_steps,
            "corrected": self.corrected, "recalled": self.recalled,
            "correction_rate": self.corrected / self.head_steps if self.head_steps else None,
            "recalled_per_layer_step": self.recalled / self.layer_steps if self.layer_steps else None,
            "recalled_per_step": self.recalled / self.steps if self.steps else None,
            "sparse_fraction": self.sparse_layer_steps / self.layer_steps if self.layer_steps else None,
        }


def first_divergence(tokens: torch.Tensor) -> list[int]:
    """``tokens`` ``[B, N]`` generated ids; per row, index of the first token that differs from row 0 (N if none)."""
    n = tokens.shape[1]
    diff = tokens != tokens[:1]
    out = []
    for r in range(tokens.shape[0]):
        idx = torch.nonzero(diff[r])
        out.append(int(idx[0, 0]) if len(idx) else n)
    return out
