"""FreeKV's per-process runtime: host tier, GPU working sets, and the per-layer steps.

One :class:`FreeKVRuntime` serves one model replica (one TP rank). It owns

* the host tier (:class:`~.host_store.HostKVStore`, pinned HND pages indexed by SGLang's
  token slots: ``loc // P`` is the page);
* per layer, the GPU working sets ``ws[l, 0|1]``: ``[(R + 1) * S, P, Hkv, D]`` NHD page
  slots, ``S`` slots per request row (``R`` request rows, row 0 is the padding row);
  request row ``r`` owns slots ``[r * S, (r + 1) * S)`` in every layer, laid out as
  :class:`~freekv_sglang.algorithm.layout.WorkingSetLayout` says, so **one page table
  serves all layers** and every KV head finds its own selected page in the same slot;
* per layer, page digests ``[n_pages, Hkv, 2, D]`` indexed by host page; with ``page_scoring="grid2"``
  instead the pages' 2-bit grid codes ``[n_pages, Hkv, P, D/4]`` uint8 (:mod:`freekv_sglang.kernels.grid_codes`)
  and per (layer, row) the grid ``lo``/``step`` float32 ``[Hkv, D]`` they are quantized on, fitted on the row's
  sink tokens (:meth:`FreeKVRuntime.fit_grids`);
* per (layer, row): the resident selected page of each KV head ``[Hkv, n_select]``, the
  previous step's query and whether it is valid. With speculative over-fetch
  (``layout.n_overfetch = m``) ``n_select`` is the budget plus ``m``: speculation and prefill select
  the top ``n_select``, a correction its top ``n_select - m`` plus ``m`` resident pages
  (``score_and_select(fill_resident=m)``), so it recalls only pages of its top ``n_select - m``.

The per-layer methods mirror :class:`freekv_sglang.algorithm.reference.LayerState` for a
batch of requests and use the kernels of :mod:`freekv_sglang.kernels` (plain-torch
references on CPU). Nothing in :meth:`decode_layer` reads device values on the host.

Lifecycle: all per-row state is re-initialised by the prefill of the request that takes
the row, so a reused row never sees stale state; host pages are SGLang's token slots and
are released by SGLang's own allocator when a request finishes or is aborted; digests are
indexed by host page and rewritten when the page is written again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from freekv_sglang.algorithm.layout import WorkingSetLayout
from freekv_sglang.algorithm.grid_codes import PER_BYTE, fit_grids
from freekv_sglang.kernels.decode_prologue import decode_prologue
from freekv_sglang.kernels.digests import page_digests_from_rows
from freekv_sglang.kernels.grid_codes import check_grid_head_dim, check_grid_page_size, pack_grid_codes
from freekv_sglang.kernels.common import fp8_roundtrip
from freekv_sglang.kernels.kv_store import store_kv_host
from freekv_sglang.kernels.page_table import build_page_table, last_page_len_host, page_table_indptr_host
from freekv_sglang.kernels.score_select import score_and_select, selection_scratch_size
from freekv_sglang.settings import EnvSettings, env_name

from .attention import WorkingSetAttention
from .host_store import HostKVStore
from .prefix import PrefixAttention
from .recall import make_recall
from .stats import DecodeStats, Totals
from .sizing import ModelShape, digest_bytes_per_page, host_bytes_per_page, working_set_bytes_per_row
from .synthetic import CalibratedQueries, SyntheticQueries

logger = logging.getLogger(__name__)


#: page-scoring rules of the runtime (``grid2``: the ``grid2sink`` rule of algorithm/scoring_rules.py)
PAGE_SCORINGS = ("quest", "grid2")


@dataclass(frozen=True)
class RuntimeSettings:
    """Algorithm and data-path choices of the runtime."""

    layout: WorkingSetLayout
    gqa_aggregation: str = "mean"
    correction_threshold: float | None = 0.9
    speculative: bool = True
    recall: str = "gather"  # a strategy of runtime/recall.py
    kv_fp8: bool = False  # the tiers hold FP8 e4m3 K/V; working sets and digests see the same rounded values
    keep_margin: int = 0  # residency hysteresis in pages (kernels.score_select.score_and_select ``margin``)
    page_scoring: str = "quest"  # "quest" (digests) or "grid2" (grid codes on a grid fitted to the sink tokens)

    def __post_init__(self):
        if self.page_scoring not in PAGE_SCORINGS:
            raise ValueError(f"unknown page scoring {self.page_scoring!r}; use one of {', '.join(PAGE_SCORINGS)}")
        if self.page_scoring == "grid2":
            if not self.layout.n_sink:
                raise ValueError("page_scoring grid2 fits its grid on the sink tokens: it needs sink pages")
            if self.layout.n_overfetch:
                raise NotImplementedError("page_scoring grid2 with speculative over-fetch is not implemented")
        if not 0 <= self.keep_margin <= self.layout.n_select:
            raise ValueError(f"keep_margin must be in [0, {self.layout.n_select}] pages, got {self.keep_margin}")
        if self.layout.n_overfetch and not self.speculative:
            raise ValueError("over-fetch (layout.n_overfetch > 0) is speculation's: it needs speculative=True")


@dataclass
class DecodeStep:
    """Per-step tensors shared by all layers (built once per decode step by :meth:`plan_decode`)."""

    rows: torch.Tensor  # int64 [B] request rows
    n: torch.Tensor  # int64 [B] history length incl. the new token
    n_next: torch.Tensor  # int64 [B] n + 1: the context the speculative selection is for
    cur_slot: torch.Tensor  # int64 [B] absolute working-set slot of the current page
    cur_off: torch.Tensor  # int64 [B] offset of the new token inside it
    digest_row0: torch.Tensor  # int64 [B] first row (in the slot-row view) of a just-completed page, -1 if none


#: Persistent grid of the asynchronous prefill offload (FREEKV_ASYNC_PREFILL=1): as the recall's, a few
#: programs keep the link busy (8 programs already read pinned memory at the full rate).
ASYNC_OFFLOAD_PROGRAMS = 32


class FreeKVRuntime:
    """Host tier + GPU working sets + the prefill/decode steps of FreeKV.

    Args:
        shape: local attention shape.
        settings: algorithm/data-path settings.
        n_host_pages: host pages incl. the padding page 0 (SGLang's token capacity / P + 1, less the GPU tier).
        n_gpu_pages: full-KV pages in GPU memory after the host tier's (``--freekv-gpu-tier-gb``): page
            ``n_host_pages + i`` is GPU-tier page ``i``; SGLang's allocator hands them out once the host
            tier's lower-numbered pages are taken.
        max_rows: request rows ``R`` (SGLang's ``req_to_token_pool.size``); rows ``0..R`` exist.
        req_to_token: int32 ``[R + 1, max_ctx]`` SGLang's row -> token-slot map (shared, not copied).
        max_batch: largest decode batch (fixed scratch sizes for CUDA graphs).
        device: torch device of the working sets.
        workspace: FlashInfer workspace buffer to share (CUDA only; a new one if None).
        prefix_pages: pages per buffer of the staging area for prefill over cached prefixes
            (:class:`~.prefix.PrefixAttention`; 0: none, and prefixes are refused).
        env: the ``FREEKV_*`` variables (:func:`freekv_sglang.settings.load_settings`; default: their defaults).
    """

    def __init__(self, shape: ModelShape, settings: RuntimeSettings, n_host_pages: int, max_rows: int,
                 req_to_token: torch.Tensor, max_batch: int, device: torch.device | str,
                 workspace: torch.Tensor | None = None, n_gpu_pages: int = 0, env: EnvSettings = EnvSettings(),
                 prefix_pages: int = 0):
        self.shape = shape
        self.settings = settings
        self.env = env
        self.layout = lay = settings.layout
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.req_to_token = req_to_token
        self.max_rows = max_rows
        self.row_pool = None  # SGLang's ReqToTokenPool (rows in use, for metrics), set by the integration
        self.max_batch = max_batch
        # pages that can be candidates are full, so they lie within the first max_ctx // P pages
        self.max_pages = req_to_token.shape[1] // lay.page_size
        L, hq, hkv, d, dt = shape.n_layers, shape.n_q_heads, shape.n_kv_heads, shape.head_dim, shape.dtype
        P, S = lay.page_size, lay.slots

        tier_dt = torch.float8_e4m3fn if settings.kv_fp8 else dt  # dtype of the full KV (host and GPU tiers)
        if n_gpu_pages < 0:
            raise ValueError(f"n_gpu_pages must be >= 0, got {n_gpu_pages}")
        self.n_gpu_pages = n_gpu_pages
        self.recall = make_recall(settings.recall, self, programs=env.recall_programs, warps=env.recall_warps)
        self.host = HostKVStore(L, n_host_pages, hkv, P, d, tier_dt, pin=self.is_cuda, alloc=env.host_alloc)
        dev = self.device
        # GPU tier: more full-KV pages, same layout as the host tier's, numbered after them
        self.gpu_tier = (torch.zeros((L, 2, n_gpu_pages, hkv, P, d), dtype=tier_dt, device=dev) if n_gpu_pages
                         else None)
        self.ws = torch.zeros((L, 2, (max_rows + 1) * S, P, hkv, d), dtype=dt, device=dev)
        self.grid = settings.page_scoring == "grid2"
        if self.grid:
            check_grid_head_dim(d)
            check_grid_page_size(P, dev)
            # grid codes of every page instead of its digest, and each row's grid per layer
            self.digests = torch.zeros((L, n_host_pages + n_gpu_pages, hkv, P, d // PER_BYTE), dtype=torch.uint8,
                                       device=dev)
            self.grid_lo = torch.zeros((L, max_rows + 1, hkv, d), dtype=torch.float32, device=dev)
            self.grid_step = torch.zeros_like(self.grid_lo)
        else:
            self.digests = torch.zeros((L, n_host_pages + n_gpu_pages, hkv, 2, d), dtype=dt, device=dev)
            self.grid_lo = self.grid_step = None
        self.resident = torch.full((L, max_rows + 1, hkv, lay.n_select), -1, dtype=torch.int64, device=dev)
        self.q_prev = torch.zeros((L, max_rows + 1, hq, d), dtype=dt, device=dev)
        self.q_valid = torch.zeros((L, max_rows + 1, hkv), dtype=torch.bool, device=dev)
        # selection scratch: one for the correction on the compute stream, one for the side stream
        n_keys = max(selection_scratch_size(max_batch, hkv, self.max_pages, lay.n_select,
                                            margin=settings.keep_margin),  # speculation (and prefill)
                     selection_scratch_size(max_batch, hkv, self.max_pages, lay.n_select,
                                            fill_resident=lay.n_overfetch))  # a correction under over-fetch
        self.keys_main = torch.empty(n_keys, dtype=torch.int64, device=dev)
        self.keys_side = torch.empty_like(self.keys_main)
        self.head_ids = torch.arange(hkv, device=dev)
        self.flags = torch.zeros((L, max_batch, hkv), dtype=torch.bool, device=dev)  # per layer: read by the side stream
        self.spec = torch.zeros((L, max_batch, hkv), dtype=torch.bool, device=dev)
        # decode statistics: the kernels add to ``counters`` on the GPU, the host counts steps
        self.stats_counter = DecodeStats(dev, L * hkv, lay.slots * P)
        self.counters = self.stats_counter.gpu
        # decode steps between statistics log lines (0: never); each line covers its interval
        self.log_every = env.log_stats_every
        self._logged = Totals()

        cos = env.bench_query_cosine
        self.synthetic = SyntheticQueries(L, hq, d, cos, dev) if cos is not None else None
        if self.synthetic is not None:
            logger.warning("%s=%s: decode queries are replaced by synthetic ones with that consecutive cosine; "
                           "generated tokens are meaningless (benchmarks only)", env_name("bench_query_cosine"), cos)
        if env.bench_locality is not None:
            # calibrated on the budget: the measured page change is that of the top n_budget pages
            self.synthetic = CalibratedQueries(env.bench_locality, L, hq, hkv, d, lay.without_overfetch(),
                                               self.max_pages * P, dev, dtype=dt, scoring=settings.page_scoring)
            logger.warning("%s=%s: decode queries are replaced by synthetic ones at the measured locality (%s); "
                           "generated tokens are meaningless (benchmarks only)", env_name("bench_locality"),
                           env.bench_locality, self.synthetic.summary(settings.correction_threshold or 0.9))

        # Speculation runs after each layer's attention on two side streams: selection on one,
        # recall on the other (after an event recorded after that layer's selection), so layer
        # l+1's selection overlaps layer l's transfer.
        side = self.is_cuda and settings.speculative
        self.side_stream = torch.cuda.Stream(device=dev) if side else None
        self.recall_stream = torch.cuda.Stream(device=dev) if side else None
        self.attn_done = [torch.cuda.Event() for _ in range(L)] if side else None
        self.select_done = [torch.cuda.Event() for _ in range(L)] if side else None
        # recall lists (int32 slot, page): one set for the compute stream, one per layer for the
        # speculative pass (a layer's lists stay valid until its recall ran on the recall stream)
        self.main_lists = torch.empty((2, max_batch, hkv, lay.n_select), dtype=torch.int32, device=dev)
        self.side_lists = (torch.empty((2, L, max_batch, hkv, lay.n_select), dtype=torch.int32, device=dev)
                           if side else None)
        self.step: DecodeStep | None = None
        self.attention = WorkingSetAttention(self.device, max_batch, S, workspace=workspace, page_size=P,
                                             head_dim=d, dtype=dt, kernel=env.decode_attention)
        # FREEKV_ASYNC_PREFILL=1: a prefill layer's offload to the host tier and its digests / first
        # working set run on a side stream while the next layers compute (joined by finish_prefill)
        self.prefill_stream = torch.cuda.Stream(device=dev) if self.is_cuda and env.async_prefill else None
        # prefill over cached prefixes (radix cache, chunked prefill): two staging buffers of prefix_pages pages
        self.prefix = PrefixAttention(self, prefix_pages, workspace) if prefix_pages else None
        self._prefix_planned = False

    # ------------------------------------------------------------------ sizes
    @property
    def gpu_bytes(self) -> int:
        parts = (self.ws, self.digests, self.resident, self.q_prev, self.q_valid, self.keys_main, self.keys_side,
                 self.main_lists, self.side_lists, self.gpu_tier, self.grid_lo, self.grid_step)
        return (sum(t.numel() * t.element_size() for t in parts if t is not None)
                + (self.prefix.nbytes if self.prefix is not None else 0))

    def used_bytes(self, n_requests: int, tokens_each: int) -> tuple[int, int]:
        """``(gpu, host)`` bytes that ``n_requests`` requests of ``tokens_each`` tokens occupy: their
        working sets, resident lists and previous queries plus the digests of their pages on the GPU,
        their whole KV in the host tier (scratch shared by all requests not counted)."""
        sh, lay = self.shape, self.layout
        pages = -(-tokens_each // lay.page_size)
        scoring = self.settings.page_scoring
        return (n_requests * (working_set_bytes_per_row(sh, lay, scoring)
                              + pages * digest_bytes_per_page(sh, scoring, lay.page_size)),
                n_requests * pages * host_bytes_per_page(sh, lay.page_size, self.settings.kv_fp8))

    def tier_kw(self, layer: int) -> dict:
        """The GPU tier of one layer as the kernels' ``gpu_k``/``gpu_v`` (empty without a tier)."""
        if self.gpu_tier is None:
            return {}
        return {"gpu_k": self.gpu_tier[layer, 0], "gpu_v": self.gpu_tier[layer, 1]}

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` working-set page slots of one layer, ``[(R+1)*S, P, Hkv, D]`` each (NHD)."""
        return self.ws[layer, 0], self.ws[layer, 1]

    # ------------------------------------------------------------------ writes
    def store_tokens(self, layer: int, k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor,
                     num_programs: int | None = None) -> None:
        """Write new tokens ``k, v [T, Hkv, D]`` at token slots ``loc [T]`` into the host tier
        (``num_programs``: a persistent grid of that many programs instead of one per token block and head)."""
        store_kv_host(self.host.k(layer), self.host.v(layer), k, v, loc, num_programs=num_programs,
                      **self.tier_kw(layer))

    # ------------------------------------------------------------------ selection + recall
    def _select_and_recall(self, layer: int, q: torch.Tensor, rows: torch.Tensor, n_ctx: torch.Tensor,
                           head_mask: torch.Tensor | None, keys: torch.Tensor,
                           counter: torch.Tensor | None = None, corrected: bool = False) -> None:
        """Select with ``q [B,Hq,D]`` over the candidates of ``n_ctx`` for the
        heads in ``head_mask`` (all if None), update their resident sets in place, recall what is
        missing. ``counter`` (an int64 scalar view) accumulates the recalled pieces of real rows.
        ``corrected``: a correction (with over-fetch: top ``n_budget`` plus resident pages)."""
        b = rows.shape[0]
        r_slot, r_page = self.main_lists[0, :b], self.main_lists[1, :b]
        self._select(layer, q, rows, n_ctx, head_mask, keys, counter, None, r_slot, r_page, corrected)
        self.recall.recall_selection(layer, r_slot, r_page, rows)

    def _select(self, layer: int, q: torch.Tensor, rows: torch.Tensor, n_ctx: torch.Tensor,
                head_mask: torch.Tensor | None, keys: torch.Tensor, counter: torch.Tensor | None,
                q_index: torch.Tensor | None, r_slot: torch.Tensor, r_page: torch.Tensor,
                corrected: bool = False) -> None:
        """Selection + residency update only; the recall lists go to ``r_slot, r_page [B, Hkv, k]``.
        A correction under over-fetch keeps ``n_overfetch`` resident pages beyond its top ``n_budget`` (and no
        hysteresis); every other selection takes the top ``n_select`` (with the keep margin)."""
        lay = self.layout
        fill = lay.n_overfetch if corrected else 0
        score_and_select(q, self.digests[layer], self.req_to_token, rows, n_ctx, head_mask, self.resident[layer],
                         lay.n_select, r_slot, r_page, counter, max_pages=self.max_pages, page_size=lay.page_size,
                         n_sink=lay.n_sink, n_window=lay.n_window, aggregation=self.settings.gqa_aggregation,
                         q_index=q_index, keys=keys, margin=0 if fill else self.settings.keep_margin,
                         fill_resident=fill, grid=self.layer_grid(layer), grid_index=rows if self.grid else None)

    def layer_grid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(lo, step)`` float32 ``[R + 1, Hkv, D]`` of one layer (grid2; None with quest)."""
        return (self.grid_lo[layer], self.grid_step[layer]) if self.grid else None

    # ------------------------------------------------------------------ grid2: grids
    def fit_grids(self, layers, rows: torch.Tensor) -> None:
        """Fit the grids of request ``rows`` (int64 ``[B]``, device) in ``layers`` on their sink tokens, read from
        the rows' sink slots of the working sets (the keys as the tiers store them; every sink page must hold its
        ``P`` tokens): per channel the 0.5% and 99.5% quantiles (:func:`~freekv_sglang.algorithm.grid_codes.fit_grids`,
        the ``grid2sink`` rule). Torch ops, outside CUDA graphs. Requests that share a page beyond the sink share
        the sink, so they get the same grid and the page's codes stay valid for all of them."""
        lay, sh = self.layout, self.shape
        if rows.numel() == 0:
            return
        for layer in layers:
            ws = self.ws[layer, 0].view(self.max_rows + 1, lay.slots, lay.page_size, sh.n_kv_heads, sh.head_dim)
            keys = ws[rows, :lay.n_sink].flatten(1, 2)  # [B, sink, Hkv, D]
            lo, step = fit_grids(keys)
            self.grid_lo[layer].index_copy_(0, rows, lo)
            self.grid_step[layer].index_copy_(0, rows, step)

    # ------------------------------------------------------------------ prefill
    def plan_prefill(self, rows: torch.Tensor, prefix_lens: list[int], extend_lens: list[int]) -> bool:
        """Before the layers of an extend batch: plan (and start) the staging of the requests' cached prefixes
        (a radix-cache hit, or the earlier chunks of a chunked prefill) for :meth:`prefix_attention`.

        Args:
            rows: int64 ``[B]`` request rows (device); prefix_lens, extend_lens: ``B`` host ints.
        Returns:
            True when some request has a cached prefix (call :meth:`prefix_attention` in every layer).
        """
        self._prefix_planned = False
        if not any(prefix_lens):
            return False
        if self.prefix is None:
            raise NotImplementedError("prefill with a cached prefix needs the prefix staging area (prefix_pages > 0)")
        self._prefix_planned = self.prefix.plan(rows, list(prefix_lens), list(extend_lens))
        return self._prefix_planned

    def prefix_attention(self, layer: int, q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """The new tokens' attention over their cached prefixes merged into their own (causal) attention.

        Args:
            q: ``[T, Hq, D]``; o, lse: attention over the new tokens only, ``[T, Hq, D]`` and float32 ``[T, Hq]``
                (FlashInfer's log-sum-exp on CUDA, natural log on the CPU).
        Returns:
            ``[T, Hq, D]`` attention over prefix + new tokens.
        """
        return self.prefix.attend(layer, q, o, lse, scale)

    def prefill_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor,
                      extend_lens: list[int], out_cache_loc: torch.Tensor, prefix_lens: list[int] | None = None) -> None:
        """After a prefill forward (whole prompts, or new tokens after a cached prefix), for one layer.

        The new tokens' K/V must already be in the host tier (:meth:`store_tokens`); a cached prefix's pages
        are there with their digests. Builds the digests of the pages the new tokens complete, then seeds
        each request's working set for its first decode step from its whole context (prefix + new tokens):
        sink and window pages, plus the pages selected with the last token's query. Marks the rows as having
        no previous query.

        Args:
            q: ``[T, Hq, D]`` post-RoPE queries; k: ``[T, Hkv, D]`` post-RoPE keys (requests
                back to back, ``extend_lens`` tokens each).
            rows: int64 ``[B]`` request rows (device).
            extend_lens: the ``B`` new-token counts (host ints).
            out_cache_loc: ``[T]`` token slots of the new tokens (device).
            prefix_lens: the ``B`` cached-prefix lengths (whole pages; host ints); None: no prefix.
        """
        lay = self.layout
        P = lay.page_size
        dev = self.device
        prefix_lens = list(prefix_lens) if prefix_lens is not None else [0] * len(extend_lens)
        starts, acc = [], 0
        for n in extend_lens:
            starts.append(acc)
            acc += n
        totals = [m + n for m, n in zip(prefix_lens, extend_lens)]
        if self.settings.kv_fp8:  # the digests describe the keys as the FP8 tiers store them
            k = fp8_roundtrip(k)
        # 1. digests of every page the new tokens complete, from the fresh keys (a prefix is whole pages);
        #    grid codes after step 2 (their grid is fitted on the sink pages it brings to the working set)
        if not self.grid:
            row0 = [s + p * P - m for s, m, n0 in zip(starts, prefix_lens, totals) for p in range(m // P, n0 // P)]
            if row0:
                row0_t = torch.tensor(row0, dtype=torch.int64).to(dev, non_blocking=True)
                dst = out_cache_loc[row0_t].long() // P
                page_digests_from_rows(k, row0_t, dst, self.digests[layer], page_size=P)
        # 2. sink + window pages of the first decode step's layout (pages that hold context tokens)
        rr, pages, slots = [], [], []
        for i, n0 in enumerate(totals):
            n1 = n0 + 1
            have = -(-n0 // P)
            sel = list(range(lay.n_sink_pages(n1))) + [p for p in range(lay.window_start(n1), lay.n_pages(n1))
                                                         if p < have]
            for p in sel:
                rr.append(i)
                pages.append(p)
                slots.append(p if p < lay.n_sink else lay.window_slot(p))
        if rr:
            idx = torch.tensor([rr, pages, slots], dtype=torch.int64).to(dev, non_blocking=True)
            r = rows[idx[0]]
            host_page = self.req_to_token[r, idx[1] * P].long() // P
            dst_slot = r * lay.slots + idx[2]
            hkv = self.shape.n_kv_heads
            self.recall.recall_pieces(layer, host_page.repeat_interleave(hkv), dst_slot.repeat_interleave(hkv),
                                      self.head_ids.repeat(len(rr)))
        if self.grid:
            self._prefill_grid_codes(layer, k, rows, starts, prefix_lens, totals, out_cache_loc)
        # 3. selected pages, chosen with the last token's query for context n0 + 1
        last = torch.tensor([s + n - 1 for s, n in zip(starts, extend_lens)], dtype=torch.int64)
        q_last = q[last.to(dev, non_blocking=True)]
        n1 = torch.tensor([n0 + 1 for n0 in totals], dtype=torch.int64).to(dev, non_blocking=True)
        self.resident[layer].index_fill_(0, rows, -1)
        for i in range(0, len(extend_lens), self.max_batch):
            sl = slice(i, i + self.max_batch)
            self._select_and_recall(layer, q_last[sl], rows[sl], n1[sl], None, self.keys_main)
        self.q_valid[layer].index_fill_(0, rows, False)

    def _prefill_grid_codes(self, layer: int, k: torch.Tensor, rows: torch.Tensor, starts: list[int],
                            prefix_lens: list[int], totals: list[int], out_cache_loc: torch.Tensor) -> None:
        """grid2 prefill of one layer, after the sink pages are in the working sets: the grid of every request
        whose context fills the sink (refitted from the same tokens after a cached prefix, so equal to the
        first fit), then the codes of the pages beyond the sink that the new tokens complete (from the fresh keys;
        a cached prefix's pages keep theirs). A context inside the sink gets its grid at decode, once the sink is
        full (:meth:`plan_decode_host`); no page beyond the sink is full before."""
        lay, P, dev = self.layout, self.layout.page_size, self.device
        sink = lay.n_sink * P
        full = [i for i, n0 in enumerate(totals) if n0 >= sink]
        if not full:
            return
        self.fit_grids([layer], rows[torch.tensor(full, dtype=torch.int64).to(dev, non_blocking=True)])
        ent = [(i, s + p * P - m) for i, (s, m, n0) in enumerate(zip(starts, prefix_lens, totals))
               for p in range(max(m // P, lay.n_sink), n0 // P)]
        if not ent:
            return
        idx = torch.tensor(ent, dtype=torch.int64).to(dev, non_blocking=True)
        row0_t = idx[:, 1].contiguous()  # (the kernel reads row0 / dst / grid_index as contiguous [M])
        dst = out_cache_loc[row0_t].long() // P
        pack_grid_codes(k, row0_t, dst, self.digests[layer], self.grid_lo[layer], self.grid_step[layer],
                        page_size=P, grid_index=rows[idx[:, 0]].contiguous())

    def prefill_layer_offload(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              rows: torch.Tensor, extend_lens: list[int], loc: torch.Tensor,
                              prefix_lens: list[int] | None = None) -> None:
        """:meth:`store_tokens` then :meth:`prefill_layer` for one layer of a prefill (same arguments:
        ``q [T, Hq, D]``, ``k, v [T, Hkv, D]``, ``rows [B]``, ``loc [T]``). With a prefill stream they run
        on it, after the work already queued on the current stream, so the layer's transfer to the host
        tier overlaps the next layers' compute; call :meth:`finish_prefill` after the last layer."""
        if self.prefill_stream is None:
            self.store_tokens(layer, k, v, loc)
            self.prefill_layer(layer, q, k, rows, extend_lens, loc, prefix_lens)
            return
        self.prefill_stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in (q, k, v, rows, loc):  # made on the compute stream, read on the prefill stream
            t.record_stream(self.prefill_stream)
        with torch.cuda.stream(self.prefill_stream):
            # a small grid: the offload is bound by the link, and the next layers' compute needs the SMs
            self.store_tokens(layer, k, v, loc, num_programs=ASYNC_OFFLOAD_PROGRAMS)
            self.prefill_layer(layer, q, k, rows, extend_lens, loc, prefix_lens)

    def finish_prefill(self) -> None:
        """Join the prefill and prefix-staging streams (after the last layer of a prefill forward)."""
        if self._prefix_planned:
            self.prefix.finish()
            self._prefix_planned = False
        if self.prefill_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.prefill_stream)

    # ------------------------------------------------------------------ decode
    def plan_decode_device(self, rows: torch.Tensor, seq_lens: torch.Tensor, graph: bool = False) -> DecodeStep:
        """Device half of a step's metadata: graph-recordable (fixed shapes, no host reads).

        Args:
            rows: int ``[B]`` request rows; seq_lens: int ``[B]`` history incl. the new token.
            graph: write the page table into the CUDA-graph wrapper of batch size ``B``.
        """
        lay = self.layout
        P = lay.page_size
        b = rows.shape[0]
        if b > self.max_batch:
            raise ValueError(f"decode batch {b} exceeds the {self.max_batch} request rows FreeKV was sized for")
        rows = rows.long()
        n = seq_lens.long()
        cur_slot = rows * lay.slots + lay.current_slot(n)
        complete = (n % P) == 0
        digest_row0 = torch.where(complete, cur_slot * P, torch.full_like(cur_slot, -1))
        indptr, indices, last = self.attention.device_buffers(b, graph)
        build_page_table(n, rows, indptr, indices, last, layout=lay, slot_base=lay.slots)
        self.step = DecodeStep(rows, n, n + 1, cur_slot, (n - 1) % P, digest_row0)
        return self.step

    def plan_decode_host(self, bs: int, seq_lens_cpu: torch.Tensor, graph: bool = False,
                         rows: torch.Tensor | None = None) -> None:
        """Host half (outside CUDA graphs): step counters, and FlashInfer's plan from the host copy of the
        lengths where the attention kernel needs one. With grid2, ``rows`` (the batch's request rows, device):
        a request whose sink the previous step filled (history ``sink + 1`` with the new token) gets its grids,
        in every layer, before any page beyond its sink is full (:meth:`fit_grids`, eager torch ops; None: none
        is fitted, as when capturing a graph)."""
        lay, sh = self.layout, self.shape
        sl = seq_lens_cpu[:bs]
        if self.grid and rows is not None:
            fill = torch.nonzero(sl.long() == lay.n_sink * lay.page_size + 1).flatten()
            if fill.numel():
                self.fit_grids(range(sh.n_layers), rows[:bs].long()[fill.to(self.device, non_blocking=True)])
        self.stats_counter.count_step(sl)
        if self.log_every and self.stats_counter.steps % self.log_every == 0:
            self._log_stats()
        host = self.attention.needs_host_tables  # the split decode plans nothing on the host
        self.attention.plan(bs, page_table_indptr_host(sl, lay) if host else None,
                            last_page_len_host(sl, lay) if host else None, graph=graph, num_qo_heads=sh.n_q_heads,
                            num_kv_heads=sh.n_kv_heads, head_dim=sh.head_dim, page_size=lay.page_size, dtype=sh.dtype)

    def plan_decode(self, rows: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor) -> DecodeStep:
        """Both halves, eagerly (no CUDA graph)."""
        step = self.plan_decode_device(rows, seq_lens, graph=False)
        self.plan_decode_host(rows.shape[0], seq_lens_cpu, graph=False, rows=rows)
        return step

    def decode_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     loc: torch.Tensor, scale: float) -> torch.Tensor:
        """One layer of one decode step (after :meth:`plan_decode`).

        Args:
            q: ``[B, Hq, D]`` post-RoPE queries; k, v: ``[B, Hkv, D]`` the new token's K/V;
            loc: ``[B]`` its token slots; scale: softmax scale.
        Returns:
            ``[B, Hq, D]`` attention output (dtype of q).
        """
        st, cfg = self.step, self.settings
        b = q.shape[0]
        if self.synthetic is not None:
            q = self.synthetic.apply(layer, q, st.rows, st.n, self.q_prev[layer])
        wk, wv = self.layer_slots(layer)
        flags, spec = self.flags[layer, :b], self.spec[layer, :b]
        # 1. token -> host tier + window page; digest of a completed page; correction check;
        #    previous query updated (one kernel)
        decode_prologue(q.contiguous(), k.contiguous(), v.contiguous(), loc, st.rows, st.n, st.cur_slot,
                        self.host.k(layer), self.host.v(layer), wk, wv, None if self.grid else self.digests[layer],
                        self.q_prev[layer], self.q_valid[layer], flags, spec, tau=cfg.correction_threshold,
                        speculative=cfg.speculative, counters=self.counters, **self.tier_kw(layer))
        if self.grid:  # grid codes of a completed page, from its working-set slot (rows -1: no page completed)
            pack_grid_codes(wk.view(-1, *wk.shape[2:]), st.digest_row0, loc.long() // self.layout.page_size,
                            self.digests[layer], self.grid_lo[layer], self.grid_step[layer],
                            page_size=self.layout.page_size, grid_index=st.rows)
        # 2. heads that must not trust the speculative pages: reselect with q_t before attention
        self._select_and_recall(layer, q, st.rows, st.n, flags, self.keys_main, self.counters[2], corrected=True)
        # 3. attention over the working set (sink + selected + window)
        o = self.attention(q, wk, wv, scale)
        # 4. speculative selection + recall for the next step, on the side stream, for the heads
        #    whose pages the correction did not already choose with q_t (see decode_prologue); with
        #    over-fetch for every head: a corrected head kept m resident pages, not its top n_select
        if cfg.speculative:
            if self.layout.n_overfetch:
                spec = None
            if self.side_stream is not None:
                self.attn_done[layer].record()
                self.side_stream.wait_event(self.attn_done[layer])
                self._speculate_on_side_streams(layer, st.rows, st.n_next, spec)
            else:
                self._select_and_recall(layer, q, st.rows, st.n_next, spec, self.keys_side, self.counters[3])
        return o

    def _speculate_on_side_streams(self, layer: int, rows: torch.Tensor, n_ctx: torch.Tensor,
                                   head_mask: torch.Tensor | None) -> None:
        """Speculative selection with the rows' previous query (``q_prev``) over the candidates of
        ``n_ctx [B]`` for the heads in ``head_mask [B, Hkv]`` (all if None), on the side stream, then the recall of
        its per-layer lists on the recall stream (after the selection). The caller orders the side
        stream after what the selection reads."""
        b = rows.shape[0]
        r_slot, r_page = self.side_lists[0, layer, :b], self.side_lists[1, layer, :b]
        with torch.cuda.stream(self.side_stream):
            self._select(layer, self.q_prev[layer], rows, n_ctx, head_mask, self.keys_side, self.counters[3],
                         rows, r_slot, r_page)
            self.select_done[layer].record()
        self.recall_stream.wait_event(self.select_done[layer])
        with torch.cuda.stream(self.recall_stream):
            self.recall.recall_selection(layer, r_slot, r_page, rows)

    @property
    def piece_bytes(self) -> int:
        """K + V bytes of one recalled piece (one page of one KV head) in the tiers' dtype."""
        return 2 * self.layout.page_size * self.shape.head_dim * self.host.k(0).element_size()

    def stats(self) -> dict:
        """Decode statistics since start or :meth:`reset_stats` (waits for the GPU: benchmarks and tests)."""
        return self.stats_counter.totals_now().rates(self.piece_bytes)

    def reset_stats(self) -> None:
        """Zero the decode statistics (waits for the GPU)."""
        self.stats_counter.reset()
        self._logged = Totals()

    def _log_stats(self) -> None:
        """Log the statistics of the steps since the last line, from the newest snapshot (no host sync)."""
        now = self.stats_counter.totals()
        st = now.minus(self._logged).rates(self.piece_bytes)
        self._logged = now
        logger.info(f"FreeKV decode stats: {self.stats_counter.steps} steps so far; over the {st['decode_steps']} "
                    f"steps before the last snapshot: correction rate {st['correction_rate']:.3f} of (layer, KV head) "
                    f"checks, {st['recalled_pieces_per_request_step']:.1f} pieces "
                    f"({st['recall_bytes_per_request_step'] / 2**20:.2f} MiB) recalled per request per step, "
                    f"{100 * st['recalled_before_attention_share']:.0f}% of them before attention, "
                    f"{100 * st['sparse_request_step_share']:.0f}% of request-steps sparse")

    def finish_decode_step(self) -> None:
        """Join the speculation streams (call after the last layer of a decode step)."""
        if self.side_stream is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_stream(self.side_stream)
            cur.wait_stream(self.recall_stream)

    def close(self):
        self.host.close()
