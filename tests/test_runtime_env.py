"""Runtime environment knobs are validated when built (CPU: no side streams either way), and memory accounting."""

import pytest
import torch

from freekv_sglang.algorithm import WorkingSetLayout
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.runtime.sizing import ModelShape


def _runtime():
    lay = WorkingSetLayout(page_size=4, n_sink=1, n_select=2, n_window=2)
    r2t = torch.zeros((3, 64), dtype=torch.int32)
    return FreeKVRuntime(ModelShape(1, 2, 1, 16, torch.float32), RuntimeSettings(lay), n_host_pages=40, max_rows=2,
                         req_to_token=r2t, max_batch=2, device="cpu")


def test_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv("FREEKV_SPEC_STREAMS", "3")
    with pytest.raises(ValueError, match="FREEKV_SPEC_STREAMS"):
        _runtime()


def test_cpu_runtime_has_no_side_streams(monkeypatch):
    monkeypatch.setenv("FREEKV_SPEC_STREAMS", "2")
    rt = _runtime()
    assert rt.side_stream is None and rt.recall_stream is None and rt.side_lists is None


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


def test_decode_split_env_is_validated(monkeypatch):
    from freekv_sglang.runtime.attention import WorkingSetAttention

    monkeypatch.setenv("FREEKV_DECODE_SPLIT_PAGES", "0")
    with pytest.raises(ValueError, match="FREEKV_DECODE_SPLIT_PAGES"):
        WorkingSetAttention(torch.device("cpu"), 2, 8)
    monkeypatch.setenv("FREEKV_DECODE_SPLIT_PAGES", "8")
    assert WorkingSetAttention(torch.device("cpu"), 2, 8).split_pages == 8


def test_variant_names():
    from freekv_sglang.runtime.variants import apply_variant_env, parse_variant

    assert parse_variant("freekv") == ("freekv", {})
    assert parse_variant("freekv:triton") == ("freekv", {"FREEKV_DECODE_ATTENTION": "triton"})
    assert parse_variant("freekv:flashinfer~8")[1] == {"FREEKV_DECODE_ATTENTION": "flashinfer",
                                                       "FREEKV_DECODE_SPLIT_PAGES": "8"}
    assert parse_variant("freekv:auto")[1] == {"FREEKV_DECODE_ATTENTION": "auto"}
    assert parse_variant("freekv@32/1~8:flashinfer") == ("freekv", {
        "FREEKV_RECALL_PROGRAMS": "32", "FREEKV_SPEC_STREAMS": "1", "FREEKV_DECODE_SPLIT_PAGES": "8",
        "FREEKV_DECODE_ATTENTION": "flashinfer"})
    assert parse_variant("sync:flashinfer~4")[1] == {"FREEKV_DECODE_ATTENTION": "flashinfer",
                                                     "FREEKV_DECODE_SPLIT_PAGES": "4"}
    with pytest.raises(ValueError, match="add ':flashinfer'"):
        parse_variant("freekv~8")  # the default attention (the split decode) has no FlashInfer split to fix
    with pytest.raises(ValueError, match="add ':flashinfer'"):
        parse_variant("freekv~8:triton")
    assert parse_variant("freekv@16+2") == ("freekv", {"FREEKV_RECALL_PROGRAMS": "16", "FREEKV_RECALL_WARPS": "2"})
    assert parse_variant("freekv%16@8") == ("freekv", {"FREEKV_DEFER_LAYERS": "16", "FREEKV_RECALL_PROGRAMS": "8"})
    assert parse_variant("freekv^1") == ("freekv", {"FREEKV_ASYNC_PREFILL": "1"})
    assert parse_variant("freekv#64:xqa@8") == ("freekv", {"FREEKV_SCORE_BLOCK": "64", "FREEKV_DECODE_ATTENTION": "xqa",
                                                           "FREEKV_RECALL_PROGRAMS": "8"})
    for bad in ("freekv@0", "freekv@x", "freekv/3", "freekv@8@16", "@8", "freekv~", "freekv+3", "freekv+32",
                "freekv%x", "freekv^0", "freekv^2", "freekv#48", "freekv#0", "freekv:", "freekv:fa3"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    env = {"FREEKV_SPEC_STREAMS": "1", "FREEKV_RECALL_WARPS": "2", "OTHER": "x"}
    assert apply_variant_env({"FREEKV_RECALL_PROGRAMS": "16"}, env) == {"OTHER": "x", "FREEKV_RECALL_PROGRAMS": "16"}


def test_decode_split_applies_to_eager_steps_only(monkeypatch):
    """A fixed split goes into eager plans; a captured step's plan keeps FlashInfer's own split (a fixed
    split of a large batch overflows the plan FlashInfer sizes for CUDA graphs)."""
    from freekv_sglang.runtime.attention import WorkingSetAttention

    planned = []

    class Recorder:
        def __init__(self, **kw):
            self.kv_indices = torch.zeros(8, dtype=torch.int32)

        def plan(self, *args, split_pages=None, **kw):
            planned.append(split_pages)

    monkeypatch.setenv("FREEKV_DECODE_SPLIT_PAGES", "4")
    att = WorkingSetAttention(torch.device("cpu"), 2, 4)
    att.eager, att._cls = Recorder(), Recorder
    ip, lpl = torch.tensor([0, 2]), torch.tensor([3])
    kw = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype=torch.bfloat16)
    att.plan(1, ip, lpl, graph=False, **kw)
    att.plan(1, ip, lpl, graph=True, **kw)
    assert planned == [4, None]


