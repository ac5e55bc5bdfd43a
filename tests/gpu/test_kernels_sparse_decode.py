"""SparseDecode (FlashInfer paged decode over working-set slots), XQA and the Triton split decode against
``algorithm.paged_attention``; eager and CUDA-graph mode.

Queries are standard normal, and in the ``large_logits`` tests 64 times that (:data:`LARGE_Q`): logits
q.k / sqrt(D) of standard deviation 64, the largest in the hundreds, past float32's exp range (88), so
a kernel whose softmax does not subtract its running maximum returns inf/NaN there. The attention is
then nearly one-hot; the outputs are compared at the same bf16/fp16 tolerance as the others."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("flashinfer")


import freekv_sglang.kernels as K  # noqa: E402
from freekv_sglang.algorithm import WorkingSetLayout  # noqa: E402

DEV = torch.device("cuda")
LARGE_Q = 64.0  # query scale of the large-logit cases


def _setup(dtype, grp, d, lay, seq, seed=0, q_scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hkv, b = 4, len(seq)
    rows = b + 2
    ws_k = torch.randn(rows * lay.slots, lay.page_size, hkv, d, generator=g, device=DEV).to(dtype)
    ws_v = torch.randn(rows * lay.slots, lay.page_size, hkv, d, generator=g, device=DEV).to(dtype)
    q = (torch.randn(b, hkv * grp, d, generator=g, device=DEV) * q_scale).to(dtype)
    rpi = torch.randperm(rows, generator=g, device=DEV)[:b]
    seq_lens = torch.tensor(seq, dtype=torch.int32, device=DEV)
    return ws_k, ws_v, q, rpi, seq_lens, hkv


def _page_table(seq_lens, rpi, lay):
    """The working sets' CSR page table (``kv_indptr``, ``kv_indices``, ``kv_last_page_len``) built on the GPU."""
    b = len(seq_lens)
    ip = torch.empty(b + 1, dtype=torch.int32, device=DEV)
    ix = torch.empty(b * lay.slots, dtype=torch.int32, device=DEV)
    lp = torch.empty(b, dtype=torch.int32, device=DEV)
    K.build_page_table(seq_lens, rpi, ip, ix, lp, layout=lay, slot_base=lay.slots)
    return ip, ix, lp


def _check(out, q, ws_k, ws_v, ip, ix, lp, scale):
    ref = K.sparse_decode_reference(q, ws_k, ws_v, ip, ix, lp, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)  # NaN/inf in out fails too


