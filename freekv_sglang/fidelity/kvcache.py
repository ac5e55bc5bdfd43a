"""A transformers KV cache that grows in place instead of concatenating every step.

``DynamicCache`` appends with ``torch.cat``, which copies the whole cache of every layer at
every decode step (about 1 GB per step for 13 rows at 2K tokens of SmolLM2-135M). This cache
keeps one preallocated buffer per layer (``[B, Hkv, capacity, D]``) and hands the model a
view of its filled part, so appending a token costs one small copy. It behaves like
``DynamicCache`` for everything the harness does (prefill, one-token decode, repeating the
batch rows after a shared prefill).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's cache: keys/values ``[B, Hkv, n, D]`` views into ``[B, Hkv, capacity, D]`` buffers."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = int(capacity)
        self._k = self._v = None
        self._n = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, n, d = key_states.shape
        cap = max(self.capacity, n)
        self._k = key_states.new_empty(b, h, cap, d)
        self._v = value_states.new_empty(b, value_states.shape[1], cap, value_states.shape[3])
        self._n = 0
        self.is_initialized = True

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._k.shape[2])
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, : self._n] = old[:, :, : self._n]
            setattr(self, name, new)

    def _publish(self) -> None:
        self.keys = self._k[:, :, : self._n]
        self.values = self._v[:, :, : self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, q, D]`` states; return the cache so far (views, ``[B, Hkv, n, D]``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        if self._n + n_new > self._k.shape[2]:
            self._grow(self._n + n_new)
        self._k[:, :, self._n : self._n + n_new] = key_states
        self._v[:, :, self._n : self._n + n_new] = value_states
        self._n += n_new
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (keeps the capacity)."""
        if not self.is_initialized:
            return
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self._publish()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._k = self._k[indices].contiguous()
        self._v = self._v[indices].contiguous()
        self._publish()

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self._n + max_length
        self._n = min(self._n, max_length)
        if self.is_initialized:
            self._publish()


def preallocated_cache(n_layers: int, capacity: int) -> Cache:
    """A :class:`~transformers.cache_utils.Cache` of ``n_layers`` :class:`PreallocatedLayer`."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])
