"""SGLang KV pool for FreeKV: SGLang's token slots index the host tier, not GPU rows.

The scheduler and allocators stay stock: they hand out token slots (page-aligned, a page
never shared by two requests) from a space as large as the host tier. K/V written for a
slot goes to the pinned host store; the GPU keeps only tiny placeholders for code that
dereferences ``k_buffer``/``v_buffer``.
"""

from __future__ import annotations

import logging

from freekv_sglang import compat

logger = logging.getLogger(__name__)
unwrap_write_loc = compat.unwrap_write_loc_fn()


class FreeKVTokenToKVPool(compat.noop_mha_pool_class()):
    """Token-slot pool whose storage is a :class:`~.engine.FreeKVRuntime` host tier.

    ``runtime`` must be attached (``pool.runtime = ...``) before the first forward.
    """

    runtime = None

    def _finalize_allocation_log(self, num_tokens: int):  # compat.NOOP_MHA_POOL_ALLOCATION_LOG
        self.mem_usage = 0.0
        logger.info("FreeKV KV pool: %d token slots in the host tier; GPU holds working sets only", num_tokens)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        """Write K/V ``[T, Hkv, D]`` of new tokens into the host tier at their slots."""
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = kwargs.get("layer_id_override") or layer.layer_id
        self.runtime.store_tokens(layer_id - self.start_layer, cache_k.view(-1, self.head_num, self.head_dim),
                                  cache_v.view(-1, self.head_num, self.v_head_dim), loc)

    def get_cpu_copy(self, indices, mamba_indices=None):
        raise NotImplementedError("FreeKV keeps KV in its own host tier; CPU copies of the pool are not supported")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        raise NotImplementedError("FreeKV keeps KV in its own host tier; CPU copies of the pool are not supported")

    def move_kv_cache(self, tgt_loc, src_loc):
        raise NotImplementedError("FreeKV does not support moving KV slots (speculative decoding is unsupported)")
