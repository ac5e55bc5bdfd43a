"""The graph-safe decode data path (store, digests, scores, select, pieces, recall_gather,
page table): one eager run under ``torch.cuda.set_sync_debug_mode("error")`` (any host
sync raises), then CUDA-graph capture and replays on new inputs, each checked against the
torch references run on copies of the same state.
"""

from __future__ import annotations


import pytest
import torch


import freekv_sglang.kernels as K  # noqa: E402
from freekv_sglang.algorithm import WorkingSetLayout, page_digests  # noqa: E402

DEV = torch.device("cuda")


class Problem:
    """Static buffers of a small batch of requests, like the runtime's."""

    def __init__(self, dtype, grp, d, agg, seed=0):
        self.g = torch.Generator(device=DEV).manual_seed(seed)
        self.lay = lay = WorkingSetLayout(32, 2, 8, 3)
        self.p, self.hkv, self.d, self.grp, self.agg, self.dtype = 32, 4, d, grp, agg, dtype
        self.b, rows, self.max_ctx = 3, 5, 2048
        p, hkv = self.p, self.hkv
        self.max_pages = self.max_ctx // p
        n_host = rows * self.max_pages + 1  # page 0 is the dummy page
        # request row r, position i -> token slot P + r * max_ctx + i (host page 1 + ...)
        self.r2t = (p + torch.arange(rows, device=DEV)[:, None] * self.max_ctx
                    + torch.arange(self.max_ctx, device=DEV)).int()
        self.host_k = torch.empty(n_host, hkv, p, d, dtype=dtype, pin_memory=True)
        self.host_v = torch.empty(n_host, hkv, p, d, dtype=dtype, pin_memory=True)
        self.host_k.copy_(self.randn(n_host, hkv, p, d).cpu())
        self.host_v.copy_(self.randn(n_host, hkv, p, d).cpu())
        keys = self.host_k.to(DEV).permute(0, 2, 1, 3).reshape(-1, hkv, d)
        self.digests = page_digests(keys, p).contiguous()
        self.ws_k = self.randn(rows * lay.slots, p, hkv, d)
        self.ws_v = self.randn(rows * lay.slots, p, hkv, d)
        self.resident = torch.full((self.b, hkv, lay.n_select), -1, dtype=torch.int64, device=DEV)
        self.rpi = torch.tensor([1, 4, 2], device=DEV)
        self.seq_lens = torch.tensor([2048, 700, 1500], dtype=torch.int32, device=DEV)
        self.q = self.randn(self.b, hkv * grp, d)
        self.k_new = self.randn(self.b, hkv, d)
        self.v_new = self.randn(self.b, hkv, d)
        self.loc = torch.zeros(self.b, dtype=torch.int64, device=DEV)
        self.head_mask = torch.ones(self.b, hkv, dtype=torch.bool, device=DEV)
        self.row0 = torch.zeros(self.b, dtype=torch.int64, device=DEV)
        self.dst_page = torch.zeros(self.b, dtype=torch.int64, device=DEV)
        self.scores = torch.empty(self.b, hkv, self.max_pages, device=DEV)
        self.kv_indptr = torch.empty(self.b + 1, dtype=torch.int32, device=DEV)
        self.kv_indices = torch.empty(self.b * lay.slots, dtype=torch.int32, device=DEV)
        self.kv_last = torch.empty(self.b, dtype=torch.int32, device=DEV)
        self.new_inputs()

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, device=DEV).to(self.dtype)

    def new_inputs(self):
        """Fresh q, new K/V rows and their slots, head mask, a page to digest (in place)."""
        self.q.copy_(self.randn(*self.q.shape))
        self.k_new.copy_(self.randn(*self.k_new.shape))
        self.v_new.copy_(self.randn(*self.v_new.shape))
        pos = (self.seq_lens.long() - 1) % self.max_ctx
        self.loc.copy_(self.r2t[self.rpi, pos].long())
        self.head_mask.copy_(torch.rand(self.head_mask.shape, generator=self.g, device=DEV) < 0.7)
        slot = self.rpi * self.lay.slots + self.lay.window_slot0  # a window slot of each request
        self.row0.copy_(slot * self.p)
        self.row0[1] = -1
        self.dst_page.copy_(torch.randint(1, self.digests.shape[0], (self.b,), generator=self.g, device=DEV))

    def state(self):
        return dict(host_k=self.host_k.clone(), host_v=self.host_v.clone(), digests=self.digests.clone(),
                    ws_k=self.ws_k.clone(), ws_v=self.ws_v.clone(), resident=self.resident.clone())

    def step(self, st, impl=None):
        lay, p = self.lay, self.p
        K.store_kv_host(st["host_k"], st["host_v"], self.k_new, self.v_new, self.loc, impl=impl)
        K.page_digests_from_rows(st["ws_k"].view(-1, self.hkv, self.d), self.row0, self.dst_page, st["digests"],
                                 page_size=p, impl=impl)
        K.score_pages(self.q, st["digests"], self.r2t, self.rpi, self.seq_lens, self.head_mask, self.scores,
                      page_size=p, n_sink=lay.n_sink, n_window=lay.n_window, aggregation=self.agg, impl=impl)
        upd = K.select_and_diff(self.scores, st["resident"], self.head_mask, lay.n_select,
                                resident_out=st["resident"], impl=impl)
        pieces = K.recall_selected_pieces(upd.recall_slot, upd.recall_page, self.r2t, self.rpi, page_size=p,
                                          slot_base=lay.slots, select_slot0=lay.n_sink)
        if impl == "torch":
            K.recall_reference(st["host_k"], st["host_v"], st["ws_k"], st["ws_v"], *pieces)
        else:
            K.recall_gather(st["host_k"], st["host_v"], st["ws_k"], st["ws_v"], *pieces)
        K.build_page_table(self.seq_lens, self.rpi, self.kv_indptr, self.kv_indices, self.kv_last, layout=lay,
                           slot_base=lay.slots, impl=impl)
        return upd, pieces, self.scores

    def live(self):
        return dict(host_k=self.host_k, host_v=self.host_v, digests=self.digests, ws_k=self.ws_k, ws_v=self.ws_v,
                    resident=self.resident)


