"""SGLang attention backend ``freekv``.

Prefill is SGLang's own FlashInfer ragged prefill (dense, on the GPU); where requests start from a cached
prefix (the radix cache, or the earlier chunks of a chunked prefill) the runtime stages the prefix from the
host tier layer by layer and merges its attention in (:mod:`.prefix`). Then the runtime writes the new
tokens' K/V into the host tier, builds digests and seeds working sets from the whole context.
Decode runs :meth:`FreeKVRuntime.decode_layer` per layer: the new token goes to the host
tier and the window page, correction, FlashInfer paged decode (page size P) over the
working set, then the speculative selection and recall for the next step on a side stream.
"""

from __future__ import annotations

import logging

from freekv_sglang import compat

from .pool import FreeKVTokenToKVPool

logger = logging.getLogger(__name__)


class FreeKVAttnBackend(compat.flashinfer_backend_class()):
    """FlashInfer prefill + FreeKV sparse decode over host-backed working sets."""

    def __init__(self, model_runner):
        super().__init__(model_runner, init_new_workspace=model_runner.init_new_workspace)
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, FreeKVTokenToKVPool) or pool.runtime is None:
            raise RuntimeError(
                "the freekv attention backend needs the FreeKV KV pool, but the model runner has "
                f"{type(pool).__name__}; start the server with --kv-retrieval freekv instead of "
                "--attention-backend freekv")
        if model_runner.sliding_window_size is not None:
            raise NotImplementedError("FreeKV does not support sliding-window attention models yet")
        self.runtime = pool.runtime
        self.start_layer = pool.start_layer
        self.last_layer = pool.start_layer + self.runtime.shape.n_layers - 1

    # ------------------------------------------------------------------ planning
    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        if mode.is_decode_or_idle():
            if forward_batch.batch_size > 0:
                self.runtime.plan_decode(forward_batch.req_pool_indices, forward_batch.seq_lens,
                                         forward_batch.seq_lens_cpu)
            return
        if mode.is_target_verify() or mode.is_draft_extend_v2():
            raise NotImplementedError("FreeKV does not support speculative decoding yet")
        if mode.is_mixed():
            raise NotImplementedError("FreeKV does not support mixed prefill/decode batches (--enable-mixed-chunk) yet")
        super().init_forward_metadata(forward_batch)
        if not self.forward_metadata.use_ragged:
            raise NotImplementedError(
                "FreeKV prefill needs FlashInfer's ragged prefill (no piecewise prefill CUDA graph, no "
                "SGLANG_FLASHINFER_USE_PAGED, no deterministic inference)")
        # the new tokens attend over themselves (FlashInfer's ragged prefill, planned above) and over their
        # cached prefix (radix cache, earlier chunks), which the runtime stages from the host tier
        self.extend_lens = list(forward_batch.extend_seq_lens_cpu)
        prefix = forward_batch.extend_prefix_lens_cpu
        self.prefix_lens = list(prefix) if prefix is not None else [0] * len(self.extend_lens)
        self.has_prefix = self.runtime.plan_prefill(forward_batch.req_pool_indices.long(), self.prefix_lens,
                                                    self.extend_lens)

    # ------------------------------------------------------------------ CUDA graphs (decode)
    # SGLang's graph contract: before capture and before every replay it calls
    # init_forward_metadata_out_graph on the host (FlashInfer's plan from host lengths); the
    # graph records init_forward_metadata_in_graph (page table, per-step tensors) and every
    # layer's forward_decode, including the side-stream fork/join of the speculative recall.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None):
        if max_bs > self.runtime.max_batch:
            raise ValueError(f"CUDA graph batch size {max_bs} exceeds the {self.runtime.max_batch} request rows "
                             "FreeKV was sized for; lower --cuda-graph-max-bs")
        self.graph_max_bs = max_bs

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise NotImplementedError("FreeKV captures decode steps only (prefill CUDA graphs are disabled)")
        if forward_batch.seq_lens_cpu is None:
            raise NotImplementedError("FreeKV decode graphs need host sequence lengths (seq_lens_cpu)")
        # (grid2: outside the graph, a request whose sink just filled gets its grids; not while capturing)
        self.runtime.plan_decode_host(forward_batch.batch_size, forward_batch.seq_lens_cpu, graph=True,
                                      rows=None if in_capture else forward_batch.req_pool_indices)

    def init_forward_metadata_in_graph(self, forward_batch):
        if forward_batch.forward_mode.is_decode_or_idle():
            bs = forward_batch.batch_size
            self.runtime.plan_decode_device(forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs],
                                            graph=True)

    # ------------------------------------------------------------------ forward
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if layer.logit_cap and layer.logit_cap > 0:
            raise NotImplementedError("FreeKV does not support attention logit soft-capping yet")
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        q3, k3, v3 = q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, layer.tp_v_head_num, d)
        idx = layer.layer_id - self.start_layer
        if not self.has_prefix:  # SGLang's own ragged prefill over whole prompts
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache=False)
        else:
            o1, s1 = self.prefill_wrapper_ragged.forward_return_lse(q3, k3, v3, causal=True, sm_scale=layer.scaling)
            o = self.runtime.prefix_attention(idx, q3, o1, s1, layer.scaling).reshape(-1, hq * d)
        # the layer's K/V goes to the host tier with its digests and first working set, in line or on
        # the prefill stream (FREEKV_ASYNC_PREFILL=1)
        if save_kv_cache:
            self.runtime.prefill_layer_offload(idx, q3, k3, v3, forward_batch.req_pool_indices.long(),
                                               self.extend_lens, forward_batch.out_cache_loc, self.prefix_lens)
        if layer.layer_id == self.last_layer:
            self.runtime.finish_prefill()
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not save_kv_cache:
            raise NotImplementedError("FreeKV decode always stores the new token's KV")
        o = self.runtime.decode_layer(
            layer.layer_id - self.start_layer,
            q.view(-1, layer.tp_q_head_num, layer.head_dim),
            k.view(-1, layer.tp_k_head_num, layer.head_dim),
            v.view(-1, layer.tp_v_head_num, layer.head_dim),
            forward_batch.out_cache_loc,
            layer.scaling,
        )
        if layer.layer_id == self.last_layer:
            self.runtime.finish_decode_step()
        return o.view(-1, layer.tp_q_head_num * layer.head_dim)
