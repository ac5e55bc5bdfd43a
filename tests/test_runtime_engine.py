"""The batched runtime (host tier + working sets + per-layer steps) against the plain-torch spec.

A small model shape runs prefill and many decode steps for a batch of requests whose rows,
prompt lengths and host pages are scattered; every layer's decode output must equal the
output of :class:`LayerState` (one request at a time) on the same q/k/v, and the resident
selections must match. Runs on the CPU (kernels fall back to their references) and, in
``tests/gpu``, on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from freekv_sglang.algorithm import LayerState, RetrievalSettings, WorkingSetLayout
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.kernels.common import fp8_roundtrip
from freekv_sglang.runtime.sizing import ModelShape
from freekv_sglang.settings import EnvSettings


def run_against_reference(device, dtype, *, speculative, tau, aggregation="mean", group=3, head_dim=16,
                          prompt_lens=(13, 30, 7, 45), rows=(2, 1, 4, 5), steps=24, seed=0, atol=2e-5,
                          offload_api=False, gpu_pages=0, page_size=4, kv_fp8=False, keep_margin=0, overfetch=0,
                          env=EnvSettings(), page_scoring="quest", n_sink=1):
    g = torch.Generator().manual_seed(seed)
    L, hkv = 2, 2
    hq = hkv * group
    # overfetch: pages speculation keeps beyond the budget of 3 (a correction takes its top 3 and keeps residents)
    lay = WorkingSetLayout(page_size=page_size, n_sink=n_sink, n_select=3 + overfetch, n_window=2,
                           n_overfetch=overfetch)
    shape = ModelShape(L, hq, hkv, head_dim, dtype)
    settings = RuntimeSettings(lay, aggregation, tau, speculative, "gather", kv_fp8=kv_fp8, keep_margin=keep_margin,
                               page_scoring=page_scoring)
    # grid2: the spec's rule is grid2sink fitted on the sink tokens
    sink = n_sink * page_size
    rule = f"grid2sink{sink}" if page_scoring == "grid2" else "quest"
    # with FP8 tiers the runtime attends over K/V as FP8 stores them: the spec gets those values
    seen = fp8_roundtrip if kv_fp8 else (lambda t: t)
    R, max_ctx = 6, 32 * page_size + 2  # not a multiple of the page size, like SGLang (context + 4)
    per_row = -(-max_ctx // lay.page_size)
    n_pages = R * per_row + 1
    # req_to_token: every row gets its own random host pages (page 0 is the padding page)
    perm = torch.randperm(n_pages - 1, generator=g) + 1
    req_to_token = torch.zeros((R + 1, max_ctx), dtype=torch.int32)
    for r in range(1, R + 1):
        pages = perm[(r - 1) * per_row: r * per_row]
        req_to_token[r] = (pages[:, None] * lay.page_size + torch.arange(lay.page_size)).flatten()[:max_ctx].int()
    req_to_token = req_to_token.to(device)
    # with gpu_pages, the highest-numbered pages are the GPU tier's (the rows' random pages use both tiers)
    rt = FreeKVRuntime(shape, settings, n_pages - gpu_pages, R, req_to_token, max_batch=8, device=device,
                       n_gpu_pages=gpu_pages, env=env)
    scale = 1 / math.sqrt(head_dim)
    B = len(rows)
    rows_t = torch.tensor(rows, dtype=torch.int64, device=device)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype)

    # per (layer, request) histories and reference states
    keys = [[None] * B for _ in range(L)]
    vals = [[None] * B for _ in range(L)]
    ref = [[LayerState(RetrievalSettings(lay, aggregation, tau, speculative, keep_margin, rule), hkv)
            for _ in range(B)] for _ in range(L)]
    # prefill
    loc = torch.cat([req_to_token[r, :n].long() for r, n in zip(rows, prompt_lens)])
    T = sum(prompt_lens)
    q_prev = [None] * L
    for l in range(L):
        q, k, v = rnd(T, hq, head_dim), rnd(T, hkv, head_dim), rnd(T, hkv, head_dim)
        if offload_api:  # what the attention backend calls (on the prefill stream if there is one)
            rt.prefill_layer_offload(l, q.to(device), k.to(device), v.to(device), rows_t, list(prompt_lens), loc)
        else:
            rt.store_tokens(l, k.to(device), v.to(device), loc)
            rt.prefill_layer(l, q.to(device), k.to(device), rows_t, list(prompt_lens), loc)
        s = 0
        for b, n0 in enumerate(prompt_lens):
            keys[l][b], vals[l][b] = seen(k[s:s + n0]), seen(v[s:s + n0])
            ref[l][b].prefill(keys[l][b], q[s + n0 - 1])
            s += n0
        q_prev[l] = torch.stack([q[s0 + n0 - 1] for s0, n0 in zip(
            [sum(prompt_lens[:i]) for i in range(B)], prompt_lens)])
    rt.finish_prefill()
    # decode: queries drift slowly, with occasional sign flips of one KV head's group
    lens = list(prompt_lens)
    for t in range(steps):
        lens = [n + 1 for n in lens]
        seq = torch.tensor(lens, dtype=torch.int64)
        loc = torch.stack([req_to_token[r, n - 1].long() for r, n in zip(rows, lens)])
        rt.plan_decode(rows_t, seq.to(device), seq)
        for l in range(L):
            q = (q_prev[l] + 0.35 * rnd(B, hq, head_dim)).to(dtype)
            if t % 5 == 3:
                q[0, :group] = -q[0, :group]
            q_prev[l] = q
            k, v = rnd(B, hkv, head_dim), rnd(B, hkv, head_dim)
            out = rt.decode_layer(l, q.to(device), k.to(device), v.to(device), loc, scale)
            for b in range(B):
                keys[l][b] = torch.cat([keys[l][b], seen(k[b:b + 1])])
                vals[l][b] = torch.cat([vals[l][b], seen(v[b:b + 1])])
                if rule != "quest" and keys[l][b].shape[0] == sink + 1:
                    # the runtime fits a grid once the sink is full (the spec fitted on a shorter prompt's keys)
                    ref[l][b].rule_ctx = ref[l][b].rule.fit(keys[l][b])
                want = ref[l][b].decode(q[b], keys[l][b], vals[l][b], scale)
                torch.testing.assert_close(out[b].float().cpu(), want, atol=atol, rtol=atol,
                                           msg=lambda m: f"step {t} layer {l} request {b}: {m}")
                assert torch.equal(rt.resident[l, rows[b]].cpu(), ref[l][b].resident), (t, l, b)
        rt.finish_decode_step()
    return rt, ref


@pytest.mark.parametrize("speculative,tau", [(True, 0.9), (True, None), (False, None)])
def test_runtime_matches_reference_cpu(speculative, tau):
    rt, ref = run_against_reference("cpu", torch.float32, speculative=speculative, tau=tau)
    corrected = sum(s.corrected_heads for row in ref for st in row for s in st.stats)
    if speculative and tau is not None:
        assert corrected > 0  # the sign flips must trigger correction
    # the runtime's GPU-side counters agree with the spec's per-step statistics
    stats = rt.stats()
    checks = sum(s.kv_heads for row in ref for st in row for s in st.stats)
    assert stats["correction_rate"] == pytest.approx(corrected / checks)
    recalled = sum(s.recalled_pages for row in ref for st in row for s in st.stats)
    assert stats["recalled_pieces_per_request_step"] * rt.stats_counter.request_steps == pytest.approx(recalled)


@pytest.mark.parametrize("aggregation", ["mean", "softmax-mean"])
def test_runtime_keep_margin_matches_reference_cpu(aggregation):
    """Residency hysteresis (--freekv-keep-margin): the runtime keeps the same pages as the spec, and its
    recall counter agrees with the spec's."""
    rt, ref = run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, aggregation=aggregation,
                                    keep_margin=2, steps=16)
    recalled = sum(s.recalled_pages for row in ref for st in row for s in st.stats)
    assert rt.stats()["recalled_pieces_per_request_step"] * rt.stats_counter.request_steps == pytest.approx(recalled)


