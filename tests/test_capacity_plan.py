"""Projected concurrent requests (sizing formulas) and launch/capacity_plan.py's table (CPU)."""

import json

import torch

from freekv_sglang.algorithm.layout import WorkingSetLayout
from freekv_sglang.runtime.sizing import ModelShape, concurrent_requests, plan_memory
from launch_scripts import load_launch_script

SHAPE = ModelShape(n_layers=2, n_q_heads=4, n_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
LAYOUT = WorkingSetLayout.from_tokens(8, 8, 16, 16)  # P=8: 1 sink + 2 selected + 2 window pages
KV_TOKEN = 2 * 2 * 2 * 16 * 2  # layers x K/V x heads x D x bf16 = 256 bytes


def test_dense_holds_whole_requests_in_the_gpu_pool():
    r = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=100 * 1000 * KV_TOKEN + 5, host_bytes=2**20,
                            request_tokens=1000, max_context_len=4096)
    assert r["dense"] == 100


def test_freekv_is_bounded_by_the_host_tier_when_the_gpu_has_room():
    host = 50 * 1000 * KV_TOKEN
    r = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=2**30, host_bytes=host, request_tokens=1000,
                            max_context_len=4096)
    plan = plan_memory(SHAPE, LAYOUT, host, 2**30, 4096)
    assert r["freekv"] == plan.host_tokens // 1000 and r["freekv_bound"] == "host"
    assert 48 <= r["freekv"] <= 50  # 1000 tokens = 125 pages; one page of the tier is padding


def test_freekv_is_bounded_by_digests_and_working_sets_when_the_host_is_large():
    host, gpu = 400 * 2**20, 52 * 2**20  # digests (1/8 of the KV at P=8) take 50 MiB of the GPU pool
    r = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=gpu, host_bytes=host, request_tokens=1000,
                            max_context_len=4096)
    plan = plan_memory(SHAPE, LAYOUT, host, 2**40, 4096)  # same digests and per-request bytes
    per_req = plan.working_set_bytes_per_request
    assert r["freekv_bound"] == "gpu"
    assert r["freekv"] == (gpu - plan.digest_bytes - per_req) // per_req > 100
    # a host tier whose digests alone exceed the GPU pool serves nothing
    none = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=40 * 2**20, host_bytes=host, request_tokens=1000,
                               max_context_len=4096)
    assert none["freekv"] == 0


