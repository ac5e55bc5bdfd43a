"""freekv_sglang.make_server_args: the offline Engine path shares the CLI's checks."""

from __future__ import annotations

import dataclasses
import os
import pickle
from types import SimpleNamespace

import pytest

import freekv_sglang
from freekv_sglang import server_config
from freekv_sglang.config import ENV_VAR, FreeKVConfig, FreeKVConfigError


@pytest.fixture(autouse=True)
def no_exported_config(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def base_kwargs(tiny_model):
    return {"model_path": tiny_model, "device": "cpu", "random_seed": 0}


def test_enabled(base_kwargs, capsys):
    sa = freekv_sglang.make_server_args(**base_kwargs, kv_retrieval="freekv",
                                        freekv_page_size=64, freekv_select_tokens=512,
                                        freekv_correction_threshold="off")
    from sglang.srt.server_args import ServerArgs

    assert isinstance(sa, ServerArgs)
    assert (sa.attention_backend, sa.page_size) == ("freekv", 64)
    assert sa.chunked_prefill_size > 0 and not sa.disable_radix_cache  # SGLang's defaults stay
    assert sa.disable_overlap_schedule and sa.disable_prefill_cuda_graph
    assert not sa.disable_cuda_graph  # decode steps are captured
    cfg = sa._freekv
    assert cfg.enabled and cfg.page_size == 64 and cfg.select_tokens == 512
    assert cfg.correction_threshold is None
    assert pickle.loads(pickle.dumps(sa))._freekv == cfg
    assert FreeKVConfig.from_json(os.environ[ENV_VAR]) == cfg
    assert "FreeKV enabled: page_size=64" in capsys.readouterr().err


def test_disabled_equals_plain_server_args(base_kwargs):
    from sglang.srt.server_args import ServerArgs

    ref = ServerArgs(**base_kwargs)
    for extra in ({}, {"kv_retrieval": "none"}, {"kv_retrieval": "none", "freekv_page_size": 64}):
        sa = freekv_sglang.make_server_args(**base_kwargs, **extra)
        assert not hasattr(sa, "_freekv")
        assert {f.name: getattr(sa, f.name) for f in dataclasses.fields(sa)} == {
            f.name: getattr(ref, f.name) for f in dataclasses.fields(ref)}
    assert ENV_VAR not in os.environ


def test_disabled_clears_a_stale_export(base_kwargs, monkeypatch):
    monkeypatch.setenv(ENV_VAR, FreeKVConfig(enabled=True).to_json())
    freekv_sglang.make_server_args(**base_kwargs)
    assert ENV_VAR not in os.environ


@pytest.mark.parametrize("kwargs, needle", [
    ({"freekv_page_size": 33}, "--freekv-page-size"),
    ({"freekv_window_tokens": 16}, "--freekv-window-tokens"),
    ({"freekv_correction_threshold": 2.0}, "--freekv-correction-threshold"),
    ({"freekv_recall": "nope"}, "--freekv-recall"),
    ({"freekv_bogus": 1}, "freekv_bogus"),
    ({"pp_size": 2}, "--pp-size"),
    ({"attention_backend": "triton"}, "--attention-backend"),
    ({"speculative_algorithm": "EAGLE"}, "--speculative-algorithm"),
    ({"kv_cache_dtype": "fp8_e5m2"}, "--kv-cache-dtype"),
    ({"page_size": 16}, "--page-size"),
])
def test_rejects_bad_values(base_kwargs, kwargs, needle):
    with pytest.raises(FreeKVConfigError) as exc:
        freekv_sglang.make_server_args(**base_kwargs, kv_retrieval="freekv", **kwargs)
    assert needle in str(exc.value)
    assert ENV_VAR not in os.environ


def test_rejects_bad_kv_retrieval(base_kwargs):
    with pytest.raises(FreeKVConfigError, match="--kv-retrieval"):
        freekv_sglang.make_server_args(**base_kwargs, kv_retrieval="yes")


def test_rejects_mla_model(mla_model):
    with pytest.raises(FreeKVConfigError, match="MLA"):
        freekv_sglang.make_server_args(model_path=mla_model, device="cpu",
                                       kv_retrieval="freekv")


def test_caller_kwargs_are_not_mutated(base_kwargs):
    kwargs = dict(base_kwargs, kv_retrieval="freekv")
    before = dict(kwargs)
    freekv_sglang.make_server_args(**kwargs)
    assert kwargs == before


# -------------------------------------------- checks on resolved ServerArgs
def _resolved(**over):
    """A stand-in for resolved ServerArgs that passed every FreeKV requirement."""
    base = dict(attention_backend="freekv", decode_attention_backend=None,
                prefill_attention_backend=None, page_size=32, disable_radix_cache=True,
                chunked_prefill_size=-1, disable_overlap_schedule=True, pp_size=1,
                speculative_algorithm=None, enable_hierarchical_cache=False,
                enable_dp_attention=False, disaggregation_mode="null",
                kv_cache_dtype="auto", model_path="m",
                cuda_graph_config=SimpleNamespace(decode=SimpleNamespace(backend="disabled"),
                                                  prefill=SimpleNamespace(backend="disabled")))
    base.update(over)
    return SimpleNamespace(**base)


def test_finalize_accepts_a_conforming_result():
    cfg = FreeKVConfig(enabled=True, host_memory_gb=1)
    sa = server_config.finalize_server_args(_resolved(), cfg)
    assert sa._freekv is cfg


@pytest.mark.parametrize("over, needle", [
    ({"attention_backend": "flashinfer"}, "attention"),
    ({"page_size": 64}, "page"),
    ({"disable_overlap_schedule": False}, "disable_overlap_schedule"),
    ({"enable_mixed_chunk": True}, "--enable-mixed-chunk"),
    ({"enable_dp_attention": True}, "--enable-dp-attention"),
    ({"speculative_algorithm": "NEXTN"}, "--speculative-algorithm"),
    ({"cuda_graph_config": SimpleNamespace(decode=SimpleNamespace(backend="full"),
                                           prefill=SimpleNamespace(backend="breakable"))},
     "prefill CUDA graphs"),
])
def test_finalize_refuses_what_sglang_resolved_differently(over, needle):
    with pytest.raises(FreeKVConfigError, match=needle):
        server_config.finalize_server_args(_resolved(**over), FreeKVConfig(enabled=True,
                                                                           host_memory_gb=1))
    assert ENV_VAR not in os.environ


@pytest.mark.parametrize("cfg, mla", [
    ({"architectures": ["LlamaForCausalLM"]}, False),
    ({"architectures": ["DeepseekForCausalLM"]}, False),
    ({"architectures": ["DeepseekV2ForCausalLM"]}, True),
    ({"architectures": ["KimiForCausalLM"], "kv_lora_rank": 512}, True),
    ({"architectures": ["X"], "text_config": {"q_lora_rank": 1536}}, True),
    ({"kv_lora_rank": None}, False),
])
def test_is_mla_config(cfg, mla):
    assert server_config.is_mla_config(cfg) is mla


def test_read_hf_config(tmp_path, tiny_model):
    assert server_config.read_hf_config(tiny_model)["model_type"] == "llama"
    assert server_config.read_hf_config(str(tmp_path)) is None  # folder without config.json
    (tmp_path / "config.json").write_text("{not json")
    assert server_config.read_hf_config(str(tmp_path)) is None
    assert server_config.read_hf_config("no-such-org/no-such-model") is None
    assert server_config.read_hf_config(None) is None


def test_override_notes_describe_each_change():
    values = {"attention_backend": None, "chunked_prefill_size": 8192, "page_size": 32,
              "cuda_graph_backend_decode": "full", "cuda_graph_backend_prefill": "breakable"}
    notes = server_config.apply_base_overrides(values, FreeKVConfig(enabled=True))
    assert values["attention_backend"] == "freekv" and values["chunked_prefill_size"] == 8192  # kept
    assert "disable_radix_cache" not in values and values["disable_prefill_cuda_graph"] is True
    assert values["disable_overlap_schedule"] is True
    assert values["cuda_graph_backend_decode"] == "full"  # decode graphs stay
    assert values["cuda_graph_backend_prefill"] is None
    text = "\n".join(notes)
    assert "chunked_prefill_size" not in text and "radix" not in text
    assert "set disable_overlap_schedule=True (was default)" in text
    assert "cleared cuda_graph_backend_prefill (was 'breakable')" in text
    assert "page_size" not in text  # already right: no note
    assert server_config.apply_base_overrides(values, FreeKVConfig(enabled=True)) == []


def test_overlap_scheduler_opt_in(monkeypatch):
    """FREEKV_EXPERIMENTAL_OVERLAP_SCHEDULE=1 leaves the overlap scheduler alone and says so."""
    monkeypatch.setenv(server_config.OVERLAP_ENV, "1")
    values = {"disable_overlap_schedule": False}
    notes = server_config.apply_base_overrides(values, FreeKVConfig(enabled=True))
    assert values["disable_overlap_schedule"] is False
    assert any("overlap scheduler stays as configured" in n for n in notes)
    monkeypatch.setenv(server_config.OVERLAP_ENV, "0")
    server_config.apply_base_overrides(values, FreeKVConfig(enabled=True))
    assert values["disable_overlap_schedule"] is True


def test_overlap_scheduler_opt_in_end_to_end(base_kwargs, monkeypatch):
    monkeypatch.setenv(server_config.OVERLAP_ENV, "1")
    sa = freekv_sglang.make_server_args(**base_kwargs, kv_retrieval="freekv")
    assert sa.disable_overlap_schedule is False