@pytest.mark.parametrize("tau,keep_margin,aggregation", [(0.9, 0, "mean"), (None, 0, "mean"), (0.9, 2, "mean"),
                                                         (0.9, 0, "softmax-mean")])
def test_runtime_overfetch_matches_reference_cpu(tau, keep_margin, aggregation):
    """Speculative over-fetch (--freekv-overfetch-tokens): the runtime attends, keeps and recalls as the spec
    does (corrections take the top budget plus resident pages, speculation the top budget + over-fetch), and
    its critical-path recall counter is the spec's."""
    rt, ref = run_against_reference("cpu", torch.float32, speculative=True, tau=tau, aggregation=aggregation,
                                    keep_margin=keep_margin, overfetch=2, steps=20)
    assert rt.resident.shape[-1] == 5
    stats = [s for row in ref for st in row for s in st.stats]
    if tau is not None:
        assert sum(s.corrected_heads for s in stats) > 0
    crit = sum(s.critical_pages for s in stats)
    tot = rt.stats_counter.totals_now()
    assert int(tot.recalled_critical) == crit
    assert int(tot.recalled_speculative) == sum(s.recalled_pages for s in stats) - crit


def test_overfetch_is_validated():
    lay = WorkingSetLayout(page_size=4, n_sink=1, n_select=5, n_window=2, n_overfetch=2)
    with pytest.raises(ValueError, match="speculative"):
        RuntimeSettings(lay, "mean", 0.9, False, "gather")


