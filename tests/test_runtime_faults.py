"""Faults of issue 28 in FreeKV's runtime: requests aborted mid-decode or between the chunks of a chunked prefill.

SGLang aborts a request by freeing its request row and its token slots (``release_kv_cache``: after the one more
decode step an abort of a running request costs, or at the top of the next scheduling step for a chunked prefill);
FreeKV is not told. The next request on that row, over the same host pages, must be served exactly as on a fresh
runtime: every per-row state (working-set slots, resident selections, previous queries) is re-initialised by its
prefill, and the digests of the pages it fills are rewritten. The CPU runtime (kernels' torch references) runs
both and compares every decode output and every resident selection bit for bit.
"""

from __future__ import annotations

import math

import torch

from freekv_sglang.algorithm import WorkingSetLayout
from freekv_sglang.runtime.engine import FreeKVRuntime, RuntimeSettings
from freekv_sglang.runtime.prefix import PrefixAttention
from freekv_sglang.runtime.sizing import ModelShape

L, HKV, GROUP, D, P = 2, 2, 3, 16, 4
LAYOUT = WorkingSetLayout(page_size=P, n_sink=1, n_select=3, n_window=2)
R, MAX_CTX = 6, 32 * P + 2


def _runtime() -> FreeKVRuntime:
    shape = ModelShape(L, HKV * GROUP, HKV, D, torch.float32)
    per_row = -(-MAX_CTX // P)
    n_pages = R * per_row + 1
    req_to_token = torch.zeros((R + 1, MAX_CTX), dtype=torch.int32)
    for r in range(1, R + 1):  # row r owns pages 1 + (r-1)*per_row ... (SGLang hands any free page out)
        pages = torch.arange(per_row) + 1 + (r - 1) * per_row
        req_to_token[r] = (pages[:, None] * P + torch.arange(P)).flatten()[:MAX_CTX].int()
    rt = FreeKVRuntime(shape, RuntimeSettings(LAYOUT, "mean", 0.9, True, "gather"), n_pages, R, req_to_token,
                       max_batch=8, device="cpu")
    rt.prefix = PrefixAttention(rt, 8)
    return rt


class Driver:
    """Feeds a runtime the prefill and decode calls SGLang's attention backend makes, from a seeded stream of
    q/k/v, and records every decode output and resident selection. Each row's decode queries drift from its last
    one (as real queries do), so most steps keep the speculative selection and what is resident matters."""

    def __init__(self, rt: FreeKVRuntime, seed: int):
        self.rt, self.g = rt, torch.Generator().manual_seed(seed)
        self.lens: dict[int, int] = {}
        self.q_last: dict[tuple[int, int], torch.Tensor] = {}
        self.outputs: list[torch.Tensor] = []

    def rnd(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def prefill(self, rows: list[int], new: list[int], prefix: list[int] | None = None) -> None:
        """An extend batch: ``new`` tokens per row after ``prefix`` cached ones (earlier chunks)."""
        rt, sh = self.rt, self.rt.shape
        prefix = prefix or [0] * len(rows)
        rows_t = torch.tensor(rows)
        loc = torch.cat([rt.req_to_token[r, m:m + n].long() for r, m, n in zip(rows, prefix, new)])
        has_prefix = rt.plan_prefill(rows_t, prefix, new)
        T = sum(new)
        for layer in range(L):
            q, k, v = self.rnd(T, sh.n_q_heads, D), self.rnd(T, HKV, D), self.rnd(T, HKV, D)
            if has_prefix:
                rt.prefix_attention(layer, q, torch.zeros_like(q), torch.zeros(q.shape[:2]), 1 / math.sqrt(D))
            rt.prefill_layer_offload(layer, q, k, v, rows_t, new, loc, prefix)
            for r, end in zip(rows, torch.tensor(new).cumsum(0).tolist()):
                self.q_last[layer, r] = q[end - 1]
        rt.finish_prefill()
        for r, m, n in zip(rows, prefix, new):
            self.lens[r] = m + n

    def decode(self, rows: list[int], steps: int) -> None:
        rt = self.rt
        rows_t = torch.tensor(rows)
        for _ in range(steps):
            for r in rows:
                self.lens[r] += 1
            seq = torch.tensor([self.lens[r] for r in rows])
            loc = torch.stack([rt.req_to_token[r, self.lens[r] - 1].long() for r in rows])
            rt.plan_decode(rows_t, seq, seq)
            for layer in range(L):
                q = torch.stack([self.q_last[layer, r] for r in rows]) + 0.3 * self.rnd(len(rows), rt.shape.n_q_heads, D)
                k, v = self.rnd(len(rows), HKV, D), self.rnd(len(rows), HKV, D)
                for i, r in enumerate(rows):
                    self.q_last[layer, r] = q[i]
                self.outputs.append(rt.decode_layer(layer, q, k, v, loc, 1 / math.sqrt(D)).clone())
                self.outputs.append(rt.resident[layer, rows_t].clone())
            rt.finish_decode_step()


def _serve_next(rt: FreeKVRuntime) -> Driver:
    """The requests that take the aborted ones' rows and pages: a short prompt on row 2 (its pages in another
    order: SGLang hands freed pages out again in any order) and a longer one on row 4 prefilled in two chunks,
    decoded together with a request on row 5."""
    row2 = rt.req_to_token[2].clone()
    pages = row2[: (MAX_CTX // P) * P].view(-1, P).flip(0).flatten()
    rt.req_to_token[2, : pages.numel()] = pages
    d = Driver(rt, seed=1)
    d.prefill([2, 5], [13, 22])
    d.prefill([4], [12])  # first chunk (3 pages) ...
    d.prefill([4], [11], prefix=[12])  # ... then the rest over it, staged from the host tier
    d.decode([2, 4, 5], steps=14)
    return d


def test_a_row_and_pages_reused_after_aborts_serve_as_on_a_fresh_runtime():
    used = _runtime()
    # the aborted requests: row 2 decoded 9 steps (aborted mid-decode: a long context, speculation and
    # corrections under way), row 4 prefilled one 20-token chunk of a longer prompt (aborted between chunks),
    # row 5 decoded and finished normally
    old = Driver(used, seed=7)
    old.prefill([2, 5], [45, 37])
    old.prefill([4], [20])
    old.decode([2, 5], steps=9)
    # SGLang frees rows 2, 4, 5 and their pages; FreeKV is not called. The next requests take them.
    got = _serve_next(used).outputs
    want = _serve_next(_runtime()).outputs
    assert len(got) == len(want) > 0
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"decode record {i} differs from a fresh runtime's"


def test_the_prefix_staging_of_an_aborted_chunk_leaves_nothing_planned():
    """An extend batch with a cached prefix plans the staging; a later batch without one (the next chunk's request
    was aborted and a fresh prompt came instead) must not attend over the old plan."""
    rt = _runtime()
    d = Driver(rt, seed=3)
    d.prefill([4], [12])
    d.prefill([4], [8], prefix=[12])
    assert not rt._prefix_planned  # finish_prefill cleared it
    assert rt.plan_prefill(torch.tensor([4]), [0], [9]) is False and not rt._prefix_planned