def test_capacity_plan_table(tmp_path):
    mod = load_launch_script("capacity_plan")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2,
                                                      "hidden_size": 64, "num_hidden_layers": 2,
                                                      "max_position_embeddings": 4096}))
    shape, max_ctx = mod.model_shape(str(tmp_path))
    assert shape == SHAPE and max_ctx == 4096
    out = mod.table(shape, LAYOUT, max_ctx, 992, 8, [100 * 1000 * KV_TOKEN / 2**30], [0.05])
    row = [c.strip() for c in out.splitlines()[-1].split("|")]
    assert row[3] == "100"  # dense
    pages = int(0.05 * 2**30) // (8 * KV_TOKEN) - 1  # host pages of 8 tokens, less the padding page
    assert row[4] == str(pages * 8 // 1000) and row[6] == "host"


def test_digests_taking_most_of_the_gpu_are_reported():
    from freekv_sglang.runtime.sizing import digest_warning

    small = plan_memory(SHAPE, LAYOUT, 100 * 2**20, 52 * 2**20, 4096)  # 12.5 MiB of digests
    assert digest_warning(small, 52 * 2**20, 8) is None
    big = plan_memory(SHAPE, LAYOUT, 400 * 2**20, 52 * 2**20, 4096)  # 50 MiB of digests
    hint = digest_warning(big, 52 * 2**20, 8)
    assert "take 50.0 MiB of 52.0 MiB GPU memory" in hint and "--freekv-host-memory-gb" in hint
    assert f"for {big.max_running_requests} running requests" in hint


def test_host_tier_smaller_than_the_dense_pool_is_reported():
    from freekv_sglang.runtime.sizing import capacity_warning, kv_bytes_per_token

    gpu = 52 * 2**20
    dense_tokens = gpu // kv_bytes_per_token(SHAPE)
    small = plan_memory(SHAPE, LAYOUT, gpu // 2, gpu, 4096)
    assert small.host_tokens < dense_tokens
    hint = capacity_warning(small, gpu, SHAPE)
    assert f"holds {small.host_tokens} tokens" in hint and f"the {dense_tokens} tokens" in hint
    assert "--freekv-host-memory-gb" in hint
    big = plan_memory(SHAPE, LAYOUT, 4 * gpu, gpu, 4096)
    assert big.host_tokens >= dense_tokens and capacity_warning(big, gpu, SHAPE) is None


def test_gpu_tier_adds_pages_after_the_host_tier_and_is_paid_from_the_gpu_pool():
    host, gpu = 50 * 1000 * KV_TOKEN, 2**30
    base = plan_memory(SHAPE, LAYOUT, host, gpu, 4096)
    tier = plan_memory(SHAPE, LAYOUT, host, gpu, 4096, gpu_tier_bytes=30 * 1000 * KV_TOKEN)
    page_bytes = 8 * KV_TOKEN
    assert tier.host_tokens == base.host_tokens and tier.host_pages == base.host_pages
    assert tier.gpu_tier_pages == 30 * 1000 * KV_TOKEN // page_bytes and tier.gpu_tier_tokens == tier.gpu_tier_pages * 8
    assert tier.total_tokens == base.host_tokens + tier.gpu_tier_tokens
    assert tier.gpu_tier_bytes == tier.gpu_tier_pages * page_bytes
    # the tier's KV and its digests come out of the GPU budget
    per_page_digest = (base.digest_bytes // base.host_pages)
    assert tier.digest_bytes == base.digest_bytes + tier.gpu_tier_pages * per_page_digest
    assert tier.gpu_bytes >= tier.gpu_tier_bytes + tier.digest_bytes
    assert "GPU tier" in tier.summary() and "GPU tier" not in base.summary()
    # more whole requests fit
    more = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=gpu, host_bytes=host, request_tokens=1000,
                               max_context_len=4096, gpu_tier_bytes=30 * 1000 * KV_TOKEN)
    less = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=gpu, host_bytes=host, request_tokens=1000,
                               max_context_len=4096)
    assert more["freekv"] >= less["freekv"] + 29


def test_gpu_tier_larger_than_the_gpu_pool_is_refused():
    import pytest

    from freekv_sglang.runtime.sizing import FreeKVMemoryError

    with pytest.raises(FreeKVMemoryError, match="--freekv-gpu-tier-gb"):
        plan_memory(SHAPE, LAYOUT, 50 * 1000 * KV_TOKEN, 2**24, 4096, gpu_tier_bytes=2**24)


def test_capacity_plan_finds_the_best_gpu_tier():
    mod = load_launch_script("capacity_plan")
    gpu_gb, host_gb = 100 * 1000 * KV_TOKEN / 2**30, 20 * 1000 * KV_TOKEN / 2**30
    n, tier_gb = mod.best_gpu_tier(SHAPE, LAYOUT, gpu_gb, host_gb, 1000, 4096)
    plain = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=int(gpu_gb * 2**30), host_bytes=int(host_gb * 2**30),
                                request_tokens=1000, max_context_len=4096)["freekv"]
    assert tier_gb > 0 and n > plain


def test_fp8_tiers_hold_twice_the_tokens():
    host, gpu = 50 * 1000 * KV_TOKEN, 2**30
    bf16 = plan_memory(SHAPE, LAYOUT, host, gpu, 4096)
    fp8 = plan_memory(SHAPE, LAYOUT, host, gpu, 4096, kv_fp8=True)
    assert fp8.host_pages == 2 * (bf16.host_pages - 1) + 1 or fp8.host_pages == 2 * bf16.host_pages
    assert fp8.host_bytes <= host and fp8.digest_bytes > bf16.digest_bytes  # digests stay in the model's dtype