def test_keep_margin_is_validated():
    lay = WorkingSetLayout(page_size=4, n_sink=1, n_select=3, n_window=2)
    with pytest.raises(ValueError, match="keep_margin"):
        RuntimeSettings(lay, "mean", 0.9, True, "gather", keep_margin=4)


@pytest.mark.parametrize("aggregation", ["max", "softmax-mean"])
def test_runtime_aggregations_cpu(aggregation):
    run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, aggregation=aggregation, steps=10)


def test_runtime_budget_covers_context_is_dense_cpu():
    """With few candidates every page is attended (the spec equals dense attention there; its own
    tests check that), and the runtime follows the spec."""
    rt, ref = run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, prompt_lens=(5, 9),
                                    rows=(3, 1), steps=3)
    for row in ref:
        for st in row:
            assert not any(s.sparse for s in st.stats)


def test_prefill_offload_entry_matches_reference_cpu():
    """The backend's one-call prefill per layer (store + digests + first working set) on the CPU."""
    run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, steps=6, offload_api=True)


@pytest.mark.parametrize("offload_api", [False, True])
def test_runtime_with_gpu_tier_matches_reference_cpu(offload_api):
    """A GPU tier holding the highest-numbered pages: the same outputs as one host tier."""
    rt, ref = run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, steps=12,
                                    offload_api=offload_api, gpu_pages=60)
    assert rt.n_gpu_pages == 60 and rt.gpu_tier.shape[2] == 60 and rt.host.n_pages == rt.digests.shape[1] - 60
    assert float(rt.gpu_tier.abs().sum()) > 0  # the rows' pages really live in both tiers


def test_decode_attention_auto_prefers_the_split_decode_where_it_fits():
    from freekv_sglang.runtime.attention import resolve_attention_kernel

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attention_kernel("auto", cuda, 32, 128, torch.bfloat16) == "triton"
    assert resolve_attention_kernel("auto", cuda, 16, 64, torch.float16) == "triton"
    for page, dim, dt in ((8, 128, torch.bfloat16), (32, 96, torch.bfloat16), (24, 128, torch.bfloat16),
                          (32, 128, torch.float32)):
        assert resolve_attention_kernel("auto", cuda, page, dim, dt) == "flashinfer", (page, dim, dt)
        with pytest.raises(ValueError, match="FREEKV_DECODE_ATTENTION=flashinfer"):
            resolve_attention_kernel("triton", cuda, page, dim, dt)
        assert resolve_attention_kernel("triton", cpu, page, dim, dt) == "triton"  # the reference runs
        assert resolve_attention_kernel("flashinfer", cuda, page, dim, dt) == "flashinfer"
    assert resolve_attention_kernel("auto", cpu, 8, 128, torch.bfloat16) == "flashinfer"  # a label only, off CUDA


