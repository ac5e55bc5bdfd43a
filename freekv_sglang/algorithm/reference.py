"""FreeKV decoding of one (request, layer) in plain torch: the spec of record.

This ties the pieces together exactly as the GPU runtime does, one request at a time:

*Prefill* of ``n0`` tokens: digests of all full pages; the working set for the first decode
step (context ``n0 + 1``) is seeded with the pages selected by the last prompt token's
query; there is no previous query yet.

*Decode step* with the history grown to ``n`` tokens (the new token included):

1. the page that just became full (if any) gets its digest;
2. ``flags`` = heads to correct: all heads without speculation, otherwise the heads whose
   query drifted (:func:`correction_flags`; all heads on the first step);
3. flagged heads are reselected with ``q_t`` over the candidates of context ``n`` and
   their missing pages recalled (synchronously, before attention); with over-fetch
   (``layout.n_overfetch > 0``) the top ``n_budget`` pages plus the best resident ones
   (:func:`~.selection.overfetch_select`), so only pages of the top ``n_budget`` are recalled;
4. attention: every KV head over sink + its resident selected pages + window;
5. with speculation, the selection for the next step is made right away with ``q_t`` over
   the candidates of context ``n + 1`` (so a page that leaves the window next step is
   already considered) and recalled in the background; it is what step ``t + 1`` attends.
   It (and the prefill's) takes the top ``n_select``: the budget plus the over-fetched pages.

The ``dense`` mode is plain attention over the history, for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import sparse_attention
from .correction import correction_flags
from .layout import WorkingSetLayout
from .scores import aggregate_gqa
from .scoring_rules import get_rule
from .selection import overfetch_select, residency_update, sticky_scores, topk_pages

MODES = ("dense", "oracle", "speculative", "corrected")


@dataclass(frozen=True)
class RetrievalSettings:
    """Algorithm settings (a subset of the serving configuration)."""

    layout: WorkingSetLayout
    gqa_aggregation: str = "mean"
    correction_threshold: float | None = 0.9  # None: correction off
    speculative: bool = True
    keep_margin: int = 0  # residency hysteresis in pages (selection.sticky_scores); reference only
    scoring: str = "quest"  # page-scoring rule (scoring_rules.get_rule); the runtime: quest, grid2sink[N]

    def __post_init__(self):
        if self.layout.n_overfetch and not self.speculative:
            raise ValueError("over-fetch (layout.n_overfetch > 0) is speculation's: it needs speculative=True")

    @classmethod
    def for_mode(cls, mode: str, layout: WorkingSetLayout, tau: float | None = 0.9, gqa_aggregation: str = "mean",
                 keep_margin: int = 0, scoring: str = "quest"):
        """``oracle``: select with the current query; ``speculative``: no correction;
        ``corrected``: speculation with correction at ``tau``. (``dense`` needs no settings.)"""
        if mode == "oracle":
            return cls(layout, gqa_aggregation, None, False, keep_margin, scoring)
        if mode == "speculative":
            return cls(layout, gqa_aggregation, None, True, keep_margin, scoring)
        if mode == "corrected":
            return cls(layout, gqa_aggregation, tau, True, keep_margin, scoring)
        raise ValueError(f"mode {mode!r} has no retrieval settings; modes: {MODES}")


@dataclass
class StepStats:
    corrected_heads: int = 0  # KV heads reselected before attention
    recalled_pages: int = 0  # (head, page) pieces moved host -> GPU this step
    kv_heads: int = 0
    sparse: bool = False  # some pages of the history were left out
    critical_pages: int = 0  # of recalled_pages, those of corrections (before attention)


@dataclass
class LayerState:
    """Retrieval state of one (request, layer)."""

    settings: RetrievalSettings
    n_kv_heads: int
    resident: torch.Tensor = None  # int64 [Hkv, n_select]
    q_prev: torch.Tensor | None = None  # [Hq, D]
    digests: torch.Tensor = None  # [n_full_pages, Hkv, 2, D] (quest; other rules: [n_full_pages, Hkv, R, C])
    stats: list = field(default_factory=list)
    rule_ctx: object = None  # what the scoring rule learned from the prompt's keys (None for quest)

    def __post_init__(self):
        if self.resident is None:
            self.resident = torch.full((self.n_kv_heads, self.settings.layout.n_select), -1, dtype=torch.long)
        self.rule = get_rule(self.settings.scoring)

    # -- selection -------------------------------------------------------------------
    def select(self, q: torch.Tensor, n: int) -> torch.Tensor:
        """Selection with query ``q`` ``[Hq, D]`` over the candidates of context ``n``: ``[Hkv, k]``."""
        lay = self.settings.layout
        agg = sticky_scores(self.page_scores(q, n), self.resident, lay.n_select, self.settings.keep_margin)[None]
        return topk_pages(agg, lay.n_select)[0]

    def select_corrected(self, q: torch.Tensor, n: int) -> torch.Tensor:
        """A correction's selection ``[Hkv, k]``: :meth:`select`, or with over-fetch the top ``n_budget`` pages
        plus the best resident ones (:func:`~.selection.overfetch_select`)."""
        lay = self.settings.layout
        if not lay.n_overfetch:
            return self.select(q, n)
        return overfetch_select(self.page_scores(q, n), self.resident, lay.n_budget, lay.n_overfetch)

    def page_scores(self, q: torch.Tensor, n: int) -> torch.Tensor:
        """Aggregated page scores ``[Hkv, Np]`` of query ``q [Hq, D]``, ``-inf`` outside the candidates of
        context ``n``."""
        lay = self.settings.layout
        n_pages = lay.n_pages(n)
        dig = self.digests
        if dig.shape[0] < n_pages:  # pad: pages without digest are never candidates
            pad = dig.new_zeros((n_pages - dig.shape[0], *dig.shape[1:]))
            dig = torch.cat([dig, pad])
        dig = dig[:n_pages]
        s = self.rule.scores(q[None], dig[None], self.rule_ctx)  # [1, Hq, Np]
        valid = lay.candidate_mask(torch.tensor([n], device=q.device), n_pages)
        return aggregate_gqa(s, self.n_kv_heads, self.settings.gqa_aggregation, valid, head_dim=q.shape[-1])[0]

    def _apply(self, selected: torch.Tensor, mask: torch.Tensor | None) -> int:
        upd = residency_update(self.resident, selected, mask)
        self.resident = upd.resident
        return int(upd.n_recall.sum())

    # -- lifecycle -------------------------------------------------------------------
    def prefill(self, keys: torch.Tensor, q_last: torch.Tensor) -> int:
        """Seed after a prompt of ``len(keys)`` tokens. Returns pages recalled."""
        lay = self.settings.layout
        self.rule_ctx = self.rule.fit(keys)
        self.digests = self.rule.digests(keys, lay.page_size, self.rule_ctx)
        self.q_prev = None
        self.resident = torch.full(self.resident.shape, -1, dtype=torch.long, device=keys.device)
        return self._apply(self.select(q_last, keys.shape[0] + 1), None)

    def decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """One decode step; ``keys``/``values`` ``[n, Hkv, D]`` hold the history incl. the new token.

        Returns float32 ``[Hq, D]`` and appends a :class:`StepStats` to ``self.stats``.
        """
        st = self.settings
        lay = st.layout
        n = keys.shape[0]
        hkv = self.n_kv_heads
        dev = q.device
        self.digests = self.rule.append(self.digests, keys, lay.page_size, self.rule_ctx)

        if not st.speculative:
            flags = torch.ones(hkv, dtype=torch.bool, device=dev)
        else:
            prev = self.q_prev if self.q_prev is not None else torch.zeros_like(q)
            valid = torch.tensor([self.q_prev is not None], device=dev)
            flags = correction_flags(q[None], prev[None], valid, hkv, st.correction_threshold)[0]
        recalled = 0
        if bool(flags.any()):
            recalled += self._apply(self.select_corrected(q, n), flags)
        critical = recalled

        sink = torch.arange(lay.n_sink_pages(n), device=dev).expand(hkv, -1)
        # (window_start exceeds n_pages while the history is inside the sink: empty window)
        window = torch.arange(lay.n_pages(n) - lay.n_window_pages(n), lay.n_pages(n), device=dev).expand(hkv, -1)
        pages = torch.cat([sink, self.resident, window], dim=1)
        out = sparse_attention(q, keys, values, pages, lay.page_size, scale)

        self.q_prev = q
        if st.speculative:
            recalled += self._apply(self.select(q, n + 1), None)
        self.stats.append(StepStats(int(flags.sum()), recalled, hkv, not bool(lay.is_dense(n)), critical))
        return out
