"""LayerState (one request, one layer, decoded step by step) vs. dense attention and vs. a
brute-force re-derivation of which pages every KV head must see at every step."""

import math

import pytest
import torch

from freekv_sglang.algorithm import LayerState, RetrievalSettings, WorkingSetLayout, dense_attention



@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one thread is as fast, and immune to the 10-20x slowdown that
    2 OpenMP threads suffer when another process competes for a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HKV, G, D = 2, 3, 16
HQ = HKV * G
SCALE = D ** -0.5


def make_sequence(seed: int, n: int):
    """Random keys/values and a query stream that drifts, at a different pace per KV head,
    with occasional jumps (each KV head on its own period), so that consecutive-query cosines
    span both sides of the usual thresholds and heads disagree about correction."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, HKV, D, generator=g)
    values = torch.randn(n, HKV, D, generator=g)
    drift = torch.tensor([0.3, 0.6]).repeat_interleave(G)[:, None]  # per query head
    period = [17, 11]
    qs = [torch.randn(HQ, D, generator=g)]
    for t in range(1, n):
        q = qs[-1] + drift * torch.randn(HQ, D, generator=g)
        for h in range(HKV):
            if t % period[h] == 0:
                q[h * G : (h + 1) * G] = torch.randn(G, D, generator=g)
        qs.append(q)
    return keys, values, torch.stack(qs)


def run(settings, keys, values, qs, n0):
    """Prefill n0 tokens, then decode token n0 .. N-1; query of token i is qs[i]."""
    st = LayerState(settings, HKV)
    st.prefill(keys[:n0], qs[n0 - 1])
    outs = [st.decode(qs[n - 1], keys[:n], values[:n], SCALE) for n in range(n0 + 1, keys.shape[0] + 1)]
    return outs, st


# ---- brute force -----------------------------------------------------------------------
def brute_select(q, keys, n, lay: WorkingSetLayout, agg="mean"):
    """Per KV head: the set of candidate pages of context n with the top aggregated bounds."""
    p_sz = lay.page_size
    n_pages = math.ceil(n / p_sz)
    ws = max(n_pages - lay.n_window, lay.n_sink)
    cands = list(range(lay.n_sink, ws))
    out = []
    for h in range(HKV):
        scores = {}
        per_head = {}
        for p in cands:
            blk = keys[p * p_sz : (p + 1) * p_sz, h].double()
            mx, mn = blk.max(0).values, blk.min(0).values
            per_head[p] = [float(torch.maximum(q[j].double() * mx, q[j].double() * mn).sum()) for j in range(h * G, (h + 1) * G)]
        for p in cands:
            if agg == "mean":
                scores[p] = sum(per_head[p]) / G
            elif agg == "max":
                scores[p] = max(per_head[p])
            else:  # softmax over candidates per query head, then mean
                acc = 0.0
                for j in range(G):
                    z = [per_head[c][j] / math.sqrt(D) for c in cands]
                    m = max(z)
                    acc += math.exp(per_head[p][j] / math.sqrt(D) - m) / sum(math.exp(x - m) for x in z)
                scores[p] = acc / G
        out.append(set(sorted(cands, key=lambda c: -scores[c])[: lay.n_select]))
    return out


def visible_tokens(lay, n, selected):
    """Per KV head, token indices of sink + selected + window pages for context n."""
    p_sz = lay.page_size
    n_pages = math.ceil(n / p_sz)
    ws = max(n_pages - lay.n_window, lay.n_sink)
    pages = [set(range(min(lay.n_sink, n_pages))) | selected[h] | set(range(ws, n_pages)) for h in range(HKV)]
    return [[t for t in range(n) if t // p_sz in pages[h]] for h in range(HKV)]


def brute_attention(q, keys, values, toks):
    out = torch.empty(HQ, D, dtype=torch.float64)
    for j in range(HQ):
        h = j // G
        idx = torch.tensor(toks[h])
        w = torch.softmax(keys[idx, h].double() @ q[j].double() * SCALE, 0)
        out[j] = w @ values[idx, h].double()
    return out


def cos_flags(q, qp, tau):
    cos = torch.nn.functional.cosine_similarity(q.double(), qp.double(), dim=-1).view(HKV, G).mean(-1)
    return [bool(c < tau) for c in cos]


# ---- tests -----------------------------------------------------------------------------
BIG = WorkingSetLayout(4, 2, 64, 3)  # select budget >= every candidate: dense
SMALL = WorkingSetLayout(4, 1, 3, 2)


@pytest.mark.parametrize("mode,tau", [("oracle", None), ("speculative", None), ("corrected", 0.8), ("corrected", 0.9)])
@pytest.mark.parametrize("agg", ["mean", "softmax-mean", "max"])
@pytest.mark.parametrize("n0", [3, 37])  # 3: the prompt is shorter than the sink
def test_budget_covering_context_equals_dense(mode, tau, agg, n0):
    keys, values, qs = make_sequence(1, 150)
    settings = RetrievalSettings.for_mode(mode, BIG, tau=tau, gqa_aggregation=agg)
    outs, st = run(settings, keys, values, qs, n0)
    for i, n in enumerate(range(n0 + 1, 151)):
        torch.testing.assert_close(outs[i], dense_attention(qs[n - 1], keys[:n], values[:n], SCALE), rtol=0, atol=1e-6)
        assert not st.stats[i].sparse
    assert len(st.stats) == 150 - n0


def test_oracle_equals_corrected_with_tau_one_exactly():
    """tau = 1.0 corrects every head at every step (no consecutive queries are identical here),
    so attention sees the current query's selection, as the oracle does: same pages, same bits."""
    keys, values, qs = make_sequence(2, 160)
    o, so = run(RetrievalSettings.for_mode("oracle", SMALL), keys, values, qs, 30)
    c, sc = run(RetrievalSettings.for_mode("corrected", SMALL, tau=1.0), keys, values, qs, 30)
    s, ss = run(RetrievalSettings.for_mode("speculative", SMALL), keys, values, qs, 30)
    for a, b in zip(o, c):
        assert torch.equal(a, b)
    assert all(x.corrected_heads == HKV for x in sc.stats)
    assert all(x.corrected_heads == HKV for x in so.stats)
    differ = sum(not torch.allclose(a, b, atol=1e-5) for a, b in zip(o, s))
    assert differ > 10  # speculation does change the pages
    assert torch.allclose(o[0], s[0])  # ...except on the first step, which reselects every head
    assert ss.stats[0].corrected_heads == HKV and all(x.corrected_heads == 0 for x in ss.stats[1:])
    assert all(x.sparse for x in so.stats)


