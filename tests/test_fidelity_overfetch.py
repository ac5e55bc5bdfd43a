"""Over-fetch replay (fidelity/overfetch.py) on random queries and keys: no model needed."""

import torch

from freekv_sglang.algorithm import WorkingSetLayout, aggregate_gqa, query_similarity, quest_scores, topk_pages
from freekv_sglang.algorithm.digests import page_digests
from freekv_sglang.fidelity import overfetch

KW = dict(page_size=16, sink=32, window=64)


def _qk(n=700, hq=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, hkv, d, generator=g)
    # slowly drifting queries: consecutive ones alike, far ones not
    drift = torch.randn(hq, d, generator=g) + torch.cumsum(0.1 * torch.randn(n, hq, d, generator=g), 0)
    q = drift + 0.3 * torch.randn(n, hq, d, generator=g)
    return q, k


def test_one_step_counted_directly():
    q, k = _qk()
    start, m, tau = 400, 4, 0.985
    out = overfetch.replay_layer(q, k, start, 2, budget=128, margins=(0, m), tau=tau, **KW)
    lay = WorkingSetLayout.from_tokens(16, 32, 128, 64)
    dig = page_digests(k, 16)[None]
    for t in (start + 2, start + 57, 699):  # position t, context t + 1
        cand = lay.candidate_mask(torch.tensor([t + 1]), dig.shape[1])
        cur = topk_pages(aggregate_gqa(quest_scores(q[t:t + 1], dig), 2, "mean", cand, head_dim=16), 8)[0]
        spec = [topk_pages(aggregate_gqa(quest_scores(q[s - 1:s], dig), 2, "mean",
                                         lay.candidate_mask(torch.tensor([s + 1]), dig.shape[1]), head_dim=16),
                           8 + m)[0] for s in (t - 1, t)]
        i = t - start - 2
        for h in range(2):
            assert int(out["critical"][m][i, h]) == len(set(cur[h].tolist()) - set(spec[1][h].tolist()) - {-1})
            assert int(out["speculative"][m][i, h]) == len(set(spec[1][h].tolist()) - set(spec[0][h].tolist()) - {-1})
        sim = query_similarity(q[t:t + 1], q[t - 1:t], 2)[0]
        assert torch.equal(out["corrected"][i], sim < tau)
    assert out["corrected"].any() and (~out["corrected"]).any()


def test_a_margin_never_adds_critical_pages_and_covering_margins_leave_none():
    q, k = _qk(seed=1)
    lay = WorkingSetLayout.from_tokens(16, 32, 128, 64)
    n_pages = q.shape[0] // 16
    margins = (0, 2, 8, n_pages)
    out = overfetch.replay_layer(q, k, 400, 2, budget=128, margins=margins, tau=0.985, **KW)
    c = out["critical"]
    assert bool((c[2] <= c[0]).all()) and bool((c[8] <= c[2]).all())
    assert int(c[n_pages].sum()) == 0  # every candidate speculated
    assert int(c[8].sum()) < int(c[0].sum())
    rows = overfetch.summarize([out], lay.n_select, margins)
    assert rows[0]["critical_pages_per_corrected"] > rows[1]["critical_pages_per_corrected"] >= rows[2]["critical_pages_per_corrected"]
    assert rows[-1]["any_critical"] == 0.0
    assert rows[2]["speculative_pages_per_check"] >= 0
    assert "| 0 | 8 |" in overfetch.table(rows)