def test_decode_attention_default_and_choice():
    from freekv_sglang.runtime.attention import WorkingSetAttention

    assert WorkingSetAttention(torch.device("cpu"), 2, 6, page_size=32, head_dim=64,
                               dtype=torch.bfloat16).kernel == "triton"
    for kernel in ("flashinfer", "triton"):  # CPU: the reference attention either way
        rt, _ = run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, steps=4, page_size=16,
                                      prompt_lens=(200, 300, 90), rows=(2, 1, 4),
                                      env=EnvSettings(decode_attention=kernel))
        assert rt.attention.kernel == kernel


@pytest.mark.parametrize("gpu_pages,offload_api", [(0, False), (60, True)])
def test_runtime_with_fp8_tiers_matches_reference_cpu(gpu_pages, offload_api):
    """FP8 host (and GPU) tiers: the runtime equals the spec run over the K/V as FP8 stores them."""
    rt, ref = run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, steps=12, gpu_pages=gpu_pages,
                                    offload_api=offload_api, kv_fp8=True)
    assert rt.host.buffer.dtype == torch.float8_e4m3fn
    assert rt.gpu_tier is None or rt.gpu_tier.dtype == torch.float8_e4m3fn
    assert sum(s.corrected_heads for row in ref for st in row for s in st.stats) > 0


def test_byte_copy_recalls_need_bf16_tiers_and_no_gpu_tier():
    """The staged and per-page recalls copy host-tier bytes: a GPU tier or FP8 tiers are refused (before the
    host tier is allocated), as the CLI refuses them (config.check_recall), and so is an unknown strategy."""
    lay = WorkingSetLayout(page_size=4, n_sink=1, n_select=3, n_window=2)
    shape = ModelShape(2, 4, 2, 16, torch.float32)
    r2t = torch.zeros((3, 64), dtype=torch.int32)
    for how in ("staged", "per-page"):
        with pytest.raises(ValueError, match="a GPU tier needs --freekv-recall gather"):
            FreeKVRuntime(shape, RuntimeSettings(lay, "mean", 0.9, True, how), 10, 2, r2t, max_batch=2,
                          device="cpu", n_gpu_pages=4)
        with pytest.raises(ValueError, match="FP8 tiers need --freekv-recall gather"):
            FreeKVRuntime(shape, RuntimeSettings(lay, "mean", 0.9, True, how, kv_fp8=True), 10, 2, r2t, max_batch=2,
                          device="cpu")
        rt = FreeKVRuntime(shape, RuntimeSettings(lay, "mean", 0.9, True, how), 10, 2, r2t, max_batch=2, device="cpu")
        assert rt.recall.name == "gather"  # off CUDA the host copies do not exist: the gather runs instead
    with pytest.raises(ValueError, match="unknown recall strategy"):
        FreeKVRuntime(shape, RuntimeSettings(lay, "mean", 0.9, True, "dma"), 10, 2, r2t, max_batch=2, device="cpu")


