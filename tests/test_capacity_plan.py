"""Projected concurrent requests (sizing formulas) and launch/capacity_plan.py's table (CPU).

Expected values are not taken from the formulas under test: they are worked out by hand from the
shapes (bytes per token, page, digest and working set written out below) or read from the capacity
runs measured on an H200 (docs/BENCHMARKS.md, raw JSON in docs/data/bench_capacity-*.json).
"""

import json
import re
from pathlib import Path

import pytest
import torch

from freekv_sglang.algorithm.layout import WorkingSetLayout
from freekv_sglang.runtime.sizing import ModelShape, concurrent_requests, plan_memory, working_set_bytes_per_row
from launch_scripts import load_launch_script

SHAPE = ModelShape(n_layers=2, n_q_heads=4, n_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
LAYOUT = WorkingSetLayout.from_tokens(8, 8, 16, 16)  # P=8: 1 sink + 2 selected + 2 window pages
KV_TOKEN = 2 * 2 * 2 * 16 * 2  # layers x K/V x heads x D x bf16 = 256 bytes
PAGE_BYTES = 8 * KV_TOKEN  # 2048: one host page of 8 tokens
DIGEST_PAGE = 2 * 2 * 2 * 16 * 2  # layers x KV heads x (max, min) x D x bf16 = 256 bytes per page (1/8 of its KV)
# one request row: K/V of 5 slots (1 sink + 2 selected + 2 window pages) of 8 tokens, all layers
# (2 x 2 x 5 x 8 x 2 x 16 x 2 = 10240), the resident map (2 layers x 2 KV heads x 2 selected x int64 = 64)
# and the previous query (2 layers x (4 heads x 16 x bf16 + one flag per KV head) = 260)
ROW_BYTES = 10240 + 64 + 260


def test_dense_holds_whole_requests_in_the_gpu_pool():
    r = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=100 * 1000 * KV_TOKEN + 5, host_bytes=2**20,
                            request_tokens=1000, max_context_len=4096)
    assert r["dense"] == 100


def test_freekv_is_bounded_by_the_host_tier_when_the_gpu_has_room():
    host = 50 * 1000 * KV_TOKEN
    r = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=2**30, host_bytes=host, request_tokens=1000,
                            max_context_len=4096)
    plan = plan_memory(SHAPE, LAYOUT, host, 2**30, 4096)
    # 12.8 MB of 2048-byte pages = 6250 pages, one of them padding: 6249 x 8 = 49992 tokens, 49 requests
    assert plan.host_pages == 6250 and plan.host_tokens == 49992
    assert r["freekv"] == 49 and r["freekv_bound"] == "host"


def test_freekv_is_bounded_by_digests_and_working_sets_when_the_host_is_large():
    host, gpu = 400 * 2**20, 52 * 2**20  # digests (1/8 of the KV at P=8) take 50 MiB of the GPU pool
    r = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=gpu, host_bytes=host, request_tokens=1000,
                            max_context_len=4096)
    plan = plan_memory(SHAPE, LAYOUT, host, 2**40, 4096)  # same digests and per-request bytes
    # 400 MiB / 2048 bytes = 204800 pages (padding included), 256 bytes of digests each = 50 MiB
    assert plan.host_pages == 204800 and plan.digest_bytes == 204800 * DIGEST_PAGE == 50 * 2**20
    # a row costs its working set plus selection scratch: at least ROW_BYTES, so the 2 MiB left
    # after the digests hold at most 2 MiB // ROW_BYTES rows, one of which is the padding row
    assert working_set_bytes_per_row(SHAPE, LAYOUT) == ROW_BYTES
    assert plan.working_set_bytes_per_request >= ROW_BYTES
    assert r["freekv_bound"] == "gpu"
    assert 100 < r["freekv"] <= 2 * 2**20 // ROW_BYTES - 1  # 197, while the host tier would hold 204
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
    assert page_bytes == PAGE_BYTES
    assert tier.host_tokens == base.host_tokens == 49992 and tier.host_pages == base.host_pages == 6250
    # 7.68 MB of 2048-byte pages: 3750 pages of 8 tokens, no padding page (the host tier's page 0 is it)
    assert tier.gpu_tier_pages == 3750 and tier.gpu_tier_tokens == 30000
    assert tier.total_tokens == 49992 + 30000
    assert tier.gpu_tier_bytes == 3750 * 2048
    # the tier's KV and its digests (256 bytes a page) come out of the GPU budget
    assert base.digest_bytes == 6250 * DIGEST_PAGE and tier.digest_bytes == (6250 + 3750) * DIGEST_PAGE
    assert tier.gpu_bytes >= tier.gpu_tier_bytes + tier.digest_bytes
    assert "GPU tier" in tier.summary() and "GPU tier" not in base.summary()
    # more whole requests fit
    more = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=gpu, host_bytes=host, request_tokens=1000,
                               max_context_len=4096, gpu_tier_bytes=30 * 1000 * KV_TOKEN)
    less = concurrent_requests(SHAPE, LAYOUT, gpu_kv_bytes=gpu, host_bytes=host, request_tokens=1000,
                               max_context_len=4096)
    assert more["freekv"] >= less["freekv"] + 29