def test_device_table_kernels_skip_the_host_tables():
    """The split decode and XQA read the page table on the GPU: a step passes no host tables and plans
    nothing on the host; FlashInfer's wrapper and the CPU reference refuse to plan without them."""
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


def test_recall_programs_env(monkeypatch):
    from freekv_sglang.kernels.recall import selected_recall_programs

    for bad in ("0", "-4", "x", "1.5"):
        monkeypatch.setenv("FREEKV_RECALL_PROGRAMS", bad)
        with pytest.raises(ValueError, match="FREEKV_RECALL_PROGRAMS"):
            selected_recall_programs(torch.device("cpu"))
    monkeypatch.setenv("FREEKV_RECALL_PROGRAMS", "16")
    assert selected_recall_programs(torch.device("cpu")) == 16


def test_recall_warps_env(monkeypatch):
    from freekv_sglang.kernels.recall import DEFAULT_RECALL_WARPS, recall_selected, selected_recall_warps

    monkeypatch.delenv("FREEKV_RECALL_WARPS", raising=False)
    assert selected_recall_warps() == DEFAULT_RECALL_WARPS
    for bad in ("0", "3", "32", "x"):
        monkeypatch.setenv("FREEKV_RECALL_WARPS", bad)
        with pytest.raises(ValueError, match="FREEKV_RECALL_WARPS"):
            selected_recall_warps()
    monkeypatch.setenv("FREEKV_RECALL_WARPS", "2")
    assert selected_recall_warps() == 2
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="num_warps"):
        recall_selected(t, t, t, t, t, t, t, t, page_size=32, slot_base=1, select_slot0=0, num_warps=3)


def test_async_prefill_env(monkeypatch):
    from freekv_sglang.runtime.engine import async_prefill_from_env

    monkeypatch.delenv("FREEKV_ASYNC_PREFILL", raising=False)
    assert async_prefill_from_env() is False
    monkeypatch.setenv("FREEKV_ASYNC_PREFILL", "1")
    assert async_prefill_from_env() is True
    for bad in ("2", "yes", ""):
        monkeypatch.setenv("FREEKV_ASYNC_PREFILL", bad)
        with pytest.raises(ValueError, match="FREEKV_ASYNC_PREFILL"):
            async_prefill_from_env()


def test_score_tuning_env(monkeypatch):
    from freekv_sglang.kernels.score_select import score_tuning_from_env

    monkeypatch.delenv("FREEKV_SCORE_BLOCK", raising=False)
    monkeypatch.delenv("FREEKV_SCORE_WARPS", raising=False)
    assert score_tuning_from_env(32) == (None, None)  # launch_shape chooses
    monkeypatch.setenv("FREEKV_SCORE_BLOCK", "64")
    monkeypatch.setenv("FREEKV_SCORE_WARPS", "8")
    assert score_tuning_from_env(32) == (64, 8)
    for var, bad in (("FREEKV_SCORE_BLOCK", "16"), ("FREEKV_SCORE_BLOCK", "96"), ("FREEKV_SCORE_BLOCK", "2048"),
                     ("FREEKV_SCORE_WARPS", "3")):
        monkeypatch.setenv("FREEKV_SCORE_BLOCK", "64")
        monkeypatch.setenv("FREEKV_SCORE_WARPS", "4")
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=var):
            score_tuning_from_env(32)


def test_runtime_with_a_score_block_matches_reference_cpu(monkeypatch):
    """FREEKV_SCORE_BLOCK sizes the selection scratch and the scoring blocks; the result does not change."""
    import torch
    from test_runtime_engine import run_against_reference

    monkeypatch.setenv("FREEKV_SCORE_BLOCK", "16")
    rt, _ = run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, steps=6)
    assert rt.score_block == 16
