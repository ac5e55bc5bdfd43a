"""FreeKV inside a transformers model, through the attention-function registry.

:func:`register` adds an attention implementation named ``"freekv"`` to transformers'
``AttentionInterface`` (and the sdpa mask builder under the same name). A model loaded with
``attn_implementation="freekv"`` runs its own, unmodified modeling code; only the attention
call goes through :func:`freekv_attention`:

* no :class:`RowDecoder` attached to the model (:func:`attach`) -> plain sdpa;
* prefill (``q_len > 1``) -> dense causal sdpa; the decoder records each layer's post-RoPE keys
  and the last prompt token's query, to seed its per-(row, layer) :class:`LayerState`;
* decode (``q_len == 1``) -> every batch row is one decoding variant (:mod:`.rows`): a dense row
  uses :func:`dense_attention`, a FreeKV row calls ``LayerState.decode`` with the layer's whole
  KV cache so far (the cache holds every token including the new one).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import math

from ..algorithm import LayerState, dense_attention, topk_pages
from .rows import RowSpec, fp8_roundtrip

ATTN_NAME = "freekv"
_ATTR = "_freekv_row_decoder"


class ExactSelectLayerState(LayerState):
    """Diagnostic ``exact`` rows: ``select`` ranks candidate pages by their true attention mass.

    Score of page ``p`` for KV head ``k``: the mean over its query heads of the softmax weight
    (over the whole known history) that falls on ``p``'s tokens. Everything else (residency,
    stats, attention) is :class:`LayerState`'s. Needs the keys, which it keeps from the last call.
    """

    _keys: torch.Tensor | None = None

    def prefill(self, keys, q_last):
        self._keys = keys
        return super().prefill(keys, q_last)

    def decode(self, q, keys, values, scale):
        self._keys = keys
        return super().decode(q, keys, values, scale)

    def select(self, q, n):
        lay = self.settings.layout
        hkv, (hq, d) = self.n_kv_heads, q.shape
        keys = self._keys[: min(n, self._keys.shape[0])]
        n_pages = lay.n_pages(n)
        logits = torch.einsum("hgd,mhd->hgm", q.float().reshape(hkv, hq // hkv, d), keys.float()) / math.sqrt(d)
        prob = torch.softmax(logits, dim=-1)
        prob = torch.nn.functional.pad(prob, (0, n_pages * lay.page_size - keys.shape[0]))
        mass = prob.unflatten(-1, (n_pages, lay.page_size)).sum(-1).mean(1)  # [Hkv, Np]
        valid = lay.candidate_mask(n, n_pages)
        return topk_pages(mass.masked_fill(~valid, float("-inf"))[None], lay.n_select)[0]


class RowDecoder:
    """Per-(row, layer) FreeKV state for one batched decode of identical-length sequences.

    Args:
        rows: the variants, one per batch row (row ``b`` of every forward is ``rows[b]``).
        n_layers, n_kv_heads: of the model.
    """

    def __init__(self, rows: list[RowSpec], n_layers: int, n_kv_heads: int):
        self.rows = list(rows)
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.states: list[list[LayerState | None]] = [[None] * n_layers for _ in self.rows]
        self._prefill: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.decode_steps = 0
        self.capture: dict | None = None  # set to {} to keep row 0's queries: capture[step][layer] = [Hq, D]

    # -- prefill ---------------------------------------------------------------------
    def record_prefill(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """Keep batch row 0's keys ``[n, Hkv, D]`` and last query ``[Hq, D]`` of a prefill."""
        self._prefill[layer] = (key[0].transpose(0, 1).contiguous(), query[0, :, -1].contiguous())

    def seed(self) -> int:
        """Create every row's :class:`LayerState` from the recorded prefill; returns pages recalled."""
        if len(self._prefill) != self.n_layers:
            raise RuntimeError(f"prefill recorded {len(self._prefill)} of {self.n_layers} layers")
        recalled = 0
        for r, row in enumerate(self.rows):
            settings = row.settings()
            for layer in range(self.n_layers):
                if settings is None:
                    self.states[r][layer] = None
                    continue
                keys, q_last = self._prefill[layer]
                if layer in row.dense_layers:
                    continue
                if row.kv_fp8:
                    keys = fp8_roundtrip(keys)
                cls = ExactSelectLayerState if row.mode == "exact" else LayerState
                st = cls(settings, self.n_kv_heads)
                recalled += st.prefill(keys, q_last)
                self.states[r][layer] = st
        self._prefill.clear()
        self.decode_steps = 0
        return recalled

    # -- decode ----------------------------------------------------------------------
    def decode(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """One decode step of one layer for every row.

        Args:
            query: ``[B, Hq, 1, D]`` post-RoPE; key, value: ``[B, Hkv, n, D]`` the cache incl. the new token.
        Returns:
            ``[B, 1, Hq, D]`` in the query dtype.
        """
        b = query.shape[0]
        if b != len(self.rows):
            raise ValueError(f"batch has {b} rows, the decoder {len(self.rows)}")
        if self.capture is not None:
            self.capture.setdefault(self.decode_steps, {})[layer] = query[0, :, 0].detach().clone()
        outs = []
        for r in range(b):
            q = query[r, :, 0]  # [Hq, D]
            k = key[r].transpose(0, 1)  # [n, Hkv, D]
            v = value[r].transpose(0, 1)
            st = self.states[r][layer]
            if self.rows[r].mode == "dense" or layer in self.rows[r].dense_layers:
                outs.append(dense_attention(q, k, v, scale))
            elif st is None:
                raise RuntimeError(f"row {self.rows[r].label} layer {layer} was not seeded (no prefill?)")
            elif self.rows[r].kv_fp8:  # what FreeKV stores (tiers, working sets, digests) is FP8
                outs.append(st.decode(q, fp8_roundtrip(k), fp8_roundtrip(v), scale))
            else:
                outs.append(st.decode(q, k, v, scale))
        if layer == self.n_layers - 1:
            self.decode_steps += 1
        return torch.stack(outs)[:, None].to(query.dtype)

    def layer_stats(self, row: int) -> list[list]:
        """``StepStats`` lists of one row, per layer (empty lists for dense rows)."""
        return [st.stats if st is not None else [] for st in self.states[row]]


def _masks_nothing(mask: torch.Tensor) -> bool:
    """True if a bool (True = attend) or additive (0 = attend) mask lets every key through."""
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def freekv_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function (signature of ``sdpa_attention_forward``).

    ``query`` ``[B, Hq, q, D]``, ``key``/``value`` ``[B, Hkv, n, D]``; returns ``([B, q, Hq, D], None)``.
    """
    dec: RowDecoder | None = getattr(module, _ATTR, None)
    if dec is None or query.shape[2] > 1:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, is_causal=is_causal, **kwargs)
        if dec is not None:
            if key.shape[2] != query.shape[2]:
                raise NotImplementedError("the fidelity harness prefills in one chunk from an empty cache")
            dec.record_prefill(module.layer_idx, query, key)
        return out, None
    if attention_mask is not None and not _masks_nothing(attention_mask):
        raise NotImplementedError("FreeKV rows are unpadded sequences of equal length; got a masking attention_mask")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return dec.decode(module.layer_idx, query, key, value, scaling), None


def register() -> None:
    """Register ``"freekv"`` with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, freekv_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def attach(model, decoder: RowDecoder | None):
    """Route ``model``'s attention layers through ``decoder`` inside the ``with`` block."""
    if model.config._attn_implementation != ATTN_NAME:
        raise ValueError(f"model must be loaded with attn_implementation={ATTN_NAME!r}")
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not mods:
        raise ValueError("no attention modules (with layer_idx) found in the model")
    for m in mods:
        setattr(m, _ATTR, decoder)
    try:
        yield decoder
    finally:
        for m in mods:
            if hasattr(m, _ATTR):
                delattr(m, _ATTR)
