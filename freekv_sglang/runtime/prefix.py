"""Attention of a prefill chunk over its cached prefix, read from the tiers (host or GPU tier).

With SGLang's radix cache or chunked prefill, an extend batch holds requests whose first ``m_i`` tokens
(a whole number of pages) are already cached: in FreeKV, in the host tier. The new tokens must attend
over them exactly (:mod:`freekv_sglang.algorithm.extend`). :class:`PrefixAttention` brings each layer's
prefix pages to the GPU into a **staging area of two buffers** of ``capacity`` pages each
(``[2, capacity, Hkv, P, D]`` for K and for V, the tiers' own HND page layout), in *units* of at most
``capacity`` pages (one unit per layer when the batch's prefix fits, else several), and runs the unit's
attention while the next unit is copied:

* unit ``i`` is copied into buffer ``i % 2`` on a side stream, after the attention that last read that
  buffer (event ``free``), and signals ``ready``. A run of consecutive tier pages of at least
  ``dma_min_bytes`` goes as one block copy through the copy engine (``cudaMemcpyAsync``: the link's full
  rate and no SMs taken from the layers computing beside it); the other pages, and every page of an FP8 tier
  (which must be widened), go through the recall gather kernel, one ``(page, KV head)`` piece at a time;
* :meth:`attend` (layer ``l``, on the compute stream) first starts the copy of the unit after its own,
  then waits for its unit, runs FlashInfer's paged prefill over the staged pages (non-causal: every prefix
  key is visible to every new token) with its log-sum-exp, and merges it into the new tokens' own causal
  attention. So layer ``l + 1``'s prefix crosses PCIe while layer ``l`` computes.

Planning reads the batch's prefix page numbers on the host (one synchronisation per extend batch that has a
cached prefix, never in a decode step) to find the runs of consecutive pages.

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


#: Smallest run of consecutive tier pages (bytes of its K, or of its V) that one copy-engine block copy
#: moves; shorter runs go through the gather kernel. Copies of 1 MiB reach the link's bulk rate, where
#: single-page copies reach a third of it (docs/DESIGN.md, measured ceilings).
DMA_MIN_BYTES = 1 << 20
#: Most block copies per unit (each is a host call); the shorter runs beyond it are gathered.
MAX_DMA_RUNS = 16


@dataclass
class _Unit:
    """One staging unit: one block of the batch's prefix pages, for one layer."""

    layer: int
    block: int  # index into PrefixAttention.blocks


@dataclass
class _Copies:
    """How one block's staged pages are copied (the same for every layer).

    ``runs``: ``(first tier page, first staging page, pages)`` block copies; a run never crosses from the
    host tier into the GPU tier. ``page``, ``slot``: int64 ``[pieces]`` the gather kernel's pieces, one per
    (page, KV head), numbered as pages of one head (``tier page x Hkv + head``, ``staging page x Hkv + head``),
    which is how an HND page array reads as one of single-head pages.
    """

    runs: list[tuple[int, int, int]]
    page: torch.Tensor
    slot: torch.Tensor


@dataclass
class _Block:
    """Which staged pages each request sees in one block (the same for every layer)."""

    requests: list[int]  # requests with pages in this block
    pages: list[tuple[int, int]]  # per such request, [first, last) staging pages
    q_rows: torch.Tensor | None  # int64 rows of q of those requests (None: every row)
    copies: _Copies | None = None
    wrapper: object = None  # FlashInfer paged prefill wrapper planned for this block (CUDA)


