"""Working-set layout: which pages of a request's KV history a decode step can see.

A request's history of ``n`` tokens (the token being decoded included) is cut into
pages of ``P`` tokens: ``n_pages = ceil(n / P)``; the last page (``n_pages - 1``) is the
*current* page and holds ``n - (n_pages - 1) * P`` tokens, every other page is full.

The working set of one (request, layer) has three parts:

* **sink**: pages ``[0, min(n_sink, n_pages))`` — always resident;
* **window**: pages ``[ws, n_pages)`` with ``ws = max(n_sink, n_pages - n_window)`` —
  the last ``n_window - 1`` full pages plus the current page (empty while the
  history is still inside the sink);
* **selected**: up to ``n_select`` *candidate* pages per KV head, chosen by score.
  Candidates are the full pages between sink and window, ``[n_sink, ws)``.

When a request has at most ``n_select`` candidates every candidate is selected and
attention over the working set is exactly dense attention.

With speculative over-fetch (``n_overfetch = m > 0``, ``--freekv-overfetch-tokens``) the selected
region holds ``n_select = k + m`` pages per KV head, ``k = n_budget`` the budget: speculation keeps the
top ``k + m`` resident, a corrected selection takes its top ``k`` and keeps ``m`` resident ones
(:func:`~freekv_sglang.algorithm.selection.overfetch_select`). Everything here counts all ``n_select``
slots: attention reads every one of them.

GPU slots of one (request, layer), ``S = n_sink + n_select + n_window`` in all:
``[0, n_sink)`` sink page ``p`` in slot ``p``; ``[n_sink, n_sink + n_select)`` selected
pages (each KV head has its own page in the same slot); ``[n_sink + n_select, S)`` the
window as a ring: page ``p`` in slot ``n_sink + n_select + p % n_window``.

All functions accept Python ints or integer tensors of any shape (element-wise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _cdiv(a, b):
    return (a + b - 1) // b


def _minimum(a, b: int):
    return a.clamp(max=b) if isinstance(a, torch.Tensor) else min(a, b)


def _maximum(a, b: int):
    return a.clamp(min=b) if isinstance(a, torch.Tensor) else max(a, b)


@dataclass(frozen=True)
class WorkingSetLayout:
    """Page-count parameters of the working set (all in pages, ``page_size`` in tokens).

    ``n_select``: selected slots per KV head, the budget plus ``n_overfetch`` over-fetched pages."""

    page_size: int
    n_sink: int
    n_select: int
    n_window: int
    n_overfetch: int = 0

    def __post_init__(self):
        if self.page_size < 1 or self.n_sink < 0 or self.n_select < 1 or self.n_window < 2:
            raise ValueError(
                f"invalid working-set layout {self}: need page_size>=1, n_sink>=0, n_select>=1, n_window>=2"
            )
        if not 0 <= self.n_overfetch < self.n_select:
            raise ValueError(f"invalid working-set layout {self}: need 0 <= n_overfetch < n_select")

    @classmethod
    def from_tokens(cls, page_size: int, sink_tokens: int, select_tokens: int, window_tokens: int,
                    overfetch_tokens: int = 0):
        """From token counts; ``select_tokens`` is the budget, ``overfetch_tokens`` come on top of it."""
        for name, v in (("sink", sink_tokens), ("select", select_tokens), ("window", window_tokens),
                        ("overfetch", overfetch_tokens)):
            if v % page_size:
                raise ValueError(f"{name} tokens ({v}) must be a multiple of the page size ({page_size})")
        if overfetch_tokens < 0:
            raise ValueError(f"overfetch tokens ({overfetch_tokens}) must be >= 0")
        m = overfetch_tokens // page_size
        return cls(page_size, sink_tokens // page_size, select_tokens // page_size + m, window_tokens // page_size, m)

    @property
    def n_budget(self) -> int:
        """Pages a corrected selection takes by score: ``n_select - n_overfetch``."""
        return self.n_select - self.n_overfetch

    def without_overfetch(self) -> "WorkingSetLayout":
        """The same layout with the budget alone as its selected slots."""
        return WorkingSetLayout(self.page_size, self.n_sink, self.n_budget, self.n_window)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """GPU page slots per (request, layer)."""
        return self.n_sink + self.n_select + self.n_window

    @property
    def window_slot0(self) -> int:
        return self.n_sink + self.n_select

    # ---- per-context quantities (element-wise over n = tokens incl. the current one) ---
    def n_pages(self, n):
        return _cdiv(n, self.page_size)

    def last_page_len(self, n):
        return n - (self.n_pages(n) - 1) * self.page_size

    def n_sink_pages(self, n):
        return _minimum(self.n_pages(n), self.n_sink)

    def window_start(self, n):
        return _maximum(self.n_pages(n) - self.n_window, self.n_sink)

    def n_window_pages(self, n):
        return _maximum(self.n_pages(n) - self.window_start(n), 0)

    def n_candidates(self, n):
        """Full pages between sink and window: ``[n_sink, window_start)``."""
        return _maximum(self.window_start(n) - self.n_sink, 0)

    def n_selected(self, n):
        return _minimum(self.n_candidates(n), self.n_select)

    def is_dense(self, n):
        """True where every page of the history is in the working set."""
        return self.n_candidates(n) <= self.n_select

    def window_slot(self, page):
        """Slot of a window page (ring)."""
        return self.window_slot0 + page % self.n_window

    def current_slot(self, n):
        """Slot that holds the current (last) page of a history of ``n`` tokens."""
        cur = self.n_pages(n) - 1
        if isinstance(cur, torch.Tensor):
            return torch.where(cur < self.n_sink, cur, self.window_slot(cur))
        return cur if cur < self.n_sink else self.window_slot(cur)

    def candidate_mask(self, n, max_pages: int) -> torch.Tensor:
        """Bool ``[..., max_pages]``: page ``p`` is a candidate for a history of ``n`` tokens."""
        n = torch.as_tensor(n)
        p = torch.arange(max_pages, device=n.device)
        return (p >= self.n_sink) & (p < self.window_start(n)[..., None])

    def page_table(self, n: int):
        """Slot list of one request in attention order (sink, selected, window; current last).

        Returns ``(slots: list[int], last_page_len: int)``. The selected slots listed are the
        first ``n_selected(n)`` ones, which is where the residency update keeps valid pages.
        """
        n = int(n)
        slots = list(range(self.n_sink_pages(n)))
        slots += list(range(self.n_sink, self.n_sink + self.n_selected(n)))
        slots += [self.window_slot(p) for p in range(self.window_start(n), self.n_pages(n))]
        return slots, self.last_page_len(n)

    def page_of_slot(self, n: int, selected: torch.Tensor) -> torch.Tensor:
        """Logical page held by each slot of ``page_table(n)``, per KV head.

        ``selected``: ``[Hkv, n_select]`` resident selected pages (-1 = empty).
        Returns int64 ``[Hkv, len(page_table(n)[0])]``.
        """
        n = int(n)
        hkv = selected.shape[0]
        sink = torch.arange(self.n_sink_pages(n)).expand(hkv, -1)
        sel = selected[:, : self.n_selected(n)].to(torch.int64)
        # window_start exceeds n_pages while the history is inside the sink: empty window
        win = torch.arange(self.n_pages(n) - self.n_window_pages(n), self.n_pages(n)).expand(hkv, -1)
        return torch.cat([sink, sel, win], dim=1)
