"""Attention of a prefill chunk over its cached prefix, read from the tiers (host or GPU tier).

With SGLang's radix cache or chunked prefill, an extend batch holds requests whose first ``m_i`` tokens
(a whole number of pages) are already cached: in FreeKV, in the host tier. The new tokens must attend
over them exactly (:mod:`freekv_sglang.algorithm.extend`). :class:`PrefixAttention` brings each layer's
prefix pages to the GPU into a **staging area of two buffers** of ``capacity`` pages each
(``[2, capacity, P, Hkv, D]`` for K and for V), in *units* of at most ``capacity`` pages (one unit per
layer when the batch's prefix fits, else several), and runs the unit's attention while the next unit is
copied:

* unit ``i`` is copied into buffer ``i % 2`` on a side stream (the recall gather kernel: one
  ``(page, KV head)`` piece per program iteration, HND tier page -> NHD staging page, FP8 tiers widened),
  after the attention that last read that buffer (event ``free``), and signals ``ready``;
* :meth:`attend` (layer ``l``, on the compute stream) first starts the copy of the unit after its own,
  then waits for its unit, runs FlashInfer's paged prefill over the staged pages (non-causal: every prefix
  key is visible to every new token) with its log-sum-exp, and merges it into the new tokens' own causal
  attention. So layer ``l + 1``'s prefix crosses PCIe while layer ``l`` computes.

GPU memory: ``2 buffers x capacity x P x Hkv x D x 2 (K, V) x bytes`` plus FlashInfer's workspace; see
docs/DESIGN.md. On the CPU (tests) the copies run in line and the attention is the plain-torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freekv_sglang.algorithm.extend import attention_lse, merge_lse
from freekv_sglang.kernels.recall import recall_gather

#: Tokens per staging buffer (at most the model's context): a longer batch prefix is staged in several units
#: per layer. 32768 tokens of a Llama-3.1-8B shape are 128 MiB per buffer (K and V), 256 MiB for the two.
STAGING_TOKENS = 32768


def staging_tokens(context_len: int, radix_cache: bool, chunked_prefill: bool) -> int:
    """Tokens per staging buffer a server needs: none when neither the radix cache nor chunked prefill can
    give an extend batch a cached prefix."""
    return min(context_len, STAGING_TOKENS) if (radix_cache or chunked_prefill) else 0


@dataclass
class _Unit:
    """One staging unit: a contiguous run of the batch's prefix pages, for one layer."""

    layer: int
    host_page: torch.Tensor  # int64 [pieces] tier page of each (page, KV head) piece
    dst_slot: torch.Tensor  # int64 [pieces] staging page it goes to
    head: torch.Tensor  # int64 [pieces]
    block: int  # index into PrefixAttention.blocks


@dataclass
class _Block:
    """Which staged pages each request sees in one block (the same for every layer)."""

    requests: list[int]  # requests with pages in this block
    pages: list[tuple[int, int]]  # per such request, [first, last) staging pages
    q_rows: torch.Tensor | None  # int64 rows of q of those requests (None: every row)
    wrapper: object = None  # FlashInfer paged prefill wrapper planned for this block (CUDA)


