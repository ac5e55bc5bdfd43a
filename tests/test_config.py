"""FreeKVConfig: defaults, derived sizes, validation, serialisation (no SGLang needed)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import pytest

from freekv_sglang import config as config_mod
from freekv_sglang.config import (
    ENV_VAR,
    GIB,
    FreeKVConfig,
    FreeKVConfigError,
    resolve_host_memory_bytes,
)

REAL_READ_MEMINFO = config_mod.read_meminfo
FAKE_MEMINFO = {"MemTotal": 64 * GIB, "MemAvailable": 40 * GIB}


@pytest.fixture(autouse=True)
def fake_meminfo(monkeypatch):
    """Pretend the machine has 64 GiB of RAM, 40 GiB available."""
    monkeypatch.setattr(config_mod, "read_meminfo", lambda path=None: dict(FAKE_MEMINFO))


def test_defaults_and_derived_sizes():
    cfg = FreeKVConfig()
    assert not cfg.enabled
    assert (cfg.page_size, cfg.sink_tokens, cfg.window_tokens, cfg.select_tokens) == (
        32, 512, 512, 1024)
    assert cfg.correction_threshold == 0.9 and cfg.correction_enabled
    assert cfg.speculative and cfg.gqa_aggregation == "mean"
    assert cfg.host_memory_gb is None and cfg.min_context_tokens == 0
    assert cfg.recall == "auto" and cfg.effective_recall == "gather"
    assert (cfg.n_sink_pages, cfg.n_select_pages, cfg.n_window_pages) == (16, 32, 16)
    assert cfg.pages_per_request == 64
    assert cfg.working_set_tokens == 2048


def test_derived_sizes_follow_page_size():
    cfg = FreeKVConfig(page_size=64, sink_tokens=0, window_tokens=128, select_tokens=256)
    assert (cfg.n_sink_pages, cfg.n_window_pages, cfg.n_select_pages) == (0, 2, 4)
    assert cfg.pages_per_request == 6 and cfg.working_set_tokens == 384


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FreeKVConfig().page_size = 64


@pytest.mark.parametrize(
    "kwargs, flag, bad",
    [
        ({"page_size": 33}, "--freekv-page-size", "33"),
        ({"page_size": 4}, "--freekv-page-size", "4"),
        ({"page_size": 512}, "--freekv-page-size", "512"),
        ({"page_size": 48}, "--freekv-page-size", "48"),
        ({"sink_tokens": 100}, "--freekv-sink-tokens", "100"),
        ({"sink_tokens": -32}, "--freekv-sink-tokens", "-32"),
        ({"window_tokens": 32}, "--freekv-window-tokens", "32"),
        ({"window_tokens": 100}, "--freekv-window-tokens", "100"),
        ({"select_tokens": 0}, "--freekv-select-tokens", "0"),
        ({"select_tokens": 40}, "--freekv-select-tokens", "40"),
        ({"correction_threshold": 1.5}, "--freekv-correction-threshold", "1.5"),
        ({"correction_threshold": -1.01}, "--freekv-correction-threshold", "-1.01"),
        ({"host_memory_gb": 0}, "--freekv-host-memory-gb", "0"),
        ({"host_memory_gb": -2.0}, "--freekv-host-memory-gb", "-2.0"),
        ({"host_memory_gb": 65}, "--freekv-host-memory-gb", "65"),
        ({"min_context_tokens": -1}, "--freekv-min-context-tokens", "-1"),
        ({"gqa_aggregation": "median"}, "--freekv-gqa-aggregation", "median"),
        ({"recall": "dma"}, "--freekv-recall", "dma"),
        ({"gpu_tier_gb": -1.0}, "--freekv-gpu-tier-gb", "-1.0"),
        ({"gpu_tier_gb": float("inf")}, "--freekv-gpu-tier-gb", "inf"),
        ({"gpu_tier_gb": 4, "recall": "staged"}, "--freekv-gpu-tier-gb", "4"),
        ({"kv_storage": "fp4"}, "--freekv-kv-storage", "fp4"),
        ({"kv_storage": "fp8_e4m3", "recall": "per-page"}, "--freekv-kv-storage", "fp8_e4m3"),
        ({"page_size": "32"}, "--freekv-page-size", "32"),
    ],
)
def test_invalid_values_name_flag_and_value(kwargs, flag, bad):
    with pytest.raises(FreeKVConfigError) as exc:
        FreeKVConfig(enabled=True, **kwargs)
    assert flag in str(exc.value) and bad in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_boundary_values_accepted():
    FreeKVConfig(page_size=8, sink_tokens=0, window_tokens=16, select_tokens=8)
    FreeKVConfig(page_size=256, sink_tokens=256, window_tokens=512, select_tokens=256)
    FreeKVConfig(correction_threshold=-1.0)
    FreeKVConfig(correction_threshold=1)
    FreeKVConfig(correction_threshold=None)
    FreeKVConfig(host_memory_gb=64)


def test_host_memory_limit_uses_memtotal(monkeypatch):
    monkeypatch.setattr(config_mod, "read_meminfo", lambda path=None: {"MemTotal": 8 * GIB})
    FreeKVConfig(host_memory_gb=7.5)
    with pytest.raises(FreeKVConfigError, match="total RAM"):
        FreeKVConfig(host_memory_gb=8.5)
    monkeypatch.setenv(config_mod.RAM_CHECK_ENV, "0")  # a VM whose MemTotal grows: the user vouches for it
    assert FreeKVConfig(host_memory_gb=8.5).host_memory_gb == 8.5


def test_read_meminfo_parses_kb(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total:   0\n")
    info = REAL_READ_MEMINFO(str(p))
    assert info == {"MemTotal": 16384 * 1024, "MemAvailable": 8192 * 1024, "HugePages_Total": 0}
    assert REAL_READ_MEMINFO(str(tmp_path / "missing")) == {}


def test_resolve_host_memory_explicit_and_auto():
    assert resolve_host_memory_bytes(FreeKVConfig(host_memory_gb=2)) == 2 * GIB
    auto = resolve_host_memory_bytes(FreeKVConfig(), meminfo={"MemAvailable": 40 * GIB})
    assert auto == int(40 * GIB * config_mod.AUTO_HOST_MEMORY_FRACTION) - (
        config_mod.AUTO_HOST_MEMORY_RESERVE_BYTES)
    assert 0 < auto < 40 * GIB


def test_resolve_host_memory_auto_fails_without_memory():
    with pytest.raises(FreeKVConfigError, match="--freekv-host-memory-gb"):
        resolve_host_memory_bytes(FreeKVConfig(), meminfo={"MemAvailable": 1 * GIB})
    with pytest.raises(FreeKVConfigError, match="MemAvailable"):
        resolve_host_memory_bytes(FreeKVConfig(), meminfo={})


def test_gpu_tier_round_trips_and_shows_in_summary():
    cfg = FreeKVConfig(enabled=True, gpu_tier_gb=12.5, host_memory_gb=2, kv_storage="fp8_e4m3")
    assert FreeKVConfig.from_json(cfg.to_json()) == cfg
    assert "gpu_tier=12.5GiB" in cfg.summary() and "kv_storage=fp8_e4m3" in cfg.summary()
    assert "gpu_tier" not in FreeKVConfig(enabled=True, host_memory_gb=2).summary()


def test_json_round_trip_and_env():
    cfg = FreeKVConfig(enabled=True, page_size=16, sink_tokens=64, window_tokens=64,
                       select_tokens=512, correction_threshold=None, speculative=False,
                       gqa_aggregation="max", host_memory_gb=3.5, min_context_tokens=100,
                       recall="staged")
    text = cfg.to_json()
    assert json.loads(text)["page_size"] == 16
    assert FreeKVConfig.from_json(text) == cfg
    assert FreeKVConfig.from_env({ENV_VAR: text}) == cfg
    assert FreeKVConfig.from_env({}) is None


@pytest.mark.parametrize("text", ["{", "[1]", '{"bogus": 1}', '{"page_size": 33}'])
def test_from_json_rejects_garbage(text):
    with pytest.raises(FreeKVConfigError):
        FreeKVConfig.from_json(text)


def test_from_namespace_pops_freekv_attributes():
    ns = argparse.Namespace(
        kv_retrieval="freekv", freekv_page_size=64, freekv_sink_tokens=128,
        freekv_window_tokens=128, freekv_select_tokens=256,
        freekv_correction_threshold="off", freekv_speculative=False,
        freekv_gqa_aggregation="softmax-mean", freekv_host_memory_gb=None,
        freekv_min_context_tokens=384, freekv_recall="per-page",
        model_path="m", page_size=None,
    )
    cfg = FreeKVConfig.from_namespace(ns)
    assert vars(ns) == {"model_path": "m", "page_size": None}
    assert cfg.enabled and cfg.page_size == 64 and cfg.correction_threshold is None
    assert not cfg.speculative and cfg.gqa_aggregation == "softmax-mean"
    assert cfg.min_context_tokens == 384 and cfg.effective_recall == "per-page"


def test_from_namespace_without_flags_is_default():
    ns = argparse.Namespace(model_path="m")
    assert FreeKVConfig.from_namespace(ns) == FreeKVConfig()
    assert vars(ns) == {"model_path": "m"}


def test_from_mapping_rejects_unknown_and_bad_choice():
    with pytest.raises(FreeKVConfigError, match="freekv_pagesize"):
        FreeKVConfig.from_mapping({"freekv_pagesize": 32})
    with pytest.raises(FreeKVConfigError, match="--kv-retrieval"):
        FreeKVConfig.from_mapping({"kv_retrieval": "quest"})
    with pytest.raises(FreeKVConfigError, match="--freekv-correction-threshold"):
        FreeKVConfig.from_mapping({"freekv_correction_threshold": "high"})


@pytest.mark.parametrize("value, expected", [("off", None), ("OFF", None), ("none", None),
                                             (None, None), ("0.5", 0.5), (0.75, 0.75),
                                             (-1, -1.0)])
def test_correction_threshold_spellings(value, expected):
    cfg = FreeKVConfig.from_mapping({"freekv_correction_threshold": value})
    assert cfg.correction_threshold == expected


def test_summary_lists_every_effective_value():
    cfg = FreeKVConfig(enabled=True, correction_threshold=None, speculative=False)
    line = cfg.summary()
    assert "\n" not in line
    for part in ("FreeKV enabled:", "page_size=32", "sink=512", "window=512", "select=1024",
                 "pages_per_request=64", "working_set_tokens=2048",
                 "correction_threshold=off", "speculative=off", "gqa_aggregation=mean",
                 "recall=gather (auto)", "min_context_tokens=0", "(auto)"):
        assert part in line, part
    expected_gib = resolve_host_memory_bytes(cfg) / GIB
    assert f"host_memory={expected_gib:.1f}GiB" in line
    assert "host_memory=2.0GiB" in FreeKVConfig(enabled=True, host_memory_gb=2).summary()
    assert "disabled" in FreeKVConfig().summary()


def test_skip_recall_warns():
    assert FreeKVConfig(enabled=True, recall="gather").warnings() == []
    (warning,) = FreeKVConfig(enabled=True, recall="skip").warnings()
    assert "WRONG" in warning and "--freekv-recall" in warning


def test_config_module_does_not_import_sglang():
    import subprocess

    code = ("import sys, freekv_sglang, freekv_sglang.config, freekv_sglang.cli, "
            "freekv_sglang.compat; print('sglang' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_min_context_above_working_set_is_refused():
    with pytest.raises(FreeKVConfigError, match="min-context-tokens.*not supported yet"):
        FreeKVConfig(enabled=True, min_context_tokens=4096, host_memory_gb=1)
    assert FreeKVConfig(enabled=True, min_context_tokens=2048, host_memory_gb=1).min_context_tokens == 2048
