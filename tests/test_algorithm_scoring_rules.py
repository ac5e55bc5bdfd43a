"""Page-scoring rules (algorithm/scoring_rules.py): quest is exactly the Quest path of record, every rule's
digests are per page (appending equals recomputing), shapes and sizes, the bounds that must hold, and the
reference decode with each rule."""

import math

import pytest
import torch

from freekv_sglang.algorithm import (LayerState, RetrievalSettings, WorkingSetLayout, append_page_digest,
                                     dense_attention, page_digests)
from freekv_sglang.algorithm.scores import quest_scores
from freekv_sglang.algorithm.scoring_rules import NAMES, RULES, GridCodes, get_rule


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HKV, G, D, P = 2, 3, 16, 8
HQ = HKV * G
# one name per rule family, with the parameters the docstring's table describes
ALL = ["quest", "box1", "box2", "box1g2", "box1max", "grid2", "grid2mm", "grid2x0", "grid2sink", "grid2sink16",
       "grid2sink16mm", "grid2sink24mmx0", "grid3", "keyslse", "keysmax"]


def _keys(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # channels of unequal scale, as post-RoPE keys have
    scale = torch.linspace(0.2, 3.0, D)
    return (torch.randn(n, HKV, D, generator=g) * scale).to(dtype)


def _q(b, seed=1):
    return torch.randn(b, HQ, D, generator=torch.Generator().manual_seed(seed))


def _dense_logits(q, keys, n_pages):
    """``[B, Hq, Np, P]`` exact ``q . k / sqrt(D)`` of every full page."""
    pg = keys[: n_pages * P].float().unflatten(0, (n_pages, P))  # [Np, P, Hkv, D]
    k = pg.repeat_interleave(G, dim=2)  # [Np, P, Hq, D]: query head h reads KV head h // G
    return torch.einsum("bhd,nphd->bhnp", q.float(), k) / math.sqrt(D)


# ---- quest is the path of record ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quest_rule_is_page_digests_and_quest_scores_exactly(dtype):
    rule = get_rule("quest")
    assert rule is RULES["quest"] and rule.name == "quest"
    keys = _keys(5 * P + 3, dtype=dtype)  # a partial page at the end gets no digest
    ctx = rule.fit(keys)
    assert ctx is None
    dig = rule.digests(keys, P, ctx)
    ref = page_digests(keys, P)
    assert dig.dtype == dtype and torch.equal(dig, ref)
    q = _q(2).to(dtype)
    assert torch.equal(rule.scores(q, dig[None].expand(2, -1, -1, -1, -1), ctx),
                       quest_scores(q, ref[None].expand(2, -1, -1, -1, -1)))
    more = _keys(8 * P, seed=3, dtype=dtype)
    more[: keys.shape[0]] = keys
    assert torch.equal(rule.append(dig, more, P, ctx), append_page_digest(ref, more, P))
    assert rule.digest_values(P, D) == 2 * D and rule.score_macs(P, D) == 2 * D


def test_default_settings_score_with_quest():
    lay = WorkingSetLayout(P, 1, 2, 2)
    assert RetrievalSettings(lay).scoring == "quest"
    for mode in ("oracle", "speculative", "corrected"):
        assert RetrievalSettings.for_mode(mode, lay).scoring == "quest"
    assert LayerState(RetrievalSettings(lay), HKV).rule is RULES["quest"]


# ---- every rule -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_digests_are_per_page_and_append_equals_recompute(name):
    rule = get_rule(name)
    prompt = _keys(6 * P + 5)
    ctx = rule.fit(prompt)
    full = _keys(11 * P + 2, seed=4)
    full[: prompt.shape[0]] = prompt
    all_at_once = rule.digests(full, P, ctx)
    assert all_at_once.shape[:2] == (11, HKV) and all_at_once.dim() == 4
    # a request's digests grow page by page as decode fills pages; each page's digest is its own
    dig = rule.digests(prompt, P, ctx)
    assert dig.shape[0] == 6
    for n in range(prompt.shape[0] + 1, full.shape[0] + 1):
        dig = rule.append(dig, full[:n], P, ctx)
        assert dig.shape[0] == n // P
    torch.testing.assert_close(dig.float(), all_at_once.float(), rtol=1e-5, atol=1e-5)
    # and a page's digest does not depend on the other pages of the call
    for p in (0, 7, 10):
        torch.testing.assert_close(rule.digests(full[p * P : (p + 1) * P], P, ctx)[0].float(),
                                   all_at_once[p].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_score_shapes_and_declared_sizes(name):
    rule = get_rule(name)
    keys = _keys(9 * P)
    ctx = rule.fit(keys)
    dig = rule.digests(keys, P, ctx)
    s = rule.scores(_q(1).expand(2, -1, -1), dig[None].expand(2, -1, -1, -1, -1), ctx)
    assert s.shape == (2, HQ, 9) and s.dtype == torch.float32 and torch.isfinite(s).all()
    torch.testing.assert_close(s[0], s[1], rtol=1e-6, atol=1e-5)  # batch rows are independent
    vals, macs = rule.digest_values(P, D), rule.score_macs(P, D)
    assert vals > 0 and macs > 0
    if not name.startswith(("box", "grid")):  # no packed codes: one value per entry
        assert vals == dig.shape[2] * dig.shape[3], (name, vals, dig.shape)


@pytest.mark.parametrize("name", ["quest", "grid2", "grid2sink128", "grid3mm", "box2"])
def test_scores_against_shared_digests_equal_the_per_query_scores(name):
    """scores_shared (one digest set for a batch of positions, the locality replay's path) = scores of copies."""
    torch.manual_seed(3)
    rule = get_rule(name)
    k = torch.randn(200, 2, 16) * 3 + torch.randn(2, 16)
    q = torch.randn(5, 6, 16) * 2
    ctx = rule.fit(k)
    dig = rule.digests(k, 8, ctx)
    want = rule.scores(q, dig[None].expand(5, *dig.shape), ctx)
    got = rule.scores_shared(q, dig, ctx)
    assert got.shape == want.shape == (5, 6, 25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rule_names_round_trip_and_unknown_names_fail():
    for name in ALL:
        rule = get_rule(name)
        assert get_rule(rule.name).name == rule.name
    assert get_rule("grid2sink128").name == "grid2sink128" and get_rule("box1g2").name == "box1g2"
    for bad in ("nope", "sub4", "kmeans4", "grid2calcode", "qpre64grid2", "quest2", "box1g", ""):
        with pytest.raises(ValueError, match="unknown scoring rule"):
            get_rule(bad)
    assert "quest" in NAMES


# ---- what each rule promises --------------------------------------------------------------
def test_quest_bounds_every_key_of_the_page():
    rule = get_rule("quest")
    keys = _keys(12 * P)
    q = _q(3)
    s = rule.scores(q, rule.digests(keys, P)[None].expand(3, -1, -1, -1, -1))
    best = _dense_logits(q, keys, 12).amax(-1) * math.sqrt(D)  # max_t q . k_t
    assert (s >= best - 1e-4).all()


def test_exact_key_rules_are_the_page_mass_and_max_logit():
    keys = _keys(10 * P)
    q = _q(2)
    logits = _dense_logits(q, keys, 10)
    for name, want in (("keyslse", torch.logsumexp(logits, -1)), ("keysmax", logits.amax(-1))):
        rule = get_rule(name)
        got = rule.scores(q, rule.digests(keys, P)[None].expand(2, -1, -1, -1, -1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_box_codes_stay_in_the_box():
    keys = _keys(6 * P)
    for name, levels in (("box1", 2), ("box2", 4), ("box1g2", 2)):
        dig = get_rule(name).digests(keys, P)
        mx, mn, code = dig[:, :, 0], dig[:, :, 1], dig[:, :, 2:]
        assert torch.equal(mx, page_digests(keys, P)[:, :, 0]) and torch.equal(mn, page_digests(keys, P)[:, :, 1])
        assert code.min() >= 0 and code.max() <= levels - 1 and torch.equal(code, code.round())
        assert code.shape[2] == (P // 2 if "g2" in name else P)


# ---- grids that do not depend on the request, and box2 -----------------------------------
def _grid_direct(keys, minmax):
    """``(lo, hi)`` ``[Hkv, D]`` per (KV head, channel), one channel at a time with sorted values."""
    lo, hi = torch.empty(HKV, D), torch.empty(HKV, D)
    for h in range(HKV):
        for c in range(D):
            v = keys[:, h, c].double()
            if minmax:
                lo[h, c], hi[h, c] = v.min(), v.max()
            else:  # linear interpolation between order statistics, as numpy's default quantile
                srt = v.sort().values
                for out, qq in ((lo, 0.005), (hi, 0.995)):
                    pos = qq * (len(srt) - 1)
                    i = int(math.floor(pos))
                    j = min(i + 1, len(srt) - 1)
                    out[h, c] = srt[i] + (pos - i) * (srt[j] - srt[i])
    return lo, hi


def _codes_direct(keys, lo, hi, levels):
    """Codes ``[n, Hkv, D]``: how many of the ``levels - 1`` inner grid edges lie at or below each key."""
    edges = torch.stack([lo + (hi - lo) * j / levels for j in range(1, levels)])  # [levels - 1, Hkv, D]
    return (keys[:, None] >= edges[None]).sum(1).float()


def _lse_scores_direct(q, k_hat):
    """``k_hat`` ``[Np, Hkv, T, D]`` -> ``[B, Hq, Np]`` of ``logsumexp_t q . k_hat_t / sqrt(D)``, head by head."""
    b, np_ = q.shape[0], k_hat.shape[0]
    out = torch.empty(b, HQ, np_)
    for bi in range(b):
        for h in range(HQ):
            for p in range(np_):
                out[bi, h, p] = torch.logsumexp(k_hat[p, h // G] @ q[bi, h] / math.sqrt(D), 0)
    return out


@pytest.mark.parametrize("name,n_fit,minmax,skip0", [
    ("grid2", None, False, False), ("grid2mm", None, True, False), ("grid2x0", None, False, True),
    ("grid2sink16", 16, False, False), ("grid2sink16mm", 16, True, False), ("grid2sink24mmx0", 24, True, True),
    ("grid2sink", 512, False, False)])
def test_grid_fits_digests_and_scores_match_a_direct_computation(name, n_fit, minmax, skip0):
    keys = _keys(9 * P + 3, seed=11) + 0.5  # never zero
    keys[0] *= 6.0  # an outlier token 0, as the attention sink's keys are
    rule = get_rule(name)
    assert rule.name == name and isinstance(rule, GridCodes)
    ctx = rule.fit(keys)
    fit_keys = keys[: n_fit or keys.shape[0]]  # grid2sink (512) on a shorter prompt: all of it
    lo, hi = _grid_direct(fit_keys[1:] if skip0 else fit_keys, minmax)
    torch.testing.assert_close(ctx[0], lo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx[1], hi, rtol=1e-5, atol=1e-5)
    dig = rule.digests(keys, P, ctx)  # [9, Hkv, P, D]
    code = _codes_direct(keys[: 9 * P], ctx[0], ctx[1], 4)
    assert torch.equal(dig, code.unflatten(0, (9, P)).permute(0, 2, 1, 3))
    assert code.min() == 0 and code.max() == 3 and len(code.unique()) == 4
    q = _q(2, seed=5)
    k_hat = ctx[0][:, None] + (dig + 0.5) * (ctx[1] - ctx[0])[:, None] / 4  # [Np, Hkv, P, D]
    got = rule.scores(q, dig[None].expand(2, -1, -1, -1, -1), ctx)
    torch.testing.assert_close(got, _lse_scores_direct(q, k_hat), rtol=1e-5, atol=1e-5)
    assert rule.digest_values(P, D) == P * D * 2 / 16 and rule.score_macs(P, D) == P * D


def test_a_sink_grid_is_the_same_for_every_request_that_shares_the_sink():
    """Two prompts that share their first 3 pages: with a grid fitted on the first 2 pages (the sink), the
    shared pages get the same digests; with the prompt-fitted grid they do not."""
    a = _keys(10 * P, seed=21)
    b = _keys(14 * P, seed=22) * 1.7
    b[: 3 * P] = a[: 3 * P]
    sink, prompt = get_rule(f"grid2sink{2 * P}"), get_rule("grid2")
    da, db = sink.digests(a, P, sink.fit(a)), sink.digests(b, P, sink.fit(b))
    assert torch.equal(da[:3], db[:3]) and not torch.equal(da[3:10], db[3:10])
    pa, pb = prompt.digests(a, P, prompt.fit(a)), prompt.digests(b, P, prompt.fit(b))
    assert not torch.equal(pa[:3], pb[:3])


def test_box2_matches_a_direct_computation():
    """box2: the Quest box per page and channel and a 2-bit code of each key inside it (4 equal steps)."""
    keys = _keys(7 * P, seed=51) - 0.25
    rule = get_rule("box2")
    dig = rule.digests(keys, P)  # [7, Hkv, 2 + P, D]
    q = _q(2, seed=52)
    k_hat = torch.empty(7, HKV, P, D)
    for p in range(7):
        page = keys[p * P : (p + 1) * P]  # [P, Hkv, D]
        mx, mn = page.amax(0), page.amin(0)
        assert torch.equal(dig[p, :, 0], mx) and torch.equal(dig[p, :, 1], mn)
        code = _codes_direct(page, mn, mx, 4)  # [P, Hkv, D]
        code = torch.where(page == mx, 3.0, code)  # the page's maximum sits in the top step
        assert torch.equal(dig[p, :, 2:], code.transpose(0, 1))
        k_hat[p] = (mn + (code + 0.5) * (mx - mn) / 4).transpose(0, 1)
    torch.testing.assert_close(rule.scores(q, dig[None].expand(2, -1, -1, -1, -1)), _lse_scores_direct(q, k_hat),
                               rtol=1e-5, atol=1e-5)
    assert rule.digest_values(P, D) == 2 * D + P * D * 2 / 16 and rule.score_macs(P, D) == P * D


# ---- the reference decode with each rule -------------------------------------------------
@pytest.mark.parametrize("name", ["box1", "box2", "grid2sink64", "keyslse"])
def test_reference_decode_with_a_rule(name):
    """A covering budget is dense whatever the rule (speculation and correction on); a small one selects
    ``n_select`` candidate pages per KV head, and the rule changes which (at least once over the decode)."""
    n0, n_end = 9 * P + 3, 14 * P
    g = torch.Generator().manual_seed(7)
    keys = _keys(n_end, seed=8)
    values = torch.randn(n_end, HKV, D, generator=g)
    qs = torch.randn(n_end, HQ, D, generator=g)

    def decode(layout, rule, mode="corrected"):
        st = LayerState(RetrievalSettings.for_mode(mode, layout, scoring=rule), HKV)
        st.prefill(keys[:n0], qs[n0 - 1])
        outs, sel = [], []
        for n in range(n0 + 1, n_end + 1):
            outs.append(st.decode(qs[n - 1], keys[:n], values[:n], D ** -0.5))
            sel.append(st.resident.clone())
        return outs, sel

    cover = WorkingSetLayout(P, 1, 16, 2)
    for n, out in zip(range(n0 + 1, n_end + 1), decode(cover, name)[0]):
        torch.testing.assert_close(out, dense_attention(qs[n - 1], keys[:n], values[:n], D ** -0.5))
    small = WorkingSetLayout(P, 1, 3, 2)
    _, sel = decode(small, name, "oracle")  # oracle: the resident pages after a step are that step's selection
    _, sel_q = decode(small, "quest", "oracle")
    for n, s in zip(range(n0 + 1, n_end + 1), sel):
        cand = set(range(1, max(math.ceil(n / P) - 2, 1)))
        for h in range(HKV):
            assert set(s[h].tolist()) <= cand and len(set(s[h].tolist())) == 3
    assert any(not torch.equal(a, b) for a, b in zip(sel, sel_q))
