"""Start-up faults of issue 28 refused with a clear error: a sliding-window model before it loads (the plugin reads
its ``config.json``), and a GPU whose KV budget cannot hold one working set (before the model loads on an upper
bound of that budget, :mod:`freekv_sglang.gpu_fit`; then by the runtime's memory plan in the scheduler, where the
GPU's free memory is known). ``--freekv-host-memory-gb`` above the machine's RAM is
tests/test_config.py's; MLA models are tests/test_make_server_args.py's."""

from __future__ import annotations

import json

import pytest

import freekv_sglang
from freekv_sglang.config import ENV_VAR, FreeKVConfigError
from freekv_sglang.server_config import sliding_window_reason
from freekv_sglang.testing.shape_models import LLAMA_8B_SHAPE, QWEN_7B_SHAPE

MISTRAL_V01 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096,
               "max_position_embeddings": 32768, "num_hidden_layers": 32}
GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "sliding_window": 4096,
          "max_position_embeddings": 8192, "cache_implementation": "hybrid"}
GEMMA3 = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
          "text_config": {"model_type": "gemma3_text", "sliding_window": 1024, "sliding_window_pattern": 6,
                          "max_position_embeddings": 131072}}
GPT_OSS = {"architectures": ["GptOssForCausalLM"], "sliding_window": 128, "max_position_embeddings": 131072,
           "layer_types": ["sliding_attention", "full_attention"] * 12}
QWEN2_SWA = dict(QWEN_7B_SHAPE, use_sliding_window=True, sliding_window=4096, max_window_layers=21)


@pytest.mark.parametrize("cfg, refused", [
    (LLAMA_8B_SHAPE, False),
    (QWEN_7B_SHAPE, False),  # sliding_window with use_sliding_window false: full attention
    (QWEN2_SWA, False),  # SGLang's Qwen2 attends over the whole context whatever the flag says
    (dict(QWEN2_SWA, max_window_layers=28), False),
    (dict(QWEN_7B_SHAPE, layer_types=["full_attention"] * 28), False),  # transformers' newer Qwen2 configs
    (MISTRAL_V01, False),  # stock SGLang serves it with full attention, and so does FreeKV
    (dict(MISTRAL_V01, sliding_window=None), False),  # Mistral v0.2 on, Mixtral
    (GEMMA2, True),
    (GEMMA3, True),
    (GPT_OSS, True),
    ({"model_type": "phi3", "sliding_window": 262144, "max_position_embeddings": 131072}, False),  # 128K
    ({"model_type": "phi3", "sliding_window": 2047, "max_position_embeddings": 4096}, False),  # as SGLang: full
    ({"model_type": "llama4", "text_config": {"attention_chunk_size": 8192}}, True),
    ({"sliding_window": True, "max_position_embeddings": 4096}, False),  # not a window size
])
def test_sliding_window_reason(cfg, refused):
    assert bool(sliding_window_reason(cfg)) is refused


def test_a_window_shorter_than_a_longer_served_context_is_refused():
    cfg = {"architectures": ["Gemma2ForCausalLM"], "sliding_window": 32768, "max_position_embeddings": 32768}
    assert sliding_window_reason(cfg) is None
    assert "65536" in sliding_window_reason(cfg, context_length=65536)


def _folder(tmp_path, name, cfg):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def test_sliding_window_model_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    base = {k: v for k, v in LLAMA_8B_SHAPE.items() if not k.startswith("_")}
    model = _folder(tmp_path, "gemma2-shaped", dict(base, architectures=["Gemma2ForCausalLM"],
                                                    sliding_window=4096, max_position_embeddings=32768))
    with pytest.raises(FreeKVConfigError, match="sliding-window attention: sliding_window=4096") as e:
        freekv_sglang.make_server_args(model_path=model, device="cpu", kv_retrieval="freekv")
    assert "--model-path" in str(e.value) and "not supported" in str(e.value)
    freekv_sglang.make_server_args(model_path=model, device="cpu")  # without FreeKV: SGLang's business