def test_freekv_gpu_budget_can_differ_from_dense():
    """A FreeKV server's GPU budget is smaller than dense's pool (no chunked prefill: SGLang reserves more
    activation memory); the projection takes it separately and only FreeKV's bound moves."""
    host = 400 * 1000 * KV_TOKEN
    same = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=40 * 2**20, host_bytes=host, request_tokens=1000,
                               max_context_len=4096)
    less = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=40 * 2**20, host_bytes=host, request_tokens=1000,
                               max_context_len=4096, freekv_gpu_kv_bytes=13 * 2**20)  # 12.5 MiB of digests
    assert less["dense"] == same["dense"] and less["freekv_bound"] == "gpu"
    assert 0 < less["freekv"] < same["freekv"]


def test_capacity_plan_table_with_freekv_budget(tmp_path):
    import pytest

    mod = load_launch_script("capacity_plan")
    out = mod.table(SHAPE, LAYOUT, 4096, 992, 8, [0.05], [0.4], freekv_gpu_kv_gb=[0.02])
    assert "| 0.05 / 0.02 | 0.4 |" in out
    with pytest.raises(ValueError, match="one value per --gpu-kv-gb"):
        mod.table(SHAPE, LAYOUT, 4096, 992, 8, [0.05, 0.1], [0.4], freekv_gpu_kv_gb=[0.02])


def test_h200_capacity_run_matches_the_server_plan():
    """Campaign on an H200 (Llama-3.1-8B shape, 32000 + 256 tokens): the server's plan with a 390 GiB host
    tier and a 67 GiB GPU tier in a 100.3 GiB FreeKV budget ran at most 75 requests, as the sizing said
    then; 74 since the selection keeps the keys of 64-page blocks (the pipelined scoring shape: 256 KiB of
    selection scratch per request at 128K tokens instead of 128 KiB); 55 GiB of GPU tier in the same
    budget fits 113 (the measured dense SGLang ran 28)."""
    shape = ModelShape(32, 32, 8, 128, torch.bfloat16)
    lay = WorkingSetLayout.from_tokens(32, 512, 1024, 512)
    kw = dict(gpu_kv_bytes=int(112.4 * 2**30), host_bytes=390 * 2**30, request_tokens=32256, max_context_len=131072,
              freekv_gpu_kv_bytes=int(100.32 * 2**30))
    assert concurrent_requests(shape, lay, gpu_tier_bytes=67 * 2**30, **kw)["freekv"] == 74
    r = concurrent_requests(shape, lay, gpu_tier_bytes=55 * 2**30, **kw)
    assert r["freekv"] == 113 and r["dense"] == 28


def test_gpu_tier_note_gives_the_balance_point():
    from freekv_sglang.runtime.sizing import gpu_tier_note

    shape = ModelShape(32, 32, 8, 128, torch.bfloat16)
    lay = WorkingSetLayout.from_tokens(32, 512, 1024, 512)
    gpu = int(100.32 * 2**30)
    plan = plan_memory(shape, lay, 390 * 2**30, gpu, 131072, user_max_running_requests=120,
                       gpu_tier_bytes=67 * 2**30)
    assert plan.max_running_requests == 74 and plan.total_tokens == 3743712  # run H's server plan: 75 (smaller scratch)
    note = gpu_tier_note(plan, gpu, 32)
    assert "allow 74 running requests" in note and "about 50560 tokens per request" in note
    assert "--gpu-kv-gb 100.3 --host-gb 390" in note
    assert gpu_tier_note(plan_memory(shape, lay, 390 * 2**30, gpu, 131072), gpu, 32) is None