def _max_logit(q, ws_k, ip, ix, lp, scale) -> float:
    """Largest logit q.k * scale over the tokens each request's page table lists."""
    b, hq, d = q.shape
    hkv = ws_k.shape[2]
    ptr, idx, last = ip.tolist(), ix.tolist(), lp.tolist()
    top = float("-inf")
    for i in range(b):
        slots = idx[ptr[i]:ptr[i + 1]]
        keys = ws_k[torch.tensor(slots, device=ws_k.device)].flatten(0, 1)  # [tokens, Hkv, D]
        keys = keys[: (len(slots) - 1) * ws_k.shape[1] + last[i]].float()
        lg = torch.einsum("hgd,thd->hgt", q[i].float().view(hkv, hq // hkv, d), keys) * scale
        top = max(top, float(lg.max()))
    return top


def _eager_case(dtype, grp, d, seq, seed=0, split_pages=None, q_scale=1.0):
    """Plan + run over ``seq`` contexts and check against the reference; returns what ``run`` needs."""
    lay = WorkingSetLayout(32, 4, 8, 4)
    ws_k, ws_v, q, rpi, seq_lens, hkv = _setup(dtype, grp, d, lay, seq, seed=seed, q_scale=q_scale)
    ip, ix, lp = _page_table(seq_lens, rpi, lay)
    sd = K.SparseDecode(DEV)
    scale = 1.0 / math.sqrt(d)
    sd.plan(K.page_table_indptr_host(seq_lens.cpu(), lay), ix, K.last_page_len_host(seq_lens.cpu(), lay),
            hkv * grp, hkv, d, lay.page_size, dtype, dtype, sm_scale=scale, split_pages=split_pages)
    _check(sd.run(q, ws_k, ws_v), q, ws_k, ws_v, ip, ix, lp, scale)
    return sd, (q, ws_k, ws_v, ip, ix, lp), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("grp", [1, 3, 4, 7])
def test_sparse_decode_eager(dtype, d, grp):
    sd, (q, ws_k, ws_v, ip, ix, lp), scale = _eager_case(dtype, grp, d, [1, 31, 33, 200, 16 * 32, 16 * 32 + 1,
                                                                         5000, 12345])
    # another scale at run time (through FlashInfer's q_scale)
    _check(sd.run(q, ws_k, ws_v, sm_scale=0.3 * scale), q, ws_k, ws_v, ip, ix, lp, 0.3 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,grp", [(128, 4), (64, 7), (128, 1)])
def test_sparse_decode_large_logits(dtype, d, grp):
    """FlashInfer's paged decode with logits in the hundreds (queries x 64): the reference's attention."""
    sd, (q, ws_k, ws_v, ip, ix, lp), scale = _eager_case(dtype, grp, d, [1, 33, 16 * 32 + 1, 5000, 12345], seed=11,
                                                         q_scale=LARGE_Q)
    assert _max_logit(q, ws_k, ip, ix, lp, scale) > 150  # _eager_case checked the output at this scale


@pytest.mark.parametrize("split_pages", [1, 4, 16])
@pytest.mark.parametrize("grp", [3, 4])
def test_sparse_decode_fixed_split(split_pages, grp):
    """A fixed KV split (FREEKV_DECODE_SPLIT_PAGES) gives the same attention as FlashInfer's own choice."""
    _eager_case(torch.bfloat16, grp, 128, [1, 33, 16 * 32 + 1, 5000, 12345], seed=2, split_pages=split_pages)


@pytest.mark.parametrize("p", [16, 64])
def test_sparse_decode_page_sizes(p):
    lay = WorkingSetLayout(p, 2, 4, 3)
    seq = [5, p * 9 + 3, p * 40]
    ws_k, ws_v, q, rpi, seq_lens, hkv = _setup(torch.bfloat16, 4, 128, lay, seq, seed=1)
    ip, ix, lp = _page_table(seq_lens, rpi, lay)
    sd = K.SparseDecode(DEV)
    sd.plan(ip, ix, lp, 4 * hkv, hkv, 128, p, torch.bfloat16, torch.bfloat16)  # device metadata works too
    _check(sd.run(q, ws_k, ws_v), q, ws_k, ws_v, ip, ix, lp, 1 / math.sqrt(128))


def test_sparse_decode_cuda_graph():
    dtype, grp, d = torch.bfloat16, 4, 128
    lay = WorkingSetLayout(32, 4, 8, 4)
    seq = [40, 700, 5000, 1]
    ws_k, ws_v, q, rpi, seq_lens, hkv = _setup(dtype, grp, d, lay, seq, seed=2)
    b = len(seq)
    sd = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=b, max_slots=lay.slots)
    scale = 1 / math.sqrt(d)
    out = torch.empty_like(q)

    def plan():
        sl = seq_lens.cpu()
        sd.plan(K.page_table_indptr_host(sl, lay), sd.kv_indices, K.last_page_len_host(sl, lay), hkv * grp, hkv, d,
                lay.page_size, dtype, dtype, sm_scale=scale)

    def step():
        K.build_page_table(seq_lens, rpi, sd.kv_indptr, sd.kv_indices, sd.kv_last_page_len, layout=lay,
                           slot_base=lay.slots)
        sd.run(q, ws_k, ws_v, out=out)

    def check():
        _check(out, q, ws_k, ws_v, sd.kv_indptr, sd.kv_indices, sd.kv_last_page_len, scale)

    plan()
    graph = _warm_up_and_capture(step, check)
    _replay_with_new_inputs(graph, seq_lens, q, ws_k, 3, check, before_replay=plan)  # plan: new lengths


def _warm_up_and_capture(step, check) -> torch.cuda.CUDAGraph:
    """Run ``step`` once on a side stream (as graph capture needs), ``check()`` it, then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    check()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _replay_with_new_inputs(graph, seq_lens, q, ws_k, seed, check, before_replay=None) -> None:
    """Replay ``graph`` with new lengths, queries and keys written into its inputs; ``check()`` after each."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for new_seq in ([41, 701, 5001, 2], [33 * 32, 15, 2 * 32 + 1, 9000]):
        seq_lens.copy_(torch.tensor(new_seq, dtype=torch.int32, device=DEV))
        q.copy_(torch.randn(q.shape, generator=g, device=DEV).to(q.dtype))
        ws_k.copy_(torch.randn(ws_k.shape, generator=g, device=DEV).to(ws_k.dtype))
        if before_replay is not None:
            before_replay()
        graph.replay()
        torch.cuda.synchronize()
        check()


def test_sparse_decode_fixed_split_refused_for_graphs():
    w = K.SparseDecode(DEV, use_cuda_graph=True, batch_size=2, max_slots=4)
    ip, lp = torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([32, 32], dtype=torch.int32)
    with pytest.raises(ValueError, match="use_cuda_graph"):
        w.plan(ip, w.kv_indices, lp, 8, 2, 128, 32, torch.bfloat16, torch.bfloat16, split_pages=2)


@pytest.mark.parametrize("dtype,grp,d", [(torch.bfloat16, 4, 128), (torch.bfloat16, 3, 64), (torch.float16, 7, 128)])
def test_xqa_decode_matches_reference(dtype, grp, d):
    """FlashInfer's XQA kernels over a block table derived from the working sets' page table: the same
    attention as the reference, eager and replayed in a CUDA graph (its table filled inside the graph).
    Three configurations: each is its own XQA kernel, compiled on first use (about a minute)."""
    lay = WorkingSetLayout(32, 4, 8, 4)
    seq = [1, 31, 33, 200, 16 * 32 + 1, 5000, 12345]
    ws_k, ws_v, q, rpi, seq_lens, hkv = _setup(dtype, grp, d, lay, seq, seed=5)
    b = len(seq)
    ip = torch.empty(b + 1, dtype=torch.int32, device=DEV)
    ix = torch.empty(b * lay.slots, dtype=torch.int32, device=DEV)
    lp = torch.empty(b, dtype=torch.int32, device=DEV)
    xd = K.XqaDecode(DEV, max_batch=b + 1, slots_per_request=lay.slots)
    scale = 1.0 / math.sqrt(d)

    def step():
        K.build_page_table(seq_lens, rpi, ip, ix, lp, layout=lay, slot_base=lay.slots)
        xd.fill(ip, ix, lp, lay.page_size)
        return xd.run(q, ws_k, ws_v, scale)

    _check(step(), q, ws_k, ws_v, ip, ix, lp, scale)
    out = step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    rpi.copy_(torch.roll(rpi, 1))  # other rows, same shapes: the graph's table follows
    seq_lens.copy_(torch.roll(seq_lens, 2))
    g.replay()
    torch.cuda.synchronize()
    _check(out, q, ws_k, ws_v, ip, ix, lp, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("grp", [1, 3, 4, 7])
@pytest.mark.parametrize("p,n_split,ppi", [(32, None, 1), (32, 1, 1), (16, 5, 1), (64, 64, 1), (32, None, 2),
                                            (32, 3, 4), (16, 8, 4)])
def test_split_decode_matches_reference(dtype, d, grp, p, n_split, ppi):
    """The Triton split decode over the working sets' page table: the reference's attention for any
    chunk count (1, the default, one per slot and more chunks than slots) and slots per iteration."""
    lay = WorkingSetLayout(p, 4, 8, 4)
    seq = [1, 31, 33, 200, 16 * p, 16 * p + 1, 5000, 12345]
    ws_k, ws_v, q, rpi, seq_lens, hkv = _setup(dtype, grp, d, lay, seq, seed=7)
    ip, ix, lp = _page_table(seq_lens, rpi, lay)
    scale = 1.0 / math.sqrt(d)
    out = K.split_decode_attention(q, ws_k, ws_v, ip, ix, lp, max_slots=lay.slots, sm_scale=scale, n_split=n_split,
                                   pages_per_iter=ppi)
    _check(out, q, ws_k, ws_v, ip, ix, lp, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grp,d", [(1, 64), (4, 128), (7, 64)])
@pytest.mark.parametrize("p,n_split,ppi", [(32, None, 1), (32, 1, 1), (16, 5, 4), (32, 3, 4)])
def test_split_decode_large_logits(dtype, grp, d, p, n_split, ppi):
    """The Triton split decode with logits in the hundreds (queries x 64): each chunk's softmax subtracts its
    running maximum and the merge of the chunks the largest log-sum-exp."""
    lay = WorkingSetLayout(p, 4, 8, 4)
    seq = [1, 31, 33, 200, 16 * p + 1, 5000, 12345]
    ws_k, ws_v, q, rpi, seq_lens, hkv = _setup(dtype, grp, d, lay, seq, seed=13, q_scale=LARGE_Q)
    ip, ix, lp = _page_table(seq_lens, rpi, lay)
    scale = 1.0 / math.sqrt(d)
    assert _max_logit(q, ws_k, ip, ix, lp, scale) > 150
    out = K.split_decode_attention(q, ws_k, ws_v, ip, ix, lp, max_slots=lay.slots, sm_scale=scale, n_split=n_split,
                                   pages_per_iter=ppi)
    _check(out, q, ws_k, ws_v, ip, ix, lp, scale)


def test_split_decode_cuda_graph():
    """Page table and split decode recorded in one graph, replayed with new lengths, queries and keys."""
    dtype, grp, d = torch.bfloat16, 4, 128
    lay = WorkingSetLayout(32, 4, 8, 4)
    seq = [40, 700, 5000, 1]
    ws_k, ws_v, q, rpi, seq_lens, hkv = _setup(dtype, grp, d, lay, seq, seed=4)
    b = len(seq)
    ip = torch.zeros(b + 2, dtype=torch.int32, device=DEV)  # a larger table: the first b rows are read
    ix = torch.zeros((b + 1) * lay.slots, dtype=torch.int32, device=DEV)
    lp = torch.ones(b + 1, dtype=torch.int32, device=DEV)
    sd = K.SplitDecode(ip, ix, lp, lay.slots)
    scale = 1 / math.sqrt(d)
    out = torch.empty_like(q)

    def step():
        K.build_page_table(seq_lens, rpi, ip[: b + 1], ix, lp[:b], layout=lay, slot_base=lay.slots)
        sd.run(q, ws_k, ws_v, scale, out=out)

    def check():
        _check(out, q, ws_k, ws_v, ip[: b + 1], ix, lp[:b], scale)

    graph = _warm_up_and_capture(step, check)
    _replay_with_new_inputs(graph, seq_lens, q, ws_k, 5, check)  # no host plan between replays