def _reference(prob):
    """Run the torch reference on copies of the current state; returns (state, outputs)."""
    st = prob.state()
    ip, ix, lp = prob.kv_indptr.clone(), prob.kv_indices.clone(), prob.kv_last.clone()
    upd, pieces, scores = prob.step(st, impl="torch")
    out = ([x.clone() for x in upd], [x.clone() for x in pieces], scores.clone(),
           prob.kv_indptr.clone(), prob.kv_indices.clone(), prob.kv_last.clone())
    prob.kv_indptr.copy_(ip), prob.kv_indices.copy_(ix), prob.kv_last.copy_(lp)
    return st, out


def _check(prob, st_ref, out_ref, upd, pieces, scores):
    torch.cuda.synchronize()
    live = prob.live()
    for name in ("host_k", "host_v", "digests", "ws_k", "ws_v", "resident"):
        assert torch.equal(live[name].cpu(), st_ref[name].cpu()), name
    for x, y in zip(upd, out_ref[0]):
        assert torch.equal(x, y)
    for x, y in zip(pieces, out_ref[1]):
        assert torch.equal(x, y)
    fin = torch.isfinite(out_ref[2])
    assert torch.equal(fin, torch.isfinite(scores))
    torch.testing.assert_close(scores[fin], out_ref[2][fin], rtol=1e-5, atol=1e-5 * out_ref[2][fin].abs().max().item())
    assert torch.equal(prob.kv_indptr, out_ref[3])
    n = int(out_ref[3][-1])
    assert torch.equal(prob.kv_indices[:n], out_ref[4][:n])
    assert torch.equal(prob.kv_last, out_ref[5])


@pytest.mark.parametrize("dtype,grp,d,agg", [
    (torch.bfloat16, 4, 128, "mean"), (torch.float16, 3, 64, "softmax-mean"), (torch.bfloat16, 7, 64, "max"),
    (torch.float16, 1, 128, "mean"),
])
def test_decode_path_sync_free_and_graph_capturable(dtype, grp, d, agg):
    prob = Problem(dtype, grp, d, agg)
    # 1. warm-up (Triton compiles), checked against the reference
    st_ref, out_ref = _reference(prob)
    res = prob.step(prob.live())
    _check(prob, st_ref, out_ref, *res)

    # 2. eager run with host syncs forbidden
    prob.new_inputs()
    st_ref, out_ref = _reference(prob)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = prob.step(prob.live())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _check(prob, st_ref, out_ref, *res)

    # 3. capture, then replay on new inputs
    prob.new_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch recommends before capture
        st_ref, out_ref = _reference(prob)
        res = prob.step(prob.live())
    torch.cuda.current_stream().wait_stream(side)
    _check(prob, st_ref, out_ref, *res)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_upd, g_pieces, g_scores = prob.step(prob.live())
    for it in range(3):
        prob.new_inputs()
        if it == 2:
            prob.seq_lens.copy_(torch.tensor([100, 2047, 1025], dtype=torch.int32, device=DEV))
            prob.new_inputs()
        st_ref, out_ref = _reference(prob)
        graph.replay()
        _check(prob, st_ref, out_ref, g_upd, g_pieces, g_scores)


def test_torch_selection_is_sync_free_and_capturable():
    """The plain-torch fallback of select_and_diff (topk_pages + residency_update) is also
    graph-safe: no host sync, capturable, same results on replay."""
    g = torch.Generator(device=DEV).manual_seed(1)
    scores = torch.randn(4, 8, 1024, generator=g, device=DEV)
    resident = K.select_and_diff_reference(torch.randn(4, 8, 1024, generator=g, device=DEV),
                                           torch.full((4, 8, 32), -1, device=DEV, dtype=torch.long), None, 32).resident
    mask = torch.rand(4, 8, generator=g, device=DEV) < 0.5
    K.select_and_diff_reference(scores, resident, mask, 32)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = K.select_and_diff_reference(scores, resident, mask, 32)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        K.select_and_diff_reference(scores, resident, mask, 32)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = K.select_and_diff_reference(scores, resident, mask, 32)
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager):
        assert torch.equal(x, y)
    scores.copy_(torch.randn(scores.shape, generator=g, device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, K.select_and_diff(scores, resident, mask, 32)):
        assert torch.equal(x, y)
