"""The benchmark's calibrated synthetic locality (FREEKV_BENCH_LOCALITY, freekv_sglang/runtime/synthetic.py) on
the CPU: the generator's construction, the calibration, the runtime's use of it, and the check that it reproduces
the measured correction rate and page-change share with the reference selection over Gaussian keys."""

import json
import math
import os

import pytest
import torch

from freekv_sglang.algorithm import WorkingSetLayout
from freekv_sglang.kernels.synthetic_query import calibrated_queries_reference, draw_key
from freekv_sglang.runtime import synthetic as S
from freekv_sglang.settings import EnvSettings, load_settings
from launch_scripts import load_launch_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED = os.path.join(ROOT, S.DEFAULT_LOCALITIES["quest"])
MEASURED_GRID2 = os.path.join(ROOT, S.DEFAULT_LOCALITIES["grid2"])


def _drawn(quant, seed, layer, rows, n, hkv):
    """The similarity the generator draws for each (request, KV head): ``[B, Hkv]``."""
    x = draw_key(seed, layer, rows[:, None], torch.arange(hkv)[None, :], n[:, None])
    u = ((x >> 8).float() + 0.5) / 16777216.0
    return torch.stack([torch.stack([S.similarity_at(quant[j], u[b, j: j + 1])[0] for j in range(hkv)])
                        for b in range(len(rows))])


