"""The runtime takes the FREEKV_* settings it is given (CPU: no side streams either way), benchmark variant
names, and memory accounting."""

import pytest
import torch

from freekv_sglang.algorithm import WorkingSetLayout
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.runtime.sizing import ModelShape
from freekv_sglang.settings import EnvSettings
from launch_scripts import load_launch_script


def _runtime(env=EnvSettings()):
    lay = WorkingSetLayout(page_size=4, n_sink=1, n_select=2, n_window=2)
    r2t = torch.zeros((3, 64), dtype=torch.int32)
    return FreeKVRuntime(ModelShape(1, 2, 1, 16, torch.float32), RuntimeSettings(lay), n_host_pages=40, max_rows=2,
                         req_to_token=r2t, max_batch=2, device="cpu", env=env)


def test_cpu_runtime_has_no_side_streams():
    rt = _runtime(EnvSettings(async_prefill=True))
    assert rt.side_stream is None and rt.recall_stream is None and rt.side_lists is None
    assert rt.prefill_stream is None


def test_runtime_passes_its_settings_down():
    rt = _runtime(EnvSettings(recall_programs=3, recall_warps=2, log_stats_every=7, decode_attention="flashinfer"))
    assert (rt.recall.name, rt.recall.programs, rt.recall.warps) == ("gather", 3, 2)
    assert rt.log_every == 7 and rt.attention.kernel == "flashinfer" and rt.host.allocator == "pageable"


def test_used_bytes_counts_working_sets_digests_and_host_pages():
    """Memory a set of requests occupies: per-request rows plus per-page digests on the GPU, whole KV on the host."""
    rt = _runtime()  # 1 layer, 1 KV head, D=16, P=4, fp32; 5 working-set pages
    gpu1, host1 = rt.used_bytes(1, 10)  # 10 tokens: 3 pages
    ws_row = 1 * 2 * 5 * 4 * 1 * 16 * 4  # [L, K/V, S, P, Hkv, D] fp32
    resident_row, q_row, valid_row = 1 * 1 * 2 * 8, 1 * 2 * 16 * 4, 1 * 1 * 1
    digest_page = 1 * 1 * 2 * 16 * 4  # [L, Hkv, min/max, D]
    assert gpu1 == ws_row + resident_row + q_row + valid_row + 3 * digest_page
    assert host1 == 3 * 1 * 2 * 1 * 4 * 16 * 4  # pages x [L, K/V, Hkv, P, D] fp32
    assert rt.used_bytes(2, 10) == (2 * gpu1, 2 * host1)


def test_variant_names():
    v = load_launch_script("bench_variants")
    assert v.parse_variant("freekv") == ("freekv", {})
    assert v.parse_variant("freekv:triton") == ("freekv", {"FREEKV_DECODE_ATTENTION": "triton"})
    assert v.parse_variant("freekv:auto")[1] == {"FREEKV_DECODE_ATTENTION": "auto"}
    assert v.parse_variant("freekv@16+2") == ("freekv", {"FREEKV_RECALL_PROGRAMS": "16", "FREEKV_RECALL_WARPS": "2"})
    assert v.parse_variant("freekv^1") == ("freekv", {"FREEKV_ASYNC_PREFILL": "1"})
    assert v.parse_variant("sync:flashinfer@8") == ("sync", {"FREEKV_DECODE_ATTENTION": "flashinfer",
                                                             "FREEKV_RECALL_PROGRAMS": "8"})
    assert v.keep_margin_of("freekv-keep4") == ("freekv", 4) and v.keep_margin_of("sync") == ("sync", 0)
    assert v.base_options("freekv-keep4-over512") == ("freekv", {"keep_margin": 4, "overfetch_tokens": 512})
    assert v.base_options("freekv-over512") == ("freekv", {"overfetch_tokens": 512})
    assert v.base_options("freekv-keep4-keep2") == ("freekv-keep4-keep2", {}) and v.base_options("sync") == ("sync", {})
    assert v.keep_margin_of("freekv-over512") == ("freekv-over512", 0)  # not a hysteresis-only base
    assert v.base_options("freekv-grid2") == ("freekv", {"page_scoring": "grid2"})
    assert v.base_flags(v.base_options("freekv-keep4-grid2")[1]) == ["--freekv-keep-margin", "4",
                                                                     "--freekv-page-scoring", "grid2"]
    for bad in ("freekv@0", "freekv@x", "freekv/2", "freekv@8@16", "@8", "freekv~8", "freekv+3", "freekv+32",
                "freekv%16", "freekv^0", "freekv^2", "freekv#64", "freekv:", "freekv@", "freekv:fa3", "freekv:xqa"):
        with pytest.raises(ValueError):
            v.parse_variant(bad)
    env = {"FREEKV_ASYNC_PREFILL": "1", "FREEKV_RECALL_WARPS": "2", "OTHER": "x"}
    assert v.apply_variant_env({"FREEKV_RECALL_PROGRAMS": "16"}, env) == {"OTHER": "x", "FREEKV_RECALL_PROGRAMS": "16"}


def test_device_table_kernels_skip_the_host_tables():
    """The split decode reads the page table on the GPU: a step passes no host tables and plans nothing on the
    host; FlashInfer's wrapper and the CPU reference refuse to plan without them."""
    from freekv_sglang.runtime.attention import WorkingSetAttention

    kw = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=16, dtype=torch.bfloat16)
    att = WorkingSetAttention(torch.device("cpu"), 2, 4)
    assert att.needs_host_tables  # the CPU reference reads them
    with pytest.raises(ValueError, match="host indptr"):
        att.plan(1, None, None, graph=False, **kw)
    split = object()
    att.eager, att.split = object(), split
    assert not att.needs_host_tables
    att.plan(1, None, None, graph=True, **kw)
    assert att.active is split


def test_recall_kernel_shape_arguments():
    from freekv_sglang.kernels.recall import recall_selected

    t = torch.zeros(1)
    with pytest.raises(ValueError, match="num_warps"):
        recall_selected(t, t, t, t, t, t, t, t, page_size=32, slot_base=1, select_slot0=0, num_warps=3)
