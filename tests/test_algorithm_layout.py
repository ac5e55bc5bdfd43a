"""Working-set layout vs. a brute-force enumeration of pages."""

import math

import pytest
import torch

from freekv_sglang.algorithm import WorkingSetLayout

LAYOUTS = [
    WorkingSetLayout(32, 4, 8, 8),
    WorkingSetLayout(32, 16, 32, 16),
    WorkingSetLayout(4, 0, 3, 2),
    WorkingSetLayout(1, 1, 1, 3),
    WorkingSetLayout(8, 2, 5, 4),
]


def brute(lay: WorkingSetLayout, n: int) -> dict:
    p = lay.page_size
    n_pages = math.ceil(n / p)
    pages = list(range(n_pages))
    sink = [x for x in pages if x < lay.n_sink]
    # window: the current page plus up to n_window - 1 pages before it, never inside the sink
    window = [x for x in pages if x >= n_pages - lay.n_window and x >= lay.n_sink]
    cand = [x for x in pages if x not in sink and x not in window]
    return {
        "n_pages": n_pages, "last_page_len": n - (n_pages - 1) * p, "n_sink_pages": len(sink),
        "window_start": window[0] if window else max(n_pages - lay.n_window, lay.n_sink),
        "n_window_pages": len(window), "n_candidates": len(cand),
        "n_selected": min(len(cand), lay.n_select), "is_dense": len(cand) <= lay.n_select,
        "_cand": cand, "_window": window, "_sink": sink,
    }


QUANTITIES = ["n_pages", "last_page_len", "n_sink_pages", "window_start", "n_window_pages", "n_candidates",
              "n_selected", "is_dense"]


@pytest.mark.parametrize("lay", LAYOUTS, ids=str)
def test_quantities_match_brute_force_int_and_tensor(lay):
    ns = list(range(1, 40 * lay.page_size + 3))
    nt = torch.tensor(ns)
    for q in QUANTITIES:
        vec = getattr(lay, q)(nt)
        assert isinstance(vec, torch.Tensor) and vec.shape == nt.shape
        for i, n in enumerate(ns):
            want = brute(lay, n)[q]
            got = getattr(lay, q)(n)
            assert got == want, (q, n, got, want)
            assert vec[i].item() == want, (q, n)
    # the three parts cover every page exactly once
    for n in ns:
        b = brute(lay, n)
        assert b["n_sink_pages"] + b["n_candidates"] + b["n_window_pages"] == b["n_pages"]


@pytest.mark.parametrize("lay", LAYOUTS, ids=str)
def test_candidate_mask(lay):
    ns = torch.tensor([1, lay.page_size * 3 + 1, lay.page_size * 20, lay.page_size * 35 + 2])
    max_pages = 40
    m = lay.candidate_mask(ns, max_pages)
    assert m.shape == (4, max_pages) and m.dtype == torch.bool
    for i, n in enumerate(ns.tolist()):
        cand = brute(lay, n)["_cand"]
        assert torch.nonzero(m[i]).flatten().tolist() == [c for c in cand if c < max_pages]
        assert torch.equal(lay.candidate_mask(n, max_pages), m[i])


@pytest.mark.parametrize("lay", LAYOUTS, ids=str)
def test_page_table_and_page_of_slot(lay):
    g = torch.Generator().manual_seed(lay.page_size)
    hkv = 3
    for n in range(1, 30 * lay.page_size):
        b = brute(lay, n)
        slots, last = lay.page_table(n)
        assert last == b["last_page_len"]
        assert len(slots) == b["n_sink_pages"] + b["n_selected"] + b["n_window_pages"]
        assert len(set(slots)) == len(slots) and all(0 <= s < lay.slots for s in slots)
        assert slots[-1] == lay.current_slot(n)  # current page last
        assert slots[: b["n_sink_pages"]] == list(range(b["n_sink_pages"]))
        sel_slots = slots[b["n_sink_pages"] : b["n_sink_pages"] + b["n_selected"]]
        assert sel_slots == list(range(lay.n_sink, lay.n_sink + b["n_selected"]))
        win_slots = slots[b["n_sink_pages"] + b["n_selected"] :]
        assert win_slots == [lay.window_slot(p) for p in b["_window"]]
        assert all(lay.window_slot0 <= s < lay.slots for s in win_slots)
        # logical pages per slot: sink, this head's selection, window
        cand = b["_cand"]
        sel = torch.full((hkv, lay.n_select), -1, dtype=torch.long)
        for h in range(hkv):
            pick = sorted(torch.randperm(len(cand), generator=g)[: b["n_selected"]].tolist())
            sel[h, : len(pick)] = torch.tensor([cand[i] for i in pick], dtype=torch.long)
        pos = lay.page_of_slot(n, sel)
        assert pos.shape == (hkv, len(slots))
        for h in range(hkv):
            row = pos[h].tolist()
            assert row[: b["n_sink_pages"]] == b["_sink"]
            assert row[b["n_sink_pages"] : b["n_sink_pages"] + b["n_selected"]] == sel[h, : b["n_selected"]].tolist()
            assert row[b["n_sink_pages"] + b["n_selected"] :] == b["_window"]
            assert row[-1] == b["n_pages"] - 1
            if b["is_dense"]:
                assert sorted(row) == list(range(b["n_pages"]))


def test_current_slot_tensor_matches_int():
    lay = WorkingSetLayout(4, 2, 3, 3)
    ns = torch.arange(1, 200)
    vec = lay.current_slot(ns)
    assert vec.tolist() == [lay.current_slot(int(n)) for n in ns]


def test_from_tokens_and_validation():
    lay = WorkingSetLayout.from_tokens(32, 128, 1024, 256)
    assert (lay.n_sink, lay.n_select, lay.n_window, lay.slots) == (4, 32, 8, 44)
    with pytest.raises(ValueError):
        WorkingSetLayout.from_tokens(32, 100, 1024, 256)
    for bad in [(0, 1, 1, 2), (32, -1, 1, 2), (32, 1, 0, 2), (32, 1, 1, 1)]:
        with pytest.raises(ValueError):
            WorkingSetLayout(*bad)