def test_gpu_tier_larger_than_the_gpu_pool_is_refused():
    from freekv_sglang.runtime.sizing import FreeKVMemoryError

    with pytest.raises(FreeKVMemoryError, match="--freekv-gpu-tier-gb"):
        plan_memory(SHAPE, LAYOUT, 50 * 1000 * KV_TOKEN, 2**24, 4096, gpu_tier_bytes=2**24)


def test_gpu_too_small_for_one_working_set_names_the_flags():
    """The refusal names every flag that would make it fit."""
    from freekv_sglang.runtime.sizing import FreeKVMemoryError

    with pytest.raises(FreeKVMemoryError) as e:
        plan_memory(SHAPE, LAYOUT, 50 * 1000 * KV_TOKEN, 2**20, 4096)
    for flag in ("--freekv-host-memory-gb", "--freekv-select-tokens", "--freekv-sink-tokens", "--freekv-window-tokens",
                 "--mem-fraction-static"):
        assert flag in str(e.value)


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
    # FP8 pages take 1 byte per value, 1024 bytes: 12500 pages (one padding) against bf16's 6250
    assert (bf16.host_pages, fp8.host_pages) == (6250, 12500) and fp8.host_tokens == 12499 * 8
    assert fp8.host_bytes == 12500 * 1024 <= host
    assert fp8.digest_bytes == 12500 * DIGEST_PAGE  # digests stay in the model's dtype


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
    mod = load_launch_script("capacity_plan")
    out = mod.table(SHAPE, LAYOUT, 4096, 992, 8, [0.05], [0.4], freekv_gpu_kv_gb=[0.02])
    assert "| 0.05 / 0.02 | 0.4 |" in out
    with pytest.raises(ValueError, match="one value per --gpu-kv-gb"):
        mod.table(SHAPE, LAYOUT, 4096, 992, 8, [0.05, 0.1], [0.4], freekv_gpu_kv_gb=[0.02])


LLAMA8B = ModelShape(32, 32, 8, 128, torch.bfloat16)
LLAMA8B_LAYOUT = WorkingSetLayout.from_tokens(32, 512, 1024, 512)  # the server's defaults
LLAMA8B_KV_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x K/V x KV heads x head dim x bf16 = 128 KiB
GIB, MIB = 2**30, 2**20
DATA = Path(__file__).resolve().parents[1] / "docs" / "data"


def test_llama8b_bytes_by_hand():
    """Bytes of the Llama-3.1-8B shape written out by hand: 128 KiB of KV a token (a 32000 + 256-token
    request is 3.94 GiB), pages of 32 tokens of 4 MiB (2 MiB in FP8), 128 KiB of digests a page."""
    from freekv_sglang.runtime.sizing import digest_bytes_per_page, host_bytes_per_page, kv_bytes_per_token

    assert kv_bytes_per_token(LLAMA8B) == LLAMA8B_KV_TOKEN == 131072
    assert f"{32256 * LLAMA8B_KV_TOKEN / GIB:.2f}" == "3.94"
    assert host_bytes_per_page(LLAMA8B, 32) == 4 * MIB and host_bytes_per_page(LLAMA8B, 32, kv_fp8=True) == 2 * MIB
    assert digest_bytes_per_page(LLAMA8B) == 32 * 8 * 2 * 128 * 2 == 128 * 1024  # layers x KV heads x (max, min) x D
    assert LLAMA8B_LAYOUT.slots == 64  # working set: 64 pages x 4 MiB = 256 MiB of K/V per request
    assert 256 * MIB < working_set_bytes_per_row(LLAMA8B, LLAMA8B_LAYOUT) < 256.5 * MIB


def _measured(name: str, part: str | None = None) -> tuple[dict, dict, dict]:
    """(args, dense result, FreeKV result) of a bench_capacity JSON in docs/data."""
    d = json.loads((DATA / name).read_text())
    d = d[part] if part else d
    res = {r["mode"]: r for r in d["results"]}
    fk = next(r for m, r in res.items() if m.startswith("freekv"))
    return d["args"], res["dense"], fk


