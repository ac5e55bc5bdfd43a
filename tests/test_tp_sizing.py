"""Tensor parallelism, what one process can check: each attention-TP rank keeps the heads of its own shard and
an equal share of the server's host budget; ``--tp 1`` is unchanged. (Serving with ``--tp 2`` needs a
multi-GPU machine: tests/gpu.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from freekv_sglang import compat
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime import integration
from freekv_sglang.runtime.sizing import host_bytes_per_page

GIB = 2**30


class _ModelConfig:
    """SGLang's ModelConfig as the sizing reads it (Llama-3.1-8B heads)."""

    num_attention_heads, head_dim, context_len = 32, 128, 32768

    @staticmethod
    def get_num_kv_heads(tp: int) -> int:
        return max(1, 8 // tp)


def _configurator(tp: int, host_gb: float):
    cfg = FreeKVConfig(enabled=True, host_memory_gb=host_gb)
    return SimpleNamespace(model_config=_ModelConfig(), layer_info=SimpleNamespace(num_effective_layers=32),
                           kv_cache_dtype=torch.bfloat16, is_draft_worker=False,
                           server_args=SimpleNamespace(_freekv=cfg, disable_radix_cache=False,
                                                       chunked_prefill_size=8192))


@pytest.fixture
def ranks(monkeypatch):
    """``set(tp)``: the process is one of ``tp`` attention-TP ranks."""
    state = {}

    def context():
        return SimpleNamespace(get_parallel=lambda: SimpleNamespace(attn_tp_size=state["tp"]),
                               get_schedule=lambda: SimpleNamespace(max_total_tokens=None, max_running_requests=None,
                                                                    mem_fraction_static=0.8))

    monkeypatch.setattr(compat, "runtime_context", context)
    monkeypatch.setattr(compat, "profile_available_bytes", lambda conf, pre: 40 * GIB)
    monkeypatch.setattr(compat, "memory_pool_config_class", lambda: lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setattr(integration, "_PLAN", None)
    return lambda tp: state.__setitem__("tp", tp)


@pytest.mark.parametrize("tp, q_heads, kv_heads", [(1, 32, 8), (2, 16, 4), (4, 8, 2), (8, 4, 1)])
def test_each_rank_keeps_its_own_heads(ranks, tp, q_heads, kv_heads):
    ranks(tp)
    shape = integration._model_shape(_configurator(tp, 8))
    assert (shape.n_q_heads, shape.n_kv_heads, shape.n_layers, shape.head_dim) == (q_heads, kv_heads, 32, 128)


def test_the_host_budget_is_shared_by_the_ranks(ranks):
    """The same 8 GiB server budget: each of two ranks pins half of it for its 4 KV heads, so the token capacity
    (a page holds every head of the rank) is the same as one rank's with all 8 heads; tp 1 is unchanged."""
    out = {}
    for tp in (1, 2):
        ranks(tp)
        conf = _configurator(tp, 8)
        pool = integration._resolve_memory_pool_config(lambda *a: None, conf, 0)
        plan = integration._PLAN
        per_page = host_bytes_per_page(integration._model_shape(conf), 32)
        assert 8 * GIB // tp - 2 * per_page < plan.host_bytes <= 8 * GIB // tp
        assert pool.max_total_num_tokens == plan.total_tokens
        out[tp] = plan
    assert out[1].host_tokens == out[2].host_tokens  # 8 heads in 8 GiB hold the tokens of 4 heads in 4 GiB
    assert out[2].digest_bytes * 2 == pytest.approx(out[1].digest_bytes, rel=1e-3)
    assert out[2].working_set_bytes_per_request < out[1].working_set_bytes_per_request
