"""Top-k selection and the residency update vs. brute-force set implementations."""

import random

import pytest
import torch

from freekv_sglang.algorithm import residency_update, topk_pages


def brute_topk(row, k):
    fin = [(v, i) for i, v in enumerate(row) if v != float("-inf")]
    chosen = sorted(i for _, i in sorted(fin, key=lambda x: -x[0])[:k])
    return chosen + [-1] * (k - len(chosen))


@pytest.mark.parametrize("np_,k", [(10, 3), (10, 10), (5, 8), (1, 1), (40, 16)])
def test_topk_pages_matches_brute_force(np_, k):
    g = torch.Generator().manual_seed(np_ * 100 + k)
    scores = torch.randn(4, 3, np_, generator=g)
    scores[0, 0] = float("-inf")  # no candidate
    scores[1, :, ::2] = float("-inf")  # fewer candidates than k (often)
    got = topk_pages(scores, k)
    assert got.shape == (4, 3, k) and got.dtype == torch.int64
    for b in range(4):
        for h in range(3):
            assert got[b, h].tolist() == brute_topk(scores[b, h].tolist(), k), (b, h)


def random_case(rng: random.Random, k: int, max_page: int):
    """A resident set (distinct pages, -1 holes anywhere) and a selection (ascending, -1 padded)."""
    n_res = rng.randint(0, k)
    res_pages = rng.sample(range(max_page), n_res)
    slots = rng.sample(range(k), n_res)
    resident = [-1] * k
    for s, p in zip(slots, res_pages):
        resident[s] = p
    n_sel = rng.randint(0, k)
    # mix of resident and new pages
    pool = list(set(rng.sample(range(max_page), min(max_page, k))) | set(rng.sample(res_pages, rng.randint(0, n_res))))
    sel = sorted(rng.sample(pool, min(n_sel, len(pool))))
    return resident, sel + [-1] * (k - len(sel))


def brute_residency(resident, selected, active):
    k = len(resident)
    if not active:
        return list(resident), [], 0
    sel = [p for p in selected if p >= 0]
    keep = [i for i, p in enumerate(resident) if p >= 0 and p in sel]
    missing = sorted(p for p in sel if p not in resident)
    free = [i for i in range(k) if i not in keep]
    pairs = list(zip(free, missing))
    new = [resident[i] if i in keep else -1 for i in range(k)]
    for s, p in pairs:
        new[s] = p
    return new, pairs, len(missing)


@pytest.mark.parametrize("k", [1, 2, 5, 8, 16])
def test_residency_update_matches_brute_force(k):
    rng = random.Random(k)
    n_cases, shape = 60, (3, 4)
    for _ in range(n_cases):
        res, sel, mask = [], [], []
        for _ in range(shape[0] * shape[1]):
            r, s = random_case(rng, k, max_page=3 * k + 2)
            res.append(r)
            sel.append(s)
            mask.append(rng.random() < 0.75)
        resident = torch.tensor(res).view(*shape, k)
        selected = torch.tensor(sel).view(*shape, k)
        head_mask = torch.tensor(mask).view(shape)
        for use_mask in (False, True):
            upd = residency_update(resident, selected, head_mask if use_mask else None)
            for i in range(shape[0] * shape[1]):
                b, h = divmod(i, shape[1])
                active = mask[i] or not use_mask
                new, pairs, n_rec = brute_residency(res[i], sel[i], active)
                assert upd.resident[b, h].tolist() == new
                assert int(upd.n_recall[b, h]) == n_rec
                got_pairs = [(s, p) for s, p in zip(upd.recall_slot[b, h].tolist(), upd.recall_page[b, h].tolist())
                             if s >= 0]
                assert got_pairs == pairs
                assert upd.recall_slot[b, h, n_rec:].eq(-1).all() and upd.recall_page[b, h, n_rec:].eq(-1).all()


def test_residency_update_properties():
    rng = random.Random(1)
    k = 12
    for _ in range(500):
        r, s = random_case(rng, k, max_page=40)
        resident, selected = torch.tensor(r), torch.tensor(s)
        upd = residency_update(resident, selected)
        new = upd.resident.tolist()
        sel = {p for p in s if p >= 0}
        # new resident set == selection set
        assert {p for p in new if p >= 0} == sel
        assert sum(p >= 0 for p in new) == len(sel)
        # kept pages did not move
        for i, p in enumerate(r):
            if p in sel:
                assert new[i] == p
        # recalls go to free slots only, and fill all of them when the selection is full
        n = int(upd.n_recall)
        slots = upd.recall_slot[:n].tolist()
        free = [i for i, p in enumerate(r) if p not in sel]
        assert set(slots) <= set(free) and len(set(slots)) == n
        if len(sel) == k:
            assert sorted(slots) == free
        assert n == len(sel - set(r))
        assert sorted(upd.recall_page[:n].tolist()) == sorted(sel - set(r))