_PLAN_LINE = re.compile(r"host tier (\d+) tokens \(([\d.]+) GiB pinned\)(?:; GPU tier (\d+) pages \(([\d.]+) GiB\), "
                        r"(\d+) tokens in all)?; GPU: digests ([\d.]+) GiB \+ (\d+) working sets x ([\d.]+) MiB")

# FreeKV's GPU budget on the H200 with the Llama-3.1-8B shape: run H's plan ("GPU: digests 14.28 GiB + 75
# working sets x 256.5 MiB = 100.32 GiB", bounded by the GPU); dense's pool beside it is 112.4 GiB.
FREEKV_GPU_BUDGET = 100.32 * GIB


@pytest.mark.parametrize("run,name,part", [
    ("G", "bench_capacity-h200-host230-2026-11-28.json", None),
    ("H", "bench_capacity-h200-host390-tier-runH-2026-11-28.json", "first"),
    ("I", "bench_capacity-h200-fp8-tier-runI-2026-11-28.json", None),
])
def test_capacity_runs_match_the_measurements(run, name, part):
    """The sizing against the capacity runs measured on an H200 (docs/BENCHMARKS.md, Capacity; 32000 + 256
    tokens, Llama-3.1-8B shape): the server's logged plan (host tier tokens, GPU tier pages, SGLang's token
    capacity, digests, working sets) and the peak number of requests that ran at once, FreeKV and dense."""
    args, dense, fk = _measured(name, part)
    m = _PLAN_LINE.search(fk["freekv_memory"])
    assert m, fk["freekv_memory"]
    host_tokens, tier_pages, digests_gib, n_ws, ws_mib = int(m[1]), int(m[3] or 0), m[6], int(m[7]), float(m[8])
    fp8 = "fp8" in fk["mode"]
    host, tier = int(args["host_gb"] * GIB), int(args["gpu_tier_gb"] * GIB)
    tokens = args["context"] + args["new_tokens"]
    plan = plan_memory(LLAMA8B, LLAMA8B_LAYOUT, host, int(FREEKV_GPU_BUDGET), 131072,
                       user_max_running_requests=args["max_requests"], gpu_tier_bytes=tier, kv_fp8=fp8)
    assert plan.host_tokens == host_tokens and plan.gpu_tier_pages == tier_pages
    assert plan.total_tokens == fk["token_capacity"]
    assert f"{plan.digest_bytes / GIB:.2f}" == digests_gib
    # the selection scratch has grown by 128 KiB per request since these runs (256.5 -> 256.6 MiB)
    assert abs(plan.working_set_bytes_per_request / MIB - ws_mib) <= 0.2
    # run H was bounded by working sets: 75 measured; with the larger scratch one fewer fits in the same budget
    grew = 1 if run == "H" else 0
    assert plan.max_running_requests == n_ws - grew
    r = concurrent_requests(LLAMA8B, LLAMA8B_LAYOUT, gpu_kv_bytes=dense["token_capacity"] * LLAMA8B_KV_TOKEN,
                            host_bytes=host, request_tokens=tokens, max_context_len=131072, gpu_tier_bytes=tier,
                            kv_fp8=fp8, freekv_gpu_kv_bytes=int(FREEKV_GPU_BUDGET))
    assert r["dense"] == dense["peak_running"] == 28
    assert r["freekv"] == fk["peak_running"] - grew  # G: 58, H: 75 (now 74), I: 112
    assert r["freekv_bound"] == ("gpu" if run == "H" else "host")


def test_gpu_tier_note_gives_the_balance_point():
    from freekv_sglang.runtime.sizing import gpu_tier_note

    shape, lay = LLAMA8B, LLAMA8B_LAYOUT
    gpu = int(FREEKV_GPU_BUDGET)
    plan = plan_memory(shape, lay, 390 * 2**30, gpu, 131072, user_max_running_requests=120,
                       gpu_tier_bytes=67 * 2**30)
    # run H's measured plan: 3743712 tokens; 75 running then, 74 with today's selection scratch
    assert plan.max_running_requests == 74 and plan.total_tokens == 3743712
    note = gpu_tier_note(plan, gpu, 32)
    assert "allow 74 running requests" in note and "about 50560 tokens per request" in note
    assert "--gpu-kv-gb 100.3 --host-gb 390" in note
    assert gpu_tier_note(plan_memory(shape, lay, 390 * 2**30, gpu, 131072), gpu, 32) is None