def test_qwen2_with_its_window_off_is_served(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = _folder(tmp_path, "qwen2", {k: v for k, v in QWEN_7B_SHAPE.items() if not k.startswith("_")})
    # an explicit host budget: the automatic one follows this machine's free memory, which the test is not about
    sa = freekv_sglang.make_server_args(model_path=model, device="cpu", kv_retrieval="freekv",
                                        freekv_host_memory_gb=1)
    assert sa.attention_backend == "freekv"


def test_launch_server_refuses_a_sliding_window_model_fast(run_python, tmp_path):
    model = _folder(tmp_path, "gemma2", dict(GEMMA2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, num_hidden_layers=2, vocab_size=256))
    proc = run_python(["-m", "sglang.launch_server", "--model-path", model, "--device", "cpu",
                       "--kv-retrieval", "freekv"], timeout=120)
    assert proc.returncode != 0
    assert "sliding-window attention" in proc.stderr and "4096" in proc.stderr, proc.stderr[-2000:]


def test_a_gpu_too_small_for_one_working_set_says_what_to_change():
    """The KV budget is only known in the scheduler (after SGLang profiled the GPU), so this one is refused
    there, by the memory plan, before any request: the message gives the budget, what one working set needs and
    the flags that change it."""
    from freekv_sglang.algorithm.layout import WorkingSetLayout
    from freekv_sglang.runtime.sizing import FreeKVMemoryError, ModelShape, plan_memory

    import torch

    shape = ModelShape(32, 32, 8, 128, torch.bfloat16)
    layout = WorkingSetLayout(page_size=32, n_sink=16, n_select=32, n_window=16)
    with pytest.raises(FreeKVMemoryError) as e:
        plan_memory(shape, layout, host_bytes=4 * 2**30, gpu_bytes=64 * 2**20, max_context_len=131072)
    msg = str(e.value)
    assert "GPU memory for KV (0.06 GiB)" in msg and "one working set" in msg and "MiB" in msg
    for flag in ("--freekv-host-memory-gb", "--mem-fraction-static"):
        assert flag in msg


def _get(values):
    return lambda k, d: values.get(k, d)


def test_a_gpu_too_small_is_refused_before_the_model_loads(tmp_path):
    """Launcher side (:mod:`freekv_sglang.gpu_fit`): a 24 GiB GPU next to 16 GiB of weights at SGLang's
    --mem-fraction-static 0.6 leaves no KV budget at all (upper bound 14.4 - 16 < 0): refused before loading,
    naming the GPU, the weights and the flags; the same GPU with the fraction unset (bound 8 GiB) is left to the
    runtime's own check; unknown GPU or weights: nothing is checked."""
    from freekv_sglang.config import FreeKVConfig
    from freekv_sglang.gpu_fit import check_gpu_fits_one_working_set

    hf = {k: v for k, v in LLAMA_8B_SHAPE.items() if not k.startswith("_")}
    cfg = FreeKVConfig(host_memory_gb=8)
    with pytest.raises(FreeKVConfigError, match="refused before loading the model") as e:
        check_gpu_fits_one_working_set(_get({"mem_fraction_static": 0.6}), cfg, hf, gpu_bytes=24 * 2**30,
                                       weight_bytes=16 * 2**30)
    for part in ("24.0 GiB", "16.00 GiB of weights", "--freekv-select-tokens", "--mem-fraction-static"):
        assert part in str(e.value), str(e.value)
    check_gpu_fits_one_working_set(_get({}), cfg, hf, gpu_bytes=24 * 2**30, weight_bytes=16 * 2**30)
    # tensor parallelism splits the weights: 2 x 12 GiB on each of two GPUs fits
    check_gpu_fits_one_working_set(_get({"mem_fraction_static": 0.6, "tp_size": 2}), cfg, hf,
                                   gpu_bytes=24 * 2**30, weight_bytes=16 * 2**30)
    check_gpu_fits_one_working_set(_get({"model_path": str(tmp_path)}), cfg, hf, gpu_bytes=24 * 2**30)  # no files
    check_gpu_fits_one_working_set(_get({}), cfg, None, gpu_bytes=1, weight_bytes=2**40)  # no config.json


def test_weights_bytes_reads_the_model_folder(tmp_path):
    from freekv_sglang.gpu_fit import weights_bytes

    assert weights_bytes(str(tmp_path)) is None and weights_bytes("org/model-on-the-hub") is None
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 24)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 5)  # ignored beside safetensors
    assert weights_bytes(str(tmp_path)) == 1024


def test_make_server_args_refuses_a_gpu_too_small_before_loading(tmp_path, monkeypatch):
    """Wired into the launcher's checks of the requested arguments (the GPU's size faked: CI has none)."""
    import freekv_sglang.gpu_fit as gf

    monkeypatch.delenv(ENV_VAR, raising=False)
    model = _folder(tmp_path, "llama", {k: v for k, v in LLAMA_8B_SHAPE.items() if not k.startswith("_")})
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(gf, "weights_bytes", lambda path: 16 * 2**30)
    monkeypatch.setattr(gf, "largest_gpu_bytes", lambda: 16 * 2**30)
    with pytest.raises(FreeKVConfigError, match="too small"):
        freekv_sglang.make_server_args(model_path=model, device="cpu", kv_retrieval="freekv",
                                       freekv_host_memory_gb=1, mem_fraction_static=0.8)