class PrefixAttention:
    """Double-buffered staging of cached prefixes and their attention (module docstring).

    Args:
        runtime: the :class:`~.engine.FreeKVRuntime` (tiers, ``req_to_token``, shape, page size).
        capacity_pages: pages per staging buffer.
        workspace: FlashInfer workspace buffer (CUDA; a new one if None).
    """

    def __init__(self, runtime, capacity_pages: int, workspace: torch.Tensor | None = None):
        sh, P = runtime.shape, runtime.layout.page_size
        if capacity_pages < 1:
            raise ValueError(f"the prefix staging area needs at least one page, got {capacity_pages}")
        self.rt = runtime
        self.capacity = capacity_pages
        dev = runtime.device
        if dev.type == "cuda":  # FlashInfer's merge kernel: one block of (head_dim / vec) x heads threads
            vec = max(16 // torch.empty(0, dtype=sh.dtype).element_size(), sh.head_dim // 32)
            if sh.n_q_heads * (sh.head_dim // vec) > 1024:
                raise NotImplementedError(f"prefill over a cached prefix with {sh.n_q_heads} query heads of dim "
                                          f"{sh.head_dim} per GPU exceeds FlashInfer's merge kernel; use more TP ranks "
                                          "or --disable-radix-cache --chunked-prefill-size -1")
        self.k = torch.empty((2, capacity_pages, P, sh.n_kv_heads, sh.head_dim), dtype=sh.dtype, device=dev)
        self.v = torch.empty_like(self.k)
        self.cuda = dev.type == "cuda"
        self.stream = torch.cuda.Stream(device=dev) if self.cuda else None
        self.ready = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.free = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self._used = [False, False]  # buffer read by an attention since its last copy (wait for ``free``)
        self.workspace = workspace
        self._q_lens: list[int] = []
        self._wrappers: list = []  # FlashInfer paged prefill wrappers, one per block, reused across batches
        self.blocks: list[_Block] = []
        self.units: list[_Unit] = []
        self.next_unit = 0  # first unit not yet copied
        self.done_units = 0  # units attended

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_for(capacity_pages: int, page_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """GPU bytes of a staging area of ``capacity_pages`` pages per buffer (two buffers, K and V)."""
        return 2 * 2 * capacity_pages * page_size * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    # ------------------------------------------------------------------ planning
    def plan(self, rows: torch.Tensor, prefix_lens: list[int], extend_lens: list[int]) -> bool:
        """Plan the staging and the block attention of one extend batch; start the first copy.

        Args:
            rows: int64 ``[B]`` request rows (device).
            prefix_lens: cached tokens per request (multiples of the page size; host ints).
            extend_lens: new tokens per request (host ints).
        Returns:
            False when no request has a cached prefix (nothing planned).
        """
        P = self.rt.layout.page_size
        for m in prefix_lens:
            if m % P:
                raise NotImplementedError(f"a cached prefix of {m} tokens is not a whole number of {P}-token pages; "
                                          "FreeKV needs SGLang's page size to equal --freekv-page-size")
        self.blocks, self.units, self.next_unit, self.done_units = [], [], 0, 0
        self._used = [False, False]
        self._q_lens = list(extend_lens)
        n_pages = [m // P for m in prefix_lens]
        if not any(n_pages):
            return False
        # every prefix page of the batch, request by request: (request, logical page)
        req_of = torch.repeat_interleave(torch.arange(len(n_pages)), torch.tensor(n_pages))
        page_of = torch.cat([torch.arange(n) for n in n_pages])
        dev = self.rt.device
        tier_page = (self.rt.req_to_token[rows[req_of.to(dev)], (page_of * P).to(dev)].long() // P)
        starts = [sum(n_pages[:i]) for i in range(len(n_pages))]
        q_start = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
        hkv = self.rt.shape.n_kv_heads
        heads = torch.arange(hkv, device=dev)
        total = sum(n_pages)
        for b0 in range(0, total, self.capacity):
            b1 = min(b0 + self.capacity, total)
            reqs = [i for i, n in enumerate(n_pages) if n and starts[i] < b1 and starts[i] + n > b0]
            pages = [(max(starts[i], b0) - b0, min(starts[i] + n_pages[i], b1) - b0) for i in reqs]
            every = len(reqs) == len(n_pages)
            q_rows = None if every else torch.cat(
                [torch.arange(q_start[i], q_start[i] + extend_lens[i]) for i in reqs]).to(dev)
            self.blocks.append(_Block(reqs, pages, q_rows))
        for i, blk in enumerate(self.blocks):
            if self.cuda:
                blk.wrapper = self._plan_wrapper(i, blk, extend_lens)
        for layer in range(self.rt.shape.n_layers):
            for bi in range(len(self.blocks)):
                b0 = bi * self.capacity
                tp = tier_page[b0:b0 + self.capacity]
                slot = torch.arange(tp.shape[0], device=dev)
                self.units.append(_Unit(layer, tp.repeat_interleave(hkv), slot.repeat_interleave(hkv),
                                        heads.repeat(tp.shape[0]), bi))
        self._copy_next()
        return True

    def _plan_wrapper(self, i: int, blk: _Block, extend_lens: list[int]):
        """FlashInfer's paged prefill for block ``i``, planned for this batch (wrappers are kept and re-planned:
        each holds its own plan buffers, pinned on the host, which are slow to allocate)."""
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        sh, P = self.rt.shape, self.rt.layout.page_size
        if self.workspace is None:
            self.workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=self.rt.device)
        while len(self._wrappers) <= i:
            self._wrappers.append(BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD"))
        qo = [0]
        kv = [0]
        for r, (a, b) in zip(blk.requests, blk.pages):
            qo.append(qo[-1] + extend_lens[r])
            kv.append(kv[-1] + b - a)
        indices = torch.cat([torch.arange(a, b, dtype=torch.int32) for a, b in blk.pages])
        w = self._wrappers[i]
        w.plan(torch.tensor(qo, dtype=torch.int32), torch.tensor(kv, dtype=torch.int32), indices,
               torch.full((len(blk.requests),), P, dtype=torch.int32), sh.n_q_heads, sh.n_kv_heads, sh.head_dim,
               P, causal=False, q_data_type=sh.dtype, kv_data_type=sh.dtype)
        return w

    # ------------------------------------------------------------------ copies
    def _copy_next(self) -> None:
        """Start the copy of the next unit into its buffer (side stream on CUDA, in line on the CPU)."""
        i = self.next_unit
        if i >= len(self.units):
            return
        u, buf = self.units[i], i % 2
        rt = self.rt
        args = (rt.host.k(u.layer), rt.host.v(u.layer), self.k[buf], self.v[buf], u.host_page, u.dst_slot, u.head)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(rt.device))  # the plan's tensors
            if self._used[buf]:
                self.stream.wait_event(self.free[buf])
            with torch.cuda.stream(self.stream):
                recall_gather(*args, **rt.tier_kw(u.layer))
                self.ready[buf].record()
        else:
            recall_gather(*args, **rt.tier_kw(u.layer))
        self._used[buf] = False
        self.next_unit += 1

    # ------------------------------------------------------------------ attention
    def attend(self, layer: int, q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
        """Merge the prefix attention of ``layer`` into the new tokens' own attention state.

        Args:
            q: ``[T, Hq, D]`` the batch's new-token queries.
            o, lse: their causal attention over the new tokens, ``[T, Hq, D]`` and float32 ``[T, Hq]``
                (FlashInfer's log-sum-exp on CUDA; natural log on the CPU).
        Returns:
            ``[T, Hq, D]`` attention over prefix + new tokens.
        """
        for _ in self.blocks:
            i = self.done_units
            u, buf = self.units[i], i % 2
            if u.layer != layer:
                raise RuntimeError(f"prefix staging expected layer {u.layer}, the model ran layer {layer}")
            self._copy_next()  # unit i + 1 into the other buffer, overlapping this unit's attention
            blk = self.blocks[u.block]
            qb = q if blk.q_rows is None else q.index_select(0, blk.q_rows)
            if self.cuda:
                torch.cuda.current_stream(self.rt.device).wait_event(self.ready[buf])
                ob, sb = blk.wrapper.forward_return_lse(qb, (self.k[buf], self.v[buf]), causal=False, sm_scale=scale)
                self.free[buf].record()
            else:
                ob, sb = self._attend_reference(blk, qb, buf, scale)
            self._used[buf] = True
            self.done_units += 1
            if blk.q_rows is None:
                o, lse = self._merge(o, lse, ob, sb)
            else:
                om, sm = self._merge(o.index_select(0, blk.q_rows), lse.index_select(0, blk.q_rows), ob, sb)
                o = o.index_copy(0, blk.q_rows, om.to(o.dtype))
                lse = lse.index_copy(0, blk.q_rows, sm)
        return o

    def _merge(self, o_a, s_a, o_b, s_b):
        if self.cuda:  # FlashInfer's kernel, for FlashInfer's log-sum-exp (base 2)
            from flashinfer.cascade import merge_state

            return merge_state(o_a, s_a, o_b, s_b)
        o, s = merge_lse(o_a.float(), s_a, o_b.float(), s_b)
        return o.to(o_a.dtype), s

    def _attend_reference(self, blk: _Block, q: torch.Tensor, buf: int, scale: float):
        outs, lses, row = [], [], 0
        P = self.rt.layout.page_size
        for i, (a, b) in zip(blk.requests, blk.pages):
            n = self._q_lens[i]
            k = self.k[buf, a:b].reshape((b - a) * P, *self.k.shape[-2:])
            v = self.v[buf, a:b].reshape((b - a) * P, *self.v.shape[-2:])
            o, s = attention_lse(q[row:row + n], k, v, scale)
            outs.append(o)
            lses.append(s)
            row += n
        return torch.cat(outs).to(q.dtype), torch.cat(lses)

    def finish(self) -> None:
        """After the last layer: every unit must have been attended; the compute stream waits for the copies."""
        if self.done_units != len(self.units):
            raise RuntimeError(f"prefix staging: {self.done_units} of {len(self.units)} units attended")
        if self.cuda:
            torch.cuda.current_stream(self.rt.device).wait_stream(self.stream)
