"""--freekv-overfetch-tokens: validation, the runtime's layout, the GPU memory plan and the CLI flag."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.algorithm.layout import WorkingSetLayout
from freekv_sglang.config import FreeKVConfig, FreeKVConfigError
from freekv_sglang.runtime import integration
from freekv_sglang.runtime.sizing import ModelShape, plan_memory, working_set_bytes_per_row

SHAPE = ModelShape(32, 32, 8, 128, torch.bfloat16)  # the Llama-3.1-8B attention shape


def test_default_is_off_and_the_layout_is_unchanged():
    cfg = FreeKVConfig()
    assert cfg.overfetch_tokens == 0 and cfg.n_overfetch_pages == 0
    assert integration._settings(cfg).layout == WorkingSetLayout(32, 16, 32, 16)
    assert "overfetch" not in FreeKVConfig(enabled=True, host_memory_gb=1).summary()


def test_overfetch_grows_the_selected_slots():
    cfg = FreeKVConfig(enabled=True, overfetch_tokens=512, host_memory_gb=1)
    assert cfg.n_overfetch_pages == 16 and cfg.pages_per_request == 16 + 32 + 16 + 16
    assert cfg.working_set_tokens == 2560
    lay = integration._settings(cfg).layout
    assert (lay.n_select, lay.n_overfetch, lay.n_budget, lay.slots) == (48, 16, 32, 80)
    assert "overfetch=512" in cfg.summary()


@pytest.mark.parametrize("bad,why", [(-32, "multiple of the page size"), (100, "multiple of the page size"),
                                     (1.5, "integer"), (True, "integer")])
def test_bad_values_are_refused(bad, why):
    with pytest.raises(FreeKVConfigError, match=f"--freekv-overfetch-tokens.*{why}"):
        FreeKVConfig(overfetch_tokens=bad)


def test_overfetch_needs_speculation():
    with pytest.raises(FreeKVConfigError, match="--freekv-overfetch-tokens=64: over-fetch is speculation's"):
        FreeKVConfig(overfetch_tokens=64, speculative=False)


def test_cli_flag_and_json_round_trip():
    cfg = FreeKVConfig.from_mapping({"kv_retrieval": "freekv", "freekv_overfetch_tokens": 256,
                                     "freekv_host_memory_gb": 1})
    assert cfg.overfetch_tokens == 256 and FreeKVConfig.from_json(cfg.to_json()) == cfg


def test_memory_plan_pays_for_the_overfetched_pages():
    """Each (request, layer) working set grows by m pages of every KV head (K and V) plus their resident entries;
    the plan takes it from the rows it can hold."""
    base = WorkingSetLayout.from_tokens(32, 512, 1024, 512)
    over = WorkingSetLayout.from_tokens(32, 512, 1024, 512, overfetch_tokens=512)
    m, L, hkv, d, P = 16, SHAPE.n_layers, SHAPE.n_kv_heads, SHAPE.head_dim, 32
    grow = working_set_bytes_per_row(SHAPE, over) - working_set_bytes_per_row(SHAPE, base)
    assert grow == L * 2 * m * P * hkv * d * 2 + L * hkv * m * 8
    kw = dict(host_bytes=200 * 2**30, gpu_bytes=40 * 2**30, max_context_len=131072, user_max_running_requests=10**6)
    a, b = plan_memory(SHAPE, base, **kw), plan_memory(SHAPE, over, **kw)
    assert b.working_set_bytes_per_request - a.working_set_bytes_per_request >= grow
    assert b.max_running_requests < a.max_running_requests
    assert b.gpu_bytes <= 40 * 2**30