def test_runtime_with_triton_kernels_under_interpreter():
    """The same comparison with every Triton kernel of the runtime running in Triton's CPU
    interpreter (fp16), in a child process (the interpreter is chosen when Triton is imported)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from test_runtime_engine import run_against_reference\n"
        "for spec, tau in ((True, 0.9), (False, None)):\n"
        "    run_against_reference('cpu', torch.float16, speculative=spec, tau=tau, steps=6, atol=3e-2,\n"
        "                          prompt_lens=(13, 30, 7), rows=(2, 1, 4))\n"
        "run_against_reference('cpu', torch.float16, speculative=True, tau=0.9, steps=6, atol=3e-2,\n"
        "                      prompt_lens=(13, 30, 7), rows=(2, 1, 4), gpu_pages=60)\n"
        "run_against_reference('cpu', torch.float16, speculative=True, tau=0.9, steps=6, atol=3e-2,\n"
        "                      prompt_lens=(13, 30, 7), rows=(2, 1, 4), keep_margin=2)\n"
        "run_against_reference('cpu', torch.float16, speculative=True, tau=0.9, steps=6, atol=3e-2,\n"
        "                      prompt_lens=(13, 30, 7), rows=(2, 1, 4), overfetch=2)\n"
        "run_against_reference('cpu', torch.float16, speculative=True, tau=0.9, steps=10, atol=3e-2, head_dim=64,\n"
        "                      n_sink=2, prompt_lens=(5, 30, 45), rows=(2, 1, 4), page_scoring='grid2')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))  # not the repository root: kernels/ would shadow HF kernels
    r = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-6000:]


# ---------------------------------------------------------------------------------------------- grid2 page scoring
@pytest.mark.parametrize("speculative,tau,aggregation", [(True, 0.9, "mean"), (False, None, "mean"),
                                                         (True, 0.9, "softmax-mean"), (True, None, "max")])
def test_runtime_grid2_matches_reference_cpu(speculative, tau, aggregation):
    """--freekv-page-scoring grid2: the runtime's selections and outputs equal the spec's with the grid2sink rule,
    prompts shorter than the sink (grid fitted at decode, once the sink is full) and longer ones (at prefill)."""
    rt, ref = run_against_reference("cpu", torch.float32, speculative=speculative, tau=tau, aggregation=aggregation,
                                    head_dim=64, n_sink=2, prompt_lens=(5, 30, 7, 45), steps=24,
                                    page_scoring="grid2")
    assert rt.digests.dtype == torch.uint8 and rt.digests.shape[2:] == (2, 4, 16)
    assert any(s.sparse for row in ref for st in row for s in st.stats)
    # the rows' grids are the spec's
    from freekv_sglang.algorithm.grid_codes import grid_from_bounds
    for l in range(2):
        for b, r in enumerate((2, 1, 4, 5)):
            lo, step = grid_from_bounds(*ref[l][b].rule_ctx)
            assert torch.equal(rt.grid_lo[l, r], lo) and torch.equal(rt.grid_step[l, r], step), (l, b)


def test_runtime_grid2_with_keep_margin_matches_reference_cpu():
    """grid2 with residency hysteresis (--freekv-keep-margin, the pairing docs/FIDELITY.md recommends): the same
    selections, outputs and recall counts as the spec's sticky selection with the grid2sink rule."""
    rt, ref = run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, head_dim=64, n_sink=2,
                                    prompt_lens=(5, 30, 7, 45), steps=16, page_scoring="grid2", keep_margin=2)
    recalled = sum(s.recalled_pages for row in ref for st in row for s in st.stats)
    assert rt.stats()["recalled_pieces_per_request_step"] * rt.stats_counter.request_steps == pytest.approx(recalled)


def test_runtime_grid2_fp8_and_gpu_tier_cpu():
    run_against_reference("cpu", torch.float32, speculative=True, tau=0.9, head_dim=64, steps=12, gpu_pages=60,
                          kv_fp8=True, offload_api=True, page_scoring="grid2")


def test_runtime_grid2_is_validated():
    shape = ModelShape(2, 4, 2, 64, torch.float32)
    r2t = torch.zeros((3, 64), dtype=torch.int32)
    with pytest.raises(ValueError, match="sink"):
        RuntimeSettings(WorkingSetLayout(page_size=4, n_sink=0, n_select=3, n_window=2), page_scoring="grid2")
    with pytest.raises(NotImplementedError, match="over-fetch"):
        RuntimeSettings(WorkingSetLayout(page_size=4, n_sink=1, n_select=5, n_window=2, n_overfetch=2),
                        page_scoring="grid2")
    with pytest.raises(ValueError, match="unknown page scoring"):
        RuntimeSettings(WorkingSetLayout(page_size=4, n_sink=1, n_select=3, n_window=2), page_scoring="grid3")
    settings = RuntimeSettings(WorkingSetLayout(page_size=4, n_sink=1, n_select=3, n_window=2), page_scoring="grid2")
    for d in (16, 96):
        with pytest.raises(NotImplementedError, match="head dim"):
            FreeKVRuntime(ModelShape(2, 4, 2, d, torch.float32), settings, 10, 2, r2t, max_batch=2, device="cpu")
    rt = FreeKVRuntime(shape, settings, 10, 2, r2t, max_batch=2, device="cpu")
    assert rt.digests.shape == (2, 10, 2, 4, 16) and rt.grid_lo.shape == (2, 3, 2, 64)