@pytest.mark.parametrize("agg", ["mean", "softmax-mean", "max"])
def test_oracle_attends_current_query_selection(agg):
    keys, values, qs = make_sequence(3, 140)
    n0 = 24
    settings = RetrievalSettings.for_mode("oracle", SMALL, gqa_aggregation=agg)
    outs, st = run(settings, keys, values, qs, n0)
    prev = brute_select(qs[n0 - 1], keys, n0 + 1, SMALL, agg)  # seeded by the prefill
    for i, n in enumerate(range(n0 + 1, 141)):
        sel = brute_select(qs[n - 1], keys, n, SMALL, agg)
        torch.testing.assert_close(outs[i].double(), brute_attention(qs[n - 1], keys, values, visible_tokens(SMALL, n, sel)),
                                   rtol=1e-5, atol=1e-5)
        assert st.stats[i].recalled_pages == sum(len(sel[h] - prev[h]) for h in range(HKV))
        assert st.stats[i].corrected_heads == HKV and st.stats[i].kv_heads == HKV
        prev = sel


def test_speculative_attends_previous_query_selection():
    keys, values, qs = make_sequence(4, 140)
    n0 = 24
    outs, st = run(RetrievalSettings.for_mode("speculative", SMALL), keys, values, qs, n0)
    resident = brute_select(qs[n0 - 1], keys, n0 + 1, SMALL)
    for i, n in enumerate(range(n0 + 1, 141)):
        recalled = 0
        if i == 0:  # first step: no previous query, reselect with the current one before attention
            sel = brute_select(qs[n - 1], keys, n, SMALL)
            recalled += sum(len(sel[h] - resident[h]) for h in range(HKV))
        else:  # pages chosen with the previous step's query, for this step's context
            sel = brute_select(qs[n - 2], keys, n, SMALL)
            assert sel == resident
        torch.testing.assert_close(outs[i].double(), brute_attention(qs[n - 1], keys, values, visible_tokens(SMALL, n, sel)),
                                   rtol=1e-5, atol=1e-5)
        nxt = brute_select(qs[n - 1], keys, n + 1, SMALL)  # speculative selection for the next step
        recalled += sum(len(nxt[h] - sel[h]) for h in range(HKV))
        assert st.stats[i].recalled_pages == recalled
        resident = nxt


@pytest.mark.parametrize("tau", [0.8, 0.9])
def test_corrected_mixes_per_head(tau):
    keys, values, qs = make_sequence(5, 150)
    n0 = 24
    outs, st = run(RetrievalSettings.for_mode("corrected", SMALL, tau=tau), keys, values, qs, n0)
    n_mixed = 0
    for i, n in enumerate(range(n0 + 1, 151)):
        cur = brute_select(qs[n - 1], keys, n, SMALL)
        if i == 0:
            flags = [True] * HKV
        else:
            flags = cos_flags(qs[n - 1], qs[n - 2], tau)
        spec = brute_select(qs[n - 2], keys, n, SMALL) if i else cur
        sel = [cur[h] if flags[h] else spec[h] for h in range(HKV)]
        n_mixed += len(set(flags)) == 2
        assert st.stats[i].corrected_heads == sum(flags)
        torch.testing.assert_close(outs[i].double(), brute_attention(qs[n - 1], keys, values, visible_tokens(SMALL, n, sel)),
                                   rtol=1e-5, atol=1e-5)
    assert n_mixed > 0  # some steps correct one head and not the other
    rate = sum(x.corrected_heads for x in st.stats[1:]) / (HKV * (len(st.stats) - 1))
    assert 0.0 < rate < 1.0


def test_stats_are_sane_over_a_long_decode():
    keys, values, qs = make_sequence(6, 300)
    lay = WorkingSetLayout(4, 2, 6, 3)
    for mode in ("oracle", "speculative", "corrected"):
        _, st = run(RetrievalSettings.for_mode(mode, lay, tau=0.9), keys, values, qs, 20)
        for x, n in zip(st.stats, range(21, 301)):
            assert x.kv_heads == HKV
            assert 0 <= x.corrected_heads <= HKV
            # at most every selected slot of every head, twice (correction + speculation)
            assert 0 <= x.recalled_pages <= 2 * HKV * lay.n_select
            assert x.sparse == (not lay.is_dense(n))
        assert any(x.sparse for x in st.stats) and not all(x.sparse for x in st.stats)
