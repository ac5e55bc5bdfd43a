"""The FREEKV_* variables: declared once in freekv_sglang/settings.py, validated when read, docs/TUNING.md rendered."""

import re
from pathlib import Path

import pytest

from freekv_sglang.settings import REMOVED, EnvSettings, env_name, load_settings, render_tuning_md

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_parsing():
    assert load_settings({}) == EnvSettings()
    s = load_settings({"FREEKV_RECALL_PROGRAMS": "16", "FREEKV_RECALL_WARPS": "2", "FREEKV_ASYNC_PREFILL": "1",
                       "FREEKV_BENCH_QUERY_COSINE": "0.95", "FREEKV_HOST_MEMORY_CHECK": "0",
                       "FREEKV_DECODE_ATTENTION": " flashinfer ", "FREEKV_LOG_STATS_EVERY": ""})
    assert (s.recall_programs, s.recall_warps, s.async_prefill, s.bench_query_cosine) == (16, 2, True, 0.95)
    assert not s.host_memory_check and s.decode_attention == "flashinfer" and s.log_stats_every == 2000


@pytest.mark.parametrize("var,bad", [
    ("FREEKV_RECALL_PROGRAMS", "0"), ("FREEKV_RECALL_PROGRAMS", "x"), ("FREEKV_RECALL_PROGRAMS", "1.5"),
    ("FREEKV_RECALL_WARPS", "3"), ("FREEKV_RECALL_WARPS", "32"), ("FREEKV_ASYNC_PREFILL", "2"),
    ("FREEKV_ASYNC_PREFILL", "yes"), ("FREEKV_BENCH_QUERY_COSINE", "1.5"), ("FREEKV_BENCH_QUERY_COSINE", "0"),
    ("FREEKV_DECODE_ATTENTION", "xqa"), ("FREEKV_HOST_ALLOC", "cudaHostAlloc"), ("FREEKV_LOG_STATS_EVERY", "-1"),
    ("FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE", "true")])
def test_bad_values_name_the_variable(var, bad):
    with pytest.raises(ValueError, match=var):
        load_settings({var: bad})


def test_values_are_checked_when_built_directly():
    with pytest.raises(ValueError, match="FREEKV_RECALL_WARPS"):
        EnvSettings(recall_warps=3)
    with pytest.raises(ValueError, match="FREEKV_ASYNC_PREFILL"):
        EnvSettings(async_prefill=1)
    assert EnvSettings(bench_query_cosine=1).bench_query_cosine == 1


def test_removed_variables_are_ignored_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="freekv_sglang.settings"):
        assert load_settings({"FREEKV_SPEC_STREAMS": "1"}) == EnvSettings()
    assert "FREEKV_SPEC_STREAMS is no longer read" in caplog.text


def test_every_variable_the_package_names_is_declared():
    declared = {env_name(f) for f in EnvSettings.__dataclass_fields__}
    named = set()
    for path in [*ROOT.joinpath("freekv_sglang").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]:
        named |= set(re.findall(r"\bFREEKV_[A-Z0-9_]+", path.read_text()))
    assert named <= declared | set(REMOVED), named - declared - set(REMOVED)


def test_tuning_md_is_the_rendering():
    """docs/TUNING.md is generated: python -m freekv_sglang.settings > docs/TUNING.md"""
    assert (ROOT / "docs" / "TUNING.md").read_text() == render_tuning_md()