def test_residency_update_masked_rows_unchanged():
    g = torch.Generator().manual_seed(0)
    resident = torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(4)])
    selected = torch.sort(torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(4)]), dim=-1).values
    mask = torch.tensor([True, False, True, False])
    upd = residency_update(resident, selected, mask)
    assert torch.equal(upd.resident[~mask], resident[~mask])
    assert upd.n_recall[~mask].eq(0).all()
    assert upd.recall_slot[~mask].eq(-1).all() and upd.recall_page[~mask].eq(-1).all()
    assert torch.equal(upd.resident[mask], residency_update(resident[mask], selected[mask]).resident)


@pytest.mark.parametrize("seed", range(5))
def test_growing_candidates_fill_first_slots_in_page_order(seed):
    """While there are fewer candidates than slots every candidate is selected, and the valid
    pages sit in the first slots in ascending page order (the page table relies on it)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    k, hkv, first = 8, 3, 4
    resident = torch.full((hkv, k), -1, dtype=torch.long)
    n_cand = 0
    for _ in range(60):
        n_cand += rng.choice([0, 0, 1, 1, 2])
        np_ = first + n_cand + 3
        scores = torch.randn(hkv, np_, generator=g)
        scores[:, :first] = float("-inf")
        scores[:, first + n_cand:] = float("-inf")
        mask = torch.rand(hkv, generator=g) < 0.7
        upd = residency_update(resident, topk_pages(scores, k), mask)
        for h in range(hkv):
            if not mask[h]:
                assert torch.equal(upd.resident[h], resident[h])
                continue
            row = upd.resident[h].tolist()
            if n_cand < k:
                assert row[:n_cand] == list(range(first, first + n_cand))
                assert row[n_cand:] == [-1] * (k - n_cand)
            else:
                assert -1 not in row
        resident = upd.resident


@pytest.mark.parametrize("seed", range(20))
def test_sticky_selection_matches_brute_force(seed):
    """sticky_scores + topk_pages == keep every resident page ranked within the top k + margin, then the best
    remaining pages by score (ties to the lower page)."""
    from freekv_sglang.algorithm.selection import sticky_scores

    g = torch.Generator().manual_seed(seed)
    np_, k, margin = 40, 8, 3
    scores = torch.randn((2, np_), generator=g)
    scores[:, torch.randperm(np_, generator=g)[:5]] = float("-inf")  # non-candidates
    resident = torch.stack([torch.randperm(np_, generator=g)[:k] for _ in range(2)])
    resident[0, 2] = -1
    got = topk_pages(sticky_scores(scores, resident, k, margin), k)
    for r in range(2):
        s = scores[r].tolist()
        ranked = sorted(range(np_), key=lambda p: (-s[p], p))
        top = set(ranked[: k + margin])
        kept = [p for p in resident[r].tolist() if p >= 0 and p in top and s[p] != float("-inf")]
        rest = [p for p in ranked if p not in kept and s[p] != float("-inf")][: k - len(kept)]
        assert got[r].tolist() == sorted(kept + rest)


def test_sticky_selection_with_zero_margin_is_plain_top_k():
    from freekv_sglang.algorithm.selection import sticky_scores

    scores = torch.randn(3, 30)
    resident = torch.randint(0, 30, (3, 6))
    assert sticky_scores(scores, resident, 6, 0) is scores


def test_sticky_selection_recalls_less_on_a_drifting_query():
    """On slowly drifting scores, hysteresis changes fewer pages per step than plain top-k."""
    from freekv_sglang.algorithm.selection import sticky_scores

    g = torch.Generator().manual_seed(0)
    np_, k = 64, 16
    base = torch.randn((1, np_), generator=g)
    moved = {0: 0, 4: 0}
    for margin in moved:
        resident = topk_pages(base, k)
        s = base.clone()
        for _ in range(50):
            s = s + 0.15 * torch.randn((1, np_), generator=g)
            upd = residency_update(resident, topk_pages(sticky_scores(s, resident, k, margin), k))
            moved[margin] += int(upd.n_recall.sum())
            resident = upd.resident
    assert moved[4] < 0.7 * moved[0], moved


def test_changed_pages_counts_the_new_pages_of_a_selection():
    from freekv_sglang.algorithm import changed_pages

    prev = torch.tensor([[[3, 7, 9, -1], [1, 2, 4, 5]]])
    cur = torch.tensor([[[7, 3, 11, -1], [6, 8, 1, -1]]])  # order does not matter; -1 pads and is never new
    assert changed_pages(prev, cur).tolist() == [[1, 2]]
    assert changed_pages(cur, cur).tolist() == [[0, 0]]
    first = torch.full_like(prev, -1)  # nothing selected before: every selected page is new
    assert changed_pages(first, cur).tolist() == [[3, 3]]