def page_runs(pages: list[int], n_host: int) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive page numbers in ``pages``, as ``(first page, first index, length)``;
    a run does not cross ``n_host`` (the first GPU-tier page)."""
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(pages):
        if runs and p == runs[-1][0] + runs[-1][2] and p != n_host:
            first, at, n = runs[-1]
            runs[-1] = (first, at, n + 1)
        else:
            runs.append((p, i, 1))
    return runs


class PrefixAttention:
    """Double-buffered staging of cached prefixes and their attention (module docstring).

    Args:
        runtime: the :class:`~.engine.FreeKVRuntime` (tiers, ``req_to_token``, shape, page size).
        capacity_pages: pages per staging buffer.
        workspace: FlashInfer workspace buffer (CUDA; a new one if None).
        dma_min_bytes: shortest run of consecutive pages copied as one block (:data:`DMA_MIN_BYTES`).
    """

    def __init__(self, runtime, capacity_pages: int, workspace: torch.Tensor | None = None,
                 dma_min_bytes: int = DMA_MIN_BYTES):
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
        self.k = torch.empty((2, capacity_pages, sh.n_kv_heads, P, sh.head_dim), dtype=sh.dtype, device=dev)
        self.v = torch.empty_like(self.k)
        self.cuda = dev.type == "cuda"
        self.dma_min_bytes = dma_min_bytes
        self.page_bytes = self.k[0, 0].numel() * self.k.element_size()  # K (or V) of one page, all KV heads
        # block copies need the tier's own dtype (an FP8 tier is widened by the gather kernel)
        self.dma = runtime.host.k(0).dtype == sh.dtype
        self.copied = {"dma": 0, "gather": 0}  # bytes staged each way (K and V), for benchmarks and tests
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
        # host page numbers, to find the runs a block copy can move (a synchronisation, once per extend batch)
        tier_list = tier_page.tolist() if self.dma else []
        starts = [sum(n_pages[:i]) for i in range(len(n_pages))]
        q_start = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
        total = sum(n_pages)
        for b0 in range(0, total, self.capacity):
            b1 = min(b0 + self.capacity, total)
            reqs = [i for i, n in enumerate(n_pages) if n and starts[i] < b1 and starts[i] + n > b0]
            pages = [(max(starts[i], b0) - b0, min(starts[i] + n_pages[i], b1) - b0) for i in reqs]
            every = len(reqs) == len(n_pages)
            q_rows = None if every else torch.cat(
                [torch.arange(q_start[i], q_start[i] + extend_lens[i]) for i in reqs]).to(dev)
            self.blocks.append(_Block(reqs, pages, q_rows, self._plan_copies(tier_page[b0:b1], tier_list[b0:b1])))
        for i, blk in enumerate(self.blocks):
            if self.cuda:
                blk.wrapper = self._plan_wrapper(i, blk, extend_lens)
        self.units = [_Unit(layer, bi) for layer in range(self.rt.shape.n_layers) for bi in range(len(self.blocks))]
        self._copy_next()
        return True

    def _plan_copies(self, tier_page: torch.Tensor, tier_list: list[int]) -> _Copies:
        """Split one block's pages (``tier_page`` int64 ``[n]`` on the device, ``tier_list`` the same on the
        host, or empty when block copies are off) into block copies of long runs and gathered pieces."""
        hkv = self.rt.shape.n_kv_heads
        long = [r for r in page_runs(tier_list, self.rt.host.n_pages) if r[2] * self.page_bytes >= self.dma_min_bytes]
        runs = sorted(long, key=lambda r: -r[2])[:MAX_DMA_RUNS]
        gathered = torch.ones(tier_page.shape[0], dtype=torch.bool)
        for _, at, n in runs:
            gathered[at:at + n] = False
        idx = gathered.nonzero().flatten().to(tier_page.device)
        heads = torch.arange(hkv, device=tier_page.device)
        page = (tier_page[idx, None] * hkv + heads).flatten()
        slot = (idx[:, None] * hkv + heads).flatten()
        return _Copies(runs, page, slot)

    def _plan_wrapper(self, i: int, blk: _Block, extend_lens: list[int]):
        """FlashInfer's paged prefill for block ``i``, planned for this batch (wrappers are kept and re-planned:
        each holds its own plan buffers, pinned on the host, which are slow to allocate)."""
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        sh, P = self.rt.shape, self.rt.layout.page_size
        if self.workspace is None:
            self.workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=self.rt.device)
        while len(self._wrappers) <= i:
            self._wrappers.append(BatchPrefillWithPagedKVCacheWrapper(self.workspace, "HND"))
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
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.rt.device))  # the plan's tensors
            if self._used[buf]:
                self.stream.wait_event(self.free[buf])
            with torch.cuda.stream(self.stream):
                self._copy(u, buf)
                self.ready[buf].record()
        else:
            self._copy(u, buf)
        self._used[buf] = False
        self.next_unit += 1

    def _copy(self, u: _Unit, buf: int) -> None:
        """Unit ``u``'s pages into staging buffer ``buf``: block copies of the long runs, then the gather
        kernel over the rest (on the current stream)."""
        rt, c = self.rt, self.blocks[u.block].copies
        n_host = rt.host.n_pages
        gpu = rt.tier_kw(u.layer)
        pairs = [(rt.host.k(u.layer), gpu.get("gpu_k"), self.k[buf]),
                 (rt.host.v(u.layer), gpu.get("gpu_v"), self.v[buf])]
        for first, at, n in c.runs:
            for host, gpu_tier, dst in pairs:
                src = host[first:first + n] if first < n_host else gpu_tier[first - n_host:first - n_host + n]
                dst[at:at + n].copy_(src, non_blocking=True)
            self.copied["dma"] += 2 * n * self.page_bytes
        if c.page.numel():
            # HND pages read as single-head pages: piece (page, head) is page ``page x Hkv + head`` of head 0
            def one_head(t):
                return t.reshape(-1, 1, *t.shape[2:])

            dst_k, dst_v = (d.reshape(-1, d.shape[2], 1, d.shape[3]) for _, _, d in pairs)
            recall_gather(one_head(pairs[0][0]), one_head(pairs[1][0]), dst_k, dst_v, c.page, c.slot,
                          torch.zeros_like(c.page), **{key: one_head(t) for key, t in gpu.items()})
            self.copied["gather"] += 2 * c.page.numel() * self.page_bytes // self.rt.shape.n_kv_heads

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
            k = self.k[buf, a:b].transpose(1, 2).reshape((b - a) * P, self.k.shape[2], self.k.shape[4])
            v = self.v[buf, a:b].transpose(1, 2).reshape((b - a) * P, self.v.shape[2], self.v.shape[4])
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
