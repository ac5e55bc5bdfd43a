"""FreeKV's decode counters and their export: counted totals, snapshot reads without a sync, the
metric names in SGLang's style, and the values a Prometheus scrape shows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from freekv_sglang.runtime import metrics
from freekv_sglang.runtime.stats import (CORRECTED, RECALLED_CRITICAL, RECALLED_SPECULATIVE, DecodeStats,
                                         Totals)


def test_counts_real_and_sparse_request_steps():
    st = DecodeStats("cpu", checks_per_request=6, working_set_tokens=100, snapshot_every=1)
    st.count_step(torch.tensor([50, 150, 1, 101]))  # the 1-token entry is CUDA-graph padding
    st.count_step(torch.tensor([51, 151, 1, 102]))
    t = st.totals_now()
    assert (t.decode_steps, t.request_steps, t.sparse_request_steps, t.dense_request_steps) == (2, 6, 4, 2)
    assert t.checks == 36


def test_snapshot_trails_the_step_being_planned():
    """``count_step`` runs before the step's kernels: the snapshot it takes must pair the GPU counters with
    the host counts of the steps already run, not the one being planned."""
    st = DecodeStats("cpu", checks_per_request=1, working_set_tokens=0, snapshot_every=2)
    lens = torch.tensor([9, 9])
    for step in range(5):
        st.count_step(lens)
        st.gpu[CORRECTED] += 1  # the step's kernels: one corrected head per step
    t = st.totals()  # snapshots at the start of steps 2 and 4 (CPU: taken at once)
    assert (t.decode_steps, t.corrected_heads) == (4, 4)
    assert st.totals_now().corrected_heads == 5


def test_rates_and_differences():
    a = Totals(decode_steps=10, request_steps=40, sparse_request_steps=30, checks=400, corrected_heads=100,
               recalled_critical=30, recalled_speculative=90)
    b = Totals(decode_steps=4, request_steps=16, sparse_request_steps=12, checks=160, corrected_heads=40,
               recalled_critical=10, recalled_speculative=30)
    d = a.minus(b)
    assert d == Totals(6, 24, 18, 240, 60, 20, 60)
    r = d.rates(piece_bytes=1000)
    assert r["correction_rate"] == pytest.approx(0.25)
    assert r["recalled_pieces_per_request_step"] == pytest.approx(80 / 24)
    assert r["recall_bytes_per_request_step"] == pytest.approx(80_000 / 24)
    assert r["recalled_before_attention_share"] == pytest.approx(0.25)
    assert r["sparse_request_step_share"] == pytest.approx(0.75)


def test_reset_zeroes_everything():
    st = DecodeStats("cpu", 2, 10, snapshot_every=1)
    st.count_step(torch.tensor([20]))
    st.gpu += 3
    st.reset()
    assert st.totals_now() == Totals() and int(st.gpu.sum()) == 0


def test_metric_names_follow_sglang_style():
    names = metrics.metric_names()
    assert len(names) == len(set(names))
    for n in names:
        assert n.startswith("sglang:freekv_") and n.replace(":", "_").replace("_", "").isalnum()
    for want in ("host_tier_pages_used", "host_tier_pages_total", "working_set_rows_used",
                 "recalled_pieces_total", "recalled_bytes_total", "corrected_head_ratio",
                 "decode_request_steps_total"):
        assert "sglang:freekv_" + want in names


def _fake_runtime(totals: Totals, used_rows=3):
    counter = SimpleNamespace(totals=lambda: totals)
    pool = SimpleNamespace(size=8, available_size=lambda: 8 - used_rows)
    return SimpleNamespace(layout=SimpleNamespace(page_size=32), host=SimpleNamespace(n_pages=101), n_gpu_pages=50,
                           max_rows=8, row_pool=pool, stats_counter=counter, piece_bytes=512,
                           attention=SimpleNamespace(kernel="triton"), prefix=None)


def test_tier_usage_fills_the_host_tier_first():
    rt = _fake_runtime(Totals())
    assert metrics.tier_usage(rt, 32 * 40) == {"host_tier_pages_used": 40, "host_tier_pages_total": 100,
                                                "gpu_tier_pages_used": 0, "gpu_tier_pages_total": 50}
    u = metrics.tier_usage(rt, 32 * 120 + 1)
    assert (u["host_tier_pages_used"], u["gpu_tier_pages_used"]) == (100, 21)


def test_server_info_holds_settings_usage_and_totals():
    from freekv_sglang.config import FreeKVConfig

    t = Totals(5, 20, 15, 200, 50, 10, 30)
    info = metrics.server_info(_fake_runtime(t), FreeKVConfig(enabled=True), 32 * 10)
    assert info["settings"]["select_tokens"] == 1024 and info["settings"]["enabled"] is True
    assert info["host_tier_pages_used"] == 10 and info["working_set_rows_used"] == 3
    assert info["totals"]["corrected_heads"] == 50 and info["totals"]["dense_request_steps"] == 5
    assert info["totals"]["recalled_bytes"] == 40 * 512
    assert info["rates"]["correction_rate"] == pytest.approx(0.25)
    assert info["prefix_staged_bytes"] == {}  # no staging area: neither radix cache nor chunked prefill
    rt = _fake_runtime(t)
    rt.prefix = SimpleNamespace(copied={"dma": 3 << 20, "gather": 5})
    assert metrics.server_info(rt, FreeKVConfig(enabled=True), 0)["prefix_staged_bytes"] == {"dma": 3 << 20,
                                                                                             "gather": 5}


def test_prometheus_export_moves_with_the_counters():
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.REGISTRY
    labels = {"model_name": "test-model-metrics"}
    exp = metrics.PrometheusExporter(labels)

    def value(name, **extra):
        return registry.get_sample_value(name, {**labels, **extra})

    rt = _fake_runtime(Totals(2, 8, 6, 80, 20, 4, 12))
    exp.update(rt, 32 * 7)
    assert value("sglang:freekv_host_tier_pages_used") == 7
    assert value("sglang:freekv_working_set_rows_used") == 3
    assert value("sglang:freekv_decode_steps_total") == 2
    assert value("sglang:freekv_recalled_pieces_total", path="critical") == 4
    assert value("sglang:freekv_recalled_bytes_total", path="speculative") == 12 * 512
    assert value("sglang:freekv_corrected_head_ratio") == pytest.approx(0.25)
    rt.stats_counter = SimpleNamespace(totals=lambda: Totals(5, 20, 15, 200, 80, 4, 30))
    exp.update(rt, 32 * 9)
    assert value("sglang:freekv_decode_steps_total") == 5
    assert value("sglang:freekv_decode_request_steps_total", mode="dense") == 5
    assert value("sglang:freekv_recalled_pieces_total", path="speculative") == 30
    assert value("sglang:freekv_corrected_head_ratio") == pytest.approx(60 / 120)  # this interval only
    assert value("sglang:freekv_recalled_pieces_per_request_step", path="critical") == 0


def test_server_info_counts_the_pages_requests_hold_which_a_flush_would_hide(monkeypatch):
    """``/server_info``'s FreeKV entry from SGLang's real paged allocator: pages in use, those only the radix cache
    holds, and those requests hold. A request's page that was never freed stays held on the idle server, while
    SGLang's ``/flush_cache`` (``allocator.clear()`` with the tree reset) brings the used count back to 0 anyway."""
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    from freekv_sglang.config import FreeKVConfig
    from freekv_sglang.runtime import integration

    P, pages = 32, 100
    alloc = PagedTokenToKVPoolAllocator(pages * P, P, torch.bfloat16, "cpu", None, False)
    tree = SimpleNamespace(cached=0)
    tree.evictable_size = lambda: tree.cached
    sched = SimpleNamespace(token_to_kv_pool_allocator=alloc, max_total_num_tokens=pages * P, tree_cache=tree,
                            server_args=SimpleNamespace(_freekv=FreeKVConfig(enabled=True, host_memory_gb=1)))
    rt = _fake_runtime(Totals(), used_rows=0)
    monkeypatch.setattr(integration, "_RUNTIME", rt)

    def info():
        result = SimpleNamespace(internal_state={})
        integration._after_get_internal_state(result, sched, None)
        return result.internal_state["freekv"]

    running = alloc.alloc(3 * P)  # a running request's three pages
    assert (info()["host_tier_pages_used"], info()["tier_pages_held"], info()["tier_pages_cached"]) == (3, 3, 0)
    tree.cached = 2 * P  # it finished: two full pages go to the radix cache, the third should be freed ...
    assert info()["tier_pages_held"] == 1  # ... and was not: a leak, on an idle server
    alloc.free(running[2 * P:])
    assert (info()["host_tier_pages_used"], info()["tier_pages_held"], info()["tier_pages_cached"]) == (2, 0, 2)
    alloc.alloc(P)  # lose a page again, then flush as SGLang does on an idle server
    assert info()["tier_pages_held"] == 1
    alloc.clear()
    tree.cached = 0
    assert info()["host_tier_pages_used"] == 0 and info()["tier_pages_held"] == 0  # the leak is gone from view
