"""Page-scoring rules (algorithm/scoring_rules.py): quest is exactly the Quest path of record, every rule's
digests are per page (appending equals recomputing), shapes and sizes, the bounds that must hold, and the
reference decode with each rule."""

import math

import pytest
import torch

from freekv_sglang.algorithm import (LayerState, RetrievalSettings, WorkingSetLayout, append_page_digest,
                                     dense_attention, page_digests)
from freekv_sglang.algorithm.scores import quest_scores
from freekv_sglang.algorithm.scoring_rules import NAMES, RULES, get_rule


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HKV, G, D, P = 2, 3, 16, 8
HQ = HKV * G
# one name per rule family, with the parameters the docstring's table describes
ALL = ["quest", "pcabox", "sub4", "sub2", "topnorm2", "kmeans3", "meanstd1", "meanabs1", "meanabs0.5", "lowrank4",
       "lowrank4max", "chan4", "chan4max", "box1", "box2", "box1g2", "box1max", "split1", "psplit1", "split1max",
       "grid2", "keyslse", "keysmax"]


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
    if not name.startswith(("box", "split", "psplit", "grid")):  # rules without packed codes: one value per entry
        assert vals == dig.shape[2] * dig.shape[3], (name, vals, dig.shape)


def test_rule_names_round_trip_and_unknown_names_fail():
    for name in ALL:
        rule = get_rule(name)
        assert get_rule(rule.name).name == rule.name
    assert get_rule("meanabs1").name == "meanabs1" and get_rule("box1g2").name == "box1g2"
    for bad in ("nope", "sub", "topnorm", "quest2", "box1g", ""):
        with pytest.raises(ValueError, match="unknown scoring rule"):
            get_rule(bad)
    assert "quest" in NAMES


# ---- what each rule promises --------------------------------------------------------------
@pytest.mark.parametrize("name", ["quest", "sub4", "sub2", "pcabox", "meanabs1"])
def test_bound_rules_bound_every_key_of_the_page(name):
    rule = get_rule(name)
    keys = _keys(12 * P)
    ctx = rule.fit(keys[: 7 * P])  # fitted on the prompt, applied to later pages too
    q = _q(3)
    s = rule.scores(q, rule.digests(keys, P, ctx)[None].expand(3, -1, -1, -1, -1), ctx)
    best = _dense_logits(q, keys, 12).amax(-1) * math.sqrt(D)  # max_t q . k_t
    assert (s >= best - 1e-4).all()


def test_finer_boxes_are_tighter_and_whole_page_sub_pages_are_quest():
    keys = _keys(10 * P)
    q = _q(2)
    quest = get_rule("quest").scores(q, page_digests(keys, P)[None].expand(2, -1, -1, -1, -1))
    sub = {s: get_rule(f"sub{s}").scores(q, get_rule(f"sub{s}").digests(keys, P)[None].expand(2, -1, -1, -1, -1))
           for s in (P, 4, 2, 1)}
    torch.testing.assert_close(sub[P], quest)
    assert (sub[4] <= quest + 1e-5).all() and (sub[2] <= sub[4] + 1e-5).all()
    torch.testing.assert_close(sub[1], _dense_logits(q, keys, 10).amax(-1) * math.sqrt(D), rtol=1e-5, atol=1e-4)


def test_exact_key_rules_are_the_page_mass_and_max_logit():
    keys = _keys(10 * P)
    q = _q(2)
    logits = _dense_logits(q, keys, 10)
    for name, want in (("keyslse", torch.logsumexp(logits, -1)), ("keysmax", logits.amax(-1))):
        rule = get_rule(name)
        got = rule.scores(q, rule.digests(keys, P)[None].expand(2, -1, -1, -1, -1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_full_rank_sketches_rank_pages_like_the_exact_keys():
    """With every axis (``R = D``) the low-rank sketch is exact up to ``q . mu``, the same for every page;
    with every channel ``chanD`` is the exact rule."""
    keys = _keys(10 * P)
    q = _q(2)
    exact = torch.logsumexp(_dense_logits(q, keys, 10), -1)
    lr = get_rule(f"lowrank{D}")
    ctx = lr.fit(keys)
    got = lr.scores(q, lr.digests(keys, P, ctx)[None].expand(2, -1, -1, -1, -1), ctx)
    shift = torch.einsum("bkgd,kd->bkg", q.view(2, HKV, G, D), ctx[0]).reshape(2, HQ, 1) / math.sqrt(D)
    torch.testing.assert_close(got + shift, exact, rtol=1e-4, atol=1e-4)
    ch = get_rule(f"chan{D}")
    ctx = ch.fit(keys)
    got = ch.scores(q, ch.digests(keys, P, ctx)[None].expand(2, -1, -1, -1, -1), ctx)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


def test_representatives_are_keys_or_centroids_of_the_page():
    keys = _keys(4 * P)
    top = get_rule("topnorm2").digests(keys, P)  # [4, Hkv, 2, D]
    for p in range(4):
        for h in range(HKV):
            page = keys[p * P : (p + 1) * P, h]
            norms = page.norm(dim=-1)
            assert torch.equal(top[p, h, 0], page[norms.argmax()])
    km = get_rule(f"kmeans{P}").digests(keys, P)  # one centroid per key: the keys themselves
    for p in range(4):
        for h in range(HKV):
            got = km[p, h].tolist()
            assert sorted(map(tuple, got)) == sorted(map(tuple, keys[p * P : (p + 1) * P, h].tolist()))


def test_box_codes_stay_in_the_box():
    keys = _keys(6 * P)
    for name, levels in (("box1", 2), ("box2", 4), ("box1g2", 2)):
        dig = get_rule(name).digests(keys, P)
        mx, mn, code = dig[:, :, 0], dig[:, :, 1], dig[:, :, 2:]
        assert torch.equal(mx, page_digests(keys, P)[:, :, 0]) and torch.equal(mn, page_digests(keys, P)[:, :, 1])
        assert code.min() >= 0 and code.max() <= levels - 1 and torch.equal(code, code.round())
        assert code.shape[2] == (P // 2 if "g2" in name else P)


def test_mean_spread_digests():
    keys = _keys(3 * P)
    pg = keys.unflatten(0, (3, P))
    std = get_rule("meanstd1").digests(keys, P)
    torch.testing.assert_close(std[:, :, 0], pg.mean(1))
    torch.testing.assert_close(std[:, :, 1], pg.std(1, unbiased=False))
    dev = get_rule("meanabs1").digests(keys, P)
    torch.testing.assert_close(dev[:, :, 1], (pg - pg.mean(1, keepdim=True)).abs().amax(1))


# ---- the reference decode with each rule -------------------------------------------------
@pytest.mark.parametrize("name", ["sub4", "topnorm2", "meanabs1", "pcabox", "lowrank4", "box1", "split1", "keyslse"])
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
