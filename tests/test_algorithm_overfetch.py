"""Speculative over-fetch (``--freekv-overfetch-tokens``): the corrected selection
(:func:`overfetch_select`) against a brute-force set derivation, and the spec (:class:`LayerState`) decoding
with an over-fetching layout."""

from __future__ import annotations

import random

import pytest
import torch

from freekv_sglang.algorithm import LayerState, RetrievalSettings, WorkingSetLayout, dense_attention
from freekv_sglang.algorithm import reference as reference_mod
from freekv_sglang.algorithm.selection import overfetch_select, residency_update, topk_pages


def brute_overfetch(scores: list[float], resident: list[int], k: int, m: int) -> list[int]:
    """Top ``k`` by (score desc, page asc), plus the ``m`` best resident candidates outside them."""
    order = sorted((p for p, s in enumerate(scores) if s != float("-inf")), key=lambda p: (-scores[p], p))
    top = order[:k]
    rest = [p for p in order if p in resident and p not in top][:m]
    chosen = sorted(top + rest)
    return chosen + [-1] * (k + m - len(chosen))


def random_resident(rng: random.Random, n_pages: int, width: int, holes: bool) -> list[int]:
    pages = rng.sample(range(n_pages), min(width, n_pages))
    out = pages + [-1] * (width - len(pages))
    if holes:
        for i in rng.sample(range(width), rng.randint(0, width // 2)):
            out[i] = -1
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("k,m,n_pages", [(3, 2, 12), (4, 4, 9), (1, 5, 20), (6, 1, 7), (8, 16, 40)])
@pytest.mark.parametrize("style", ["randn", "ties", "large"])
def test_overfetch_select_matches_brute_force(k, m, n_pages, style):
    rng = random.Random(k * 1000 + m * 10 + n_pages)
    g = torch.Generator().manual_seed(k * 31 + m)
    rows = 16
    if style == "randn":
        scores = torch.randn(rows, n_pages, generator=g)
    elif style == "ties":  # few distinct values: equal scores go to the lower page
        scores = torch.randint(-2, 3, (rows, n_pages), generator=g).float() * 0.75 + 0.125
    else:
        scores = torch.randn(rows, n_pages, generator=g) * 3e37
    scores[1, ::3] = float("-inf")  # non-candidates, some of them resident
    scores[2, :] = float("-inf")
    scores[2, : k // 2 + 1] = 1.5  # fewer candidates than k
    resident = torch.tensor([random_resident(rng, n_pages, k + m, holes=r % 3 == 0) for r in range(rows)])
    got = overfetch_select(scores, resident, k, m)
    assert got.shape == (rows, k + m) and got.dtype == torch.int64
    for r in range(rows):
        want = brute_overfetch(scores[r].tolist(), resident[r].tolist(), k, m)
        assert got[r].tolist() == want, (r, scores[r], resident[r])


@pytest.mark.parametrize("seed", range(6))
def test_overfetch_invariants(seed):
    """The top k is always selected, only its missing pages are recalled, nothing else crosses PCIe, and with a
    full resident set of candidates the result fills all k + m slots."""
    g = torch.Generator().manual_seed(seed)
    rows, n_pages, k, m = 32, 30, 5, 4
    scores = torch.randn(rows, n_pages, generator=g) + 0.1
    scores[:, :2] = float("-inf")  # sink-like non-candidates
    resident = torch.stack([torch.randperm(n_pages - 2, generator=g)[: k + m] + 2 for _ in range(rows)])
    resident[::4, 0] = -1  # a hole
    sel = overfetch_select(scores, resident, k, m)
    upd = residency_update(resident, sel)
    top = topk_pages(scores, k)
    for r in range(rows):
        a = set(top[r].tolist()) - {-1}
        s = set(sel[r].tolist()) - {-1}
        res = set(resident[r].tolist()) - {-1}
        assert a <= s
        assert s - a <= res
        recalled = set(upd.recall_page[r, : int(upd.n_recall[r])].tolist())
        assert recalled == a - res and int(upd.n_recall[r]) == len(a - res)
        assert set(upd.resident[r].tolist()) - {-1} == s
        assert len(s) == min(k + m, len(a) + len(res - a))
        if r % 4:  # k + m resident candidates: at least m of them outside the top k
            assert len(s) == k + m


def test_overfetch_select_without_margin_is_plain_top_k():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 4, 17, generator=g)
    resident = torch.randint(-1, 17, (3, 4, 6), generator=g)
    assert torch.equal(overfetch_select(scores, resident, 6, 0), topk_pages(scores, 6))


def test_layout_overfetch():
    lay = WorkingSetLayout.from_tokens(16, 32, 64, 48, overfetch_tokens=32)
    assert (lay.n_select, lay.n_overfetch, lay.n_budget, lay.slots) == (6, 2, 4, 2 + 6 + 3)
    assert lay.without_overfetch() == WorkingSetLayout(16, 2, 4, 3)
    assert WorkingSetLayout.from_tokens(16, 32, 64, 48) == WorkingSetLayout(16, 2, 4, 3, 0)
    with pytest.raises(ValueError, match="multiple of the page size"):
        WorkingSetLayout.from_tokens(16, 32, 64, 48, overfetch_tokens=8)
    with pytest.raises(ValueError, match="n_overfetch"):
        WorkingSetLayout(16, 2, 4, 3, 4)
    with pytest.raises(ValueError, match="speculative"):
        RetrievalSettings.for_mode("oracle", lay)


# ---- the spec decoding with over-fetch --------------------------------------------------------------------
HKV, G, D = 2, 3, 16


def drifting(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, HKV, D, generator=g)
    values = torch.randn(n, HKV, D, generator=g)
    qs = [torch.randn(HKV * G, D, generator=g)]
    for t in range(1, n):
        q = qs[-1] + 0.5 * torch.randn(HKV * G, D, generator=g)
        if t % 7 == 0:
            q[:G] = torch.randn(G, D, generator=g)
        qs.append(q)
    return keys, values, torch.stack(qs)


def current_top(st: LayerState, q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``[Hkv, k]`` the top k of context n by q, as the spec scores it."""
    lay = st.settings.layout
    budget = LayerState(RetrievalSettings(WorkingSetLayout(lay.page_size, lay.n_sink, k, lay.n_window),
                                          st.settings.gqa_aggregation, None, True), HKV)
    budget.digests, budget.rule_ctx = st.digests, st.rule_ctx
    return budget.select(q, n)


@pytest.mark.parametrize("agg", ["mean", "softmax-mean"])
def test_spec_with_overfetch_attends_the_corrected_top_k_and_recalls_only_it(agg, monkeypatch):
    """Every step: a corrected head attends its current top k (and k + m selected pages in all), its critical
    recall is its top k's missing pages; speculation keeps the previous query's top k + m; over the run the
    critical recall is below that of the same decode without over-fetch."""
    keys, values, qs = drifting(3, 260)
    k, m, n0 = 3, 3, 40
    lay = WorkingSetLayout(4, 1, k + m, 2, m)
    seen = {}
    real = reference_mod.sparse_attention

    def spy(q, keys_, values_, pages, page_size, scale):
        seen["pages"] = pages.clone()
        return real(q, keys_, values_, pages, page_size, scale)

    monkeypatch.setattr(reference_mod, "sparse_attention", spy)
    st = LayerState(RetrievalSettings(lay, agg, 0.9, True), HKV)
    st.prefill(keys[:n0], qs[n0 - 1])
    corrected = 0
    for n in range(n0 + 1, keys.shape[0] + 1):
        q = qs[n - 1]
        before = st.resident.clone()
        prev = st.q_prev
        st.decode(q, keys[:n], values[:n], D ** -0.5)
        stats = st.stats[-1]
        attended = seen["pages"]
        top = current_top(st, q, n, k)
        flags = ([True] * HKV if prev is None else
                 (torch.nn.functional.cosine_similarity(q, prev, dim=-1).view(HKV, G).mean(-1) < 0.9).tolist())
        critical = 0
        for h in range(HKV):
            sel = set(attended[h].tolist()) - {-1}
            assert len(set(st.resident[h].tolist()) - {-1}) == k + m  # enough candidates: every slot holds a page
            if flags[h]:
                a = set(top[h].tolist()) - {-1}
                assert a <= sel, (n, h)
                critical += len(a - set(before[h].tolist()))
        corrected += sum(flags)
        assert stats.critical_pages == critical and stats.corrected_heads == sum(flags)
        # speculation: the next step's selection is the top k + m of this query (over context n + 1)
        assert torch.equal(st.resident.sort(-1).values, st.select(q, n + 1).sort(-1).values)
    assert corrected > 20
    plain = LayerState(RetrievalSettings(WorkingSetLayout(4, 1, k, 2), agg, 0.9, True), HKV)
    monkeypatch.setattr(reference_mod, "sparse_attention", real)
    plain.prefill(keys[:n0], qs[n0 - 1])
    for n in range(n0 + 1, keys.shape[0] + 1):
        plain.decode(qs[n - 1], keys[:n], values[:n], D ** -0.5)
    assert sum(s.critical_pages for s in st.stats) < sum(s.critical_pages for s in plain.stats)


def test_spec_with_overfetch_is_dense_while_the_slots_cover_the_context():
    """k + m slots over at most k + m candidates: every page is attended at every step, as dense attention."""
    keys, values, qs = drifting(4, 120)
    lay = WorkingSetLayout(4, 2, 40, 3, 30)  # budget 10 pages + 30 over-fetched; 120 tokens = 30 pages
    st = LayerState(RetrievalSettings(lay, "mean", 0.9, True), HKV)
    st.prefill(keys[:20], qs[19])
    for n in range(21, 121):
        out = st.decode(qs[n - 1], keys[:n], values[:n], D ** -0.5)
        torch.testing.assert_close(out, dense_attention(qs[n - 1], keys[:n], values[:n], D ** -0.5), rtol=0,
                                   atol=1e-6)
        assert not st.stats[-1].sparse
