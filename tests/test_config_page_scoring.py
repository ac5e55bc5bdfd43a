"""--freekv-page-scoring: validation, the runtime settings, the GPU memory plan and the CLI flag."""

from __future__ import annotations

import argparse

import pytest
import torch

from freekv_sglang.algorithm.layout import WorkingSetLayout
from freekv_sglang.config import FreeKVConfig, FreeKVConfigError
from freekv_sglang.runtime import integration
from freekv_sglang.runtime.engine import FreeKVRuntime
from freekv_sglang.runtime.sizing import ModelShape, digest_bytes_per_page, plan_memory, working_set_bytes_per_row

SHAPE = ModelShape(32, 32, 8, 128, torch.bfloat16)  # the Llama-3.1-8B attention shape
GIB = 2**30


def test_default_is_quest():
    cfg = FreeKVConfig()
    assert cfg.page_scoring == "quest" and integration._settings(cfg).page_scoring == "quest"
    assert "page_scoring" not in FreeKVConfig(enabled=True, host_memory_gb=1).summary()


def test_grid2_reaches_the_runtime_settings():
    cfg = FreeKVConfig(enabled=True, page_scoring="grid2", host_memory_gb=1)
    assert integration._settings(cfg).page_scoring == "grid2" and "page_scoring=grid2" in cfg.summary()


def test_errors():
    with pytest.raises(FreeKVConfigError, match="--freekv-page-scoring"):
        FreeKVConfig(page_scoring="grid4")
    with pytest.raises(FreeKVConfigError, match="--freekv-sink-tokens > 0"):
        FreeKVConfig(page_scoring="grid2", sink_tokens=0)
    with pytest.raises(NotImplementedError, match="--freekv-overfetch-tokens"):
        FreeKVConfig(page_scoring="grid2", overfetch_tokens=512)
    with pytest.raises(NotImplementedError, match="pages of 16 tokens"):
        FreeKVConfig(page_scoring="grid2", page_size=16, sink_tokens=32, window_tokens=32, select_tokens=64)
    FreeKVConfig(page_scoring="grid2", page_size=256, sink_tokens=512, window_tokens=512, select_tokens=256,
                 kv_storage="fp8_e4m3", gpu_tier_gb=1.0, keep_margin=1, gqa_aggregation="softmax-mean")
    for recall in ("staged", "per-page", "skip"):
        FreeKVConfig(page_scoring="grid2", recall=recall)
    # the head dim is the model's: the runtime refuses what the grid kernels cannot do
    lay = WorkingSetLayout(page_size=32, n_sink=1, n_select=2, n_window=2)
    settings = integration._settings(FreeKVConfig(page_scoring="grid2", page_size=32, sink_tokens=32,
                                                  select_tokens=64, window_tokens=64))
    assert settings.layout == lay
    with pytest.raises(NotImplementedError, match="head dim 32"):
        FreeKVRuntime(ModelShape(1, 2, 1, 32, torch.float32), settings, 4, 1, torch.zeros((2, 256), dtype=torch.int32),
                      max_batch=1, device="cpu")


def test_memory_plan_counts_codes_and_grids():
    # codes: P * D / 4 bytes per layer and KV head, twice Quest's bf16 max/min at D = 128, P = 32
    assert digest_bytes_per_page(SHAPE, "grid2", 32) == 2 * digest_bytes_per_page(SHAPE) == 32 * 8 * 32 * 32
    lay = WorkingSetLayout(32, 16, 32, 16)
    grids = working_set_bytes_per_row(SHAPE, lay, "grid2") - working_set_bytes_per_row(SHAPE, lay)
    assert grids == 32 * 8 * 128 * 2 * 4  # lo and step, float32, per layer, KV head and channel
    quest = plan_memory(SHAPE, lay, 64 * GIB, 8 * GIB, 131072)
    grid = plan_memory(SHAPE, lay, 64 * GIB, 8 * GIB, 131072, page_scoring="grid2")
    assert grid.host_pages == quest.host_pages
    assert grid.digest_bytes == 2 * quest.digest_bytes
    assert grid.working_set_bytes_per_request == quest.working_set_bytes_per_request + grids
    assert grid.max_running_requests <= quest.max_running_requests


def test_runtime_memory_is_the_plan():
    lay = WorkingSetLayout(page_size=32, n_sink=1, n_select=2, n_window=2)
    shape = ModelShape(2, 4, 2, 64, torch.bfloat16)
    settings = integration._settings(FreeKVConfig(page_scoring="grid2", page_size=32, sink_tokens=32,
                                                  select_tokens=64, window_tokens=64))
    rt = FreeKVRuntime(shape, settings, 10, 3, torch.zeros((4, 512), dtype=torch.int32), max_batch=2, device="cpu")
    assert rt.digests.dtype == torch.uint8 and rt.digests.numel() == 10 * digest_bytes_per_page(shape, "grid2", 32)
    assert rt.grid_lo.shape == (2, 4, 2, 64)
    gpu, _ = rt.used_bytes(1, 64)
    assert gpu == working_set_bytes_per_row(shape, lay, "grid2") + 2 * digest_bytes_per_page(shape, "grid2", 32)


def test_flag():
    from freekv_sglang.cli import add_freekv_arguments

    p = argparse.ArgumentParser()
    add_freekv_arguments(p)
    assert p.parse_args([]).freekv_page_scoring == "quest"
    assert p.parse_args(["--freekv-page-scoring", "grid2"]).freekv_page_scoring == "grid2"
    with pytest.raises(SystemExit):
        p.parse_args(["--freekv-page-scoring", "box"])


def test_grid2_pages_under_the_gpu_checked_size_are_refused_on_the_gpu_only():
    from freekv_sglang import config
    from freekv_sglang.kernels import grid_codes

    assert config.GRID2_MIN_PAGE == grid_codes.GPU_MIN_PAGE
    grid_codes.check_grid_page_size(16, "cpu")  # the interpreter and the reference are checked at every size
    grid_codes.check_grid_page_size(32, "cuda")
    with pytest.raises(NotImplementedError, match="--freekv-page-size 32"):
        grid_codes.check_grid_page_size(16, torch.device("cuda"))
