"""The runtime's per-layer steps on CUDA (Triton kernels, pinned host tier, FlashInfer decode,
side-stream speculation) against the plain-torch spec."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.settings import EnvSettings
from test_runtime_engine import run_against_reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (4, 128), (7, 128)])
@pytest.mark.parametrize("speculative,tau", [(True, 0.9), (False, None)])
def test_runtime_matches_reference_gpu(dtype, group, head_dim, speculative, tau):
    torch.cuda.synchronize()
    run_against_reference("cuda", dtype, speculative=speculative, tau=tau, group=group, head_dim=head_dim,
                          atol=2e-2)


@pytest.mark.parametrize("group,head_dim", [(4, 128), (7, 64)])
def test_async_prefill_matches_reference_gpu(group, head_dim):
    """FREEKV_ASYNC_PREFILL=1: each prefill layer's offload, digests and first working set run on the
    prefill stream while the next layers are queued; decoding afterwards still follows the spec."""
    rt, _ = run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=group,
                                  head_dim=head_dim, atol=2e-2, offload_api=True, steps=8,
                                  env=EnvSettings(async_prefill=True))
    assert rt.prefill_stream is not None


def _run_without_host_sync(**kw):
    """``run_against_reference`` on CUDA (bf16, speculative, tau 0.9, group 4, head dim 128) with every
    ``decode_layer`` call under ``torch.cuda.set_sync_debug_mode("error")``; asserts that decode layers ran."""
    import freekv_sglang.runtime.engine as eng

    calls = {}
    orig = eng.FreeKVRuntime.decode_layer

    def checked(self, *a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return orig(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            calls["n"] = calls.get("n", 0) + 1

    eng.FreeKVRuntime.decode_layer = checked
    try:
        run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=4, head_dim=128,
                              atol=2e-2, **kw)
    finally:
        eng.FreeKVRuntime.decode_layer = orig
    assert calls["n"] > 0


def test_decode_layer_has_no_host_sync():
    """A decode step of the runtime must not synchronise the host (CUDA-graph prerequisite)."""
    _run_without_host_sync(steps=4)


@pytest.mark.parametrize("offload_api", [False, True])
def test_runtime_with_gpu_tier_matches_reference_gpu(offload_api):
    """A GPU tier holding the highest-numbered pages (pinned host tier below them): same outputs."""
    rt, _ = run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=4, head_dim=128,
                                  atol=2e-2, offload_api=offload_api, gpu_pages=60)
    assert rt.gpu_tier.is_cuda and rt.host.buffer.is_pinned()


@pytest.mark.parametrize("kernel", ["triton", "flashinfer"])
@pytest.mark.parametrize("group,head_dim", [(4, 128), (3, 64)])
def test_named_attention_kernel_matches_reference_gpu(group, head_dim, kernel):
    """FREEKV_DECODE_ATTENTION=triton (the Triton split decode, auto's choice at these shapes) and
    =flashinfer (FlashInfer's paged decode wrapper, planned on the host each step)."""
    rt, _ = run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=group,
                                  head_dim=head_dim, atol=2e-2, page_size=32, prompt_lens=(300, 500, 90, 800),
                                  env=EnvSettings(decode_attention=kernel))
    assert rt.attention.kernel == kernel and (rt.attention.split is not None) == (kernel == "triton")
    assert rt.attention.needs_host_tables == (kernel == "flashinfer")


@pytest.mark.parametrize("gpu_pages", [0, 60])
def test_runtime_with_fp8_tiers_matches_reference_gpu(gpu_pages):
    """FP8 host (and GPU) tiers on the GPU: the kernels round like torch, so the runtime equals the spec
    run over the K/V as FP8 stores them."""
    rt, _ = run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=4, head_dim=128,
                                  atol=2e-2, gpu_pages=gpu_pages, kv_fp8=True)
    assert rt.host.buffer.dtype == torch.float8_e4m3fn and rt.host.buffer.is_pinned()


@pytest.mark.parametrize("group,head_dim", [(4, 128), (7, 64)])
def test_keep_margin_matches_reference_gpu(group, head_dim):
    """--freekv-keep-margin: the runtime keeps the spec's pages (residency hysteresis in the fused kernel)."""
    run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=group, head_dim=head_dim,
                          atol=2e-2, keep_margin=2)


@pytest.mark.parametrize("group,head_dim", [(4, 128), (7, 64)])
@pytest.mark.parametrize("keep_margin", [0, 2])
def test_overfetch_matches_reference_gpu(group, head_dim, keep_margin):
    """--freekv-overfetch-tokens: corrections keep the top budget plus resident pages, speculation (every head,
    on the side streams) the top budget + over-fetch, as the spec does."""
    run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=group, head_dim=head_dim,
                          atol=2e-2, keep_margin=keep_margin, overfetch=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (7, 128)])
@pytest.mark.parametrize("speculative,tau", [(True, 0.9), (False, None)])
def test_runtime_grid2_matches_reference_gpu(dtype, group, head_dim, speculative, tau):
    """--freekv-page-scoring grid2 on CUDA (pack_grid_codes at prefill and decode, score_and_select(grid=...)):
    the spec with the grid2sink rule; the first prompt is shorter than the 64-token sink (grid fitted at
    decode). Pages of 32 tokens (kernels.grid_codes.GPU_MIN_PAGE)."""
    torch.cuda.synchronize()
    run_against_reference("cuda", dtype, speculative=speculative, tau=tau, group=group, head_dim=head_dim,
                          atol=2e-2, n_sink=2, prompt_lens=(50, 300, 70, 700), page_scoring="grid2", page_size=32)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_runtime_grid2_with_keep_margin_gpu(head_dim):
    """grid2 with --freekv-keep-margin (the sticky selection in the fused grid kernel) against the spec."""
    run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=4, head_dim=head_dim, atol=2e-2,
                          n_sink=2, prompt_lens=(50, 300, 70, 700), page_scoring="grid2", page_size=32, keep_margin=2)


@pytest.mark.parametrize("kv_fp8,gpu_pages,async_prefill", [(False, 0, True), (True, 60, False), (True, 60, True)])
def test_runtime_grid2_tiers_and_async_prefill_gpu(kv_fp8, gpu_pages, async_prefill):
    """grid2 with FP8 tiers, a GPU tier, and the prefill stream (grids fitted and codes packed on it)."""
    run_against_reference("cuda", torch.bfloat16, speculative=True, tau=0.9, group=4, head_dim=128, atol=2e-2,
                          n_sink=2, prompt_lens=(50, 300, 70, 700), page_scoring="grid2", page_size=32, kv_fp8=kv_fp8,
                          gpu_pages=gpu_pages, offload_api=True, env=EnvSettings(async_prefill=async_prefill))


def test_grid2_decode_layer_has_no_host_sync():
    """grid2's decode (codes of a completed page, grid scoring) must not synchronise the host either."""
    _run_without_host_sync(steps=8, page_scoring="grid2", prompt_lens=(50, 300, 70, 700), page_size=32)