def _tables(hkv, seed=0, lo=0.45, hi=0.99):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(lo + (hi - lo) * torch.rand(hkv, 101, generator=g), dim=-1).values.contiguous()


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64), (28, 4, 128)])
def test_each_step_has_the_drawn_group_similarity_and_ranking_step(hq, hkv, d):
    group = hq // hkv
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(4, hq, d, generator=g), dim=-1) * math.sqrt(d)
    noise = torch.randn(256, d, generator=g)
    quant = _tables(hkv)
    kappa = torch.full((hkv, 1), 0.3)
    rows = torch.tensor([0, 3, 5])
    q_prev = torch.zeros(6, hq, d)
    kw = dict(layer=2, seed=5, group=group, bin0=12.0, decoy=S.DECOY_SCALE, pull=S.PULL)
    for t in range(6):
        n = torch.tensor([100, 4000, 70000]) + t
        q = calibrated_queries_reference(q_prev[rows], q_prev, u, noise, quant, kappa, rows, n, **kw)
        norms = q.norm(dim=-1)
        nd = max(1, group // 3)
        decoy = torch.arange(hq) % group >= group - nd
        torch.testing.assert_close(norms[:, ~decoy], torch.full_like(norms[:, ~decoy], math.sqrt(d)))
        torch.testing.assert_close(norms[:, decoy], torch.full_like(norms[:, decoy], math.sqrt(d) * S.DECOY_SCALE))
        if t > 0:
            cos = torch.nn.functional.cosine_similarity(q, q_prev[rows], dim=-1)  # [B, Hq]
            s = _drawn(quant, 5, 2, rows, n, hkv)
            c_rank = 1 - 0.3 * (1 - s)
            floor = ((group - nd) * c_rank - nd) / group  # below it the decoys cannot pull the mean
            torch.testing.assert_close(cos.view(-1, hkv, group).mean(-1), torch.maximum(s, floor), atol=1e-5, rtol=0)
            rank = cos.view(-1, hkv, group)[..., : group - nd]
            torch.testing.assert_close(rank, c_rank[..., None].expand_as(rank), atol=1e-5, rtol=0)
        q_prev[rows] = q


def test_a_similarity_below_the_decoys_reach_is_realised_at_the_floor():
    hq, hkv, d = 8, 2, 64
    u = torch.nn.functional.normalize(torch.randn(1, hq, d), dim=-1) * 8
    prev = torch.nn.functional.normalize(torch.randn(1, hq, d), dim=-1) * 8
    q = calibrated_queries_reference(prev, prev, u, torch.randn(16, d), torch.full((hkv, 101), 0.2),
                                     torch.full((hkv, 1), 0.1), torch.zeros(1, dtype=torch.long), torch.tensor([9000]),
                                     layer=0, seed=0, group=4, bin0=12.0, decoy=S.DECOY_SCALE, pull=S.PULL)
    cos = torch.nn.functional.cosine_similarity(q, prev, dim=-1).view(hkv, 4)
    torch.testing.assert_close(cos[:, :3], torch.full((hkv, 3), 0.92), atol=1e-5, rtol=0)
    torch.testing.assert_close(cos[:, 3], torch.full((hkv,), -1.0), atol=1e-5, rtol=0)  # the decoy turns around
    torch.testing.assert_close(cos.mean(-1), torch.full((hkv,), (3 * 0.92 - 1) / 4), atol=1e-5, rtol=0)


def test_the_first_step_starts_from_the_anchor_and_no_decoy_without_gqa():
    hq = hkv = 4
    d = 32
    g = torch.Generator().manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(2, hq, d, generator=g), dim=-1) * math.sqrt(d)
    quant = _tables(hkv, lo=0.7, hi=0.95)
    rows, n = torch.tensor([1]), torch.tensor([5000])
    q_prev = torch.zeros(2, hq, d)
    q = calibrated_queries_reference(q_prev[rows], q_prev, u, torch.randn(64, d, generator=g), quant,
                                     torch.ones(hkv, 1), rows, n, layer=0, seed=0, group=1, bin0=12.0,
                                     decoy=S.DECOY_SCALE, pull=S.PULL)
    cos = torch.nn.functional.cosine_similarity(q[0], u[1], dim=-1)  # from the anchor of row 1 % 2
    torch.testing.assert_close(cos, _drawn(quant, 0, 0, rows, n, hkv)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(q.norm(dim=-1), torch.full((1, hq), math.sqrt(d)))  # no decoy: every head full


def test_the_context_bins_interpolate_kappa_in_log2():
    hq, hkv, d = 8, 2, 16
    u = torch.nn.functional.normalize(torch.randn(1, hq, d), dim=-1) * 4
    prev = torch.nn.functional.normalize(torch.randn(1, hq, d), dim=-1) * 4
    quant = torch.full((hkv, 101), 0.8)
    kappa = torch.tensor([[0.1, 0.5, 0.9]] * hkv)  # at 2**12, 2**13, 2**14
    rows = torch.zeros(4, dtype=torch.long)
    n = torch.tensor([1000, 4096, 6 * 1024, 100000])
    q = calibrated_queries_reference(prev.expand(4, -1, -1), prev, u, torch.randn(16, d), quant, kappa, rows, n,
                                     layer=0, seed=0, group=4, bin0=12.0, decoy=S.DECOY_SCALE, pull=S.PULL)
    cos = torch.nn.functional.cosine_similarity(q, prev.expand(4, -1, -1), dim=-1)[:, 0]
    kap = torch.tensor([0.1, 0.1, 0.1 + 0.4 * (math.log2(6 * 1024) - 12), 0.9])
    torch.testing.assert_close(cos, 1 - kap * 0.2, atol=1e-5, rtol=0)


def test_measured_tables_are_mapped_by_depth_and_head():
    m = S.MeasuredLocality.load(MEASURED)
    assert m.quant.shape == (30, 3, 101) and m.budget == 1024
    quant, share, src_l, src_h = m.mapped(32, 8)
    assert quant.shape == (32, 8, 101) and share.shape == (32, 8)
    assert src_l[0] == 0 and src_l[-1] == 29 and src_l[16] == 15 and src_l == sorted(src_l)
    assert src_h == [0, 1, 2, 0, 1, 2, 0, 1]
    assert torch.equal(quant[31, 4], m.quant[29, 1]) and float(share[16, 2]) == float(m.page_share[15, 2])
    same = m.mapped(30, 3)
    assert torch.equal(same[0], m.quant) and same[2] == list(range(30))


def test_the_repository_measurement_matches_its_pooled_numbers():
    with open(MEASURED) as f:
        data = json.load(f)
    m = S.MeasuredLocality.load(MEASURED)
    # pooled over heads with equal steps: the mean of the per-head rates
    assert float(S.correction_rate(m.quant, 0.9).mean()) == pytest.approx(data["pooled"]["correction_rate"]["0.9"],
                                                                           abs=0.01)
    assert float(m.page_share.mean()) == pytest.approx(data["pooled"]["page_change"]["1024"], abs=0.002)


def test_solve_kappa_hits_the_target_share():
    grid = torch.tensor(S.STEP_GRID)
    curve = torch.tensor([0.0, 0.06, 0.08, 0.11, 0.16, 0.21, 0.27, 0.31, 0.36, 0.45, 0.55, 0.63, 0.76])
    row = torch.linspace(0.5, 0.98, 101)
    for target in (0.05, 0.147, 0.3):
        k = S.solve_kappa(row, target, grid, curve)
        assert S.expected_share(row, k, grid, curve) == pytest.approx(target, abs=1e-4)
    assert S.solve_kappa(row, 0.99, grid, curve) == S.KAPPA_MAX  # out of reach
    assert S.expected_share(row, 0.0, grid, curve) == 0.0


def test_resolve_locality(tmp_path):
    assert S.resolve_locality("calibrated") == MEASURED
    assert S.resolve_locality("calibrated", "grid2") == MEASURED_GRID2
    assert S.resolve_locality("calibrated:" + MEASURED) == MEASURED
    with pytest.raises(FileNotFoundError, match="fidelity.locality"):
        S.resolve_locality(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="page scoring"):
        S.resolve_locality("calibrated", "grid3")


def test_a_measurement_of_another_rules_selection_is_refused():
    """grid2's page change is not Quest's (1.4x on SmolLM2): calibrating one to the other's is an error."""
    assert S.MeasuredLocality.load(MEASURED).rule == "quest"
    assert S.MeasuredLocality.load(MEASURED_GRID2).rule == "grid2sink128"
    lay = WorkingSetLayout.from_tokens(32, 128, 256, 256)
    for path, scoring in ((MEASURED, "grid2"), (MEASURED_GRID2, "quest")):
        with pytest.raises(ValueError, match="measured the page change"):
            S.CalibratedQueries("calibrated:" + path, 2, 4, 2, 16, lay, 4096, "cpu", scoring=scoring)
    with pytest.raises(ValueError, match="keep margin"):  # the runtime's own margin would count twice
        S.MeasuredLocality.load(os.path.join(ROOT, "docs", "data", "locality-smollm2-135m-grid2-keep4.json"))


def test_grid2_measurement_changes_more_pages_than_quests():
    """The record behind grid2's calibrated benchmarks: its own selection, more pages a step than Quest's."""
    grid2, quest = S.MeasuredLocality.load(MEASURED_GRID2), S.MeasuredLocality.load(MEASURED)
    assert grid2.quant.shape == quest.quant.shape
    torch.testing.assert_close(grid2.quant, quest.quant, rtol=0, atol=2e-4)  # the same queries: the check's similarity does not depend on scoring
    assert 1.2 < float(grid2.page_share.mean()) / float(quest.page_share.mean()) < 1.7


def test_page_change_curve_grows_with_the_step_and_matches_the_optimistic_setting():
    """Gaussian keys at 32K with the benchmark's layout: cosine 0.95 changes about a fifth of the pages, as
    the benchmark measured with --query-cosine 0.95 (21%, docs/BENCHMARKS.md)."""
    lay = WorkingSetLayout.from_tokens(32, 512, 1024, 512)
    c = S.page_change_curve(32000, lay, 4, 128, steps=24, kv_heads=2, grid=(0.0, 0.01, 0.05, 0.2))
    assert float(c[0]) < 0.01
    assert 0.17 < float(c[2]) < 0.26, c
    assert float(c[1]) < float(c[2]) < float(c[3])


@pytest.mark.parametrize("shape,layout,context,layers,scoring", [
    ((32, 32, 8, 128), (32, 512, 1024, 512), 8192, [0, 9, 16, 23, 31], "quest"),  # Llama-3.1-8B shape, defaults
    ((30, 9, 3, 64), (32, 128, 1024, 256), 4096, [1, 13, 22], "quest"),  # SmolLM2 itself, the harness's layout
    ((32, 32, 8, 128), (32, 512, 1024, 512), 8192, [0, 16, 31], "grid2"),  # grid2's selection and measurement
])
def test_generator_reproduces_the_measured_rates(shape, layout, context, layers, scoring):
    """The CPU check: the runtime's generator over Gaussian keys, the runtime's check and the reference
    selection (of the runtime's page scoring) give the measured correction rate at 0.9 and page-change share
    within a few points."""
    torch.manual_seed(0)
    L, hq, hkv, d = shape
    lay = WorkingSetLayout.from_tokens(*layout)
    # Quest's curve is smooth enough at 32 steps over 2 KV heads; grid2's needs the runtime's 48 over 4
    curve = dict(curve_steps=32, curve_heads=2) if scoring == "quest" else {}
    cq = S.CalibratedQueries("calibrated", L, hq, hkv, d, lay, context + 80, "cpu",
                             bins=(math.log2(context), 1), scoring=scoring, **curve)
    check = load_launch_script("check_locality")
    sim = check.simulate(cq, context, steps=64, layers=layers, rows=2)
    _, tot = check.check_table(cq, sim, context)
    assert abs(tot["correction_generated"] - tot["correction_measured"]) < 0.03, tot
    assert abs(tot["page_change_generated"] - tot["page_change_measured"]) < 0.025, tot
    assert tot["max_abs_error_per_layer_correction"] < 0.07, tot
    assert tot["max_abs_error_per_layer_page_change"] < 0.05, tot
    assert cq.summary()["decoy"] and 0.0 < float(cq.kappa_cpu.mean()) < 1.0


# -- the runtime ---------------------------------------------------------------------------------------------
def _tiny_measurement(path, n_layers=3, n_kv=2, budget=8, rule="quest"):
    heads = [[{"similarity": {"percentiles": [round(0.5 + 0.0049 * i, 4) for i in range(101)]},
               "page_change": {str(budget): 0.2}} for _ in range(n_kv)] for _ in range(n_layers)]
    ws = {"default_budget": budget, **({} if rule == "quest" else {"page_scoring": rule})}
    path.write_text(json.dumps({"meta": {"working set": ws}, "heads": heads}))
    return str(path)


@pytest.mark.parametrize("scoring", ["quest", "grid2"])
def test_runtime_flags_the_heads_whose_drawn_similarity_is_below_tau(tmp_path, scoring):
    """The engine's calibrated queries, for either page scoring (grid2: calibrated on grid2's own measurement)."""
    from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
    from freekv_sglang.runtime.sizing import ModelShape

    path = _tiny_measurement(tmp_path / "loc.json", rule="quest" if scoring == "quest" else "grid2sink128")
    L, hq, hkv, d = 2, 8, 2, 16 if scoring == "quest" else 64  # grid2's kernels need a head dim >= 64
    lay = WorkingSetLayout(page_size=4, n_sink=1, n_select=2, n_window=2)
    R, max_ctx = 3, 96
    r2t = torch.zeros((R + 1, max_ctx), dtype=torch.int32)
    for r in range(1, R + 1):
        r2t[r] = torch.arange(max_ctx, dtype=torch.int32) + (r - 1) * max_ctx + lay.page_size
    n_pages = (R * max_ctx) // lay.page_size + 2
    rt = FreeKVRuntime(ModelShape(L, hq, hkv, d, torch.float32),
                       RuntimeSettings(lay, correction_threshold=0.9, page_scoring=scoring),
                       n_pages, R, r2t, max_batch=4, device="cpu", env=EnvSettings(bench_locality=path))
    assert isinstance(rt.synthetic, S.CalibratedQueries) and rt.synthetic.contexts == [max_ctx]
    assert rt.synthetic.scoring == scoring and rt.grid == (scoring == "grid2")
    g = torch.Generator().manual_seed(0)
    rows, lens = torch.tensor([1, 3]), [30, 41]
    loc = torch.cat([r2t[r, :n].long() for r, n in zip(rows.tolist(), lens)])
    for l in range(L):
        k, v = torch.randn(sum(lens), hkv, d, generator=g), torch.randn(sum(lens), hkv, d, generator=g)
        rt.store_tokens(l, k, v, loc)
        rt.prefill_layer(l, torch.randn(sum(lens), hq, d, generator=g), k, rows, lens, loc)
    rt.finish_prefill()
    checked = 0
    for t in range(12):
        lens = [n + 1 for n in lens]
        seq = torch.tensor(lens)
        loc = torch.stack([r2t[r, n - 1].long() for r, n in zip(rows.tolist(), lens)])
        rt.plan_decode(rows, seq, seq)
        for l in range(L):
            rt.decode_layer(l, torch.randn(2, hq, d, generator=g), torch.randn(2, hkv, d, generator=g),
                            torch.randn(2, hkv, d, generator=g), loc, 0.25)
            if t == 0:
                assert rt.flags[l, :2].all()  # no previous query yet
                continue
            s = _drawn(rt.synthetic.quant_cpu[l], 0, l, rows, seq, hkv)
            clear = (s - 0.9).abs() > 1e-4
            assert torch.equal(rt.flags[l, :2][clear], (s < 0.9)[clear])
            checked += int(clear.sum())
        rt.finish_decode_step()
    assert checked > 30


def test_both_synthetic_localities_are_refused_together():
    with pytest.raises(ValueError, match="set one"):
        EnvSettings(bench_query_cosine=0.95, bench_locality="calibrated")
    assert load_settings({"FREEKV_BENCH_LOCALITY": "calibrated"}).bench_locality == "calibrated"


def test_the_fixed_cosine_generator_takes_the_runtime_arguments():
    sq = S.SyntheticQueries(n_layers=1, n_q_heads=4, head_dim=16, cosine=0.9, device="cpu")
    q = torch.randn(2, 4, 16)
    rows = torch.tensor([0, 1])
    torch.testing.assert_close(sq.apply(0, q, rows), sq.apply(0, q, rows, torch.tensor([5, 6]), torch.zeros(2, 4, 16)))
