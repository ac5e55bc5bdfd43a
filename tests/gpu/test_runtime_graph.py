"""A whole FreeKV decode step (all layers, side-stream speculation included) captured in a CUDA
graph, replayed step after step, against the same runtime run eagerly."""

from __future__ import annotations

import math

import pytest
import torch

from freekv_sglang.algorithm import WorkingSetLayout
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.runtime.sizing import ModelShape
from freekv_sglang.settings import EnvSettings


def make_runtime(shape, lay, req_to_token, n_pages, rows_cap, speculative=True, attention="auto",
                 page_scoring="quest"):
    settings = RuntimeSettings(lay, "mean", 0.9, speculative, "gather", page_scoring=page_scoring)
    return FreeKVRuntime(shape, settings, n_pages, rows_cap, req_to_token, max_batch=8, device="cuda",
                         env=EnvSettings(decode_attention=attention))


@pytest.mark.parametrize("bs_real,bs_graph,attention,page_scoring", [
    (3, 4, "flashinfer", "quest"), (4, 4, "flashinfer", "quest"), (5, 8, "flashinfer", "quest"),
    (3, 4, "triton", "quest"), (5, 8, "triton", "quest"), (3, 4, "triton", "grid2"), (5, 8, "flashinfer", "grid2")])
def test_graph_replay_matches_eager(bs_real, bs_graph, attention, page_scoring):
    """grid2: grid codes written and scored inside the graph; the first request's prompt is shorter than the
    sink, so its grids are fitted by the host half of the plan (outside the graph) once the sink is full."""
    torch.manual_seed(0)
    L, hq, hkv, d = 3, 8, 2, 128
    dtype = torch.bfloat16
    # grid2 takes pages of 32 tokens or more on the GPU (start-up refuses smaller ones); both sinks hold 32 tokens
    lay = (WorkingSetLayout(page_size=32, n_sink=1, n_select=4, n_window=3) if page_scoring == "grid2"
           else WorkingSetLayout(page_size=16, n_sink=2, n_select=4, n_window=3))
    shape = ModelShape(L, hq, hkv, d, dtype)
    R, max_ctx = 8, 1028
    per_row = -(-max_ctx // lay.page_size)
    n_pages = R * per_row + 1
    perm = torch.randperm(n_pages - 1) + 1
    r2t = torch.zeros((R + 1, max_ctx), dtype=torch.int32)
    for r in range(1, R + 1):
        pages = perm[(r - 1) * per_row: r * per_row]
        r2t[r] = (pages[:, None] * lay.page_size + torch.arange(lay.page_size)).flatten()[:max_ctx].int()
    r2t = r2t.cuda()
    eager = make_runtime(shape, lay, r2t, n_pages, R, attention=attention, page_scoring=page_scoring)
    graphed = make_runtime(shape, lay, r2t, n_pages, R, attention=attention, page_scoring=page_scoring)
    scale = 1 / math.sqrt(d)

    # static inputs; padded entries use the padding row 0 with a 1-token history at slot 0
    rows_s = torch.zeros(bs_graph, dtype=torch.int64, device="cuda")
    seq_s = torch.ones(bs_graph, dtype=torch.int64, device="cuda")
    loc_s = torch.zeros(bs_graph, dtype=torch.int64, device="cuda")
    q_s = torch.randn(L, bs_graph, hq, d, device="cuda", dtype=dtype)
    k_s = torch.randn(L, bs_graph, hkv, d, device="cuda", dtype=dtype)
    v_s = torch.randn(L, bs_graph, hkv, d, device="cuda", dtype=dtype)
    out_s = torch.empty(L, bs_graph, hq, d, device="cuda", dtype=dtype)

    def step():
        graphed.plan_decode_device(rows_s, seq_s, graph=True)
        for l in range(L):
            out_s[l].copy_(graphed.decode_layer(l, q_s[l], k_s[l], v_s[l], loc_s, scale))
        graphed.finish_decode_step()

    graphed.plan_decode_host(bs_graph, seq_s.cpu(), graph=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()

    # prefill the same prompts into both runtimes
    rows = list(range(2, 2 + bs_real))
    lens = [400 + 97 * i for i in range(bs_real)]
    if page_scoring == "grid2":
        lens[0] = 20  # inside the sink of 32 tokens: filled at decode step 12
    loc = torch.cat([r2t[r, :n].long() for r, n in zip(rows, lens)])
    rows_t = torch.tensor(rows, device="cuda")
    for l in range(L):
        T = sum(lens)
        q = torch.randn(T, hq, d, device="cuda", dtype=dtype)
        k = torch.randn(T, hkv, d, device="cuda", dtype=dtype)
        v = torch.randn(T, hkv, d, device="cuda", dtype=dtype)
        for rt in (eager, graphed):
            rt.store_tokens(l, k, v, loc)
            rt.prefill_layer(l, q, k, rows_t, lens, loc)

    qs = torch.randn(L, bs_real, hq, d, device="cuda", dtype=dtype)
    for t in range(40):
        # the batch changes between steps: the last request leaves after step 19 (the graph keeps its size)
        n_act = bs_real if t < 20 else bs_real - 1
        act_rows = rows_t[:n_act]
        lens = [n + 1 for n in lens]
        seq = torch.tensor(lens[:n_act], device="cuda")
        loc = torch.stack([r2t[r, n - 1].long() for r, n in zip(rows[:n_act], lens)])
        qs = (qs.float() + 0.5 * torch.randn_like(qs, dtype=torch.float32)).to(dtype)
        ks = torch.randn(L, bs_real, hkv, d, device="cuda", dtype=dtype)
        vs = torch.randn(L, bs_real, hkv, d, device="cuda", dtype=dtype)
        # eager
        eager.plan_decode(act_rows, seq, seq.cpu())
        want = torch.stack([eager.decode_layer(l, qs[l, :n_act], ks[l, :n_act], vs[l, :n_act], loc, scale)
                            for l in range(L)])
        eager.finish_decode_step()
        # graph: real entries first, padding after
        rows_s.zero_(); seq_s.fill_(1); loc_s.zero_()
        rows_s[:n_act] = act_rows; seq_s[:n_act] = seq; loc_s[:n_act] = loc
        q_s[:, :n_act] = qs[:, :n_act]; k_s[:, :n_act] = ks[:, :n_act]; v_s[:, :n_act] = vs[:, :n_act]
        graphed.plan_decode_host(bs_graph, seq_s.cpu(), graph=True, rows=rows_s)
        g.replay()
        got = out_s[:, :n_act]
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"step {t}: {m}")
        for l in range(L):
            assert torch.equal(graphed.resident[l, act_rows], eager.resident[l, act_rows]), (t, l)
    torch.cuda.synchronize()
    if page_scoring == "grid2":
        assert torch.equal(graphed.grid_lo[:, rows_t], eager.grid_lo[:, rows_t])
        assert bool((graphed.grid_step[:, rows_t[0]] > 0).all())  # fitted at decode
        assert torch.equal(graphed.digests, eager.digests)
