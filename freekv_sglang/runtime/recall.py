"""Recall strategies: how the runtime moves selected (page, KV head) pieces from the tiers into the working sets.

One strategy per runtime, chosen once from ``--freekv-recall`` (:func:`make_recall`). Each has two entry points:

* :meth:`Recall.recall_pieces`: a flat piece list (host page, destination slot, KV head), as a prefill
  seeds its sink and window pages;
* :meth:`Recall.recall_selection`: the ``(slot, page)`` lists a selection wrote per (request, KV head).

Strategies: ``gather`` (the default: one Triton kernel reads pinned host memory and the GPU tier straight
from the lists, no host sync, CUDA-graph capturable), ``staged`` (the paper's double-buffered block copies)
and ``per-page`` (an ArkVale-style copy per piece), both eager comparison baselines that read the piece list
on the host, and ``skip`` (nothing moves: an upper bound for benchmarks, wrong outputs). Off CUDA the
baselines' host copies do not exist and the gather runs in their place. What a strategy can serve (FP8
tiers, a GPU tier) is checked by :func:`freekv_sglang.config.check_recall`.
"""

from __future__ import annotations

import torch

from freekv_sglang.config import BYTE_COPY_RECALLS, RECALL_STRATEGIES, check_recall
from freekv_sglang.kernels.recall import (recall_gather, recall_per_page, recall_selected, recall_selected_pieces,
                                          recall_staged)


class Recall:
    """Base: the tiers and working sets of a runtime (``host``, ``layer_slots``, ``tier_kw``, ``req_to_token``,
    ``layout``); subclasses move the pieces. ``programs``, ``warps``: the selected-page recall kernel's grid
    and warps per program (``None``: the kernel's defaults)."""

    name = ""

    def __init__(self, runtime, programs: int | None = None, warps: int | None = None):
        self.rt = runtime
        self.programs, self.warps = programs, warps

    def _lists_kw(self) -> dict:
        lay = self.rt.layout
        return dict(page_size=lay.page_size, slot_base=lay.slots, select_slot0=lay.n_sink)

    def recall_pieces(self, layer: int, host_page: torch.Tensor, dst_slot: torch.Tensor, head: torch.Tensor) -> None:
        """Copy ``tier[host_page[i], head[i]]`` into working-set slot ``dst_slot[i]`` (``-1``: skip)."""
        raise NotImplementedError

    def recall_selection(self, layer: int, r_slot: torch.Tensor, r_page: torch.Tensor, rows: torch.Tensor) -> None:
        """Recall what a selection listed: ``r_slot, r_page [B, Hkv, k]`` (selected-slot index and logical page,
        valid entries first, ``-1`` after) of request rows ``rows [B]``."""
        self.recall_pieces(layer, *recall_selected_pieces(r_slot, r_page, self.rt.req_to_token, rows,
                                                          **self._lists_kw()))


class Gather(Recall):
    name = "gather"

    def recall_pieces(self, layer, host_page, dst_slot, head):
        rt = self.rt
        recall_gather(rt.host.k(layer), rt.host.v(layer), *rt.layer_slots(layer), host_page, dst_slot, head,
                      **rt.tier_kw(layer))

    def recall_selection(self, layer, r_slot, r_page, rows):
        rt = self.rt
        recall_selected(rt.host.k(layer), rt.host.v(layer), *rt.layer_slots(layer), r_slot, r_page, rt.req_to_token,
                        rows, **self._lists_kw(), num_programs=self.programs, num_warps=self.warps,
                        **rt.tier_kw(layer))


class Staged(Recall):
    name = "staged"

    def recall_pieces(self, layer, host_page, dst_slot, head):
        recall_staged(self.rt.host.k(layer), self.rt.host.v(layer), *self.rt.layer_slots(layer), host_page, dst_slot,
                      head)


class PerPage(Recall):
    name = "per-page"

    def recall_pieces(self, layer, host_page, dst_slot, head):
        recall_per_page(self.rt.host.k(layer), self.rt.host.v(layer), *self.rt.layer_slots(layer), host_page,
                        dst_slot, head)


class Skip(Recall):
    name = "skip"

    def recall_pieces(self, layer, host_page, dst_slot, head):
        pass

    def recall_selection(self, layer, r_slot, r_page, rows):
        pass


STRATEGIES = {cls.name: cls for cls in (Gather, Staged, PerPage, Skip)}
assert tuple(STRATEGIES) == RECALL_STRATEGIES


def make_recall(name: str, runtime, *, programs: int | None = None, warps: int | None = None) -> Recall:
    """The strategy ``name`` for ``runtime`` (its ``settings.kv_fp8``, ``n_gpu_pages`` and ``is_cuda``)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown recall strategy {name!r}; choose one of {RECALL_STRATEGIES}")
    check_recall(name, kv_fp8=runtime.settings.kv_fp8,
                 gpu_tier=f"{runtime.n_gpu_pages} pages" if runtime.n_gpu_pages else 0)
    if name in BYTE_COPY_RECALLS and not runtime.is_cuda:
        name = "gather"
    return STRATEGIES[name](runtime, programs, warps)
